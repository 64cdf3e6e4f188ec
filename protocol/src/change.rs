//! The change model: what a capture connector yields and a batch carries.
//!
//! A [`RowChange`] is the full new state of one row (or its deletion),
//! addressed by its key, under a numbered [`TableSchema`]. Full rows rather
//! than column diffs make applying idempotent: applying a change twice leaves
//! the same row as applying it once.

use serde::{Deserialize, Serialize};

use crate::value::Value;

/// What happened to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// One row change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowChange {
    pub op: Op,
    /// The key column values, in the schema's key order.
    pub key: Vec<Value>,
    /// The whole new row in the schema's column order; `None` for a delete.
    pub row: Option<Vec<Value>>,
    /// The [`TableSchema::version`] the row was read under.
    pub schema_version: u32,
}

/// One column of a shared table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The type as the source declares it (for example `VARCHAR(18)`).
    pub sql_type: String,
    pub nullable: bool,
}

/// The shape of a shared table at one version. Schema versions of a feed
/// start at 1 and increase by one with every change of shape; each new
/// version travels in the feed as an explicit entry before the rows that use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub version: u32,
    /// The source table's name.
    pub table: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the key columns, in key order.
    pub key: Vec<u16>,
}

/// A change that does not fit its schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("schema has no columns")]
    NoColumns,
    #[error("schema has no key columns")]
    NoKey,
    #[error("key column index {0} is out of range")]
    KeyOutOfRange(u16),
    #[error("column {0:?} appears twice")]
    DuplicateColumn(String),
    #[error("change is for schema version {got} but the feed is at version {expected}")]
    SchemaVersion { expected: u32, got: u32 },
    #[error("key has {got} values, schema has {expected} key columns")]
    KeyArity { expected: usize, got: usize },
    #[error("row has {got} values, schema has {expected} columns")]
    RowArity { expected: usize, got: usize },
    #[error("a {0:?} change must carry a row")]
    MissingRow(Op),
    #[error("a delete must not carry a row")]
    DeleteWithRow,
    #[error("key column {column:?} is {row:?} in the row but {key:?} in the key")]
    KeyMismatch {
        column: String,
        key: Value,
        row: Value,
    },
    #[error("key column {0:?} is NULL")]
    NullKey(String),
    #[error("column {column:?}: {source}")]
    BadValue {
        column: String,
        source: crate::value::ValueError,
    },
}

impl TableSchema {
    /// Checks the schema itself.
    pub fn validate(&self) -> Result<(), ShapeError> {
        if self.columns.is_empty() {
            return Err(ShapeError::NoColumns);
        }
        if self.key.is_empty() {
            return Err(ShapeError::NoKey);
        }
        for &k in &self.key {
            if usize::from(k) >= self.columns.len() {
                return Err(ShapeError::KeyOutOfRange(k));
            }
        }
        let mut names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ShapeError::DuplicateColumn(w[0].to_string()));
        }
        Ok(())
    }

    /// The key columns' names, in key order.
    pub fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .filter_map(|&k| self.columns.get(usize::from(k)))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Picks the key values out of a full row.
    pub fn key_of(&self, row: &[Value]) -> Vec<Value> {
        self.key
            .iter()
            .filter_map(|&k| row.get(usize::from(k)).cloned())
            .collect()
    }

    /// Checks that `change` fits this schema: arities, key values consistent
    /// with the row, no NULL key, every value well-formed.
    /// Whether the key is every column: a table without a key of its own
    /// (PostgreSQL's REPLICA IDENTITY FULL) is addressed by its whole row,
    /// and NULL is then an ordinary value of the key, as in `IS NOT DISTINCT
    /// FROM`. Rows equal in every column are one row in the shared copy.
    pub fn whole_row_key(&self) -> bool {
        self.key.len() == self.columns.len()
    }

    pub fn check(&self, change: &RowChange) -> Result<(), ShapeError> {
        if change.schema_version != self.version {
            return Err(ShapeError::SchemaVersion {
                expected: self.version,
                got: change.schema_version,
            });
        }
        if change.key.len() != self.key.len() {
            return Err(ShapeError::KeyArity {
                expected: self.key.len(),
                got: change.key.len(),
            });
        }
        for (i, v) in change.key.iter().enumerate() {
            let column = self.key_column_name(i);
            if *v == Value::Null && !self.whole_row_key() {
                return Err(ShapeError::NullKey(column));
            }
            v.check()
                .map_err(|source| ShapeError::BadValue { column, source })?;
        }
        match (&change.op, &change.row) {
            (Op::Delete, None) => Ok(()),
            (Op::Delete, Some(_)) => Err(ShapeError::DeleteWithRow),
            (op, None) => Err(ShapeError::MissingRow(*op)),
            (_, Some(row)) => {
                if row.len() != self.columns.len() {
                    return Err(ShapeError::RowArity {
                        expected: self.columns.len(),
                        got: row.len(),
                    });
                }
                for (v, c) in row.iter().zip(&self.columns) {
                    v.check().map_err(|source| ShapeError::BadValue {
                        column: c.name.clone(),
                        source,
                    })?;
                }
                for (i, &k) in self.key.iter().enumerate() {
                    let in_row = &row[usize::from(k)];
                    if *in_row != change.key[i] {
                        return Err(ShapeError::KeyMismatch {
                            column: self.key_column_name(i),
                            key: change.key[i].clone(),
                            row: in_row.clone(),
                        });
                    }
                }
                Ok(())
            }
        }
    }

    fn key_column_name(&self, i: usize) -> String {
        self.key
            .get(i)
            .and_then(|&k| self.columns.get(usize::from(k)))
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> TableSchema {
        TableSchema {
            version: 1,
            table: "household".into(),
            columns: vec![
                Column {
                    name: "id_number".into(),
                    sql_type: "TEXT".into(),
                    nullable: false,
                },
                Column {
                    name: "name".into(),
                    sql_type: "TEXT".into(),
                    nullable: true,
                },
            ],
            key: vec![0],
        }
    }

    fn upsert(key: &str, name: Value) -> RowChange {
        RowChange {
            op: Op::Insert,
            key: vec![Value::Text(key.into())],
            row: Some(vec![Value::Text(key.into()), name]),
            schema_version: 1,
        }
    }

    #[test]
    fn checks_shape() {
        let s = schema();
        s.validate().unwrap();
        assert!(s.check(&upsert("330102199001011234", Value::Null)).is_ok());
        let mut c = upsert("a", Value::Text("x".into()));
        c.key = vec![Value::Text("b".into())];
        assert!(matches!(s.check(&c), Err(ShapeError::KeyMismatch { .. })));
        let mut c = upsert("a", Value::Null);
        c.schema_version = 2;
        assert!(matches!(s.check(&c), Err(ShapeError::SchemaVersion { .. })));
        let c = RowChange {
            op: Op::Delete,
            key: vec![Value::Text("a".into())],
            row: Some(vec![]),
            schema_version: 1,
        };
        assert_eq!(s.check(&c), Err(ShapeError::DeleteWithRow));
        let c = RowChange {
            op: Op::Delete,
            key: vec![Value::Null],
            row: None,
            schema_version: 1,
        };
        assert!(matches!(s.check(&c), Err(ShapeError::NullKey(_))));
        let mut bad = s.clone();
        bad.key = vec![5];
        assert!(bad.validate().is_err());
    }
}
