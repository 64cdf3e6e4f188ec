//! SQLite capture: triggers write the key of every changed row into a change
//! table; the agent reads that table in id order and looks up each row's
//! current state in the same read transaction.
//!
//! The triggers copy only the key, which keeps the cost on the department's
//! own writes small. Several changes to one key between two reads are
//! coalesced into the row's latest state; the shared copy converges to the
//! source either way, and the values are read with SQLite's own storage
//! classes, so nothing is converted on the way.
//!
//! Invariant: a change-table row is deleted only by [`Source::release`],
//! which the capture loop calls after the outbox transaction that covers it
//! has committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use shuyuan_protocol::value::{decode_key, encode_key};
use shuyuan_protocol::{Column, KeyRange, Op, ResourceCode, TableSchema, Value};

use super::probe::{self, Budget, KeyedRow, RangeReader};
use super::{Captured, Probe, Source, SourceError, SourceRead};
use crate::config::{MAX_KEY_COLUMNS, ResourceConfig};

/// The change table the triggers write to.
pub const CHANGE_TABLE: &str = "_shuyuan_changes";
/// Which tables have capture triggers, and for which key.
pub const CAPTURE_TABLE: &str = "_shuyuan_capture";

const TRIGGER_SUFFIXES: [&str; 3] = ["ins", "upd", "del"];

fn trigger_name(table: &str, suffix: &str) -> String {
    format!("_shuyuan_{table}_{suffix}")
}

fn key_slots() -> String {
    (0..MAX_KEY_COLUMNS)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Maps a rusqlite error, recognising a busy or locked database.
fn sql_err(
    path: &Path,
    started: Instant,
    context: &str,
) -> impl Fn(rusqlite::Error) -> SourceError + use<> {
    let path = path.display().to_string();
    let context = context.to_string();
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SourceError::Locked {
            path: path.clone(),
            waited_ms: started.elapsed().as_millis(),
        },
        Some(ErrorCode::NotADatabase) => SourceError::Open {
            path: path.clone(),
            reason: "the file is not a SQLite database".into(),
        },
        _ => SourceError::Sql {
            context: context.clone(),
            source: e,
        },
    }
}

/// Opens an existing database for reading and writing (never creates one).
pub fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, SourceError> {
    let open_err = |reason: String| SourceError::Open {
        path: path.display().to_string(),
        reason,
    };
    if !path.exists() {
        return Err(open_err("the file does not exist".into()));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_err(e.to_string()))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| open_err(e.to_string()))?;
    let started = Instant::now();
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(sql_err(path, started, "reading the schema"))?;
    Ok(conn)
}

/// Reads a table's current shape and checks that `key` identifies its rows.
/// The returned schema has version 0.
fn shape(conn: &Connection, path: &Path, r: &ResourceConfig) -> Result<TableSchema, SourceError> {
    let started = Instant::now();
    let e = |ctx: &str| sql_err(path, started, ctx);
    let exists = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [&r.table],
            |_| Ok(()),
        )
        .optional()
        .map_err(e("looking up a table"))?
        .is_some();
    if !exists {
        return Err(SourceError::MissingTable {
            table: r.table.clone(),
            path: path.display().to_string(),
        });
    }
    let mut stmt = conn
        .prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid")
        .map_err(e("reading table columns"))?;
    let cols: Vec<(String, String, bool, i64)> = stmt
        .query_map([&r.table], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .map_err(e("reading table columns"))?
        .collect::<Result<_, _>>()
        .map_err(e("reading table columns"))?;
    let mut key = Vec::new();
    for k in &r.key {
        let idx =
            cols.iter()
                .position(|c| c.0 == *k)
                .ok_or_else(|| SourceError::MissingColumn {
                    table: r.table.clone(),
                    column: k.clone(),
                })?;
        key.push(u16::try_from(idx).unwrap_or(u16::MAX));
    }
    let mut wanted: Vec<&str> = r.key.iter().map(String::as_str).collect();
    wanted.sort_unstable();
    let mut pk: Vec<(i64, &str)> = cols
        .iter()
        .filter(|c| c.3 > 0)
        .map(|c| (c.3, c.0.as_str()))
        .collect();
    pk.sort_unstable();
    let mut pk_names: Vec<&str> = pk.iter().map(|p| p.1).collect();
    pk_names.sort_unstable();
    let mut unique = pk_names == wanted;
    if !unique {
        let mut idx = conn
            .prepare("SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1 AND partial = 0")
            .map_err(e("reading indexes"))?;
        let names: Vec<String> = idx
            .query_map([&r.table], |row| row.get(0))
            .map_err(e("reading indexes"))?
            .collect::<Result<_, _>>()
            .map_err(e("reading indexes"))?;
        for name in names {
            let mut info = conn
                .prepare("SELECT name FROM pragma_index_info(?1)")
                .map_err(e("reading indexes"))?;
            let mut cols: Vec<Option<String>> = info
                .query_map([&name], |row| row.get(0))
                .map_err(e("reading indexes"))?
                .collect::<Result<_, _>>()
                .map_err(e("reading indexes"))?;
            cols.sort_unstable();
            if cols
                .iter()
                .map(|c| c.as_deref())
                .eq(wanted.iter().map(|w| Some(*w)))
            {
                unique = true;
                break;
            }
        }
    }
    if !unique {
        return Err(SourceError::KeyNotUnique {
            table: r.table.clone(),
            columns: r.key.join(", "),
        });
    }
    let integer_pk = pk.len() == 1
        && cols
            .iter()
            .any(|c| c.3 == 1 && c.1.eq_ignore_ascii_case("INTEGER"));
    Ok(TableSchema {
        version: 0,
        table: r.table.clone(),
        columns: cols
            .iter()
            .map(|(name, ty, notnull, pk)| Column {
                name: name.clone(),
                sql_type: ty.clone(),
                nullable: !(*notnull || (integer_pk && *pk == 1)),
            })
            .collect(),
        key,
    })
}

