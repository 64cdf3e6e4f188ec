//! The department's side of the data resource catalog (数据资源目录).
//!
//! The agent keeps its department's catalog as an automerge document in its
//! own redb file (`catalog.redb`), creates a draft entry for every shared
//! table, keeps the entries' data items equal to the tables' real columns,
//! and syncs the document with the hub over the feed connection. Operators
//! edit it with `shuyuan-agent catalog ...`, online or offline; edits made
//! while the hub is unreachable merge when it comes back.
//!
//! Invariants: the document and the hub's sync state are written in the
//! same redb transaction; the agent writes only department fields (the hub's
//! review fields arrive by sync, and the hub writes nothing else); a
//! message from the hub that writes department fields is refused.
//!
//! Tables: `catalog_doc_v1`: department code -> automerge document;
//! `catalog_sync_v1`: peer key (text) -> automerge sync state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use automerge::sync;
use redb::TableDefinition;
use shuyuan_protocol::catalog::doc::{CatalogDoc, CatalogError, Sender, submit};
use shuyuan_protocol::catalog::form::{self, FormError, FormErrors, set_field};
use shuyuan_protocol::catalog::{CatalogEntry, DataItem, EntryState, Lifecycle, Problem, Review};
use shuyuan_protocol::{
    DepartmentCode, NodeId, ResourceCode, TableSchema, UnixMillis, UpdateCycle,
};
use shuyuan_service::{Migration, OpenError, OperationError, RedbFile, Unavailable};
use tokio::sync::Notify;

use crate::config::{Config, ResourceConfig};

const DOC_TABLE: &str = "catalog_doc_v1";
const SYNC_TABLE: &str = "catalog_sync_v1";
const DOC: TableDefinition<&str, &[u8]> = TableDefinition::new(DOC_TABLE);
const SYNC: TableDefinition<&str, &[u8]> = TableDefinition::new(SYNC_TABLE);

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogStoreError {
    #[error("{0} is in use by another shuyuan-agent process")]
    AlreadyOpen(PathBuf),
    #[error("catalog storage error: {0}")]
    Open(#[source] OpenError),
    /// redb failed on the catalog file; an I/O error has it opened again
    /// before a later operation.
    #[error("catalog storage error {at}: {source}")]
    Storage {
        at: CatalogPlace,
        #[source]
        source: Box<redb::Error>,
    },
    /// The file waits to be opened again after an I/O error, or could not
    /// be opened again: the edit was not stored. Says what went wrong.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error(transparent)]
    Doc(#[from] CatalogError),
    #[error("no catalog entry {0}; `catalog show` lists the entries")]
    NoEntry(String),
    #[error("{field}: {message}")]
    BadValue { field: String, message: String },
    #[error("entry {code} cannot be submitted:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    NotReady {
        code: String,
        problems: Vec<Problem>,
    },
    #[error(transparent)]
    Form(#[from] FormErrors),
}

/// Where in the catalog file an operation was when redb failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogPlace {
    Begin,
    Commit,
    /// The department's document in `catalog_doc_v1`.
    Document(DepartmentCode),
    /// A peer's sync state in `catalog_sync_v1`.
    SyncState(NodeId),
}

impl std::fmt::Display for CatalogPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CatalogPlace::Begin => write!(f, "beginning a transaction"),
            CatalogPlace::Commit => write!(f, "committing"),
            CatalogPlace::Document(department) => write!(f, "in {DOC_TABLE} at {department}"),
            CatalogPlace::SyncState(peer) => write!(f, "in {SYNC_TABLE} at {peer}"),
        }
    }
}

/// The error of a redb operation at `at`.
fn at<E: Into<redb::Error>>(at: CatalogPlace) -> impl FnOnce(E) -> CatalogStoreError {
    move |e| CatalogStoreError::Storage {
        at,
        source: Box::new(e.into()),
    }
}

