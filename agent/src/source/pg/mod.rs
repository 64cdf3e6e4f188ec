//! PostgreSQL capture through a logical replication slot (pgoutput), with
//! lock-free re-reads of whole tables (the watermark method of Netflix's
//! DBLog) for the initial load, resyncs and repair after a lost slot, and
//! comparisons with the hub answered at exact points of the feed.
//!
//! One mechanism per module: `slot` connects the stream from the committed
//! position and repairs a lost slot; `stream` reads the log into a read's
//! changes, `change` turns each logged row change into captured changes;
//! `watermark` is the visibility rule by which `load` (re-reads in chunks)
//! and `probe` (comparisons) place rows read in a snapshot at their point
//! of the log; `table` resolves the configured tables; [`decode`], [`wire`]
//! and `ranges` are pgoutput, the replication protocol and the key order of
//! comparisons. This module holds the shared state and the blocking facade:
//! [`PgSource`] runs on a runtime of its own, and each [`Source`] call
//! blocks on it.
//!
//! The position (committed in the outbox with the batches) is JSON: the log
//! position every earlier commit is captured up to, how far into a large
//! transaction the outbox got, and the re-reads in progress with the last
//! key each has read, so all three resume after a crash.
//!
//! Invariants: positions only move forward within a run; a read that did
//! not reach the outbox is never continued: the next read starts over from
//! the committed position (a re-read that read started is asked for again),
//! and so does every read after an error that may have broken a
//! connection.

mod change;
pub mod decode;
mod load;
mod probe;
mod ranges;
pub mod setup;
mod slot;
mod stream;
mod table;
mod watermark;
pub mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::{Resync, UnixMillis};

use self::decode::{Message, SESSION_SETTINGS};
use self::load::Chunk;
use self::probe::ProbeChunk;
use self::stream::Txn;
use self::table::{Table, quoted_table, resolve};
use self::wire::{ReplConn, WireError, lsn_text, parse_lsn};
use super::probe::Budget;
use super::{LoadReport, Probe, Source, SourceError, SourceRead, SourceReport};
use crate::config::{PgConfig, ResourceConfig};

/// A re-read in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// The resource code.
    pub resource: String,
    pub id: u64,
    pub reason: String,
    /// The text of the key (or `ctid`) of the last row read; `None` before
    /// the first chunk.
    pub after: Option<Vec<String>>,
    pub rows: u64,
    /// Rows in the table when the load began (an estimate).
    pub total: u64,
    pub started_at: UnixMillis,
}

/// The capture position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Every transaction that committed before this log position is in the
    /// outbox.
    pub lsn: u64,
    /// Of the transaction whose commit record starts at `.0`, the first `.1`
    /// changes are in the outbox.
    pub partial: Option<(u64, u64)>,
    pub loads: Vec<Load>,
}

impl Position {
    fn parse(text: &str) -> Result<Option<Position>, SourceError> {
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(text)
            .map(Some)
            .map_err(|e| SourceError::bad_position(text, e))
    }
    fn text(&self) -> Result<String, SourceError> {
        serde_json::to_string(self).map_err(|source| SourceError::PositionText { source })
    }
}

/// A PostgreSQL source.
pub struct PgSource {
    // The connections, and the runtime they run on.
    cfg: PgConfig,
    pg: tokio_postgres::Config,
    rt: Option<tokio::runtime::Runtime>,
    sql: Option<tokio_postgres::Client>,
    repl: Option<ReplConn>,
    // The configured tables, as resolved in the database.
    resources: Vec<ResourceConfig>,
    tables: Vec<Table>,
    by_oid: HashMap<u32, usize>,
    shapes_dirty: bool,
    type_names: HashMap<(u32, i32), String>,
    // The stream.
    pushback: Option<Message>,
    txn: Option<Txn>,
    pos: Position,
    /// The position text the last read returned.
    last_returned: Option<String>,
    released: u64,
    last_status: Option<Instant>,
    /// When the server last was asked for its position.
    last_ping: Option<Instant>,
    alarm: Option<String>,
    backlog_cache: Option<(Instant, u64)>,
    // Re-reads.
    recent_xids: VecDeque<u32>,
    chunk: Option<Chunk>,
    requests: Vec<(usize, String)>,
    finished: BTreeMap<String, LoadReport>,
    next_id: u64,
    // Comparisons.
    /// Comparisons with the hub waiting to be answered.
    probes: Vec<Probe>,
    /// The probe being answered.
    probe_chunk: Option<ProbeChunk>,
    /// Whether a probe goes before the next load chunk (they take turns).
    probe_turn: bool,
    budget: Budget,
}

impl std::fmt::Debug for PgSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSource")
            .field("slot", &self.cfg.slot)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

/// A query failed while doing `context`.
fn pg_err(context: impl Into<String>) -> impl Fn(tokio_postgres::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::PgQuery {
        context: context.clone(),
        source,
    }
}

