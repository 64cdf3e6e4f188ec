//! A service's redb file: opened with its named migrations, and reopened
//! after an I/O error under one policy, the same for every file (the
//! agent's outbox and catalog, the hub's store).
//!
//! Invariants: each migration runs once, in order, in one transaction with
//! the record that it ran; after an I/O error the file is closed and opened
//! again (redb repairs it from its last durable commit) before it is
//! written again, and never while the reopen is not yet due; a failure of
//! writes ends only when a write commits.
//!
//! # The reopen policy
//!
//! After a failed write (a full disk, an I/O error) redb refuses every
//! later operation on that handle ("Previous I/O error occurred"), even
//! once the cause is gone. [`RedbFile::read`] and [`RedbFile::write`] run
//! an operation under the policy:
//!
//! - An operation that fails with an I/O error ([`needs_reopen`]) asks for
//!   a reopen, due after the delay of the [`ReopenSchedule`]. An error of an
//!   operation that began on an older opening of the file asks nothing: the
//!   file was opened again since.
//! - When a reopen is due, the next operation (or [`RedbFile::reopen_if_due`],
//!   for a service that is idle) closes and opens the file first.
//! - A write while the reopen is not yet due is refused without touching
//!   the file ([`Unavailable::Waiting`], carrying the error that asked for
//!   the reopen). A read is tried even then (redb often still serves reads
//!   from its cache on a handle a failed write closed); when it fails with
//!   an I/O error and the reopen is due at once, it runs once more on the
//!   new opening.
//! - While writes fail, [`RedbFile::health`] reports it ([`WriteFailure`]:
//!   since when, the error that says what went wrong, the writes that were
//!   tried and failed, the reopens). The refusal that only repeats an
//!   earlier error ("Previous I/O error", or a write refused while the
//!   reopen waits) never replaces the real cause. The first write that
//!   commits ends the failure; an operation learns beforehand that it would
//!   ([`Opening::recovering`]).
//! - The first event of a failure is logged at error, the first reopen at
//!   info (or warn when it fails), the end at info; repeats at debug.
//!
//! # One schedule
//!
//! [`ReopenSchedule::STANDARD`]: the first reopen 500 ms after the failure,
//! then twice as long after each failure that follows (a failed reopen, or
//! a write that fails again on the new opening), up to 5 s; a committed
//! write resets it. A full disk clears when an operator frees space or a
//! volume grows, in seconds or hours, never within microseconds: a reopen
//! at once only fails again and logs again. 500 ms is shorter than the
//! callers' own retry cadence (the capture loop polls every 200 ms to 1 s,
//! agents resend batches the hub refused after their backoff), so a short
//! blip costs one cycle; during a long outage a reopen (redb's repair pass)
//! runs every 5 s instead of in a loop, and a file is written again at most
//! 5 s after space returns. The hub store used exactly this schedule; the
//! agent's outbox used a fixed second and now follows it (a long outage
//! retries every 5 s, a short one after 0.5 s and 1.5 s). Tests set their
//! own ([`RedbFile::set_schedule`]).
//!
//! # How the hub store uses it
//!
//! The hub's writer thread writes each group with [`RedbFile::write`]; in
//! the operation, when [`Opening::recovering`] returns the failure, it
//! appends the audit entry of that spell of failures to the same
//! transaction, so the entry is stored exactly when the failure ends. A
//! group refused with [`Unavailable`] (or failing with an I/O error) is
//! answered "unavailable" and never acknowledged. While
//! [`FileHealth::reopen_at`] is set, the writer waits for requests only
//! until then and calls [`RedbFile::reopen_if_due`]; once
//! [`FileHealth::reopened_at`] is older than its idle proof (60 s) and no
//! group came, it writes the spell's audit entry alone. Its `StoreHealth`
//! reads [`RedbFile::health`]: `failing_since` and `error` from the
//! failure, `failed_writes` from [`FileHealth::unwritten`], `recoveries`
//! from [`FileHealth::recoveries`]; the spell's count of refused groups is
//! the failure's `failed_writes` plus [`FileHealth::refused_writes`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::UnixMillis;

use crate::owner_only;

