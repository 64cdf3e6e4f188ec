//! Comparisons with the hub (probes), answered at exact points of the feed.
//!
//! The rows of the probe's key range are read in a REPEATABLE READ snapshot
//! with the WAL insert position `H` (see `watermark`). While the log is
//! read up to `H`, changes in the range by transactions the snapshot cannot
//! see are applied to those rows (an insert or update replaces the row, a
//! delete removes it); when the log reaches `H` (only then: a pause of the
//! server is no proof for an answer) the answer is computed from them and
//! placed after the read's changes, and the read ends there. The same
//! retake rule as for re-reads holds.
//!
//! Invariant: an answer is the source's range exactly at its point of the
//! feed, and only keys that sort in SQL as their encoded bytes do are
//! compared (see `ranges`); any other probe is refused.

use std::collections::BTreeMap;

use shuyuan_protocol::message::VerifyMode;
use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{Entry, KeyRange, TableSchema, Value};
use tokio_postgres::SimpleQueryMessage;

use super::decode::text_value;
use super::table::{Table, resolve};
use super::watermark::{Snapshot, watermark};
use super::{PgSource, pg_err, ranges};
use crate::source::probe::{KeyedRow, answer};
use crate::source::{Captured, Probe, SourceError};

/// The rows of a probe's range read in a snapshot, waiting for the log to
/// reach `high`; changes the snapshot cannot see are patched in meanwhile.
#[derive(Debug)]
pub(super) struct ProbeChunk {
    /// The probe as it was queued (to find it again).
    pub(super) probe: Probe,
    snapshot: Snapshot,
    pub(super) high: u64,
    table: Table,
    keys: Vec<ranges::KeyCol>,
    /// encoded key -> (key, row), for the keys in `covered`
    rows: BTreeMap<Vec<u8>, KeyedRow>,
    /// The part of the probe's range the rows cover: from its start up to
    /// the first row not read (or its end).
    covered: KeyRange,
}

impl ProbeChunk {
    /// Applies a change of resource `resource` by transaction `xid` to the
    /// rows in the covered range, if the snapshot cannot see it.
    pub(super) fn patch(&mut self, resource: usize, xid: u32, changes: &[Captured]) {
        if self.probe.resource != resource || self.snapshot.sees(xid) {
            return;
        }
        // The snapshot misses this change: bring its rows up to it.
        for c in changes {
            let k = encode_key(&c.key);
            if !self.covered.contains(&k) {
                continue;
            }
            tracing::debug!(xid, key = ?c.key, delete = c.row.is_none(), "probe rows patched");
            match &c.row {
                Some(row) => {
                    self.rows.insert(k, (c.key.clone(), row.clone()));
                }
                None => {
                    self.rows.remove(&k);
                }
            }
        }
    }
}