/// The replication connection failed while doing `context`.
fn wire_err(context: &str) -> impl Fn(WireError) -> SourceError + '_ {
    move |source| SourceError::PgStream {
        context: context.to_string(),
        source,
    }
}

/// Connects the SQL session with the settings that fix value printing.
pub(crate) async fn connect_sql(
    pg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, SourceError> {
    let (client, conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(pg_err("connecting"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    let settings: String = SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("SET {k} = '{v}';"))
        .collect();
    client
        .batch_execute(&settings)
        .await
        .map_err(pg_err("setting up the session"))?;
    Ok(client)
}

/// The parsed connection config with the password filled in.
pub(crate) fn pg_config(cfg: &PgConfig) -> Result<tokio_postgres::Config, SourceError> {
    let mut pg: tokio_postgres::Config = cfg.dsn.parse().map_err(pg_err("reading source.dsn"))?;
    if let Some(p) = &cfg.password {
        pg.password(p.as_bytes());
    }
    pg.application_name("shuyuan-agent");
    Ok(pg)
}

impl PgSource {
    /// Opens the source: checks the connection, the tables and the slot.
    pub fn open(cfg: &PgConfig, resources: &[ResourceConfig]) -> Result<PgSource, SourceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| SourceError::PgRuntime { source })?;
        let mut source = PgSource {
            cfg: cfg.clone(),
            pg: pg_config(cfg)?,
            rt: None,
            sql: None,
            repl: None,
            resources: resources.to_vec(),
            tables: Vec::new(),
            by_oid: HashMap::new(),
            shapes_dirty: true,
            pushback: None,
            txn: None,
            pos: Position::default(),
            last_returned: None,
            recent_xids: VecDeque::new(),
            chunk: None,
            requests: Vec::new(),
            released: 0,
            last_status: None,
            last_ping: None,
            alarm: None,
            finished: BTreeMap::new(),
            type_names: HashMap::new(),
            backlog_cache: None,
            next_id: 0,
            probes: Vec::new(),
            probe_chunk: None,
            probe_turn: true,
            budget: Budget::new(200_000),
        };
        // Fail early on what an operator must fix (no database, no table, no
        // key); the slot is checked on the first read.
        // (On a thread of its own: the caller may be inside a runtime.)
        let checked = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let r = rt.block_on(source.ensure_sql());
                    (r, source, rt)
                })
                .join()
        });
        let (result, mut source, rt) = checked.map_err(|_| SourceError::Pg {
            context: "opening the source".into(),
            message: "the connection check panicked".into(),
        })?;
        result?;
        source.rt = Some(rt);
        Ok(source)
    }

    /// Rows per second comparisons with the hub may read
    /// (`[verify] rows_per_second`).
    pub fn with_probe_rate(mut self, rows_per_second: u64) -> Self {
        self.budget = Budget::new(rows_per_second);
        self
    }

    fn run<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut Self) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let Some(rt) = self.rt.take() else {
            return Err(SourceError::Pg {
                context: "running the PostgreSQL client".into(),
                message: "its runtime was lost by an earlier failure".into(),
            });
        };
        let out = rt.block_on(f(self));
        self.rt = Some(rt);
        if let Err(e) = &out
            && e.is_transient()
        {
            // The connection may be broken: start over from the committed
            // position on the next read.
            self.sql = None;
            self.repl = None;
            self.last_returned = None;
        }
        out
    }

    async fn ensure_sql(&mut self) -> Result<(), SourceError> {
        if self.sql.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        let sql = connect_sql(&self.pg).await?;
        let mut tables = Vec::new();
        for r in &self.resources {
            tables.push(resolve(&sql, r).await?);
        }
        if self.tables.is_empty() || self.tables.iter().zip(&tables).any(|(a, b)| a.oid != b.oid) {
            self.by_oid = tables.iter().enumerate().map(|(i, t)| (t.oid, i)).collect();
            self.tables = tables;
            self.shapes_dirty = true;
        }
        self.sql = Some(sql);
        Ok(())
    }

    fn sql(&self) -> Result<&tokio_postgres::Client, SourceError> {
        self.sql.as_ref().ok_or_else(|| SourceError::Pg {
            context: "using the SQL connection".into(),
            message: "not connected".into(),
        })
    }

    fn new_id(&mut self) -> u64 {
        let now = u64::try_from(UnixMillis::now().0).unwrap_or(0);
        self.next_id = now.max(self.next_id + 1);
        self.next_id
    }
}

/// A resync mark placed before the change at an index of the read.
pub type Mark = (usize, usize, Resync);

impl Source for PgSource {
    fn describe(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        format!(
            "PostgreSQL {host}:{}/{} slot {} publication {}",
            self.pg.get_ports().first().copied().unwrap_or(5432),
            self.pg.get_dbname().unwrap_or("postgres"),
            self.cfg.slot,
            self.cfg.publication
        )
    }

