//! The log stream: `START_REPLICATION` on the agent's slot from the
//! committed position; each transaction arrives whole at its commit, and
//! one read takes what arrived, with the re-read chunks and probe answers
//! whose points of the log it passed.
//!
//! The slot's confirmed position is moved (a standby status update) only
//! by [`Source::release`](crate::source::Source::release), which the
//! capture loop calls after the outbox transaction holding the changes
//! committed, so a crash neither loses nor skips a change, and WAL is kept
//! no longer than that.
//!
//! Invariants: a read is cut only between messages (a very large
//! transaction is cut between its changes, and the position says how far
//! into it the outbox got), and a shape change ends a read so that shapes
//! are reported before the rows that use them.

use std::time::{Duration, Instant};

use shuyuan_protocol::{Column, Entry, Op, TableSchema};

use super::decode::{self, Message, Relation};
use super::table::key_indexes;
use super::wire::Replication;
use super::{Mark, PgSource, pg_err, wire_err};
use crate::source::{Captured, SourceError, SourceRead};

/// How long a read keeps draining once messages flow, before returning.
const DRAIN_GAP: Duration = Duration::from_millis(2);
/// The longest time between two status updates to the server.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The transaction being received.
#[derive(Debug)]
pub(super) struct Txn {
    pub(super) final_lsn: u64,
    pub(super) xid: u32,
    /// Changes of shared tables seen so far.
    pub(super) seen: u64,
    /// Changes already in the outbox (after a restart inside it).
    pub(super) skip: u64,
}

impl PgSource {
    /// The shape a Relation message describes, or None if it is not shared.
    async fn relation_shape(
        &mut self,
        rel: &Relation,
    ) -> Result<Option<(usize, TableSchema, Vec<u32>)>, SourceError> {
        let Some(&i) = self.by_oid.get(&rel.oid) else {
            return Ok(None);
        };
        let current = self.tables[i].shape.clone();
        let mut columns = Vec::new();
        let mut types = Vec::new();
        for (name, ty, typmod, _) in &rel.columns {
            let sql_type = match self.type_names.get(&(*ty, *typmod)) {
                Some(t) => t.clone(),
                None => {
                    let t: String = self
                        .sql()?
                        .query_one(
                            "SELECT format_type($1::int8::oid, $2)",
                            &[&i64::from(*ty), typmod],
                        )
                        .await
                        .map_err(pg_err("naming a column type"))?
                        .get(0);
                    self.type_names.insert((*ty, *typmod), t.clone());
                    t
                }
            };
            let nullable = current
                .columns
                .iter()
                .find(|c| &c.name == name)
                .is_none_or(|c| c.nullable);
            columns.push(Column {
                name: name.clone(),
                sql_type,
                nullable,
            });
            types.push(*ty);
        }
        let key_names: Vec<String> = if self.tables[i].whole_row {
            columns.iter().map(|c| c.name.clone()).collect()
        } else {
            current
                .key
                .iter()
                .map(|&k| current.columns[usize::from(k)].name.clone())
                .collect()
        };
        let key = key_indexes(&self.resources[i].table, &columns, &key_names)?;
        Ok(Some((
            i,
            TableSchema {
                version: current.version,
                table: current.table.clone(),
                columns,
                key,
            },
            types,
        )))
    }