/// A quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"a", "b", ...`: the quoted names, comma-separated.
fn quoted_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().map(quote).collect::<Vec<_>>().join(", ")
}

fn lookup_sql(s: &TableSchema) -> String {
    let cols = quoted_list(s.columns.iter().map(|c| c.name.as_str()));
    let cond = s
        .key_names()
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", quote(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!("SELECT {cols} FROM {} WHERE {cond}", quote(&s.table))
}

/// A SQLite value as a shuyuan value, by storage class.
pub fn value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Value::Text(s.to_owned()),
            // SQLite lets TEXT hold any bytes; keep them exactly.
            Err(_) => Value::Bytes(t.to_vec()),
        },
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

fn sql_value(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Bool(b) => S::Integer(i64::from(*b)),
        Value::Int(i) => S::Integer(*i),
        Value::Real(r) => S::Real(*r),
        Value::Bytes(b) => S::Blob(b.clone()),
        Value::Decimal(t)
        | Value::Text(t)
        | Value::Date(t)
        | Value::Time(t)
        | Value::Timestamp(t)
        | Value::TimestampTz(t) => S::Text(t.clone()),
    }
}

/// Reads key ranges of shared tables inside a read transaction.
struct Ranges<'a> {
    conn: &'a Connection,
    path: &'a Path,
    started: Instant,
}

impl RangeReader for Ranges<'_> {
    fn read_range(
        &mut self,
        schema: &TableSchema,
        range: &KeyRange,
        limit: Option<usize>,
    ) -> Result<Vec<KeyedRow>, SourceError> {
        let cols = quoted_list(schema.columns.iter().map(|c| c.name.as_str()));
        let keys = quoted_list(schema.key_names());
        let mut params = Vec::new();
        let mut conds = Vec::new();
        let bounds = [
            (Some(range.lo.as_slice()).filter(|lo| !lo.is_empty()), ">="),
            (range.hi.as_deref(), "<"),
        ];
        for (bound, op) in bounds {
            let Some(bytes) = bound else { continue };
            let values = decode_key(bytes).ok_or_else(|| {
                SourceError::Unsupported("the hub sent a range bound that is not a key".into())
            })?;
            let slots = (params.len() + 1..=params.len() + values.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            conds.push(format!("({keys}) {op} ({slots})"));
            params.extend(values.iter().map(sql_value));
        }
        let mut sql = format!("SELECT {cols} FROM {}", quote(&schema.table));
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY {keys}"));
        if let Some(l) = limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let e = sql_err(self.path, self.started, "reading a key range to compare");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&e)?;
        let width = schema.columns.len();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                (0..width)
                    .map(|i| r.get_ref(i).map(value))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(&e)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&e)?;
        Ok(probe::in_range(schema, rows, range))
    }
}

