//! From a source read to sealed batches: each feed's entries (its shape,
//! changes and re-read marks in the order the source read them, then the
//! answers to comparisons), its digest brought up to them, a checkpoint
//! when due, and the batches sealed from them, all in one outbox commit
//! with the position the read covers.
//!
//! Invariants: the batches, the feed states, the digests and row seeds,
//! and the source position are committed in one outbox transaction, so a
//! crash between reading and committing neither skips nor repeats a
//! change; a read is no larger than the outbox has room for, judging by
//! the size of recent changes, so a full outbox is overrun by little.

use std::time::Duration;

use shuyuan_protocol::{Entry, FeedId, Resync, RowChange, UnixMillis};

use super::compare::place_answers;
use super::{CaptureError, CaptureLoop};
use crate::digest::{Overlay, Tracker};
use crate::outbox::{Commit, FeedDigest, FeedState, SeedReader};
use crate::seal::{BatchLimits, seal_entries};
use crate::source::{Captured, SourceRead};

/// A busy feed carries its digest (a checkpoint) at least this often; a
/// quiet one with every zero-update.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

impl CaptureLoop {
    /// How many changes the next read may take: no more than the outbox
    /// has room for, judging by the size of recent changes.
    pub(super) fn read_limit(&self) -> usize {
        let room = self.config.outbox.max_bytes - self.totals.bytes;
        let fits = usize::try_from(room / self.bytes_per_change.max(1)).unwrap_or(usize::MAX);
        self.config
            .outbox
            .batch_max_changes
            .saturating_mul(10)
            .min(fits)
            .max(1)
    }

    /// Seals a read into `commit`, with `feeds` the feed states it
    /// changes; returns every feed's digest after it and the feeds that
    /// carried a checkpoint.
    pub(super) fn seal_read(
        &mut self,
        read: SourceRead,
        feeds: &mut [(FeedId, FeedState)],
        commit: &mut Commit,
        now: UnixMillis,
    ) -> Result<(Vec<FeedDigest>, Vec<usize>), CaptureError> {
        self.skipped_null_keys += read.skipped_null_keys;
        let mut entries: Vec<Vec<Entry>> = vec![Vec::new(); feeds.len()];
        if let Some(shapes) = read.shapes {
            self.record_shapes(shapes, feeds, &mut entries, now);
        }
        let has_changes = place_changes(read.changes, read.marks, feeds, &mut entries);
        self.probes_pending = read.probes_pending;
        place_answers(read.probes, feeds, &mut entries);
        // Opened by the first feed with entries (an idle read needs none).
        let mut seeds = None;
        let mut digests = self.digests.clone();
        let mut checkpointed = Vec::new();
        for (i, es) in entries.into_iter().enumerate() {
            let (feed, state) = &mut feeds[i];
            let mut es = if es.is_empty() {
                // Quiet resource: is a zero-update due?
                match self.zero_update(i, state, read.complete, &read.position, now) {
                    Some(zero) => vec![zero],
                    None => continue,
                }
            } else {
                es
            };
            let reader = match &mut seeds {
                Some(r) => r,
                None => seeds.insert(self.outbox.seeds()?),
            };
            let last = self.last_checkpoint[i];
            if track_digest(last, feed, &mut es, &mut digests[i], reader, commit, now)? {
                checkpointed.push(i);
            }
            self.seal_batches(feed, state, es, has_changes[i], commit, now)?;
        }
        // No read transaction may outlive the read: a failed commit
        // reopens the file.
        drop(seeds);
        if read.position != self.position {
            commit.position = Some(read.position);
        }
        Ok((digests, checkpointed))
    }

    /// Seals one feed's entries into batches appended by the commit.
    fn seal_batches(
        &mut self,
        feed: &FeedId,
        state: &mut FeedState,
        es: Vec<Entry>,
        changed: bool,
        commit: &mut Commit,
        now: UnixMillis,
    ) -> Result<(), CaptureError> {
        if changed {
            state.last_change_at = Some(now);
        }
        let n = es.len() as u64;
        let limits = BatchLimits {
            max_changes: self.config.outbox.batch_max_changes,
            max_bytes: self.config.outbox.batch_max_bytes,
        };
        let sealed = seal_entries(&self.key, feed, state, es, now, limits)?;
        let bytes: u64 = sealed.iter().map(|(_, b)| b.len() as u64).sum();
        if changed {
            self.bytes_per_change = (bytes / n.max(1)).max(1);
        }
        for (seq, bytes) in sealed {
            tracing::debug!(%feed, seq, bytes = bytes.len(), "batch sealed");
            commit.appended.push((feed.clone(), seq, bytes));
        }
        Ok(())
    }
}

/// Brings a feed's digest up to its entries (the row seeds they change go
/// into the commit, with the digest) and adds a checkpoint when due: at
/// least every [`CHECKPOINT_INTERVAL`] after `last_checkpoint`, and with
/// every zero-update, range repair and re-read end. Returns whether it
/// added one.
fn track_digest(
    last_checkpoint: Option<UnixMillis>,
    feed: &FeedId,
    es: &mut Vec<Entry>,
    digest: &mut FeedDigest,
    reader: &SeedReader,
    commit: &mut Commit,
    now: UnixMillis,
) -> Result<bool, CaptureError> {
    let feed_text = feed.to_string();
    let mut overlay = Overlay::new();
    Tracker {
        feed: &feed_text,
        reader,
        overlay: &mut overlay,
    }
    .apply(digest, es)?;
    let due = last_checkpoint.is_none_or(|t| now.since(t) >= CHECKPOINT_INTERVAL)
        || es.iter().any(|e| {
            matches!(
                e,
                Entry::ZeroUpdate(_) | Entry::RangeRepair(_) | Entry::Resync(Resync::End { .. })
            )
        });
    let checkpoint = digest.established && due;
    if checkpoint {
        es.push(Entry::Checkpoint(digest.digest().summary()));
    }
    commit
        .seeds
        .extend(overlay.into_iter().map(|(k, e)| (feed.clone(), k, e)));
    commit.digests.push((feed.clone(), digest.clone()));
    Ok(checkpoint)
}

/// Places a read's changes and re-read marks in their feeds' entries, in
/// the order the source read them, each change under its feed's current
/// shape version. Returns which feeds had changes.
fn place_changes(
    changes: Vec<Captured>,
    marks: Vec<(usize, usize, Resync)>,
    feeds: &[(FeedId, FeedState)],
    entries: &mut [Vec<Entry>],
) -> Vec<bool> {
    let mut has_changes = vec![false; feeds.len()];
    let mut marks = marks.into_iter().peekable();
    for (idx, c) in changes.into_iter().enumerate() {
        while let Some((_, r, mark)) = marks.next_if(|(at, _, _)| *at <= idx) {
            entries[r].push(Entry::Resync(mark));
        }
        let version = feeds[c.resource].1.schema.as_ref().map_or(0, |s| s.version);
        has_changes[c.resource] = true;
        entries[c.resource].push(Entry::Change(RowChange {
            op: c.op,
            key: c.key,
            row: c.row,
            schema_version: version,
        }));
    }
    for (_, r, mark) in marks {
        entries[r].push(Entry::Resync(mark));
    }
    has_changes
}
