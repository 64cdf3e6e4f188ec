//! What the hub keeps of each feed: its head and counters, the last
//! zero-update (零更新) and rejection, the latest re-read, and the rows of the
//! shared copy under the schema version each was written with.
//!
//! Plain records: the rules that change them are in [`super::batch`],
//! [`super::rows`] and [`super::verification`].

use serde::{Deserialize, Serialize};
use shuyuan_protocol::{FeedCursor, NodeId, RejectReason, TableSchema, UnixMillis, Value};

/// The last zero-update (零更新) received on a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZeroUpdateRecord {
    pub seq: u64,
    pub since: UnixMillis,
    pub until: UnixMillis,
    pub source_position: String,
    pub received_at: UnixMillis,
}

/// The last rejection on a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionRecord {
    pub at: UnixMillis,
    pub seq: u64,
    pub reason: RejectReason,
    pub detail: String,
}

/// What the hub knows about one feed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedRecord {
    /// The last applied batch.
    pub cursor: FeedCursor,
    pub schema: Option<TableSchema>,
    /// The key that signed the last applied batch.
    pub signer: Option<NodeId>,
    pub rows: u64,
    pub batches_applied: u64,
    pub changes_applied: u64,
    pub last_batch_received_at: Option<UnixMillis>,
    /// When the agent sealed the last batch that carried row changes.
    pub last_change_at: Option<UnixMillis>,
    pub last_zero_update: Option<ZeroUpdateRecord>,
    pub rejected: u64,
    pub last_rejection: Option<RejectionRecord>,
}

/// A re-read of a resource from its source ([`shuyuan_protocol::Resync`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRecord {
    pub id: u64,
    pub reason: String,
    /// The batch that carried `Begin`.
    pub started_seq: u64,
    pub started_at: UnixMillis,
    /// Rows written by any change since `Begin`.
    pub rows_written: u64,
    pub finished: Option<ResyncFinish>,
}

/// How a re-read ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncFinish {
    pub seq: u64,
    pub at: UnixMillis,
    /// Rows the re-read itself sent (the agent's count).
    pub rows_sent: u64,
    /// Rows removed because the source no longer has them.
    pub rows_removed: u64,
}

/// One row of the shared copy, under the schema version it was written with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRow {
    pub schema_version: u32,
    pub values: Vec<Value>,
}

/// For each column of `current`, its index in the `old` shape (by name).
pub fn column_mapping(old: &TableSchema, current: &TableSchema) -> Vec<Option<usize>> {
    current
        .columns
        .iter()
        .map(|c| old.columns.iter().position(|o| o.name == c.name))
        .collect()
}
