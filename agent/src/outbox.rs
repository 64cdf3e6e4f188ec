//! The outbox: signed batches waiting for the hub's ack, in redb.
//!
//! Invariants: an entry is deleted only after an ack that covers its
//! sequence number; the source position is committed in the same
//! transaction as the batches it produced, so a crash between capture and
//! outbox neither skips nor repeats a change; the capture loop is the only
//! writer of this file (the uplink reads it and sends its acks to the loop).
//!
//! A write that fails (a full disk, an I/O error) changes nothing, but redb
//! then refuses every later operation on that handle. The outbox therefore
//! closes and opens the file again before its next operation, at most once
//! per [`REOPEN_INTERVAL`], and reports the failure ([`WriteFailure`]) until
//! a write succeeds: capture pauses with its changes in the source and
//! resumes by itself when space returns.
//!
//! Tables (the `_v1` suffix is the layout version):
//! - `outbox_v1`: (feed text `DEPT:RES`, seq) -> postcard `SignedBatch`
//! - `feeds_v1`: feed text -> postcard [`FeedState`]
//! - `meta_v1`: name -> bytes; `position` (source position, UTF-8),
//!   `batches` and `bytes` (u64 big-endian totals of `outbox_v1`)
//! - `digests_v1`: feed text -> postcard [`FeedDigest`], the digest of the
//!   rows the feed has described so far
//! - `row_seeds_v1`: (feed text, encoded row key) -> the row's 64-byte
//!   [`RowSeed`] then the id of the re-read that last wrote it (u64
//!   big-endian, 0 outside re-reads), so an update or delete can subtract
//!   what the row contributed
//! - `migrations_v1`: migration name -> unix millis applied

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shuyuan_protocol::encoding::{self, decode, encode};
use shuyuan_protocol::{
    Digest, FeedCursor, FeedId, KeyRange, RowSeed, SignedBatch, TableSchema, UnixMillis,
};
use shuyuan_service::{Migration, OpenError, Opener, RedbFile, needs_reopen};

const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox_v1");
const FEEDS: TableDefinition<&str, &[u8]> = TableDefinition::new("feeds_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("digests_v1");
const SEEDS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("row_seeds_v1");
/// Named, idempotent migrations, applied in order once each.
const MIGRATIONS: &[Migration] = &[
    ("0001-create-tables", |tx| {
        tx.open_table(OUTBOX)?;
        tx.open_table(FEEDS)?;
        tx.open_table(META)?;
        Ok(())
    }),
    ("0002-digests", |tx| {
        tx.open_table(SEEDS)?;
        let mut digests = tx.open_table(DIGESTS)?;
        // Feeds that already sent rows have no record of them: their digest
        // is unknown until a re-read.
        let feeds = tx.open_table(FEEDS)?;
        for item in feeds.iter()? {
            let (k, v) = item?;
            let started = decode::<FeedState>(v.value()).is_ok_and(|s| s.head.last_seq > 0);
            if started {
                let unknown = FeedDigest {
                    established: false,
                    ..FeedDigest::default()
                };
                if let Ok(bytes) = encode(&unknown) {
                    digests.insert(k.value(), bytes.as_slice())?;
                }
            }
        }
        Ok(())
    }),
];

/// The digest of what a feed has said so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedDigest {
    /// [`Digest::to_bytes`]; empty for the empty set.
    pub digest: Vec<u8>,
    /// The re-read in progress (its `Begin` sealed, its `End` not yet).
    pub resync: Option<u64>,
    /// False when the feed began before this agent kept digests: its
    /// checkpoints are not sent.
    pub established: bool,
}

impl Default for FeedDigest {
    fn default() -> Self {
        FeedDigest {
            digest: Vec::new(),
            resync: None,
            established: true,
        }
    }
}

impl FeedDigest {
    /// The digest itself.
    pub fn digest(&self) -> Digest {
        Digest::from_bytes(&self.digest).unwrap_or_default()
    }
}

