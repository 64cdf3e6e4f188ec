//! Answers to the hub's comparisons of key ranges, for any connector that
//! can read a key range of a table in key order within one snapshot.
//!
//! A scan answers with consecutive [`RangeDigest`]s of at most `chunk_rows`
//! rows each; a split answers with `parts` digests of about equal row
//! counts, or, for a range of at most `leaf_rows` rows, with the rows
//! themselves ([`RangeRepair`]). Every answer covers its range from the
//! requested start without gaps, which is how the hub matches it.
//!
//! Invariant: a row's digest contribution is computed exactly as the hub
//! computes it for its copy: the key values and the whole row under the
//! current shape ([`RowSeed::of`]).

use std::time::Instant;

use shuyuan_protocol::message::VerifyMode;
use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{
    Digest, Entry, KeyRange, Op, RangeDigest, RangeRepair, RowChange, RowSeed, TableSchema, Value,
};

use super::{Probe, SourceError};

/// A row with its key values: `(key, row)`.
pub type KeyedRow = (Vec<Value>, Vec<Value>);

/// Reads the rows of a key range in key order: `(key, row)` pairs, at most
/// `limit` of them.
pub trait RangeReader {
    fn read_range(
        &mut self,
        schema: &TableSchema,
        range: &KeyRange,
        limit: Option<usize>,
    ) -> Result<Vec<KeyedRow>, SourceError>;
}

/// How many rows comparisons may read now: `rate` rows per second at most,
/// so a full scan of a large table stays out of the department's way
/// (`[verify] rows_per_second`).
#[derive(Debug)]
pub struct Budget {
    rate: f64,
    allowance: f64,
    last: Option<Instant>,
}

impl Budget {
    pub fn new(rows_per_second: u64) -> Self {
        let rate = rows_per_second as f64;
        Budget {
            rate,
            allowance: rate,
            last: None,
        }
    }

    /// Refills by the time passed (at most one second's worth).
    pub fn refill(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.allowance = (self.allowance + now.duration_since(last).as_secs_f64() * self.rate)
                .min(self.rate);
        }
        self.last = Some(now);
    }

    fn spend(&mut self, rows: usize) {
        self.allowance -= rows as f64;
    }

    pub fn left(&self) -> bool {
        self.allowance > 0.0
    }
}

fn digest(rows: &[KeyedRow]) -> Digest {
    let mut d = Digest::new();
    for (k, r) in rows {
        d.add(&RowSeed::of(k, r));
    }
    d
}

/// Answers as much of a probe as the budget allows. Returns the entries
/// and whether the probe is done.
pub fn answer(
    probe: &mut Probe,
    schema: &TableSchema,
    reader: &mut dyn RangeReader,
    budget: &mut Budget,
) -> Result<(Vec<Entry>, bool), SourceError> {
    let mut out = Vec::new();
    match probe.mode {
        VerifyMode::Scan { chunk_rows } => {
            let chunk = usize::try_from(chunk_rows.max(1)).unwrap_or(usize::MAX);
            while budget.left() {
                let mut rows = reader.read_range(schema, &probe.range, Some(chunk + 1))?;
                budget.spend(rows.len());
                let hi = if rows.len() > chunk {
                    rows.pop().map(|(k, _)| encode_key(&k))
                } else {
                    probe.range.hi.clone()
                };
                let part = KeyRange {
                    lo: probe.range.lo.clone(),
                    hi: hi.clone(),
                };
                out.push(Entry::RangeDigest(RangeDigest {
                    run: probe.run,
                    range: part,
                    digest: digest(&rows).summary(),
                }));
                if hi == probe.range.hi {
                    return Ok((out, true));
                }
                probe.range.lo = hi.unwrap_or_default();
            }
            Ok((out, false))
        }
        VerifyMode::Split { parts, leaf_rows } => {
            let rows = reader.read_range(schema, &probe.range, None)?;
            budget.spend(rows.len());
            if rows.len() <= usize::from(leaf_rows) {
                out.push(Entry::RangeRepair(RangeRepair {
                    run: probe.run,
                    range: probe.range.clone(),
                    rows: rows
                        .into_iter()
                        .map(|(key, row)| RowChange {
                            op: Op::Update,
                            key,
                            row: Some(row),
                            // Set by the capture loop to the feed's version.
                            schema_version: schema.version,
                        })
                        .collect(),
                }));
                return Ok((out, true));
            }
            let size = rows.len().div_ceil(usize::from(parts.max(2)));
            let chunks: Vec<&[KeyedRow]> = rows.chunks(size).collect();
            for (i, part) in chunks.iter().enumerate() {
                let lo = if i == 0 {
                    probe.range.lo.clone()
                } else {
                    encode_key(&part[0].0)
                };
                let hi = match chunks.get(i + 1) {
                    Some(next) => Some(encode_key(&next[0].0)),
                    None => probe.range.hi.clone(),
                };
                out.push(Entry::RangeDigest(RangeDigest {
                    run: probe.run,
                    range: KeyRange { lo, hi },
                    digest: digest(part).summary(),
                }));
            }
            Ok((out, true))
        }
    }
}

