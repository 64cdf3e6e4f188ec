//! The hub's storage engines, and the one narrow contract they keep.
//!
//! An engine stores records and knows nothing of what they mean: it reads
//! and writes feed records, signed batches, schemas, the rows of the shared
//! copy (by point and in key order), per-feed state (re-reads, digests,
//! verification), key records, catalog documents and the audit log's
//! entries with their links. Every rule about them lives in
//! [`crate::apply`], written once against [`ReadTxn`] and [`WriteTxn`].
//! redb is the embedded engine ([`redb`]); [`memory`] keeps everything in
//! memory and runs the same `apply` tests, which proves this contract is
//! all an engine needs.
//!
//! Invariants: [`Engine::write_with`] returns `Ok` only after its transaction
//! committed durably, and on an error nothing of it is stored; a read sees
//! one committed state throughout.

pub mod memory;
pub mod redb;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use shuyuan_protocol::{
    DepartmentCode, Digest, FeedId, NodeId, SignedBatch, TableSchema, value::describe_key,
};
use shuyuan_service::{FileHealth, Unavailable, WriteFailure};

use crate::apply::audit::Link;
use crate::apply::feed::{FeedRecord, ResyncRecord, StoredRow};
use crate::apply::keys::{Enrollment, KeyRefusal, Revocation, Rotation};
use crate::apply::verification::VerifyRecord;

/// What the engine's own error is (redb's today, PostgreSQL's later).
pub type EngineError = Arc<dyn std::error::Error + Send + Sync>;

/// A stored thing an error concerns: named in every storage and
/// corruption error, so an operator knows which feed, batch, row or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The store as a whole: opening, a transaction, its commit.
    File,
    Feed(FeedId),
    Feeds,
    Schema(FeedId, u32),
    Batch(FeedId, u64),
    /// A row of the shared copy, by its encoded key.
    Row(FeedId, Vec<u8>),
    Rows(FeedId),
    Resync(FeedId),
    Digest(FeedId),
    Verification(FeedId),
    Enrollment(NodeId),
    Revocation(NodeId),
    Rotation(NodeId),
    /// Every record of a kind keyed by node key.
    Keys(&'static str),
    /// A table of the engine, by name.
    Table(String),
    /// An audit entry (None: the log as a whole).
    Audit(Option<u64>),
    Catalog(DepartmentCode),
    CatalogSync(DepartmentCode, NodeId),
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::File => write!(f, "the store"),
            Record::Feed(feed) => write!(f, "feed {feed}"),
            Record::Feeds => write!(f, "the feeds"),
            Record::Schema(feed, v) => write!(f, "schema {feed} v{v}"),
            Record::Batch(feed, seq) => write!(f, "batch {feed} #{seq}"),
            Record::Row(feed, key) => write!(f, "row {} of {feed}", describe_key(key)),
            Record::Rows(feed) => write!(f, "the rows of {feed}"),
            Record::Resync(feed) => write!(f, "resync of {feed}"),
            Record::Digest(feed) => write!(f, "digest of {feed}"),
            Record::Verification(feed) => write!(f, "verification of {feed}"),
            Record::Enrollment(key) => write!(f, "enrollment {key}"),
            Record::Revocation(key) => write!(f, "revocation {key}"),
            Record::Rotation(key) => write!(f, "rotation of {key}"),
            Record::Keys(what) => write!(f, "the {what}"),
            Record::Table(name) => write!(f, "table {name}"),
            Record::Audit(Some(id)) => write!(f, "audit entry {id}"),
            Record::Audit(None) => write!(f, "the audit log"),
            Record::Catalog(d) => write!(f, "catalog of {d}"),
            Record::CatalogSync(d, peer) => write!(f, "catalog sync state of {d} with {peer}"),
        }
    }
}

/// Store errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{} is in use by another shuyuan-hub process (only one hub may use a data directory)",
        .0.display()
    )]
    AlreadyOpen(PathBuf),
    /// The engine failed reading or writing `what`: the storage is in
    /// trouble (a full disk, an I/O error), not the record.
    #[error("hub storage error at {what}: {source}")]
    Engine {
        what: Record,
        #[source]
        source: EngineError,
    },
    /// A stored record does not decode.
    #[error("stored record {what} is corrupt: {source}")]
    Corrupt {
        what: Record,
        #[source]
        source: EngineError,
    },
    /// A key record change the rules refuse.
    #[error(transparent)]
    Key(#[from] KeyRefusal),
    /// The engine refuses writes until it can write again (its reopen
    /// policy: [`shuyuan_service::redb_file`]).
    #[error("{0}")]
    Unavailable(Arc<Unavailable>),
    #[error("the hub store is shutting down")]
    Closed,
}