/// A row's stored seed and the re-read that wrote it.
pub type SeedEntry = (RowSeed, u64);

fn seed_bytes((seed, gen_): &SeedEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(72);
    out.extend_from_slice(&seed.0);
    out.extend_from_slice(&gen_.to_be_bytes());
    out
}

fn seed_entry(bytes: &[u8]) -> Option<SeedEntry> {
    let (seed, gen_) = bytes.split_first_chunk::<64>()?;
    let gen_: [u8; 8] = gen_.try_into().ok()?;
    Some((RowSeed(*seed), u64::from_be_bytes(gen_)))
}

/// The shortest time between two reopenings of the outbox file after I/O
/// errors: a full disk is retried about once a second, not in a loop.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the outbox store.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "{0} is in use by another shuyuan-agent process (only one agent may use a data directory)"
    )]
    AlreadyOpen(PathBuf),
    #[error("outbox storage error: {0}")]
    Storage(String),
    /// The file failed (a full disk) or refuses because it failed before;
    /// it is opened again before the next operation.
    #[error("outbox I/O error: {reason}")]
    Io {
        reason: String,
        /// redb refused because of an earlier error on the same handle, so
        /// `reason` does not say what went wrong.
        earlier: bool,
    },
    #[error("outbox entry {feed} #{seq} is corrupt: {reason}")]
    Corrupt {
        feed: String,
        seq: u64,
        reason: String,
    },
    #[error("stored feed state of {feed} is corrupt: {reason}")]
    CorruptState { feed: String, reason: String },
}

fn storage(e: impl Into<redb::Error>) -> OutboxError {
    let e = e.into();
    if needs_reopen(&e) {
        OutboxError::Io {
            earlier: matches!(e, redb::Error::PreviousIo),
            reason: e.to_string(),
        }
    } else {
        OutboxError::Storage(e.to_string())
    }
}

/// Writes to the outbox fail: since when, why, and what was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFailure {
    /// The first failed write since the last one that succeeded.
    pub since: UnixMillis,
    /// The latest error that says what went wrong (for a full disk, "No
    /// space left on device").
    pub error: String,
    /// Writes that reached the file and failed since `since` (while a
    /// reopen waits for its turn, writes are refused without trying).
    pub failed_writes: u64,
    /// Times the file was closed and opened again since `since`.
    pub reopens: u64,
}

/// What the agent knows about one feed, kept with its batches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    /// The last sealed batch.
    pub head: FeedCursor,
    /// The highest sequence number the hub acknowledged.
    pub acked: u64,
    /// The table shape under the current schema version.
    pub schema: Option<TableSchema>,
    /// When the last batch (of any kind) was sealed.
    pub last_batch_at: Option<UnixMillis>,
    /// When the last batch with row changes was sealed.
    pub last_change_at: Option<UnixMillis>,
    /// When the last zero-update was sealed.
    pub last_zero_update_at: Option<UnixMillis>,
    /// When the hub last acknowledged a batch.
    pub last_ack_at: Option<UnixMillis>,
}

/// Size of the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub batches: u64,
    pub bytes: u64,
}

/// One atomic change of the outbox.
#[derive(Debug, Default)]
pub struct Commit {
    /// New batches: feed, seq, encoded `SignedBatch`.
    pub appended: Vec<(FeedId, u64, Vec<u8>)>,
    /// Feed states to store (whole).
    pub feeds: Vec<(FeedId, FeedState)>,
    /// The source position these batches cover.
    pub position: Option<String>,
    /// Delete every entry of the feed up to and including the sequence
    /// number (the hub acknowledged them).
    pub prune: Vec<(FeedId, u64)>,
    /// Feed digests to store (whole).
    pub digests: Vec<(FeedId, FeedDigest)>,
    /// Row seeds to store (`None`: the row is gone).
    pub seeds: Vec<(FeedId, Vec<u8>, Option<SeedEntry>)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.appended.is_empty()
            && self.feeds.is_empty()
            && self.position.is_none()
            && self.prune.is_empty()
            && self.digests.is_empty()
            && self.seeds.is_empty()
    }
}

