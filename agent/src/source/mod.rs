//! Capture connectors: where changes come from.
//!
//! A connector reads a department database and yields, in order, the
//! changes of the configured resources since a position, together with the
//! tables' current shapes whenever they may have changed. Positions are the
//! connector's own text form (for SQLite, the change-table id) and are
//! committed in the outbox in the same transaction as the batches they
//! produced.
//!
//! Invariant: one [`Source::read`] is one consistent snapshot of the
//! database: every row it returns was read under the shapes it reports (or
//! the last ones reported), and every change up to the returned position is
//! included.

pub mod pg;
pub mod probe;
pub mod sqlite;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::message::VerifyMode;
use shuyuan_protocol::{Entry, KeyRange, Op, Resync, TableSchema, UnixMillis, Value};

use crate::config::{Config, SourceConfig};

/// Errors from a source database. Where a driver error caused one, it is
/// kept as the source, with what was being done and on what.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open SQLite database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("cannot open SQLite database {path}: {source}")]
    SqliteOpen {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot open SQLite database {path}: the file is not a SQLite database")]
    NotSqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path} is locked by another process (waited {waited_ms} ms for it)")]
    Locked {
        path: String,
        waited_ms: u128,
        #[source]
        source: rusqlite::Error,
    },
    #[error("table {table} does not exist in {path}")]
    MissingTable { table: String, path: String },
    #[error("table {table} has no column {column} (named as a key column in the config)")]
    MissingColumn { table: String, column: String },
    #[error(
        "key columns ({columns}) of table {table} are neither its primary key nor a unique index, so they cannot identify a row"
    )]
    KeyNotUnique { table: String, columns: String },
    #[error(
        "capture triggers are not installed for table {table}; run `shuyuan-agent triggers install`"
    )]
    NoTriggers { table: String },
    #[error(
        "capture triggers of table {table} were installed for key ({installed}) but the config says ({configured}); run `shuyuan-agent triggers install` again"
    )]
    KeyChanged {
        table: String,
        installed: String,
        configured: String,
    },
    #[error(
        "{pending} captured changes are still waiting in the change table; run the agent until they are sent, or pass --force to drop them"
    )]
    PendingChanges { pending: u64 },
    #[error("bad capture position {position:?}")]
    BadPosition {
        position: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot write the capture position: {source}")]
    PositionText { source: serde_json::Error },
    /// A PostgreSQL failure without an error of its own (the server
    /// answered something the agent cannot use, or a connection is
    /// missing).
    #[error("PostgreSQL error while {context}: {message}")]
    Pg { context: String, message: String },
    #[error("PostgreSQL error while {context}: {}", pg_message(.source))]
    PgQuery {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL error while {context}: {source}")]
    PgStream {
        context: String,
        source: pg::wire::WireError,
    },
    #[error("PostgreSQL error while decoding the log at {}: {source}", pg::wire::lsn_text(*.at))]
    PgDecode {
        /// Where the message starts in the log.
        at: u64,
        source: pg::decode::DecodeError,
    },
    #[error("PostgreSQL error while starting the PostgreSQL client: {source}")]
    PgRuntime { source: std::io::Error },
    #[error(
        "replication slot {slot} does not exist; run `shuyuan-agent pg setup` (or have a DBA run the SQL of `shuyuan-agent pg setup --print-sql`)"
    )]
    NoSlot { slot: String },
    #[error(
        "table {table} has no primary key and no replica identity, so the log cannot say which row an update or delete changed; give it a primary key, or run ALTER TABLE {table} REPLICA IDENTITY FULL (the whole row then identifies it)"
    )]
    NoIdentity { table: String },
    #[error(
        "the key ({key}) configured for table {table} is not what the log identifies rows by ({identity}); leave `key` out to use the primary key, or run ALTER TABLE {table} REPLICA IDENTITY FULL"
    )]
    KeyNotIdentity {
        table: String,
        key: String,
        identity: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("SQLite error while {context}: {source}")]
    Sql {
        context: String,
        source: rusqlite::Error,
    },
}

/// A PostgreSQL error as operators read it: the server's message and its
/// SQLSTATE, or the client's error.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl SourceError {
    /// Whether retrying later may succeed without anyone doing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SourceError::Locked { .. }
                | SourceError::Pg { .. }
                | SourceError::PgQuery { .. }
                | SourceError::PgStream { .. }
                | SourceError::PgDecode { .. }
                | SourceError::PgRuntime { .. }
        )
    }

    /// A capture position that does not parse.
    pub(crate) fn bad_position(
        position: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> SourceError {
        SourceError::BadPosition {
            position: position.to_string(),
            source: Box::new(source),
        }
    }
}

/// One change as captured: the resource (an index into the config's
/// resources), what happened, the key, and the current row (`None` when the
/// row no longer exists).
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub resource: usize,
    pub op: Op,
    pub key: Vec<Value>,
    pub row: Option<Vec<Value>>,
}

