//! PostgreSQL capture through a logical replication slot (pgoutput), with
//! lock-free re-reads of whole tables (the watermark method of Netflix's
//! DBLog) for the initial load, resyncs and repair after a lost slot.
//!
//! The stream: `START_REPLICATION` on the agent's slot from the committed
//! position; each transaction arrives whole at its commit. The slot's
//! confirmed position is moved (a standby status update) only by
//! [`Source::release`], which the capture loop calls after the outbox
//! transaction holding the changes committed, so a crash neither loses nor
//! skips a change, and WAL is kept no longer than that.
//!
//! The position (committed in the outbox with the batches) is JSON: the log
//! position every earlier commit is captured up to, how far into a large
//! transaction the outbox got, and the re-reads in progress with the last
//! key each has read, so all three resume after a crash.
//!
//! Re-reads: a chunk of rows after the last key is selected in a REPEATABLE
//! READ snapshot that also records the flushed WAL position `H`. While the
//! log is read up to `H`, rows of the chunk written by transactions the
//! snapshot cannot see are dropped from the chunk (the log carries their
//! newer state); at `H` the rest of the chunk is emitted. Every
//! synchronously committed transaction the snapshot sees was flushed before
//! `H`; one committed asynchronously may be visible yet after `H`, and is
//! then applied again after the chunk, in commit order, which ends in the
//! same state. Every transaction after `H` the snapshot cannot see. So the
//! shared copy never goes back in time. When the server's position stays
//! put short of `H` for a poll interval (its last flushed record is not
//! complete yet), it has sent everything before `H` and the chunk is
//! emitted. A chunk taken while an already emitted transaction is not yet
//! visible (commit written, not yet visible) is discarded and taken again.
//!
//! Comparisons with the hub (probes) reuse the method: the rows of the
//! probe's key range are read in a REPEATABLE READ snapshot with the WAL
//! insert position `H` (every commit the snapshot sees was written before
//! it, whether committed synchronously or not). While the log is read up to
//! `H`, changes in the range by transactions the snapshot cannot see are
//! applied to those rows (an insert or update replaces the row, a delete
//! removes it); when the log reaches `H` (only then: a pause of the server
//! is no proof for an answer) the answer is computed from them and placed
//! after the read's changes, and the read ends there. So the answer is the
//! source's range exactly at its point of the feed. The same retake rule
//! holds, and only keys that sort in SQL as their encoded bytes do are
//! compared (see `ranges`).
//!
//! Invariants: positions only move forward within a run; a read is cut
//! only between messages, and a shape change ends a read so that shapes are
//! reported before the rows that use them; a lost slot is never continued
//! silently: the agent recreates it and re-reads every resource, and the
//! hub is told why in the feed.

pub mod decode;
mod ranges;
pub mod setup;
pub mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::message::VerifyMode;
use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{Column, Entry, KeyRange, Op, Resync, TableSchema, UnixMillis, Value};
use tokio_postgres::SimpleQueryMessage;

use self::decode::{Datum, Message, Relation, SESSION_SETTINGS, literal, text_value};
use self::wire::{ReplConn, Replication, WireError, lsn_text, parse_lsn};
use super::probe::{self, Budget, KeyedRow};
use super::{Captured, LoadReport, Probe, Source, SourceError, SourceRead, SourceReport};
use crate::config::{PgConfig, ResourceConfig};

/// How long a read keeps draining once messages flow, before returning.
const DRAIN_GAP: Duration = Duration::from_millis(2);
/// The longest time between two status updates to the server.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Emitted transactions remembered for the visibility check of new chunks.
const RECENT_XIDS: usize = 8192;

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
            .map_err(|_| SourceError::BadPosition(text.to_string()))
    }
    fn text(&self) -> Result<String, SourceError> {
        serde_json::to_string(self).map_err(|e| SourceError::BadPosition(e.to_string()))
    }
}

