//! Apply: every rule the hub keeps about what it stores, written once
//! against the store's transaction traits ([`crate::store::WriteTxn`]), so
//! that any engine gets them all.
//!
//! A write group ([`group`]) runs in one transaction: batches (the chain,
//! then the content, then the rows, digests, re-reads and verification
//! entries: [`batch`]), audit entries ([`audit`]), enrollments, rotations
//! and revocations ([`keys`]), catalog documents, and verification runs
//! started or refused ([`verification`]).
//!
//! Invariants: a batch whose sequence number is taken is refused, never
//! applied (a replay or a fork), and one that does not follow the feed's
//! head is refused as a gap; a batch is checked whole before any of it is
//! applied; a refused batch's pipelined successors on the same connection
//! are discarded quietly ([`Discards`]); every refusal is audited; nothing
//! here reads a clock more than once per group, or does I/O other than
//! through the transaction.

pub mod audit;
pub mod batch;
pub mod content;
pub mod feed;
pub mod keys;
pub mod rows;
pub mod verification;

use std::collections::BTreeMap;

use shuyuan_protocol::message::{Ack, Reject, VerifyOutcome, VerifyRefusal};
use shuyuan_protocol::{DepartmentCode, FeedId, NodeId, RejectReason, UnixMillis};

use crate::store::{StoreError, WriteTxn};
use crate::verify::Incoming;
use audit::{AuditCounts, AuditEntry, AuditKind, Tail};
use keys::{Enrollment, KeyRefusal, Revocation, RotationChange};

/// The answer to one incoming batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ack(Ack),
    Reject(Reject),
    /// A pipelined successor of a rejected batch: dropped without a reply.
    Discarded,
}

/// One unit of work in a write group, and its outcome once decided.
#[derive(Debug)]
pub enum WriteOp {
    Apply {
        conn: u64,
        peer: NodeId,
        incoming: Incoming,
        outcome: Option<Outcome>,
    },
    Audit(AuditEntry),
    /// Enrolls a key: whether it is new, or why not.
    Enroll {
        key: NodeId,
        enrollment: Enrollment,
        outcome: Option<Result<bool, KeyRefusal>>,
    },
    /// Records a key rotation: whether it is new, or why not.
    Rotate {
        change: RotationChange,
        outcome: Option<Result<bool, KeyRefusal>>,
    },
    /// Revokes an enrolled key: the revocation, or why not.
    Revoke {
        key: NodeId,
        reason: String,
        outcome: Option<Result<Revocation, KeyRefusal>>,
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

/// What a committed group leaves for the writer to pass on.
#[derive(Debug, Default)]
pub struct Decided {
    /// What agents must be told.
    pub events: Vec<VerifyEvent>,
    /// What the group audited, by kind and reason.
    pub audited: AuditCounts,
}

/// One write transaction as the rules see it: the engine's transaction,
/// the time of the group, where audit entries go, and what the group
/// decided for after its commit.
pub struct Txn<'a> {
    pub(crate) store: &'a mut dyn WriteTxn,
    pub(crate) now: UnixMillis,
    audit: Option<Tail>,
    pub(crate) decided: Decided,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl<'a> Txn<'a> {
    pub fn new(store: &'a mut dyn WriteTxn, now: UnixMillis) -> Self {
        Txn {
            store,
            now,
            audit: None,
            decided: Decided::default(),
        }
    }

    /// Appends an audit entry (with the next id and its chain link).
    pub fn audit(&mut self, entry: AuditEntry) -> Result<(), StoreError> {
        let tail = match self.audit.as_mut() {
            Some(t) => t,
            None => self.audit.insert(Tail::load(&*self.store)?),
        };
        *self
            .decided
            .audited
            .entry((entry.kind, entry.reason))
            .or_default() += 1;
        tail.append(self.store, entry)?;
        Ok(())
    }

    /// Audits an event of a feed caused by a peer.
    pub fn audit_feed(
        &mut self,
        kind: AuditKind,
        peer: NodeId,
        feed: &FeedId,
        seq: u64,
        detail: impl Into<String>,
    ) -> Result<(), StoreError> {
        self.audit(AuditEntry {
            id: 0,
            at: self.now,
            kind,
            peer: Some(peer),
            feed: Some(feed.clone()),
            seq: Some(seq),
            reason: None,
            detail: detail.into(),
        })
    }

    /// Tells agents something once the group has committed.
    pub fn event(&mut self, event: VerifyEvent) {
        self.decided.events.push(event);
    }

    /// What the group decided, for after its commit.
    pub fn finish(self) -> Decided {
        self.decided
    }
}

/// Performs a group of operations in one transaction, in order, filling in
/// each operation's outcome. Batches that `discards` marks as pipelined
/// successors of a rejection are answered `Discarded` without being looked
/// at; every outcome is reported back to it. A storage error fails the
/// whole group (the caller restores `discards`); a refusal is an outcome.
pub fn group(
    txn: &mut Txn<'_>,
    ops: &mut [WriteOp],
    discards: &mut Discards,
) -> Result<(), StoreError> {
    for op in ops.iter_mut() {
        match op {
            WriteOp::Apply {
                conn,
                peer,
                incoming,
                outcome,
            } => {
                let (feed, seq) = incoming.claimed();
                if let Some(f) = &feed
                    && discards.discard(*conn, f, seq)
                {
                    *outcome = Some(Outcome::Discarded);
                    continue;
                }
                let result = match &*incoming {
                    Incoming::Verified(v) => batch::apply(txn, *peer, v)?,
                    Incoming::Refused {
                        feed,
                        seq,
                        reason,
                        detail,
                    } => batch::reject(txn, *peer, feed.clone(), *seq, *reason, detail.clone())?,
                };
                if let Some(f) = &feed {
                    discards.record(*conn, f, seq, &result);
                }
                *outcome = Some(result);
            }
            WriteOp::Audit(entry) => txn.audit(entry.clone())?,
            WriteOp::Enroll {
                key,
                enrollment,
                outcome,
            } => *outcome = Some(keys::enroll(txn, key, enrollment)?),
            WriteOp::Rotate { change, outcome } => *outcome = Some(keys::rotate(txn, change)?),
            WriteOp::Revoke {
                key,
                reason,
                outcome,
            } => *outcome = Some(keys::revoke(txn, key, reason)?),
            WriteOp::StartVerify {
                feed,
                reason,
                outcome,
            } => *outcome = Some(verification::start(txn, feed, reason)?),
            WriteOp::RefuseVerify { peer, refusal } => {
                verification::refuse(txn, *peer, refusal)?;
            }
            WriteOp::SaveCatalog(save) => {
                if let Some(document) = &save.document {
                    txn.store.put_catalog(&save.department, document)?;
                }
                if let Some((peer, state)) = &save.sync {
                    txn.store.put_catalog_sync(&save.department, peer, state)?;
                }
            }
        }
    }
    Ok(())
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

    /// A connection ended: forget what it was owed.
    pub fn forget(&mut self, conn: u64) {
        self.0.retain(|(c, _), _| *c != conn);
    }
}

#[cfg(test)]
mod tests;