/// Handle to the outbox file; cheap to clone (the capture loop and the
/// uplink share one file and one record of its health).
#[derive(Clone, Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    file: RedbFile,
    health: Mutex<Health>,
}

/// Whether the file must be opened again, and the failure status reports.
#[derive(Debug)]
struct Health {
    /// Counts the openings of the file: an error of an operation that
    /// began on an older opening says nothing about the current one.
    generation: u64,
    /// An operation of the current opening failed with an I/O error.
    reopen: bool,
    last_reopen: Option<Instant>,
    interval: Duration,
    failure: Option<WriteFailure>,
}

impl Outbox {
    /// Opens (or creates) the outbox and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        Self::from_file(RedbFile::open(path, MIGRATIONS))
    }

    /// Like [`Outbox::open`], opening the file with `open` (tests inject a
    /// storage backend that fails writes).
    pub fn open_with(path: &Path, open: Opener) -> Result<Self, OutboxError> {
        Self::from_file(RedbFile::open_with(path, MIGRATIONS, open))
    }

    fn from_file(file: Result<RedbFile, OpenError>) -> Result<Self, OutboxError> {
        let file = file.map_err(|e| match e {
            OpenError::AlreadyOpen(p) => OutboxError::AlreadyOpen(p),
            other => OutboxError::Storage(other.to_string()),
        })?;
        Ok(Outbox {
            shared: Arc::new(Shared {
                file,
                health: Mutex::new(Health {
                    generation: 0,
                    reopen: false,
                    last_reopen: None,
                    interval: REOPEN_INTERVAL,
                    failure: None,
                }),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.shared.file.path()
    }

    /// Why writes fail, while they do.
    pub fn write_failure(&self) -> Option<WriteFailure> {
        self.health().failure.clone()
    }

    /// Changes the shortest time between two reopenings (tests).
    pub fn set_reopen_interval(&self, interval: Duration) {
        self.health().interval = interval;
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.shared
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the file again if an I/O error asked for it and the last
    /// attempt is [`REOPEN_INTERVAL`] ago. Returns the opening to work on
    /// and whether it is sound (false: still waiting to reopen, or the
    /// reopen failed, with the error).
    fn prepare(&self) -> (u64, Result<(), OutboxError>) {
        let mut h = self.health();
        if !h.reopen {
            return (h.generation, Ok(()));
        }
        let due = h.last_reopen.is_none_or(|t| t.elapsed() >= h.interval);
        if !due {
            let reason = h
                .failure
                .as_ref()
                .map_or_else(|| "an earlier I/O error".to_string(), |f| f.error.clone());
            return (
                h.generation,
                Err(OutboxError::Io {
                    reason,
                    earlier: true,
                }),
            );
        }
        h.last_reopen = Some(Instant::now());
        // A long outage reopens every second: the log tells the first
        // time, and the end tells how many.
        let first = match h.failure.as_mut() {
            Some(f) => {
                f.reopens += 1;
                f.reopens == 1
            }
            None => true,
        };
        // Holding the lock: the other thread's operations wait here rather
        // than begin on the handle being replaced. No operation holds a
        // transaction while it takes the lock, so the reopen does not wait
        // on them.
        match self.shared.file.reopen() {
            Ok(()) => {
                h.generation += 1;
                h.reopen = false;
                if first {
                    tracing::info!(path = %self.path().display(), "outbox file opened again after an I/O error");
                } else {
                    tracing::debug!(path = %self.path().display(), "outbox file opened again after an I/O error");
                }
                (h.generation, Ok(()))
            }
            Err(e) => {
                let reason = e.to_string();
                if first {
                    tracing::warn!(error = %reason, "cannot open the outbox file again yet; retrying");
                } else {
                    tracing::debug!(error = %reason, "cannot open the outbox file again yet; retrying");
                }
                if let Some(f) = h.failure.as_mut() {
                    f.error = reason.clone();
                }
                (
                    h.generation,
                    Err(OutboxError::Io {
                        reason,
                        earlier: false,
                    }),
                )
            }
        }
    }

    /// Notes how an operation that began on opening `generation` ended: an
    /// I/O error asks for a reopen.
    fn note<T>(&self, generation: u64, result: &Result<T, OutboxError>) {
        if let Err(OutboxError::Io { .. }) = result {
            let mut h = self.health();
            if h.generation == generation {
                h.reopen = true;
            }
        }
    }

    /// Runs a read. It is tried even while a reopen waits for its turn
    /// (redb often still reads a handle a failed write closed); when it
    /// fails with an I/O error and a reopen is due, it runs once more on
    /// the new opening.
    fn read<T>(&self, op: impl Fn(&RedbFile) -> Result<T, OutboxError>) -> Result<T, OutboxError> {
        let (generation, _) = self.prepare();
        let result = op(&self.shared.file);
        self.note(generation, &result);
        if !matches!(result, Err(OutboxError::Io { .. })) {
            return result;
        }
        match self.prepare() {
            (again, Ok(())) if again != generation => {
                let result = op(&self.shared.file);
                self.note(again, &result);
                result
            }
            _ => result,
        }
    }

    /// Runs a write. While the file waits to be opened again after a failed
    /// write, it fails at once without touching the file.
    fn write<T>(
        &self,
        op: impl FnOnce(&RedbFile) -> Result<T, OutboxError>,
    ) -> Result<T, OutboxError> {
        let (generation, sound) = self.prepare();
        let tried = sound.is_ok();
        let result = sound.and_then(|()| op(&self.shared.file));
        self.note(generation, &result);
        let mut h = self.health();
        match &result {
            Ok(_) => {
                if let Some(f) = h.failure.take() {
                    tracing::info!(
                        since = %f.since,
                        failed_writes = f.failed_writes,
                        reopens = f.reopens,
                        "the outbox can be written again; capture resumes"
                    );
                }
            }
            Err(OutboxError::Io { reason, earlier }) => match h.failure.as_mut() {
                Some(f) => {
                    f.failed_writes += u64::from(tried);
                    if !earlier {
                        f.error = reason.clone();
                    }
                }
                None => {
                    tracing::error!(error = %reason, "cannot write the outbox; capture pauses (changes wait in the source) and the write is retried every {}s", h.interval.as_secs_f32());
                    h.failure = Some(WriteFailure {
                        since: UnixMillis::now(),
                        error: reason.clone(),
                        failed_writes: 1,
                        reopens: 0,
                    });
                }
            },
            Err(_) => {}
        }
        drop(h);
        result
    }

    /// Every feed's stored state.
    pub fn feeds(&self) -> Result<BTreeMap<FeedId, FeedState>, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            let table = tx.open_table(FEEDS).map_err(storage)?;
            let mut out = BTreeMap::new();
            for item in table.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                let feed: FeedId =
                    k.value()
                        .parse()
                        .map_err(|e: shuyuan_protocol::feed::CodeError| {
                            OutboxError::CorruptState {
                                feed: k.value().to_string(),
                                reason: e.to_string(),
                            }
                        })?;
                let state: FeedState =
                    decode(v.value()).map_err(|e| OutboxError::CorruptState {
                        feed: k.value().to_string(),
                        reason: e.to_string(),
                    })?;
                out.insert(feed, state);
            }
            Ok(out)
        })
    }

    /// Every feed's stored digest (feeds without one start empty).
    pub fn digests(&self) -> Result<BTreeMap<FeedId, FeedDigest>, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            let table = tx.open_table(DIGESTS).map_err(storage)?;
            let mut out = BTreeMap::new();
            for item in table.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                let corrupt = |reason: String| OutboxError::CorruptState {
                    feed: k.value().to_string(),
                    reason,
                };
                let feed: FeedId = k
                    .value()
                    .parse()
                    .map_err(|e: shuyuan_protocol::feed::CodeError| corrupt(e.to_string()))?;
                out.insert(feed, decode(v.value()).map_err(|e| corrupt(e.to_string()))?);
            }
            Ok(out)
        })
    }

    /// Reads row seeds; one read transaction for many lookups.
    pub fn seeds(&self) -> Result<SeedReader, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            Ok(SeedReader {
                table: tx.open_table(SEEDS).map_err(storage)?,
            })
        })
    }

    /// The committed source position, if any.
    pub fn position(&self) -> Result<Option<String>, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            let meta = tx.open_table(META).map_err(storage)?;
            Ok(meta
                .get("position")
                .map_err(storage)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
        })
    }

    /// How many batches and bytes the outbox holds.
    pub fn totals(&self) -> Result<Totals, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            let meta = tx.open_table(META).map_err(storage)?;
            read_totals(&meta)
        })
    }

    /// One stored batch.
    pub fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            let table = tx.open_table(OUTBOX).map_err(storage)?;
            let key = feed.to_string();
            let Some(v) = table.get((key.as_str(), seq)).map_err(storage)? else {
                return Ok(None);
            };
            let batch: SignedBatch =
                decode(v.value()).map_err(|e: encoding::DecodeError| OutboxError::Corrupt {
                    feed: key.clone(),
                    seq,
                    reason: e.to_string(),
                })?;
            Ok(Some(batch))
        })
    }

    /// The lowest stored sequence number of a feed.
    pub fn first_seq(&self, feed: &FeedId) -> Result<Option<u64>, OutboxError> {
        self.read(|file| {
            let tx = file.begin_read().map_err(storage)?;
            let table = tx.open_table(OUTBOX).map_err(storage)?;
            let key = feed.to_string();
            let mut range = table
                .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                .map_err(storage)?;
            Ok(match range.next() {
                Some(item) => Some(item.map_err(storage)?.0.value().1),
                None => None,
            })
        })
    }

    /// Applies one commit durably and returns the new totals.
    pub fn commit(&self, c: &Commit) -> Result<Totals, OutboxError> {
        self.write(|file| {
            let tx = file.begin_write().map_err(storage)?;
            let totals = {
                let mut outbox = tx.open_table(OUTBOX).map_err(storage)?;
                let mut feeds = tx.open_table(FEEDS).map_err(storage)?;
                let mut meta = tx.open_table(META).map_err(storage)?;
                let mut totals = read_totals(&meta)?;
                for (feed, seq, bytes) in &c.appended {
                    let key = feed.to_string();
                    let old = outbox
                        .insert((key.as_str(), *seq), bytes.as_slice())
                        .map_err(storage)?;
                    if let Some(old) = old {
                        totals.batches -= 1;
                        totals.bytes -= old.value().len() as u64;
                    }
                    totals.batches += 1;
                    totals.bytes += bytes.len() as u64;
                }
                for (feed, upto) in &c.prune {
                    let key = feed.to_string();
                    let removed = outbox
                        .extract_from_if((key.as_str(), 0)..=(key.as_str(), *upto), |_, _| true)
                        .map_err(storage)?;
                    for item in removed {
                        let (_, v) = item.map_err(storage)?;
                        totals.batches -= 1;
                        totals.bytes -= v.value().len() as u64;
                    }
                }
                for (feed, state) in &c.feeds {
                    let bytes = encode(state).map_err(|e| OutboxError::Storage(e.to_string()))?;
                    feeds
                        .insert(feed.to_string().as_str(), bytes.as_slice())
                        .map_err(storage)?;
                }
                if let Some(p) = &c.position {
                    meta.insert("position", p.as_bytes()).map_err(storage)?;
                }
                if !c.seeds.is_empty() || !c.digests.is_empty() {
                    let mut seeds = tx.open_table(SEEDS).map_err(storage)?;
                    for (feed, key, entry) in &c.seeds {
                        let f = feed.to_string();
                        match entry {
                            Some(e) => {
                                seeds
                                    .insert((f.as_str(), key.as_slice()), seed_bytes(e).as_slice())
                                    .map_err(storage)?;
                            }
                            None => {
                                seeds
                                    .remove((f.as_str(), key.as_slice()))
                                    .map_err(storage)?;
                            }
                        }
                    }
                    let mut digests = tx.open_table(DIGESTS).map_err(storage)?;
                    for (feed, d) in &c.digests {
                        let bytes = encode(d).map_err(|e| OutboxError::Storage(e.to_string()))?;
                        digests
                            .insert(feed.to_string().as_str(), bytes.as_slice())
                            .map_err(storage)?;
                    }
                }
                meta.insert("batches", totals.batches.to_be_bytes().as_slice())
                    .map_err(storage)?;
                meta.insert("bytes", totals.bytes.to_be_bytes().as_slice())
                    .map_err(storage)?;
                totals
            };
            tx.commit().map_err(storage)?;
            Ok(totals)
        })
    }
}

