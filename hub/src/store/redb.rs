//! The embedded store on redb.
//!
//! Tables (the `_v1` suffix is the layout version; values are postcard):
//! - `enrollments_v1`: node key (32 bytes) -> [`Enrollment`]
//! - `feeds_v1`: feed text `DEPT:RES` -> [`FeedRecord`]
//! - `schemas_v1`: (feed text, schema version) -> `TableSchema`
//! - `batches_v1`: (feed text, seq) -> the `SignedBatch` as received
//! - `rows_v1`: (feed text, order-preserving key encoding) -> [`StoredRow`]
//! - `audit_v1`: id -> [`AuditEntry`]
//! - `audit_chain_v1`: id -> the entry's 32-byte chain link
//!   ([`audit_chain::link`] of the previous link, the id and the stored entry)
//! - `catalogs_v1`: department code -> the department's catalog (automerge)
//! - `catalog_sync_v1`: (department code, peer key) -> automerge sync state
//! - `resync_v1`: feed text -> the feed's latest [`ResyncRecord`]
//! - `resync_touched_v1`: (feed text, row key) -> () for rows written since a
//!   running re-read began; emptied when it ends
//! - `digests_v1`: feed text -> the feed digest of the shared copy as
//!   stored ([`Digest::to_bytes`]), updated with every row written
//! - `verify_v1`: feed text -> [`VerifyRecord`]
//! - `revocations_v1`: node key (32 bytes) -> [`Revocation`]; the key is
//!   removed from `enrollments_v1` in the same transaction
//! - `rotations_v1`: old agent key (32 bytes) -> [`Rotation`] (its successor)
//! - `migrations_v1`: migration name -> unix millis applied

use std::path::Path;
use std::sync::PoisonError;

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shuyuan_protocol::batch::{Entry, RangeDigest, RangeRepair, Resync};
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::message::{Ack, Reject};
use shuyuan_protocol::message::{VerifyMode, VerifyRefusal};
use shuyuan_protocol::value::{decode_key, describe_key, encode_key};
use shuyuan_protocol::{
    BatchHash, ChainError, DepartmentCode, Digest, DigestSummary, FeedId, KeyRange, NodeId,
    RejectReason, RowSeed, SignedBatch, TableSchema, UnixMillis, Value,
};
use shuyuan_service::{Migration, OpenError, RedbFile};

use super::audit_chain::{self, ChainCheck, ChainReport};
use super::verify::{
    CheckpointResult, LEAF_ROWS, RunOrigin, SCAN_CHUNK_ROWS, SPLIT_PARTS, VerifyRecord, VerifyRun,
};
use super::{
    AuditCounts, AuditEntry, AuditKind, Backend, Discards, Enrollment, FeedRecord, Incoming,
    NodeKind, Outcome, RejectionRecord, ResyncFinish, ResyncRecord, Revocation, Rotation,
    RotationChange, StoreError, StoredRow, VerifiedBatch, VerifyEvent, WriteOp, ZeroUpdateRecord,
    column_mapping,
};

const ENROLLMENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("enrollments_v1");
const FEEDS: TableDefinition<&str, &[u8]> = TableDefinition::new("feeds_v1");
const SCHEMAS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("schemas_v1");
const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("batches_v1");
const ROWS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("rows_v1");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_v1");
const REVOCATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("revocations_v1");
const ROTATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rotations_v1");
const AUDIT_CHAIN: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_chain_v1");
const CATALOGS: TableDefinition<&str, &[u8]> = TableDefinition::new("catalogs_v1");
const CATALOG_SYNC: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("catalog_sync_v1");
const RESYNC: TableDefinition<&str, &[u8]> = TableDefinition::new("resync_v1");
const TOUCHED: TableDefinition<(&str, &[u8]), ()> = TableDefinition::new("resync_touched_v1");
const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("digests_v1");
const VERIFY: TableDefinition<&str, &[u8]> = TableDefinition::new("verify_v1");

/// Named, idempotent migrations, applied once each in order.
const MIGRATIONS: &[Migration] = &[
    ("0001-create-tables", |tx| {
        tx.open_table(ENROLLMENTS)?;
        tx.open_table(FEEDS)?;
        tx.open_table(SCHEMAS)?;
        tx.open_table(BATCHES)?;
        tx.open_table(ROWS)?;
        tx.open_table(AUDIT)?;
        Ok(())
    }),
    ("0002-catalogs", |tx| {
        tx.open_table(CATALOGS)?;
        tx.open_table(CATALOG_SYNC)?;
        Ok(())
    }),
    ("0003-resync", |tx| {
        tx.open_table(RESYNC)?;
        tx.open_table(TOUCHED)?;
        Ok(())
    }),
    ("0004-digests", |tx| {
        // The digest of every feed's rows as they are already stored.
        let rows = tx.open_table(ROWS)?;
        let mut digests = tx.open_table(DIGESTS)?;
        tx.open_table(VERIFY)?;
        let mut current: Option<(String, Digest)> = None;
        let mut finished = Vec::new();
        for item in rows.iter()? {
            let (k, v) = item?;
            let (feed, row_key) = k.value();
            let Some(seed) = stored_seed(row_key, v.value()) else {
                continue;
            };
            if current.as_ref().is_none_or(|(f, _)| f != feed) {
                finished.extend(current.take());
                current = Some((feed.to_string(), Digest::new()));
            }
            if let Some((_, d)) = current.as_mut() {
                d.add(&seed);
            }
        }
        finished.extend(current);
        for (feed, d) in finished {
            digests.insert(feed.as_str(), d.to_bytes().as_slice())?;
        }
        Ok(())
    }),
    ("0005-audit-chain", |tx| {
        // Links for the entries written before the log was chained.
        let audit = tx.open_table(AUDIT)?;
        let mut chain = tx.open_table(AUDIT_CHAIN)?;
        let mut prev = audit_chain::GENESIS;
        for item in audit.iter()? {
            let (id, bytes) = item?;
            prev = audit_chain::link(&prev, id.value(), bytes.value());
            chain.insert(id.value(), prev.as_slice())?;
        }
        Ok(())
    }),
    ("0006-revocations", |tx| {
        tx.open_table(REVOCATIONS)?;
        tx.open_table(ROTATIONS)?;
        Ok(())
    }),
];

/// What a stored row contributes to its feed's digest: the key as the row
/// is filed under and the values as they were written.
fn stored_seed(row_key: &[u8], stored: &[u8]) -> Option<RowSeed> {
    let key = decode_key(row_key)?;
    let row: StoredRow = decode(stored).ok()?;
    Some(RowSeed::of(&key, &row.values))
}

fn storage(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(e.into().to_string())
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    encode(v).map_err(|e| StoreError::Storage(e.to_string()))
}

fn dec<T: DeserializeOwned>(what: impl FnOnce() -> String, bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| StoreError::Corrupt {
        what: what(),
        reason: e.to_string(),
    })
}

/// The redb storage engine.
#[derive(Debug)]
pub struct RedbBackend {
    file: RedbFile,
    /// Audit entries written since the store opened, by kind and reason.
    counts: std::sync::Mutex<AuditCounts>,
}

impl RedbBackend {
    /// Opens or creates the store file and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = RedbFile::open(path, MIGRATIONS).map_err(|e| match e {
            OpenError::AlreadyOpen(p) => StoreError::AlreadyOpen(p.display().to_string()),
            other => StoreError::Storage(other.to_string()),
        })?;
        Ok(RedbBackend {
            file,
            counts: Default::default(),
        })
    }
}

