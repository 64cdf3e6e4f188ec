//! Key ranges of a PostgreSQL table for comparisons with the hub: which key
//! types sort the same in PostgreSQL as in [`encode_key`], the SQL that
//! reads a range in that order, and the rows of a probe chunk kept in
//! memory (patched from the log) as a [`RangeReader`].
//!
//! Invariant: a probe's range is read from PostgreSQL only when every key
//! column sorts in SQL (`ORDER BY`, row comparisons) exactly as its encoded
//! key bytes do; otherwise the probe is refused. A `LIMIT` then reads
//! exactly the first rows of the range in encoded-key order.

use std::collections::BTreeMap;
use std::ops::Bound;

use shuyuan_protocol::value::decode_key;
use shuyuan_protocol::{KeyRange, TableSchema, Value};

use super::Table;
use super::decode::literal;
use super::table::quote_ident;
use crate::source::SourceError;
use crate::source::probe::{KeyedRow, RangeReader};

const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const UUID: u32 = 2950;

/// How a key column compares at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Bool,
    /// Compared by its UTF-8 bytes (`COLLATE "C"`).
    Text,
    /// `uuid`: printed as lower-case hex, compared bytewise.
    Uuid,
    /// `date`/`timestamp`: their ISO text sorts like the value for years
    /// 1 to 9999 (others are refused by [`guard`]).
    Dated,
}

fn kind(ty: u32) -> Option<Kind> {
    match ty {
        INT2 | INT4 | INT8 | OID => Some(Kind::Int),
        BOOL => Some(Kind::Bool),
        TEXT | VARCHAR => Some(Kind::Text),
        UUID => Some(Kind::Uuid),
        DATE | TIMESTAMP => Some(Kind::Dated),
        _ => None,
    }
}

/// One key column as probes read it.
#[derive(Debug, Clone)]
pub(super) struct KeyCol {
    kind: Kind,
    ty: u32,
    /// The quoted column name.
    name: String,
    /// The type to cast bound literals to.
    cast: String,
}

impl KeyCol {
    /// The column in `ORDER BY` and comparisons.
    fn expr(&self) -> String {
        match self.kind {
            Kind::Text => format!("{} COLLATE \"C\"", self.name),
            _ => self.name.clone(),
        }
    }

    /// Whether a value has the form the connector gives this column's
    /// values (and so sorts among them as at the source).
    fn fits(&self, v: &Value) -> bool {
        match (self.kind, v) {
            (Kind::Int, Value::Int(_))
            | (Kind::Bool, Value::Bool(_))
            | (Kind::Text | Kind::Uuid, Value::Text(_)) => true,
            (Kind::Dated, Value::Date(_)) => self.ty == DATE,
            (Kind::Dated, Value::Timestamp(_)) => self.ty == TIMESTAMP,
            _ => false,
        }
    }

    fn literal(&self, v: &Value) -> String {
        let text = match v {
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => if *b { "t" } else { "f" }.to_string(),
            Value::Text(t) | Value::Date(t) | Value::Timestamp(t) => t.clone(),
            other => format!("{other:?}"),
        };
        literal(&text, &self.cast)
    }
}

/// The key columns of a table, or why its ranges cannot be compared.
pub(super) fn key_cols(t: &Table) -> Result<Vec<KeyCol>, SourceError> {
    let table = &t.shape.table;
    if t.whole_row {
        return Err(SourceError::Unsupported(format!(
            "cannot compare table {table} with the hub: it has no key (rows are addressed by their whole content)"
        )));
    }
    t.shape
        .key
        .iter()
        .map(|&k| {
            let c = &t.shape.columns[usize::from(k)];
            let ty = t.types.get(usize::from(k)).copied().unwrap_or(0);
            let refuse = |why: &str| {
                SourceError::Unsupported(format!(
                    "cannot compare table {table} with the hub: key column {} ({}) {why}; comparison ranges need keys that sort the same at the source and the hub: integer, text, varchar, uuid, boolean, date or timestamp without time zone, NOT NULL",
                    c.name, c.sql_type
                ))
            };
            let kind = kind(ty).ok_or_else(|| refuse("sorts differently at the hub"))?;
            if c.nullable {
                return Err(refuse("may be NULL"));
            }
            let cast = match kind {
                Kind::Text => "text".to_string(),
                _ => c.sql_type.clone(),
            };
            Ok(KeyCol {
                kind,
                ty,
                name: quote_ident(&c.name),
                cast,
            })
        })
        .collect()
}

/// The values of an encoded range bound, checked against the key columns.
fn bound(table: &str, keys: &[KeyCol], bytes: &[u8]) -> Result<Vec<Value>, SourceError> {
    let bad = || {
        SourceError::Unsupported(format!(
            "the hub sent a range bound that is not a key of table {table}"
        ))
    };
    let values = decode_key(bytes).ok_or_else(bad)?;
    if values.len() != keys.len() || !keys.iter().zip(&values).all(|(k, v)| k.fits(v)) {
        return Err(bad());
    }
    Ok(values)
}

