//! The content of a batch, checked whole before any of it is applied.
//!
//! Invariant: every schema entry is valid and the next version; every row
//! change and repaired row fits the schema in force at its place in the
//! batch; a repaired row lies inside its range. A batch that breaks any of
//! this is refused as invalid content and changes nothing.

use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{Entry, TableSchema};

/// Checks every entry against the feed's schema as it evolves within the
/// batch, before anything is applied.
pub fn check(current: Option<&TableSchema>, entries: &[Entry]) -> Result<(), String> {
    let mut schema = current.cloned();
    for (i, entry) in entries.iter().enumerate() {
        match entry {
            Entry::Schema(s) => {
                s.validate()
                    .map_err(|e| format!("entry {i}: schema: {e}"))?;
                let expected = schema.as_ref().map_or(1, |c| c.version + 1);
                if s.version != expected {
                    return Err(format!(
                        "entry {i}: schema version {} but {expected} expected",
                        s.version
                    ));
                }
                schema = Some(s.clone());
            }
            Entry::Change(c) => {
                let s = schema
                    .as_ref()
                    .ok_or_else(|| format!("entry {i}: row change before any schema"))?;
                s.check(c).map_err(|e| format!("entry {i}: {e}"))?;
            }
            Entry::RangeRepair(r) => {
                let s = schema
                    .as_ref()
                    .ok_or_else(|| format!("entry {i}: range repair before any schema"))?;
                for c in &r.rows {
                    s.check(c).map_err(|e| format!("entry {i}: {e}"))?;
                    if !r.range.contains(&encode_key(&c.key)) {
                        return Err(format!(
                            "entry {i}: repair row {:?} is outside its range {}",
                            c.key, r.range
                        ));
                    }
                }
            }
            Entry::ZeroUpdate(_)
            | Entry::Resync(_)
            | Entry::Checkpoint(_)
            | Entry::RangeDigest(_) => {}
        }
    }
    Ok(())
}
