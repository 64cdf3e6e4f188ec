//! The hub store: enrollments, feed state, the shared copy of every
//! resource, the retained signed batches and the audit log.
//!
//! A narrow [`Backend`] trait hides the storage engine (redb is the embedded
//! default, see [`redb`]); the [`Store`] handle owns the single writer
//! thread, which groups concurrent requests into one transaction.
//!
//! Invariants: one writer per store; a batch is acknowledged only after the
//! transaction that applied it has committed durably; applying a batch whose
//! sequence number is already taken never changes the shared copy (it is a
//! replay or a fork, refused and audited); a rejected batch's pipelined
//! successors on the same connection are discarded quietly instead of each
//! producing another rejection.

pub mod audit_chain;
pub mod redb;
pub mod verify;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::federation::Registration;
use shuyuan_protocol::message::{Ack, Reject, VerifyOutcome, VerifyRefusal};
use shuyuan_protocol::{
    BatchBody, BatchHash, DepartmentCode, FeedCursor, FeedId, NodeId, RejectReason, SignedBatch,
    TableSchema, UnixMillis, Value,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Store errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0} is in use by another shuyuan-hub process (only one hub may use a data directory)")]
    AlreadyOpen(String),
    #[error("hub storage error: {0}")]
    Storage(String),
    #[error("stored record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(
        "key {key} is already enrolled for department {department}; one key serves one department"
    )]
    EnrolledElsewhere {
        key: NodeId,
        department: DepartmentCode,
    },
    #[error("key {key} is already enrolled as {was}, not as {now}")]
    KindChanged {
        key: NodeId,
        was: &'static str,
        now: &'static str,
    },
    #[error("key {key} was revoked at {at}: {reason}; a revoked key is never enrolled again")]
    Revoked {
        key: NodeId,
        at: UnixMillis,
        reason: String,
    },
    #[error("key {0} is not enrolled")]
    NotEnrolled(NodeId),
    #[error("key {old} was already replaced by {new}")]
    AlreadyRotated { old: NodeId, new: NodeId },
    #[error("the hub store is shutting down")]
    Closed,
}

/// An agent key replaced by its successor (密钥轮换), announced signed by
/// both keys. Batches the old key signed stay valid; once the new key has
/// connected the old one is retired and may no longer connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub new: NodeId,
    pub department: DepartmentCode,
    pub at: UnixMillis,
    pub retired: Option<UnixMillis>,
}

/// A change to the rotation records.
#[derive(Debug, Clone)]
pub enum RotationChange {
    /// Record `old -> new` (a verified announcement): the new key is
    /// enrolled as the old one was.
    Record {
        old: NodeId,
        new: NodeId,
        department: DepartmentCode,
    },
    /// The new key connected: retire its predecessor.
    Retire { old: NodeId },
}

/// A key withdrawn by an administrator: it may no longer connect, and
/// batches it signed are refused. The enrollment is kept to say whose it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub at: UnixMillis,
    pub reason: String,
    pub enrollment: Enrollment,
}

/// What kind of node a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// A department agent.
    Agent,
    /// A child hub (a platform one level down) that forwards its feeds here;
    /// the enrollment's `department` is its platform code.
    Hub,
    /// A key enrolled at a hub further down, known from its signed
    /// registration; it never connects here. `via` is the child hub whose
    /// subtree it belongs to; `hub` says whether the key is a hub's (as the
    /// registration says, checked when it was recorded).
    Below {
        via: NodeId,
        hub: bool,
        registration: Registration,
    },
}

impl NodeKind {
    fn name(&self) -> &'static str {
        match self {
            NodeKind::Agent => "agent",
            NodeKind::Hub => "hub",
            NodeKind::Below { .. } => "registration from below",
        }
    }
}

/// A key the hub accepts, and for which department.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The department; for a hub, its platform code.
    pub department: DepartmentCode,
    /// The department's name (部门名称), or the platform's.
    pub name: String,
    pub kind: NodeKind,
    pub enrolled_at: UnixMillis,
}

impl Enrollment {
    /// The key is a hub: a child hub, or a hub registered below one.
    pub fn is_hub(&self) -> bool {
        match &self.kind {
            NodeKind::Agent => false,
            NodeKind::Hub => true,
            NodeKind::Below { hub, .. } => *hub,
        }
    }

