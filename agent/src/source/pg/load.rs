//! Re-reads of whole tables (the initial load, resyncs, repair after a lost
//! slot) in chunks, without locking the table.
//!
//! A chunk of rows after the last key is selected in a REPEATABLE READ
//! snapshot that also records the WAL position `H` (see `watermark`).
//! While the log is read up to `H`, rows of the chunk written by
//! transactions the snapshot cannot see are dropped from the chunk (the log
//! carries their newer state); at `H` the rest of the chunk is emitted.
//! Every synchronously committed transaction the snapshot sees was flushed
//! before `H`; one committed asynchronously may be visible yet after `H`,
//! and is then applied again after the chunk, in commit order, which ends
//! in the same state. Every transaction after `H` the snapshot cannot see.
//!
//! Invariant: the shared copy never goes back in time: a chunk is emitted
//! only when the log reached `H`, and a chunk taken while an already
//! emitted transaction is not yet visible is discarded and taken again. A
//! re-read's progress (the last key read) is part of the position, so it
//! resumes after a crash.

use std::collections::BTreeMap;

use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{Op, Resync, TableSchema, UnixMillis, Value};
use tokio_postgres::SimpleQueryMessage;

use super::decode::{literal, text_value};
use super::table::{Table, quote_ident, resolve};
use super::watermark::{Snapshot, watermark};
use super::{Load, Mark, PgSource, pg_err};
use crate::source::{Captured, LoadReport, SourceError};

/// A chunk read for a re-read, waiting for the log to reach `high`.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) resource: usize,
    snapshot: Snapshot,
    pub(super) high: u64,
    table: Table,
    /// encoded key -> (key, row)
    rows: BTreeMap<Vec<u8>, (Vec<Value>, Vec<Value>)>,
    last: Option<Vec<String>>,
    /// The chunk was full: more rows may follow.
    full: bool,
}

impl Chunk {
    /// Drops the rows a change of resource `resource` by transaction `xid`
    /// wrote, if the snapshot cannot see it: the log carries their newer
    /// state.
    pub(super) fn drop_unseen(&mut self, resource: usize, xid: u32, changes: &[Captured]) {
        if self.resource == resource && !self.snapshot.sees(xid) {
            for c in changes {
                self.rows.remove(&encode_key(&c.key));
            }
        }
    }
}

impl PgSource {
    /// Starts a re-read of resource `i` (or restarts it).
    pub(super) async fn start_load(
        &mut self,
        i: usize,
        reason: String,
        marks: &mut Vec<Mark>,
    ) -> Result<(), SourceError> {
        let code = self.resources[i].code.to_string();
        let total = self.estimate_rows(i).await?;
        let id = self.new_id();
        self.pos.loads.retain(|l| l.resource != code);
        if self.chunk.as_ref().is_some_and(|c| c.resource == i) {
            self.chunk = None;
        }
        tracing::info!(resource = %code, id, %reason, total, "re-reading the table");
        // Loads start between transactions, before this read's changes.
        marks.push((
            0,
            i,
            Resync::Begin {
                id,
                reason: reason.clone(),
            },
        ));
        self.pos.loads.push(Load {
            resource: code,
            id,
            reason,
            after: None,
            rows: 0,
            total,
            started_at: UnixMillis::now(),
        });
        Ok(())
    }

    async fn estimate_rows(&self, i: usize) -> Result<u64, SourceError> {
        let e = pg_err(format!(
            "estimating the size of table {}",
            self.resources[i].table
        ));
        let est: f32 = self
            .sql()?
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = $1::int8::oid",
                &[&i64::from(self.tables[i].oid)],
            )
            .await
            .map_err(&e)?
            .get(0);
        if est > 0.0 {
            return Ok(est as u64);
        }
        let n: i64 = self
            .sql()?
            .query_one(
                &format!("SELECT count(*) FROM {}", self.tables[i].sql_name),
                &[],
            )
            .await
            .map_err(&e)?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Takes the next chunk of the first load, unless a transaction is open.
    pub(super) async fn take_chunk(&mut self) -> Result<(), SourceError> {
        if self.chunk.is_some() || self.txn.is_some() || self.pushback.is_some() {
            return Ok(());
        }
        let Some(load) = self.pos.loads.first().cloned() else {
            return Ok(());
        };
        let Some(i) = self
            .resources
            .iter()
            .position(|r| r.code.as_str() == load.resource)
        else {
            // A resource removed from the config: forget its load.
            self.pos.loads.remove(0);
            return Ok(());
        };
        let sql = self.sql()?;
        // The table as it is now (the snapshot below reads it so).
        let mut table = resolve(sql, &self.resources[i]).await?;
        table.shape.version = self.tables[i].shape.version;
        let cols = table.quoted_columns();
        let (order, bound_cols): (String, Vec<String>) = if table.whole_row {
            ("ctid".into(), vec!["ctid".into()])
        } else {
            let k: Vec<String> = table
                .shape
                .key
                .iter()
                .map(|&k| quote_ident(&table.shape.columns[usize::from(k)].name))
                .collect();
            (k.join(", "), k)
        };
        let bound_types: Vec<String> = if table.whole_row {
            vec!["tid".into()]
        } else {
            table
                .shape
                .key
                .iter()
                .map(|&k| table.shape.columns[usize::from(k)].sql_type.clone())
                .collect()
        };
        let filter = match &load.after {
            Some(after) => format!(
                "WHERE ({}) > ({})",
                bound_cols.join(", "),
                after
                    .iter()
                    .zip(&bound_types)
                    .map(|(t, ty)| literal(t, ty))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        };
        let select = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SELECT txid_current_snapshot()::text, pg_current_wal_insert_lsn()::text, \
             current_setting('wal_block_size'), pg_size_bytes(current_setting('wal_segment_size'))::text; \
             SELECT {}, {} FROM {} {filter} ORDER BY {order} LIMIT {}; COMMIT;",
            bound_cols.join(", "),
            cols.join(", "),
            table.sql_name,
            self.cfg.chunk_size
        );
        let context = format!("reading a chunk of table {}", self.resources[i].table);
        let messages = sql
            .simple_query(&select)
            .await
            .map_err(pg_err(context.as_str()))?;
        let mut snapshot = None;
        let mut high = 0;
        let mut rows = BTreeMap::new();
        let mut last = None;
        let mut n = 0usize;
        let width = bound_cols.len();
        for m in messages {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            if snapshot.is_none() {
                (snapshot, high) = watermark(&r, 2);
                continue;
            }
            n += 1;
            let bound: Vec<String> = (0..width)
                .map(|c| r.get(c).unwrap_or_default().to_string())
                .collect();
            let row: Vec<Value> = (0..table.types.len())
                .map(|c| match r.get(width + c) {
                    Some(t) => text_value(table.types[c], t),
                    None => Value::Null,
                })
                .collect();
            let key = table.key_of(&row);
            rows.insert(encode_key(&key), (key, row));
            last = Some(bound);
        }
        let snapshot = snapshot.ok_or_else(|| SourceError::Pg {
            context,
            message: "no snapshot returned".into(),
        })?;
        // An emitted transaction the snapshot cannot see yet (its commit is
        // in the log, it is not visible yet): the chunk may be older than
        // what was sent. Take it again later.
        if let Some(x) = self.misses_emitted(&snapshot) {
            tracing::debug!(
                xid = x,
                "chunk snapshot misses an emitted transaction; retrying"
            );
            return Ok(());
        }
        tracing::debug!(
            resource = i,
            ?snapshot,
            high,
            at = self.pos.lsn,
            rows = rows.len(),
            after = ?load.after,
            "chunk read"
        );
        self.chunk = Some(Chunk {
            resource: i,
            snapshot,
            high,
            table,
            rows,
            last: last.or(load.after),
            full: n >= self.cfg.chunk_size,
        });
        Ok(())
    }

