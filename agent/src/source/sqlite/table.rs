//! The shape of a shared SQLite table, and SQL names quoted for it.
//!
//! Invariant: a table is captured only when its configured key identifies
//! its rows: the key is its primary key or the columns of a unique index
//! that is not partial. Otherwise capture refuses to start, naming the
//! table and the columns.

use std::path::Path;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension};
use shuyuan_protocol::{Column, TableSchema};

use super::sql_err;
use crate::config::ResourceConfig;
use crate::source::SourceError;

/// Reads a table's current shape and checks that `key` identifies its rows.
/// The returned schema has version 0.
pub(super) fn shape(
    conn: &Connection,
    path: &Path,
    r: &ResourceConfig,
) -> Result<TableSchema, SourceError> {
    let started = Instant::now();
    let e = |ctx: &str| sql_err(path, started, ctx);
    let exists = has_table(conn, &r.table).map_err(e("looking up a table"))?;
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

/// Whether the database has a table of that name.
pub(super) fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
}

/// A quoted SQL identifier.
pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"a", "b", ...`: the quoted names, comma-separated.
pub(super) fn quoted_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().map(quote).collect::<Vec<_>>().join(", ")
}