/// A key seen in the change table during one read.
#[derive(Debug)]
struct Touched {
    /// The first operation recorded for it (`I`, `U` or `D`).
    first_op: u8,
    /// The last change-table id that names it; changes are emitted in this order.
    last_id: i64,
    key: Vec<Value>,
}

/// Capture from one SQLite database.
#[derive(Debug)]
pub struct SqliteSource {
    conn: Connection,
    path: PathBuf,
    resources: Vec<ResourceConfig>,
    schema_cookie: Option<i64>,
    shapes: Vec<TableSchema>,
    probes: Vec<Probe>,
    budget: Budget,
}

impl SqliteSource {
    /// Opens the database and checks that capture triggers are installed for
    /// every resource with the configured key.
    pub fn open(
        path: &Path,
        busy_timeout: Duration,
        resources: &[ResourceConfig],
    ) -> Result<Self, SourceError> {
        let conn = open_connection(path, busy_timeout)?;
        let started = Instant::now();
        let installed: BTreeMap<String, String> = {
            let has_table = conn
                .query_row(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [CAPTURE_TABLE],
                    |_| Ok(()),
                )
                .optional()
                .map_err(sql_err(path, started, "checking capture tables"))?
                .is_some();
            if has_table {
                let mut stmt = conn
                    .prepare(&format!("SELECT tbl, key_columns FROM {CAPTURE_TABLE}"))
                    .map_err(sql_err(path, started, "checking capture tables"))?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(sql_err(path, started, "checking capture tables"))?
                    .collect::<Result<_, _>>()
                    .map_err(sql_err(path, started, "checking capture tables"))?
            } else {
                BTreeMap::new()
            }
        };
        for r in resources {
            let configured = r.key.join(",");
            match installed.get(&r.table) {
                None => {
                    return Err(SourceError::NoTriggers {
                        table: r.table.clone(),
                    });
                }
                Some(k) if *k != configured => {
                    return Err(SourceError::KeyChanged {
                        table: r.table.clone(),
                        installed: k.clone(),
                        configured,
                    });
                }
                Some(_) => {}
            }
            for suffix in TRIGGER_SUFFIXES {
                let present = conn
                    .query_row(
                        "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                        [trigger_name(&r.table, suffix)],
                        |_| Ok(()),
                    )
                    .optional()
                    .map_err(sql_err(path, started, "checking triggers"))?
                    .is_some();
                if !present {
                    return Err(SourceError::NoTriggers {
                        table: r.table.clone(),
                    });
                }
            }
            shape(&conn, path, r)?;
        }
        Ok(SqliteSource {
            conn,
            path: path.to_owned(),
            resources: resources.to_vec(),
            schema_cookie: None,
            shapes: Vec::new(),
            probes: Vec::new(),
            budget: Budget::new(200_000),
        })
    }
}

impl SqliteSource {
    /// Sets how many rows per second comparisons may read.
    pub fn with_probe_rate(mut self, rows_per_second: u64) -> Self {
        self.budget = Budget::new(rows_per_second);
        self
    }
}