    /// The child hub this key's data arrives through (itself for a child
    /// hub), or None for a directly connected agent.
    pub fn via(&self, key: &NodeId) -> Option<NodeId> {
        match &self.kind {
            NodeKind::Agent => None,
            NodeKind::Hub => Some(*key),
            NodeKind::Below { via, .. } => Some(*via),
        }
    }
}

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

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A key that is not enrolled tried to connect.
    HandshakeRefused,
    /// A batch was refused.
    BatchRejected,
    /// A catalog sync message was refused (not the sender's fields, or
    /// another department's catalog).
    CatalogRejected,
    /// An entry of a department's catalog was reviewed.
    CatalogReviewed,
    /// A key was enrolled.
    Enrolled,
    /// A connection broke the protocol or claimed another department.
    ConnectionRefused,
    /// A feed began re-reading its resource from the source (feed alarm when
    /// the reason is a lost capture position).
    ResyncStarted,
    /// A re-read finished; rows the source no longer has were removed.
    ResyncFinished,
    /// The copy differs from the source (a checkpoint's digests differ, or a
    /// range compared with the source does).
    Diverged,
    /// A verification run that found differences ended: what was repaired.
    Repaired,
    /// The agent cannot compare a resource with its source (why).
    VerifyRefused,
    /// An administrator revoked a key.
    Revoked,
    /// An agent announced its next key; or the old key was retired.
    KeyRotated,
    /// An agent's clock is off by more than the hub tolerates.
    ClockSkew,
    /// The store could not write for a while (a full disk, an I/O error);
    /// recorded when it writes again, with how long and why.
    StoreFailed,
}

impl AuditKind {
    /// The kind's name as serialised (`batch_rejected`, ...): what the audit
    /// filter, the API and the metrics use.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// Audit entries by kind and rejection reason.
pub type AuditCounts = BTreeMap<(AuditKind, Option<RejectReason>), u64>;

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned by the store, increasing.
    pub id: u64,
    pub at: UnixMillis,
    pub kind: AuditKind,
    pub peer: Option<NodeId>,
    pub feed: Option<FeedId>,
    pub seq: Option<u64>,
    pub reason: Option<RejectReason>,
    pub detail: String,
}

impl AuditEntry {
    pub fn new(kind: AuditKind, detail: impl Into<String>) -> Self {
        AuditEntry {
            id: 0,
            at: UnixMillis::now(),
            kind,
            peer: None,
            feed: None,
            seq: None,
            reason: None,
            detail: detail.into(),
        }
    }
}

/// A batch whose signature and signer were checked by the connection.
#[derive(Debug, Clone)]
pub struct VerifiedBatch {
    pub signed: SignedBatch,
    pub body: BatchBody,
    pub hash: BatchHash,
}

/// A batch as it reaches the writer: verified, or already refused by the
/// connection (bad signature, wrong signer) with the feed it claimed.
#[derive(Debug, Clone)]
pub enum Incoming {
    Verified(Box<VerifiedBatch>),
    Refused {
        feed: Option<FeedId>,
        seq: u64,
        reason: RejectReason,
        detail: String,
    },
}

/// The answer to one incoming batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ack(Ack),
    Reject(Reject),
    /// A pipelined successor of a rejected batch: dropped without a reply.
    Discarded,
}

/// One unit of work in a write group.
#[derive(Debug)]
pub enum WriteOp {
    Apply {
        conn: u64,
        peer: NodeId,
        incoming: Incoming,
        outcome: Option<Outcome>,
    },
    Audit(AuditEntry),
    Enroll {
        key: NodeId,
        enrollment: Enrollment,
        outcome: Option<Result<bool, StoreError>>,
    },
    /// Records a key rotation: whether it is new, or why not.
    Rotate {
        change: RotationChange,
        outcome: Option<Result<bool, StoreError>>,
    },
    /// Revokes an enrolled key: the revocation, or why not.
    Revoke {
        key: NodeId,
        reason: String,
        outcome: Option<Result<Revocation, StoreError>>,
    },
    /// Stores a department's catalog document, with the sync state of the
    /// peer whose message changed it, in one transaction.
    SaveCatalog(CatalogSave),
    /// Starts a verification run of a feed: the run's id, or why not.
    StartVerify {
        feed: FeedId,
        reason: String,
        outcome: Option<Result<u64, String>>,
    },
    /// The agent cannot answer a run: it ends, proving nothing.
    RefuseVerify {
        peer: NodeId,
        refusal: VerifyRefusal,
    },
}

