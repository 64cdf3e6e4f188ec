//! The outbox: signed batches waiting for the hub's ack, in redb.
//!
//! Invariants: an entry is deleted only after an ack that covers its
//! sequence number; the source position is committed in the same
//! transaction as the batches it produced, so a crash between capture and
//! outbox neither skips nor repeats a change; the capture loop is the only
//! writer of this file (the uplink reads it and sends its acks to the loop).
//!
//! A write that fails (a full disk, an I/O error) changes nothing, but redb
//! then refuses every later operation on that handle. The outbox file runs
//! every operation under the reopen policy that all service files share
//! ([`shuyuan_service::redb_file`]): it is closed and opened again before a
//! later operation, first 500 ms after the failure and then at growing
//! intervals up to [`REOPEN_INTERVAL`], and the failure is reported
//! ([`WriteFailure`]) until a write commits: capture pauses with its changes
//! in the source and resumes by itself when space returns.
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
use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shuyuan_protocol::encoding::{DecodeError, EncodeError, decode, encode};
use shuyuan_protocol::feed::CodeError;
use shuyuan_protocol::{
    Digest, FeedCursor, FeedId, KeyRange, RowSeed, SignedBatch, TableSchema, UnixMillis,
};
pub use shuyuan_service::WriteFailure;
use shuyuan_service::{
    Migration, OpenError, Opener, OperationError, RedbFile, ReopenSchedule, Unavailable,
    needs_reopen,
};

/// A disk that fills up on demand, for tests (the service crate's, shared
/// with the catalog's tests).
#[cfg(test)]
pub(crate) use shuyuan_service::redb_file::testing;

const OUTBOX_TABLE: &str = "outbox_v1";
const FEEDS_TABLE: &str = "feeds_v1";
const META_TABLE: &str = "meta_v1";
const DIGESTS_TABLE: &str = "digests_v1";
const SEEDS_TABLE: &str = "row_seeds_v1";
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new(OUTBOX_TABLE);
const FEEDS: TableDefinition<&str, &[u8]> = TableDefinition::new(FEEDS_TABLE);
const META: TableDefinition<&str, &[u8]> = TableDefinition::new(META_TABLE);
const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new(DIGESTS_TABLE);
const SEEDS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new(SEEDS_TABLE);
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

/// The longest time between two reopenings of the outbox file while its
/// writes keep failing ([`ReopenSchedule::STANDARD`], the same for every
/// service file): a full disk is retried 500 ms after the failure, then at
/// doubling intervals up to this one, not in a loop.
pub const REOPEN_INTERVAL: Duration = ReopenSchedule::STANDARD.max;

/// Errors of the outbox store.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "{0} is in use by another shuyuan-agent process (only one agent may use a data directory)"
    )]
    AlreadyOpen(PathBuf),
    #[error("outbox storage error: {0}")]
    Open(#[source] OpenError),
    /// The file failed (a full disk) or refuses because it failed before;
    /// it is opened again before a later operation.
    #[error("outbox I/O error {at}: {source}")]
    Io {
        at: Place,
        #[source]
        source: Box<redb::Error>,
    },
    /// redb failed for another reason.
    #[error("outbox storage error {at}: {source}")]
    Storage {
        at: Place,
        #[source]
        source: Box<redb::Error>,
    },
    /// The file waits to be opened again after an I/O error, or could not
    /// be opened again: the operation was not tried. Says what went wrong.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("cannot encode the {what} of {feed}: {source}")]
    Encode {
        /// "state" or "digest".
        what: &'static str,
        feed: String,
        #[source]
        source: EncodeError,
    },
    #[error("outbox entry {feed} #{seq} is corrupt: {source}")]
    Corrupt {
        feed: String,
        seq: u64,
        #[source]
        source: DecodeError,
    },
    #[error("stored feed state of {feed} is corrupt: {source}")]
    CorruptState {
        feed: String,
        #[source]
        source: RecordError,
    },
}

/// What is wrong with a stored feed record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Name(#[from] CodeError),
    #[error(transparent)]
    Value(#[from] DecodeError),
}