/// Why a redb file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0} is in use by another process (one process per data directory)")]
    AlreadyOpen(PathBuf),
    #[error("cannot open {path}: cannot create {dir}: {source}")]
    CreateDir {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot open {path}: migration {migration}: {source}")]
    Migration {
        path: PathBuf,
        /// The migration that failed, or the table that records them.
        migration: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
}

/// Why an operation on a [`RedbFile`] was not run.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// An earlier operation failed with an I/O error and the reopen it
    /// asked for is not due yet. `cause` is that error's text: what went
    /// wrong, never this refusal.
    #[error("{cause}")]
    Waiting { path: PathBuf, cause: String },
    /// The file was closed to be opened again, and could not be opened.
    #[error(transparent)]
    Reopen(#[from] OpenError),
}

/// An error of an operation run under the reopen policy: the policy reads
/// the redb error in it, and answers with it when it does not run the
/// operation.
pub trait OperationError: From<Unavailable> + fmt::Display {
    /// The redb error the operation failed with, if it failed in redb.
    fn redb_error(&self) -> Option<&redb::Error>;
}

/// Whether a redb error means the file must be reopened before it can be
/// written again: an I/O error, or the refusal that follows one.
pub fn needs_reopen(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

/// Whether a redb error only repeats an earlier one: it does not say what
/// went wrong.
fn repeats_earlier(e: &redb::Error) -> bool {
    matches!(e, redb::Error::PreviousIo | redb::Error::DatabaseClosed)
}

/// When a failed file is opened again: `first` after the failure, then
/// twice as long after each failure that follows, up to `max`; a committed
/// write starts again from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReopenSchedule {
    pub first: Duration,
    pub max: Duration,
}

impl ReopenSchedule {
    /// The schedule of every service file (the module doc says why).
    pub const STANDARD: ReopenSchedule = ReopenSchedule {
        first: Duration::from_millis(500),
        max: Duration::from_secs(5),
    };

    /// The same delay every time (tests: zero, or an hour).
    pub const fn fixed(delay: Duration) -> ReopenSchedule {
        ReopenSchedule {
            first: delay,
            max: delay,
        }
    }
}

impl Default for ReopenSchedule {
    fn default() -> Self {
        ReopenSchedule::STANDARD
    }
}

/// Writes to a file fail: since when, why, and what was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFailure {
    /// The first failed write since the last one that committed.
    pub since: UnixMillis,
    /// The latest error that says what went wrong (for a full disk, "No
    /// space left on device"), or why the file could not be opened again.
    pub error: String,
    /// Writes that reached the file and failed since `since` (while a
    /// reopen waits for its turn, writes are refused without trying).
    pub failed_writes: u64,
    /// Times the file was closed and opened again since `since`.
    pub reopens: u64,
}

/// How a file's writes are going: what status and metrics report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileHealth {
    /// Set while writes fail.
    pub failure: Option<WriteFailure>,
    /// Writes refused without being tried during the current failure.
    pub refused_writes: u64,
    /// Writes that did not commit because the file could not write
    /// (tried and failed, or refused), since the file was opened.
    pub unwritten: u64,
    /// Failures that ended with a committed write, since the file was
    /// opened.
    pub recoveries: u64,
    /// When the file is to be opened again: an I/O error asked for it.
    pub reopen_at: Option<Instant>,
    /// When the file was opened again after the last failed write; the
    /// next write that commits ends the failure.
    pub reopened_at: Option<Instant>,
}

/// How a [`RedbFile`] opens its file, the first time and at each reopen:
/// [`open_redb`], or in tests a database on a backend that fails on
/// purpose (`testing`, behind the cargo feature of that name).
pub type Opener = Box<dyn Fn(&Path) -> Result<redb::Database, OpenError> + Send + Sync>;

/// Opens (or creates) a service's redb file (mode 0600), creating its
/// directory (0700, see [`crate::owner_only`]). A `status` or `export`
/// command run while the service was down may hold the file for a moment,
/// and a reopen waits for transactions of the old handle, so an open that
/// finds the file locked waits up to five seconds before giving up.
pub fn open_redb(path: &Path) -> Result<redb::Database, OpenError> {
    open_waiting(path, || {
        redb::Builder::new().create_file(owner_only::open_file(path)?)
    })
}

