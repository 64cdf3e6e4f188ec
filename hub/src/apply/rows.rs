//! The shared copy's rows, with the feed's digest and row count kept in
//! step.
//!
//! Invariants: every row written or removed adds to or subtracts from the
//! feed's LtHash digest exactly what the row contributes ([`RowSeed`] of
//! its key and values as written), in the same transaction, so the digest
//! always describes the rows stored; the row count moves with inserts and
//! removals only; a range is compared under the feed's current shape, as
//! the source would read it now.

use shuyuan_protocol::value::{decode_key, encode_key};
use shuyuan_protocol::{Digest, FeedId, KeyRange, RowSeed, TableSchema, Value};

use super::feed::{FeedRecord, StoredRow, column_mapping};
use crate::store::{ReadTxn, Record, StoreError, WriteTxn};

/// The key values of a stored row's encoded key.
pub fn key_values(feed: &FeedId, key: &[u8]) -> Result<Vec<Value>, StoreError> {
    decode_key(key).ok_or_else(|| {
        StoreError::corrupt_because(
            Record::Row(feed.clone(), key.to_vec()),
            "not a key encoding",
        )
    })
}

/// What a stored row contributes to the feed digest.
pub fn seed_of(feed: &FeedId, key: &[u8], row: &StoredRow) -> Result<RowSeed, StoreError> {
    Ok(RowSeed::of(&key_values(feed, key)?, &row.values))
}

/// Writes one row and keeps the digest and the row count; returns the row
/// it replaced.
pub fn write(
    txn: &mut dyn WriteTxn,
    feed: &FeedId,
    key: &[Value],
    values: &[Value],
    schema_version: u32,
    rec: &mut FeedRecord,
    digest: &mut Digest,
) -> Result<Option<StoredRow>, StoreError> {
    let row_key = encode_key(key);
    let row = StoredRow {
        schema_version,
        values: values.to_vec(),
    };
    let old = txn.put_row(feed, &row_key, &row)?;
    let new_seed = RowSeed::of(key, values);
    match &old {
        Some(old) => digest.replace(&RowSeed::of(key, &old.values), &new_seed),
        None => {
            rec.rows += 1;
            digest.add(&new_seed);
        }
    }
    Ok(old)
}

/// Removes one row (by encoded key) and keeps the digest and the row
/// count; whether it was there.
pub fn remove(
    txn: &mut dyn WriteTxn,
    feed: &FeedId,
    row_key: &[u8],
    rec: &mut FeedRecord,
    digest: &mut Digest,
) -> Result<bool, StoreError> {
    match txn.remove_row(feed, row_key)? {
        Some(old) => {
            rec.rows -= 1;
            digest.remove(&seed_of(feed, row_key, &old)?);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Deletes the feed's rows that no change wrote since the re-read began;
/// returns how many.
pub fn remove_untouched(
    txn: &mut dyn WriteTxn,
    feed: &FeedId,
    rec: &mut FeedRecord,
    digest: &mut Digest,
) -> Result<u64, StoreError> {
    let mut stale = Vec::new();
    {
        let read: &dyn ReadTxn = &*txn;
        read.rows(feed, &[], None, &mut |key, _| {
            if !read.touched(feed, key)? {
                stale.push(key.to_vec());
            }
            Ok(true)
        })?;
    }
    for key in &stale {
        remove(txn, feed, key, rec, digest)?;
    }
    Ok(stale.len() as u64)
}

/// The digest of the rows as they are stored, computed afresh.
pub fn rebuild_digest(txn: &dyn ReadTxn, feed: &FeedId) -> Result<Digest, StoreError> {
    let mut d = Digest::new();
    txn.rows(feed, &[], None, &mut |key, row| {
        d.add(&seed_of(feed, key, &row)?);
        Ok(true)
    })?;
    Ok(d)
}

/// Visits the stored rows of a key range in key order, with their keys
/// decoded.
pub fn visit_range(
    txn: &dyn ReadTxn,
    feed: &FeedId,
    range: &KeyRange,
    visit: &mut dyn FnMut(Vec<Value>, StoredRow) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    txn.rows(feed, &range.lo, range.hi.as_deref(), &mut |key, row| {
        visit(key_values(feed, key)?, row)?;
        Ok(true)
    })
}

/// The digest of the rows in `range` as the source would read them now:
/// under the feed's current shape, columns added since a row was written
/// read as NULL, dropped ones left out.
pub fn range_digest(
    txn: &dyn ReadTxn,
    feed: &FeedId,
    schema: &TableSchema,
    range: &KeyRange,
) -> Result<Digest, StoreError> {
    let mut d = Digest::new();
    visit_range(txn, feed, range, &mut |key, row| {
        let values = current_values(txn, feed, schema, row)?;
        d.add(&RowSeed::of(&key, &values));
        Ok(())
    })?;
    Ok(d)
}

/// A stored row's values under the feed's current shape.
pub fn current_values(
    txn: &dyn ReadTxn,
    feed: &FeedId,
    schema: &TableSchema,
    row: StoredRow,
) -> Result<Vec<Value>, StoreError> {
    if row.schema_version == schema.version {
        return Ok(row.values);
    }
    Ok(match txn.schema(feed, row.schema_version)? {
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
