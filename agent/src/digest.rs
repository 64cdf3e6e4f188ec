//! The agent's digest of each feed: what the rows the feed has described
//! add up to, kept up to date entry by entry as batches are sealed, and sent
//! as checkpoints so the hub can prove its copy equals the feed.
//!
//! Each row's 64-byte seed is remembered (in the outbox file) so that an
//! update or a delete can subtract what the row contributed without the
//! agent keeping the row. Re-reads and range repairs are mirrored exactly
//! as the hub applies them: at a re-read's end, rows no entry wrote since it
//! began are gone; after a range repair, the range holds exactly its rows.
//!
//! Invariant: the digest and the seeds are committed in the same outbox
//! transaction as the batches they describe.

use std::collections::BTreeMap;

use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{Digest, Entry, KeyRange, Resync, RowSeed};

use crate::outbox::{FeedDigest, OutboxError, SeedEntry, SeedReader};

/// Row seeds written in this step, on top of the stored ones (`None`: the
/// row is gone).
pub type Overlay = BTreeMap<Vec<u8>, Option<SeedEntry>>;

/// Follows one feed's entries through its digest.
#[derive(Debug)]
pub struct Tracker<'a> {
    pub feed: &'a str,
    pub reader: &'a SeedReader,
    pub overlay: &'a mut Overlay,
}

impl Tracker<'_> {
    fn current(&self, key: &[u8]) -> Result<Option<SeedEntry>, OutboxError> {
        match self.overlay.get(key) {
            Some(e) => Ok(*e),
            None => self.reader.get(self.feed, key),
        }
    }

    /// The rows present in a range, stored or written in this step.
    fn present(&self, range: &KeyRange) -> Result<Vec<(Vec<u8>, SeedEntry)>, OutboxError> {
        let mut rows: BTreeMap<Vec<u8>, Option<SeedEntry>> = self
            .reader
            .range(self.feed, range)?
            .into_iter()
            .map(|(k, e)| (k, Some(e)))
            .collect();
        for (k, e) in self.overlay.iter() {
            if range.contains(k) {
                rows.insert(k.clone(), *e);
            }
        }
        Ok(rows
            .into_iter()
            .filter_map(|(k, e)| e.map(|e| (k, e)))
            .collect())
    }

    fn set(
        &mut self,
        d: &mut Digest,
        key: Vec<u8>,
        new: Option<SeedEntry>,
    ) -> Result<(), OutboxError> {
        if let Some((old, _)) = self.current(&key)? {
            d.remove(&old);
        }
        if let Some((seed, _)) = &new {
            d.add(seed);
        }
        self.overlay.insert(key, new);
        Ok(())
    }

    /// Applies a feed's entries, in order, to its digest state.
    pub fn apply(&mut self, state: &mut FeedDigest, entries: &[Entry]) -> Result<(), OutboxError> {
        let mut d = state.digest();
        for entry in entries {
            let generation = state.resync.unwrap_or(0);
            match entry {
                Entry::Change(c) => {
                    let new = c
                        .row
                        .as_ref()
                        .map(|row| (RowSeed::of(&c.key, row), generation));
                    self.set(&mut d, encode_key(&c.key), new)?;
                }
                Entry::Resync(Resync::Begin { id, .. }) => state.resync = Some(*id),
                Entry::Resync(Resync::End { id, .. }) => {
                    if state.resync != Some(*id) {
                        continue;
                    }
                    for (k, (_, written_by)) in self.present(&KeyRange::all())? {
                        if written_by != *id {
                            self.set(&mut d, k, None)?;
                        }
                    }
                    state.resync = None;
                }
                Entry::RangeRepair(r) => {
                    let keep: BTreeMap<Vec<u8>, SeedEntry> = r
                        .rows
                        .iter()
                        .filter_map(|c| {
                            let row = c.row.as_ref()?;
                            Some((encode_key(&c.key), (RowSeed::of(&c.key, row), generation)))
                        })
                        .collect();
                    for (k, _) in self.present(&r.range)? {
                        if !keep.contains_key(&k) {
                            self.set(&mut d, k, None)?;
                        }
                    }
                    for (k, e) in keep {
                        self.set(&mut d, k, Some(e))?;
                    }
                }
                Entry::Schema(_)
                | Entry::ZeroUpdate(_)
                | Entry::Checkpoint(_)
                | Entry::RangeDigest(_) => {}
            }
        }
        state.digest = d.to_bytes();
        Ok(())
    }
}
