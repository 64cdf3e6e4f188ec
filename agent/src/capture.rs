//! The capture loop: read the source, seal batches, commit them to the
//! outbox with the source position, release the source, and send a
//! zero-update (零更新) for every resource whose cycle passed in silence.
//!
//! Invariants: this loop is the only writer of the outbox; a source change
//! is released only after the outbox transaction covering it committed; a
//! zero-update is sealed only from a read that saw every pending change, so
//! it never claims "no changes" while changes wait; when the outbox is full,
//! capture stops reading (changes wait in the source, nothing is dropped)
//! until acks make room; when a commit fails (a full disk), nothing it would
//! change is adopted, and the same commit is written again before the
//! source is read any further.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use shuyuan_protocol::batch::{Entry, ZeroUpdate};
use shuyuan_protocol::message::{VerifyMode, VerifyRefusal};
use shuyuan_protocol::{FeedId, KeyRange, NodeKey, Resync, RowChange, TableSchema, UnixMillis};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::digest::{Overlay, Tracker};
use crate::outbox::{Commit, FeedDigest, FeedState, Outbox, OutboxError, Totals};
use crate::seal::{BatchLimits, SealError, seal_entries};
use crate::source::{self, Probe, Source, SourceError};
use crate::status::StatusBoard;

/// The shortest time between two deletions from the source's change table.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(1);
/// A busy feed carries its digest (a checkpoint) at least this often; a
/// quiet one with every zero-update.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Source rows per range of a full comparison the operator starts (the
/// hub asks for the same).
pub const VERIFY_CHUNK_ROWS: u32 = 10_000;
/// How soon the loop comes back while comparisons wait for their budget.
const PROBE_PAUSE: Duration = Duration::from_millis(50);

/// The hub acknowledged a feed up to `seq` (sent by the uplink).
#[derive(Debug, Clone)]
pub struct AckNote {
    pub feed: FeedId,
    pub seq: u64,
    pub at: UnixMillis,
}

/// Why a capture step failed. Nothing is lost: the step's changes stay in
/// the source and are read again.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// The capture loop's state.
pub struct CaptureLoop {
    config: Arc<Config>,
    key: NodeKey,
    outbox: Outbox,
    source: Box<dyn Source>,
    /// One per configured resource, in config order.
    feeds: Vec<(FeedId, FeedState)>,
    position: String,
    released: Option<String>,
    last_release: Option<UnixMillis>,
    totals: Totals,
    inbox: Receiver<CaptureInput>,
    pending_acks: Vec<AckNote>,
    pending_requests: Vec<CaptureRequest>,
    sealed: Arc<Notify>,
    status: StatusBoard,
    catalog: Catalog,
    skipped_null_keys: u64,
    /// Encoded bytes per change in the latest batches, for sizing reads.
    bytes_per_change: u64,
    /// Each feed's digest, as committed.
    digests: Vec<FeedDigest>,
    /// When each feed last carried a checkpoint (this run).
    last_checkpoint: Vec<Option<UnixMillis>>,
    /// Comparisons wait for the source's budget.
    probes_pending: bool,
    /// The highest run id the hub used; the agent's own runs count on from
    /// it (the hub takes a run id it has not seen grow as a new scan).
    last_run: u64,
    /// When each resource is next compared with the hub on schedule.
    next_scan: Vec<Option<UnixMillis>>,
    /// A commit that failed, to be written again before anything else.
    unsaved: Option<Unsaved>,
}

/// A commit built from a source read that did not reach the outbox (a
/// full disk). The source has already moved past that read (reported its
/// table shapes, answered probes, streamed the log), so reading it again
/// would not give the same entries: the commit is kept and written again
/// as it is, and what it makes current is adopted only once it is durable.
#[derive(Debug)]
struct Unsaved {
    commit: Commit,
    /// Every feed's state after the commit.
    feeds: Vec<(FeedId, FeedState)>,
    /// Every feed's digest after the commit, and the feeds that carried a
    /// checkpoint.
    digests: Option<(Vec<FeedDigest>, Vec<usize>)>,
    /// More changes were waiting after the read.
    more: bool,
}