/// What the connections must pass on to agents after a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyEvent {
    /// The feed's verification has ranges to ask for.
    Requests(FeedId),
    /// A run ended.
    Finished(VerifyOutcome),
}

/// For each column of `current`, its index in the `old` shape (by name).
pub fn column_mapping(old: &TableSchema, current: &TableSchema) -> Vec<Option<usize>> {
    current
        .columns
        .iter()
        .map(|c| old.columns.iter().position(|o| o.name == c.name))
        .collect()
}

/// A catalog document to store.
#[derive(Debug, Clone)]
pub struct CatalogSave {
    pub department: DepartmentCode,
    /// The whole document (`automerge` save format), unless only the sync
    /// state moved.
    pub document: Option<Vec<u8>>,
    /// A peer's encoded sync state, stored with the document.
    pub sync: Option<(NodeId, Vec<u8>)>,
}

/// How the store's writes are going: what status, metrics, the console
/// and alerts report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHealth {
    /// Since when writes fail (a full disk, an I/O error), while they do.
    /// Meanwhile every batch is refused as unavailable and none is
    /// acknowledged; agents keep them and resend.
    pub failing_since: Option<UnixMillis>,
    /// Why the last write or reopen failed, while failing.
    pub error: Option<String>,
    /// Write groups refused because the store could not write, since start.
    pub failed_writes: u64,
    /// How often the store recovered by itself, since start.
    pub recoveries: u64,
}

impl StoreHealth {
    pub fn writable(&self) -> bool {
        self.failing_since.is_none()
    }
}

/// A storage engine for the hub.
pub trait Backend: Send + Sync + 'static {
    /// Closes the storage and opens it again, after a failed write left it
    /// refusing further writes (redb does until reopened).
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Performs a group of operations in one durable transaction, in order,
    /// filling in each operation's outcome; batches that `discards` marks as
    /// pipelined successors of a rejection are answered `Discarded` without
    /// being looked at, and every outcome is reported back to it. On error
    /// nothing of the group is stored. What agents must be told after the
    /// commit is added to `events`.
    fn write(
        &self,
        group: &mut [WriteOp],
        discards: &mut Discards,
        events: &mut Vec<VerifyEvent>,
    ) -> Result<(), StoreError>;
    /// The feed's verification state.
    fn verification(&self, feed: &FeedId) -> Result<Option<verify::VerifyRecord>, StoreError>;
    fn enrollments(&self) -> Result<Vec<(NodeId, Enrollment)>, StoreError>;
    fn revocations(&self) -> Result<Vec<(NodeId, Revocation)>, StoreError>;
    /// Every rotation, by old key.
    fn rotations(&self) -> Result<Vec<(NodeId, Rotation)>, StoreError>;
    fn feeds(&self) -> Result<Vec<(FeedId, FeedRecord)>, StoreError>;
    fn feed(&self, feed: &FeedId) -> Result<Option<FeedRecord>, StoreError>;
    fn schema(&self, feed: &FeedId, version: u32) -> Result<Option<TableSchema>, StoreError>;
    /// The feed's latest re-read, running or finished.
    fn resync(&self, feed: &FeedId) -> Result<Option<ResyncRecord>, StoreError>;
    /// Visits the shared copy of a feed in key order, until `visit`
    /// returns `false`.
    fn rows(
        &self,
        feed: &FeedId,
        visit: &mut dyn FnMut(StoredRow) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError>;
    /// Visits the audit log newest first, until `visit` returns `false`.
    fn audit_scan(&self, visit: &mut dyn FnMut(AuditEntry) -> bool) -> Result<(), StoreError>;
    /// The newest audit entries, newest first.
    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        if limit > 0 {
            self.audit_scan(&mut |e| {
                out.push(e);
                out.len() < limit
            })?;
        }
        Ok(out)
    }
    /// Audit entries written since the store opened, by kind and reason.
    fn audit_counts(&self) -> AuditCounts;
    /// One applied batch of a feed, as it was received.
    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, StoreError>;
    /// The newest applied batches of a feed, newest first.
    fn recent_batches(&self, feed: &FeedId, limit: usize) -> Result<Vec<SignedBatch>, StoreError>;
    /// How many audit entries exist.
    fn audit_count(&self) -> Result<u64, StoreError>;
    /// Checks the audit log's hash chain from the first entry, against a
    /// head recorded earlier if one is given.
    fn audit_verify(
        &self,
        expect_head: Option<audit_chain::Link>,
    ) -> Result<audit_chain::ChainReport, StoreError>;
    /// A department's stored catalog document.
    fn catalog(&self, department: &DepartmentCode) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every stored catalog document.
    fn catalogs(&self) -> Result<Vec<(DepartmentCode, Vec<u8>)>, StoreError>;
    /// The stored sync state of a peer for a department's catalog.
    fn catalog_sync(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
    ) -> Result<Option<Vec<u8>>, StoreError>;
}