impl RedbBackend {
    /// Every record of a table keyed by node key (`what` names the record
    /// in a corruption error).
    fn keyed<T: DeserializeOwned>(
        &self,
        definition: TableDefinition<&[u8], &[u8]>,
        what: &str,
    ) -> Result<Vec<(NodeId, T)>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(definition).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let corrupt = |reason: String| StoreError::Corrupt {
                what: format!("{what} key"),
                reason,
            };
            let bytes: [u8; 32] = k
                .value()
                .try_into()
                .map_err(|_| corrupt("not 32 bytes".into()))?;
            let id = NodeId::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))?;
            out.push((id, dec(|| format!("{what} {id}"), v.value())?));
        }
        Ok(out)
    }

    /// One feed's record in a table keyed by feed text (`what` names it in
    /// a corruption error).
    fn feed_record<T: DeserializeOwned>(
        &self,
        definition: TableDefinition<&str, &[u8]>,
        feed: &FeedId,
        what: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(definition).map_err(storage)?;
        let key = feed.to_string();
        match table.get(key.as_str()).map_err(storage)? {
            Some(v) => Ok(Some(dec(|| format!("{what} {key}"), v.value())?)),
            None => Ok(None),
        }
    }
}

/// The record filed under a node key in a table keyed by node key (`what`
/// names it in a corruption error).
fn by_key<T: DeserializeOwned>(
    table: &Table<'_, &'static [u8], &'static [u8]>,
    key: &NodeId,
    what: &str,
) -> Result<Option<T>, StoreError> {
    match table.get(key.as_bytes().as_slice()).map_err(storage)? {
        Some(v) => Ok(Some(dec(|| format!("{what} {key}"), v.value())?)),
        None => Ok(None),
    }
}