/// Where in the outbox file an operation was when redb failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Begin,
    Commit,
    /// A table as a whole (opening it, or visiting every record).
    Table(&'static str),
    /// One entry of `outbox_v1`.
    Entry {
        feed: String,
        seq: u64,
    },
    /// A feed's entries up to and including `upto` (pruning).
    Prune {
        feed: String,
        upto: u64,
    },
    /// A feed's record in `feeds_v1` or `digests_v1`.
    Feed {
        table: &'static str,
        feed: String,
    },
    /// A value in `meta_v1`.
    Meta(&'static str),
    /// A row's seed in `row_seeds_v1`.
    Seed {
        feed: String,
    },
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Begin => write!(f, "beginning a transaction"),
            Place::Commit => write!(f, "committing"),
            Place::Table(table) => write!(f, "in {table}"),
            Place::Entry { feed, seq } => write!(f, "at entry {feed} #{seq}"),
            Place::Prune { feed, upto } => write!(f, "pruning {feed} up to #{upto}"),
            Place::Feed { table, feed } => write!(f, "in {table} at {feed}"),
            Place::Meta(name) => write!(f, "in {META_TABLE} at {name}"),
            Place::Seed { feed } => write!(f, "in {SEEDS_TABLE} at {feed}"),
        }
    }
}

/// The error of a redb operation at `at`: an I/O error (the file is opened
/// again), or another.
fn failed(at: Place, e: impl Into<redb::Error>) -> OutboxError {
    let source = Box::new(e.into());
    if needs_reopen(&source) {
        OutboxError::Io { at, source }
    } else {
        OutboxError::Storage { at, source }
    }
}

/// [`failed`] at a place that costs nothing to name.
fn at<E: Into<redb::Error>>(at: Place) -> impl FnOnce(E) -> OutboxError {
    move |e| failed(at, e)
}