/// Checks that a range's bounds are keys of the table.
pub(super) fn check_range(t: &Table, keys: &[KeyCol], range: &KeyRange) -> Result<(), SourceError> {
    if !range.lo.is_empty() {
        bound(&t.shape.table, keys, &range.lo)?;
    }
    if let Some(hi) = &range.hi {
        bound(&t.shape.table, keys, hi)?;
    }
    Ok(())
}

/// An SQL boolean: some row has a date/timestamp key outside years 1 to
/// 9999 (infinity, BC, five-digit years), whose text sorts differently.
pub(super) fn guard(t: &Table, keys: &[KeyCol]) -> String {
    let conds: Vec<String> = keys
        .iter()
        .filter(|k| k.kind == Kind::Dated)
        .map(|k| {
            format!(
                "NOT ({n} >= '0001-01-01'::{c} AND {n} < '10000-01-01'::{c})",
                n = k.name,
                c = k.cast
            )
        })
        .collect();
    if conds.is_empty() {
        "false".into()
    } else {
        format!(
            "EXISTS (SELECT 1 FROM {} WHERE {})",
            t.sql_name,
            conds.join(" OR ")
        )
    }
}

/// The `SELECT` of a range's rows in key order (at most `limit`).
pub(super) fn select(
    t: &Table,
    keys: &[KeyCol],
    range: &KeyRange,
    limit: Option<usize>,
) -> Result<String, SourceError> {
    let cols = t.quoted_columns();
    let exprs: Vec<String> = keys.iter().map(KeyCol::expr).collect();
    let row = format!("({})", exprs.join(", "));
    let lits = |values: &[Value]| {
        keys.iter()
            .zip(values)
            .map(|(k, v)| k.literal(v))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut conds = Vec::new();
    if !range.lo.is_empty() {
        let lo = bound(&t.shape.table, keys, &range.lo)?;
        conds.push(format!("{row} >= ({})", lits(&lo)));
    }
    if let Some(hi) = &range.hi {
        let hi = bound(&t.shape.table, keys, hi)?;
        conds.push(format!("{row} < ({})", lits(&hi)));
    }
    let mut sql = format!("SELECT {} FROM {}", cols.join(", "), t.sql_name);
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(&format!(" ORDER BY {}", exprs.join(", ")));
    if let Some(l) = limit {
        sql.push_str(&format!(" LIMIT {l}"));
    }
    Ok(sql)
}

/// Whether every key in the map has the form its column's values take.
pub(super) fn keys_fit(keys: &[KeyCol], rows: &BTreeMap<Vec<u8>, KeyedRow>) -> bool {
    rows.values()
        .all(|(k, _)| k.len() == keys.len() && keys.iter().zip(k).all(|(c, v)| c.fits(v)))
}

/// The rows of a probe chunk, by encoded key.
pub(super) struct Rows<'a>(pub(super) &'a BTreeMap<Vec<u8>, KeyedRow>);

impl RangeReader for Rows<'_> {
    fn read_range(
        &mut self,
        _schema: &TableSchema,
        range: &KeyRange,
        limit: Option<usize>,
    ) -> Result<Vec<KeyedRow>, SourceError> {
        let upper = match &range.hi {
            Some(hi) => Bound::Excluded(hi.clone()),
            None => Bound::Unbounded,
        };
        Ok(self
            .0
            .range((Bound::Included(range.lo.clone()), upper))
            .take(limit.unwrap_or(usize::MAX))
            .map(|(_, r)| r.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::Column;
    use shuyuan_protocol::value::encode_key;

    fn table(types: &[u32], nullable: bool) -> Table {
        Table {
            oid: 1,
            sql_name: "\"public\".\"t\"".into(),
            shape: TableSchema {
                version: 0,
                table: "public.t".into(),
                columns: types
                    .iter()
                    .enumerate()
                    .map(|(i, _)| Column {
                        name: format!("c{i}"),
                        sql_type: "x".into(),
                        nullable,
                    })
                    .collect(),
                key: (0..types.len()).map(|i| i as u16).collect(),
            },
            types: types.to_vec(),
            whole_row: false,
            full_identity: false,
        }
    }

    #[test]
    fn keys_that_sort_differently_are_refused() {
        assert!(key_cols(&table(&[INT4, TEXT], false)).is_ok());
        let e = key_cols(&table(&[1700], false)).unwrap_err().to_string();
        assert!(e.contains("public.t") && e.contains("c0"), "{e}");
        assert!(key_cols(&table(&[INT4], true)).is_err());
    }

    #[test]
    fn text_ranges_compare_bytewise() {
        let t = table(&[INT8, TEXT], false);
        let keys = key_cols(&t).unwrap();
        let range = KeyRange {
            lo: encode_key(&[Value::Int(1), Value::Text("a'b".into())]),
            hi: None,
        };
        let sql = select(&t, &keys, &range, Some(5)).unwrap();
        assert_eq!(
            sql,
            "SELECT \"c0\", \"c1\" FROM \"public\".\"t\" WHERE (\"c0\", \"c1\" COLLATE \"C\") >= ('1'::x, 'a''b'::text) ORDER BY \"c0\", \"c1\" COLLATE \"C\" LIMIT 5"
        );
        let bad = KeyRange {
            lo: encode_key(&[Value::Int(1)]),
            hi: None,
        };
        assert!(check_range(&t, &keys, &bad).is_err());
    }
}
