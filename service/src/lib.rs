//! What the two service binaries share beyond the wire: configuration
//! errors that name the file, the key and the reason ([`config`]); redb
//! files with named migrations that a service reopens after an I/O error
//! ([`redb_file`]); the local control socket that `status`, `enroll` and
//! `export` use to talk to a running service ([`control`]); and waiting for
//! SIGTERM or Ctrl-C ([`shutdown`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod control;
pub mod redb_file;
pub mod shutdown;

pub use config::ConfigError;
pub use redb_file::{Migration, OpenError, Opener, RedbFile, needs_reopen};
pub use shutdown::shutdown_signal;