/// One shared table as resolved in the database.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) oid: u32,
    /// `schema.table`, quoted for SQL.
    sql_name: String,
    shape: TableSchema,
    types: Vec<u32>,
    /// Without a key of its own the table is read in `ctid` order and its
    /// rows are addressed by their whole content.
    whole_row: bool,
    /// REPLICA IDENTITY FULL: updates and deletes carry the whole old row.
    full_identity: bool,
}

impl Table {
    fn key_of(&self, row: &[Value]) -> Vec<Value> {
        self.shape.key_of(row)
    }
}

/// The transaction being received.
#[derive(Debug)]
struct Txn {
    final_lsn: u64,
    xid: u32,
    /// Changes of shared tables seen so far.
    seen: u64,
    /// Changes already in the outbox (after a restart inside it).
    skip: u64,
}

/// A transaction snapshot: `xmin:xmax:xip,...` (64-bit transaction ids).
#[derive(Debug, Clone)]
struct Snapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether a transaction (32-bit id from the log) had committed, visibly,
    /// when the snapshot was taken.
    ///
    /// The log's id is widened to the 64-bit id nearest `xmax`: a live
    /// transaction is within 2^31 of it on either side. `xmax` is one past
    /// the latest *completed* transaction, so a transaction still running
    /// (or committing) when the snapshot was taken can have a larger id in
    /// the same epoch; such an id is not seen, and must not be mistaken for
    /// one of the previous epoch.
    fn sees(&self, xid: u32) -> bool {
        const HALF: u64 = 1 << 31;
        const EPOCH: u64 = 1 << 32;
        let mut x = (self.xmax & !(EPOCH - 1)) | u64::from(xid);
        if x > self.xmax.saturating_add(HALF) && x >= EPOCH {
            x -= EPOCH;
        } else if x.saturating_add(HALF) < self.xmax {
            x += EPOCH;
        }
        x < self.xmin || (x < self.xmax && !self.xip.contains(&x))
    }
}

/// A chunk read for a re-read, waiting for the log to reach `high`.
#[derive(Debug)]
struct Chunk {
    resource: usize,
    snapshot: Snapshot,
    high: u64,
    table: Table,
    /// encoded key -> (key, row)
    rows: BTreeMap<Vec<u8>, (Vec<Value>, Vec<Value>)>,
    last: Option<Vec<String>>,
    /// The chunk was full: more rows may follow.
    full: bool,
}

/// The rows of a probe's range read in a snapshot, waiting for the log to
/// reach `high`; changes the snapshot cannot see are patched in meanwhile.
#[derive(Debug)]
struct ProbeChunk {
    /// The probe as it was queued (to find it again).
    probe: Probe,
    snapshot: Snapshot,
    high: u64,
    table: Table,
    keys: Vec<ranges::KeyCol>,
    /// encoded key -> (key, row), for the keys in `covered`
    rows: BTreeMap<Vec<u8>, KeyedRow>,
    /// The part of the probe's range the rows cover: from its start up to
    /// the first row not read (or its end).
    covered: KeyRange,
}

/// A PostgreSQL source.
pub struct PgSource {
    cfg: PgConfig,
    pg: tokio_postgres::Config,
    rt: Option<tokio::runtime::Runtime>,
    sql: Option<tokio_postgres::Client>,
    repl: Option<ReplConn>,
    resources: Vec<ResourceConfig>,
    tables: Vec<Table>,
    by_oid: HashMap<u32, usize>,
    shapes_dirty: bool,
    pushback: Option<Message>,
    txn: Option<Txn>,
    pos: Position,
    /// The position text the last read returned.
    last_returned: Option<String>,
    recent_xids: VecDeque<u32>,
    chunk: Option<Chunk>,
    requests: Vec<(usize, String)>,
    released: u64,
    last_status: Option<Instant>,
    /// When the server last was asked for its position.
    last_ping: Option<Instant>,
    alarm: Option<String>,
    finished: BTreeMap<String, LoadReport>,
    type_names: HashMap<(u32, i32), String>,
    backlog_cache: Option<(Instant, u64)>,
    next_id: u64,
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

fn pg_err(context: &str) -> impl Fn(tokio_postgres::Error) -> SourceError + '_ {
    move |e| SourceError::Pg {
        context: context.to_string(),
        message: match e.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => e.to_string(),
        },
    }
}