/// The tables one write transaction works on.
struct Tables<'t> {
    enrollments: Table<'t, &'static [u8], &'static [u8]>,
    revocations: Table<'t, &'static [u8], &'static [u8]>,
    rotations: Table<'t, &'static [u8], &'static [u8]>,
    feeds: Table<'t, &'static str, &'static [u8]>,
    schemas: Table<'t, (&'static str, u32), &'static [u8]>,
    batches: Table<'t, (&'static str, u64), &'static [u8]>,
    rows: Table<'t, (&'static str, &'static [u8]), &'static [u8]>,
    resync: Table<'t, &'static str, &'static [u8]>,
    touched: Table<'t, (&'static str, &'static [u8]), ()>,
    digests: Table<'t, &'static str, &'static [u8]>,
    verify: Table<'t, &'static str, &'static [u8]>,
    audit: Table<'t, u64, &'static [u8]>,
    audit_chain: Table<'t, u64, &'static [u8]>,
    next_audit: u64,
    /// The link of the newest audit entry.
    audit_head: audit_chain::Link,
    /// What this transaction audited, by kind and reason.
    counted: AuditCounts,
    now: UnixMillis,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t WriteTransaction) -> Result<Self, StoreError> {
        let audit = tx.open_table(AUDIT).map_err(storage)?;
        let next_audit = match audit.last().map_err(storage)? {
            Some((k, _)) => k.value() + 1,
            None => 1,
        };
        let audit_chain = tx.open_table(AUDIT_CHAIN).map_err(storage)?;
        let audit_head = match audit_chain.last().map_err(storage)? {
            Some((_, v)) => v.value().try_into().map_err(|_| StoreError::Corrupt {
                what: "the audit chain's last link".into(),
                reason: format!("{} bytes instead of 32", v.value().len()),
            })?,
            None => audit_chain::GENESIS,
        };
        Ok(Tables {
            enrollments: tx.open_table(ENROLLMENTS).map_err(storage)?,
            revocations: tx.open_table(REVOCATIONS).map_err(storage)?,
            rotations: tx.open_table(ROTATIONS).map_err(storage)?,
            feeds: tx.open_table(FEEDS).map_err(storage)?,
            schemas: tx.open_table(SCHEMAS).map_err(storage)?,
            batches: tx.open_table(BATCHES).map_err(storage)?,
            rows: tx.open_table(ROWS).map_err(storage)?,
            resync: tx.open_table(RESYNC).map_err(storage)?,
            touched: tx.open_table(TOUCHED).map_err(storage)?,
            digests: tx.open_table(DIGESTS).map_err(storage)?,
            verify: tx.open_table(VERIFY).map_err(storage)?,
            audit,
            audit_chain,
            next_audit,
            audit_head,
            counted: AuditCounts::new(),
            now: UnixMillis::now(),
        })
    }

    fn audit(&mut self, mut entry: AuditEntry) -> Result<(), StoreError> {
        entry.id = self.next_audit;
        self.next_audit += 1;
        *self.counted.entry((entry.kind, entry.reason)).or_default() += 1;
        let bytes = enc(&entry)?;
        self.audit_head = audit_chain::link(&self.audit_head, entry.id, &bytes);
        self.audit
            .insert(entry.id, bytes.as_slice())
            .map_err(storage)?;
        self.audit_chain
            .insert(entry.id, self.audit_head.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Audits an event of a feed caused by a peer.
    fn audit_feed(
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

    fn feed(&self, key: &str) -> Result<FeedRecord, StoreError> {
        match self.feeds.get(key).map_err(storage)? {
            Some(v) => dec(|| format!("feed {key}"), v.value()),
            None => Ok(FeedRecord::default()),
        }
    }

    fn enrollment(&self, key: &NodeId) -> Result<Option<Enrollment>, StoreError> {
        by_key(&self.enrollments, key, "enrollment")
    }

    fn revocation(&self, key: &NodeId) -> Result<Option<Revocation>, StoreError> {
        by_key(&self.revocations, key, "revocation")
    }

    fn rotation(&self, old: &NodeId) -> Result<Option<Rotation>, StoreError> {
        by_key(&self.rotations, old, "rotation of")
    }

    fn put_rotation(&mut self, old: &NodeId, r: &Rotation) -> Result<(), StoreError> {
        self.rotations
            .insert(old.as_bytes().as_slice(), enc(r)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Records a verified rotation (the new key enrolled as the old one
    /// was) or retires an old key; whether anything changed.
    fn rotate(&mut self, change: &RotationChange) -> Result<bool, StoreError> {
        let (old, detail) = match change {
            RotationChange::Record {
                old,
                new,
                department,
            } => {
                if let Some(r) = self.rotation(old)? {
                    if r.new == *new {
                        return Ok(false);
                    }
                    return Err(StoreError::AlreadyRotated {
                        old: *old,
                        new: r.new,
                    });
                }
                let enrollment = self.enrollment(old)?.ok_or(StoreError::NotEnrolled(*old))?;
                if enrollment.department != *department || enrollment.kind != NodeKind::Agent {
                    return Err(StoreError::NotEnrolled(*old));
                }
                if let Some(r) = self.revocation(new)? {
                    return Err(StoreError::Revoked {
                        key: *new,
                        at: r.at,
                        reason: r.reason,
                    });
                }
                if let Some(e) = self.enrollment(new)? {
                    return Err(StoreError::EnrolledElsewhere {
                        key: *new,
                        department: e.department,
                    });
                }
                let successor = Enrollment {
                    enrolled_at: self.now,
                    ..enrollment
                };
                self.enrollments
                    .insert(new.as_bytes().as_slice(), enc(&successor)?.as_slice())
                    .map_err(storage)?;
                let rotation = Rotation {
                    new: *new,
                    department: department.clone(),
                    at: self.now,
                    retired: None,
                };
                self.put_rotation(old, &rotation)?;
                (
                    old,
                    format!(
                        "key {old} of department {department} rotated to {new}, announced signed by both keys"
                    ),
                )
            }
            RotationChange::Retire { old } => {
                let Some(mut r) = self.rotation(old)?.filter(|r| r.retired.is_none()) else {
                    return Ok(false);
                };
                r.retired = Some(self.now);
                self.put_rotation(old, &r)?;
                (
                    old,
                    format!(
                        "key {old} of department {} retired: its successor {} connected",
                        r.department, r.new
                    ),
                )
            }
        };
        let mut entry = AuditEntry::new(AuditKind::KeyRotated, detail);
        entry.at = self.now;
        entry.peer = Some(*old);
        self.audit(entry)?;
        Ok(true)
    }

    /// Withdraws an enrolled key: moved from the enrollments to the
    /// revocations, and audited.
    fn revoke(&mut self, key: &NodeId, reason: &str) -> Result<Revocation, StoreError> {
        if let Some(r) = self.revocation(key)? {
            return Err(StoreError::Revoked {
                key: *key,
                at: r.at,
                reason: r.reason,
            });
        }
        let enrollment = self.enrollment(key)?.ok_or(StoreError::NotEnrolled(*key))?;
        let revocation = Revocation {
            at: self.now,
            reason: reason.to_string(),
            enrollment,
        };
        self.enrollments
            .remove(key.as_bytes().as_slice())
            .map_err(storage)?;
        self.revocations
            .insert(key.as_bytes().as_slice(), enc(&revocation)?.as_slice())
            .map_err(storage)?;
        let e = &revocation.enrollment;
        let mut entry = AuditEntry::new(
            AuditKind::Revoked,
            format!(
                "revoked {} {key} of {} {} ({}): {reason}",
                if e.is_hub() { "hub key" } else { "key" },
                if e.is_hub() { "platform" } else { "department" },
                e.department,
                e.name
            ),
        );
        entry.at = self.now;
        entry.peer = Some(*key);
        self.audit(entry)?;
        Ok(revocation)
    }

    /// Whether the child hub `hub` forwards the department's feeds (an
    /// agent of the department is registered below it).
    fn carries(&self, hub: &NodeId, department: &DepartmentCode) -> Result<bool, StoreError> {
        for item in self.enrollments.iter().map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            let e: Enrollment = dec(|| "enrollment".into(), v.value())?;
            if e.department == *department
                && !e.is_hub()
                && matches!(e.kind, NodeKind::Below { via, .. } if via == *hub)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn stored_hash(&self, feed: &str, seq: u64) -> Result<Option<BatchHash>, StoreError> {
        match self.batches.get((feed, seq)).map_err(storage)? {
            Some(v) => {
                let b: SignedBatch = dec(|| format!("batch {feed} #{seq}"), v.value())?;
                Ok(Some(b.hash()))
            }
            None => Ok(None),
        }
    }

    /// Refuses a batch: counts it on the feed (when the feed belongs to the
    /// peer's department), audits it and builds the reply.
    fn reject(
        &mut self,
        peer: NodeId,
        feed: Option<FeedId>,
        seq: u64,
        reason: RejectReason,
        detail: String,
    ) -> Result<Outcome, StoreError> {
        let own_department = match (&feed, self.enrollment(&peer)?) {
            (Some(f), Some(e)) if e.kind == NodeKind::Hub => self.carries(&peer, &f.department)?,
            (Some(f), Some(e)) => f.department == e.department,
            _ => false,
        };
        let mut resend_from = 1;
        if let Some(f) = feed.as_ref().filter(|_| own_department) {
            let key = f.to_string();
            let mut rec = self.feed(&key)?;
            rec.rejected += 1;
            rec.last_rejection = Some(RejectionRecord {
                at: self.now,
                seq,
                reason,
                detail: detail.clone(),
            });
            resend_from = rec.cursor.next_seq();
            self.feeds
                .insert(key.as_str(), enc(&rec)?.as_slice())
                .map_err(storage)?;
        }
        tracing::warn!(peer = %peer, feed = ?feed.as_ref().map(ToString::to_string), seq, reason = %reason, %detail, "batch rejected");
        self.audit(AuditEntry {
            id: 0,
            at: self.now,
            kind: AuditKind::BatchRejected,
            peer: Some(peer),
            feed: feed.clone(),
            seq: Some(seq),
            reason: Some(reason),
            detail: detail.clone(),
        })?;
        Ok(Outcome::Reject(Reject {
            feed,
            seq,
            reason,
            detail,
            resend_from,
        }))
    }

    fn clear_touched(&mut self, feed: &str) -> Result<(), StoreError> {
        let lo: (&str, &[u8]) = (feed, &[]);
        let hi: (&str, &[u8]) = (feed, &[0xff]);
        self.touched
            .retain_in(lo..hi, |_, _| false)
            .map_err(storage)
    }

    /// Deletes the feed's rows that no change wrote since the re-read began;
    /// returns what each removed row contributed to the digest.
    fn remove_untouched(&mut self, feed: &str) -> Result<Vec<RowSeed>, StoreError> {
        let lo: (&str, &[u8]) = (feed, &[]);
        let hi: (&str, &[u8]) = (feed, &[0xff]);
        let mut stale = Vec::new();
        for item in self.rows.range(lo..hi).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let row_key = k.value().1;
            if self
                .touched
                .get((feed, row_key))
                .map_err(storage)?
                .is_none()
            {
                stale.push((row_key.to_vec(), self.seed_of(feed, row_key, v.value())?));
            }
        }
        let mut seeds = Vec::with_capacity(stale.len());
        for (row_key, seed) in stale {
            self.rows
                .remove((feed, row_key.as_slice()))
                .map_err(storage)?;
            seeds.push(seed);
        }
        Ok(seeds)
    }

    /// What a stored row contributes to the feed digest.
    fn seed_of(&self, feed: &str, row_key: &[u8], stored: &[u8]) -> Result<RowSeed, StoreError> {
        let key = decode_key(row_key).ok_or_else(|| StoreError::Corrupt {
            what: format!("row key of {feed}"),
            reason: "not a key encoding".into(),
        })?;
        let row: StoredRow = dec(|| format!("row of {feed}"), stored)?;
        Ok(RowSeed::of(&key, &row.values))
    }

    fn digest(&self, feed: &str) -> Result<Digest, StoreError> {
        match self.digests.get(feed).map_err(storage)? {
            Some(v) => Digest::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                what: format!("digest of {feed}"),
                reason: e.to_string(),
            }),
            None => Ok(Digest::new()),
        }
    }

    /// The digest of the rows as they are stored, computed afresh.
    fn rebuild_digest(&self, feed: &str) -> Result<Digest, StoreError> {
        let lo: (&str, &[u8]) = (feed, &[]);
        let hi: (&str, &[u8]) = (feed, &[0xff]);
        let mut d = Digest::new();
        for item in self.rows.range(lo..hi).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            d.add(&self.seed_of(feed, k.value().1, v.value())?);
        }
        Ok(d)
    }

    /// The digest of the rows in `range` as the source would read them now:
    /// under the feed's current shape, columns added since a row was
    /// written read as NULL, dropped ones left out.
    fn range_digest(
        &self,
        feed: &str,
        schema: &TableSchema,
        range: &KeyRange,
    ) -> Result<Digest, StoreError> {
        let mut d = Digest::new();
        self.visit_range(feed, range, &mut |key, row| {
            let values = self.current_values(feed, schema, row)?;
            d.add(&RowSeed::of(&key, &values));
            Ok(())
        })?;
        Ok(d)
    }

    /// Visits the stored rows of a key range in key order.
    fn visit_range(
        &self,
        feed: &str,
        range: &KeyRange,
        visit: &mut dyn FnMut(Vec<Value>, StoredRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let lo: (&str, &[u8]) = (feed, range.lo.as_slice());
        let items = match &range.hi {
            Some(hi) => self.rows.range(lo..(feed, hi.as_slice())),
            None => self.rows.range(lo..(feed, [0xffu8].as_slice())),
        }
        .map_err(storage)?;
        for item in items {
            let (k, v) = item.map_err(storage)?;
            let key = decode_key(k.value().1).ok_or_else(|| StoreError::Corrupt {
                what: format!("row key of {feed}"),
                reason: "not a key encoding".into(),
            })?;
            visit(key, dec(|| format!("row of {feed}"), v.value())?)?;
        }
        Ok(())
    }

    fn current_values(
        &self,
        feed: &str,
        schema: &TableSchema,
        row: StoredRow,
    ) -> Result<Vec<Value>, StoreError> {
        if row.schema_version == schema.version {
            return Ok(row.values);
        }
        let old: Option<TableSchema> = match self
            .schemas
            .get((feed, row.schema_version))
            .map_err(storage)?
        {
            Some(v) => Some(dec(
                || format!("schema {feed} v{}", row.schema_version),
                v.value(),
            )?),
            None => None,
        };
        Ok(match old {
            Some(old) => column_mapping(&old, schema)
                .into_iter()
                .map(|i| {
                    i.and_then(|i| row.values.get(i).cloned())
                        .unwrap_or(Value::Null)
                })
                .collect(),
            None => row.values,
        })
    }

    fn verify_record(&self, feed: &str) -> Result<VerifyRecord, StoreError> {
        match self.verify.get(feed).map_err(storage)? {
            Some(v) => dec(|| format!("verification of {feed}"), v.value()),
            None => Ok(VerifyRecord::default()),
        }
    }

    /// Starts a verification run of a feed at the administrator's request.
    fn start_verify(
        &mut self,
        feed: &FeedId,
        reason: &str,
        events: &mut Vec<VerifyEvent>,
    ) -> Result<Result<u64, String>, StoreError> {
        let key = feed.to_string();
        let rec = self.feed(&key)?;
        if rec.schema.is_none() {
            return Ok(Err(format!(
                "feed {feed} has no data at this hub yet; nothing to verify"
            )));
        }
        let mut vr = self.verify_record(&key)?;
        let id = vr.start(
            feed,
            RunOrigin::Hub,
            None,
            reason.to_string(),
            self.now,
            rec.cursor.last_seq,
        );
        self.verify
            .insert(key.as_str(), enc(&vr)?.as_slice())
            .map_err(storage)?;
        events.push(VerifyEvent::Requests(feed.clone()));
        Ok(Ok(id))
    }

    /// Ends a run the agent cannot answer, and audits why.
    fn refuse_verify(
        &mut self,
        peer: NodeId,
        refusal: &VerifyRefusal,
        events: &mut Vec<VerifyEvent>,
    ) -> Result<(), StoreError> {
        let key = refusal.feed.to_string();
        let mut vr = self.verify_record(&key)?;
        let Some(mut run) = vr.run.take().filter(|r| r.id == refusal.run) else {
            return Ok(()); // not the run in progress (ended or superseded)
        };
        let seq = self.feed(&key)?.cursor.last_seq;
        run.refuse(self.now, seq, &refusal.reason);
        tracing::warn!(feed = %refusal.feed, run = run.id, reason = %refusal.reason, "the agent cannot compare the resource with its source");
        self.audit_feed(
            AuditKind::VerifyRefused,
            peer,
            &refusal.feed,
            seq,
            format!("run {}: {}", run.id, refusal.reason),
        )?;
        events.push(VerifyEvent::Finished(run.outcome(&refusal.feed)));
        vr.last_run = Some(run);
        self.verify
            .insert(key.as_str(), enc(&vr)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    fn apply(
        &mut self,
        peer: NodeId,
        v: &VerifiedBatch,
        events: &mut Vec<VerifyEvent>,
    ) -> Result<Outcome, StoreError> {
        let body = &v.body;
        let key = body.feed.to_string();
        let mut rec = self.feed(&key)?;
        let mut lookup_err = None;
        let verdict = rec.cursor.check(body.seq, body.prev, v.hash, |s| {
            self.stored_hash(&key, s).unwrap_or_else(|e| {
                lookup_err = Some(e);
                None
            })
        });
        if let Some(e) = lookup_err {
            return Err(e);
        }
        if let Err(e) = verdict {
            let reason = match e {
                ChainError::Gap { .. } => RejectReason::Gap,
                ChainError::Replay { .. } => RejectReason::Replay,
                ChainError::Fork { .. } => RejectReason::Fork,
            };
            return self.reject(
                peer,
                Some(body.feed.clone()),
                body.seq,
                reason,
                e.to_string(),
            );
        }
        if let Err(detail) = check_content(rec.schema.as_ref(), &body.entries) {
            return self.reject(
                peer,
                Some(body.feed.clone()),
                body.seq,
                RejectReason::InvalidContent,
                detail,
            );
        }
        let mut had_changes = false;
        let mut resync: Option<ResyncRecord> =
            match self.resync.get(key.as_str()).map_err(storage)? {
                Some(v) => Some(dec(|| format!("resync of {key}"), v.value())?),
                None => None,
            };
        let resync_before = resync.clone();
        let mut digest = self.digest(&key)?;
        let digest_before = digest.clone();
        // Loaded when an entry needs it; stored if it changed.
        let mut verify: Option<(VerifyRecord, VerifyRecord)> = None;
        let mut requests = false;
        for entry in &body.entries {
            match entry {
                Entry::Schema(s) => {
                    self.schemas
                        .insert((key.as_str(), s.version), enc(s)?.as_slice())
                        .map_err(storage)?;
                    rec.schema = Some(s.clone());
                }
                Entry::Change(c) => {
                    had_changes = true;
                    rec.changes_applied += 1;
                    let row_key = encode_key(&c.key);
                    if let Some(r) = resync.as_mut().filter(|r| r.finished.is_none()) {
                        r.rows_written += 1;
                        self.touched
                            .insert((key.as_str(), row_key.as_slice()), ())
                            .map_err(storage)?;
                    }
                    match &c.row {
                        Some(values) => {
                            self.write_row(
                                &key,
                                &row_key,
                                &c.key,
                                values,
                                c.schema_version,
                                &mut rec,
                                &mut digest,
                            )?;
                        }
                        None => {
                            let old = self
                                .rows
                                .remove((key.as_str(), row_key.as_slice()))
                                .map_err(storage)?
                                .map(|old| old.value().to_vec());
                            if let Some(old) = old {
                                rec.rows -= 1;
                                digest.remove(&self.seed_of(&key, &row_key, &old)?);
                            }
                        }
                    }
                }
                Entry::Resync(Resync::Begin { id, reason }) => {
                    self.clear_touched(&key)?;
                    resync = Some(ResyncRecord {
                        id: *id,
                        reason: reason.clone(),
                        started_seq: body.seq,
                        started_at: self.now,
                        rows_written: 0,
                        finished: None,
                    });
                    self.audit_feed(
                        AuditKind::ResyncStarted,
                        peer,
                        &body.feed,
                        body.seq,
                        reason.clone(),
                    )?;
                }
                Entry::Resync(Resync::End { id, rows }) => {
                    let Some(r) = resync
                        .as_mut()
                        .filter(|r| r.id == *id && r.finished.is_none())
                    else {
                        tracing::warn!(feed = %body.feed, id, "resync end without its begin; ignored");
                        continue;
                    };
                    let removed = self.remove_untouched(&key)?;
                    for seed in &removed {
                        digest.remove(seed);
                    }
                    let removed = removed.len() as u64;
                    rec.rows -= removed;
                    self.clear_touched(&key)?;
                    r.finished = Some(ResyncFinish {
                        seq: body.seq,
                        at: self.now,
                        rows_sent: *rows,
                        rows_removed: removed,
                    });
                    let detail = format!(
                        "re-read finished: {rows} rows sent, {} rows written since it began, {removed} rows removed that the source no longer has",
                        r.rows_written
                    );
                    self.audit_feed(
                        AuditKind::ResyncFinished,
                        peer,
                        &body.feed,
                        body.seq,
                        detail,
                    )?;
                }
                Entry::ZeroUpdate(z) => {
                    rec.last_zero_update = Some(ZeroUpdateRecord {
                        seq: body.seq,
                        since: z.since,
                        until: z.until,
                        source_position: z.source_position.clone(),
                        received_at: self.now,
                    });
                }
                Entry::Checkpoint(agent) => {
                    let vr = self.loaded(&key, &mut verify)?;
                    let hub = digest.summary();
                    requests |= self.checkpoint(peer, body, vr, *agent, hub)?;
                }
                Entry::RangeDigest(d) => {
                    let Some(schema) = rec.schema.clone() else {
                        continue;
                    };
                    let vr = self.loaded(&key, &mut verify)?;
                    requests |= self.range_digest_entry(peer, body, &schema, vr, d)?;
                }
                Entry::RangeRepair(r) => {
                    let vr = self.loaded(&key, &mut verify)?;
                    requests |= self.range_repair_entry(body, vr, r, &mut rec, &mut digest)?;
                    if let Some(run) = resync.as_mut().filter(|r| r.finished.is_none()) {
                        run.rows_written += r.rows.len() as u64;
                        for c in &r.rows {
                            self.touched
                                .insert((key.as_str(), encode_key(&c.key).as_slice()), ())
                                .map_err(storage)?;
                        }
                    }
                }
            }
        }
        if had_changes {
            rec.last_change_at = Some(body.created_at);
        }
        if let Some((mut vr, before)) = verify {
            let finished = match vr.run.as_mut() {
                Some(run) => run.finish_if_done(self.now, body.seq),
                None => false,
            };
            if finished && let Some(run) = vr.run.take() {
                let checkpoint_differs = vr.checkpoint.as_ref().is_some_and(|c| !c.matched());
                if run.ranges_differing > 0 || checkpoint_differs {
                    // Rows were wrong at the hub (damaged, or repaired): the
                    // running digest added and subtracted what was stored,
                    // so count it afresh from the rows the run just proved.
                    digest = self.rebuild_digest(&key)?;
                }
                if run.ranges_differing > 0 {
                    self.audit_run_end(peer, body, &run)?;
                }
                events.push(VerifyEvent::Finished(run.outcome(&body.feed)));
                vr.last_run = Some(run);
            }
            if vr != before {
                self.verify
                    .insert(key.as_str(), enc(&vr)?.as_slice())
                    .map_err(storage)?;
            }
        }
        if requests {
            events.push(VerifyEvent::Requests(body.feed.clone()));
        }
        if digest != digest_before {
            self.digests
                .insert(key.as_str(), digest.to_bytes().as_slice())
                .map_err(storage)?;
        }
        if resync != resync_before
            && let Some(r) = &resync
        {
            self.resync
                .insert(key.as_str(), enc(r)?.as_slice())
                .map_err(storage)?;
        }
        rec.cursor.advance(body.seq, v.hash);
        rec.signer = Some(v.signed.signer);
        rec.batches_applied += 1;
        rec.last_batch_received_at = Some(self.now);
        self.batches
            .insert((key.as_str(), body.seq), enc(&v.signed)?.as_slice())
            .map_err(storage)?;
        self.feeds
            .insert(key.as_str(), enc(&rec)?.as_slice())
            .map_err(storage)?;
        tracing::debug!(
            feed = %body.feed,
            seq = body.seq,
            entries = body.entries.len(),
            peer = %peer.short(),
            "batch applied"
        );
        Ok(Outcome::Ack(Ack {
            feed: body.feed.clone(),
            seq: body.seq,
        }))
    }

    /// The feed's verification record, loaded once per batch.
    fn loaded<'a>(
        &self,
        feed: &str,
        slot: &'a mut Option<(VerifyRecord, VerifyRecord)>,
    ) -> Result<&'a mut VerifyRecord, StoreError> {
        if slot.is_none() {
            let vr = self.verify_record(feed)?;
            *slot = Some((vr.clone(), vr));
        }
        match slot {
            Some((vr, _)) => Ok(vr),
            None => Err(StoreError::Storage("verification record not loaded".into())),
        }
    }

    /// Writes one row and keeps the digest and the row count.
    #[allow(clippy::too_many_arguments)]
    fn write_row(
        &mut self,
        feed: &str,
        row_key: &[u8],
        key: &[Value],
        values: &[Value],
        schema_version: u32,
        rec: &mut FeedRecord,
        digest: &mut Digest,
    ) -> Result<Option<StoredRow>, StoreError> {
        let stored = enc(&StoredRow {
            schema_version,
            values: values.to_vec(),
        })?;
        let old = self
            .rows
            .insert((feed, row_key), stored.as_slice())
            .map_err(storage)?
            .map(|old| old.value().to_vec());
        let new_seed = RowSeed::of(key, values);
        match old {
            Some(old) => {
                let old_row: StoredRow = dec(|| format!("row of {feed}"), &old)?;
                digest.replace(&RowSeed::of(key, &old_row.values), &new_seed);
                Ok(Some(old_row))
            }
            None => {
                rec.rows += 1;
                digest.add(&new_seed);
                Ok(None)
            }
        }
    }

    /// Compares the agent's feed digest with the hub's at this point.
    /// Returns whether a run was started (requests to send).
    fn checkpoint(
        &mut self,
        peer: NodeId,
        body: &shuyuan_protocol::BatchBody,
        vr: &mut VerifyRecord,
        agent: DigestSummary,
        hub: DigestSummary,
    ) -> Result<bool, StoreError> {
        let previous = vr.checkpoint.take();
        let matched = agent == hub;
        let was_differing = previous.as_ref().is_some_and(|c| !c.matched());
        vr.checkpoint = Some(CheckpointResult {
            seq: body.seq,
            at: self.now,
            agent,
            hub,
            differing_since: if matched {
                None
            } else {
                previous.and_then(|c| c.differing_since).or(Some(body.seq))
            },
        });
        if matched {
            return Ok(false);
        }
        if !was_differing {
            tracing::warn!(feed = %body.feed, seq = body.seq, %hub, %agent, "feed digests differ");
            let detail = format!(
                "checkpoint: the hub's digest ({hub}) differs from the agent's ({agent}); comparing with the source"
            );
            self.audit_feed(AuditKind::Diverged, peer, &body.feed, body.seq, detail)?;
        }
        if vr.may_auto_start(self.now) {
            let head = body.seq;
            vr.start(
                &body.feed,
                RunOrigin::Checkpoint,
                None,
                format!("checkpoint at seq {head}: digests differ"),
                self.now,
                head,
            );
            return Ok(true);
        }
        Ok(false)
    }

    /// Compares a source range digest with the copy; a differing range is
    /// asked for again in parts. Returns whether there are requests to send.
    fn range_digest_entry(
        &mut self,
        peer: NodeId,
        body: &shuyuan_protocol::BatchBody,
        schema: &TableSchema,
        vr: &mut VerifyRecord,
        d: &RangeDigest,
    ) -> Result<bool, StoreError> {
        let feed = body.feed.to_string();
        if vr.run.as_ref().is_none_or(|r| r.id != d.run) {
            if !vr.is_new_agent_run(d.run, &d.range) {
                return Ok(false); // a late answer to an ended run
            }
            // The agent began a scan of its own (`shuyuan-agent verify`).
            vr.start(
                &body.feed,
                RunOrigin::Agent,
                Some(d.run),
                "requested at the agent (shuyuan-agent verify)".into(),
                self.now,
                body.seq,
            );
        }
        let Some(run) = vr.run.as_mut() else {
            return Ok(false);
        };
        run.bytes_received += entry_bytes(d);
        let Some((_, depth)) = run.answer(&d.range) else {
            return Ok(false);
        };
        run.ranges_compared += 1;
        let hub = self.range_digest(&feed, schema, &d.range)?.summary();
        if hub == d.digest {
            return Ok(false);
        }
        run.ranges_differing += 1;
        let first = run.ranges_differing == 1;
        run.request(
            &body.feed,
            d.range.clone(),
            VerifyMode::Split {
                parts: SPLIT_PARTS,
                leaf_rows: LEAF_ROWS,
            },
            depth + 1,
        );
        if first {
            let detail = format!(
                "run {}: range {} differs from the source (source {}, hub {}); localising",
                d.run, d.range, d.digest, hub
            );
            tracing::warn!(feed = %body.feed, %detail, "copy differs from the source");
            self.audit_feed(AuditKind::Diverged, peer, &body.feed, body.seq, detail)?;
        }
        Ok(true)
    }

    /// Makes the rows of a range exactly the source's. Applied whatever the
    /// run's state: the agent's digest took it in too.
    fn range_repair_entry(
        &mut self,
        body: &shuyuan_protocol::BatchBody,
        vr: &mut VerifyRecord,
        r: &RangeRepair,
        rec: &mut FeedRecord,
        digest: &mut Digest,
    ) -> Result<bool, StoreError> {
        let feed = body.feed.to_string();
        let schema = rec.schema.clone();
        let incoming: std::collections::BTreeSet<Vec<u8>> =
            r.rows.iter().map(|c| encode_key(&c.key)).collect();
        let mut stale = Vec::new();
        self.visit_range(&feed, &r.range, &mut |key, _| {
            let k = encode_key(&key);
            if !incoming.contains(&k) {
                stale.push(k);
            }
            Ok(())
        })?;
        let mut removed_keys = Vec::new();
        for k in &stale {
            let old = self
                .rows
                .remove((feed.as_str(), k.as_slice()))
                .map_err(storage)?
                .map(|v| v.value().to_vec());
            if let Some(old) = old {
                rec.rows -= 1;
                digest.remove(&self.seed_of(&feed, k, &old)?);
                removed_keys.push(describe_key(k));
            }
        }
        let mut repaired_keys = Vec::new();
        for c in &r.rows {
            let Some(values) = &c.row else { continue };
            let row_key = encode_key(&c.key);
            let old = self.write_row(
                &feed,
                &row_key,
                &c.key,
                values,
                c.schema_version,
                rec,
                digest,
            )?;
            let same = match (old, &schema) {
                (Some(old), Some(s)) => self.current_values(&feed, s, old)? == *values,
                _ => false,
            };
            if !same {
                repaired_keys.push(describe_key(&row_key));
            }
        }
        let Some(run) = vr.run.as_mut().filter(|run| run.id == r.run) else {
            return Ok(false);
        };
        run.bytes_received += entry_bytes(r);
        run.rows_removed += removed_keys.len() as u64;
        run.rows_repaired += repaired_keys.len() as u64;
        for k in removed_keys.into_iter().chain(repaired_keys) {
            run.note_key(k);
        }
        let Some((_, depth)) = run.answer(&r.range) else {
            return Ok(false);
        };
        // Confirm: compare the repaired range once more.
        run.request(
            &body.feed,
            r.range.clone(),
            VerifyMode::Scan {
                chunk_rows: SCAN_CHUNK_ROWS,
            },
            depth + 1,
        );
        Ok(true)
    }

    fn audit_run_end(
        &mut self,
        peer: NodeId,
        body: &shuyuan_protocol::BatchBody,
        run: &VerifyRun,
    ) -> Result<(), StoreError> {
        let end = run.finished.as_ref().map_or("", |e| e.detail.as_str());
        let mut keys = run.keys.join("; ");
        let named = run.keys.len() as u64;
        let total = run.rows_repaired + run.rows_removed;
        if total > named {
            keys.push_str(&format!(" and {} more", total - named));
        }
        let detail = format!(
            "run {}: {} ranges compared, {} differed; {} rows rewritten, {} removed; {} bytes exchanged; keys: {keys}. {end}",
            run.id,
            run.ranges_compared,
            run.ranges_differing,
            run.rows_repaired,
            run.rows_removed,
            run.bytes_received + run.bytes_sent,
        );
        self.audit_feed(AuditKind::Repaired, peer, &body.feed, body.seq, detail)
    }
}

/// The encoded size of a range entry, for counting what a verification
/// cost: its variant tag (one byte) and its content.
fn entry_bytes(content: &impl Serialize) -> u64 {
    1 + encode(content).map_or(0, |b| b.len() as u64)
}

/// Checks every entry against the feed's schema as it evolves within the
/// batch, before anything is applied.
fn check_content(current: Option<&TableSchema>, entries: &[Entry]) -> Result<(), String> {
    let mut schema = current.cloned();
    for (i, entry) in entries.iter().enumerate() {
        match entry {
            Entry::Schema(s) => {
                s.validate()
                    .map_err(|e| format!("entry {i}: schema: {e}"))?;
                let expected = schema.as_ref().map_or(1, |c| c.version + 1);
                if s.version != expected {
                    return Err(format!(
                        "entry {i}: schema version {} but {expected} expected",
                        s.version
                    ));
                }
                schema = Some(s.clone());
            }
            Entry::Change(c) => {
                let s = schema
                    .as_ref()
                    .ok_or_else(|| format!("entry {i}: row change before any schema"))?;
                s.check(c).map_err(|e| format!("entry {i}: {e}"))?;
            }
            Entry::RangeRepair(r) => {
                let s = schema
                    .as_ref()
                    .ok_or_else(|| format!("entry {i}: range repair before any schema"))?;
                for c in &r.rows {
                    s.check(c).map_err(|e| format!("entry {i}: {e}"))?;
                    if !r.range.contains(&encode_key(&c.key)) {
                        return Err(format!(
                            "entry {i}: repair row {:?} is outside its range {}",
                            c.key, r.range
                        ));
                    }
                }
            }
            Entry::ZeroUpdate(_)
            | Entry::Resync(_)
            | Entry::Checkpoint(_)
            | Entry::RangeDigest(_) => {}
        }
    }
    Ok(())
}

impl Backend for RedbBackend {
    fn reopen(&self) -> Result<(), StoreError> {
        self.file
            .reopen()
            .map_err(|e| StoreError::Storage(e.to_string()))
    }

    fn write(
        &self,
        group: &mut [WriteOp],
        discards: &mut Discards,
        events: &mut Vec<VerifyEvent>,
    ) -> Result<(), StoreError> {
        let tx = self.file.begin_write().map_err(storage)?;
        let counted = {
            let mut t = Tables::open(&tx)?;
            for op in group.iter_mut() {
                match op {
                    WriteOp::Apply {
                        conn,
                        peer,
                        incoming,
                        outcome,
                    } => {
                        let (feed, seq) = match &*incoming {
                            Incoming::Verified(v) => (Some(v.body.feed.clone()), v.body.seq),
                            Incoming::Refused { feed, seq, .. } => (feed.clone(), *seq),
                        };
                        if let Some(f) = &feed
                            && discards.discard(*conn, f, seq)
                        {
                            *outcome = Some(Outcome::Discarded);
                            continue;
                        }
                        let result = match &*incoming {
                            Incoming::Verified(v) => t.apply(*peer, v, events)?,
                            Incoming::Refused {
                                feed,
                                seq,
                                reason,
                                detail,
                            } => t.reject(*peer, feed.clone(), *seq, *reason, detail.clone())?,
                        };
                        if let Some(f) = &feed {
                            discards.record(*conn, f, seq, &result);
                        }
                        *outcome = Some(result);
                    }
                    WriteOp::Audit(entry) => t.audit(entry.clone())?,
                    WriteOp::Rotate { change, outcome } => {
                        *outcome = Some(match t.rotate(change) {
                            Err(
                                e @ (StoreError::AlreadyRotated { .. }
                                | StoreError::NotEnrolled(_)
                                | StoreError::Revoked { .. }
                                | StoreError::EnrolledElsewhere { .. }),
                            ) => Err(e),
                            other => Ok(other?),
                        });
                    }
                    WriteOp::Revoke {
                        key,
                        reason,
                        outcome,
                    } => {
                        // Refusals are the operation's answer; a storage
                        // error fails the whole group.
                        *outcome = Some(match t.revoke(key, reason) {
                            Err(e @ (StoreError::Revoked { .. } | StoreError::NotEnrolled(_))) => {
                                Err(e)
                            }
                            other => Ok(other?),
                        });
                    }
                    WriteOp::StartVerify {
                        feed,
                        reason,
                        outcome,
                    } => *outcome = Some(t.start_verify(feed, reason, events)?),
                    WriteOp::RefuseVerify { peer, refusal } => {
                        t.refuse_verify(*peer, refusal, events)?;
                    }
                    WriteOp::SaveCatalog(save) => {
                        if let Some(document) = &save.document {
                            let mut docs = tx.open_table(CATALOGS).map_err(storage)?;
                            docs.insert(save.department.as_str(), document.as_slice())
                                .map_err(storage)?;
                        }
                        if let Some((peer, state)) = &save.sync {
                            let mut sync = tx.open_table(CATALOG_SYNC).map_err(storage)?;
                            sync.insert(
                                (save.department.as_str(), peer.as_bytes().as_slice()),
                                state.as_slice(),
                            )
                            .map_err(storage)?;
                        }
                    }
                    WriteOp::Enroll {
                        key,
                        enrollment,
                        outcome,
                    } => {
                        let revoked = t.revocation(key)?;
                        *outcome = Some(match t.enrollment(key)? {
                            _ if let Some(r) = revoked => Err(StoreError::Revoked {
                                key: *key,
                                at: r.at,
                                reason: r.reason,
                            }),
                            Some(old) if old.department != enrollment.department => {
                                Err(StoreError::EnrolledElsewhere {
                                    key: *key,
                                    department: old.department,
                                })
                            }
                            Some(old)
                                if std::mem::discriminant(&old.kind)
                                    != std::mem::discriminant(&enrollment.kind) =>
                            {
                                Err(StoreError::KindChanged {
                                    key: *key,
                                    was: old.kind.name(),
                                    now: enrollment.kind.name(),
                                })
                            }
                            old => {
                                t.enrollments
                                    .insert(key.as_bytes().as_slice(), enc(enrollment)?.as_slice())
                                    .map_err(storage)?;
                                let mut entry = AuditEntry::new(
                                    AuditKind::Enrolled,
                                    format!(
                                        "{} {} for {} {} ({}){}",
                                        if old.is_some() { "renamed" } else { "enrolled" },
                                        if enrollment.is_hub() {
                                            "hub key"
                                        } else {
                                            "key"
                                        },
                                        if enrollment.is_hub() {
                                            "platform"
                                        } else {
                                            "department"
                                        },
                                        enrollment.department,
                                        enrollment.name,
                                        match &enrollment.kind {
                                            NodeKind::Below {
                                                via, registration, ..
                                            } => format!(
                                                ", registered by hub {} and forwarded by child hub {via}",
                                                registration.signer
                                            ),
                                            _ => String::new(),
                                        }
                                    ),
                                );
                                entry.peer = Some(*key);
                                t.audit(entry)?;
                                Ok(old.is_none())
                            }
                        });
                    }
                }
            }
            std::mem::take(&mut t.counted)
        };
        tx.commit().map_err(storage)?;
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for (k, n) in counted {
            *counts.entry(k).or_default() += n;
        }
        Ok(())
    }

    fn audit_counts(&self) -> AuditCounts {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(BATCHES).map_err(storage)?;
        let key = feed.to_string();
        match table.get((key.as_str(), seq)).map_err(storage)? {
            Some(v) => Ok(Some(dec(|| format!("batch {key} #{seq}"), v.value())?)),
            None => Ok(None),
        }
    }

    fn recent_batches(&self, feed: &FeedId, limit: usize) -> Result<Vec<SignedBatch>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(BATCHES).map_err(storage)?;
        let key = feed.to_string();
        let mut out = Vec::new();
        for item in table
            .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
            .map_err(storage)?
            .rev()
            .take(limit)
        {
            let (k, v) = item.map_err(storage)?;
            out.push(dec(|| format!("batch {key} #{}", k.value().1), v.value())?);
        }
        Ok(out)
    }

    fn enrollments(&self) -> Result<Vec<(NodeId, Enrollment)>, StoreError> {
        self.keyed(ENROLLMENTS, "enrollment")
    }

    fn revocations(&self) -> Result<Vec<(NodeId, Revocation)>, StoreError> {
        self.keyed(REVOCATIONS, "revocation")
    }

    fn rotations(&self) -> Result<Vec<(NodeId, Rotation)>, StoreError> {
        self.keyed(ROTATIONS, "rotation")
    }

    fn feeds(&self) -> Result<Vec<(FeedId, FeedRecord)>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(FEEDS).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let feed: FeedId =
                k.value()
                    .parse()
                    .map_err(|e: shuyuan_protocol::feed::CodeError| StoreError::Corrupt {
                        what: format!("feed key {}", k.value()),
                        reason: e.to_string(),
                    })?;
            out.push((feed, dec(|| format!("feed {}", k.value()), v.value())?));
        }
        Ok(out)
    }

    fn feed(&self, feed: &FeedId) -> Result<Option<FeedRecord>, StoreError> {
        self.feed_record(FEEDS, feed, "feed")
    }

    fn schema(&self, feed: &FeedId, version: u32) -> Result<Option<TableSchema>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(SCHEMAS).map_err(storage)?;
        let key = feed.to_string();
        match table.get((key.as_str(), version)).map_err(storage)? {
            Some(v) => Ok(Some(dec(|| format!("schema {key} v{version}"), v.value())?)),
            None => Ok(None),
        }
    }

    fn verification(&self, feed: &FeedId) -> Result<Option<VerifyRecord>, StoreError> {
        self.feed_record(VERIFY, feed, "verification of")
    }

    fn resync(&self, feed: &FeedId) -> Result<Option<ResyncRecord>, StoreError> {
        self.feed_record(RESYNC, feed, "resync of")
    }

    fn rows(
        &self,
        feed: &FeedId,
        visit: &mut dyn FnMut(StoredRow) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(ROWS).map_err(storage)?;
        let key = feed.to_string();
        let lo: (&str, &[u8]) = (key.as_str(), &[]);
        let hi: (&str, &[u8]) = (key.as_str(), &[0xff]);
        for item in table.range(lo..hi).map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            if !visit(dec(|| format!("row of {key}"), v.value())?)? {
                break;
            }
        }
        Ok(())
    }

    fn audit_scan(&self, visit: &mut dyn FnMut(AuditEntry) -> bool) -> Result<(), StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(AUDIT).map_err(storage)?;
        for item in table.iter().map_err(storage)?.rev() {
            let (k, v) = item.map_err(storage)?;
            if !visit(dec(|| format!("audit entry {}", k.value()), v.value())?) {
                break;
            }
        }
        Ok(())
    }

    fn catalog(&self, department: &DepartmentCode) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(CATALOGS).map_err(storage)?;
        Ok(table
            .get(department.as_str())
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }

    fn catalogs(&self) -> Result<Vec<(DepartmentCode, Vec<u8>)>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(CATALOGS).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let dept = DepartmentCode::new(k.value()).map_err(|e| StoreError::Corrupt {
                what: format!("catalog key {}", k.value()),
                reason: e.to_string(),
            })?;
            out.push((dept, v.value().to_vec()));
        }
        Ok(out)
    }

    fn catalog_sync(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(CATALOG_SYNC).map_err(storage)?;
        Ok(table
            .get((department.as_str(), peer.as_bytes().as_slice()))
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }

    fn audit_count(&self) -> Result<u64, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let table = tx.open_table(AUDIT).map_err(storage)?;
        table.len().map_err(storage)
    }

    fn audit_verify(
        &self,
        expect_head: Option<audit_chain::Link>,
    ) -> Result<ChainReport, StoreError> {
        let tx = self.file.begin_read().map_err(storage)?;
        let audit = tx.open_table(AUDIT).map_err(storage)?;
        let chain = tx.open_table(AUDIT_CHAIN).map_err(storage)?;
        let mut check = ChainCheck::new(expect_head);
        for item in audit.iter().map_err(storage)? {
            let (id, bytes) = item.map_err(storage)?;
            let (id, bytes) = (id.value(), bytes.value());
            let stored = chain.get(id).map_err(storage)?;
            let readable = decode::<AuditEntry>(bytes).is_ok_and(|e| e.id == id);
            if !check.entry(id, bytes, stored.as_ref().map(|v| v.value()), readable) {
                break;
            }
        }
        let mut orphan = Ok(None);
        let report = check.finish(|from| {
            orphan = chain
                .range(from..)
                .and_then(|mut r| r.next().transpose())
                .map(|l| l.map(|(k, _)| k.value()));
            orphan.as_ref().ok().copied().flatten()
        });
        orphan.map_err(storage)?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NodeKind, Store};
    use shuyuan_protocol::batch::{BatchBody, ZeroUpdate};
    use shuyuan_protocol::{Column, NodeKey, Op, RowChange, Value};
    use std::sync::Arc;

    fn schema() -> TableSchema {
        TableSchema {
            version: 1,
            table: "t".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    sql_type: "INTEGER".into(),
                    nullable: false,
                },
                Column {
                    name: "v".into(),
                    sql_type: "TEXT".into(),
                    nullable: true,
                },
            ],
            key: vec![0],
        }
    }

    fn verified(key: &NodeKey, seq: u64, prev: BatchHash, entries: Vec<Entry>) -> VerifiedBatch {
        let body = BatchBody {
            feed: "D:R".parse().unwrap(),
            seq,
            prev,
            created_at: UnixMillis(7),
            entries,
        };
        let signed = SignedBatch::seal(key, &body).unwrap();
        let hash = signed.hash();
        VerifiedBatch { signed, body, hash }
    }

    fn upsert(id: i64, v: &str) -> Entry {
        Entry::Change(RowChange {
            op: Op::Insert,
            key: vec![Value::Int(id)],
            row: Some(vec![Value::Int(id), Value::Text(v.into())]),
            schema_version: 1,
        })
    }

    #[tokio::test]
    async fn apply_is_idempotent_and_refusals_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(RedbBackend::open(&dir.path().join("hub.redb")).unwrap());
        let (store, writer) = Store::start(backend.clone()).unwrap();
        let key = NodeKey::from_seed([8; 32]);
        let enrollment = Enrollment {
            department: "D".parse().unwrap(),
            name: "测试".into(),
            kind: NodeKind::Agent,
            enrolled_at: UnixMillis(1),
        };
        assert!(store.enroll(key.id(), enrollment.clone()).await.unwrap());
        assert!(!store.enroll(key.id(), enrollment.clone()).await.unwrap());
        let mut other = enrollment.clone();
        other.department = "E".parse().unwrap();
        assert!(matches!(
            store.enroll(key.id(), other).await,
            Err(StoreError::EnrolledElsewhere { .. })
        ));

        let b1 = verified(
            &key,
            1,
            BatchHash::GENESIS,
            vec![Entry::Schema(schema()), upsert(1, "a"), upsert(2, "b")],
        );
        let b2 = verified(
            &key,
            2,
            b1.hash,
            vec![
                upsert(1, "c"),
                Entry::Change(RowChange {
                    op: Op::Delete,
                    key: vec![Value::Int(2)],
                    row: None,
                    schema_version: 1,
                }),
            ],
        );
        let apply = |b: &VerifiedBatch, conn| {
            let store = store.clone();
            let b = b.clone();
            let peer = key.id();
            async move {
                store
                    .apply(conn, peer, Incoming::Verified(Box::new(b)))
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            }
        };
        assert!(matches!(
            apply(&b1, 1).await,
            Outcome::Ack(Ack { seq: 1, .. })
        ));
        assert!(matches!(
            apply(&b2, 1).await,
            Outcome::Ack(Ack { seq: 2, .. })
        ));
        // Replaying batch 1 changes nothing and is refused.
        match apply(&b1, 2).await {
            Outcome::Reject(r) => {
                assert_eq!(r.reason, RejectReason::Replay);
                assert_eq!(r.resend_from, 3);
            }
            o => panic!("{o:?}"),
        }
        // A different batch 2 is a fork.
        let fork = verified(&key, 2, b1.hash, vec![upsert(9, "x")]);
        match apply(&fork, 3).await {
            Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::Fork),
            o => panic!("{o:?}"),
        }
        // A gap, then its pipelined successor is discarded quietly; a
        // different sequence number is judged again.
        let gap = verified(&key, 5, b2.hash, vec![upsert(5, "g")]);
        let next = verified(&key, 6, gap.hash, vec![upsert(6, "g")]);
        // Submitted back to back, so they may share one write group.
        let first = store
            .apply(4, key.id(), Incoming::Verified(Box::new(gap.clone())))
            .await
            .unwrap();
        let second = store
            .apply(4, key.id(), Incoming::Verified(Box::new(next.clone())))
            .await
            .unwrap();
        match first.await.unwrap() {
            Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::Gap),
            o => panic!("{o:?}"),
        }
        assert_eq!(second.await.unwrap(), Outcome::Discarded);
        // Content that does not fit the schema is refused before anything applies.
        let bad = verified(
            &key,
            3,
            b2.hash,
            vec![
                upsert(3, "ok"),
                Entry::Change(RowChange {
                    op: Op::Insert,
                    key: vec![Value::Int(4)],
                    row: Some(vec![Value::Int(4)]),
                    schema_version: 1,
                }),
            ],
        );
        match apply(&bad, 5).await {
            Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::InvalidContent),
            o => panic!("{o:?}"),
        }
        let zero = verified(
            &key,
            3,
            b2.hash,
            vec![Entry::ZeroUpdate(ZeroUpdate {
                since: UnixMillis(7),
                until: UnixMillis(9),
                source_position: "12".into(),
            })],
        );
        assert!(matches!(
            apply(&zero, 5).await,
            Outcome::Ack(Ack { seq: 3, .. })
        ));

        let feed: FeedId = "D:R".parse().unwrap();
        let rec = backend.feed(&feed).unwrap().unwrap();
        assert_eq!(rec.cursor.last_seq, 3);
        assert_eq!(rec.rows, 1);
        assert_eq!(rec.rejected, 4);
        assert_eq!(rec.last_zero_update.as_ref().unwrap().seq, 3);
        let mut rows = Vec::new();
        backend
            .rows(&feed, &mut |r| {
                rows.push(r.values);
                Ok(true)
            })
            .unwrap();
        assert_eq!(rows, vec![vec![Value::Int(1), Value::Text("c".into())]]);
        let audit = backend.audit(10).unwrap();
        let reasons: Vec<_> = audit.iter().filter_map(|a| a.reason).collect();
        assert_eq!(
            reasons,
            vec![
                RejectReason::InvalidContent,
                RejectReason::Gap,
                RejectReason::Fork,
                RejectReason::Replay
            ]
        );
        assert_eq!(audit.last().unwrap().kind, AuditKind::Enrolled);
        drop(store);
        writer.join();
    }
}