/// Applies acks to feed states; returns what they let the outbox prune.
fn apply_acks(feeds: &mut [(FeedId, FeedState)], acks: &[AckNote]) -> Vec<(FeedId, u64)> {
    let mut prune: BTreeMap<usize, u64> = BTreeMap::new();
    for note in acks {
        if let Some(i) = feeds.iter().position(|(f, _)| *f == note.feed) {
            let state = &mut feeds[i].1;
            if note.seq > state.acked {
                state.acked = note.seq;
                state.last_ack_at = Some(note.at);
                prune.insert(i, note.seq);
            }
        }
    }
    prune
        .iter()
        .map(|(&i, &seq)| (feeds[i].0.clone(), seq))
        .collect()
}

/// The feed states of `new` that differ from `old`.
fn changed_feeds(
    new: &[(FeedId, FeedState)],
    old: &[(FeedId, FeedState)],
) -> Vec<(FeedId, FeedState)> {
    new.iter()
        .zip(old)
        .filter(|(new, old)| new.1 != old.1)
        .map(|(new, _)| new.clone())
        .collect()
}

impl std::fmt::Debug for CaptureLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureLoop")
            .field("position", &self.position)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

fn same_shape(a: &TableSchema, b: &TableSchema) -> bool {
    a.table == b.table && a.columns == b.columns && a.key == b.key
}

/// How the capture loop talks to the rest of the agent.
#[derive(Debug)]
pub struct CaptureLinks {
    /// Acks and the hub's requests from the uplink, operator requests from
    /// the control socket: one queue, so any of them wakes the loop.
    pub inbox: Receiver<CaptureInput>,
    /// Woken when new batches are in the outbox.
    pub sealed: Arc<Notify>,
    pub status: StatusBoard,
    /// Told about table shapes, asked for update cycles.
    pub catalog: Catalog,
}

/// What reaches the capture loop.
#[derive(Debug)]
pub enum CaptureInput {
    Ack(AckNote),
    Request(CaptureRequest),
}

/// A request to the capture loop.
#[derive(Debug)]
pub enum CaptureRequest {
    /// Re-read one resource (an index into the config's resources); answers
    /// when the source accepted it.
    Resync {
        resource: usize,
        reason: String,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Compare a key range with the hub (asked by the hub); a refusal goes
    /// back to the hub.
    Probe {
        probe: Probe,
        refusals: tokio::sync::mpsc::UnboundedSender<VerifyRefusal>,
    },
    /// Compare a whole resource with the hub (asked by the operator);
    /// answers with the run's id.
    Verify {
        resource: usize,
        reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
    },
}

impl CaptureLoop {
    /// Loads the feed states and source position from the outbox.
    pub fn new(
        config: Arc<Config>,
        key: NodeKey,
        outbox: Outbox,
        source: Box<dyn Source>,
        links: CaptureLinks,
    ) -> Result<Self, CaptureError> {
        let CaptureLinks {
            inbox,
            sealed,
            status,
            catalog,
        } = links;
        let stored = outbox.feeds()?;
        let feeds = config
            .resources
            .iter()
            .map(|r| {
                let feed = FeedId::new(config.department.clone(), r.code.clone());
                let state = stored.get(&feed).cloned().unwrap_or_default();
                (feed, state)
            })
            .collect();
        let position = outbox
            .position()?
            .unwrap_or_else(|| source::initial_position(&config));
        let totals = outbox.totals()?;
        let stored_digests = outbox.digests()?;
        let digests: Vec<FeedDigest> = config
            .resources
            .iter()
            .map(|r| {
                let feed = FeedId::new(config.department.clone(), r.code.clone());
                stored_digests.get(&feed).cloned().unwrap_or_default()
            })
            .collect();
        let last_checkpoint = vec![None; digests.len()];
        Ok(CaptureLoop {
            config,
            key,
            outbox,
            source,
            feeds,
            position,
            released: None,
            last_release: None,
            totals,
            inbox,
            pending_acks: Vec::new(),
            pending_requests: Vec::new(),
            sealed,
            status,
            catalog,
            skipped_null_keys: 0,
            bytes_per_change: 256,
            digests,
            last_checkpoint,
            probes_pending: false,
            last_run: 0,
            next_scan: Vec::new(),
            unsaved: None,
        })
    }

