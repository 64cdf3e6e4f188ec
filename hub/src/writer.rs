//! The writer: one thread owns the store's writes, groups the requests
//! queued meanwhile into one transaction of the engine, and answers each
//! only after that transaction committed durably.
//!
//! Invariants: one writer per store; a batch is acknowledged only after the
//! transaction that applied it has committed durably; while the engine
//! cannot write (a full disk, an I/O error) every batch is refused as
//! unavailable, with the feed's committed head to resend from, and nothing
//! is acknowledged; the store is reopened at growing intervals until a
//! write commits again, and that write carries the audit entry of the
//! spell. Connections, status, the console and the upstream link read the
//! store through the same handle ([`Store::read`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::message::{Reject, VerifyRefusal};
use shuyuan_protocol::{FeedId, NodeId, RejectReason, UnixMillis};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::apply::audit::{AuditCounts, AuditEntry, AuditKind};
use crate::apply::keys::{Enrollment, KeyRefusal, Revocation, RotationChange};
use crate::apply::{self, CatalogSave, Decided, Discards, Outcome, Txn, VerifyEvent, WriteOp};
use crate::store::{Engine, ReadTxn, Record, StoreError};
use crate::verify::Incoming;
use shuyuan_service::WriteFailure;

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

/// Handle to the store: writes go to the writer thread, reads to the
/// engine. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn Engine>,
    audited: Arc<Mutex<AuditCounts>>,
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
    /// Starts the writer thread over `engine`.
    pub fn start(engine: Arc<dyn Engine>) -> Result<(Store, Writer), StoreError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (events, _) = broadcast::channel(QUEUE);
        let audited = Arc::new(Mutex::new(AuditCounts::new()));
        let writer_events = events.clone();
        let (commits, committed) = watch::channel(0);
        let (health_tx, health) = watch::channel(StoreHealth::default());
        let heads = engine
            .read(|t| t.feeds())?
            .into_iter()
            .map(|(f, r)| (f, r.cursor.next_seq()))
            .collect();
        let writer = WriteLoop {
            engine: engine.clone(),
            audited: audited.clone(),
            events: writer_events,
            commits,
            health: health_tx,
            heads,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::engine(Record::File, e))?;
        Ok((
            Store {
                engine,
                audited,
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

    /// Reads in one transaction of the engine.
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&dyn ReadTxn) -> Result<T, E>,
    ) -> Result<T, E> {
        self.engine.read(f)
    }

    /// The storage engine.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Audit entries written since the store opened, by kind and reason.
    pub fn audit_counts(&self) -> AuditCounts {
        self.audited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

/// A reopened store is proven by the next write group (agents resend
/// refused batches within 30 s); when none comes for this long, a lone
/// audit entry proves it instead. Longer than agents' resend backoff, so
/// that a disk with room for a small entry but not for batches does not
/// count as recovered.
const IDLE_PROOF: Duration = Duration::from_secs(60);

/// The writer thread's state.
struct WriteLoop {
    engine: Arc<dyn Engine>,
    events: broadcast::Sender<VerifyEvent>,
    audited: Arc<Mutex<AuditCounts>>,
    commits: watch::Sender<u64>,
    health: watch::Sender<StoreHealth>,
    /// Each feed's next expected sequence number as committed: what a
    /// refusal tells the agent to resend from while the store cannot be
    /// read either.
    heads: HashMap<FeedId, u64>,
}

/// Every [`Store`] handle is gone.
struct Closed;

impl WriteLoop {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut discards = Discards::default();
        let mut stopping = false;
        while !stopping {
            let first = match self.wake_at() {
                None => rx.blocking_recv().ok_or(Closed),
                Some(until) => match recv_until(&mut rx, until) {
                    Ok(Some(c)) => Ok(c),
                    // Time to reopen, or to prove the store idle.
                    Ok(None) => {
                        self.idle();
                        continue;
                    }
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
            let (mut ops, replies, barriers) = group(commands, &mut discards, &mut stopping);
            if !ops.is_empty() {
                let result = self.write(&mut ops, &mut discards);
                self.answer(ops, replies, &result);
            }
            for b in barriers {
                let _ = b.send(());
            }
        }
    }

    /// While writes fail: when to reopen the store, or, reopened, when to
    /// prove it idle.
    fn wake_at(&self) -> Option<Instant> {
        let h = self.engine.health();
        h.failure.as_ref()?;
        h.reopen_at
            .or_else(|| h.reopened_at.map(|at| at + IDLE_PROOF))
    }

    /// Nothing came while writes fail: reopen the store when due; once
    /// reopened and idle for [`IDLE_PROOF`], prove it with the failure's
    /// audit entry alone.
    fn idle(&mut self) {
        let h = self.engine.health();
        if h.reopened_at.is_some_and(|at| at.elapsed() >= IDLE_PROOF) {
            let _ = self.write(&mut [], &mut Discards::default());
        } else if let Err(e) = self.engine.reopen_if_due() {
            tracing::debug!(error = %e, "the store cannot be reopened yet");
        }
        self.publish();
    }

    /// The audit entry that ends a failure of writes, committed with the
    /// first write that commits after it.
    fn failure_entry(failure: &WriteFailure, refused: u64) -> AuditEntry {
        AuditEntry::new(
            AuditKind::StoreFailed,
            format!(
                "the store could not write from {} to {} ({}); {} write groups were refused as unavailable and nothing was acknowledged; reopened, it writes again",
                failure.since,
                UnixMillis::now(),
                failure.error,
                refused
            ),
        )
    }

    /// Writes one group in one durable transaction of the engine. While
    /// the engine cannot write it refuses the group without touching the
    /// store (its reopen policy).
    fn write(&mut self, ops: &mut [WriteOp], discards: &mut Discards) -> Result<(), StoreError> {
        let before = discards.clone();
        let refused = self.engine.health().refused_writes;
        let mut decided = Decided::default();
        let mut ended = None;
        let result = self.engine.write_with(&mut |t, recovering| {
            let mut txn = Txn::new(t, UnixMillis::now());
            if let Some(f) = recovering {
                txn.audit(Self::failure_entry(f, f.failed_writes + refused))?;
                ended = Some(f.clone());
            }
            apply::group(&mut txn, ops, discards)?;
            decided = txn.finish();
            Ok(())
        });
        match &result {
            Ok(()) => {
                if let Some(f) = ended {
                    self.recovered(&f);
                }
                self.commits.send_modify(|n| *n += 1);
                let mut audited = self.audited.lock().unwrap_or_else(PoisonError::into_inner);
                for (k, n) in std::mem::take(&mut decided.audited) {
                    *audited.entry(k).or_default() += n;
                }
                drop(audited);
                for e in decided.events {
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
            Err(e) => {
                *discards = before;
                // A failure of writes is logged by the engine's reopen
                // policy (once, and when it ends); anything else here.
                if !e.is_storage() || self.engine.health().failure.is_none() {
                    tracing::error!(error = %e, "store write failed; the affected batches are refused as unavailable and will be resent");
                }
            }
        }
        self.publish();
        result
    }

    /// A failure of writes ended: a write committed after reopening. The
    /// heads are read again from the store.
    fn recovered(&mut self, f: &WriteFailure) {
        tracing::info!(since = %f.since, failed = f.failed_writes, "the store writes again");
        if let Ok(feeds) = self.engine.read(|t| t.feeds()) {
            self.heads = feeds
                .into_iter()
                .map(|(f, r)| (f, r.cursor.next_seq()))
                .collect();
        }
    }

    /// Shows how writes go to status, metrics, the console and alerts.
    fn publish(&self) {
        let h = self.engine.health();
        let now = StoreHealth {
            failing_since: h.failure.as_ref().map(|f| f.since),
            error: h.failure.map(|f| f.error),
            failed_writes: h.unwritten,
            recoveries: h.recoveries,
        };
        self.health.send_if_modified(|old| {
            let changed = *old != now;
            *old = now;
            changed
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
                    let _ = reply.send(decided(result, refused(outcome)));
                }
                (Reply::Enroll(reply), WriteOp::Rotate { outcome, .. }) => {
                    let _ = reply.send(decided(result, refused(outcome)));
                }
                (Reply::Revoke(reply), WriteOp::Revoke { outcome, .. }) => {
                    let _ = reply.send(decided(result, refused(outcome)));
                }
                _ => {}
            }
        }
    }

    /// The feed's next expected sequence number as committed: from the
    /// store while it can be read, else as the writer last committed it.
    fn head(&self, feed: &FeedId) -> u64 {
        let stored = match self.engine.health().failure {
            None => self.engine.read(|t| t.feed(feed)).ok(),
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

/// A key record change's outcome, its refusal as a store error.
fn refused<T>(outcome: Option<Result<T, KeyRefusal>>) -> Option<Result<T, StoreError>> {
    outcome.map(|o| o.map_err(StoreError::from))
}

/// A group committed without deciding one of its operations.
#[derive(Debug, thiserror::Error)]
#[error("the write group decided nothing for this request")]
struct NoOutcome;

/// An operation's outcome once its group's transaction has ended.
fn decided<T>(
    group: &Result<(), StoreError>,
    outcome: Option<Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match (group, outcome) {
        (Ok(()), Some(o)) => o,
        (Err(e), _) => Err(e.clone()),
        (Ok(()), None) => Err(StoreError::engine(Record::File, NoOutcome)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::audit;
    use crate::store::redb::RedbEngine;
    use crate::verify::VerifiedBatch;
    use shuyuan_protocol::batch::{BatchBody, Entry, ZeroUpdate};
    use shuyuan_protocol::{BatchHash, NodeKey, SignedBatch};
    use shuyuan_service::ReopenSchedule;
    use shuyuan_service::redb_file::testing;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn zero_update(key: &NodeKey, seq: u64, prev: BatchHash) -> VerifiedBatch {
        let body = BatchBody {
            feed: "D:R".parse().unwrap(),
            seq,
            prev,
            created_at: UnixMillis(7),
            entries: vec![Entry::ZeroUpdate(ZeroUpdate {
                since: UnixMillis(1),
                until: UnixMillis(2),
                source_position: "0".into(),
            })],
        };
        let signed = SignedBatch::seal(key, &body).unwrap();
        let hash = signed.hash();
        VerifiedBatch { signed, body, hash }
    }

    #[tokio::test]
    async fn a_store_that_cannot_write_refuses_acknowledges_nothing_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let engine =
            RedbEngine::open_with(&dir.path().join("hub.redb"), testing::opener(full.clone()))
                .unwrap();
        engine.set_schedule(ReopenSchedule::fixed(Duration::from_millis(300)));
        let (store, writer) = Store::start(Arc::new(engine)).unwrap();
        let key = NodeKey::from_seed([1; 32]);
        let apply = |b: VerifiedBatch| {
            let store = store.clone();
            let peer = key.id();
            async move {
                store
                    .apply(1, peer, Incoming::Verified(Box::new(b)))
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            }
        };
        let b1 = zero_update(&key, 1, BatchHash::GENESIS);
        assert!(matches!(apply(b1.clone()).await, Outcome::Ack(_)));
        full.store(true, Ordering::SeqCst);
        let b2 = zero_update(&key, 2, b1.hash);
        // The first group fails on the disk, the second is refused without
        // touching it: neither is acknowledged.
        for _ in 0..2 {
            match apply(b2.clone()).await {
                Outcome::Reject(r) => {
                    assert_eq!(r.reason, RejectReason::Unavailable);
                    assert_eq!(r.resend_from, 2, "from the committed head");
                    assert!(r.detail.contains("No space left"), "{}", r.detail);
                }
                o => panic!("{o:?}"),
            }
        }
        let health = store.health();
        assert!(!health.writable());
        assert_eq!(health.failed_writes, 2);
        assert!(health.error.unwrap().contains("No space left"));
        full.store(false, Ordering::SeqCst);
        // The writer reopens the store when due; the next group commits,
        // and with it the failure's audit entry.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(matches!(apply(b2).await, Outcome::Ack(_)));
        let health = store.health();
        assert!(health.writable(), "{health:?}");
        assert_eq!(health.recoveries, 1);
        let entries = store.read(|t| audit::recent(t, 5)).unwrap();
        let failed = entries
            .iter()
            .find(|e| e.kind == AuditKind::StoreFailed)
            .expect("the failure is on record");
        assert!(
            failed.detail.contains("2 write groups were refused")
                && failed.detail.contains("No space left"),
            "{}",
            failed.detail
        );
        let head = store.read(|t| t.feed(&"D:R".parse().unwrap())).unwrap();
        assert_eq!(head.unwrap().cursor.last_seq, 2);
        drop(store);
        writer.join();
    }
}
