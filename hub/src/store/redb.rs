//! The embedded engine on redb: tables, migrations, encoding; no rules.
//!
//! Invariants: one write transaction at a time (the hub's writer), which
//! commits durably before [`Engine::write_with`] returns; records are
//! postcard under versioned table names; a migration runs once, in order.
//!
//! Tables (the `_v1` suffix is the layout version; values are postcard):
//! - `enrollments_v1`: node key (32 bytes) -> [`Enrollment`]
//! - `feeds_v1`: feed text `DEPT:RES` -> [`FeedRecord`]
//! - `schemas_v1`: (feed text, schema version) -> `TableSchema`
//! - `batches_v1`: (feed text, seq) -> the `SignedBatch` as received
//! - `rows_v1`: (feed text, order-preserving key encoding) -> [`StoredRow`]
//! - `audit_v1`: id -> [`AuditEntry`](crate::apply::audit::AuditEntry)
//! - `audit_chain_v1`: id -> the entry's 32-byte chain link
//!   ([`chain::link`] of the previous link, the id and the stored entry)
//! - `catalogs_v1`: department code -> the department's catalog (automerge)
//! - `catalog_sync_v1`: (department code, peer key) -> automerge sync state
//! - `resync_v1`: feed text -> the feed's latest [`ResyncRecord`]
//! - `resync_touched_v1`: (feed text, row key) -> () for rows written since a
//!   running re-read began; emptied when it ends
//! - `digests_v1`: feed text -> the feed digest of the shared copy as
//!   stored ([`Digest::to_bytes`](shuyuan_protocol::Digest::to_bytes)), updated with every row written
//! - `verify_v1`: feed text -> [`VerifyRecord`]
//! - `revocations_v1`: node key (32 bytes) -> [`Revocation`]; the key is
//!   removed from `enrollments_v1` in the same transaction
//! - `rotations_v1`: old agent key (32 bytes) -> [`Rotation`] (its successor)
//! - `migrations_v1`: migration name -> unix millis applied

use std::cell::{OnceCell, RefCell};
use std::path::Path;

use redb::{
    ReadOnlyTable, ReadableTable, ReadableTableMetadata, Table, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::value::decode_key;
use shuyuan_protocol::{DepartmentCode, Digest, FeedId, NodeId, RowSeed, SignedBatch, TableSchema};
use shuyuan_service::{
    FileHealth, Migration, OpenError, Opener, OperationError, RedbFile, ReopenSchedule,
};

use super::{AuditVisit, Engine, ReadTxn, Record, RowVisit, StoreError, WriteFn, WriteTxn};
use crate::apply::audit::{Link, chain};
use crate::apply::feed::{FeedRecord, ResyncRecord, StoredRow};
use crate::apply::keys::{Enrollment, Revocation, Rotation};
use crate::apply::verification::VerifyRecord;

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
        let mut prev = chain::GENESIS;
        for item in audit.iter()? {
            let (id, bytes) = item?;
            prev = chain::link(&prev, id.value(), bytes.value());
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

/// An engine error about `what`, from any of redb's error types.
fn at<E: Into<redb::Error>>(what: impl FnOnce() -> Record) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::engine(what(), e.into())
}

fn enc<T: Serialize>(what: impl FnOnce() -> Record, v: &T) -> Result<Vec<u8>, StoreError> {
    encode(v).map_err(|e| StoreError::corrupt(what(), e))
}

fn dec<T: DeserializeOwned>(what: impl FnOnce() -> Record, bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| StoreError::corrupt(what(), e))
}

/// A node key as filed in a table keyed by node key.
fn node_key(what: &'static str, bytes: &[u8]) -> Result<NodeId, StoreError> {
    let corrupt = |reason: String| StoreError::corrupt_because(Record::Keys(what), reason);
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| corrupt("a key that is not 32 bytes".into()))?;
    NodeId::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))
}

/// Every record of a table keyed by node key.
fn keyed<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    what: &'static str,
    record: fn(NodeId) -> Record,
) -> Result<Vec<(NodeId, T)>, StoreError> {
    let mut out = Vec::new();
    for item in table.iter().map_err(at(|| Record::Keys(what)))? {
        let (k, v) = item.map_err(at(|| Record::Keys(what)))?;
        let id = node_key(what, k.value())?;
        out.push((id, dec(|| record(id), v.value())?));
    }
    Ok(out)
}