impl OperationError for OutboxError {
    fn redb_error(&self) -> Option<&redb::Error> {
        match self {
            OutboxError::Io { source, .. } | OutboxError::Storage { source, .. } => Some(source),
            _ => None,
        }
    }
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
    file: Arc<RedbFile>,
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
            other => OutboxError::Open(other),
        })?;
        Ok(Outbox {
            file: Arc::new(file.named("outbox")),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Why writes fail, while they do.
    pub fn write_failure(&self) -> Option<WriteFailure> {
        self.file.write_failure()
    }

    /// Reopens the file after an I/O error this long after the failure,
    /// every time (tests; the outbox otherwise follows
    /// [`ReopenSchedule::STANDARD`]).
    pub fn set_reopen_interval(&self, interval: Duration) {
        self.file.set_schedule(ReopenSchedule::fixed(interval));
    }

    /// Every feed's stored state.
    pub fn feeds(&self) -> Result<BTreeMap<FeedId, FeedState>, OutboxError> {
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            let table = tx
                .open_table(FEEDS)
                .map_err(at(Place::Table(FEEDS_TABLE)))?;
            let mut out = BTreeMap::new();
            for item in table.iter().map_err(at(Place::Table(FEEDS_TABLE)))? {
                let (k, v) = item.map_err(at(Place::Table(FEEDS_TABLE)))?;
                let (feed, state) = feed_record(k.value(), v.value())?;
                out.insert(feed, state);
            }
            Ok(out)
        })
    }

    /// Every feed's stored digest (feeds without one start empty).
    pub fn digests(&self) -> Result<BTreeMap<FeedId, FeedDigest>, OutboxError> {
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            let table = tx
                .open_table(DIGESTS)
                .map_err(at(Place::Table(DIGESTS_TABLE)))?;
            let mut out = BTreeMap::new();
            for item in table.iter().map_err(at(Place::Table(DIGESTS_TABLE)))? {
                let (k, v) = item.map_err(at(Place::Table(DIGESTS_TABLE)))?;
                let (feed, digest) = feed_record(k.value(), v.value())?;
                out.insert(feed, digest);
            }
            Ok(out)
        })
    }

    /// Reads row seeds; one read transaction for many lookups.
    pub fn seeds(&self) -> Result<SeedReader, OutboxError> {
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            Ok(SeedReader {
                table: tx
                    .open_table(SEEDS)
                    .map_err(at(Place::Table(SEEDS_TABLE)))?,
            })
        })
    }

    /// The committed source position, if any.
    pub fn position(&self) -> Result<Option<String>, OutboxError> {
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            let meta = tx.open_table(META).map_err(at(Place::Table(META_TABLE)))?;
            Ok(meta
                .get("position")
                .map_err(at(Place::Meta("position")))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
        })
    }

    /// How many batches and bytes the outbox holds.
    pub fn totals(&self) -> Result<Totals, OutboxError> {
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            let meta = tx.open_table(META).map_err(at(Place::Table(META_TABLE)))?;
            read_totals(&meta)
        })
    }

    /// One stored batch.
    pub fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, OutboxError> {
        let key = feed.to_string();
        let entry = || Place::Entry {
            feed: key.clone(),
            seq,
        };
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            let table = tx
                .open_table(OUTBOX)
                .map_err(at(Place::Table(OUTBOX_TABLE)))?;
            let Some(v) = table
                .get((key.as_str(), seq))
                .map_err(|e| failed(entry(), e))?
            else {
                return Ok(None);
            };
            let batch: SignedBatch = decode(v.value()).map_err(|source| OutboxError::Corrupt {
                feed: key.clone(),
                seq,
                source,
            })?;
            Ok(Some(batch))
        })
    }

    /// The lowest stored sequence number of a feed.
    pub fn first_seq(&self, feed: &FeedId) -> Result<Option<u64>, OutboxError> {
        let key = feed.to_string();
        let first = || Place::Entry {
            feed: key.clone(),
            seq: 0,
        };
        self.file.read(|file| {
            let tx = file.begin_read().map_err(at(Place::Begin))?;
            let table = tx
                .open_table(OUTBOX)
                .map_err(at(Place::Table(OUTBOX_TABLE)))?;
            let mut range = table
                .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                .map_err(|e| failed(first(), e))?;
            Ok(match range.next() {
                Some(item) => Some(item.map_err(|e| failed(first(), e))?.0.value().1),
                None => None,
            })
        })
    }

    /// Applies one commit durably and returns the new totals.
    pub fn commit(&self, c: &Commit) -> Result<Totals, OutboxError> {
        self.file.write(|file| {
            let tx = file.begin_write().map_err(at(Place::Begin))?;
            let totals = {
                let mut outbox = tx
                    .open_table(OUTBOX)
                    .map_err(at(Place::Table(OUTBOX_TABLE)))?;
                let mut feeds = tx
                    .open_table(FEEDS)
                    .map_err(at(Place::Table(FEEDS_TABLE)))?;
                let mut meta = tx.open_table(META).map_err(at(Place::Table(META_TABLE)))?;
                let mut totals = read_totals(&meta)?;
                for (feed, seq, bytes) in &c.appended {
                    let key = feed.to_string();
                    let old = outbox
                        .insert((key.as_str(), *seq), bytes.as_slice())
                        .map_err(|e| {
                            failed(
                                Place::Entry {
                                    feed: key.clone(),
                                    seq: *seq,
                                },
                                e,
                            )
                        })?;
                    if let Some(old) = old {
                        totals.batches -= 1;
                        totals.bytes -= old.value().len() as u64;
                    }
                    totals.batches += 1;
                    totals.bytes += bytes.len() as u64;
                }
                for (feed, upto) in &c.prune {
                    let key = feed.to_string();
                    let pruning = || Place::Prune {
                        feed: key.clone(),
                        upto: *upto,
                    };
                    let removed = outbox
                        .extract_from_if((key.as_str(), 0)..=(key.as_str(), *upto), |_, _| true)
                        .map_err(|e| failed(pruning(), e))?;
                    for item in removed {
                        let (_, v) = item.map_err(|e| failed(pruning(), e))?;
                        totals.batches -= 1;
                        totals.bytes -= v.value().len() as u64;
                    }
                }
                for (feed, state) in &c.feeds {
                    put_feed_record(&mut feeds, FEEDS_TABLE, "state", feed, state)?;
                }
                if let Some(p) = &c.position {
                    meta.insert("position", p.as_bytes())
                        .map_err(at(Place::Meta("position")))?;
                }
                if !c.seeds.is_empty() || !c.digests.is_empty() {
                    let mut seeds = tx
                        .open_table(SEEDS)
                        .map_err(at(Place::Table(SEEDS_TABLE)))?;
                    for (feed, key, entry) in &c.seeds {
                        let f = feed.to_string();
                        let row = (f.as_str(), key.as_slice());
                        match entry {
                            Some(e) => seeds.insert(row, seed_bytes(e).as_slice()).map(drop),
                            None => seeds.remove(row).map(drop),
                        }
                        .map_err(|e| failed(Place::Seed { feed: f.clone() }, e))?;
                    }
                    let mut digests = tx
                        .open_table(DIGESTS)
                        .map_err(at(Place::Table(DIGESTS_TABLE)))?;
                    for (feed, d) in &c.digests {
                        put_feed_record(&mut digests, DIGESTS_TABLE, "digest", feed, d)?;
                    }
                }
                meta.insert("batches", totals.batches.to_be_bytes().as_slice())
                    .map_err(at(Place::Meta("batches")))?;
                meta.insert("bytes", totals.bytes.to_be_bytes().as_slice())
                    .map_err(at(Place::Meta("bytes")))?;
                totals
            };
            tx.commit().map_err(at(Place::Commit))?;
            Ok(totals)
        })
    }
}

