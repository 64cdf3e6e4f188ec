//! The audit log: what happened, who did it, to which feed; each entry
//! chained to the one before ([`chain`]).
//!
//! Invariants: entries get increasing ids and are only appended; each entry
//! is stored with the link of its exact stored bytes to the previous link,
//! so changing, removing or inserting one is found by [`verify`].

pub mod chain;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::{FeedId, NodeId, RejectReason, UnixMillis};

pub use chain::{ChainReport, Link};

use crate::store::{ReadTxn, Record, StoreError, WriteTxn};

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
    /// Too many failed console logins: an address's, or all addresses',
    /// password checks are refused for a while.
    LoginLimited,
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

/// Where the next audit entry goes: its id and the link it chains to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tail {
    next: u64,
    head: Link,
}

impl Tail {
    /// Reads the newest entry's id and link.
    pub(crate) fn load(txn: &dyn ReadTxn) -> Result<Tail, StoreError> {
        let (last, head) = txn.audit_tail()?;
        Ok(Tail {
            next: last.map_or(1, |id| id + 1),
            head: head.unwrap_or(chain::GENESIS),
        })
    }

    /// Appends `entry` with the next id; returns the id.
    pub(crate) fn append(
        &mut self,
        txn: &mut dyn WriteTxn,
        mut entry: AuditEntry,
    ) -> Result<u64, StoreError> {
        entry.id = self.next;
        let bytes =
            encode(&entry).map_err(|e| StoreError::corrupt(Record::Audit(Some(entry.id)), e))?;
        self.head = chain::link(&self.head, entry.id, &bytes);
        txn.append_audit(entry.id, &bytes, &self.head)?;
        self.next += 1;
        Ok(entry.id)
    }
}

/// Visits the audit log newest first, until `visit` returns `false`.
pub fn scan(
    txn: &dyn ReadTxn,
    visit: &mut dyn FnMut(AuditEntry) -> bool,
) -> Result<(), StoreError> {
    txn.audit_entries(0, true, &mut |id, bytes| {
        let entry: AuditEntry =
            decode(bytes).map_err(|e| StoreError::corrupt(Record::Audit(Some(id)), e))?;
        Ok(visit(entry))
    })
}

/// The newest `limit` audit entries, newest first.
pub fn recent(txn: &dyn ReadTxn, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let mut out = Vec::new();
    if limit > 0 {
        scan(txn, &mut |e| {
            out.push(e);
            out.len() < limit
        })?;
    }
    Ok(out)
}

/// Checks the audit log's hash chain from the first entry, against a head
/// recorded earlier if one is given.
pub fn verify(txn: &dyn ReadTxn, expect_head: Option<Link>) -> Result<ChainReport, StoreError> {
    let mut check = chain::ChainCheck::new(expect_head);
    txn.audit_entries(0, false, &mut |id, bytes| {
        let stored = txn.audit_link(id)?;
        let readable = decode::<AuditEntry>(bytes).is_ok_and(|e| e.id == id);
        Ok(check.entry(id, bytes, stored.as_ref().map(|l| l.as_slice()), readable))
    })?;
    let mut orphan = Ok(None);
    let report = check.finish(|from| {
        orphan = txn.audit_link_after(from);
        orphan.as_ref().ok().copied().flatten()
    });
    orphan?;
    Ok(report)
}
