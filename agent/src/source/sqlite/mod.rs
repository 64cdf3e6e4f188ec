//! SQLite capture: triggers write the key of every changed row into a change
//! table; the agent reads that table in id order and looks up each row's
//! current state in the same read transaction.
//!
//! The triggers copy only the key, which keeps the cost on the department's
//! own writes small. Several changes to one key between two reads are
//! coalesced into the row's latest state; the shared copy converges to the
//! source either way, and the values are read with SQLite's own storage
//! classes, so nothing is converted on the way. `triggers` installs and
//! checks the triggers, `table` reads a table's shape; this module reads
//! the change table and answers comparisons.
//!
//! Invariant: a change-table row is deleted only by [`Source::release`],
//! which the capture loop calls after the outbox transaction that covers it
//! has committed.

mod table;
mod triggers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use shuyuan_protocol::value::{decode_key, encode_key};
use shuyuan_protocol::{KeyRange, Op, TableSchema, Value};

use self::table::{quote, quoted_list, shape};
use super::probe::{self, Budget, KeyedRow, RangeReader};
use super::{Captured, Probe, Source, SourceError, SourceRead};
use crate::config::{MAX_KEY_COLUMNS, ResourceConfig};

pub use self::triggers::{
    InstallOutcome, InstallReport, TableInstall, install_triggers, uninstall_triggers,
};

/// The change table the triggers write to.
pub const CHANGE_TABLE: &str = "_shuyuan_changes";
/// Which tables have capture triggers, and for which key.
pub const CAPTURE_TABLE: &str = "_shuyuan_capture";

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
            source: e,
        },
        Some(ErrorCode::NotADatabase) => SourceError::NotSqlite {
            path: path.clone(),
            source: e,
        },
        _ => SourceError::Sql {
            context: context.clone(),
            source: e,
        },
    }
}

/// Opens an existing database for reading and writing (never creates one).
pub fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, SourceError> {
    if !path.exists() {
        return Err(SourceError::Open {
            path: path.display().to_string(),
            reason: "the file does not exist".into(),
        });
    }
    let open_err = |source| SourceError::SqliteOpen {
        path: path.display().to_string(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(busy_timeout).map_err(open_err)?;
    let started = Instant::now();
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(sql_err(path, started, "reading the schema"))?;
    Ok(conn)
}

/// A position: the id of the last change-table row it covers.
fn change_id(position: &str) -> Result<i64, SourceError> {
    position
        .parse()
        .map_err(|e| SourceError::bad_position(position, e))
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
        let installed = triggers::installed(&conn, path, started)?;
        for r in resources {
            triggers::check(&conn, path, started, &installed, r)?;
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
        let after = change_id(after)?;
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
        let upto = change_id(upto)?;
        let started = Instant::now();
        self.conn
            .prepare_cached(&format!("DELETE FROM {CHANGE_TABLE} WHERE id <= ?1"))
            .and_then(|mut s| s.execute([upto]))
            .map_err(sql_err(&self.path, started, "releasing sent changes"))?;
        Ok(())
    }

    fn backlog(&mut self, after: &str) -> Result<u64, SourceError> {
        let after = change_id(after)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::{ResourceCode, UpdateCycle};

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
        assert!(
            std::error::Error::source(&err).is_some(),
            "the busy error is kept"
        );
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