/// Lookups of row seeds in one read transaction.
#[derive(Debug)]
pub struct SeedReader {
    table: redb::ReadOnlyTable<(&'static str, &'static [u8]), &'static [u8]>,
}

impl SeedReader {
    /// The stored seed of one row.
    pub fn get(&self, feed: &str, key: &[u8]) -> Result<Option<SeedEntry>, OutboxError> {
        Ok(self
            .table
            .get((feed, key))
            .map_err(storage)?
            .and_then(|v| seed_entry(v.value())))
    }

    /// The stored seeds of the rows in a key range, in key order.
    pub fn range(
        &self,
        feed: &str,
        range: &KeyRange,
    ) -> Result<Vec<(Vec<u8>, SeedEntry)>, OutboxError> {
        let lo: (&str, &[u8]) = (feed, range.lo.as_slice());
        let items = match &range.hi {
            Some(hi) => self.table.range(lo..(feed, hi.as_slice())),
            None => self.table.range(lo..(feed, [0xffu8].as_slice())),
        }
        .map_err(storage)?;
        let mut out = Vec::new();
        for item in items {
            let (k, v) = item.map_err(storage)?;
            if let Some(e) = seed_entry(v.value()) {
                out.push((k.value().1.to_vec(), e));
            }
        }
        Ok(out)
    }
}