/// The record filed under `key`, decoded.
fn get<'k, K: redb::Key + 'static, T: DeserializeOwned>(
    table: &impl ReadableTable<K, &'static [u8]>,
    key: impl std::borrow::Borrow<K::SelfType<'k>>,
    what: impl Fn() -> Record,
) -> Result<Option<T>, StoreError> {
    match table.get(key).map_err(at(&what))? {
        Some(v) => Ok(Some(dec(what, v.value())?)),
        None => Ok(None),
    }
}

/// The record filed under a node key.
fn by_key<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &NodeId,
    record: fn(NodeId) -> Record,
) -> Result<Option<T>, StoreError> {
    get(table, key.as_bytes().as_slice(), || record(*key))
}

/// A feed's record in a table keyed by feed text.
fn by_feed<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    feed: &FeedId,
    record: fn(FeedId) -> Record,
) -> Result<Option<T>, StoreError> {
    get(table, feed.to_string().as_str(), || record(feed.clone()))
}

/// The upper bound of a row range within a feed (`hi` None: the feed's end).
fn row_bound<'a>(feed: &'a str, hi: Option<&'a [u8]>) -> (&'a str, &'a [u8]) {
    (feed, hi.unwrap_or(&[0xff]))
}

/// What reads look like on any transaction: each table through an
/// accessor that the read and the write transaction define their own way.
macro_rules! read_txn {
    ($ty:ty) => {
        impl ReadTxn for $ty {
            fn enrollment(&self, key: &NodeId) -> Result<Option<Enrollment>, StoreError> {
                by_key(self.enrollments()?, key, Record::Enrollment)
            }

            fn enrollments(&self) -> Result<Vec<(NodeId, Enrollment)>, StoreError> {
                keyed(self.enrollments()?, "enrollments", Record::Enrollment)
            }

            fn revocation(&self, key: &NodeId) -> Result<Option<Revocation>, StoreError> {
                by_key(self.revocations()?, key, Record::Revocation)
            }

            fn revocations(&self) -> Result<Vec<(NodeId, Revocation)>, StoreError> {
                keyed(self.revocations()?, "revocations", Record::Revocation)
            }

            fn rotation(&self, old: &NodeId) -> Result<Option<Rotation>, StoreError> {
                by_key(self.rotations()?, old, Record::Rotation)
            }

            fn rotations(&self) -> Result<Vec<(NodeId, Rotation)>, StoreError> {
                keyed(self.rotations()?, "rotations", Record::Rotation)
            }

            fn feed(&self, feed: &FeedId) -> Result<Option<FeedRecord>, StoreError> {
                by_feed(self.feeds()?, feed, Record::Feed)
            }

            fn feeds(&self) -> Result<Vec<(FeedId, FeedRecord)>, StoreError> {
                let mut out = Vec::new();
                for item in self.feeds()?.iter().map_err(at(|| Record::Feeds))? {
                    let (k, v) = item.map_err(at(|| Record::Feeds))?;
                    let feed: FeedId =
                        k.value()
                            .parse()
                            .map_err(|e: shuyuan_protocol::feed::CodeError| {
                                StoreError::corrupt_because(
                                    Record::Feeds,
                                    format!("feed key {}: {e}", k.value()),
                                )
                            })?;
                    let record = dec(|| Record::Feed(feed.clone()), v.value())?;
                    out.push((feed, record));
                }
                Ok(out)
            }

            fn schema(
                &self,
                feed: &FeedId,
                version: u32,
            ) -> Result<Option<TableSchema>, StoreError> {
                let key = feed.to_string();
                get(self.schemas()?, (key.as_str(), version), || {
                    Record::Schema(feed.clone(), version)
                })
            }

            fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, StoreError> {
                let key = feed.to_string();
                get(self.batches()?, (key.as_str(), seq), || {
                    Record::Batch(feed.clone(), seq)
                })
            }

            fn recent_batches(
                &self,
                feed: &FeedId,
                limit: usize,
            ) -> Result<Vec<SignedBatch>, StoreError> {
                let key = feed.to_string();
                let what = || Record::Feed(feed.clone());
                let mut out = Vec::new();
                for item in self
                    .batches()?
                    .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                    .map_err(at(what))?
                    .rev()
                    .take(limit)
                {
                    let (k, v) = item.map_err(at(what))?;
                    let seq = k.value().1;
                    out.push(dec(|| Record::Batch(feed.clone(), seq), v.value())?);
                }
                Ok(out)
            }

            fn row(&self, feed: &FeedId, key: &[u8]) -> Result<Option<StoredRow>, StoreError> {
                let text = feed.to_string();
                get(self.rows()?, (text.as_str(), key), || {
                    Record::Row(feed.clone(), key.to_vec())
                })
            }

            fn rows(
                &self,
                feed: &FeedId,
                lo: &[u8],
                hi: Option<&[u8]>,
                visit: RowVisit<'_>,
            ) -> Result<(), StoreError> {
                let text = feed.to_string();
                let what = || Record::Rows(feed.clone());
                let range = self
                    .rows()?
                    .range((text.as_str(), lo)..row_bound(&text, hi))
                    .map_err(at(what))?;
                for item in range {
                    let (k, v) = item.map_err(at(what))?;
                    let key = k.value().1;
                    let row = dec(|| Record::Row(feed.clone(), key.to_vec()), v.value())?;
                    if !visit(key, row)? {
                        break;
                    }
                }
                Ok(())
            }

            fn resync(&self, feed: &FeedId) -> Result<Option<ResyncRecord>, StoreError> {
                by_feed(self.resyncs()?, feed, Record::Resync)
            }

            fn touched(&self, feed: &FeedId, key: &[u8]) -> Result<bool, StoreError> {
                let text = feed.to_string();
                Ok(self
                    .touched_rows()?
                    .get((text.as_str(), key))
                    .map_err(at(|| Record::Row(feed.clone(), key.to_vec())))?
                    .is_some())
            }

            fn digest(&self, feed: &FeedId) -> Result<Option<Digest>, StoreError> {
                let key = feed.to_string();
                let what = || Record::Digest(feed.clone());
                match self.digests()?.get(key.as_str()).map_err(at(what))? {
                    Some(v) => Digest::from_bytes(v.value())
                        .map(Some)
                        .map_err(|e| StoreError::corrupt_because(what(), e.to_string())),
                    None => Ok(None),
                }
            }

            fn verification(&self, feed: &FeedId) -> Result<Option<VerifyRecord>, StoreError> {
                by_feed(self.verifications()?, feed, Record::Verification)
            }

            fn audit_tail(&self) -> Result<(Option<u64>, Option<Link>), StoreError> {
                let what = || Record::Audit(None);
                let last = self
                    .audit()?
                    .last()
                    .map_err(at(what))?
                    .map(|(k, _)| k.value());
                let head = match self.audit_chain()?.last().map_err(at(what))? {
                    Some((k, v)) => {
                        let id = k.value();
                        Some(v.value().try_into().map_err(|_| {
                            StoreError::corrupt_because(
                                Record::Audit(Some(id)),
                                format!("a chain link of {} bytes instead of 32", v.value().len()),
                            )
                        })?)
                    }
                    None => None,
                };
                Ok((last, head))
            }

            fn audit_entries(
                &self,
                from: u64,
                newest_first: bool,
                visit: AuditVisit<'_>,
            ) -> Result<(), StoreError> {
                let what = || Record::Audit(None);
                let range = self.audit()?.range(from..).map_err(at(what))?;
                let mut each = |item: Result<_, redb::StorageError>| {
                    let (k, v): (redb::AccessGuard<'_, u64>, redb::AccessGuard<'_, &[u8]>) =
                        item.map_err(at(what))?;
                    visit(k.value(), v.value())
                };
                if newest_first {
                    for item in range.rev() {
                        if !each(item)? {
                            break;
                        }
                    }
                } else {
                    for item in range {
                        if !each(item)? {
                            break;
                        }
                    }
                }
                Ok(())
            }

            fn audit_link(&self, id: u64) -> Result<Option<Link>, StoreError> {
                let what = || Record::Audit(Some(id));
                match self.audit_chain()?.get(id).map_err(at(what))? {
                    Some(v) => Ok(Some(v.value().try_into().map_err(|_| {
                        StoreError::corrupt_because(
                            what(),
                            format!("a chain link of {} bytes instead of 32", v.value().len()),
                        )
                    })?)),
                    None => Ok(None),
                }
            }

            fn audit_link_after(&self, from: u64) -> Result<Option<u64>, StoreError> {
                let what = || Record::Audit(None);
                let mut range = self.audit_chain()?.range(from..).map_err(at(what))?;
                Ok(range
                    .next()
                    .transpose()
                    .map_err(at(what))?
                    .map(|(k, _)| k.value()))
            }

            fn audit_count(&self) -> Result<u64, StoreError> {
                self.audit()?.len().map_err(at(|| Record::Audit(None)))
            }

            fn catalog(&self, department: &DepartmentCode) -> Result<Option<Vec<u8>>, StoreError> {
                Ok(self
                    .catalogs()?
                    .get(department.as_str())
                    .map_err(at(|| Record::Catalog(department.clone())))?
                    .map(|v| v.value().to_vec()))
            }

            fn catalogs(&self) -> Result<Vec<(DepartmentCode, Vec<u8>)>, StoreError> {
                let what = || Record::Keys("catalogs");
                let mut out = Vec::new();
                for item in self.catalogs()?.iter().map_err(at(what))? {
                    let (k, v) = item.map_err(at(what))?;
                    let dept = DepartmentCode::new(k.value()).map_err(|e| {
                        StoreError::corrupt_because(
                            what(),
                            format!("catalog key {}: {e}", k.value()),
                        )
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
                Ok(self
                    .catalog_syncs()?
                    .get((department.as_str(), peer.as_bytes().as_slice()))
                    .map_err(at(|| Record::CatalogSync(department.clone(), *peer)))?
                    .map(|v| v.value().to_vec()))
            }
        }
    };
}

/// The key of a table filed by feed (or department) and then bytes: rows,
/// and catalog sync states.
type FeedKey = (&'static str, &'static [u8]);

/// A read transaction; each table is opened when first read.
struct Reader {
    tx: redb::ReadTransaction,
    enrollments: OnceCell<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    revocations: OnceCell<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    rotations: OnceCell<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    feeds: OnceCell<ReadOnlyTable<&'static str, &'static [u8]>>,
    schemas: OnceCell<ReadOnlyTable<(&'static str, u32), &'static [u8]>>,
    batches: OnceCell<ReadOnlyTable<(&'static str, u64), &'static [u8]>>,
    rows: OnceCell<ReadOnlyTable<FeedKey, &'static [u8]>>,
    resync: OnceCell<ReadOnlyTable<&'static str, &'static [u8]>>,
    touched: OnceCell<ReadOnlyTable<(&'static str, &'static [u8]), ()>>,
    digests: OnceCell<ReadOnlyTable<&'static str, &'static [u8]>>,
    verify: OnceCell<ReadOnlyTable<&'static str, &'static [u8]>>,
    audit: OnceCell<ReadOnlyTable<u64, &'static [u8]>>,
    audit_chain: OnceCell<ReadOnlyTable<u64, &'static [u8]>>,
    catalogs: OnceCell<ReadOnlyTable<&'static str, &'static [u8]>>,
    catalog_sync: OnceCell<ReadOnlyTable<FeedKey, &'static [u8]>>,
}

/// Opens a table of a read transaction once.
fn opened<'c, K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    cell: &'c OnceCell<ReadOnlyTable<K, V>>,
    definition: TableDefinition<'static, K, V>,
) -> Result<&'c ReadOnlyTable<K, V>, StoreError> {
    if let Some(t) = cell.get() {
        return Ok(t);
    }
    let table = tx
        .open_table(definition)
        .map_err(at(|| Record::Table(definition.name().to_string())))?;
    Ok(cell.get_or_init(|| table))
}

impl Reader {
    fn new(tx: redb::ReadTransaction) -> Self {
        Reader {
            tx,
            enrollments: OnceCell::new(),
            revocations: OnceCell::new(),
            rotations: OnceCell::new(),
            feeds: OnceCell::new(),
            schemas: OnceCell::new(),
            batches: OnceCell::new(),
            rows: OnceCell::new(),
            resync: OnceCell::new(),
            touched: OnceCell::new(),
            digests: OnceCell::new(),
            verify: OnceCell::new(),
            audit: OnceCell::new(),
            audit_chain: OnceCell::new(),
            catalogs: OnceCell::new(),
            catalog_sync: OnceCell::new(),
        }
    }
}

/// The table accessors of a transaction type: `$get` turns a field and
/// its definition into the table.
macro_rules! accessors {
    ($ty:ty, $self:ident, $field:ident, $def:ident => $get:expr) => {
        impl $ty {
            fn enrollments(&$self) -> Result<&impl ReadableTable<&'static [u8], &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.enrollments, ENROLLMENTS);
                $get
            }
            fn revocations(&$self) -> Result<&impl ReadableTable<&'static [u8], &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.revocations, REVOCATIONS);
                $get
            }
            fn rotations(&$self) -> Result<&impl ReadableTable<&'static [u8], &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.rotations, ROTATIONS);
                $get
            }
            fn feeds(&$self) -> Result<&impl ReadableTable<&'static str, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.feeds, FEEDS);
                $get
            }
            fn schemas(&$self) -> Result<&impl ReadableTable<(&'static str, u32), &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.schemas, SCHEMAS);
                $get
            }
            fn batches(&$self) -> Result<&impl ReadableTable<(&'static str, u64), &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.batches, BATCHES);
                $get
            }
            fn rows(&$self) -> Result<&impl ReadableTable<(&'static str, &'static [u8]), &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.rows, ROWS);
                $get
            }
            fn resyncs(&$self) -> Result<&impl ReadableTable<&'static str, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.resync, RESYNC);
                $get
            }
            fn touched_rows(&$self) -> Result<&impl ReadableTable<(&'static str, &'static [u8]), ()>, StoreError> {
                let ($field, $def) = (&$self.touched, TOUCHED);
                $get
            }
            fn digests(&$self) -> Result<&impl ReadableTable<&'static str, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.digests, DIGESTS);
                $get
            }
            fn verifications(&$self) -> Result<&impl ReadableTable<&'static str, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.verify, VERIFY);
                $get
            }
            fn audit(&$self) -> Result<&impl ReadableTable<u64, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.audit, AUDIT);
                $get
            }
            fn audit_chain(&$self) -> Result<&impl ReadableTable<u64, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.audit_chain, AUDIT_CHAIN);
                $get
            }
            fn catalogs(&$self) -> Result<&impl ReadableTable<&'static str, &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.catalogs, CATALOGS);
                $get
            }
            fn catalog_syncs(&$self) -> Result<&impl ReadableTable<(&'static str, &'static [u8]), &'static [u8]>, StoreError> {
                let ($field, $def) = (&$self.catalog_sync, CATALOG_SYNC);
                $get
            }
        }
    };
}

