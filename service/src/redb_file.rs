//! A service's redb file: opened with its named migrations, and reopened
//! after an I/O error.
//!
//! Invariant: each migration runs once, in order, in one transaction with
//! the record that it ran; after a failed write the file is reopened (redb
//! repairs it from its last durable commit) before it is written again.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a redb file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0} is in use by another process (one process per data directory)")]
    AlreadyOpen(PathBuf),
    #[error("cannot open {path}: {reason}")]
    Failed { path: PathBuf, reason: String },
}

/// Opens (or creates) a service's redb file, creating its directory. A
/// `status` or `export` command run while the service was down may hold the
/// file for a moment, so an open that finds it locked waits up to five
/// seconds before giving up.
pub fn open_redb(path: &Path) -> Result<redb::Database, OpenError> {
    let failed = |reason: String| OpenError::Failed {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    for _ in 0..50 {
        match redb::Database::create(path) {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    Err(OpenError::AlreadyOpen(path.to_owned()))
}

/// A service's redb file that can be closed and opened again while the
/// service runs. After a failed write (a full disk, an I/O error) redb
/// refuses every later operation on that handle ("Previous I/O error
/// occurred"), even once the cause is gone; [`RedbFile::reopen`] drops the
/// handle and opens the file afresh (redb repairs it from its last durable
/// commit), which is how a hub or agent recovers by itself when space
/// returns.
pub struct RedbFile {
    path: PathBuf,
    /// None between a failed reopen and the next one.
    db: std::sync::RwLock<Option<redb::Database>>,
    open: Opener,
}

/// How a [`RedbFile`] opens its file, the first time and at each reopen:
/// [`open_redb`], or in tests a database on a backend that fails on
/// purpose.
pub type Opener = Box<dyn Fn(&Path) -> Result<redb::Database, OpenError> + Send + Sync>;

impl fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
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
        migrate(&db, migrations).map_err(|e| OpenError::Failed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(RedbFile {
            path: path.to_owned(),
            db: std::sync::RwLock::new(Some(db)),
            open,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, redb::TransactionError>,
    ) -> Result<T, redb::Error> {
        let db = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => Ok(f(db)?),
            None => Err(redb::Error::Io(std::io::Error::other(format!(
                "{} is closed after an I/O error and could not be opened again yet",
                self.path.display()
            )))),
        }
    }

    pub fn begin_read(&self) -> Result<redb::ReadTransaction, redb::Error> {
        self.with(<redb::Database as redb::ReadableDatabase>::begin_read)
    }

    pub fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        self.with(redb::Database::begin_write)
    }

    /// Closes the file and opens it again. Transactions begun before keep
    /// the old handle alive, so the open waits for them (up to five
    /// seconds, as [`open_redb`] does). On failure the file stays closed
    /// and every operation fails until a later reopen succeeds.
    pub fn reopen(&self) -> Result<(), OpenError> {
        let mut db = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(db.take());
        *db = Some((self.open)(&self.path)?);
        Ok(())
    }
}

/// Whether a redb error means the file must be reopened before it can be
/// written again: an I/O error, or the refusal that follows one.
pub fn needs_reopen(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

/// A named migration of a redb file: creates or converts tables. Each runs
/// once, in order, and is recorded in `migrations_v1` (name -> unix millis).
pub type Migration = (
    &'static str,
    fn(&redb::WriteTransaction) -> Result<(), redb::TableError>,
);

const MIGRATIONS: redb::TableDefinition<&str, i64> = redb::TableDefinition::new("migrations_v1");

/// Applies the migrations not yet recorded, in one transaction.
pub fn migrate(db: &redb::Database, migrations: &[Migration]) -> Result<(), redb::Error> {
    use redb::ReadableTable;
    let tx = db.begin_write()?;
    {
        let mut done = tx.open_table(MIGRATIONS)?;
        for (name, apply) in migrations {
            if done.get(*name)?.is_some() {
                continue;
            }
            apply(&tx)?;
            done.insert(*name, shuyuan_protocol::UnixMillis::now().0)?;
        }
    }
    tx.commit()?;
    Ok(())
}