impl Source for SqliteSource {
    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    fn read(&mut self, after: &str, limit: usize) -> Result<SourceRead, SourceError> {
        let after: i64 = after
            .parse()
            .map_err(|_| SourceError::BadPosition(after.to_string()))?;
        let started = Instant::now();
        let path = self.path.clone();
        let e = |ctx: &str| sql_err(&path, started, ctx);
        let tx = self.conn.transaction().map_err(e("starting a read"))?;
        let cookie: i64 = tx
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(e("reading the schema version"))?;
        let mut shapes_out = None;
        if self.schema_cookie != Some(cookie) {
            let shapes = self
                .resources
                .iter()
                .map(|r| shape(&tx, &path, r))
                .collect::<Result<Vec<_>, _>>()?;
            self.shapes = shapes.clone();
            self.schema_cookie = Some(cookie);
            shapes_out = Some(shapes);
        }
        let by_table: BTreeMap<&str, usize> = self
            .resources
            .iter()
            .enumerate()
            .map(|(i, r)| (r.table.as_str(), i))
            .collect();

        let mut touched: BTreeMap<(usize, Vec<u8>), Touched> = BTreeMap::new();
        let mut last_id = after;
        let mut n = 0usize;
        let mut skipped_null_keys = 0u64;
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT id, tbl, op, {} FROM {CHANGE_TABLE} WHERE id > ?1 ORDER BY id LIMIT ?2",
                    key_slots()
                ))
                .map_err(e("reading the change table"))?;
            let mut rows = stmt
                .query(params![after, i64::try_from(limit).unwrap_or(i64::MAX)])
                .map_err(e("reading the change table"))?;
            while let Some(row) = rows.next().map_err(e("reading the change table"))? {
                n += 1;
                let id: i64 = row.get(0).map_err(e("reading the change table"))?;
                last_id = id;
                let table: String = row.get(1).map_err(e("reading the change table"))?;
                let op: String = row.get(2).map_err(e("reading the change table"))?;
                let Some(&res) = by_table.get(table.as_str()) else {
                    continue; // a table no longer shared; released with the rest
                };
                let width = self.resources[res].key.len();
                let mut key = Vec::with_capacity(width);
                for i in 0..width {
                    key.push(value(
                        row.get_ref(3 + i).map_err(e("reading the change table"))?,
                    ));
                }
                if key.contains(&Value::Null) {
                    skipped_null_keys += 1;
                    continue;
                }
                let op = op.as_bytes().first().copied().unwrap_or(b'U');
                touched
                    .entry((res, encode_key(&key)))
                    .and_modify(|t| t.last_id = id)
                    .or_insert(Touched {
                        first_op: op,
                        last_id: id,
                        key,
                    });
            }
        }
        let mut ordered: Vec<(usize, Touched)> =
            touched.into_iter().map(|((res, _), t)| (res, t)).collect();
        ordered.sort_by_key(|(_, t)| t.last_id);
        let mut changes = Vec::with_capacity(ordered.len());
        for (res, Touched { first_op, key, .. }) in ordered {
            let schema = &self.shapes[res];
            let mut stmt = tx
                .prepare_cached(&lookup_sql(schema))
                .map_err(e("reading a changed row"))?;
            let params: Vec<rusqlite::types::Value> = key.iter().map(sql_value).collect();
            let width = schema.columns.len();
            let row = stmt
                .query_row(rusqlite::params_from_iter(params), |r| {
                    (0..width)
                        .map(|i| r.get_ref(i).map(value))
                        .collect::<Result<Vec<_>, _>>()
                })
                .optional()
                .map_err(e("reading a changed row"))?;
            let op = match (&row, first_op) {
                (None, _) => Op::Delete,
                (Some(_), b'I') => Op::Insert,
                (Some(_), _) => Op::Update,
            };
            changes.push(Captured {
                resource: res,
                op,
                key,
                row,
            });
        }
        // Comparisons are answered only from a read that saw every pending
        // change: then the feed, once this read's changes are in it, holds
        // exactly this snapshot's rows.
        let mut probes_out = Vec::new();
        if n < limit && !self.probes.is_empty() {
            self.budget.refill();
            let mut reader = Ranges {
                conn: &tx,
                path: &path,
                started,
            };
            let mut i = 0;
            while i < self.probes.len() && self.budget.left() {
                let p = &mut self.probes[i];
                let (entries, done) =
                    probe::answer(p, &self.shapes[p.resource], &mut reader, &mut self.budget)?;
                probes_out.extend(entries.into_iter().map(|e| (p.resource, e)));
                if done {
                    self.probes.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        tx.commit().map_err(e("ending a read"))?;
        Ok(SourceRead {
            shapes: shapes_out,
            changes,
            marks: Vec::new(),
            position: last_id.to_string(),
            complete: n < limit,
            skipped_null_keys,
            probes: probes_out,
            probes_pending: !self.probes.is_empty(),
        })
    }

    fn probe(&mut self, probe: Probe) -> Result<(), SourceError> {
        if probe.resource >= self.resources.len() {
            return Err(SourceError::Unsupported(format!(
                "no resource number {}",
                probe.resource
            )));
        }
        self.probes.retain(|p| {
            !(p.resource == probe.resource && p.run == probe.run && p.range.hi == probe.range.hi)
        });
        self.probes.push(probe);
        Ok(())
    }

    fn release(&mut self, upto: &str) -> Result<(), SourceError> {
        let upto: i64 = upto
            .parse()
            .map_err(|_| SourceError::BadPosition(upto.to_string()))?;
        let started = Instant::now();
        self.conn
            .prepare_cached(&format!("DELETE FROM {CHANGE_TABLE} WHERE id <= ?1"))
            .and_then(|mut s| s.execute([upto]))
            .map_err(sql_err(&self.path, started, "releasing sent changes"))?;
        Ok(())
    }

    fn backlog(&mut self, after: &str) -> Result<u64, SourceError> {
        let after: i64 = after
            .parse()
            .map_err(|_| SourceError::BadPosition(after.to_string()))?;
        let started = Instant::now();
        let max: Option<i64> = self
            .conn
            .query_row(&format!("SELECT max(id) FROM {CHANGE_TABLE}"), [], |r| {
                r.get(0)
            })
            .map_err(sql_err(&self.path, started, "counting pending changes"))?;
        Ok(u64::try_from(max.unwrap_or(after).saturating_sub(after)).unwrap_or(0))
    }
}

/// What `triggers install` did for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// Triggers created; the keys of the rows already in the table were
    /// queued so the hub receives the whole table.
    Installed { existing_rows: u64 },
    /// Triggers were already there for the same key.
    AlreadyInstalled,
    /// Triggers were there for another key and were replaced.
    Reinstalled { existing_rows: u64 },
}

