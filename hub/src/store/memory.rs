//! An engine kept in memory: the second implementation of the store's
//! contract, for tests. The `apply` test suite runs on it and on redb, which
//! proves the rules need nothing from an engine but [`ReadTxn`] and
//! [`WriteTxn`].
//!
//! Invariant: a write works on a copy of the state that replaces it only
//! when the transaction succeeded, so a failed one leaves nothing behind.
//! It never fails for want of storage (the reopen policy is redb's: its
//! tests run on redb over a disk that fills on demand).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use shuyuan_protocol::{DepartmentCode, Digest, FeedId, NodeId, SignedBatch, TableSchema};

use super::{AuditVisit, Engine, ReadTxn, RowVisit, StoreError, WriteFn, WriteTxn};
use crate::apply::audit::Link;
use crate::apply::feed::{FeedRecord, ResyncRecord, StoredRow};
use crate::apply::keys::{Enrollment, Revocation, Rotation};
use crate::apply::verification::VerifyRecord;

/// Everything an engine holds.
#[derive(Debug, Clone, Default)]
struct State {
    enrollments: BTreeMap<NodeId, Enrollment>,
    revocations: BTreeMap<NodeId, Revocation>,
    rotations: BTreeMap<NodeId, Rotation>,
    feeds: BTreeMap<FeedId, FeedRecord>,
    schemas: BTreeMap<(FeedId, u32), TableSchema>,
    batches: BTreeMap<(FeedId, u64), SignedBatch>,
    rows: BTreeMap<FeedId, BTreeMap<Vec<u8>, StoredRow>>,
    resync: BTreeMap<FeedId, ResyncRecord>,
    touched: BTreeMap<FeedId, BTreeSet<Vec<u8>>>,
    digests: BTreeMap<FeedId, Digest>,
    verify: BTreeMap<FeedId, VerifyRecord>,
    audit: BTreeMap<u64, Vec<u8>>,
    audit_chain: BTreeMap<u64, Link>,
    catalogs: BTreeMap<DepartmentCode, Vec<u8>>,
    catalog_sync: BTreeMap<(DepartmentCode, NodeId), Vec<u8>>,
}

/// The in-memory engine.
#[derive(Debug, Default)]
pub struct MemoryEngine {
    state: Mutex<State>,
}