/// Creates the file's directory (mode 0700) and the database with `create`,
/// retrying for up to five seconds while another handle holds the file.
pub fn open_waiting(
    path: &Path,
    create: impl Fn() -> Result<redb::Database, redb::DatabaseError>,
) -> Result<redb::Database, OpenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        owner_only::create_dir(dir).map_err(|source| OpenError::CreateDir {
            path: path.to_owned(),
            dir: dir.to_owned(),
            source,
        })?;
    }
    for _ in 0..50 {
        match create() {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(source) => {
                return Err(OpenError::Database {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Err(OpenError::AlreadyOpen(path.to_owned()))
}

/// A service's redb file that is closed and opened again while the service
/// runs, under the policy of this module.
pub struct RedbFile {
    path: PathBuf,
    /// Names the file in logs ("outbox" logs "outbox file opened again").
    name: &'static str,
    current: Mutex<Current>,
    open: Opener,
    policy: Mutex<Policy>,
}

/// The current opening of the file.
struct Current {
    /// None between a failed reopen and the next one. Operations hold a
    /// clone while they run, so a reopen waits for them (as for their
    /// transactions).
    db: Option<Arc<redb::Database>>,
    /// Counts the openings: an error of an operation that began on an
    /// older opening says nothing about the current one.
    generation: u64,
}

/// The reopen policy's state.
#[derive(Debug)]
struct Policy {
    schedule: ReopenSchedule,
    /// The delay from the next failure to the reopen it asks for.
    delay: Duration,
    /// A reopen asked for by an I/O error.
    pending: Option<Pending>,
    health: FileHealth,
}

#[derive(Debug)]
struct Pending {
    due: Instant,
    /// The text of the error that asked for it.
    cause: String,
}

impl fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The opening of the file an operation works on.
#[derive(Debug)]
pub struct Opening<'a> {
    db: &'a redb::Database,
    recovering: Option<&'a WriteFailure>,
}

impl Opening<'_> {
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        redb::ReadableDatabase::begin_read(self.db)
    }

    pub fn begin_write(&self) -> Result<redb::WriteTransaction, redb::TransactionError> {
        self.db.begin_write()
    }

    /// For a write while writes fail: the failure this write ends if it
    /// commits (the hub stores the failure's audit entry with it).
    pub fn recovering(&self) -> Option<&WriteFailure> {
        self.recovering
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RedbFile {
    /// Opens (or creates) the file and applies `migrations`.
    pub fn open(path: &Path, migrations: &[Migration]) -> Result<RedbFile, OpenError> {
        RedbFile::open_with(path, migrations, Box::new(open_redb))
    }

    /// Like [`RedbFile::open`], opening the file (now and at each reopen)
    /// with `open`; tests pass one that builds the database on a storage
    /// backend that fails writes when told to.
    pub fn open_with(
        path: &Path,
        migrations: &[Migration],
        open: Opener,
    ) -> Result<RedbFile, OpenError> {
        let db = open(path)?;
        migrate(path, &db, migrations)?;
        Ok(RedbFile {
            path: path.to_owned(),
            name: "redb",
            current: Mutex::new(Current {
                db: Some(Arc::new(db)),
                generation: 0,
            }),
            open,
            policy: Mutex::new(Policy {
                schedule: ReopenSchedule::STANDARD,
                delay: ReopenSchedule::STANDARD.first,
                pending: None,
                health: FileHealth::default(),
            }),
        })
    }

    /// Names the file in logs: `outbox` logs "outbox file opened again
    /// after an I/O error" and "the outbox can be written again".
    pub fn named(mut self, name: &'static str) -> RedbFile {
        self.name = name;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the reopen schedule (tests).
    pub fn set_schedule(&self, schedule: ReopenSchedule) {
        let mut p = lock(&self.policy);
        p.schedule = schedule;
        p.delay = schedule.first;
        if let Some(pending) = p.pending.as_mut() {
            // A waiting reopen follows the new schedule at once.
            pending.due = Instant::now() + schedule.first;
        }
    }

    /// How writes are going.
    pub fn health(&self) -> FileHealth {
        lock(&self.policy).health.clone()
    }

    /// Why writes fail, while they do.
    pub fn write_failure(&self) -> Option<WriteFailure> {
        lock(&self.policy).health.failure.clone()
    }

    /// The current opening and its generation.
    fn current(&self) -> (Option<Arc<redb::Database>>, u64) {
        let c = lock(&self.current);
        (c.db.clone(), c.generation)
    }

    /// Begins a read transaction on the current opening, outside the
    /// policy (the hub store until it moves onto [`RedbFile::read`]).
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, redb::Error> {
        Ok(redb::ReadableDatabase::begin_read(
            self.current_db()?.as_ref(),
        )?)
    }

    /// Begins a write transaction on the current opening, outside the
    /// policy (the hub store until it moves onto [`RedbFile::write`]).
    pub fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        Ok(self.current_db()?.begin_write()?)
    }

    fn current_db(&self) -> Result<Arc<redb::Database>, redb::Error> {
        self.current().0.ok_or_else(|| {
            redb::Error::Io(std::io::Error::other(format!(
                "{} is closed after an I/O error and could not be opened again yet",
                self.path.display()
            )))
        })
    }

    /// Closes the file and opens it again, now. Operations and
    /// transactions begun before keep the old handle alive, so the open
    /// waits for them (up to five seconds, as [`open_redb`] does). On
    /// failure the file stays closed and every operation fails until a
    /// later reopen succeeds. [`RedbFile::read`] and [`RedbFile::write`]
    /// call it when the policy says so.
    pub fn reopen(&self) -> Result<(), OpenError> {
        let mut c = lock(&self.current);
        c.generation += 1;
        drop(c.db.take());
        c.db = Some(Arc::new((self.open)(&self.path)?));
        Ok(())
    }

    /// Opens the file again if a reopen is due: for a service that is
    /// idle while its file waits to be reopened. Returns whether it did.
    pub fn reopen_if_due(&self) -> Result<bool, Unavailable> {
        let mut p = lock(&self.policy);
        if p.pending.as_ref().is_none_or(|r| r.due > Instant::now()) {
            return Ok(false);
        }
        self.reopen_now(&mut p)?;
        Ok(true)
    }

    /// Runs a read. It is tried even while a reopen waits for its turn;
    /// when it fails with an I/O error and the reopen it asked for is due
    /// at once, it runs once more on the new opening. `op` must not use
    /// this file again.
    pub fn read<T, E: OperationError>(
        &self,
        op: impl Fn(&Opening<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.prepare_read()?;
        let (result, generation) = self.run(None, &op);
        if !result.as_ref().err().is_some_and(asks_reopen) {
            return result;
        }
        match self.prepare_read() {
            Ok(()) if self.current().1 != generation => self.run(None, &op).0,
            _ => result,
        }
    }

    /// Runs a write. While the file waits to be opened again after an I/O
    /// error, it is refused without touching the file; when the reopen is
    /// due, the file is opened again first. `op` commits its transaction
    /// and must not use this file again.
    pub fn write<T, E: OperationError>(
        &self,
        op: impl FnOnce(&Opening<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let recovering = {
            let mut p = lock(&self.policy);
            if let Err(e) = self.prepare(&mut p) {
                p.health.refused_writes += 1;
                p.health.unwritten += 1;
                if p.health.failure.is_none() {
                    let cause = match &e {
                        Unavailable::Waiting { cause, .. } => cause.clone(),
                        Unavailable::Reopen(open) => open.to_string(),
                    };
                    self.begin_failure(&mut p, cause, 0);
                }
                return Err(e.into());
            }
            p.health.failure.clone()
        };
        let (result, _) = self.run(recovering.as_ref(), op);
        let mut p = lock(&self.policy);
        match &result {
            Ok(_) => {
                p.delay = p.schedule.first;
                p.health.reopened_at = None;
                if let Some(f) = p.health.failure.take() {
                    p.health.recoveries += 1;
                    p.health.refused_writes = 0;
                    tracing::info!(
                        path = %self.path.display(),
                        since = %f.since,
                        failed_writes = f.failed_writes,
                        reopens = f.reopens,
                        "the {} can be written again", self.name
                    );
                }
            }
            Err(e) => {
                if let Some(redb) = e.redb_error().filter(|r| needs_reopen(r)) {
                    p.health.unwritten += 1;
                    let real = !repeats_earlier(redb);
                    match p.health.failure.as_mut() {
                        Some(f) => {
                            f.failed_writes += 1;
                            if real {
                                f.error = e.to_string();
                            }
                        }
                        None => {
                            let cause = match (&p.pending, real) {
                                (Some(pending), false) => pending.cause.clone(),
                                _ => e.to_string(),
                            };
                            self.begin_failure(&mut p, cause, 1);
                        }
                    }
                }
            }
        }
        drop(p);
        result
    }

    /// Reopens when due, for a read.
    fn prepare_read(&self) -> Result<(), Unavailable> {
        let mut p = lock(&self.policy);
        match self.prepare(&mut p) {
            // A read is tried while the reopen waits, unless the file is
            // closed.
            Err(Unavailable::Waiting { .. }) if lock(&self.current).db.is_some() => Ok(()),
            other => other,
        }
    }

    /// Opens the file again if a reopen is due; refuses while one waits.
    fn prepare(&self, p: &mut Policy) -> Result<(), Unavailable> {
        match &p.pending {
            None => Ok(()),
            Some(pending) if pending.due <= Instant::now() => self.reopen_now(p),
            Some(pending) => Err(Unavailable::Waiting {
                path: self.path.clone(),
                cause: p
                    .health
                    .failure
                    .as_ref()
                    .map_or_else(|| pending.cause.clone(), |f| f.error.clone()),
            }),
        }
    }

    /// Reopens now, holding the policy: the other threads' operations wait
    /// here rather than begin on the handle being replaced.
    fn reopen_now(&self, p: &mut Policy) -> Result<(), Unavailable> {
        // A long outage reopens every few seconds: the log tells the first
        // time, and the end tells how many.
        let first = match p.health.failure.as_mut() {
            Some(f) => {
                f.reopens += 1;
                f.reopens == 1
            }
            None => true,
        };
        let path = self.path.display();
        match self.reopen() {
            Ok(()) => {
                p.pending = None;
                p.health.reopen_at = None;
                p.health.reopened_at = Some(Instant::now());
                if first {
                    tracing::info!(%path, "{} file opened again after an I/O error", self.name);
                } else {
                    tracing::debug!(%path, "{} file opened again after an I/O error", self.name);
                }
                Ok(())
            }
            Err(e) => {
                let cause = e.to_string();
                if first {
                    tracing::warn!(%path, error = %cause, "cannot open the {} file again yet; retrying", self.name);
                } else {
                    tracing::debug!(%path, error = %cause, "cannot open the {} file again yet; retrying", self.name);
                }
                if let Some(f) = p.health.failure.as_mut() {
                    f.error = cause.clone();
                }
                p.pending = None;
                Self::ask_reopen(p, cause);
                Err(Unavailable::Reopen(e))
            }
        }
    }

    /// A failure asks for a reopen (unless one waits already), due after
    /// the schedule's delay, which then doubles.
    fn ask_reopen(p: &mut Policy, cause: String) {
        if p.pending.is_some() {
            return;
        }
        let due = Instant::now() + p.delay;
        p.delay = (p.delay * 2).min(p.schedule.max).max(p.schedule.first);
        p.pending = Some(Pending { due, cause });
        p.health.reopen_at = Some(due);
        p.health.reopened_at = None;
    }

    fn begin_failure(&self, p: &mut Policy, error: String, failed_writes: u64) {
        tracing::error!(
            path = %self.path.display(),
            %error,
            "cannot write the {} file; it is opened again {:?} after the failure, then at growing intervals up to {:?}, until a write succeeds",
            self.name, p.schedule.first, p.schedule.max
        );
        p.health.failure = Some(WriteFailure {
            since: UnixMillis::now(),
            error,
            failed_writes,
            reopens: 0,
        });
    }

    /// Runs `op` on the current opening and notes how it ended: an I/O
    /// error asks for a reopen unless the file was opened again since the
    /// operation began. Returns the generation it ran on.
    fn run<T, E: OperationError>(
        &self,
        recovering: Option<&WriteFailure>,
        op: impl FnOnce(&Opening<'_>) -> Result<T, E>,
    ) -> (Result<T, E>, u64) {
        let (db, generation) = self.current();
        let result = match db {
            Some(db) => op(&Opening {
                db: &db,
                recovering,
            }),
            None => Err(E::from(self.waiting())),
        };
        if let Err(e) = &result {
            self.note(generation, e);
        }
        (result, generation)
    }

    /// Notes an error of an operation that ran on opening `generation`:
    /// an I/O error asks for a reopen, unless the file was opened again
    /// since.
    fn note<E: OperationError>(&self, generation: u64, e: &E) {
        let Some(redb) = e.redb_error().filter(|r| needs_reopen(r)) else {
            return;
        };
        let mut p = lock(&self.policy);
        if lock(&self.current).generation == generation {
            let cause = match (&p.health.failure, repeats_earlier(redb)) {
                (Some(f), true) => f.error.clone(),
                _ => e.to_string(),
            };
            Self::ask_reopen(&mut p, cause);
        }
    }

    fn waiting(&self) -> Unavailable {
        let p = lock(&self.policy);
        let cause = p
            .health
            .failure
            .as_ref()
            .map(|f| f.error.clone())
            .or_else(|| p.pending.as_ref().map(|r| r.cause.clone()))
            .unwrap_or_else(|| format!("{} was opened again meanwhile", self.path.display()));
        Unavailable::Waiting {
            path: self.path.clone(),
            cause,
        }
    }
}

fn asks_reopen<E: OperationError>(e: &E) -> bool {
    e.redb_error().is_some_and(needs_reopen)
}

/// A named migration of a redb file: creates or converts tables. Each runs
/// once, in order, and is recorded in `migrations_v1` (name -> unix millis).
pub type Migration = (
    &'static str,
    fn(&redb::WriteTransaction) -> Result<(), redb::TableError>,
);

const RECORD: &str = "migrations_v1";
const MIGRATIONS: redb::TableDefinition<&str, i64> = redb::TableDefinition::new(RECORD);

/// Applies the migrations not yet recorded, in one transaction.
pub fn migrate(
    path: &Path,
    db: &redb::Database,
    migrations: &[Migration],
) -> Result<(), OpenError> {
    let mut step = RECORD;
    apply_migrations(db, migrations, &mut step).map_err(|source| OpenError::Migration {
        path: path.to_owned(),
        migration: step,
        source: Box::new(source),
    })
}

/// [`migrate`]; `step` names the migration being applied, or the record
/// of them.
fn apply_migrations(
    db: &redb::Database,
    migrations: &[Migration],
    step: &mut &'static str,
) -> Result<(), redb::Error> {
    use redb::ReadableTable;
    let tx = db.begin_write()?;
    {
        let mut done = tx.open_table(MIGRATIONS)?;
        for (name, apply) in migrations {
            if done.get(*name)?.is_some() {
                continue;
            }
            *step = name;
            apply(&tx)?;
            *step = RECORD;
            done.insert(*name, UnixMillis::now().0)?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// A disk that fills up on demand, for tests of this crate and of the
/// services (cargo feature `testing`): a redb file whose writes fail with
/// "No space left on device" while a flag is set.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::ops::Bound;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::StorageBackend;
    use redb::backends::FileBackend;

    use super::{Opener, open_waiting};

    /// A file backend whose growing and writing fail while `full` is set.
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
            open_waiting(path, || {
                let file = crate::owner_only::open_file(path)
                    .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
                redb::Builder::new().create_with_backend(FullDisk {
                    file: FileBackend::new(file)?,
                    full: full.clone(),
                })
            })
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
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const T: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("t_v1");
    const MIGRATIONS: &[Migration] = &[("0001-t", |tx| {
        tx.open_table(T)?;
        Ok(())
    })];

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("test storage error: {0}")]
        Redb(#[from] redb::Error),
        #[error(transparent)]
        Unavailable(#[from] Unavailable),
    }

    impl OperationError for TestError {
        fn redb_error(&self) -> Option<&redb::Error> {
            match self {
                TestError::Redb(e) => Some(e),
                TestError::Unavailable(_) => None,
            }
        }
    }

    fn injected() -> TestError {
        TestError::Redb(redb::Error::Io(std::io::Error::other("injected")))
    }

    fn insert(o: &Opening<'_>, key: &str, value: u64) -> Result<(), redb::Error> {
        let tx = o.begin_write()?;
        tx.open_table(T)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    fn put(file: &RedbFile, key: &str, value: u64) -> Result<(), TestError> {
        file.write(|o| Ok(insert(o, key, value)?))
    }

    fn get(file: &RedbFile, key: &str) -> Result<Option<u64>, TestError> {
        file.read(|o| {
            let tx = o.begin_read().map_err(redb::Error::from)?;
            let table = tx.open_table(T).map_err(redb::Error::from)?;
            Ok(table
                .get(key)
                .map_err(redb::Error::from)?
                .map(|v| v.value()))
        })
    }

    /// A file on a disk that fills while the flag is set.
    fn on_full_disk(schedule: ReopenSchedule) -> (tempfile::TempDir, RedbFile, Arc<AtomicBool>) {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let file = RedbFile::open_with(
            &dir.path().join("data").join("t.redb"),
            MIGRATIONS,
            testing::opener(full.clone()),
        )
        .unwrap()
        .named("test");
        file.set_schedule(schedule);
        (dir, file, full)
    }

    /// Asserts that the reopen is due `delay` after a failure noted
    /// between `before` and now.
    fn assert_due_after(file: &RedbFile, before: Instant, delay: Duration) {
        let due = file.health().reopen_at.expect("a reopen is asked for");
        assert!(
            due >= before + delay && due <= Instant::now() + delay,
            "due {:?} after the failure, not {delay:?}",
            due - before
        );
    }

    fn wait_until_due(file: &RedbFile) {
        if let Some(due) = file.health().reopen_at {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }

    #[test]
    fn a_failed_write_is_reported_refused_until_the_reopen_is_due_and_ended_by_a_commit() {
        let (_dir, file, full) = on_full_disk(ReopenSchedule::fixed(Duration::from_secs(3600)));
        put(&file, "a", 1).unwrap();
        assert_eq!(file.health(), FileHealth::default());

        full.store(true, Ordering::SeqCst);
        let e = put(&file, "b", 2).unwrap_err();
        assert!(
            matches!(&e, TestError::Redb(redb::Error::Io(_))),
            "the write reached the file: {e}"
        );
        let health = file.health();
        let failure = health.failure.clone().expect("the failure is reported");
        assert!(
            failure.error.contains("No space left on device"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 0));
        assert!(
            health
                .reopen_at
                .is_some_and(|t| t > Instant::now() + Duration::from_secs(3000))
        );

        // Space returns, but the reopen is not due: the write is refused
        // without touching the file, and says what went wrong.
        full.store(false, Ordering::SeqCst);
        let e = put(&file, "b", 2).unwrap_err();
        assert!(
            matches!(&e, TestError::Unavailable(Unavailable::Waiting { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("No space left on device"), "{e}");
        let health = file.health();
        assert_eq!(health.failure.as_ref(), Some(&failure), "the cause stays");
        assert_eq!((health.refused_writes, health.unwritten), (1, 2));

        // Due: the next write opens the file again, learns that it ends the
        // failure, and commits.
        file.set_schedule(ReopenSchedule::fixed(Duration::ZERO));
        let ended = Cell::new(None);
        file.write(|o| {
            ended.set(o.recovering().cloned());
            Ok::<_, TestError>(insert(o, "b", 2)?)
        })
        .unwrap();
        let ended = ended.take().expect("the write knew it ended the failure");
        assert_eq!(
            (ended.since, ended.failed_writes, ended.reopens),
            (failure.since, 1, 1)
        );
        let health = file.health();
        assert_eq!(health.failure, None);
        assert_eq!(
            (health.refused_writes, health.unwritten, health.recoveries),
            (0, 2, 1)
        );
        assert_eq!((health.reopen_at, health.reopened_at), (None, None));
        assert_eq!(get(&file, "a").unwrap(), Some(1));
        assert_eq!(get(&file, "b").unwrap(), Some(2));
        file.write(|o| {
            assert!(o.recovering().is_none(), "only the first commit ends it");
            Ok::<_, TestError>(insert(o, "c", 3)?)
        })
        .unwrap();
        assert_eq!(file.health().recoveries, 1);
    }

    #[test]
    fn the_reopen_waits_longer_after_each_failure_up_to_the_max_and_a_commit_resets_it() {
        let schedule = ReopenSchedule {
            first: Duration::from_millis(40),
            max: Duration::from_millis(100),
        };
        let (_dir, file, full) = on_full_disk(schedule);
        full.store(true, Ordering::SeqCst);
        let before = Instant::now();
        put(&file, "a", 1).unwrap_err();
        assert_due_after(&file, before, Duration::from_millis(40));

        // This disk refuses every write, so opening fails too (redb repairs
        // the file when it opens it): each failed reopen waits twice as
        // long, up to the max.
        for delay in [80, 100, 100] {
            wait_until_due(&file);
            let before = Instant::now();
            let e = put(&file, "a", 1).unwrap_err();
            assert!(
                matches!(&e, TestError::Unavailable(Unavailable::Reopen(_))),
                "{e}"
            );
            assert_due_after(&file, before, Duration::from_millis(delay));
        }
        let failure = file.write_failure().unwrap();
        assert!(
            failure.error.starts_with("cannot open") && failure.error.contains("No space left"),
            "the failed reopen says why: {failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (1, 3));
        // Closed: a read is not tried either, and says why.
        let e = get(&file, "a").unwrap_err();
        assert!(
            matches!(&e, TestError::Unavailable(Unavailable::Waiting { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("No space left"), "{e}");

        full.store(false, Ordering::SeqCst);
        wait_until_due(&file);
        put(&file, "a", 1).unwrap();
        assert_eq!(file.health().recoveries, 1);
        assert_eq!(file.health().reopen_at, None);

        // A commit starts the schedule again from the first delay.
        full.store(true, Ordering::SeqCst);
        let before = Instant::now();
        put(&file, "b", 2).unwrap_err();
        assert_due_after(&file, before, Duration::from_millis(40));
    }

    #[test]
    fn a_read_is_tried_while_the_reopen_waits_and_retried_once_on_a_new_opening() {
        let dir = tempfile::tempdir().unwrap();
        let file = RedbFile::open(&dir.path().join("t.redb"), MIGRATIONS).unwrap();
        file.set_schedule(ReopenSchedule::fixed(Duration::ZERO));
        let tries = Cell::new(0);
        let fail_first = |_: &Opening<'_>| {
            tries.set(tries.get() + 1);
            if tries.get() == 1 {
                Err(injected())
            } else {
                Ok(tries.get())
            }
        };
        assert_eq!(file.read(fail_first).unwrap(), 2, "read again");
        assert_eq!(file.health().reopen_at, None, "reopened");
        assert!(file.health().reopened_at.is_some());

        // The reopen is not due: the read is not tried again, but later
        // reads are tried; writes are refused and name the cause.
        file.set_schedule(ReopenSchedule::fixed(Duration::from_secs(3600)));
        tries.set(0);
        let e = file.read(fail_first).unwrap_err();
        assert_eq!((tries.get(), e.to_string()), (1, injected().to_string()));
        assert_eq!(file.read(fail_first).unwrap(), 2);
        let e = put(&file, "a", 1).unwrap_err();
        assert!(
            matches!(&e, TestError::Unavailable(Unavailable::Waiting { cause, .. }) if *cause == injected().to_string()),
            "{e}"
        );
        let failure = file.write_failure().unwrap();
        assert_eq!(failure.error, injected().to_string());
        assert_eq!(failure.failed_writes, 0, "refused, not tried");
    }

    #[test]
    fn an_error_of_an_older_opening_asks_for_no_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let file = RedbFile::open(&dir.path().join("t.redb"), MIGRATIONS).unwrap();
        let (_, generation) = file.current();
        file.reopen().unwrap();
        file.note(generation, &injected());
        assert_eq!(file.health().reopen_at, None);
        file.note(generation + 1, &injected());
        assert!(file.health().reopen_at.is_some());
    }

    #[test]
    fn a_refusal_that_repeats_an_earlier_error_never_replaces_the_cause() {
        let (_dir, file, full) = on_full_disk(ReopenSchedule::fixed(Duration::ZERO));
        full.store(true, Ordering::SeqCst);
        put(&file, "a", 1).unwrap_err();
        full.store(false, Ordering::SeqCst);
        let e = file
            .write(|_| Err::<(), _>(TestError::Redb(redb::Error::PreviousIo)))
            .unwrap_err();
        assert!(matches!(e, TestError::Redb(redb::Error::PreviousIo)));
        let failure = file.write_failure().unwrap();
        assert!(
            failure.error.contains("No space left on device"),
            "{failure:?}"
        );
        assert_eq!((failure.failed_writes, failure.reopens), (2, 1));
        put(&file, "a", 1).unwrap();
        assert_eq!(file.write_failure(), None);
    }

    #[test]
    fn an_idle_file_is_reopened_when_due_and_a_write_still_proves_it() {
        let (_dir, file, full) = on_full_disk(ReopenSchedule::fixed(Duration::ZERO));
        assert!(!file.reopen_if_due().unwrap(), "nothing to reopen");
        full.store(true, Ordering::SeqCst);
        put(&file, "a", 1).unwrap_err();
        assert!(file.reopen_if_due().is_err(), "the disk is still full");
        full.store(false, Ordering::SeqCst);
        assert!(file.reopen_if_due().unwrap());
        let health = file.health();
        assert!(health.reopened_at.is_some() && health.reopen_at.is_none());
        assert!(health.failure.is_some(), "only a commit ends the failure");
        assert_eq!(health.failure.map(|f| f.reopens), Some(2));
        put(&file, "a", 1).unwrap();
        assert_eq!(file.health().recoveries, 1);
    }

    #[test]
    fn migrations_run_once_and_a_failed_one_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let file = RedbFile::open(&path, MIGRATIONS).unwrap();
        put(&file, "a", 1).unwrap();
        drop(file);
        const WRONG: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("t_v1");
        let bad: &[Migration] = &[
            MIGRATIONS[0],
            ("0002-bad", |tx| {
                tx.open_table(WRONG)?;
                Ok(())
            }),
        ];
        let e = RedbFile::open(&path, bad).unwrap_err();
        assert!(
            matches!(
                &e,
                OpenError::Migration {
                    migration: "0002-bad",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("cannot open"), "{e}");
        let file = RedbFile::open(&path, MIGRATIONS).unwrap();
        assert_eq!(get(&file, "a").unwrap(), Some(1), "0001 did not run again");
    }

    #[test]
    fn a_new_file_and_its_directory_are_for_the_services_user_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // Whatever the umask of the test run (usually 022).
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let path = data.join("hub.redb");
        let file = RedbFile::open(&path, MIGRATIONS).unwrap();
        put(&file, "a", 1).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&path), 0o600);
    }
}