impl OperationError for CatalogStoreError {
    fn redb_error(&self) -> Option<&redb::Error> {
        match self {
            CatalogStoreError::Storage { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A record of the catalog file, if stored.
fn stored(
    file: &RedbFile,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    place: CatalogPlace,
) -> Result<Option<Vec<u8>>, CatalogStoreError> {
    file.read(|file| {
        let tx = file.begin_read().map_err(at(CatalogPlace::Begin))?;
        match tx.open_table(table) {
            Ok(t) => Ok(t
                .get(key)
                .map_err(at(place.clone()))?
                .map(|v| v.value().to_vec())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(at(place.clone())(e)),
        }
    })
}

struct Inner {
    /// The catalog's file. An I/O error (a full disk) makes redb refuse
    /// every later operation on the handle; the file's reopen policy opens
    /// it again before a later operation, so the catalog works again by
    /// itself once space returns.
    db: RedbFile,
    doc: CatalogDoc,
    department: DepartmentCode,
    resources: Vec<ResourceConfig>,
    /// Sync sessions by peer, for this process's connections.
    sessions: BTreeMap<NodeId, sync::State>,
}

/// The department's catalog; cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

/// Splits a declared SQL type into its name and length: `VARCHAR(18)` is
/// (`VARCHAR`, 18), `NUMERIC(12,2)` is (`NUMERIC`, 12).
pub fn split_type(sql_type: &str) -> (String, Option<u32>) {
    match sql_type.split_once('(') {
        Some((name, rest)) => {
            let len = rest
                .trim_end_matches(')')
                .split(',')
                .next()
                .and_then(|n| n.trim().parse().ok());
            (name.trim().to_string(), len)
        }
        None => (sql_type.trim().to_string(), None),
    }
}

/// The data items of a table: its columns, keeping the descriptions and
/// sensitivity the department wrote for columns that still exist.
pub fn items_from_schema(schema: &TableSchema, existing: &[DataItem]) -> Vec<DataItem> {
    schema
        .columns
        .iter()
        .map(|c| {
            let (data_type, length) = split_type(&c.sql_type);
            let old = existing.iter().find(|i| i.name == c.name);
            DataItem {
                name: c.name.clone(),
                data_type: if data_type.is_empty() {
                    "ANY".into()
                } else {
                    data_type
                },
                length,
                description: old.map(|o| o.description.clone()).unwrap_or_default(),
                sensitive: old.is_some_and(|o| o.sensitive),
            }
        })
        .collect()
}

fn same_structure(a: &[DataItem], b: &[DataItem]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.data_type == y.data_type && x.length == y.length)
}

impl Catalog {
    /// Opens (or creates) the catalog of `config`'s department, with a
    /// draft entry for every shared table that has none.
    pub fn open(config: &Config, node: NodeId) -> Result<Catalog, CatalogStoreError> {
        let path = config.data_dir.join("catalog.redb");
        Catalog::open_on(config, node, open_db(RedbFile::open(&path, MIGRATIONS))?)
    }

    fn open_on(config: &Config, node: NodeId, db: RedbFile) -> Result<Catalog, CatalogStoreError> {
        let department = config.department.clone();
        let stored = stored(
            &db,
            DOC,
            department.as_str(),
            CatalogPlace::Document(department.clone()),
        )?;
        let doc = match stored {
            Some(bytes) => CatalogDoc::load(&bytes, &node)?,
            None => CatalogDoc::new(&department, &node)?,
        };
        let catalog = Catalog {
            inner: Arc::new(Mutex::new(Inner {
                db,
                doc,
                department,
                resources: config.resources.clone(),
                sessions: BTreeMap::new(),
            })),
            changed: Arc::new(Notify::new()),
        };
        catalog.edit(|inner| {
            let mut changed = false;
            for r in &inner.resources {
                if inner.doc.entry(r.code.as_str()).is_none() {
                    let mut e = CatalogEntry::draft(&r.code, &r.name, inner.department.as_str());
                    e.update_cycle = Some(r.update_cycle);
                    e.updated_at = Some(UnixMillis::now());
                    changed |= inner.doc.put_entry(&e)?;
                }
            }
            Ok(changed)
        })?;
        Ok(catalog)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the document and, if it changed something, stores the
    /// document and wakes the uplink.
    fn edit<T>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, CatalogStoreError>,
    ) -> Result<T, CatalogStoreError>
    where
        T: Changed,
    {
        let mut inner = self.lock();
        let result = f(&mut inner)?;
        if result.changed() {
            let bytes = inner.doc.save();
            let department = &inner.department;
            inner.db.write(|file| {
                let tx = file.begin_write().map_err(at(CatalogPlace::Begin))?;
                let document = || CatalogPlace::Document(department.clone());
                tx.open_table(DOC)
                    .map_err(|e| at(document())(e))?
                    .insert(department.as_str(), bytes.as_slice())
                    .map_err(|e| at(document())(e))?;
                tx.commit().map_err(at(CatalogPlace::Commit))
            })?;
            drop(inner);
            self.changed.notify_one();
        }
        Ok(result)
    }

    /// Fires when the document changed locally (the uplink then syncs).
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Every entry and every review.
    pub fn snapshot(&self) -> (BTreeMap<String, CatalogEntry>, BTreeMap<String, Review>) {
        let inner = self.lock();
        (inner.doc.entries(), inner.doc.reviews())
    }

    /// One entry and its review.
    pub fn entry(&self, code: &str) -> Option<(CatalogEntry, Option<Review>)> {
        let inner = self.lock();
        let entry = inner.doc.entry(code)?;
        Some((entry, inner.doc.review(code)))
    }

    /// The update cycle the catalog declares for a resource.
    pub fn update_cycle(&self, code: &ResourceCode) -> Option<UpdateCycle> {
        self.lock()
            .doc
            .entry(code.as_str())
            .and_then(|e| e.update_cycle)
    }

    /// Brings a table's data items in line with its real columns. A change
    /// of structure starts the publication clock (`resource_changed_at`)
    /// and sends a submitted entry back to draft: it must be submitted and
    /// reviewed again. Returns whether the entry changed.
    pub fn record_schema(
        &self,
        code: &ResourceCode,
        schema: &TableSchema,
        now: UnixMillis,
    ) -> Result<bool, CatalogStoreError> {
        self.edit(|inner| {
            let Some(mut e) = inner.doc.entry(code.as_str()) else {
                return Ok(false);
            };
            let items = items_from_schema(schema, &e.data_items);
            if e.data_items == items {
                return Ok(false);
            }
            let structural = !same_structure(&e.data_items, &items);
            let first = e.data_items.is_empty();
            e.data_items = items;
            if structural && !first {
                e.resource_changed_at = Some(now);
                if e.status == Some(Lifecycle::Submitted) {
                    e.status = Some(Lifecycle::Draft);
                }
                tracing::info!(resource = %code, "table structure changed: catalog data items updated, publication clock started");
            }
            e.updated_at = Some(now);
            Ok(inner.doc.put_entry(&e)?)
        })
    }

    /// Sets one field of one entry (creating the entry when the code is
    /// new). Setting `status` to `submitted` requires a complete entry. An
    /// edit of a submitted entry submits it again (it needs a new review),
    /// or returns it to draft if the edit left it incomplete.
    pub fn set(
        &self,
        code: &str,
        field: &str,
        value: &str,
        now: UnixMillis,
    ) -> Result<CatalogEntry, CatalogStoreError> {
        let field = resolve_field(field)?;
        self.edit(|inner| {
            let mut e = match inner.doc.entry(code) {
                Some(e) => e,
                None => {
                    shuyuan_protocol::catalog::check_code(code).map_err(|m| {
                        CatalogStoreError::BadValue {
                            field: "code".into(),
                            message: format!("{m} (a new entry needs a national code)"),
                        }
                    })?;
                    let code: ResourceCode =
                        code.parse()
                            .map_err(|e: shuyuan_protocol::feed::CodeError| {
                                CatalogStoreError::BadValue {
                                    field: "code".into(),
                                    message: e.to_string(),
                                }
                            })?;
                    let mut e = CatalogEntry::draft(&code, "", inner.department.as_str());
                    e.format = None;
                    e
                }
            };
            if field == "code" {
                return Err(CatalogStoreError::BadValue {
                    field: field.into(),
                    message:
                        "an entry's code cannot change; create a new entry and withdraw this one"
                            .into(),
                });
            }
            let table_backed = inner.resources.iter().any(|r| r.code.as_str() == code);
            let before = e.clone();
            set_field(&mut e, field, value).map_err(|message| CatalogStoreError::BadValue {
                field: field.into(),
                message,
            })?;
            if field == "data_items" && table_backed {
                e.data_items =
                    merge_descriptions(&before.data_items, &e.data_items).map_err(|message| {
                        CatalogStoreError::BadValue {
                            field: field.into(),
                            message,
                        }
                    })?;
            }
            if field == "provider_code" && e.provider_code != inner.department.as_str() {
                return Err(CatalogStoreError::BadValue {
                    field: field.into(),
                    message: format!(
                        "this agent catalogs department {}'s resources only",
                        inner.department
                    ),
                });
            }
            apply_status_rules(&before, &mut e, now)?;
            e.updated_at = Some(now);
            inner.doc.put_entry(&e)?;
            Ok(WithChange(e, true))
        })
        .map(|w| w.0)
    }

    /// Imports a filled-in form: every row is checked first, and nothing is
    /// imported unless every row is good. Returns the number of entries.
    pub fn import(
        &self,
        entries: Vec<CatalogEntry>,
        now: UnixMillis,
    ) -> Result<usize, CatalogStoreError> {
        self.edit(|inner| {
            let mut errors = Vec::new();
            let mut ready = Vec::new();
            for (i, mut e) in entries.into_iter().enumerate() {
                let row = i + 1;
                if e.provider_code.is_empty() {
                    e.provider_code = inner.department.to_string();
                } else if e.provider_code != inner.department.as_str() {
                    errors.push(FormError {
                        row,
                        column: "信息资源提供方代码".into(),
                        message: format!(
                            "{} is not this agent's department {}",
                            e.provider_code, inner.department
                        ),
                    });
                }
                let before = inner.doc.entry(&e.code).unwrap_or_default();
                if inner.resources.iter().any(|r| r.code.as_str() == e.code)
                    && !before.data_items.is_empty()
                {
                    match merge_descriptions(&before.data_items, &e.data_items) {
                        Ok(items) => e.data_items = items,
                        Err(message) => errors.push(FormError {
                            row,
                            column: "信息项信息".into(),
                            message,
                        }),
                    }
                }
                e.resource_changed_at = before.resource_changed_at;
                e.submitted_at = before.submitted_at;
                if let Err(CatalogStoreError::NotReady { problems, .. }) =
                    apply_status_rules(&before, &mut e, now)
                {
                    errors.extend(form::problems_at(row, &problems));
                }
                e.updated_at = Some(now);
                ready.push(e);
            }
            if !errors.is_empty() {
                return Err(FormErrors(errors).into());
            }
            let n = ready.len();
            let mut changed = false;
            for e in &ready {
                changed |= inner.doc.put_entry(e)?;
            }
            Ok(WithChange(n, changed))
        })
        .map(|w| w.0)
    }

    /// Starts a sync session with a peer (the hub), from the state stored
    /// for it: what both had in common, nothing in flight.
    pub fn begin_sync(&self, peer: &NodeId) -> Result<(), CatalogStoreError> {
        let mut inner = self.lock();
        let stored = stored(
            &inner.db,
            SYNC,
            peer.to_string().as_str(),
            CatalogPlace::SyncState(*peer),
        )?;
        let state = stored
            .and_then(|b| sync::State::decode(&b).ok())
            .unwrap_or_default();
        inner.sessions.insert(*peer, state);
        Ok(())
    }

    /// The next sync message for `peer`, if there is anything to say.
    pub fn next_message(&self, peer: &NodeId) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let Inner { doc, sessions, .. } = &mut *inner;
        let state = sessions.entry(*peer).or_default();
        doc.generate_sync(state)
    }

    /// Applies a sync message from the hub. The hub may only write review
    /// fields; anything else refuses the whole message. The document and the
    /// sync state are stored together.
    pub fn receive(&self, peer: &NodeId, message: &[u8]) -> Result<(), CatalogStoreError> {
        let mut inner = self.lock();
        let Inner {
            doc,
            sessions,
            db,
            department,
            ..
        } = &mut *inner;
        let state = sessions.entry(*peer).or_default();
        let before = doc.heads();
        doc.receive_checked(state, message, Sender::Platform)?;
        let after = doc.heads();
        let document = (before != after).then(|| doc.save());
        let sync = state.encode();
        db.write(|file| {
            let tx = file.begin_write().map_err(at(CatalogPlace::Begin))?;
            if let Some(bytes) = &document {
                let place = || CatalogPlace::Document(department.clone());
                tx.open_table(DOC)
                    .map_err(|e| at(place())(e))?
                    .insert(department.as_str(), bytes.as_slice())
                    .map_err(|e| at(place())(e))?;
            }
            let place = || CatalogPlace::SyncState(*peer);
            tx.open_table(SYNC)
                .map_err(|e| at(place())(e))?
                .insert(peer.to_string().as_str(), sync.as_slice())
                .map_err(|e| at(place())(e))?;
            tx.commit().map_err(at(CatalogPlace::Commit))
        })
    }
}

/// The catalog as `catalog show` prints it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CatalogView {
    pub department: String,
    pub entries: Vec<EntryView>,
}

/// One entry with its review, state and remaining problems.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EntryView {
    pub entry: CatalogEntry,
    pub review: Option<Review>,
    pub state: EntryState,
    pub problems: Vec<Problem>,
}

impl CatalogView {
    pub fn of(catalog: &Catalog) -> CatalogView {
        let (entries, mut reviews) = catalog.snapshot();
        CatalogView {
            department: catalog.lock().department.to_string(),
            entries: entries
                .into_values()
                .map(|entry| {
                    let review = reviews.remove(&entry.code);
                    EntryView {
                        state: EntryState::of(&entry, review.as_ref()),
                        problems: entry.problems(),
                        review,
                        entry,
                    }
                })
                .collect(),
        }
    }