    fn poll_interval(&self) -> Duration {
        self.config.source.poll_interval()
    }

    /// Runs until `cancel` fires.
    pub fn run(mut self, cancel: CancellationToken) {
        let mut last_error: Option<String> = None;
        while !cancel.is_cancelled() {
            let started = UnixMillis::now();
            let more = match self.step(started) {
                Ok(more) => {
                    if last_error.take().is_some() {
                        tracing::info!("capture recovered");
                    }
                    self.publish(None, Some(started));
                    more
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        if matches!(&e, CaptureError::Source(s) if s.is_transient()) {
                            tracing::warn!(error = %text, "capture step failed; retrying");
                        } else {
                            tracing::error!(error = %text, "capture step failed; retrying until fixed");
                        }
                    }
                    self.publish(Some(text.clone()), None);
                    last_error = Some(text);
                    false
                }
            };
            if more || (last_error.is_none() && self.source.waits_for_changes()) {
                continue;
            }
            let wait = if self.probes_pending {
                self.poll_interval().min(PROBE_PAUSE)
            } else {
                self.poll_interval()
            };
            match self.inbox.recv_timeout(wait) {
                Ok(CaptureInput::Ack(note)) => self.pending_acks.push(note),
                Ok(CaptureInput::Request(r)) => self.pending_requests.push(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(self.poll_interval()),
            }
        }
        tracing::info!("capture stopped");
    }

    /// Updates the status board; `read_at` is when the step that just
    /// succeeded started reading, so the status covers every change
    /// committed before that moment.
    fn publish(&mut self, error: Option<String>, read_at: Option<UnixMillis>) {
        let backlog = self.source.backlog(&self.position).unwrap_or(0);
        let paused = self.totals.bytes >= self.config.outbox.max_bytes;
        let config = self.config.clone();
        let feeds = &self.feeds;
        let (position, totals, skipped) =
            (self.position.clone(), self.totals, self.skipped_null_keys);
        let catalog = &self.catalog;
        let report = self.source.report(&position);
        let write_failure = self.outbox.write_failure();
        self.status.update(|s| {
            s.apply_feeds(&config, feeds, Some(catalog));
            s.apply_totals(totals);
            s.outbox.write_failure = write_failure;
            s.source.position = report.position;
            s.source.backlog_unit = report.backlog_unit.to_string();
            s.source.alarm = report.alarm;
            s.source.loads = report.loads;
            s.source.finished_loads = report.finished;
            s.source.backlog = backlog;
            s.source.paused_outbox_full = paused;
            s.source.error = error;
            s.source.skipped_null_keys = skipped;
            if read_at.is_some() {
                s.source.last_read_at = read_at;
            }
        });
    }

    /// Deletes the source's record of changes that are durable in the
    /// outbox (including those an earlier run committed but did not get to
    /// delete). Each release is a write on the department's database, so it
    /// happens at most every [`RELEASE_INTERVAL`] to stay out of the way of
    /// the department's own writers.
    fn release_if_due(&mut self, now: UnixMillis) -> Result<(), CaptureError> {
        let behind = self.released.as_deref() != Some(self.position.as_str());
        let due = self
            .last_release
            .is_none_or(|t| now.since(t) >= RELEASE_INTERVAL);
        if behind && due {
            self.source.release(&self.position)?;
            self.released = Some(self.position.clone());
            self.last_release = Some(now);
        }
        Ok(())
    }