    /// Rows that existed before `ADD COLUMN ... DEFAULT` have the default,
    /// but the log never says so: re-read the table.
    async fn reread_if_defaulted(
        &mut self,
        i: usize,
        added: Vec<String>,
    ) -> Result<(), SourceError> {
        let defaulted: Vec<String> = self
            .sql()?
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::int8::oid \
                 AND attname::text = ANY($2) AND (atthasdef OR atthasmissing)",
                &[&i64::from(self.tables[i].oid), &added],
            )
            .await
            .map_err(pg_err(format!(
                "reading added columns of table {}",
                self.resources[i].table
            )))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !defaulted.is_empty() {
            let reason = format!(
                "column {} added with a default: re-reading the rows that existed before",
                defaulted.join(", ")
            );
            tracing::info!(table = %self.resources[i].table, %reason);
            self.requests.push((i, reason));
        }
        Ok(())
    }

    /// Takes a Relation message in: a changed shape of a shared table is
    /// adopted, unless the read already has events (`events`): then the
    /// message waits for the next read, which reports the shape first, and
    /// this returns false (the read ends).
    async fn relation(&mut self, rel: Relation, events: bool) -> Result<bool, SourceError> {
        if let Some((i, shape, types)) = self.relation_shape(&rel).await? {
            let t = &self.tables[i];
            if t.shape.columns != shape.columns || t.shape.key != shape.key {
                if events {
                    self.pushback = Some(Message::Relation(rel));
                    return Ok(false);
                }
                tracing::info!(table = %t.shape.table, "table shape changed in the log");
                let added: Vec<String> = shape
                    .columns
                    .iter()
                    .filter(|c| !t.shape.columns.iter().any(|o| o.name == c.name))
                    .map(|c| c.name.clone())
                    .collect();
                if !added.is_empty() {
                    self.reread_if_defaulted(i, added).await?;
                }
                self.tables[i].shape = shape;
                self.tables[i].types = types;
                self.shapes_dirty = true;
                if self
                    .probe_chunk
                    .as_ref()
                    .is_some_and(|c| c.probe.resource == i)
                {
                    // Read under another shape: read it again.
                    self.probe_chunk = None;
                }
            }
        }
        Ok(true)
    }

    /// One read (see [`Source::read`]).
    pub(super) async fn read_async(
        &mut self,
        fresh: bool,
        limit: usize,
    ) -> Result<SourceRead, SourceError> {
        let mut out: Vec<Captured> = Vec::new();
        let mut marks: Vec<Mark> = Vec::new();
        self.ensure_stream(fresh, &mut marks).await?;
        // Requested re-reads start here, between transactions.
        if self.txn.is_none() {
            for (i, reason) in std::mem::take(&mut self.requests) {
                self.start_load(i, reason, &mut marks).await?;
            }
        }
        let mut complete = false;
        let mut wait = self.cfg.poll_interval;
        let started = Instant::now();
        let mut answers: Vec<(usize, Entry)> = Vec::new();
        loop {
            if out.len() >= limit && self.txn.is_none() {
                break;
            }
            // While the log flows, hand over what arrived at least every
            // poll interval: a read is sealed and sent as a whole, so a long
            // read would be lag.
            if self.txn.is_none() && !out.is_empty() && started.elapsed() >= self.cfg.poll_interval
            {
                break;
            }
            if self.chunk_due() && !self.emit_chunk(&mut out, &mut marks) {
                break;
            }
            if self.probe_due() {
                // Answers end the read: they go after all of its changes.
                self.emit_probe(!out.is_empty() || !marks.is_empty(), &mut answers)?;
                break;
            }
            if self.chunk.is_none() && self.probe_chunk.is_none() && out.len() < limit {
                // Load chunks and probes take turns.
                let mut taken = false;
                if !self.probes.is_empty() && (self.probe_turn || self.pos.loads.is_empty()) {
                    taken = self.take_probe().await?;
                    if taken {
                        self.probe_turn = false;
                    }
                }
                if !taken && !self.pos.loads.is_empty() {
                    self.take_chunk().await?;
                    if self.chunk.is_some() {
                        self.probe_turn = true;
                    }
                }
                if self.chunk_due() || self.probe_due() {
                    continue;
                }
            }
            let due = self.last_status.is_none_or(|t| t.elapsed() >= STATUS_EVERY);
            // Ask the server where it is while a chunk waits for the log,
            // at most once a poll interval.
            let want_reply = (self.chunk.as_ref().is_some_and(|c| self.pos.lsn < c.high)
                || self
                    .probe_chunk
                    .as_ref()
                    .is_some_and(|c| self.pos.lsn < c.high))
                && self
                    .last_ping
                    .is_none_or(|t| t.elapsed() >= self.cfg.poll_interval);
            let Some(repl) = self.repl.as_mut() else {
                return Err(SourceError::Pg {
                    context: "reading the log".into(),
                    message: "the replication connection is not open".into(),
                });
            };
            if due || want_reply {
                repl.status(self.released, want_reply)
                    .await
                    .map_err(wire_err("reporting the position"))?;
                self.last_status = Some(Instant::now());
                if want_reply {
                    self.last_ping = self.last_status;
                }
            }
            let msg = match self.pushback.take() {
                Some(m) => m,
                None => match tokio::time::timeout(wait, repl.recv()).await {
                    Err(_) => {
                        if self.chunk_due() || self.probe_due() {
                            continue;
                        }
                        complete = self.txn.is_none();
                        break;
                    }
                    Ok(r) => match r.map_err(wire_err("reading the log"))? {
                        Replication::Keepalive { wal_end, reply } => {
                            tracing::debug!(
                                wal_end,
                                at = self.pos.lsn,
                                open = self.txn.is_some(),
                                "keepalive"
                            );
                            if self.txn.is_none() && wal_end > self.pos.lsn {
                                self.pos.lsn = wal_end;
                                // A cut transaction whose commit is still
                                // ahead (after a restart, the server has not
                                // sent it again yet) keeps its count.
                                if self.pos.partial.is_some_and(|(f, _)| wal_end > f) {
                                    self.pos.partial = None;
                                }
                            }
                            if reply {
                                repl.status(self.released, false)
                                    .await
                                    .map_err(wire_err("reporting the position"))?;
                                self.last_status = Some(Instant::now());
                            }
                            continue;
                        }
                        Replication::XLogData { start, data } => {
                            wait = DRAIN_GAP;
                            decode::parse(&data)
                                .map_err(|source| SourceError::PgDecode { at: start, source })?
                        }
                    },
                },
            };
            match msg {
                Message::Begin { final_lsn, xid } => {
                    if self
                        .probe_chunk
                        .as_ref()
                        .is_some_and(|c| final_lsn >= c.high)
                    {
                        // Everything the probe's snapshot saw is before this.
                        self.pushback = Some(Message::Begin { final_lsn, xid });
                        self.emit_probe(!out.is_empty() || !marks.is_empty(), &mut answers)?;
                        break;
                    }
                    if self.chunk.as_ref().is_some_and(|c| final_lsn >= c.high) {
                        // Everything the chunk's snapshot saw is before this.
                        if !self.emit_chunk(&mut out, &mut marks) {
                            self.pushback = Some(Message::Begin { final_lsn, xid });
                            break;
                        }
                    }
                    let skip = if final_lsn < self.pos.lsn {
                        u64::MAX
                    } else {
                        match self.pos.partial {
                            Some((f, n)) if f == final_lsn => n,
                            _ => 0,
                        }
                    };
                    tracing::debug!(xid, final_lsn, at = self.pos.lsn, skip, "begin");
                    self.txn = Some(Txn {
                        final_lsn,
                        xid,
                        seen: 0,
                        skip,
                    });
                }
                Message::Commit { end_lsn } => {
                    if let Some(t) = self.txn.take()
                        && t.seen > 0
                        && t.skip != u64::MAX
                    {
                        self.emitted(t.xid);
                    }
                    if end_lsn > self.pos.lsn {
                        self.pos.lsn = end_lsn;
                    }
                    self.pos.partial = None;
                }
                Message::Relation(rel) => {
                    if !self
                        .relation(rel, !out.is_empty() || !marks.is_empty())
                        .await?
                    {
                        break;
                    }
                }
                Message::Insert { rel, new } => {
                    self.change(Op::Insert, rel, None, Some(new), &mut out)
                        .await?;
                }
                Message::Update { rel, old, new } => {
                    self.change(Op::Update, rel, old, Some(new), &mut out)
                        .await?;
                }
                Message::Delete { rel, old } => {
                    self.change(Op::Delete, rel, Some(old), None, &mut out)
                        .await?;
                }
                Message::Truncate { rels } => {
                    let skip = self.txn.as_mut().is_some_and(|t| {
                        t.seen += 1;
                        t.seen <= t.skip
                    });
                    if !skip {
                        for rel in rels {
                            let Some(&i) = self.by_oid.get(&rel) else {
                                continue;
                            };
                            if self
                                .probe_chunk
                                .as_ref()
                                .is_some_and(|c| c.probe.resource == i)
                            {
                                // Read it again after the truncate.
                                self.probe_chunk = None;
                            }
                            self.truncated(i, out.len(), &mut marks);
                        }
                    }
                }
                Message::Other(_) => {}
            }
            // A very large transaction is cut (the position says how far
            // into it the outbox got: see below).
            if out.len() >= limit && self.txn.as_ref().is_some_and(|t| t.seen > t.skip) {
                break;
            }
        }
        // Whatever ended the read inside a transaction (its size, a pause
        // in the log, a shape change), its first `seen` changes are in this
        // read or an earlier one: after a restart they are not sent again.
        if let Some(t) = &self.txn
            && t.seen > t.skip
        {
            self.pos.partial = Some((t.final_lsn, t.seen));
        }
        let shapes = if self.shapes_dirty {
            self.shapes_dirty = false;
            Some(self.tables.iter().map(|t| t.shape.clone()).collect())
        } else {
            None
        };
        Ok(SourceRead {
            shapes,
            changes: out,
            marks,
            position: self.pos.text()?,
            complete,
            skipped_null_keys: 0,
            probes: answers,
            probes_pending: !self.probes.is_empty(),
        })
    }
}
