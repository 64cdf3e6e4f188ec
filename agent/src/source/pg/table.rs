//! The configured tables as resolved in the database: columns, types, the
//! key, and how the log identifies their rows.
//!
//! Invariant: a table is captured only when the log identifies its rows by
//! the configured key (its primary key, its replica identity index, or the
//! whole row under REPLICA IDENTITY FULL); otherwise the agent refuses to
//! start, naming the table and what to change.

use shuyuan_protocol::{Column, TableSchema, Value};

use super::pg_err;
use crate::config::ResourceConfig;
use crate::source::SourceError;

/// One shared table as resolved in the database.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) oid: u32,
    /// `schema.table`, quoted for SQL.
    pub(super) sql_name: String,
    pub(super) shape: TableSchema,
    pub(super) types: Vec<u32>,
    /// Without a key of its own the table is read in `ctid` order and its
    /// rows are addressed by their whole content.
    pub(super) whole_row: bool,
    /// REPLICA IDENTITY FULL: updates and deletes carry the whole old row.
    pub(super) full_identity: bool,
}

impl Table {
    pub(super) fn key_of(&self, row: &[Value]) -> Vec<Value> {
        self.shape.key_of(row)
    }

    /// The column names, quoted for SQL, in table order.
    pub(super) fn quoted_columns(&self) -> Vec<String> {
        self.shape
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect()
    }
}

/// `"schema"."table"` for a configured table name.
pub(crate) fn quoted_table(table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("\"{s}\".\"{t}\""),
        None => format!("\"{table}\""),
    }
}

pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Where each named key column sits among `columns`.
pub(super) fn key_indexes(
    table: &str,
    columns: &[Column],
    names: &[String],
) -> Result<Vec<u16>, SourceError> {
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
    let e = pg_err(format!(
        "reading the definition of table {}",
        resource.table
    ));
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