    /// Human-readable form.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "data resource catalog (数据资源目录) of department {}",
            self.department
        );
        for v in &self.entries {
            let e = &v.entry;
            let _ = writeln!(
                s,
                "\n{}  {}  [{} {}]",
                e.code,
                e.name,
                v.state.english(),
                v.state.chinese()
            );
            for (field, label) in shuyuan_protocol::catalog::FIELDS.iter().skip(1) {
                let text = form::field_text(e, field);
                if !text.is_empty() {
                    let _ = writeln!(s, "  {label} ({field}): {text}");
                }
            }
            if let Some(t) = e.resource_changed_at {
                let _ = writeln!(s, "  table structure last changed: {t}");
            }
            if let Some(r) = &v.review {
                let _ = writeln!(
                    s,
                    "  review (审核): {} {} by {} at {}{}",
                    r.status.english(),
                    r.status.chinese(),
                    r.reviewer,
                    r.reviewed_at,
                    if r.remarks.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.remarks)
                    }
                );
            }
            if !v.problems.is_empty() {
                let _ = writeln!(s, "  to complete before submitting:");
                for p in &v.problems {
                    let _ = writeln!(s, "    - {p}");
                }
            }
        }
        s
    }
}

/// Something an edit returns, saying whether the document changed.
trait Changed {
    fn changed(&self) -> bool;
}