impl StoreError {
    /// An engine error about `what`.
    pub fn engine(what: Record, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Engine {
            what,
            source: Arc::new(source),
        }
    }

    /// A record that does not decode.
    pub fn corrupt(what: Record, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Corrupt {
            what,
            source: Arc::new(source),
        }
    }

    /// A record that does not decode, with the reason in words.
    pub fn corrupt_because(what: Record, reason: impl Into<String>) -> Self {
        StoreError::corrupt(what, std::io::Error::other(reason.into()))
    }

    /// Whether the storage failed or refuses (rather than a rule or a
    /// record): nothing of the write was stored, and the engine reopens
    /// when its policy says so.
    pub fn is_storage(&self) -> bool {
        matches!(self, StoreError::Engine { .. } | StoreError::Unavailable(_))
    }
}

impl From<Unavailable> for StoreError {
    fn from(e: Unavailable) -> Self {
        StoreError::Unavailable(Arc::new(e))
    }
}

/// Visits rows (encoded key, row) until it returns `false`.
pub type RowVisit<'a> = &'a mut dyn FnMut(&[u8], StoredRow) -> Result<bool, StoreError>;

/// Visits audit entries (id, stored bytes) until it returns `false`.
pub type AuditVisit<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<bool, StoreError>;

/// What every rule may read, in a read or a write transaction.
pub trait ReadTxn {
    fn enrollment(&self, key: &NodeId) -> Result<Option<Enrollment>, StoreError>;
    fn enrollments(&self) -> Result<Vec<(NodeId, Enrollment)>, StoreError>;
    fn revocation(&self, key: &NodeId) -> Result<Option<Revocation>, StoreError>;
    fn revocations(&self) -> Result<Vec<(NodeId, Revocation)>, StoreError>;
    /// The rotation that replaced `old`.
    fn rotation(&self, old: &NodeId) -> Result<Option<Rotation>, StoreError>;
    /// Every rotation, by old key.
    fn rotations(&self) -> Result<Vec<(NodeId, Rotation)>, StoreError>;

    fn feed(&self, feed: &FeedId) -> Result<Option<FeedRecord>, StoreError>;
    fn feeds(&self) -> Result<Vec<(FeedId, FeedRecord)>, StoreError>;
    fn schema(&self, feed: &FeedId, version: u32) -> Result<Option<TableSchema>, StoreError>;
    /// One applied batch, as it was received.
    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, StoreError>;
    /// The newest applied batches of a feed, newest first.
    fn recent_batches(&self, feed: &FeedId, limit: usize) -> Result<Vec<SignedBatch>, StoreError>;

    /// One row of the shared copy, by its encoded key.
    fn row(&self, feed: &FeedId, key: &[u8]) -> Result<Option<StoredRow>, StoreError>;
    /// Visits the rows of a feed whose encoded keys are in `lo..hi` (`hi`
    /// None: to the end), in key order, with their keys, until `visit`
    /// returns `false`.
    fn rows(
        &self,
        feed: &FeedId,
        lo: &[u8],
        hi: Option<&[u8]>,
        visit: RowVisit<'_>,
    ) -> Result<(), StoreError>;

    fn resync(&self, feed: &FeedId) -> Result<Option<ResyncRecord>, StoreError>;
    /// Whether a change wrote the row since the feed's running re-read began.
    fn touched(&self, feed: &FeedId, key: &[u8]) -> Result<bool, StoreError>;
    fn digest(&self, feed: &FeedId) -> Result<Option<Digest>, StoreError>;
    fn verification(&self, feed: &FeedId) -> Result<Option<VerifyRecord>, StoreError>;

    /// The newest audit entry's id and the newest stored link (they differ
    /// only in a damaged log).
    fn audit_tail(&self) -> Result<(Option<u64>, Option<Link>), StoreError>;
    /// Visits the audit entries as stored, from `from` upwards, or newest
    /// first when `newest_first`, until `visit` returns `false`.
    fn audit_entries(
        &self,
        from: u64,
        newest_first: bool,
        visit: AuditVisit<'_>,
    ) -> Result<(), StoreError>;
    /// The chain link stored for an entry.
    fn audit_link(&self, id: u64) -> Result<Option<Link>, StoreError>;
    /// The first entry id at or after `from` that has a stored link.
    fn audit_link_after(&self, from: u64) -> Result<Option<u64>, StoreError>;
    fn audit_count(&self) -> Result<u64, StoreError>;

