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

pub mod redb;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

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
    #[error("the hub store is shutting down")]
    Closed,
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

/// A storage engine for the hub.
pub trait Backend: Send + Sync + 'static {
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
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer_backend, rx, writer_events, commits))
            .map_err(|e| StoreError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Store {
                backend,
                tx,
                events,
                committed,
            },
            Writer(handle),
        ))
    }

    /// A counter of committed write groups: changes whenever the store
    /// committed something (batches, enrollments, catalogs).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.clone()
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

fn write_loop(
    backend: Arc<dyn Backend>,
    mut rx: mpsc::Receiver<Command>,
    events: broadcast::Sender<VerifyEvent>,
    commits: watch::Sender<u64>,
) {
    let mut discards = Discards::default();
    let mut stopping = false;
    while !stopping {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut commands = vec![first];
        while commands.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(_) => break,
            }
        }
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
                Command::Shutdown => stopping = true,
            }
        }
        if ops.is_empty() {
            for b in barriers {
                let _ = b.send(());
            }
            continue;
        }
        let before = discards.clone();
        let mut new_events = Vec::new();
        let result = backend.write(&mut ops, &mut discards, &mut new_events);
        match &result {
            Ok(()) => {
                commits.send_modify(|n| *n += 1);
                for e in new_events {
                    // Nobody listening is fine: connections read what is
                    // pending when they start.
                    let _ = events.send(e);
                }
            }
            Err(e) => {
                discards = before;
                tracing::error!(error = %e, "store write failed; the affected batches are refused as unavailable and will be resent");
            }
        }
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
                            resend_from: feed
                                .as_ref()
                                .and_then(|f| backend.feed(f).ok().flatten())
                                .map_or(1, |r| r.cursor.next_seq()),
                        }),
                    };
                    let _ = reply.send(outcome);
                }
                (Reply::Verify(reply), WriteOp::StartVerify { outcome, .. }) => {
                    let r = match (&result, outcome) {
                        (Ok(()), Some(o)) => Ok(o),
                        (Err(e), _) => Err(e.clone()),
                        (Ok(()), None) => Err(StoreError::Storage("no outcome".into())),
                    };
                    let _ = reply.send(r);
                }
                (Reply::Saved(reply), WriteOp::SaveCatalog(_)) => {
                    let _ = reply.send(result.clone());
                }
                (Reply::Enroll(reply), WriteOp::Enroll { outcome, .. }) => {
                    let r = match (&result, outcome) {
                        (Ok(()), Some(o)) => o,
                        (Err(e), _) => Err(e.clone()),
                        (Ok(()), None) => Err(StoreError::Storage("no outcome".into())),
                    };
                    let _ = reply.send(r);
                }
                _ => {}
            }
        }
        for b in barriers {
            let _ = b.send(());
        }
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
    Saved(oneshot::Sender<Result<(), StoreError>>),
    Verify(oneshot::Sender<Result<Result<u64, String>, StoreError>>),
}