    fn read(&mut self, after: &str, limit: usize) -> Result<SourceRead, SourceError> {
        if self.last_returned.as_deref() != Some(after) {
            // First read, or the last read was not committed: start over
            // from the committed position.
            self.repl = None;
            self.txn = None;
            self.pushback = None;
            self.chunk = None;
            self.probe_chunk = None;
            let committed = Position::parse(after)?.unwrap_or_default();
            // A re-read started by a read that never reached the outbox
            // (a request, or a column added with a default) is asked for
            // again: the request was taken by that read.
            for lost in self
                .pos
                .loads
                .iter()
                .filter(|l| !committed.loads.iter().any(|c| c.id == l.id))
            {
                if let Some(i) = self
                    .resources
                    .iter()
                    .position(|r| r.code.as_str() == lost.resource)
                    && !self.requests.iter().any(|(r, _)| *r == i)
                    && !after.is_empty()
                {
                    self.requests.push((i, lost.reason.clone()));
                }
            }
            self.pos = committed;
        }
        let fresh = after.is_empty() && self.last_returned.is_none();
        let read = match self.run(async |s| s.read_async(fresh, limit).await) {
            Ok(read) => read,
            Err(e) => {
                // A read that failed part way has consumed messages (and
                // moved the in-memory position past them) that reach no
                // commit: the next read starts over from the committed
                // position, whatever the error.
                self.last_returned = None;
                return Err(e);
            }
        };
        self.last_returned = Some(read.position.clone());
        Ok(read)
    }

    fn release(&mut self, upto: &str) -> Result<(), SourceError> {
        let Some(p) = Position::parse(upto)? else {
            return Ok(());
        };
        // Inside a cut transaction, `lsn` is still before it: the slot
        // moves only over whole transactions.
        let lsn = p.lsn;
        if lsn <= self.released {
            return Ok(());
        }
        self.released = lsn;
        self.run(async |s| {
            if let Some(repl) = s.repl.as_mut() {
                repl.status(lsn, false)
                    .await
                    .map_err(wire_err("reporting the position"))?;
                s.last_status = Some(Instant::now());
            }
            Ok(())
        })
    }

    /// WAL bytes between the captured position and the server's current
    /// position (refreshed at most once a second).
    fn backlog(&mut self, after: &str) -> Result<u64, SourceError> {
        if let Some((at, v)) = self.backlog_cache
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(v);
        }
        let lsn = Position::parse(after)?.map_or(0, |p| p.lsn);
        let v = self.run(async |s| {
            s.ensure_sql().await?;
            let cur: String = s
                .sql()?
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(pg_err("reading the WAL position"))?
                .get(0);
            Ok(parse_lsn(&cur).unwrap_or(0).saturating_sub(lsn))
        })?;
        self.backlog_cache = Some((Instant::now(), v));
        Ok(v)
    }

    fn report(&self, position: &str) -> SourceReport {
        let pos = Position::parse(position).ok().flatten().unwrap_or_default();
        SourceReport {
            position: if position.is_empty() {
                "not started".into()
            } else {
                lsn_text(pos.lsn)
            },
            alarm: self.alarm.clone(),
            loads: pos
                .loads
                .iter()
                .map(|l| LoadReport {
                    resource: l.resource.clone(),
                    id: l.id,
                    reason: l.reason.clone(),
                    rows: l.rows,
                    total: l.total,
                    started_at: l.started_at,
                    finished_at: None,
                })
                .collect(),
            finished: self.finished.values().cloned().collect(),
            backlog_unit: "WAL bytes",
        }
    }

    fn waits_for_changes(&self) -> bool {
        true
    }

    fn request_resync(&mut self, resource: usize, reason: String) -> Result<(), SourceError> {
        self.requests.push((resource, reason));
        Ok(())
    }

    /// Queues a comparison; it is answered at an exact point of the log
    /// (see `take_probe`). Refused for tables whose keys sort
    /// differently in PostgreSQL than at the hub.
    fn probe(&mut self, probe: Probe) -> Result<(), SourceError> {
        let Some(table) = self.tables.get(probe.resource) else {
            return Err(SourceError::Unsupported(format!(
                "no resource number {}",
                probe.resource
            )));
        };
        let keys = ranges::key_cols(table)?;
        ranges::check_range(table, &keys, &probe.range)?;
        let same = |p: &Probe| {
            p.resource == probe.resource && p.run == probe.run && p.range.hi == probe.range.hi
        };
        self.probes.retain(|p| !same(p));
        if self.probe_chunk.as_ref().is_some_and(|c| same(&c.probe)) {
            self.probe_chunk = None;
        }
        self.probes.push(probe);
        Ok(())
    }
}