/// Which batches are pipelined successors of a rejected batch, per
/// connection and feed: after batch `n` is refused, batches `n+1, n+2, ...`
/// that were already on their way are dropped quietly until the connection
/// sends anything else (normally the resend from the hub's head).
#[derive(Debug, Clone, Default)]
pub struct Discards(BTreeMap<(u64, FeedId), u64>);

impl Discards {
    /// Whether this batch is such a successor (and, if so, expect the next).
    pub fn discard(&mut self, conn: u64, feed: &FeedId, seq: u64) -> bool {
        let key = (conn, feed.clone());
        if self.0.get(&key) == Some(&seq) {
            self.0.insert(key, seq + 1);
            tracing::debug!(%feed, seq, "discarded a pipelined successor of a rejected batch");
            true
        } else {
            false
        }
    }

    /// Learns from a batch's outcome.
    pub fn record(&mut self, conn: u64, feed: &FeedId, seq: u64, outcome: &Outcome) {
        match outcome {
            Outcome::Reject(r) if r.reason != RejectReason::Unavailable => {
                self.0.insert((conn, feed.clone()), seq + 1);
            }
            Outcome::Ack(_) => {
                self.0.remove(&(conn, feed.clone()));
            }
            _ => {}
        }
    }

    fn forget(&mut self, conn: u64) {
        self.0.retain(|(c, _), _| *c != conn);
    }
}