/// The result of one read.
#[derive(Debug, Default)]
pub struct SourceRead {
    /// The current shape of every resource's table, in config order, when the
    /// database's schema may have changed since the previous read (always on
    /// the first read). Their `version` is 0; the capture loop numbers them.
    pub shapes: Option<Vec<TableSchema>>,
    pub changes: Vec<Captured>,
    /// Re-read marks: `(i, resource, mark)` goes before `changes[i]` (or
    /// after the last change when `i == changes.len()`), in this order.
    pub marks: Vec<(usize, usize, Resync)>,
    /// The position this read covers up to.
    pub position: String,
    /// No further changes were pending when this read was taken.
    pub complete: bool,
    /// Changes skipped because a key column was NULL (a NULL key cannot
    /// address a row in the shared copy).
    pub skipped_null_keys: u64,
    /// Answers to probes, `(resource, entry)`, read in the same snapshot and
    /// placed after every change of the read.
    pub probes: Vec<(usize, Entry)>,
    /// Probes wait to be answered (the capture loop comes back soon).
    pub probes_pending: bool,
}

/// A comparison of a key range of a resource with the hub's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// An index into the config's resources.
    pub resource: usize,
    pub run: u64,
    pub range: KeyRange,
    pub mode: VerifyMode,
}

/// A re-read of one resource, running or finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub resource: String,
    pub id: u64,
    pub reason: String,
    pub rows: u64,
    /// Rows in the table when it began (an estimate).
    pub total: u64,
    pub started_at: UnixMillis,
    pub finished_at: Option<UnixMillis>,
}

/// What a connector tells status beyond the position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReport {
    /// The position in words.
    pub position: String,
    /// Something an operator must know (a lost replication slot).
    pub alarm: Option<String>,
    /// Re-reads in progress.
    pub loads: Vec<LoadReport>,
    /// The latest finished re-read of each resource (this run).
    pub finished: Vec<LoadReport>,
    /// What `backlog` counts.
    pub backlog_unit: &'static str,
}

/// A capture connector.
pub trait Source: Send {
    /// One line for status and logs.
    fn describe(&self) -> String;
    /// Reads up to `limit` changes after `after`, as one snapshot.
    fn read(&mut self, after: &str, limit: usize) -> Result<SourceRead, SourceError>;
    /// Forgets changes up to `upto`; they are durable in the outbox.
    fn release(&mut self, upto: &str) -> Result<(), SourceError>;
    /// How many captured changes wait after `after`.
    fn backlog(&mut self, after: &str) -> Result<u64, SourceError>;
    /// Whether `read` itself waits (up to the poll interval) for changes to
    /// arrive, so the capture loop need not sleep between reads.
    fn waits_for_changes(&self) -> bool {
        false
    }
    /// The state for status, given the committed position.
    fn report(&self, position: &str) -> SourceReport {
        SourceReport {
            position: position.to_string(),
            backlog_unit: "changes",
            ..SourceReport::default()
        }
    }
    /// Asks for a re-read of one resource (an index into the config's
    /// resources); it begins with the next read.
    fn request_resync(&mut self, resource: usize, reason: String) -> Result<(), SourceError> {
        let _ = (resource, reason);
        Err(SourceError::Unsupported(
            "resync re-reads PostgreSQL tables; for SQLite run `shuyuan-agent triggers install` again, which queues every row".into(),
        ))
    }
    /// Queues a comparison of a key range with the hub. It is answered by a
    /// later read that saw every pending change, in that read's snapshot,
    /// so the answer stands at an exact point of the feed. A probe for the
    /// same resource, run and range end replaces the queued one.
    fn probe(&mut self, probe: Probe) -> Result<(), SourceError> {
        let _ = probe;
        Err(SourceError::Unsupported(
            "comparing with the source is not available for this connector yet; the feed's checkpoints still compare the hub with what the agent sent".into(),
        ))
    }
}

/// Opens the configured source, checking that capture is set up.
pub fn open(config: &Config) -> Result<Box<dyn Source>, SourceError> {
    match &config.source {
        SourceConfig::Sqlite {
            path, busy_timeout, ..
        } => Ok(Box::new(
            sqlite::SqliteSource::open(path, *busy_timeout, &config.resources)?
                .with_probe_rate(config.verify.rows_per_second),
        )),
        SourceConfig::Postgres(pg) => Ok(Box::new(
            pg::PgSource::open(pg, &config.resources)?
                .with_probe_rate(config.verify.rows_per_second),
        )),
    }
}

/// The position before any change.
pub fn initial_position(config: &Config) -> String {
    match config.source {
        SourceConfig::Sqlite { .. } => "0".to_string(),
        // Empty: not started; the first read takes the slot's position.
        SourceConfig::Postgres(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn errors_keep_their_cause_and_read_as_before() {
        let e = SourceError::bad_position("x", "x".parse::<i64>().unwrap_err());
        assert_eq!(e.to_string(), "bad capture position \"x\"");
        assert!(e.source().is_some());

        let source = "port=nope".parse::<tokio_postgres::Config>().unwrap_err();
        let message = source.to_string();
        let e = SourceError::PgQuery {
            context: "reading source.dsn".into(),
            source,
        };
        assert_eq!(
            e.to_string(),
            format!("PostgreSQL error while reading source.dsn: {message}")
        );
        assert!(e.source().is_some() && e.is_transient());

        let source = pg::decode::parse(b"I").unwrap_err();
        let message = source.to_string();
        let e = SourceError::PgDecode {
            at: 0x0100_0000_0028,
            source,
        };
        assert_eq!(
            e.to_string(),
            format!("PostgreSQL error while decoding the log at 100/28: {message}")
        );
        assert!(e.source().is_some() && e.is_transient());
    }
}