/// What `triggers install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// The database's journal mode afterwards (`wal`).
    pub journal_mode: String,
    pub tables: Vec<TableInstall>,
}

/// What `triggers install` did for one resource's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInstall {
    pub resource: ResourceCode,
    pub table: String,
    pub outcome: InstallOutcome,
}

/// Installs capture for every resource, in one transaction. Idempotent.
/// Also switches the database to WAL mode so that capture reads never block
/// the department's writers.
pub fn install_triggers(
    path: &Path,
    busy_timeout: Duration,
    resources: &[ResourceConfig],
) -> Result<InstallReport, SourceError> {
    let mut conn = open_connection(path, busy_timeout)?;
    let started = Instant::now();
    let e = |ctx: &str| sql_err(path, started, ctx);
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(e("switching to WAL mode"))?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(e("starting the install"))?;
    let slots = (0..MAX_KEY_COLUMNS)
        // BLOB affinity: SQLite stores each key exactly as given (a declared
        // type like ANY would mean NUMERIC affinity and turn '0123' into 123).
        .map(|i| format!("k{i} BLOB"))
        .collect::<Vec<_>>()
        .join(", ");
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {CHANGE_TABLE} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             tbl TEXT NOT NULL,
             op TEXT NOT NULL,
             {slots});
         CREATE TABLE IF NOT EXISTS {CAPTURE_TABLE} (
             tbl TEXT PRIMARY KEY,
             key_columns TEXT NOT NULL,
             installed_at TEXT NOT NULL DEFAULT (datetime('now')));"
    ))
    .map_err(e("creating the change table"))?;
    let mut out = Vec::new();
    for r in resources {
        shape(&tx, path, r)?;
        let key_list = r.key.join(",");
        let existing: Option<String> = tx
            .query_row(
                &format!("SELECT key_columns FROM {CAPTURE_TABLE} WHERE tbl = ?1"),
                [&r.table],
                |row| row.get(0),
            )
            .optional()
            .map_err(e("reading capture state"))?;
        let all_triggers = TRIGGER_SUFFIXES.iter().all(|s| {
            tx.query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                [trigger_name(&r.table, s)],
                |_| Ok(()),
            )
            .optional()
            .ok()
            .flatten()
            .is_some()
        });
        if existing.as_deref() == Some(key_list.as_str()) && all_triggers {
            out.push(TableInstall {
                resource: r.code.clone(),
                table: r.table.clone(),
                outcome: InstallOutcome::AlreadyInstalled,
            });
            continue;
        }
        drop_triggers(&tx, &r.table).map_err(e("replacing triggers"))?;
        let t = &r.table;
        let slots: Vec<String> = (0..r.key.len()).map(|i| format!("k{i}")).collect();
        let slots = slots.join(", ");
        let new_keys: Vec<String> = r.key.iter().map(|k| format!("NEW.\"{k}\"")).collect();
        let old_keys: Vec<String> = r.key.iter().map(|k| format!("OLD.\"{k}\"")).collect();
        let key_changed: Vec<String> = r
            .key
            .iter()
            .map(|k| format!("OLD.\"{k}\" IS NOT NEW.\"{k}\""))
            .collect();
        let plain_keys: Vec<String> = r.key.iter().map(|k| format!("\"{k}\"")).collect();
        tx.execute_batch(&format!(
            "CREATE TRIGGER \"{ins}\" AFTER INSERT ON \"{t}\" BEGIN
                 INSERT INTO {CHANGE_TABLE} (tbl, op, {slots}) VALUES ('{t}', 'I', {new});
             END;
             CREATE TRIGGER \"{upd}\" AFTER UPDATE ON \"{t}\" BEGIN
                 INSERT INTO {CHANGE_TABLE} (tbl, op, {slots}) SELECT '{t}', 'D', {old} WHERE {changed};
                 INSERT INTO {CHANGE_TABLE} (tbl, op, {slots}) VALUES ('{t}', 'U', {new});
             END;
             CREATE TRIGGER \"{del}\" AFTER DELETE ON \"{t}\" BEGIN
                 INSERT INTO {CHANGE_TABLE} (tbl, op, {slots}) VALUES ('{t}', 'D', {old});
             END;",
            ins = trigger_name(t, "ins"),
            upd = trigger_name(t, "upd"),
            del = trigger_name(t, "del"),
            new = new_keys.join(", "),
            old = old_keys.join(", "),
            changed = key_changed.join(" OR "),
        ))
        .map_err(e("creating triggers"))?;
        let existing_rows = tx
            .execute(
                &format!(
                    "INSERT INTO {CHANGE_TABLE} (tbl, op, {slots}) SELECT '{t}', 'I', {} FROM \"{t}\"",
                    plain_keys.join(", ")
                ),
                [],
            )
            .map_err(e("queueing existing rows"))? as u64;
        tx.execute(
            &format!(
                "INSERT INTO {CAPTURE_TABLE} (tbl, key_columns) VALUES (?1, ?2)
                 ON CONFLICT (tbl) DO UPDATE SET key_columns = excluded.key_columns, installed_at = datetime('now')"
            ),
            params![t, key_list],
        )
        .map_err(e("recording capture state"))?;
        let outcome = if existing.is_some() {
            InstallOutcome::Reinstalled { existing_rows }
        } else {
            InstallOutcome::Installed { existing_rows }
        };
        out.push(TableInstall {
            resource: r.code.clone(),
            table: r.table.clone(),
            outcome,
        });
    }
    tx.commit().map_err(e("committing the install"))?;
    Ok(InstallReport {
        journal_mode: mode,
        tables: out,
    })
}