accessors!(Reader, self, cell, definition => opened(&self.tx, cell, definition));
read_txn!(Reader);

/// The tables one write transaction works on, all opened at its start.
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
    catalogs: Table<'t, &'static str, &'static [u8]>,
    catalog_sync: Table<'t, (&'static str, &'static [u8]), &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t WriteTransaction) -> Result<Self, StoreError> {
        fn open<'t, K: redb::Key + 'static, V: redb::Value + 'static>(
            tx: &'t WriteTransaction,
            definition: TableDefinition<'static, K, V>,
        ) -> Result<Table<'t, K, V>, StoreError> {
            tx.open_table(definition)
                .map_err(at(|| Record::Table(definition.name().to_string())))
        }
        Ok(Tables {
            enrollments: open(tx, ENROLLMENTS)?,
            revocations: open(tx, REVOCATIONS)?,
            rotations: open(tx, ROTATIONS)?,
            feeds: open(tx, FEEDS)?,
            schemas: open(tx, SCHEMAS)?,
            batches: open(tx, BATCHES)?,
            rows: open(tx, ROWS)?,
            resync: open(tx, RESYNC)?,
            touched: open(tx, TOUCHED)?,
            digests: open(tx, DIGESTS)?,
            verify: open(tx, VERIFY)?,
            audit: open(tx, AUDIT)?,
            audit_chain: open(tx, AUDIT_CHAIN)?,
            catalogs: open(tx, CATALOGS)?,
            catalog_sync: open(tx, CATALOG_SYNC)?,
        })
    }
}