fn wire_err(context: &str) -> impl Fn(WireError) -> SourceError + '_ {
    move |e| SourceError::Pg {
        context: context.to_string(),
        message: e.to_string(),
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
    let mut pg: tokio_postgres::Config = cfg.dsn.parse().map_err(|e| SourceError::Pg {
        context: "reading source.dsn".into(),
        message: format!("{e}"),
    })?;
    if let Some(p) = &cfg.password {
        pg.password(p.as_bytes());
    }
    pg.application_name("shuyuan-agent");
    Ok(pg)
}

/// `"schema"."table"` for a configured table name.
pub(crate) fn quoted_table(table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("\"{s}\".\"{t}\""),
        None => format!("\"{table}\""),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Where each named key column sits among `columns`.
fn key_indexes(table: &str, columns: &[Column], names: &[String]) -> Result<Vec<u16>, SourceError> {
    names
        .iter()
        .map(|k| {
            columns
                .iter()
                .position(|c| &c.name == k)
                .map(|i| u16::try_from(i).unwrap_or(u16::MAX))
                .ok_or_else(|| SourceError::MissingColumn {
                    table: table.to_string(),
                    column: k.clone(),
                })
        })
        .collect()
}

/// Looks a configured table up: columns, types, the key, and whether the
/// log will identify its rows.
pub(crate) async fn resolve(
    sql: &tokio_postgres::Client,
    resource: &ResourceConfig,
) -> Result<Table, SourceError> {
    let e = pg_err("reading the table definition");
    let row = sql
        .query_opt(
            "SELECT c.oid::int8, c.relreplident::text FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&quoted_table(&resource.table)],
        )
        .await
        .map_err(&e)?
        .ok_or_else(|| SourceError::MissingTable {
            table: resource.table.clone(),
            path: "the PostgreSQL database".into(),
        })?;
    let oid = u32::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    let ident: String = row.get(1);
    let cols = sql
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8, NOT a.attnotnull \
             FROM pg_attribute a WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
             AND a.attgenerated = '' ORDER BY a.attnum",
            &[&i64::from(oid)],
        )
        .await
        .map_err(&e)?;
    let columns: Vec<Column> = cols
        .iter()
        .map(|r| Column {
            name: r.get(0),
            sql_type: r.get(1),
            nullable: r.get(3),
        })
        .collect();
    let types: Vec<u32> = cols
        .iter()
        .map(|r| u32::try_from(r.get::<_, i64>(2)).unwrap_or(0))
        .collect();
    let index_columns = |primary: bool| async move {
        sql.query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1::int8::oid AND (CASE WHEN $2 THEN i.indisprimary ELSE i.indisreplident END) \
             ORDER BY k.ord",
            &[&i64::from(oid), &primary],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
    };
    let primary = index_columns(true).await.map_err(&e)?;
    // The columns the log carries for updates and deletes.
    let identity: Option<Vec<String>> = match ident.as_str() {
        "d" if !primary.is_empty() => Some(primary.clone()),
        "i" => Some(index_columns(false).await.map_err(&e)?),
        "f" => None, // the whole row
        _ => {
            return Err(SourceError::NoIdentity {
                table: resource.table.clone(),
            });
        }
    };
    let key_names: Vec<String> = if !resource.key.is_empty() {
        resource.key.clone()
    } else {
        match &identity {
            Some(cols) => cols.clone(),
            None if !primary.is_empty() => primary.clone(),
            None => columns.iter().map(|c| c.name.clone()).collect(),
        }
    };
    if let Some(cols) = &identity {
        let mut a = cols.clone();
        let mut b = key_names.clone();
        a.sort();
        b.sort();
        if a != b {
            return Err(SourceError::KeyNotIdentity {
                table: resource.table.clone(),
                key: key_names.join(", "),
                identity: cols.join(", "),
            });
        }
    }
    let key = key_indexes(&resource.table, &columns, &key_names)?;
    let whole_row = identity.is_none() && resource.key.is_empty() && primary.is_empty();
    let shape = TableSchema {
        version: 0,
        table: resource.table.clone(),
        columns,
        key,
    };
    Ok(Table {
        oid,
        sql_name: quoted_table(&resource.table),
        shape,
        types,
        whole_row,
        full_identity: ident == "f",
    })
}