/// Rows of a table read in key order, filtered to the range by their
/// encoded keys (the source's own order could differ for mixed types).
pub fn in_range(schema: &TableSchema, rows: Vec<Vec<Value>>, range: &KeyRange) -> Vec<KeyedRow> {
    rows.into_iter()
        .map(|row| (schema.key_of(&row), row))
        .filter(|(k, _)| range.contains(&encode_key(k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::Column;

    struct Table(Vec<Vec<Value>>);

    impl RangeReader for Table {
        fn read_range(
            &mut self,
            schema: &TableSchema,
            range: &KeyRange,
            limit: Option<usize>,
        ) -> Result<Vec<KeyedRow>, SourceError> {
            let mut rows = in_range(schema, self.0.clone(), range);
            if let Some(l) = limit {
                rows.truncate(l);
            }
            Ok(rows)
        }
    }

    fn schema() -> TableSchema {
        TableSchema {
            version: 3,
            table: "t".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    sql_type: "INTEGER".into(),
                    nullable: false,
                },
                Column {
                    name: "v".into(),
                    sql_type: "TEXT".into(),
                    nullable: true,
                },
            ],
            key: vec![0],
        }
    }

    fn table(n: i64) -> Table {
        Table(
            (0..n)
                .map(|i| vec![Value::Int(i), Value::Text(format!("v{i}"))])
                .collect(),
        )
    }

    fn ranges(entries: &[Entry]) -> Vec<KeyRange> {
        entries
            .iter()
            .map(|e| match e {
                Entry::RangeDigest(d) => d.range.clone(),
                Entry::RangeRepair(r) => r.range.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// Consecutive ranges from `lo` to `hi` with no gap.
    fn covers(parts: &[KeyRange], whole: &KeyRange) -> bool {
        parts.first().is_some_and(|p| p.lo == whole.lo)
            && parts.last().is_some_and(|p| p.hi == whole.hi)
            && parts.windows(2).all(|w| w[0].hi.as_ref() == Some(&w[1].lo))
    }

    #[test]
    fn a_scan_covers_the_table_in_chunks() {
        let mut probe = Probe {
            resource: 0,
            run: 9,
            range: KeyRange::all(),
            mode: VerifyMode::Scan { chunk_rows: 10 },
        };
        let (entries, done) = answer(
            &mut probe,
            &schema(),
            &mut table(35),
            &mut Budget::new(1_000_000),
        )
        .unwrap();
        assert!(done);
        assert_eq!(entries.len(), 4);
        assert!(covers(&ranges(&entries), &KeyRange::all()));
        let rows: u64 = entries
            .iter()
            .map(|e| match e {
                Entry::RangeDigest(d) => d.digest.rows,
                _ => 0,
            })
            .sum();
        assert_eq!(rows, 35);
    }

    #[test]
    fn a_scan_stops_when_the_budget_is_spent_and_resumes() {
        let mut probe = Probe {
            resource: 0,
            run: 9,
            range: KeyRange::all(),
            mode: VerifyMode::Scan { chunk_rows: 10 },
        };
        let mut budget = Budget::new(1000);
        budget.allowance = 15.0;
        let (first, done) = answer(&mut probe, &schema(), &mut table(35), &mut budget).unwrap();
        assert!(!done);
        assert_eq!(first.len(), 2);
        assert_eq!(probe.range.lo, encode_key(&[Value::Int(20)]));
        budget.allowance = 100.0;
        let (rest, done) = answer(&mut probe, &schema(), &mut table(35), &mut budget).unwrap();
        assert!(done);
        let all: Vec<KeyRange> = ranges(&first).into_iter().chain(ranges(&rest)).collect();
        assert!(covers(&all, &KeyRange::all()));
    }

    #[test]
    fn a_split_covers_its_range_and_small_ranges_come_as_rows() {
        let whole = KeyRange {
            lo: encode_key(&[Value::Int(5)]),
            hi: Some(encode_key(&[Value::Int(105)])),
        };
        let mut probe = Probe {
            resource: 0,
            run: 1,
            range: whole.clone(),
            mode: VerifyMode::Split {
                parts: 16,
                leaf_rows: 16,
            },
        };
        let (entries, done) = answer(
            &mut probe,
            &schema(),
            &mut table(200),
            &mut Budget::new(1_000_000),
        )
        .unwrap();
        assert!(done);
        assert_eq!(entries.len(), 15); // 100 rows in parts of 7
        assert!(covers(&ranges(&entries), &whole));

        let small = KeyRange {
            lo: encode_key(&[Value::Int(5)]),
            hi: Some(encode_key(&[Value::Int(9)])),
        };
        let mut probe = Probe {
            resource: 0,
            run: 1,
            range: small.clone(),
            mode: VerifyMode::Split {
                parts: 16,
                leaf_rows: 16,
            },
        };
        let (entries, _) = answer(
            &mut probe,
            &schema(),
            &mut table(200),
            &mut Budget::new(1_000_000),
        )
        .unwrap();
        match entries.as_slice() {
            [Entry::RangeRepair(r)] => {
                assert_eq!(r.range, small);
                assert_eq!(r.rows.len(), 4);
                assert_eq!(r.rows[0].key, vec![Value::Int(5)]);
            }
            other => panic!("{other:?}"),
        }
    }
}