impl MemoryEngine {
    pub fn new() -> Self {
        MemoryEngine::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Engine for MemoryEngine {
    fn read_with(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        f(&*self.state())
    }

    fn write_with(&self, f: WriteFn<'_>) -> Result<(), StoreError> {
        let mut copy = self.state().clone();
        f(&mut copy, None)?;
        *self.state() = copy;
        Ok(())
    }
}

impl ReadTxn for State {
    fn enrollment(&self, key: &NodeId) -> Result<Option<Enrollment>, StoreError> {
        Ok(self.enrollments.get(key).cloned())
    }

    fn enrollments(&self) -> Result<Vec<(NodeId, Enrollment)>, StoreError> {
        Ok(self
            .enrollments
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn revocation(&self, key: &NodeId) -> Result<Option<Revocation>, StoreError> {
        Ok(self.revocations.get(key).cloned())
    }

    fn revocations(&self) -> Result<Vec<(NodeId, Revocation)>, StoreError> {
        Ok(self
            .revocations
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn rotation(&self, old: &NodeId) -> Result<Option<Rotation>, StoreError> {
        Ok(self.rotations.get(old).cloned())
    }

    fn rotations(&self) -> Result<Vec<(NodeId, Rotation)>, StoreError> {
        Ok(self
            .rotations
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn feed(&self, feed: &FeedId) -> Result<Option<FeedRecord>, StoreError> {
        Ok(self.feeds.get(feed).cloned())
    }

    fn feeds(&self) -> Result<Vec<(FeedId, FeedRecord)>, StoreError> {
        Ok(self
            .feeds
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn schema(&self, feed: &FeedId, version: u32) -> Result<Option<TableSchema>, StoreError> {
        Ok(self.schemas.get(&(feed.clone(), version)).cloned())
    }

    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, StoreError> {
        Ok(self.batches.get(&(feed.clone(), seq)).cloned())
    }

    fn recent_batches(&self, feed: &FeedId, limit: usize) -> Result<Vec<SignedBatch>, StoreError> {
        Ok(self
            .batches
            .range((feed.clone(), 0)..=(feed.clone(), u64::MAX))
            .rev()
            .take(limit)
            .map(|(_, b)| b.clone())
            .collect())
    }

    fn row(&self, feed: &FeedId, key: &[u8]) -> Result<Option<StoredRow>, StoreError> {
        Ok(self.rows.get(feed).and_then(|r| r.get(key)).cloned())
    }

    fn rows(
        &self,
        feed: &FeedId,
        lo: &[u8],
        hi: Option<&[u8]>,
        visit: RowVisit<'_>,
    ) -> Result<(), StoreError> {
        let Some(rows) = self.rows.get(feed) else {
            return Ok(());
        };
        let hi = hi.unwrap_or(&[0xff]);
        if lo >= hi {
            return Ok(());
        }
        for (key, row) in
            rows.range::<[u8], _>((std::ops::Bound::Included(lo), std::ops::Bound::Excluded(hi)))
        {
            if !visit(key, row.clone())? {
                break;
            }
        }
        Ok(())
    }

    fn resync(&self, feed: &FeedId) -> Result<Option<ResyncRecord>, StoreError> {
        Ok(self.resync.get(feed).cloned())
    }

    fn touched(&self, feed: &FeedId, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.touched.get(feed).is_some_and(|t| t.contains(key)))
    }

    fn digest(&self, feed: &FeedId) -> Result<Option<Digest>, StoreError> {
        Ok(self.digests.get(feed).cloned())
    }

    fn verification(&self, feed: &FeedId) -> Result<Option<VerifyRecord>, StoreError> {
        Ok(self.verify.get(feed).cloned())
    }

    fn audit_tail(&self) -> Result<(Option<u64>, Option<Link>), StoreError> {
        Ok((
            self.audit.keys().next_back().copied(),
            self.audit_chain.values().next_back().copied(),
        ))
    }

    fn audit_entries(
        &self,
        from: u64,
        newest_first: bool,
        visit: AuditVisit<'_>,
    ) -> Result<(), StoreError> {
        let range = self.audit.range(from..);
        let items: Box<dyn Iterator<Item = (&u64, &Vec<u8>)>> = if newest_first {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        for (id, bytes) in items {
            if !visit(*id, bytes)? {
                break;
            }
        }
        Ok(())
    }

    fn audit_link(&self, id: u64) -> Result<Option<Link>, StoreError> {
        Ok(self.audit_chain.get(&id).copied())
    }

    fn audit_link_after(&self, from: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.audit_chain.range(from..).next().map(|(k, _)| *k))
    }

    fn audit_count(&self) -> Result<u64, StoreError> {
        Ok(self.audit.len() as u64)
    }

    fn catalog(&self, department: &DepartmentCode) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.catalogs.get(department).cloned())
    }

    fn catalogs(&self) -> Result<Vec<(DepartmentCode, Vec<u8>)>, StoreError> {
        Ok(self
            .catalogs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn catalog_sync(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.catalog_sync.get(&(department.clone(), *peer)).cloned())
    }
}

impl WriteTxn for State {
    fn put_enrollment(&mut self, key: &NodeId, e: &Enrollment) -> Result<(), StoreError> {
        self.enrollments.insert(*key, e.clone());
        Ok(())
    }

    fn remove_enrollment(&mut self, key: &NodeId) -> Result<(), StoreError> {
        self.enrollments.remove(key);
        Ok(())
    }

    fn put_revocation(&mut self, key: &NodeId, r: &Revocation) -> Result<(), StoreError> {
        self.revocations.insert(*key, r.clone());
        Ok(())
    }

    fn put_rotation(&mut self, old: &NodeId, r: &Rotation) -> Result<(), StoreError> {
        self.rotations.insert(*old, r.clone());
        Ok(())
    }

    fn put_feed(&mut self, feed: &FeedId, record: &FeedRecord) -> Result<(), StoreError> {
        self.feeds.insert(feed.clone(), record.clone());
        Ok(())
    }

    fn put_schema(&mut self, feed: &FeedId, schema: &TableSchema) -> Result<(), StoreError> {
        self.schemas
            .insert((feed.clone(), schema.version), schema.clone());
        Ok(())
    }

    fn put_batch(
        &mut self,
        feed: &FeedId,
        seq: u64,
        batch: &SignedBatch,
    ) -> Result<(), StoreError> {
        self.batches.insert((feed.clone(), seq), batch.clone());
        Ok(())
    }

    fn put_row(
        &mut self,
        feed: &FeedId,
        key: &[u8],
        row: &StoredRow,
    ) -> Result<Option<StoredRow>, StoreError> {
        Ok(self
            .rows
            .entry(feed.clone())
            .or_default()
            .insert(key.to_vec(), row.clone()))
    }

    fn remove_row(&mut self, feed: &FeedId, key: &[u8]) -> Result<Option<StoredRow>, StoreError> {
        Ok(self.rows.get_mut(feed).and_then(|r| r.remove(key)))
    }

    fn put_resync(&mut self, feed: &FeedId, record: &ResyncRecord) -> Result<(), StoreError> {
        self.resync.insert(feed.clone(), record.clone());
        Ok(())
    }

    fn touch(&mut self, feed: &FeedId, key: &[u8]) -> Result<(), StoreError> {
        self.touched
            .entry(feed.clone())
            .or_default()
            .insert(key.to_vec());
        Ok(())
    }

    fn clear_touched(&mut self, feed: &FeedId) -> Result<(), StoreError> {
        self.touched.remove(feed);
        Ok(())
    }

    fn put_digest(&mut self, feed: &FeedId, digest: &Digest) -> Result<(), StoreError> {
        self.digests.insert(feed.clone(), digest.clone());
        Ok(())
    }

    fn put_verification(&mut self, feed: &FeedId, record: &VerifyRecord) -> Result<(), StoreError> {
        self.verify.insert(feed.clone(), record.clone());
        Ok(())
    }

    fn append_audit(&mut self, id: u64, entry: &[u8], link: &Link) -> Result<(), StoreError> {
        self.audit.insert(id, entry.to_vec());
        self.audit_chain.insert(id, *link);
        Ok(())
    }

    fn put_catalog(&mut self, department: &DepartmentCode, doc: &[u8]) -> Result<(), StoreError> {
        self.catalogs.insert(department.clone(), doc.to_vec());
        Ok(())
    }

    fn put_catalog_sync(
        &mut self,
        department: &DepartmentCode,
        peer: &NodeId,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.catalog_sync
            .insert((department.clone(), *peer), state.to_vec());
        Ok(())
    }
}