/// Stores a feed's record (`what`: its state or its digest) in `table`
/// (named `name`), keyed by feed text.
fn put_feed_record<T: Serialize>(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    name: &'static str,
    what: &'static str,
    feed: &FeedId,
    value: &T,
) -> Result<(), OutboxError> {
    let key = feed.to_string();
    let bytes = encode(value).map_err(|source| OutboxError::Encode {
        what,
        feed: key.clone(),
        source,
    })?;
    match table.insert(key.as_str(), bytes.as_slice()) {
        Ok(_) => Ok(()),
        Err(e) => Err(failed(
            Place::Feed {
                table: name,
                feed: key,
            },
            e,
        )),
    }
}

/// A record of a table keyed by feed text: the feed and its decoded value.
fn feed_record<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<(FeedId, T), OutboxError> {
    let corrupt = |source: RecordError| OutboxError::CorruptState {
        feed: key.to_string(),
        source,
    };
    let feed: FeedId = key.parse().map_err(|e: CodeError| corrupt(e.into()))?;
    let value = decode(value).map_err(|e| corrupt(e.into()))?;
    Ok((feed, value))
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
            .map_err(|e| failed(seed_of(feed), e))?
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
        .map_err(|e| failed(seed_of(feed), e))?;
        let mut out = Vec::new();
        for item in items {
            let (k, v) = item.map_err(|e| failed(seed_of(feed), e))?;
            if let Some(e) = seed_entry(v.value()) {
                out.push((k.value().1.to_vec(), e));
            }
        }
        Ok(out)
    }
}

fn seed_of(feed: &str) -> Place {
    Place::Seed {
        feed: feed.to_string(),
    }
}

fn read_totals(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Totals, OutboxError> {
    let get = |name: &'static str| -> Result<u64, OutboxError> {
        Ok(meta
            .get(name)
            .map_err(at(Place::Meta(name)))?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    };
    Ok(Totals {
        batches: get("batches")?,
        bytes: get("bytes")?,
    })
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
        assert!(matches!(e, OutboxError::Io { .. }), "{e}");
        assert!(e.to_string().contains("No space left on device"), "{e}");
        let failure = ob.write_failure().expect("the failure is reported");
        assert!(
            failure.error.contains("No space left on device"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 0));

        // Once the reopen is due (here at once), the next write reopens the
        // file first. This disk refuses every write, so even opening fails
        // (redb repairs the file when it opens it); the file stays closed
        // and the write is not tried.
        ob.set_reopen_interval(Duration::ZERO);
        let e = ob.commit(&upto(4)).unwrap_err();
        assert!(
            matches!(e, OutboxError::Unavailable(Unavailable::Reopen(_))),
            "{e}"
        );
        let failure = ob.write_failure().unwrap();
        assert!(
            failure.error.starts_with("cannot open") && failure.error.contains("No space left"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 1));

        // Until the next reopen is due, a write fails at once without
        // trying, space or not, and the report keeps the cause.
        ob.set_reopen_interval(Duration::from_secs(3600));
        full.store(false, Ordering::SeqCst);
        let e = ob.commit(&upto(4)).unwrap_err();
        assert!(
            matches!(e, OutboxError::Unavailable(Unavailable::Waiting { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("No space left on device"), "{e}");
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