fn drop_triggers(conn: &Connection, table: &str) -> rusqlite::Result<()> {
    for s in TRIGGER_SUFFIXES {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS \"{}\"",
            trigger_name(table, s)
        ))?;
    }
    Ok(())
}

/// Removes capture from the given resources' tables. Refuses while captured
/// changes of those tables are still waiting, unless `force`. Drops the
/// change table when no table is captured any more. Returns the tables done.
pub fn uninstall_triggers(
    path: &Path,
    busy_timeout: Duration,
    resources: &[ResourceConfig],
    force: bool,
) -> Result<Vec<String>, SourceError> {
    let mut conn = open_connection(path, busy_timeout)?;
    let started = Instant::now();
    let e = |ctx: &str| sql_err(path, started, ctx);
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(e("starting the uninstall"))?;
    let has_change_table = tx
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [CHANGE_TABLE],
            |_| Ok(()),
        )
        .optional()
        .map_err(e("checking capture tables"))?
        .is_some();
    let mut done = Vec::new();
    if has_change_table {
        let tables: Vec<&str> = resources.iter().map(|r| r.table.as_str()).collect();
        let mut pending = 0u64;
        for t in &tables {
            let n: i64 = tx
                .query_row(
                    &format!("SELECT count(*) FROM {CHANGE_TABLE} WHERE tbl = ?1"),
                    [t],
                    |r| r.get(0),
                )
                .map_err(e("counting pending changes"))?;
            pending += u64::try_from(n).unwrap_or(0);
        }
        if pending > 0 && !force {
            return Err(SourceError::PendingChanges { pending });
        }
        for t in tables {
            drop_triggers(&tx, t).map_err(e("dropping triggers"))?;
            tx.execute(&format!("DELETE FROM {CHANGE_TABLE} WHERE tbl = ?1"), [t])
                .map_err(e("dropping pending changes"))?;
            tx.execute(&format!("DELETE FROM {CAPTURE_TABLE} WHERE tbl = ?1"), [t])
                .map_err(e("recording capture state"))?;
            done.push(t.to_string());
        }
        let left: i64 = tx
            .query_row(&format!("SELECT count(*) FROM {CAPTURE_TABLE}"), [], |r| {
                r.get(0)
            })
            .map_err(e("checking capture state"))?;
        if left == 0 {
            tx.execute_batch(&format!(
                "DROP TABLE {CHANGE_TABLE}; DROP TABLE {CAPTURE_TABLE};"
            ))
            .map_err(e("dropping the change table"))?;
        }
    } else {
        for r in resources {
            drop_triggers(&tx, &r.table).map_err(e("dropping triggers"))?;
        }
    }
    tx.commit().map_err(e("committing the uninstall"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::UpdateCycle;

    fn resource(table: &str, key: &[&str]) -> ResourceConfig {
        ResourceConfig {
            code: ResourceCode::new(format!("R-{table}")).unwrap(),
            name: table.into(),
            table: table.into(),
            key: key.iter().map(|s| s.to_string()).collect(),
            update_cycle: UpdateCycle::Daily,
            heartbeat: None,
        }
    }

    fn db() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dept.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE person (id TEXT PRIMARY KEY, name TEXT, score REAL, photo BLOB);
             CREATE TABLE parcel (district TEXT NOT NULL, no INTEGER NOT NULL, area REAL, UNIQUE (district, no));
             CREATE TABLE loose (a TEXT, b TEXT);
             INSERT INTO person VALUES ('p1', '甲', 1.5, x'00ff');
             INSERT INTO person VALUES ('0330902199001011234', NULL, NULL, NULL);",
        )
        .unwrap();
        (dir, path, conn)
    }

    #[test]
    fn captures_inserts_updates_deletes_and_key_changes() {
        let (_dir, path, conn) = db();
        let rs = [
            resource("person", &["id"]),
            resource("parcel", &["district", "no"]),
        ];
        let report = install_triggers(&path, Duration::from_secs(1), &rs).unwrap();
        assert_eq!(report.journal_mode, "wal");
        assert_eq!(
            report.tables[0].outcome,
            InstallOutcome::Installed { existing_rows: 2 }
        );
        let again = install_triggers(&path, Duration::from_secs(1), &rs).unwrap();
        assert_eq!(again.tables[0].outcome, InstallOutcome::AlreadyInstalled);

        let mut src = SqliteSource::open(&path, Duration::from_secs(1), &rs).unwrap();
        let first = src.read("0", 100).unwrap();
        assert!(first.complete);
        let shapes = first.shapes.unwrap();
        assert_eq!(shapes[1].key, vec![0, 1]);
        assert_eq!(first.changes.len(), 2);
        let numeric_looking = first
            .changes
            .iter()
            .find(|c| c.key == vec![Value::Text("0330902199001011234".into())])
            .expect("a numeric-looking text key stays text");
        assert!(numeric_looking.row.is_some());
        let p1 = first
            .changes
            .iter()
            .find(|c| c.key == vec![Value::Text("p1".into())])
            .unwrap();
        assert_eq!(
            p1.row,
            Some(vec![
                Value::Text("p1".into()),
                Value::Text("甲".into()),
                Value::Real(1.5),
                Value::Bytes(vec![0, 255])
            ])
        );
        src.release(&first.position).unwrap();

        conn.execute_batch(
            "INSERT INTO person VALUES ('p2', NULL, NULL, NULL);
             UPDATE person SET name = '' WHERE id = 'p2';
             UPDATE person SET id = 'p3' WHERE id = 'p1';
             INSERT INTO parcel VALUES ('西城', 7, 12.25);
             DELETE FROM parcel WHERE no = 7;",
        )
        .unwrap();
        let read = src.read(&first.position, 100).unwrap();
        assert!(read.shapes.is_none(), "no DDL since the last read");
        let got: Vec<(Op, Vec<Value>, Option<Vec<Value>>)> = read
            .changes
            .iter()
            .map(|c| (c.op, c.key.clone(), c.row.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Op::Insert,
                    vec![Value::Text("p2".into())],
                    Some(vec![
                        Value::Text("p2".into()),
                        Value::Text("".into()),
                        Value::Null,
                        Value::Null
                    ])
                ),
                (Op::Delete, vec![Value::Text("p1".into())], None),
                (
                    Op::Update,
                    vec![Value::Text("p3".into())],
                    Some(vec![
                        Value::Text("p3".into()),
                        Value::Text("甲".into()),
                        Value::Real(1.5),
                        Value::Bytes(vec![0, 255])
                    ])
                ),
                (
                    Op::Delete,
                    vec![Value::Text("西城".into()), Value::Int(7)],
                    None
                ),
            ]
        );
        assert_eq!(src.backlog(&first.position).unwrap(), 6);
        src.release(&read.position).unwrap();
        assert_eq!(src.backlog(&read.position).unwrap(), 0);

        conn.execute_batch("ALTER TABLE person ADD COLUMN email TEXT")
            .unwrap();
        conn.execute_batch("UPDATE person SET email = 'a@b' WHERE id = 'p3'")
            .unwrap();
        let read2 = src.read(&read.position, 100).unwrap();
        let shapes = read2.shapes.expect("DDL must report shapes");
        assert_eq!(shapes[0].columns.len(), 5);
        assert_eq!(
            read2.changes[0].row.as_ref().unwrap()[4],
            Value::Text("a@b".into())
        );
    }

    #[test]
    fn paging_reports_incomplete() {
        let (_dir, path, conn) = db();
        let rs = [resource("person", &["id"])];
        install_triggers(&path, Duration::from_secs(1), &rs).unwrap();
        for i in 0..10 {
            conn.execute("INSERT INTO person (id) VALUES (?1)", [format!("x{i}")])
                .unwrap();
        }
        let mut src = SqliteSource::open(&path, Duration::from_secs(1), &rs).unwrap();
        let a = src.read("0", 4).unwrap();
        assert!(!a.complete);
        assert_eq!(a.changes.len(), 4);
        let b = src.read(&a.position, 100).unwrap();
        assert!(b.complete);
        assert_eq!(
            b.changes.len(),
            8,
            "6 more inserts and the 2 rows queued at install"
        );
    }

    #[test]
    fn refusals_are_clear() {
        let (dir, path, _conn) = db();
        let err = SqliteSource::open(
            &path,
            Duration::from_secs(1),
            &[resource("person", &["id"])],
        )
        .unwrap_err();
        assert!(err.to_string().contains("triggers install"), "{err}");
        let err = install_triggers(&path, Duration::from_secs(1), &[resource("loose", &["a"])])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("neither its primary key nor a unique index"),
            "{err}"
        );
        let err = install_triggers(
            &path,
            Duration::from_secs(1),
            &[resource("person", &["nope"])],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no column nope"), "{err}");
        let err = install_triggers(&path, Duration::from_secs(1), &[resource("ghost", &["id"])])
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let missing = dir.path().join("missing.db");
        let err = open_connection(&missing, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("does not exist") && err.to_string().contains("missing.db"),
            "{err}"
        );
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![7u8; 4096]).unwrap();
        let err = open_connection(&garbage, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("not a SQLite database"), "{err}");
    }

    #[test]
    fn locked_database_is_transient() {
        let (_dir, path, _c) = db();
        let rs = [resource("person", &["id"])];
        install_triggers(&path, Duration::from_secs(1), &rs).unwrap();
        let mut src = SqliteSource::open(&path, Duration::from_millis(50), &rs).unwrap();
        let holder = Connection::open(&path).unwrap();
        holder
            .execute_batch("BEGIN EXCLUSIVE; INSERT INTO person (id) VALUES ('z');")
            .unwrap();
        let err = src.release("1").unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("locked"), "{err}");
        holder.execute_batch("COMMIT").unwrap();
        src.release("1").unwrap();
    }

    #[test]
    fn uninstall_refuses_pending_changes() {
        let (_dir, path, conn) = db();
        let rs = [resource("person", &["id"])];
        install_triggers(&path, Duration::from_secs(1), &rs).unwrap();
        let err = uninstall_triggers(&path, Duration::from_secs(1), &rs, false).unwrap_err();
        assert!(matches!(err, SourceError::PendingChanges { pending: 2 }));
        uninstall_triggers(&path, Duration::from_secs(1), &rs, true).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE '_shuyuan%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
    }
}