    /// Releases what is due; a failure (say, a department transaction holds
    /// the write lock) only delays the deletion, so capture goes on.
    fn try_release(&mut self, now: UnixMillis) {
        if let Err(e) = self.release_if_due(now) {
            tracing::warn!(error = %e, "cannot delete sent changes from the change table yet; will retry");
        }
    }

    /// Starts a full comparison of one resource with the hub (a throttled
    /// scan of the source); returns the run's id.
    fn start_scan(&mut self, resource: usize, now: UnixMillis) -> Result<u64, SourceError> {
        let run = u64::try_from(now.0)
            .unwrap_or(0)
            .max(self.last_run.saturating_add(1));
        self.source.probe(Probe {
            resource,
            run,
            range: KeyRange::all(),
            mode: VerifyMode::Scan {
                chunk_rows: VERIFY_CHUNK_ROWS,
            },
        })?;
        self.last_run = run;
        self.probes_pending = true;
        Ok(run)
    }

    /// One round. Returns whether more changes are waiting right now.
    pub fn step(&mut self, now: UnixMillis) -> Result<bool, CaptureError> {
        self.try_release(now);
        while let Ok(input) = self.inbox.try_recv() {
            match input {
                CaptureInput::Ack(note) => self.pending_acks.push(note),
                CaptureInput::Request(r) => self.pending_requests.push(r),
            }
        }
        for request in std::mem::take(&mut self.pending_requests) {
            match request {
                CaptureRequest::Resync {
                    resource,
                    reason,
                    reply,
                } => {
                    let answer = self
                        .source
                        .request_resync(resource, reason)
                        .map_err(|e| e.to_string());
                    let _ = reply.send(answer);
                }
                CaptureRequest::Probe { probe, refusals } => {
                    let (resource, run, range) = (probe.resource, probe.run, probe.range.clone());
                    self.last_run = self.last_run.max(run);
                    match self.source.probe(probe) {
                        Ok(()) => {
                            tracing::debug!(resource, run, %range, "comparison with the hub queued");
                            self.probes_pending = true;
                        }
                        Err(e) => {
                            tracing::warn!(resource, run, error = %e, "cannot compare with the hub; telling it why");
                            let _ = refusals.send(VerifyRefusal {
                                feed: self.feeds[resource].0.clone(),
                                run,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                CaptureRequest::Verify { resource, reply } => {
                    let _ = reply.send(self.start_scan(resource, now).map_err(|e| e.to_string()));
                }
            }
        }
        if let Some(every) = self.config.verify.every {
            if self.next_scan.is_empty() {
                self.next_scan = vec![Some(now.saturating_add(every)); self.feeds.len()];
            }
            for i in 0..self.next_scan.len() {
                if self.next_scan[i].is_some_and(|t| now >= t) {
                    self.next_scan[i] = match self.start_scan(i, now) {
                        Ok(run) => {
                            tracing::info!(feed = %self.feeds[i].0, run, "scheduled comparison with the hub started");
                            Some(now.saturating_add(every))
                        }
                        Err(e) => {
                            tracing::info!(feed = %self.feeds[i].0, error = %e, "no scheduled comparisons for this resource");
                            None
                        }
                    };
                }
            }
        }

        if let Some(unsaved) = self.unsaved.take() {
            return self.save_again(unsaved, now);
        }

        // The acks stay pending until a commit that holds them is built.
        let mut feeds = self.feeds.clone();
        let mut commit = Commit {
            prune: apply_acks(&mut feeds, &self.pending_acks),
            ..Commit::default()
        };

        let paused = self.totals.bytes >= self.config.outbox.max_bytes;
        let mut more = false;
        let mut new_position = None;
        let mut new_digests = None;
        if !paused {
            // Read no more than the outbox has room for, judging by the size
            // of recent changes, so a full outbox is overrun by little.
            let room = self.config.outbox.max_bytes - self.totals.bytes;
            let fits = usize::try_from(room / self.bytes_per_change.max(1)).unwrap_or(usize::MAX);
            let limit = self
                .config
                .outbox
                .batch_max_changes
                .saturating_mul(10)
                .min(fits)
                .max(1);
            let read = match self.source.read(&self.position, limit) {
                Ok(read) => read,
                Err(e) => {
                    // Keep the acks even when the source is unreadable, so
                    // the outbox still drains.
                    if !commit.prune.is_empty() {
                        commit.feeds = changed_feeds(&feeds, &self.feeds);
                        self.pending_acks.clear();
                        let unsaved = Unsaved {
                            commit,
                            feeds,
                            digests: None,
                            more: false,
                        };
                        self.save(unsaved, now)?;
                    }
                    return Err(e.into());
                }
            };
            self.skipped_null_keys += read.skipped_null_keys;
            more = !read.complete;
            let mut entries: Vec<Vec<Entry>> = vec![Vec::new(); feeds.len()];
            if let Some(shapes) = read.shapes {
                for (i, shape) in shapes.into_iter().enumerate() {
                    // The catalog's data items follow the table (idempotent).
                    if let Err(e) =
                        self.catalog
                            .record_schema(&self.config.resources[i].code, &shape, now)
                    {
                        tracing::warn!(error = %e, resource = %self.config.resources[i].code, "cannot update the catalog's data items");
                    }
                    let state = &mut feeds[i].1;
                    let changed = state.schema.as_ref().is_none_or(|s| !same_shape(s, &shape));
                    if changed {
                        let version = state.schema.as_ref().map_or(1, |s| s.version + 1);
                        let schema = TableSchema { version, ..shape };
                        tracing::info!(feed = %feeds[i].0, version, "table shape recorded");
                        entries[i].push(Entry::Schema(schema.clone()));
                        feeds[i].1.schema = Some(schema);
                    }
                }
            }
            let mut has_changes = vec![false; feeds.len()];
            let mut marks = read.marks.into_iter().peekable();
            for (idx, c) in read.changes.into_iter().enumerate() {
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
            self.probes_pending = read.probes_pending;
            for (r, mut entry) in read.probes {
                if let Entry::RangeRepair(repair) = &mut entry {
                    let version = feeds[r].1.schema.as_ref().map_or(0, |s| s.version);
                    for c in &mut repair.rows {
                        c.schema_version = version;
                    }
                }
                entries[r].push(entry);
            }
            // Opened by the first feed with entries (an idle read needs none).
            let mut seeds = None;
            let mut digests = self.digests.clone();
            let limits = BatchLimits {
                max_changes: self.config.outbox.batch_max_changes,
                max_bytes: self.config.outbox.batch_max_bytes,
            };
            let mut checkpointed = Vec::new();
            for (i, es) in entries.into_iter().enumerate() {
                let resource = &self.config.resources[i];
                let (feed, state) = &mut feeds[i];
                let es = if es.is_empty() && read.complete && state.schema.is_some() {
                    // Quiet resource: is a zero-update due? The catalog's
                    // update cycle is the one in force.
                    let cycle = self
                        .catalog
                        .update_cycle(&resource.code)
                        .unwrap_or(resource.update_cycle);
                    match state.last_batch_at {
                        Some(last)
                            if now >= last.saturating_add(resource.heartbeat_under(cycle)) =>
                        {
                            state.last_zero_update_at = Some(now);
                            vec![Entry::ZeroUpdate(ZeroUpdate {
                                since: last,
                                until: now,
                                // In the connector's words (for PostgreSQL,
                                // the log position).
                                source_position: self.source.report(&read.position).position,
                            })]
                        }
                        _ => continue,
                    }
                } else {
                    es
                };
                if es.is_empty() {
                    continue;
                }
                let mut es = es;
                let digest = &mut digests[i];
                let feed_text = feed.to_string();
                let mut overlay = Overlay::new();
                let reader = match &mut seeds {
                    Some(r) => r,
                    None => seeds.insert(self.outbox.seeds()?),
                };
                Tracker {
                    feed: &feed_text,
                    reader,
                    overlay: &mut overlay,
                }
                .apply(digest, &es)?;
                let due = self.last_checkpoint[i]
                    .is_none_or(|t| now.since(t) >= CHECKPOINT_INTERVAL)
                    || es.iter().any(|e| {
                        matches!(
                            e,
                            Entry::ZeroUpdate(_)
                                | Entry::RangeRepair(_)
                                | Entry::Resync(Resync::End { .. })
                        )
                    });
                if digest.established && due {
                    es.push(Entry::Checkpoint(digest.digest().summary()));
                    checkpointed.push(i);
                }
                commit
                    .seeds
                    .extend(overlay.into_iter().map(|(k, e)| (feed.clone(), k, e)));
                commit.digests.push((feed.clone(), digest.clone()));
                if has_changes[i] {
                    state.last_change_at = Some(now);
                }
                let n = es.len() as u64;
                let sealed = seal_entries(&self.key, feed, state, es, now, limits)?;
                let bytes: u64 = sealed.iter().map(|(_, b)| b.len() as u64).sum();
                if has_changes[i] {
                    self.bytes_per_change = (bytes / n.max(1)).max(1);
                }
                for (seq, bytes) in sealed {
                    tracing::debug!(%feed, seq, bytes = bytes.len(), "batch sealed");
                    commit.appended.push((feed.clone(), seq, bytes));
                }
            }
            // No read transaction may outlive the read: a failed commit
            // reopens the file.
            drop(seeds);
            if read.position != self.position {
                new_position = Some(read.position);
            }
            new_digests = Some((digests, checkpointed));
        }
        commit.position = new_position;
        // Acks that prune nothing are old news; the others are in `commit`.
        self.pending_acks.clear();
        if commit.is_empty() {
            return Ok(more);
        }
        commit.feeds = changed_feeds(&feeds, &self.feeds);
        self.save(
            Unsaved {
                commit,
                feeds,
                digests: new_digests,
                more,
            },
            now,
        )
    }

    /// Writes a commit and makes what it holds current; if the write fails,
    /// keeps it to be written again and changes nothing else.
    fn save(&mut self, unsaved: Unsaved, now: UnixMillis) -> Result<bool, CaptureError> {
        match self.outbox.commit(&unsaved.commit) {
            Ok(totals) => self.totals = totals,
            Err(e) => {
                self.unsaved = Some(unsaved);
                return Err(e.into());
            }
        }
        let Unsaved {
            commit,
            feeds,
            digests,
            more,
        } = unsaved;
        self.feeds = feeds;
        if let Some((digests, checkpointed)) = digests {
            self.digests = digests;
            for i in checkpointed {
                self.last_checkpoint[i] = Some(now);
            }
        }
        if !commit.appended.is_empty() {
            self.sealed.notify_one();
        }
        if let Some(p) = commit.position {
            self.position = p;
            self.try_release(now);
        }
        Ok(more)
    }

    /// Writes a commit that failed before. Acks that came meanwhile are
    /// committed first, on their own: on a full disk, the pages they free
    /// may be just what the waiting batches need.
    fn save_again(&mut self, mut unsaved: Unsaved, now: UnixMillis) -> Result<bool, CaptureError> {
        let mut feeds = self.feeds.clone();
        let prune = apply_acks(&mut feeds, &self.pending_acks);
        if !prune.is_empty() {
            let acks = Commit {
                prune,
                feeds: changed_feeds(&feeds, &self.feeds),
                ..Commit::default()
            };
            match self.outbox.commit(&acks) {
                Ok(totals) => self.totals = totals,
                Err(e) => {
                    self.unsaved = Some(unsaved);
                    return Err(e.into());
                }
            }
            apply_acks(&mut unsaved.feeds, &self.pending_acks);
            self.feeds = feeds;
            unsaved.commit.feeds = changed_feeds(&unsaved.feeds, &self.feeds);
        }
        self.pending_acks.clear();
        self.save(unsaved, now)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::Sender;

    use shuyuan_protocol::{Entry, SignedBatch};

    use super::*;
    use crate::outbox::testing;
    use crate::status::AgentStatus;

    /// A capture loop over a SQLite table with three rows waiting, whose
    /// outbox is on a disk that fills while the flag is set.
    struct Rig {
        _dir: tempfile::TempDir,
        db: rusqlite::Connection,
        full: Arc<AtomicBool>,
        outbox: Outbox,
        inbox: Sender<CaptureInput>,
        status: StatusBoard,
        capture: CaptureLoop,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let hub = NodeKey::from_seed([1; 32]).id();
        let text = format!(
            "[agent]\ndepartment = \"GA\"\n[hub]\naddress = \"127.0.0.1:1\"\nkey = \"{hub}\"\n\
             [source]\nkind = \"sqlite\"\npath = \"dept.db\"\n\
             [[resource]]\ncode = \"101001/00001\"\nname = \"常住人口\"\ntable = \"household\"\nkey = [\"id\"]\nupdate_cycle = \"daily\"\n"
        );
        let config = Arc::new(Config::parse(&dir.path().join("agent.toml"), &text).unwrap());
        let db = rusqlite::Connection::open(dir.path().join("dept.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE household (id TEXT PRIMARY KEY, name TEXT);
             INSERT INTO household VALUES ('1', '甲'), ('2', '乙'), ('3', '丙');",
        )
        .unwrap();
        crate::source::sqlite::install_triggers(
            &dir.path().join("dept.db"),
            Duration::from_secs(1),
            &config.resources,
        )
        .unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let outbox =
            Outbox::open_with(&config.outbox_path(), testing::opener(full.clone())).unwrap();
        outbox.set_reopen_interval(Duration::ZERO);
        let node = NodeKey::from_seed([2; 32]);
        let catalog = Catalog::open(&config, node.id()).unwrap();
        let status = StatusBoard::new(AgentStatus::initial(&config, node.id().to_string(), true));
        let (inbox, inbox_rx) = std::sync::mpsc::channel();
        let capture = CaptureLoop::new(
            config.clone(),
            node,
            outbox.clone(),
            source::open(&config).unwrap(),
            CaptureLinks {
                inbox: inbox_rx,
                sealed: Arc::new(Notify::new()),
                status: status.clone(),
                catalog,
            },
        )
        .unwrap();
        Rig {
            _dir: dir,
            db,
            full,
            outbox,
            inbox,
            status,
            capture,
        }
    }

    fn entries(outbox: &Outbox, seq: u64) -> Vec<Entry> {
        let feed = "GA:101001/00001".parse().unwrap();
        let batch: SignedBatch = outbox.batch(&feed, seq).unwrap().unwrap();
        batch.open().unwrap().entries
    }

    fn changes(entries: &[Entry]) -> usize {
        entries
            .iter()
            .filter(|e| matches!(e, Entry::Change(_)))
            .count()
    }

    #[test]
    fn a_commit_that_failed_is_written_again_as_it_was() {
        let mut r = rig();
        r.full.store(true, Ordering::SeqCst);
        let now = UnixMillis::now();
        // The first read reports the table's shape and the three rows; the
        // source will not report that shape again.
        let e = r.capture.step(now).unwrap_err();
        assert!(
            matches!(e, CaptureError::Outbox(OutboxError::Io { .. })),
            "{e}"
        );
        for _ in 0..3 {
            assert!(r.capture.step(now).is_err(), "the disk is still full");
        }
        // Nothing of the failed commit is current: not the position, not the
        // feed (no schema, no batch), not the digest.
        assert_eq!(r.capture.position, "0");
        assert_eq!(r.capture.feeds[0].1, FeedState::default());
        assert_eq!(r.capture.digests[0], FeedDigest::default());
        assert_eq!(r.capture.totals, Totals::default());
        r.capture.publish(Some(e.to_string()), None);
        let s = r.status.snapshot();
        let failure = s.outbox.write_failure.clone().expect("status reports it");
        assert!(failure.error.contains("No space left"), "{failure:?}");
        assert_eq!(s.source.backlog, 3, "the changes wait in the source");
        let text = s.render();
        assert!(
            text.contains("OUTBOX CANNOT WRITE since")
                && text.contains("capture paused, source changes wait in the source"),
            "{text}"
        );

        // The department writes on while the disk is full.
        r.db.execute("INSERT INTO household VALUES ('4', '丁')", [])
            .unwrap();
        r.full.store(false, Ordering::SeqCst);
        r.capture.step(now).unwrap();
        assert_eq!(r.capture.position, "3");
        let state = r.capture.feeds[0].1.clone();
        assert_eq!(state.head.last_seq, 1);
        assert_eq!(state.schema.as_ref().map(|s| s.version), Some(1));
        assert_eq!(r.outbox.feeds().unwrap().values().next(), Some(&state));
        assert_eq!(r.outbox.position().unwrap().as_deref(), Some("3"));
        let first = entries(&r.outbox, 1);
        assert!(
            matches!(first.first(), Some(Entry::Schema(_))),
            "the shape read before the failure is in the first batch: {first:?}"
        );
        assert_eq!(changes(&first), 3);
        assert_eq!(r.outbox.write_failure(), None);
        r.capture.publish(None, Some(now));
        assert_eq!(r.status.snapshot().outbox.write_failure, None);
        assert!(!r.status.snapshot().render().contains("OUTBOX CANNOT WRITE"));

        r.capture.step(now).unwrap();
        assert_eq!(r.capture.position, "4");
        assert_eq!(changes(&entries(&r.outbox, 2)), 1);
        assert_eq!(r.capture.feeds[0].1.head.last_seq, 2);
    }

    #[test]
    fn acks_that_arrive_while_a_commit_waits_are_kept() {
        let mut r = rig();
        let now = UnixMillis::now();
        r.capture.step(now).unwrap();
        let feed: FeedId = "GA:101001/00001".parse().unwrap();
        assert_eq!(r.capture.feeds[0].1.head.last_seq, 1);

        r.db.execute("INSERT INTO household VALUES ('4', '丁')", [])
            .unwrap();
        r.full.store(true, Ordering::SeqCst);
        assert!(r.capture.step(now).is_err());
        let ack = |seq| {
            CaptureInput::Ack(AckNote {
                feed: feed.clone(),
                seq,
                at: now,
            })
        };
        r.inbox.send(ack(1)).unwrap();
        assert!(
            r.capture.step(now).is_err(),
            "the acks cannot be written either"
        );
        assert_eq!(r.capture.feeds[0].1.acked, 0);

        r.full.store(false, Ordering::SeqCst);
        r.capture.step(now).unwrap();
        let state = r.capture.feeds[0].1.clone();
        assert_eq!((state.head.last_seq, state.acked), (2, 1));
        assert_eq!(r.outbox.feeds().unwrap()[&feed], state);
        assert_eq!(
            r.outbox.first_seq(&feed).unwrap(),
            Some(2),
            "batch 1 pruned"
        );
        assert_eq!(r.outbox.totals().unwrap().batches, 1);
        assert_eq!(r.capture.position, "4");
        assert_eq!(changes(&entries(&r.outbox, 2)), 1);
    }
}