accessors!(Tables<'_>, self, table, _definition => Ok(table));
read_txn!(Tables<'_>);

/// Stores a record under a node key.
fn put_keyed<T: Serialize>(
    table: &mut Table<'_, &'static [u8], &'static [u8]>,
    key: &NodeId,
    record: fn(NodeId) -> Record,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = enc(|| record(*key), value)?;
    table
        .insert(key.as_bytes().as_slice(), bytes.as_slice())
        .map_err(at(|| record(*key)))?;
    Ok(())
}

/// Stores a feed's record in a table keyed by feed text.
fn put_by_feed<T: Serialize>(
    table: &mut Table<'_, &'static str, &'static [u8]>,
    feed: &FeedId,
    record: fn(FeedId) -> Record,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = enc(|| record(feed.clone()), value)?;
    table
        .insert(feed.to_string().as_str(), bytes.as_slice())
        .map_err(at(|| record(feed.clone())))?;
    Ok(())
}

impl WriteTxn for Tables<'_> {
    fn put_enrollment(&mut self, key: &NodeId, e: &Enrollment) -> Result<(), StoreError> {
        put_keyed(&mut self.enrollments, key, Record::Enrollment, e)
    }

    fn remove_enrollment(&mut self, key: &NodeId) -> Result<(), StoreError> {
        self.enrollments
            .remove(key.as_bytes().as_slice())
            .map_err(at(|| Record::Enrollment(*key)))?;
        Ok(())
    }

    fn put_revocation(&mut self, key: &NodeId, r: &Revocation) -> Result<(), StoreError> {
        put_keyed(&mut self.revocations, key, Record::Revocation, r)
    }

    fn put_rotation(&mut self, old: &NodeId, r: &Rotation) -> Result<(), StoreError> {
        put_keyed(&mut self.rotations, old, Record::Rotation, r)
    }

    fn put_feed(&mut self, feed: &FeedId, record: &FeedRecord) -> Result<(), StoreError> {
        put_by_feed(&mut self.feeds, feed, Record::Feed, record)
    }

    fn put_schema(&mut self, feed: &FeedId, schema: &TableSchema) -> Result<(), StoreError> {
        let what = || Record::Schema(feed.clone(), schema.version);
        let bytes = enc(what, schema)?;
        self.schemas
            .insert(
                (feed.to_string().as_str(), schema.version),
                bytes.as_slice(),
            )
            .map_err(at(what))?;
        Ok(())
    }

    fn put_batch(
        &mut self,
        feed: &FeedId,
        seq: u64,
        batch: &SignedBatch,
    ) -> Result<(), StoreError> {
        let what = || Record::Batch(feed.clone(), seq);
        let bytes = enc(what, batch)?;
        self.batches
            .insert((feed.to_string().as_str(), seq), bytes.as_slice())
            .map_err(at(what))?;
        Ok(())
    }

    fn put_row(
        &mut self,
        feed: &FeedId,
        key: &[u8],
        row: &StoredRow,
    ) -> Result<Option<StoredRow>, StoreError> {
        let what = || Record::Row(feed.clone(), key.to_vec());
        let bytes = enc(what, row)?;
        let old = self
            .rows
            .insert((feed.to_string().as_str(), key), bytes.as_slice())
            .map_err(at(what))?;
        match old {
            Some(old) => Ok(Some(dec(what, old.value())?)),
            None => Ok(None),
        }
    }

    fn remove_row(&mut self, feed: &FeedId, key: &[u8]) -> Result<Option<StoredRow>, StoreError> {
        let what = || Record::Row(feed.clone(), key.to_vec());
        let old = self
            .rows
            .remove((feed.to_string().as_str(), key))
            .map_err(at(what))?;
        match old {
            Some(old) => Ok(Some(dec(what, old.value())?)),
            None => Ok(None),
        }
    }

    fn put_resync(&mut self, feed: &FeedId, record: &ResyncRecord) -> Result<(), StoreError> {
        put_by_feed(&mut self.resync, feed, Record::Resync, record)
    }

    fn touch(&mut self, feed: &FeedId, key: &[u8]) -> Result<(), StoreError> {
        self.touched
            .insert((feed.to_string().as_str(), key), ())
            .map_err(at(|| Record::Row(feed.clone(), key.to_vec())))?;
        Ok(())
    }

    fn clear_touched(&mut self, feed: &FeedId) -> Result<(), StoreError> {
        let text = feed.to_string();
        let lo: (&str, &[u8]) = (text.as_str(), &[]);
        self.touched
            .retain_in(lo..row_bound(&text, None), |_, _| false)
            .map_err(at(|| Record::Rows(feed.clone())))
    }

    fn put_digest(&mut self, feed: &FeedId, digest: &Digest) -> Result<(), StoreError> {
        self.digests
            .insert(feed.to_string().as_str(), digest.to_bytes().as_slice())
            .map_err(at(|| Record::Digest(feed.clone())))?;
        Ok(())
    }

    fn put_verification(&mut self, feed: &FeedId, record: &VerifyRecord) -> Result<(), StoreError> {
        put_by_feed(&mut self.verify, feed, Record::Verification, record)
    }

    fn append_audit(&mut self, id: u64, entry: &[u8], link: &Link) -> Result<(), StoreError> {
        let what = || Record::Audit(Some(id));
        self.audit.insert(id, entry).map_err(at(what))?;
        self.audit_chain
            .insert(id, link.as_slice())
            .map_err(at(what))?;
        Ok(())
    }

    fn put_catalog(&mut self, department: &DepartmentCode, doc: &[u8]) -> Result<(), StoreError> {
        self.catalogs
            .insert(department.as_str(), doc)
            .map_err(at(|| Record::Catalog(department.clone())))?;
        Ok(())
    }

    fn put_catalog_sync(
        &mut self,
        department: &DepartmentCode,
        peer: &NodeId,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.catalog_sync
            .insert((department.as_str(), peer.as_bytes().as_slice()), state)
            .map_err(at(|| Record::CatalogSync(department.clone(), *peer)))?;
        Ok(())
    }
}

/// The redb storage engine: one file, reopened after an I/O error under
/// the services' one reopen policy ([`RedbFile::write`]).
#[derive(Debug)]
pub struct RedbEngine {
    file: RedbFile,
}

impl RedbEngine {
    /// Opens or creates the store file and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        RedbEngine::open_with(path, Box::new(shuyuan_service::redb_file::open_redb))
    }

    /// Like [`RedbEngine::open`], opening the file (now and at each
    /// reopen) with `open`: tests pass a disk that fills on demand.
    pub fn open_with(path: &Path, open: Opener) -> Result<Self, StoreError> {
        let file = RedbFile::open_with(path, MIGRATIONS, open)
            .map_err(|e| match e {
                OpenError::AlreadyOpen(p) => StoreError::AlreadyOpen(p),
                other => StoreError::engine(Record::File, other),
            })?
            .named("hub store");
        Ok(RedbEngine { file })
    }

    /// Replaces the reopen schedule (tests).
    pub fn set_schedule(&self, schedule: ReopenSchedule) {
        self.file.set_schedule(schedule);
    }
}

/// The policy reads the redb error in a store error.
impl OperationError for StoreError {
    fn redb_error(&self) -> Option<&redb::Error> {
        match self {
            StoreError::Engine { source, .. } => source.downcast_ref::<redb::Error>(),
            _ => None,
        }
    }
}

impl Engine for RedbEngine {
    fn read_with(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let f = RefCell::new(f);
        self.file.read(|opening| {
            let tx = opening.begin_read().map_err(at(|| Record::File))?;
            (f.borrow_mut())(&Reader::new(tx))
        })
    }

    fn write_with(&self, f: WriteFn<'_>) -> Result<(), StoreError> {
        self.file.write(|opening| {
            let tx = opening.begin_write().map_err(at(|| Record::File))?;
            {
                let mut tables = Tables::open(&tx)?;
                f(&mut tables, opening.recovering())?;
            }
            tx.commit().map_err(at(|| Record::File))
        })
    }

    fn health(&self) -> FileHealth {
        self.file.health()
    }

    fn reopen_if_due(&self) -> Result<bool, StoreError> {
        Ok(self.file.reopen_if_due()?)
    }
}
