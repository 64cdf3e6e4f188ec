//! The capture loop: read the source, seal batches, commit them to the
//! outbox with the source position, release the source, and send a
//! zero-update (零更新) for every resource whose cycle passed in silence.
//!
//! A step does, in this order: release what is durable (`release`); take
//! acks and requests from the inbox, queue comparisons and start the
//! scheduled ones (`compare`); write a commit that failed before, if any
//! (`save`); otherwise read the source and seal what it read (`read`),
//! importing table shapes into the catalog (`shapes`) and sealing
//! zero-updates for quiet resources (`zero_update`), and commit it with the
//! acks (`acks`).
//!
//! Invariants: this loop is the only writer of the outbox; a source change
//! is released only after the outbox transaction covering it committed; a
//! zero-update is sealed only from a read that saw every pending change, so
//! it never claims "no changes" while changes wait; when the outbox is full,
//! capture stops reading (changes wait in the source, nothing is dropped)
//! until acks make room; when a commit fails (a full disk), nothing it would
//! change is adopted, and the same commit is written again before the
//! source is read any further.

mod acks;
mod compare;
mod read;
mod release;
mod save;
mod shapes;
mod zero_update;

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use shuyuan_protocol::message::VerifyRefusal;
use shuyuan_protocol::{FeedId, NodeKey, UnixMillis};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::acks::{apply_acks, changed_feeds};
use self::save::Unsaved;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::outbox::{Commit, FeedDigest, FeedState, Outbox, OutboxError, Totals};
use crate::seal::SealError;
use crate::source::{self, Probe, Source, SourceError};
use crate::status::StatusBoard;

pub use self::compare::VERIFY_CHUNK_ROWS;
pub use self::read::CHECKPOINT_INTERVAL;
pub use self::release::RELEASE_INTERVAL;

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

impl std::fmt::Debug for CaptureLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureLoop")
            .field("position", &self.position)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
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
        let paused = self.outbox_full();
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

    /// One round. Returns whether more changes are waiting right now.
    pub fn step(&mut self, now: UnixMillis) -> Result<bool, CaptureError> {
        self.try_release(now);
        self.take_inbox();
        self.handle_requests(now);
        self.start_scheduled_scans(now);
        if let Some(unsaved) = self.unsaved.take() {
            return self.save_again(unsaved, now);
        }
        // The acks stay pending until a commit that holds them is built.
        let mut feeds = self.feeds.clone();
        let mut commit = Commit {
            prune: apply_acks(&mut feeds, &self.pending_acks),
            ..Commit::default()
        };
        let mut more = false;
        let mut digests = None;
        if !self.outbox_full() {
            let read = match self.source.read(&self.position, self.read_limit()) {
                Ok(read) => read,
                Err(e) => {
                    // Keep the acks even when the source is unreadable, so
                    // the outbox still drains.
                    self.save_acks(commit, feeds, now)?;
                    return Err(e.into());
                }
            };
            more = !read.complete;
            digests = Some(self.seal_read(read, &mut feeds, &mut commit, now)?);
        }
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
                digests,
                more,
            },
            now,
        )
    }

    /// Whether the outbox holds its maximum: capture pauses until acks
    /// make room.
    fn outbox_full(&self) -> bool {
        self.totals.bytes >= self.config.outbox.max_bytes
    }

    /// Moves what waits in the inbox to the pending acks and requests.
    fn take_inbox(&mut self) {
        while let Ok(input) = self.inbox.try_recv() {
            match input {
                CaptureInput::Ack(note) => self.pending_acks.push(note),
                CaptureInput::Request(r) => self.pending_requests.push(r),
            }
        }
    }

    /// Hands the pending requests to the source, answering each.
    fn handle_requests(&mut self, now: UnixMillis) {
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
                CaptureRequest::Probe { probe, refusals } => self.queue_probe(probe, &refusals),
                CaptureRequest::Verify { resource, reply } => {
                    let _ = reply.send(self.start_scan(resource, now).map_err(|e| e.to_string()));
                }
            }
        }
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