impl Changed for bool {
    fn changed(&self) -> bool {
        *self
    }
}

struct WithChange<T>(T, bool);

impl<T> Changed for WithChange<T> {
    fn changed(&self) -> bool {
        self.1
    }
}

/// Accepts a field's English key or its Chinese form header.
fn resolve_field(field: &str) -> Result<&'static str, CatalogStoreError> {
    shuyuan_protocol::catalog::FIELDS
        .iter()
        .find(|(k, l)| *k == field || *l == field)
        .map(|(k, _)| *k)
        .ok_or_else(|| CatalogStoreError::BadValue {
            field: field.into(),
            message: format!(
                "unknown field; fields are {}",
                shuyuan_protocol::catalog::FIELDS
                    .iter()
                    .map(|(k, l)| format!("{k} ({l})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// For a table-backed entry, the form may describe the columns but not
/// change them: descriptions and sensitivity are taken by name.
fn merge_descriptions(
    columns: &[DataItem],
    described: &[DataItem],
) -> Result<Vec<DataItem>, String> {
    if let Some(stranger) = described
        .iter()
        .find(|d| !columns.iter().any(|c| c.name == d.name))
    {
        return Err(format!(
            "the table has no column {:?}; data items follow the table's columns ({})",
            stranger.name,
            columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(columns
        .iter()
        .map(|c| match described.iter().find(|d| d.name == c.name) {
            Some(d) => DataItem {
                description: d.description.clone(),
                sensitive: d.sensitive,
                ..c.clone()
            },
            None => c.clone(),
        })
        .collect())
}

/// Submitting needs a complete entry and stamps the time; withdrawing needs
/// a reason; a changed submitted entry is submitted again, or returns to
/// draft if the change left it incomplete.
fn apply_status_rules(
    before: &CatalogEntry,
    e: &mut CatalogEntry,
    now: UnixMillis,
) -> Result<(), CatalogStoreError> {
    let was = before.status.unwrap_or(Lifecycle::Draft);
    let is = e.status.unwrap_or(Lifecycle::Draft);
    let content_changed = {
        let mut a = before.clone();
        let mut b = e.clone();
        for x in [&mut a, &mut b] {
            x.status = None;
            x.submitted_at = None;
            x.updated_at = None;
            x.withdraw_reason.clear();
        }
        a != b
    };
    match (was, is) {
        (_, Lifecycle::Submitted) if was != Lifecycle::Submitted || content_changed => {
            let problems = e.problems();
            if problems.is_empty() {
                submit(e, now);
            } else if was != Lifecycle::Submitted {
                return Err(CatalogStoreError::NotReady {
                    code: e.code.clone(),
                    problems,
                });
            } else {
                // The edit made a submitted entry incomplete: it is a draft
                // again until it is complete and submitted anew.
                e.status = Some(Lifecycle::Draft);
            }
        }
        (_, Lifecycle::Withdrawn) if e.withdraw_reason.trim().is_empty() => {
            return Err(CatalogStoreError::BadValue {
                field: "status".into(),
                message:
                    "set withdraw_reason (撤销原因) first: a withdrawn entry must give its reason"
                        .into(),
            });
        }
        _ => {}
    }
    Ok(())
}

/// Named, idempotent migrations of `catalog.redb`.
const MIGRATIONS: &[Migration] = &[("0001-create-tables", |tx| {
    tx.open_table(DOC)?;
    tx.open_table(SYNC)?;
    Ok(())
})];

fn open_db(file: Result<RedbFile, OpenError>) -> Result<RedbFile, CatalogStoreError> {
    match file {
        Ok(file) => Ok(file.named("catalog")),
        Err(OpenError::AlreadyOpen(p)) => Err(CatalogStoreError::AlreadyOpen(p)),
        Err(other) => Err(CatalogStoreError::Open(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::Column;
    use shuyuan_protocol::catalog::{ResourceClass, ShareMethod};
    use std::path::Path;

    fn config(dir: &Path) -> Config {
        let hub = shuyuan_protocol::NodeKey::from_seed([1; 32]).id();
        let text = format!(
            "[agent]\ndepartment = \"GA\"\n[hub]\naddress = \"127.0.0.1:1\"\nkey = \"{hub}\"\n[source]\nkind = \"sqlite\"\npath = \"x.db\"\n\
             [[resource]]\ncode = \"101001/00001\"\nname = \"常住人口\"\ntable = \"household\"\nkey = [\"id\"]\nupdate_cycle = \"daily\"\n"
        );
        Config::parse(&dir.join("agent.toml"), &text).unwrap()
    }

    fn schema(cols: &[(&str, &str)]) -> TableSchema {
        TableSchema {
            version: 1,
            table: "household".into(),
            columns: cols
                .iter()
                .map(|(n, t)| Column {
                    name: n.to_string(),
                    sql_type: t.to_string(),
                    nullable: true,
                })
                .collect(),
            key: vec![0],
        }
    }

    #[test]
    fn a_full_disk_fails_an_edit_and_the_next_one_reopens_the_file() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let node = shuyuan_protocol::NodeKey::from_seed([2; 32]).id();
        let full = Arc::new(AtomicBool::new(false));
        let path = config.data_dir.join("catalog.redb");
        let file = RedbFile::open_with(
            &path,
            MIGRATIONS,
            crate::outbox::testing::opener(full.clone()),
        );
        let db = open_db(file).unwrap();
        // Every reopen is due at once: each edit opens the file again first.
        db.set_schedule(shuyuan_service::ReopenSchedule::fixed(
            std::time::Duration::ZERO,
        ));
        let catalog = Catalog::open_on(&config, node, db).unwrap();
        full.store(true, Ordering::SeqCst);
        let err = catalog
            .set("101001/00001", "summary", "户籍登记", UnixMillis(1))
            .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        // Still full: the reopen or the write fails again, and says why.
        let err = catalog
            .set("101001/00001", "provider", "公安分局", UnixMillis(2))
            .unwrap_err();
        assert!(
            matches!(
                err,
                CatalogStoreError::Storage { .. } | CatalogStoreError::Unavailable(_)
            ),
            "{err}"
        );
        assert!(err.to_string().contains("No space left"), "{err}");
        full.store(false, Ordering::SeqCst);
        catalog
            .set("101001/00001", "provider", "公安分局", UnixMillis(3))
            .unwrap();
        catalog.begin_sync(&node).unwrap();
        drop(catalog);
        let catalog = Catalog::open(&config, node).unwrap();
        let (entry, _) = catalog.entry("101001/00001").unwrap();
        // The edit made while full stayed in memory and was stored with the
        // next one.
        assert_eq!(entry.summary, "户籍登记");
        assert_eq!(entry.provider, "公安分局");
    }

    #[test]
    fn drafts_follow_the_table_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let node = shuyuan_protocol::NodeKey::from_seed([2; 32]).id();
        let catalog = Catalog::open(&config, node).unwrap();
        let code: ResourceCode = "101001/00001".parse().unwrap();
        assert_eq!(catalog.update_cycle(&code), Some(UpdateCycle::Daily));
        assert!(
            catalog
                .record_schema(
                    &code,
                    &schema(&[("id", "VARCHAR(18)"), ("name", "TEXT")]),
                    UnixMillis(10)
                )
                .unwrap()
        );
        catalog
            .set(
                "101001/00001",
                "data_items",
                "id:VARCHAR(18):公民身份号码:敏感",
                UnixMillis(11),
            )
            .unwrap();
        let (entries, _) = catalog.snapshot();
        let e = &entries["101001/00001"];
        assert_eq!(e.data_items.len(), 2);
        assert_eq!(e.data_items[0].length, Some(18));
        assert!(e.data_items[0].sensitive);
        assert_eq!(
            e.resource_changed_at, None,
            "the first reading of the table is not a change"
        );

        // A new column: the items follow, descriptions stay, the clock starts.
        assert!(
            catalog
                .record_schema(
                    &code,
                    &schema(&[("id", "VARCHAR(18)"), ("name", "TEXT"), ("email", "TEXT")]),
                    UnixMillis(20)
                )
                .unwrap()
        );
        let err = catalog
            .set(
                "101001/00001",
                "data_items",
                "phone:TEXT:电话",
                UnixMillis(21),
            )
            .unwrap_err();
        assert!(err.to_string().contains("no column \"phone\""), "{err}");
        drop(catalog);
        let catalog = Catalog::open(&config, node).unwrap();
        let (entries, _) = catalog.snapshot();
        let e = &entries["101001/00001"];
        assert_eq!(
            e.data_items
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            vec!["id", "name", "email"]
        );
        assert_eq!(e.data_items[0].description, "公民身份号码");
        assert_eq!(e.resource_changed_at, Some(UnixMillis(20)));
    }

    #[test]
    fn submitting_needs_a_complete_entry() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let catalog =
            Catalog::open(&config, shuyuan_protocol::NodeKey::from_seed([2; 32]).id()).unwrap();
        let code: ResourceCode = "101001/00001".parse().unwrap();
        catalog
            .record_schema(&code, &schema(&[("id", "TEXT")]), UnixMillis(1))
            .unwrap();
        let err = catalog
            .set("101001/00001", "status", "submitted", UnixMillis(2))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cannot be submitted")
                && text.contains("信息资源摘要 (summary): is required"),
            "{text}"
        );
        for (f, v) in [
            ("resource_class", "基础信息资源"),
            ("summary", "户籍登记"),
            ("provider", "公安分局"),
            ("share_type", "有条件共享"),
            ("share_conditions", "用于身份核验"),
            ("共享依据", "居民身份证法"),
            ("share_methods", "比对验证"),
            ("open_type", "不予开放"),
        ] {
            catalog.set("101001/00001", f, v, UnixMillis(3)).unwrap();
        }
        let e = catalog
            .set("101001/00001", "status", "submitted", UnixMillis(4))
            .unwrap();
        assert_eq!(e.status, Some(Lifecycle::Submitted));
        assert_eq!(e.submitted_at, Some(UnixMillis(4)));
        assert_eq!(e.resource_class, Some(ResourceClass::Base));
        assert_eq!(e.share_methods, vec![ShareMethod::Verification]);
        let e = catalog
            .set("101001/00001", "summary", "户籍登记信息", UnixMillis(5))
            .unwrap();
        assert_eq!(
            e.status,
            Some(Lifecycle::Submitted),
            "editing a submitted entry resubmits it when complete"
        );
        assert_eq!(e.submitted_at, Some(UnixMillis(5)));
        let e = catalog
            .set("101001/00001", "summary", "", UnixMillis(6))
            .unwrap();
        assert_eq!(
            e.status,
            Some(Lifecycle::Draft),
            "an incomplete edit returns the entry to draft"
        );
        let err = catalog
            .set("101001/00001", "provider_code", "SC", UnixMillis(6))
            .unwrap_err();
        assert!(
            err.to_string().contains("department GA's resources only"),
            "{err}"
        );
    }
}
