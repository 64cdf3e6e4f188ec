//! shuyuan's wire protocol: pure types and rules, no I/O, no runtime, no
//! storage.
//!
//! Everything both ends of a feed must agree on lives here: node identities
//! ([`identity`]), the one wire and storage encoding ([`encoding`]), the row
//! and value model ([`value`], [`change`]), signed hash-chained batches
//! ([`batch`], [`chain`]), resource digests ([`digest`]), the versioned
//! message envelope ([`message`]), bounded framing ([`frame`]) and the sans-IO
//! sending side of a feed connection ([`sender`], with its send/ack
//! [`window`]). The QUIC glue that the agent's uplink
//! and the hub share is the `shuyuan-link` crate; what the two services share
//! beyond the wire (config errors, redb files, the control socket) is
//! `shuyuan-service`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod catalog;
pub mod chain;
pub mod change;
pub mod cycle;
pub mod digest;
pub mod encoding;
pub mod federation;
pub mod feed;
pub mod frame;
pub mod identity;
pub mod message;
pub mod rotation;
pub mod sender;
pub mod time;
pub mod value;
pub mod window;

pub use batch::{
    BatchBody, BatchHash, Entry, RangeDigest, RangeRepair, Resync, SignedBatch, ZeroUpdate,
};
pub use chain::{ChainError, FeedCursor};
pub use change::{Column, Op, RowChange, TableSchema};
pub use cycle::UpdateCycle;
pub use digest::{Digest, DigestSummary, KeyRange, RowSeed};
pub use feed::{DepartmentCode, FeedId, ResourceCode};
pub use frame::MAX_FRAME_SIZE;
pub use identity::{NodeId, NodeKey};
pub use message::{ALPN, Message, MessageV1, RejectReason};
pub use time::UnixMillis;
pub use value::Value;

/// The software version, sent in `Hello` so the hub can tell operators which
/// agent build is talking to it.
pub const SOFTWARE: &str = concat!("shuyuan/", env!("CARGO_PKG_VERSION"));