    /// A department's catalog document (automerge save format).
    fn catalog(&self, department: &DepartmentCode) -> Result<Option<Vec<u8>>, StoreError>;
    fn catalogs(&self) -> Result<Vec<(DepartmentCode, Vec<u8>)>, StoreError>;
    /// A peer's sync state for a department's catalog.
    fn catalog_sync(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
    ) -> Result<Option<Vec<u8>>, StoreError>;
}

/// What the rules may write, inside one transaction.
pub trait WriteTxn: ReadTxn {
    fn put_enrollment(&mut self, key: &NodeId, e: &Enrollment) -> Result<(), StoreError>;
    fn remove_enrollment(&mut self, key: &NodeId) -> Result<(), StoreError>;
    fn put_revocation(&mut self, key: &NodeId, r: &Revocation) -> Result<(), StoreError>;
    fn put_rotation(&mut self, old: &NodeId, r: &Rotation) -> Result<(), StoreError>;

    fn put_feed(&mut self, feed: &FeedId, record: &FeedRecord) -> Result<(), StoreError>;
    fn put_schema(&mut self, feed: &FeedId, schema: &TableSchema) -> Result<(), StoreError>;
    fn put_batch(&mut self, feed: &FeedId, seq: u64, batch: &SignedBatch)
    -> Result<(), StoreError>;
    /// Writes a row; returns the row it replaced.
    fn put_row(
        &mut self,
        feed: &FeedId,
        key: &[u8],
        row: &StoredRow,
    ) -> Result<Option<StoredRow>, StoreError>;
    /// Removes a row; returns it.
    fn remove_row(&mut self, feed: &FeedId, key: &[u8]) -> Result<Option<StoredRow>, StoreError>;

    fn put_resync(&mut self, feed: &FeedId, record: &ResyncRecord) -> Result<(), StoreError>;
    /// Marks a row as written since the running re-read began.
    fn touch(&mut self, feed: &FeedId, key: &[u8]) -> Result<(), StoreError>;
    /// Forgets every mark of the feed.
    fn clear_touched(&mut self, feed: &FeedId) -> Result<(), StoreError>;
    fn put_digest(&mut self, feed: &FeedId, digest: &Digest) -> Result<(), StoreError>;
    fn put_verification(&mut self, feed: &FeedId, record: &VerifyRecord) -> Result<(), StoreError>;

    /// Appends an audit entry as encoded, with its chain link.
    fn append_audit(&mut self, id: u64, entry: &[u8], link: &Link) -> Result<(), StoreError>;

    fn put_catalog(&mut self, department: &DepartmentCode, doc: &[u8]) -> Result<(), StoreError>;
    fn put_catalog_sync(
        &mut self,
        department: &DepartmentCode,
        peer: &NodeId,
        state: &[u8],
    ) -> Result<(), StoreError>;
}

/// A storage engine.
pub trait Engine: Send + Sync + fmt::Debug + 'static {
    /// Runs `f` in a read transaction.
    fn read_with(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Runs `f` in a write transaction and commits it durably; returns only
    /// after the commit. When `f` or the commit fails nothing is stored.
    /// While the engine cannot write it refuses without running `f`
    /// ([`StoreError::Unavailable`]); `f` is told when its commit would end
    /// a failure of writes (the failure), so that the record of that
    /// failure commits with it.
    fn write_with(&self, f: WriteFn<'_>) -> Result<(), StoreError>;
    /// How the engine's writes are going (the reopen policy's record). An
    /// engine that cannot fail reports nothing.
    fn health(&self) -> FileHealth {
        FileHealth::default()
    }
    /// Reopens the storage if its policy says a reopen is due: for a
    /// writer that is idle while writes fail. Returns whether it did.
    fn reopen_if_due(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// A write transaction's work: the transaction, and the failure of writes
/// its commit would end.
pub type WriteFn<'a> =
    &'a mut dyn FnMut(&mut dyn WriteTxn, Option<&WriteFailure>) -> Result<(), StoreError>;

impl dyn Engine {
    /// Reads in one transaction; `f`'s own errors pass through.
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&dyn ReadTxn) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut f = Some(f);
        let mut out = None;
        self.read_with(&mut |t| {
            if let Some(f) = f.take() {
                out = Some(f(t));
            }
            Ok(())
        })?;
        out.unwrap_or_else(|| Err(StoreError::engine(Record::File, NotRun).into()))
    }

    /// Writes in one durable transaction.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut dyn WriteTxn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut f = Some(f);
        let mut out = None;
        self.write_with(&mut |t, _| {
            if let Some(f) = f.take() {
                out = Some(f(t)?);
            }
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::engine(Record::File, NotRun))
    }
}

/// An engine returned without running the transaction's closure.
#[derive(Debug, thiserror::Error)]
#[error("the engine did not run the transaction")]
struct NotRun;