    /// Whether the chunk can be emitted now: the log reached its high mark,
    /// the end of the last record written when the snapshot was taken.
    /// Never because the server's position stayed put a while: a busy
    /// walsender can pause with commits before the mark still unsent, and
    /// emitting then would put the chunk (and its shape) before them.
    pub(super) fn chunk_due(&self) -> bool {
        self.txn.is_none() && self.chunk.as_ref().is_some_and(|c| self.pos.lsn >= c.high)
    }

    /// Emits the pending chunk. Returns false (emitting nothing) when the
    /// table's shape changed and this read already has events: the shape
    /// must open the next read.
    pub(super) fn emit_chunk(&mut self, out: &mut Vec<Captured>, marks: &mut Vec<Mark>) -> bool {
        let Some(chunk) = self.chunk.take() else {
            return true;
        };
        tracing::debug!(
            rows = chunk.rows.len(),
            high = chunk.high,
            at = self.pos.lsn,
            "chunk emitted"
        );
        let i = chunk.resource;
        let current = &self.tables[i].shape;
        let same =
            current.columns == chunk.table.shape.columns && current.key == chunk.table.shape.key;
        if !same {
            if !out.is_empty() || !marks.is_empty() {
                self.chunk = Some(chunk);
                return false;
            }
            self.tables[i].shape = TableSchema {
                version: current.version,
                ..chunk.table.shape.clone()
            };
            self.tables[i].types = chunk.table.types.clone();
            self.shapes_dirty = true;
        }
        let n = chunk.rows.len() as u64;
        for (_, (key, row)) in chunk.rows {
            out.push(Captured {
                resource: i,
                op: Op::Insert,
                key,
                row: Some(row),
            });
        }
        let code = self.resources[i].code.to_string();
        if let Some(li) = self.pos.loads.iter().position(|l| l.resource == code) {
            let load = &mut self.pos.loads[li];
            load.rows += n;
            load.after = chunk.last;
            if !chunk.full {
                let load = self.pos.loads.remove(li);
                tracing::info!(resource = %code, rows = load.rows, "re-read finished");
                marks.push((
                    out.len(),
                    i,
                    Resync::End {
                        id: load.id,
                        rows: load.rows,
                    },
                ));
                self.finished.insert(
                    code.clone(),
                    LoadReport {
                        resource: code,
                        id: load.id,
                        reason: load.reason,
                        rows: load.rows,
                        total: load.total,
                        started_at: load.started_at,
                        finished_at: Some(UnixMillis::now()),
                    },
                );
            }
        }
        true
    }

    /// A TRUNCATE of resource `i` at index `at` of the read: an empty
    /// re-read tells the hub, and a running re-read of the table starts
    /// over.
    pub(super) fn truncated(&mut self, i: usize, at: usize, marks: &mut Vec<Mark>) {
        let id = self.new_id();
        marks.push((
            at,
            i,
            Resync::Begin {
                id,
                reason: "TRUNCATE at the source".into(),
            },
        ));
        marks.push((at, i, Resync::End { id, rows: 0 }));
        let code = self.resources[i].code.to_string();
        if let Some(l) = self.pos.loads.iter_mut().find(|l| l.resource == code) {
            // Start the running re-read over after the truncate.
            l.after = None;
            l.rows = 0;
            marks.push((
                at,
                i,
                Resync::Begin {
                    id: l.id,
                    reason: l.reason.clone(),
                },
            ));
            if self.chunk.as_ref().is_some_and(|c| c.resource == i) {
                self.chunk = None;
            }
        }
    }
}