impl PgSource {
    /// Takes the rows of the first queued probe's range (the part of it
    /// this answer covers) in a snapshot, unless a transaction is open.
    /// Returns whether a probe chunk is now waiting for the log.
    ///
    /// Like a load chunk, it is read in a REPEATABLE READ snapshot with the
    /// WAL position `H` taken after the snapshot (the insert position: every
    /// commit the snapshot sees, however committed, was written before it;
    /// every commit written after it the snapshot cannot see). While the log
    /// is read up to `H`, changes in the range by transactions the snapshot
    /// cannot see are applied to the rows; at `H` the rows are the source's
    /// as of that point of the feed.
    pub(super) async fn take_probe(&mut self) -> Result<bool, SourceError> {
        if self.chunk.is_some()
            || self.probe_chunk.is_some()
            || self.txn.is_some()
            || self.pushback.is_some()
        {
            return Ok(false);
        }
        let Some(probe) = self.probes.first().cloned() else {
            return Ok(false);
        };
        self.budget.refill();
        if !self.budget.left() {
            return Ok(false);
        }
        let i = probe.resource;
        let sql = self.sql()?;
        let mut table = resolve(sql, &self.resources[i]).await?;
        table.shape.version = self.tables[i].shape.version;
        let checked = ranges::key_cols(&table).and_then(|keys| {
            ranges::check_range(&table, &keys, &probe.range)?;
            let limit = match probe.mode {
                VerifyMode::Scan { chunk_rows } => Some(
                    self.cfg
                        .chunk_size
                        .max(usize::try_from(chunk_rows).unwrap_or(usize::MAX))
                        .saturating_add(1),
                ),
                VerifyMode::Split { .. } => None,
            };
            let select = ranges::select(&table, &keys, &probe.range, limit)?;
            Ok((keys, limit, select))
        });
        let (keys, limit, select) = match checked {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(resource = i, run = probe.run, error = %e, "cannot compare with the hub");
                self.probes.remove(0);
                return Ok(false);
            }
        };
        let query = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SELECT txid_current_snapshot()::text, pg_current_wal_insert_lsn()::text, ({})::text, \
             current_setting('wal_block_size'), pg_size_bytes(current_setting('wal_segment_size'))::text; \
             {select}; COMMIT;",
            ranges::guard(&table, &keys)
        );
        let context = format!(
            "reading a key range of table {} to compare",
            self.resources[i].table
        );
        let messages = sql
            .simple_query(&query)
            .await
            .map_err(pg_err(context.as_str()))?;
        let mut head = None;
        let mut rows: BTreeMap<Vec<u8>, KeyedRow> = BTreeMap::new();
        let mut n = 0usize;
        for m in messages {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            if head.is_none() {
                let (snapshot, high) = watermark(&r, 3);
                head = Some((snapshot, high, r.get(2) == Some("true")));
                continue;
            }
            n += 1;
            let row: Vec<Value> = (0..table.types.len())
                .map(|c| match r.get(c) {
                    Some(t) => text_value(table.types[c], t),
                    None => Value::Null,
                })
                .collect();
            let key = table.key_of(&row);
            rows.insert(encode_key(&key), (key, row));
        }
        let Some((Some(snapshot), high, odd)) = head else {
            return Err(SourceError::Pg {
                context,
                message: "no snapshot returned".into(),
            });
        };
        if odd || !ranges::keys_fit(&keys, &rows) {
            tracing::warn!(
                table = %table.shape.table,
                run = probe.run,
                "cannot compare with the hub: a date or timestamp key is infinite or outside years 1 to 9999, so it sorts differently at the hub"
            );
            self.probes.remove(0);
            return Ok(false);
        }
        // The same rule as for load chunks: an emitted transaction the
        // snapshot cannot see yet makes the rows older than the feed.
        if let Some(x) = self.misses_emitted(&snapshot) {
            tracing::debug!(
                xid = x,
                "probe snapshot misses an emitted transaction; retrying"
            );
            return Ok(false);
        }
        // A full read covers the range up to its first row not kept (the
        // SQL order is the encoded order, so it is the greatest key read).
        let mut covered = probe.range.clone();
        if limit.is_some_and(|l| n >= l)
            && let Some((first_not_kept, _)) = rows.pop_last()
        {
            covered.hi = Some(first_not_kept);
        }
        rows.retain(|k, _| covered.contains(k));
        tracing::debug!(
            run = probe.run,
            range = %covered,
            rows = rows.len(),
            high,
            at = self.pos.lsn,
            ?snapshot,
            "probe rows read"
        );
        self.probe_chunk = Some(ProbeChunk {
            probe,
            snapshot,
            high,
            table,
            keys,
            rows,
            covered,
        });
        Ok(true)
    }

    /// Whether the probe chunk can be answered now: the log reached its
    /// high mark (the same rule as [`Self::chunk_due`]; the mark is the end
    /// of a record, which the server reaches once it flushed it, pinged
    /// while waiting).
    pub(super) fn probe_due(&self) -> bool {
        self.txn.is_none()
            && self
                .probe_chunk
                .as_ref()
                .is_some_and(|c| self.pos.lsn >= c.high)
    }

    /// Answers the probe chunk into `answers`. The read ends after this:
    /// answers go after every change of the read. When the table's shape
    /// changed and the read already has events, nothing is answered and
    /// the chunk waits for the next read (which reports the shape first).
    pub(super) fn emit_probe(
        &mut self,
        events: bool,
        answers: &mut Vec<(usize, Entry)>,
    ) -> Result<(), SourceError> {
        let Some(chunk) = self.probe_chunk.take() else {
            return Ok(());
        };
        let i = chunk.probe.resource;
        let current = &self.tables[i].shape;
        if current.columns != chunk.table.shape.columns || current.key != chunk.table.shape.key {
            if events {
                self.probe_chunk = Some(chunk);
                return Ok(());
            }
            self.tables[i].shape = TableSchema {
                version: current.version,
                ..chunk.table.shape.clone()
            };
            self.tables[i].types = chunk.table.types.clone();
            self.shapes_dirty = true;
        }
        let Some(at) = self.probes.iter().position(|p| *p == chunk.probe) else {
            // Replaced meanwhile.
            return Ok(());
        };
        if !ranges::keys_fit(&chunk.keys, &chunk.rows) {
            tracing::warn!(
                table = %chunk.table.shape.table,
                run = chunk.probe.run,
                "cannot compare with the hub: a key changed to a value that sorts differently at the hub"
            );
            self.probes.remove(at);
            return Ok(());
        }
        tracing::debug!(
            run = chunk.probe.run,
            rows = chunk.rows.len(),
            high = chunk.high,
            at = self.pos.lsn,
            "probe answered"
        );
        let schema = self.tables[i].shape.clone();
        let mut reader = ranges::Rows(&chunk.rows);
        let mut part = Probe {
            range: chunk.covered.clone(),
            ..chunk.probe.clone()
        };
        let (entries, done) = answer(&mut part, &schema, &mut reader, &mut self.budget)?;
        answers.extend(entries.into_iter().map(|e| (i, e)));
        // Where the rest of the probe's range begins, if anything is left.
        let rest = if !done {
            Some(part.range.lo)
        } else if chunk.covered.hi != chunk.probe.range.hi {
            chunk.covered.hi.clone()
        } else {
            None
        };
        let mut p = self.probes.remove(at);
        if let Some(lo) = rest {
            // Other probes get their turn.
            p.range.lo = lo;
            self.probes.push(p);
        }
        Ok(())
    }
}
