//! Export of a shared copy, in key order, as CSV or JSON lines.
//!
//! CSV follows PostgreSQL's `COPY ... CSV HEADER` conventions: NULL is an
//! empty unquoted field, an empty string is `""`, bytes are `\x` + hex,
//! booleans `true`/`false`, reals in their shortest exact form with
//! `Infinity`, `-Infinity`, `NaN`. JSON lines give one object per row with
//! the columns in schema order; values are JSON numbers, strings, booleans
//! or null, and types JSON lacks are tagged: `{"decimal": "12.50"}`,
//! `{"hex": "00ff"}`, `{"date": ...}`, `{"time": ...}`, `{"timestamp": ...}`,
//! `{"timestamptz": ...}`, and non-finite reals `{"real": "NaN"}`.
//!
//! Rows written under an older schema version are shown under the current
//! columns by name; a column they did not have is NULL.

use std::collections::BTreeMap;
use std::io::Write;

use shuyuan_protocol::value::hex;
use shuyuan_protocol::{FeedId, TableSchema, Value};

use crate::apply::feed::column_mapping;
use crate::store::{ReadTxn, StoreError};

/// Export formats.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
}

/// Export errors.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Write(#[from] std::io::Error),
}

/// Finds the feed meant by `selector` (`RESOURCE` or `DEPARTMENT:RESOURCE`).
pub fn resolve(
    txn: &dyn ReadTxn,
    selector: &str,
    department: Option<&str>,
) -> Result<FeedId, ExportError> {
    let feeds = txn.feeds()?;
    if selector.contains(':') {
        let feed: FeedId = selector
            .parse()
            .map_err(|e: shuyuan_protocol::feed::CodeError| ExportError::NotFound(e.to_string()))?;
        if feeds.iter().any(|(f, _)| *f == feed) {
            return Ok(feed);
        }
        return Err(ExportError::NotFound(format!("no feed {feed} at this hub")));
    }
    let matches: Vec<FeedId> = feeds
        .into_iter()
        .map(|(f, _)| f)
        .filter(|f| {
            f.resource.as_str() == selector && department.is_none_or(|d| f.department.as_str() == d)
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ExportError::NotFound(format!(
            "no resource {selector} at this hub"
        ))),
        many => Err(ExportError::NotFound(format!(
            "resource {selector} exists for several departments ({}); pass --department",
            many.iter()
                .map(|f| f.department.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Writes the shared copy of `feed` to `out`; returns the number of rows.
pub fn export(
    txn: &dyn ReadTxn,
    feed: &FeedId,
    format: Format,
    out: &mut dyn Write,
) -> Result<u64, ExportError> {
    let record = txn
        .feed(feed)?
        .ok_or_else(|| ExportError::NotFound(format!("no feed {feed} at this hub")))?;
    let Some(schema) = record.schema else {
        return Err(ExportError::NotFound(format!(
            "feed {feed} has no schema yet"
        )));
    };
    let mut line = String::new();
    if format == Format::Csv {
        let header: Vec<String> = schema.columns.iter().map(|c| csv_text(&c.name)).collect();
        writeln!(out, "{}", header.join(","))?;
    }
    let mut n = 0u64;
    let mut io_error = None;
    each_row(txn, feed, &schema, &mut |values| {
        line.clear();
        match format {
            Format::Csv => csv_row(values, &mut line),
            Format::Jsonl => json_row(&schema, values, &mut line),
        }
        line.push('\n');
        if let Err(e) = out.write_all(line.as_bytes()) {
            // The reader went away: stop here.
            io_error = Some(e);
            return Ok(false);
        }
        n += 1;
        Ok(true)
    })?;
    if let Some(e) = io_error {
        return Err(ExportError::Write(e));
    }
    out.flush()?;
    Ok(n)
}

/// The column names and the first `limit` rows of the shared copy, each
/// value as CSV text.
pub fn sample(
    txn: &dyn ReadTxn,
    feed: &FeedId,
    limit: usize,
) -> Result<(Vec<String>, Vec<Vec<String>>), StoreError> {
    let Some(schema) = txn.feed(feed)?.and_then(|r| r.schema) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut rows = Vec::new();
    if limit > 0 {
        each_row(txn, feed, &schema, &mut |values| {
            let mut cells = Vec::with_capacity(values.len());
            for v in values {
                let mut cell = String::new();
                csv_row(&[v], &mut cell);
                cells.push(cell);
            }
            rows.push(cells);
            Ok(rows.len() < limit)
        })?;
    }
    let columns = schema.columns.iter().map(|c| c.name.clone()).collect();
    Ok((columns, rows))
}

/// Visits the rows of a feed in key order, each mapped to the current
/// schema's columns (columns a row's older schema lacks are null), until
/// `visit` returns `false`.
fn each_row(
    txn: &dyn ReadTxn,
    feed: &FeedId,
    schema: &TableSchema,
    visit: &mut dyn FnMut(&[&Value]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut older: BTreeMap<u32, Option<Vec<Option<usize>>>> = BTreeMap::new();
    txn.rows(feed, &[], None, &mut |_, row| {
        let values: Vec<&Value> = if row.schema_version == schema.version {
            row.values.iter().collect()
        } else {
            let mapping = match older.get(&row.schema_version) {
                Some(m) => m.clone(),
                None => {
                    let m = txn
                        .schema(feed, row.schema_version)?
                        .map(|old| column_mapping(&old, schema));
                    older.insert(row.schema_version, m.clone());
                    m
                }
            };
            match mapping {
                Some(m) => m
                    .iter()
                    .map(|i| i.and_then(|i| row.values.get(i)).unwrap_or(&Value::Null))
                    .collect(),
                None => row.values.iter().collect(),
            }
        };
        visit(&values)
    })
}

fn csv_text(s: &str) -> String {
    if s.is_empty() || s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn real_text(r: f64) -> String {
    if r.is_nan() {
        "NaN".into()
    } else if r.is_infinite() {
        if r > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        format!("{r:?}")
    }
}

fn csv_row(values: &[&Value], out: &mut String) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            Value::Null => {}
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(x) => out.push_str(&x.to_string()),
            Value::Real(r) => out.push_str(&real_text(*r)),
            Value::Bytes(b) => {
                out.push_str("\\x");
                out.push_str(&hex(b));
            }
            Value::Decimal(t)
            | Value::Text(t)
            | Value::Date(t)
            | Value::Time(t)
            | Value::Timestamp(t)
            | Value::TimestampTz(t) => out.push_str(&csv_text(t)),
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn tagged(tag: &str, text: &str) -> String {
    format!("{{\"{tag}\":{}}}", json_string(text))
}

fn json_row(schema: &TableSchema, values: &[&Value], out: &mut String) {
    out.push('{');
    for (i, (c, v)) in schema.columns.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(&c.name));
        out.push(':');
        let text = match v {
            Value::Null => "null".to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Int(x) => x.to_string(),
            Value::Real(r) if r.is_finite() => format!("{r:?}"),
            Value::Real(r) => tagged("real", &real_text(*r)),
            Value::Text(t) => json_string(t),
            Value::Decimal(t) => tagged("decimal", t),
            Value::Bytes(b) => tagged("hex", &hex(b)),
            Value::Date(t) => tagged("date", t),
            Value::Time(t) => tagged("time", t),
            Value::Timestamp(t) => tagged("timestamp", t),
            Value::TimestampTz(t) => tagged("timestamptz", t),
        };
        out.push_str(&text);
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::Column;

    #[test]
    fn csv_and_json_forms() {
        let schema = TableSchema {
            version: 1,
            table: "t".into(),
            columns: ["a", "b", "c", "d", "e", "f"]
                .iter()
                .map(|n| Column {
                    name: n.to_string(),
                    sql_type: String::new(),
                    nullable: true,
                })
                .collect(),
            key: vec![0],
        };
        let vals = [
            Value::Int(-3),
            Value::Null,
            Value::Text(String::new()),
            Value::Text("a,\"b\"".into()),
            Value::Bytes(vec![0, 255]),
            Value::Real(0.1),
        ];
        let refs: Vec<&Value> = vals.iter().collect();
        let mut s = String::new();
        csv_row(&refs, &mut s);
        assert_eq!(s, "-3,,\"\",\"a,\"\"b\"\"\",\\x00ff,0.1");
        s.clear();
        json_row(&schema, &refs, &mut s);
        assert_eq!(
            s,
            r#"{"a":-3,"b":null,"c":"","d":"a,\"b\"","e":{"hex":"00ff"},"f":0.1}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(parsed["f"].as_f64(), Some(0.1));
        assert_eq!(real_text(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(real_text(1e300), "1e300");
    }
}