enum Command {
    Apply {
        conn: u64,
        peer: NodeId,
        incoming: Incoming,
        reply: oneshot::Sender<Outcome>,
    },
    Audit(AuditEntry),
    Enroll {
        key: NodeId,
        enrollment: Enrollment,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Revoke {
        key: NodeId,
        reason: String,
        reply: oneshot::Sender<Result<Revocation, StoreError>>,
    },
    Rotate {
        change: RotationChange,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Closed {
        conn: u64,
    },
    SaveCatalog {
        save: CatalogSave,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    StartVerify {
        feed: FeedId,
        reason: String,
        reply: oneshot::Sender<Result<Result<u64, String>, StoreError>>,
    },
    RefuseVerify {
        peer: NodeId,
        refusal: VerifyRefusal,
    },
    /// Answered once everything queued before it has been decided.
    Barrier(oneshot::Sender<()>),
    Shutdown,
}

/// Most requests grouped into one transaction.
const MAX_GROUP: usize = 256;
/// Capacity of the writer's queue.
const QUEUE: usize = 1024;

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<VerifyEvent>,
    committed: watch::Receiver<u64>,
    health: watch::Receiver<StoreHealth>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The writer thread; join it after the last [`Store`] handle is dropped.
#[derive(Debug)]
pub struct Writer(std::thread::JoinHandle<()>);

impl Writer {
    /// Waits for the writer to finish its queue and stop.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl Store {
    /// Starts the writer thread over `backend`.
    pub fn start(backend: Arc<dyn Backend>) -> Result<(Store, Writer), StoreError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (events, _) = broadcast::channel(QUEUE);
        let writer_backend = backend.clone();
        let writer_events = events.clone();
        let (commits, committed) = watch::channel(0);
        let (health_tx, health) = watch::channel(StoreHealth::default());
        let heads = backend
            .feeds()?
            .into_iter()
            .map(|(f, r)| (f, r.cursor.next_seq()))
            .collect();
        let writer = WriteLoop {
            backend: writer_backend,
            events: writer_events,
            commits,
            health: health_tx,
            heads,
            failing: None,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Store {
                backend,
                tx,
                events,
                committed,
                health,
            },
            Writer(handle),
        ))
    }

    /// A counter of committed write groups: changes whenever the store
    /// committed something (batches, enrollments, catalogs).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Whether the store can write, and since when it cannot.
    pub fn health(&self) -> StoreHealth {
        self.health.borrow().clone()
    }

    /// Verification events of committed transactions.
    pub fn verify_events(&self) -> broadcast::Receiver<VerifyEvent> {
        self.events.subscribe()
    }

    /// Starts a verification run of a feed; returns its id, or why not.
    pub async fn start_verify(
        &self,
        feed: FeedId,
        reason: String,
    ) -> Result<Result<u64, String>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::StartVerify {
                feed,
                reason,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The storage engine, for reads.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Submits a batch; the returned receiver yields its outcome once the
    /// transaction that decided it has committed.
    pub async fn apply(
        &self,
        conn: u64,
        peer: NodeId,
        incoming: Incoming,
    ) -> Result<oneshot::Receiver<Outcome>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Apply {
                conn,
                peer,
                incoming,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Records an audit entry without waiting (dropped with a log line if the
    /// writer is saturated, so that a flood of bad handshakes cannot stall
    /// the hub).
    pub fn audit(&self, entry: AuditEntry) {
        if let Err(e) = self.tx.try_send(Command::Audit(entry)) {
            tracing::warn!(error = %e, "audit queue full; audit entry dropped");
        }
    }

    /// Records an enrollment durably. Returns whether it is new.
    pub async fn enroll(&self, key: NodeId, enrollment: Enrollment) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Enroll {
                key,
                enrollment,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a rotation change durably, with its audit entry.
    pub async fn rotate(&self, change: RotationChange) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Rotate { change, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a revocation durably, with its audit entry.
    pub async fn revoke(&self, key: NodeId, reason: String) -> Result<Revocation, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Revoke { key, reason, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Waits until every request queued before this call has been decided
    /// (committed or refused), so that reads after it see them.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Barrier(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// The agent cannot answer a verification run (recorded without
    /// waiting).
    pub async fn refuse_verify(&self, peer: NodeId, refusal: VerifyRefusal) {
        let _ = self.tx.send(Command::RefuseVerify { peer, refusal }).await;
    }

    /// A connection ended; forget its per-connection state.
    pub fn connection_closed(&self, conn: u64) {
        let _ = self.tx.try_send(Command::Closed { conn });
    }

    /// Stores a catalog document (and a sync state) durably.
    pub async fn save_catalog(&self, save: CatalogSave) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SaveCatalog { save, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Asks the writer to finish what is queued and stop; later requests
    /// fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// After a failed write the store is reopened this soon, then at growing
/// intervals up to [`RECOVERY_MAX`] while writes keep failing.
const RECOVERY_MIN: Duration = Duration::from_millis(500);
const RECOVERY_MAX: Duration = Duration::from_secs(5);
/// A reopened store is proven by the next write group (agents resend
/// refused batches within 30 s); when none comes for this long, a lone
/// audit entry proves it instead. Longer than agents' resend backoff, so
/// that a disk with room for a small entry but not for batches does not
/// count as recovered.
const IDLE_PROOF: Duration = Duration::from_secs(60);

/// The writer thread's state.
struct WriteLoop {
    backend: Arc<dyn Backend>,
    events: broadcast::Sender<VerifyEvent>,
    commits: watch::Sender<u64>,
    health: watch::Sender<StoreHealth>,
    /// Each feed's next expected sequence number as committed: what a
    /// refusal tells the agent to resend from while the store cannot be
    /// read either.
    heads: HashMap<FeedId, u64>,
    failing: Option<Failing>,
}

/// A spell of failed writes. It ends when a write commits after the store
/// was reopened; the spell's audit entry is part of that write.
struct Failing {
    since: UnixMillis,
    error: String,
    /// Write groups refused during this spell.
    refused: u64,
    /// Reopened since the last failed write: the next write may succeed.
    reopened: bool,
    wait: Duration,
    retry_at: Instant,
}

/// Every [`Store`] handle is gone.
struct Closed;

impl WriteLoop {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut discards = Discards::default();
        let mut stopping = false;
        while !stopping {
            if self
                .failing
                .as_ref()
                .is_some_and(|f| Instant::now() >= f.retry_at)
            {
                self.retry();
            }
            let first = match self.failing.as_ref().map(|f| f.retry_at) {
                None => rx.blocking_recv().ok_or(Closed),
                Some(until) => match recv_until(&mut rx, until) {
                    Ok(Some(c)) => Ok(c),
                    // Time to reopen, or to prove the store idle.
                    Ok(None) => continue,
                    Err(closed) => Err(closed),
                },
            };
            let Ok(first) = first else {
                break;
            };
            let mut commands = vec![first];
            while commands.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => commands.push(c),
                    Err(_) => break,
                }
            }
            let (mut ops, mut replies, barriers) = group(commands, &mut discards, &mut stopping);
            if !ops.is_empty() {
                if let Some(entry) = self.spell_entry() {
                    ops.push(WriteOp::Audit(entry));
                    replies.push(Reply::None);
                }
                let result = self.write(&mut ops, &mut discards);
                self.answer(ops, replies, &result);
            }
            for b in barriers {
                let _ = b.send(());
            }
        }
    }

    /// The audit entry that ends the current spell, when the store was
    /// reopened and the next write may succeed.
    fn spell_entry(&self) -> Option<AuditEntry> {
        let f = self.failing.as_ref().filter(|f| f.reopened)?;
        Some(AuditEntry::new(
            AuditKind::StoreFailed,
            format!(
                "the store could not write from {} to {} ({}); {} write groups were refused as unavailable and nothing was acknowledged; reopened, it writes again",
                f.since,
                UnixMillis::now(),
                f.error,
                f.refused
            ),
        ))
    }

    /// Writes one group. While failing, a group is refused without touching
    /// the file until the file was reopened.
    fn write(&mut self, ops: &mut [WriteOp], discards: &mut Discards) -> Result<(), StoreError> {
        if let Some(f) = self.failing.as_mut().filter(|f| !f.reopened) {
            f.refused += 1;
            self.health.send_modify(|h| h.failed_writes += 1);
            return Err(StoreError::Storage(f.error.clone()));
        }
        let before = discards.clone();
        let mut new_events = Vec::new();
        let result = self.backend.write(ops, discards, &mut new_events);
        match &result {
            Ok(()) => {
                if let Some(f) = self.failing.take() {
                    self.recovered(&f);
                }
                self.commits.send_modify(|n| *n += 1);
                for e in new_events {
                    // Nobody listening is fine: connections read what is
                    // pending when they start.
                    let _ = self.events.send(e);
                }
                for op in ops.iter() {
                    if let WriteOp::Apply {
                        outcome: Some(Outcome::Ack(a)),
                        ..
                    } = op
                    {
                        let next = a.seq.saturating_add(1);
                        let head = self.heads.entry(a.feed.clone()).or_insert(next);
                        *head = (*head).max(next);
                    }
                }
            }
            Err(StoreError::Storage(reason)) => {
                *discards = before;
                self.failed(reason.clone());
            }
            Err(e) => {
                *discards = before;
                tracing::error!(error = %e, "store write failed; the affected batches are refused as unavailable and will be resent");
            }
        }
        result
    }

    /// A write failed in the storage engine: start a spell, or go on with
    /// the current one and reopen again later.
    fn failed(&mut self, error: String) {
        match self.failing.as_mut() {
            Some(f) => {
                f.refused += 1;
                f.reopened = false;
                f.wait = (f.wait * 2).min(RECOVERY_MAX);
                f.retry_at = Instant::now() + f.wait;
                f.error = error.clone();
            }
            None => {
                tracing::error!(%error, "the store cannot write: batches are refused as unavailable (never acknowledged) and agents keep them; reopening the store until it writes again");
                let now = UnixMillis::now();
                self.failing = Some(Failing {
                    since: now,
                    error: error.clone(),
                    refused: 1,
                    reopened: false,
                    wait: RECOVERY_MIN,
                    retry_at: Instant::now() + RECOVERY_MIN,
                });
                self.health.send_modify(|h| h.failing_since = Some(now));
            }
        }
        self.health.send_modify(|h| {
            h.failed_writes += 1;
            h.error = Some(error);
        });
    }

    /// Reopens the store when due; or, reopened and idle for
    /// [`IDLE_PROOF`], proves it with the spell's audit entry alone.
    fn retry(&mut self) {
        let Some(f) = self.failing.as_mut() else {
            return;
        };
        if f.reopened {
            if let Some(entry) = self.spell_entry() {
                let mut proof = [WriteOp::Audit(entry)];
                let _ = self.write(&mut proof, &mut Discards::default());
            }
            return;
        }
        match self.backend.reopen() {
            Ok(()) => {
                f.reopened = true;
                f.retry_at = Instant::now() + IDLE_PROOF;
            }
            Err(e) => {
                tracing::debug!(error = %e, "the store cannot be reopened yet");
                f.error = match e {
                    StoreError::Storage(reason) => reason,
                    other => other.to_string(),
                };
                f.wait = (f.wait * 2).min(RECOVERY_MAX);
                f.retry_at = Instant::now() + f.wait;
                let error = f.error.clone();
                self.health.send_modify(|h| h.error = Some(error));
            }
        }
    }

    /// The spell `f` ended: a write committed after reopening.
    fn recovered(&mut self, f: &Failing) {
        tracing::info!(since = %f.since, refused = f.refused, "the store writes again");
        if let Ok(feeds) = self.backend.feeds() {
            self.heads = feeds
                .into_iter()
                .map(|(f, r)| (f, r.cursor.next_seq()))
                .collect();
        }
        self.health.send_modify(|h| {
            h.failing_since = None;
            h.error = None;
            h.recoveries += 1;
        });
    }

    /// Sends every operation's outcome once its group has ended.
    fn answer(&self, ops: Vec<WriteOp>, replies: Vec<Reply>, result: &Result<(), StoreError>) {
        for (op, reply) in ops.into_iter().zip(replies) {
            match (reply, op) {
                (Reply::Apply { feed, seq, reply }, WriteOp::Apply { outcome, .. }) => {
                    let outcome = match outcome.filter(|_| result.is_ok()) {
                        Some(o) => o,
                        None => Outcome::Reject(Reject {
                            feed: feed.clone(),
                            seq,
                            reason: RejectReason::Unavailable,
                            detail: result
                                .as_ref()
                                .err()
                                .map_or_else(|| "no outcome".to_string(), ToString::to_string),
                            resend_from: feed.as_ref().map_or(1, |f| self.head(f)),
                        }),
                    };
                    let _ = reply.send(outcome);
                }
                (Reply::Verify(reply), WriteOp::StartVerify { outcome, .. }) => {
                    let _ = reply.send(decided(result, outcome.map(Ok)));
                }
                (Reply::Saved(reply), WriteOp::SaveCatalog(_)) => {
                    let _ = reply.send(result.clone());
                }
                (Reply::Enroll(reply), WriteOp::Enroll { outcome, .. }) => {
                    let _ = reply.send(decided(result, outcome));
                }
                (Reply::Enroll(reply), WriteOp::Rotate { outcome, .. }) => {
                    let _ = reply.send(decided(result, outcome));
                }
                (Reply::Revoke(reply), WriteOp::Revoke { outcome, .. }) => {
                    let _ = reply.send(decided(result, outcome));
                }
                _ => {}
            }
        }
    }

    /// The feed's next expected sequence number as committed: from the
    /// store while it can be read, else as the writer last committed it.
    fn head(&self, feed: &FeedId) -> u64 {
        let stored = match self.failing {
            None => self.backend.feed(feed).ok(),
            Some(_) => None,
        };
        match stored {
            Some(record) => record.map_or(1, |r| r.cursor.next_seq()),
            None => self.heads.get(feed).copied().unwrap_or(1),
        }
    }
}

/// Waits for a command until `until` (None if none came).
fn recv_until(rx: &mut mpsc::Receiver<Command>, until: Instant) -> Result<Option<Command>, Closed> {
    loop {
        match rx.try_recv() {
            Ok(c) => return Ok(Some(c)),
            Err(mpsc::error::TryRecvError::Disconnected) => return Err(Closed),
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        if now >= until {
            return Ok(None);
        }
        std::thread::sleep((until - now).min(Duration::from_millis(20)));
    }
}

/// Turns queued commands into one write group: the operations, who waits
/// for each, and the barriers to answer after it.
fn group(
    commands: Vec<Command>,
    discards: &mut Discards,
    stopping: &mut bool,
) -> (Vec<WriteOp>, Vec<Reply>, Vec<oneshot::Sender<()>>) {
    let mut ops = Vec::with_capacity(commands.len());
    let mut replies: Vec<Reply> = Vec::with_capacity(commands.len());
    let mut barriers = Vec::new();
    for c in commands {
        match c {
            Command::Apply {
                conn,
                peer,
                incoming,
                reply,
            } => {
                let (feed, seq) = match &incoming {
                    Incoming::Verified(v) => (Some(v.body.feed.clone()), v.body.seq),
                    Incoming::Refused { feed, seq, .. } => (feed.clone(), *seq),
                };
                ops.push(WriteOp::Apply {
                    conn,
                    peer,
                    incoming,
                    outcome: None,
                });
                replies.push(Reply::Apply { feed, seq, reply });
            }
            Command::Audit(e) => {
                ops.push(WriteOp::Audit(e));
                replies.push(Reply::None);
            }
            Command::Enroll {
                key,
                enrollment,
                reply,
            } => {
                ops.push(WriteOp::Enroll {
                    key,
                    enrollment,
                    outcome: None,
                });
                replies.push(Reply::Enroll(reply));
            }
            Command::Rotate { change, reply } => {
                ops.push(WriteOp::Rotate {
                    change,
                    outcome: None,
                });
                replies.push(Reply::Enroll(reply));
            }
            Command::Revoke { key, reason, reply } => {
                ops.push(WriteOp::Revoke {
                    key,
                    reason,
                    outcome: None,
                });
                replies.push(Reply::Revoke(reply));
            }
            Command::SaveCatalog { save, reply } => {
                ops.push(WriteOp::SaveCatalog(save));
                replies.push(Reply::Saved(reply));
            }
            Command::RefuseVerify { peer, refusal } => {
                ops.push(WriteOp::RefuseVerify { peer, refusal });
                replies.push(Reply::None);
            }
            Command::StartVerify {
                feed,
                reason,
                reply,
            } => {
                ops.push(WriteOp::StartVerify {
                    feed,
                    reason,
                    outcome: None,
                });
                replies.push(Reply::Verify(reply));
            }
            Command::Closed { conn } => discards.forget(conn),
            Command::Barrier(reply) => barriers.push(reply),
            Command::Shutdown => *stopping = true,
        }
    }
    (ops, replies, barriers)
}

/// An operation's outcome once its group's transaction has ended.
fn decided<T>(
    group: &Result<(), StoreError>,
    outcome: Option<Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match (group, outcome) {
        (Ok(()), Some(o)) => o,
        (Err(e), _) => Err(e.clone()),
        (Ok(()), None) => Err(StoreError::Storage("no outcome".into())),
    }
}

enum Reply {
    None,
    Apply {
        feed: Option<FeedId>,
        seq: u64,
        reply: oneshot::Sender<Outcome>,
    },
    Enroll(oneshot::Sender<Result<bool, StoreError>>),
    Revoke(oneshot::Sender<Result<Revocation, StoreError>>),
    Saved(oneshot::Sender<Result<(), StoreError>>),
    Verify(oneshot::Sender<Result<Result<u64, String>, StoreError>>),
}