fn read_totals(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Totals, OutboxError> {
    let get = |name: &str| -> Result<u64, OutboxError> {
        Ok(meta
            .get(name)
            .map_err(storage)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    };
    Ok(Totals {
        batches: get("batches")?,
        bytes: get("bytes")?,
    })
}

/// A disk that fills up on demand, for tests: a redb file whose writes
/// fail with "No space left on device" while `full` is set.
#[cfg(test)]
pub(crate) mod testing {
    use std::ops::Bound;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::StorageBackend;
    use redb::backends::FileBackend;
    use shuyuan_service::{OpenError, Opener};

    #[derive(Debug)]
    pub struct FullDisk {
        file: FileBackend,
        full: Arc<AtomicBool>,
    }

    impl FullDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
            } else {
                Ok(())
            }
        }
    }

    /// Opens files on a [`FullDisk`] that fills while `full` is set.
    pub fn opener(full: Arc<AtomicBool>) -> Opener {
        Box::new(move |path| {
            let failed = |e: String| OpenError::Failed {
                path: path.to_owned(),
                reason: e,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| failed(e.to_string()))?;
            let file = FileBackend::new(file).map_err(|e| failed(e.to_string()))?;
            redb::Builder::new()
                .create_with_backend(FullDisk {
                    file,
                    full: full.clone(),
                })
                .map_err(|e| failed(e.to_string()))
        })
    }

    type Locked = Result<bool, redb::BackendError>;

    impl StorageBackend for FullDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            if len > self.file.len()? {
                self.check()?;
            }
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Locked {
            self.file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Locked {
            self.file.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
            self.file.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.file.lock_shared_range(start, end)
        }
        fn unlock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.file.unlock_range(start, end)
        }
        fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Locked {
            self.file.query_lock_range(start, end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn feed(r: &str) -> FeedId {
        format!("D:{r}").parse().unwrap()
    }

    #[test]
    fn commit_prune_and_totals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let ob = Outbox::open(&path).unwrap();
        assert!(matches!(
            Outbox::open(&path),
            Err(OutboxError::AlreadyOpen(_))
        ));
        let key = shuyuan_protocol::NodeKey::from_seed([1; 32]);
        let mut appended = Vec::new();
        for seq in 1..=5u64 {
            let body = shuyuan_protocol::BatchBody {
                feed: feed("A"),
                seq,
                prev: shuyuan_protocol::BatchHash::GENESIS,
                created_at: UnixMillis(1),
                entries: vec![],
            };
            let b = SignedBatch::seal(&key, &body).unwrap();
            appended.push((feed("A"), seq, encode(&b).unwrap()));
        }
        let sizes: u64 = appended.iter().map(|a| a.2.len() as u64).sum();
        let state = FeedState {
            acked: 0,
            ..Default::default()
        };
        let t = ob
            .commit(&Commit {
                appended,
                feeds: vec![(feed("A"), state.clone())],
                position: Some("42".into()),
                prune: vec![],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            t,
            Totals {
                batches: 5,
                bytes: sizes
            }
        );
        assert_eq!(ob.position().unwrap().as_deref(), Some("42"));
        assert_eq!(ob.feeds().unwrap()[&feed("A")], state);
        assert_eq!(ob.first_seq(&feed("A")).unwrap(), Some(1));
        let t = ob
            .commit(&Commit {
                prune: vec![(feed("A"), 3), (feed("B"), 9)],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(t.batches, 2);
        assert_eq!(ob.first_seq(&feed("A")).unwrap(), Some(4));
        assert!(ob.batch(&feed("A"), 3).unwrap().is_none());
        assert_eq!(ob.batch(&feed("A"), 4).unwrap().unwrap().signer, key.id());
        drop(ob);
        let ob = Outbox::open(&path).unwrap();
        assert_eq!(ob.totals().unwrap().batches, 2, "totals survive reopening");
    }

    #[test]
    fn row_seeds_and_digests_are_stored_with_the_commit() {
        use shuyuan_protocol::Value;
        use shuyuan_protocol::value::encode_key;
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&dir.path().join("outbox.redb")).unwrap();
        let k = |i: i64| encode_key(&[Value::Int(i)]);
        let seed = |i: i64| RowSeed::of(&[Value::Int(i)], &[Value::Int(i)]);
        let mut d = Digest::new();
        d.add(&seed(1));
        d.add(&seed(2));
        let state = FeedDigest {
            digest: d.to_bytes(),
            resync: Some(7),
            established: true,
        };
        ob.commit(&Commit {
            seeds: vec![
                (feed("A"), k(1), Some((seed(1), 0))),
                (feed("A"), k(2), Some((seed(2), 7))),
                (feed("B"), k(1), Some((seed(9), 0))),
            ],
            digests: vec![(feed("A"), state.clone())],
            ..Default::default()
        })
        .unwrap();
        let r = ob.seeds().unwrap();
        assert_eq!(r.get("D:A", &k(2)).unwrap(), Some((seed(2), 7)));
        assert_eq!(r.range("D:A", &KeyRange::all()).unwrap().len(), 2);
        let from_2 = KeyRange { lo: k(2), hi: None };
        assert_eq!(r.range("D:A", &from_2).unwrap(), vec![(k(2), (seed(2), 7))]);
        drop(r);
        assert_eq!(ob.digests().unwrap()[&feed("A")], state);
        assert_eq!(ob.digests().unwrap()[&feed("A")].digest(), d);
        ob.commit(&Commit {
            seeds: vec![(feed("A"), k(1), None)],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ob.seeds().unwrap().get("D:A", &k(1)).unwrap(), None);
    }

    fn batches(feed_: &FeedId, seqs: std::ops::RangeInclusive<u64>) -> Vec<(FeedId, u64, Vec<u8>)> {
        let key = shuyuan_protocol::NodeKey::from_seed([1; 32]);
        seqs.map(|seq| {
            let body = shuyuan_protocol::BatchBody {
                feed: feed_.clone(),
                seq,
                prev: shuyuan_protocol::BatchHash::GENESIS,
                created_at: UnixMillis(1),
                entries: vec![],
            };
            let b = SignedBatch::seal(&key, &body).unwrap();
            (feed_.clone(), seq, encode(&b).unwrap())
        })
        .collect()
    }

    #[test]
    fn a_failed_write_changes_nothing_and_the_file_is_reopened_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let full = Arc::new(AtomicBool::new(false));
        let ob = Outbox::open_with(&path, testing::opener(full.clone())).unwrap();
        let upto = |seq: u64| Commit {
            appended: batches(&feed("A"), seq - 1..=seq),
            position: Some(seq.to_string()),
            ..Default::default()
        };
        ob.commit(&upto(2)).unwrap();
        assert_eq!(ob.write_failure(), None);

        full.store(true, Ordering::SeqCst);
        let e = ob.commit(&upto(4)).unwrap_err();
        assert!(matches!(e, OutboxError::Io { earlier: false, .. }), "{e}");
        let failure = ob.write_failure().expect("the failure is reported");
        assert!(
            failure.error.contains("No space left on device"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 0));

        // The next write reopens the file first. This disk refuses every
        // write, so even opening fails (redb repairs the file when it opens
        // it); the file stays closed and the write is not tried.
        ob.set_reopen_interval(Duration::from_secs(3600));
        let e = ob.commit(&upto(4)).unwrap_err();
        assert!(matches!(e, OutboxError::Io { earlier: false, .. }), "{e}");
        let failure = ob.write_failure().unwrap();
        assert!(
            failure.error.starts_with("cannot open") && failure.error.contains("No space left"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 1));

        // Until the next reopen is due, a write fails at once without
        // trying, space or not, and the report keeps the cause.
        full.store(false, Ordering::SeqCst);
        let e = ob.commit(&upto(4)).unwrap_err();
        assert!(matches!(e, OutboxError::Io { earlier: true, .. }), "{e}");
        let failure = ob.write_failure().unwrap();
        assert!(
            failure.error.contains("No space left on device"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 1));

        // Space returns: the next operation reopens the file, and the outbox
        // holds exactly what was committed before the failures.
        ob.set_reopen_interval(Duration::ZERO);
        assert_eq!(ob.position().unwrap().as_deref(), Some("2"));
        assert_eq!(ob.totals().unwrap().batches, 2);
        assert!(ob.batch(&feed("A"), 3).unwrap().is_none());
        assert_eq!(ob.write_failure().map(|f| f.since), Some(failure.since));
        let t = ob.commit(&upto(4)).unwrap();
        assert_eq!(t.batches, 4);
        assert_eq!(ob.write_failure(), None, "a write succeeded");
        assert_eq!(ob.position().unwrap().as_deref(), Some("4"));
        drop(ob);
        let ob = Outbox::open(&path).unwrap();
        assert_eq!(ob.totals().unwrap().batches, 4);
        assert_eq!(ob.first_seq(&feed("A")).unwrap(), Some(1));
    }
}
