//! What the two service binaries share beyond the wire: configuration
//! errors that name the file, the key and the reason ([`config`]); redb
//! files with named migrations, reopened after an I/O error under one
//! policy for every file ([`redb_file`]); node key files ([`keyfile`]);
//! the data directory and files only the service's user may read
//! ([`owner_only`]);
//! the local control socket that `status`, `enroll` and `export` use to
//! talk to a running service ([`control`]); and waiting for SIGTERM or
//! Ctrl-C ([`shutdown`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod control;
pub mod keyfile;
pub mod owner_only;
pub mod redb_file;
pub mod shutdown;

pub use config::ConfigError;
pub use redb_file::{
    FileHealth, Migration, OpenError, Opener, Opening, OperationError, RedbFile, ReopenSchedule,
    Unavailable, WriteFailure, needs_reopen,
};
pub use shutdown::shutdown_signal;
