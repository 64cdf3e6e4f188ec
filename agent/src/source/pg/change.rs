//! One row change from the log, turned into captured changes: the current
//! row (TOASTed values the log left out filled in), and a delete of the old
//! key when the key changed.
//!
//! Invariant: every change of a shared table counts in its transaction,
//! emitted or not, so a transaction cut part way resumes after a restart
//! exactly after the last change the outbox holds; and a change the
//! snapshot of a waiting chunk or probe cannot see updates that chunk's
//! rows, so they stand at the chunk's point of the log.

use shuyuan_protocol::{Op, Value};
use tokio_postgres::SimpleQueryMessage;

use super::decode::{Datum, literal, text_value};
use super::table::{Table, quote_ident};
use super::{PgSource, pg_err};
use crate::source::{Captured, SourceError};

impl PgSource {
    /// The full row for an update whose log record left TOASTed columns out.
    async fn fetch_row(
        &self,
        t: &Table,
        key_text: &[String],
    ) -> Result<Option<Vec<Value>>, SourceError> {
        let cols = t.quoted_columns();
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
        let msgs = self.sql()?.simple_query(&q).await.map_err(pg_err(format!(
            "reading a row of table {} whose large values did not change",
            t.shape.table
        )))?;
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

    /// One row change from the log.
    pub(super) async fn change(
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
        // Rows read in a snapshot that misses this change are brought up to
        // it.
        if let Some(chunk) = self.chunk.as_mut() {
            chunk.drop_unseen(i, xid, &emitted);
        }
        if let Some(chunk) = self.probe_chunk.as_mut() {
            chunk.patch(i, xid, &emitted);
        }
        out.extend(emitted);
        Ok(())
    }
}
