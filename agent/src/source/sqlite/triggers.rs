//! Capture triggers: `triggers install` and `triggers uninstall`, and the
//! check that they are in place before capture starts.
//!
//! The triggers copy only the key of every inserted, updated or deleted row
//! into the change table (an update that changes the key records a delete
//! of the old key), which keeps the cost on the department's own writes
//! small.
//!
//! Invariants: an install is one transaction and idempotent, and it queues
//! the keys of the rows already in the table, so the hub receives the whole
//! table; capture starts only when every resource has all three triggers
//! for the configured key; an uninstall refuses while captured changes of
//! its tables wait (unless forced), so nothing is dropped unnoticed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use shuyuan_protocol::ResourceCode;

use super::table::has_table;
use super::{CAPTURE_TABLE, CHANGE_TABLE, open_connection, shape, sql_err};
use crate::config::{MAX_KEY_COLUMNS, ResourceConfig};
use crate::source::SourceError;

const TRIGGER_SUFFIXES: [&str; 3] = ["ins", "upd", "del"];

fn trigger_name(table: &str, suffix: &str) -> String {
    format!("_shuyuan_{table}_{suffix}")
}

/// The tables with capture triggers, and the key each was installed for.
pub(super) fn installed(
    conn: &Connection,
    path: &Path,
    started: Instant,
) -> Result<BTreeMap<String, String>, SourceError> {
    let e = sql_err(path, started, "checking capture tables");
    if !has_table(conn, CAPTURE_TABLE).map_err(&e)? {
        return Ok(BTreeMap::new());
    }
    let mut stmt = conn
        .prepare(&format!("SELECT tbl, key_columns FROM {CAPTURE_TABLE}"))
        .map_err(&e)?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(&e)?
        .collect::<Result<_, _>>()
        .map_err(&e)
}

/// Checks that a resource's table has its three triggers, installed for the
/// configured key.
pub(super) fn check(
    conn: &Connection,
    path: &Path,
    started: Instant,
    installed: &BTreeMap<String, String>,
    r: &ResourceConfig,
) -> Result<(), SourceError> {
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
    Ok(())
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
    let has_change_table = has_table(&tx, CHANGE_TABLE).map_err(e("checking capture tables"))?;
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