impl PgSource {
    /// Opens the source: checks the connection, the tables and the slot.
    pub fn open(cfg: &PgConfig, resources: &[ResourceConfig]) -> Result<PgSource, SourceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SourceError::Pg {
                context: "starting the PostgreSQL client".into(),
                message: e.to_string(),
            })?;
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

    /// Starts a re-read of resource `i` (or restarts it).
    async fn start_load(
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
        let e = pg_err("estimating the table size");
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

    /// Connects the stream, checking the slot first. A lost slot is
    /// recreated and every resource re-read.
    async fn ensure_stream(
        &mut self,
        fresh: bool,
        marks: &mut Vec<Mark>,
    ) -> Result<(), SourceError> {
        self.ensure_sql().await?;
        if self.repl.is_some() {
            return Ok(());
        }
        let slot = self.cfg.slot.clone();
        let row = self
            .sql()?
            .query_opt(
                "SELECT confirmed_flush_lsn::text, to_jsonb(s) ->> 'wal_status', plugin::text \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err("reading the replication slot"))?;
        let lost = match &row {
            None if fresh => return Err(SourceError::NoSlot { slot }),
            None => Some("it was dropped".to_string()),
            Some(r) if r.get::<_, Option<String>>(1).as_deref() == Some("lost") => Some(
                "PostgreSQL invalidated it (WAL it needed was removed, see max_slot_wal_keep_size)"
                    .to_string(),
            ),
            Some(r) if r.get::<_, Option<String>>(2).as_deref() != Some("pgoutput") => {
                return Err(SourceError::Pg {
                    context: "checking the replication slot".into(),
                    message: format!("slot {slot} does not use the pgoutput plugin"),
                });
            }
            Some(r) => {
                let confirmed = r
                    .get::<_, Option<String>>(0)
                    .as_deref()
                    .and_then(parse_lsn)
                    .unwrap_or(0);
                if fresh {
                    self.pos.lsn = confirmed;
                    None
                } else if confirmed > self.pos.lsn {
                    Some(format!(
                        "it is at {} but the agent captured only up to {}: it was recreated or advanced by someone else",
                        lsn_text(confirmed),
                        lsn_text(self.pos.lsn)
                    ))
                } else {
                    None
                }
            }
        };
        if fresh {
            for i in 0..self.resources.len() {
                self.start_load(i, "initial load".into(), marks).await?;
            }
        }
        if let Some(why) = lost {
            self.repair_lost_slot(&why, row.is_some(), marks).await?;
        }
        let mut repl = ReplConn::connect(&self.pg, SESSION_SETTINGS)
            .await
            .map_err(wire_err("opening the replication connection"))?;
        match repl.start(&slot, &self.cfg.publication, self.pos.lsn).await {
            Ok(()) => {}
            Err(WireError::Server { code, message })
                if code == "55000"
                    || code == "58P01"
                    || message.contains("has already been removed") =>
            {
                // Invalidated between the check and the start.
                self.repair_lost_slot(&message, true, marks).await?;
                return Err(SourceError::Pg {
                    context: "starting replication".into(),
                    message: format!("{message}; slot recreated, retrying"),
                });
            }
            Err(e) => return Err(wire_err("starting replication")(e)),
        }
        self.released = self.released.max(self.pos.lsn);
        self.repl = Some(repl);
        tracing::info!(slot = %self.cfg.slot, lsn = %lsn_text(self.pos.lsn), "streaming the log");
        Ok(())
    }

    async fn repair_lost_slot(
        &mut self,
        why: &str,
        exists: bool,
        marks: &mut Vec<Mark>,
    ) -> Result<(), SourceError> {
        let slot = self.cfg.slot.clone();
        let alarm = format!("replication slot {slot} lost: {why}");
        tracing::error!(%alarm, "capture position lost; recreating the slot and re-reading every resource");
        let e = pg_err("recreating the replication slot");
        if exists {
            self.sql()?
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(&e)?;
        }
        let lsn: String = self
            .sql()?
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(&e)?
            .get(0);
        self.pos.lsn = parse_lsn(&lsn).unwrap_or(0);
        self.pos.partial = None;
        self.released = self.pos.lsn;
        self.chunk = None;
        self.probe_chunk = None;
        for i in 0..self.resources.len() {
            self.start_load(i, format!("{alarm}; re-reading the table"), marks)
                .await?;
        }
        self.alarm = Some(format!(
            "{alarm} (at {}); re-read started",
            UnixMillis::now()
        ));
        Ok(())
    }

    /// Takes the next chunk of the first load, unless a transaction is open.
    async fn take_chunk(&mut self) -> Result<(), SourceError> {
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
        let cols: Vec<String> = table
            .shape
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
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
        let messages = sql
            .simple_query(&select)
            .await
            .map_err(pg_err("reading a chunk of the table"))?;
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
                let number = |c: usize| r.get(c).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                snapshot = r.get(0).and_then(Snapshot::parse);
                high = ranges::record_end(
                    r.get(1).and_then(parse_lsn).unwrap_or(u64::MAX),
                    number(2),
                    number(3),
                );
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
            context: "reading a chunk of the table".into(),
            message: "no snapshot returned".into(),
        })?;
        // An emitted transaction the snapshot cannot see yet (its commit is
        // in the log, it is not visible yet): the chunk may be older than
        // what was sent. Take it again later.
        if let Some(x) = self.recent_xids.iter().find(|&&x| !snapshot.sees(x)) {
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
    fn chunk_due(&self) -> bool {
        self.txn.is_none() && self.chunk.as_ref().is_some_and(|c| self.pos.lsn >= c.high)
    }

    /// Emits the pending chunk. Returns false (emitting nothing) when the
    /// table's shape changed and this read already has events: the shape
    /// must open the next read.
    fn emit_chunk(&mut self, out: &mut Vec<Captured>, marks: &mut Vec<Mark>) -> bool {
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
    async fn take_probe(&mut self) -> Result<bool, SourceError> {
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
        let messages = sql
            .simple_query(&query)
            .await
            .map_err(pg_err("reading a key range to compare"))?;
        let mut head = None;
        let mut rows: BTreeMap<Vec<u8>, KeyedRow> = BTreeMap::new();
        let mut n = 0usize;
        for m in messages {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            if head.is_none() {
                let number = |c: usize| r.get(c).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                head = Some((
                    r.get(0).and_then(Snapshot::parse),
                    ranges::record_end(
                        r.get(1).and_then(parse_lsn).unwrap_or(u64::MAX),
                        number(3),
                        number(4),
                    ),
                    r.get(2) == Some("true"),
                ));
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
                context: "reading a key range to compare".into(),
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
        if let Some(x) = self.recent_xids.iter().find(|&&x| !snapshot.sees(x)) {
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
    fn probe_due(&self) -> bool {
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
    fn emit_probe(
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
        let (entries, done) = probe::answer(&mut part, &schema, &mut reader, &mut self.budget)?;
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

    /// The full row for an update whose log record left TOASTed columns out.
    async fn fetch_row(
        &self,
        t: &Table,
        key_text: &[String],
    ) -> Result<Option<Vec<Value>>, SourceError> {
        let cols: Vec<String> = t
            .shape
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let cond: Vec<String> = t
            .shape
            .key
            .iter()
            .zip(key_text)
            .map(|(&k, text)| {
                let c = &t.shape.columns[usize::from(k)];
                format!("{} = {}", quote_ident(&c.name), literal(text, &c.sql_type))
            })
            .collect();
        let q = format!(
            "SELECT {} FROM {} WHERE {}",
            cols.join(", "),
            t.sql_name,
            cond.join(" AND ")
        );
        let msgs = self
            .sql()?
            .simple_query(&q)
            .await
            .map_err(pg_err("reading a row whose large values did not change"))?;
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                return Ok(Some(
                    (0..t.types.len())
                        .map(|c| r.get(c).map_or(Value::Null, |s| text_value(t.types[c], s)))
                        .collect(),
                ));
            }
        }
        Ok(None)
    }

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
            .map_err(pg_err("reading added columns"))?
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

    fn datum_values(t: &Table, tuple: &[Datum]) -> (Vec<Value>, bool) {
        let mut unchanged = false;
        let row = t
            .types
            .iter()
            .enumerate()
            .map(|(c, &ty)| match tuple.get(c) {
                Some(Datum::Text(s)) => text_value(ty, s),
                Some(Datum::Unchanged) => {
                    unchanged = true;
                    Value::Null
                }
                _ => Value::Null,
            })
            .collect();
        (row, unchanged)
    }

    fn key_texts(t: &Table, tuple: &[Datum]) -> Vec<String> {
        t.shape
            .key
            .iter()
            .map(|&k| match tuple.get(usize::from(k)) {
                Some(Datum::Text(s)) => s.clone(),
                _ => String::new(),
            })
            .collect()
    }

    /// One read (see [`Source::read`]).
    async fn read_async(&mut self, fresh: bool, limit: usize) -> Result<SourceRead, SourceError> {
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
                        Replication::XLogData { data, .. } => {
                            wait = DRAIN_GAP;
                            decode::parse(&data).map_err(|e| SourceError::Pg {
                                context: "decoding the log".into(),
                                message: e.to_string(),
                            })?
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
                        self.recent_xids.push_back(t.xid);
                        if self.recent_xids.len() > RECENT_XIDS {
                            self.recent_xids.pop_front();
                        }
                    }
                    if end_lsn > self.pos.lsn {
                        self.pos.lsn = end_lsn;
                    }
                    self.pos.partial = None;
                }
                Message::Relation(rel) => {
                    if let Some((i, shape, types)) = self.relation_shape(&rel).await? {
                        let t = &self.tables[i];
                        if t.shape.columns != shape.columns || t.shape.key != shape.key {
                            if !out.is_empty() || !marks.is_empty() {
                                self.pushback = Some(Message::Relation(rel));
                                break;
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
                            let id = self.new_id();
                            marks.push((
                                out.len(),
                                i,
                                Resync::Begin {
                                    id,
                                    reason: "TRUNCATE at the source".into(),
                                },
                            ));
                            marks.push((out.len(), i, Resync::End { id, rows: 0 }));
                            let code = self.resources[i].code.to_string();
                            if let Some(l) = self.pos.loads.iter_mut().find(|l| l.resource == code)
                            {
                                // Start the running re-read over after the truncate.
                                l.after = None;
                                l.rows = 0;
                                marks.push((
                                    out.len(),
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

    /// One row change from the log.
    async fn change(
        &mut self,
        op: Op,
        rel: u32,
        old: Option<Vec<Datum>>,
        new: Option<Vec<Datum>>,
        out: &mut Vec<Captured>,
    ) -> Result<(), SourceError> {
        let Some(&i) = self.by_oid.get(&rel) else {
            return Ok(());
        };
        let Some(txn) = self.txn.as_mut() else {
            return Err(SourceError::Pg {
                context: "decoding the log".into(),
                message: "row change outside a transaction".into(),
            });
        };
        txn.seen += 1;
        if txn.seen <= txn.skip {
            return Ok(());
        }
        let xid = txn.xid;
        let t = self.tables[i].clone();
        let old_row = old.as_deref().map(|o| Self::datum_values(&t, o).0);
        let old_key = old_row.as_deref().map(|r| t.key_of(r));
        let mut emitted: Vec<Captured> = Vec::new();
        match new {
            Some(new) => {
                let (mut row, unchanged) = Self::datum_values(&t, &new);
                if unchanged {
                    // Fill TOASTed values the log left out from the old row
                    // (REPLICA IDENTITY FULL) or, failing that, the table.
                    match &old_row {
                        Some(orow) if t.full_identity => {
                            for (c, d) in new.iter().enumerate() {
                                if matches!(d, Datum::Unchanged) {
                                    row[c] = orow[c].clone();
                                }
                            }
                        }
                        _ => {
                            let texts = Self::key_texts(&t, &new);
                            match self.fetch_row(&t, &texts).await? {
                                Some(current) => {
                                    for (c, d) in new.iter().enumerate() {
                                        if matches!(d, Datum::Unchanged) {
                                            row[c] = current[c].clone();
                                        }
                                    }
                                }
                                // Deleted since: a delete follows in the log.
                                None => return Ok(()),
                            }
                        }
                    }
                }
                let key = t.key_of(&row);
                if let Some(ok) = old_key
                    && ok != key
                {
                    // The key changed: the old row is gone.
                    emitted.push(Captured {
                        resource: i,
                        op: Op::Delete,
                        key: ok,
                        row: None,
                    });
                }
                emitted.push(Captured {
                    resource: i,
                    op,
                    key,
                    row: Some(row),
                });
            }
            None => {
                let key = old_key.unwrap_or_default();
                emitted.push(Captured {
                    resource: i,
                    op: Op::Delete,
                    key,
                    row: None,
                });
            }
        }
        if let Some(chunk) = self.chunk.as_mut()
            && chunk.resource == i
            && !chunk.snapshot.sees(xid)
        {
            for c in &emitted {
                chunk.rows.remove(&encode_key(&c.key));
            }
        }
        if let Some(chunk) = self.probe_chunk.as_mut()
            && chunk.probe.resource == i
            && !chunk.snapshot.sees(xid)
        {
            // The snapshot misses this change: bring its rows up to it.
            for c in &emitted {
                let k = encode_key(&c.key);
                if !chunk.covered.contains(&k) {
                    continue;
                }
                tracing::debug!(xid, key = ?c.key, delete = c.row.is_none(), "probe rows patched");
                match &c.row {
                    Some(row) => {
                        chunk.rows.insert(k, (c.key.clone(), row.clone()));
                    }
                    None => {
                        chunk.rows.remove(&k);
                    }
                }
            }
        }
        out.extend(emitted);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::Snapshot;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).expect("a snapshot")
    }

    #[test]
    fn a_snapshot_sees_what_committed_before_it_and_nothing_else() {
        // xmax is one past the latest completed transaction: 11827 and
        // 11826 were running (11826 listed), 11829 had an id but had not
        // completed (committing, or not yet), 11828 never ran.
        let s = snapshot("11820:11828:11820,11826");
        assert!(s.sees(11819), "before xmin");
        assert!(!s.sees(11820), "running");
        assert!(s.sees(11821), "completed between xmin and xmax");
        assert!(!s.sees(11826), "running");
        assert!(!s.sees(11828), "xmax itself");
        // The case that once made an initial load emit a row older than a
        // change already sent: an id above xmax in the same epoch is a
        // transaction the snapshot cannot see, not one of the last epoch.
        assert!(!s.sees(11829));
        assert!(!s.sees(11829 + 1_000_000));
    }

    #[test]
    fn ids_from_the_log_are_placed_in_the_nearest_epoch() {
        // Just after the wraparound: epoch 1, xmax 10.
        let epoch = 1u64 << 32;
        let s = snapshot(&format!("{}:{}:{}", epoch + 5, epoch + 10, epoch + 7));
        assert!(s.sees(u32::MAX - 5), "from the previous epoch: long done");
        assert!(s.sees(6), "completed in this epoch");
        assert!(!s.sees(7), "running");
        assert!(!s.sees(20), "after xmax in this epoch");
        // Just before the wraparound: a running id that has already wrapped
        // belongs to the next epoch.
        let s = snapshot(&format!("{}:{}:", epoch - 100, epoch - 50));
        assert!(s.sees(u32::try_from(epoch - 60).unwrap()));
        assert!(!s.sees(3), "next epoch, after xmax");
    }
}
