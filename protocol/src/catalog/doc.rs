//! A department's catalog as an automerge document.
//!
//! Layout: two flat maps of scalars (strings, integers, booleans), keyed by
//! the entry's code and the field, joined by U+001F:
//!
//! ```text
//! ROOT
//!   department: "GA-330902"
//!   entries:  { "<code>␟name": "...", "<code>␟share_type": "conditional", ...,
//!               "<code>␟item␟<column>␟data_type": "TEXT", ... }
//!   reviews:  { "<code>␟status": "approved", "<code>␟reviewer": "...", ... }
//! ```
//!
//! Every replica starts from the same genesis change (fixed actor, fixed
//! time), so `entries` and `reviews` are the same objects everywhere, and no
//! object is ever created after it: two replicas that first write an entry
//! concurrently write keys of the same map, instead of creating two maps
//! where one would hide the other. The department writes
//! only under `entries`, the platform only under `reviews`; a replica
//! refuses a sync message whose new changes write anywhere else
//! ([`CatalogDoc::receive_checked`]). Fields are written only when their
//! value changes, so a concurrent edit of another field is never touched.
//!
//! Invariant: after receiving each other's changes, all replicas hold the
//! same document (automerge's guarantee), with no field lost: two parties
//! editing different fields both keep their edit; two editing the same
//! field converge on one deterministic winner.

use std::collections::BTreeMap;

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use super::{CatalogEntry, DataItem, Lifecycle, Review};
use crate::feed::DepartmentCode;
use crate::identity::NodeId;
use crate::time::UnixMillis;

/// The actor of a department's genesis change (followed by the department
/// code, so that two departments' documents never share an actor).
const GENESIS_ACTOR: &[u8] = b"shuyuan/catalog/genesis/";

/// Errors of a catalog document.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog document error: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("cannot read the catalog sync message: {0}")]
    Message(String),
    #[error("the catalog document is for department {found}, not {expected}")]
    WrongDepartment { expected: String, found: String },
    /// The received changes write fields the sender does not own.
    #[error("{}", .0.join("; "))]
    NotOwner(Vec<String>),
}

/// Joins an entry's code and a field name into a map key.
const SEP: char = '\u{1f}';

fn key(code: &str, field: &str) -> String {
    format!("{code}{SEP}{field}")
}

fn text(f: &BTreeMap<String, ScalarValue>, field: &str) -> String {
    match f.get(field) {
        Some(ScalarValue::Str(s)) => s.to_string(),
        _ => String::new(),
    }
}

fn int(f: &BTreeMap<String, ScalarValue>, field: &str) -> Option<i64> {
    match f.get(field) {
        Some(ScalarValue::Int(i)) => Some(*i),
        _ => None,
    }
}

/// The scalar fields an entry is stored as. Empty strings are stored (a
/// cleared field), absent options are not.
fn entry_fields(e: &CatalogEntry) -> BTreeMap<String, ScalarValue> {
    let mut f: BTreeMap<String, ScalarValue> = BTreeMap::new();
    let mut s = |k: &str, v: &str| {
        f.insert(k.to_string(), ScalarValue::Str(v.into()));
    };
    s("name", &e.name);
    s("summary", &e.summary);
    s("provider", &e.provider);
    s("provider_code", &e.provider_code);
    s("share_conditions", &e.share_conditions);
    s("legal_basis", &e.legal_basis);
    s("open_conditions", &e.open_conditions);
    s("withdraw_reason", &e.withdraw_reason);
    s(
        "share_methods",
        &e.share_methods
            .iter()
            .map(|m| m.english())
            .collect::<Vec<_>>()
            .join(";"),
    );
    s("related", &e.related.join(";"));
    let mut o = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            f.insert(k.to_string(), ScalarValue::Str(v.into()));
        }
    };
    o(
        "resource_class",
        e.resource_class.map(|c| c.english().to_string()),
    );
    o("format", e.format.map(|c| c.english().to_string()));
    o("share_type", e.share_type.map(|c| c.english().to_string()));
    o("open_type", e.open_type.map(|c| c.english().to_string()));
    o("update_cycle", e.update_cycle.map(|c| c.to_string()));
    o("status", e.status.map(|c| c.english().to_string()));
    for (k, v) in [
        ("submitted_at", e.submitted_at),
        ("resource_changed_at", e.resource_changed_at),
        ("updated_at", e.updated_at),
    ] {
        if let Some(v) = v {
            f.insert(k.to_string(), ScalarValue::Int(v.0));
        }
    }
    for (i, item) in e.data_items.iter().enumerate() {
        let p = |attr: &str| format!("item{SEP}{}{SEP}{attr}", item.name);
        f.insert(p("position"), ScalarValue::Int(i as i64));
        f.insert(
            p("data_type"),
            ScalarValue::Str(item.data_type.as_str().into()),
        );
        f.insert(
            p("description"),
            ScalarValue::Str(item.description.as_str().into()),
        );
        f.insert(p("sensitive"), ScalarValue::Boolean(item.sensitive));
        if let Some(l) = item.length {
            f.insert(p("length"), ScalarValue::Int(i64::from(l)));
        }
    }
    f
}

/// A review from its stored fields (none if its status is unreadable).
fn review_from(f: &BTreeMap<String, ScalarValue>) -> Option<Review> {
    Some(Review {
        status: text(f, "status").parse().ok()?,
        reviewer: text(f, "reviewer"),
        remarks: text(f, "remarks"),
        reviewed_at: UnixMillis(int(f, "reviewed_at").unwrap_or(0)),
    })
}

/// An entry from its stored fields (unknown or unreadable values are left
/// empty, so a newer writer's values do not make the entry unreadable).
fn entry_from(code: &str, f: &BTreeMap<String, ScalarValue>) -> CatalogEntry {
    let opt = |k: &str| Some(text(f, k)).filter(|s| !s.is_empty());
    let list = |k: &str| -> Vec<String> {
        text(f, k)
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut items: BTreeMap<String, (i64, DataItem)> = BTreeMap::new();
    for (k, v) in f {
        let Some(rest) = k.strip_prefix(&format!("item{SEP}")) else {
            continue;
        };
        let Some((name, attr)) = rest.split_once(SEP) else {
            continue;
        };
        let (pos, item) = items.entry(name.to_string()).or_insert_with(|| {
            (
                i64::MAX,
                DataItem {
                    name: name.to_string(),
                    ..DataItem::default()
                },
            )
        });
        match (attr, v) {
            ("position", ScalarValue::Int(i)) => *pos = *i,
            ("data_type", ScalarValue::Str(s)) => item.data_type = s.to_string(),
            ("description", ScalarValue::Str(s)) => item.description = s.to_string(),
            ("sensitive", ScalarValue::Boolean(b)) => item.sensitive = *b,
            ("length", ScalarValue::Int(l)) => item.length = u32::try_from(*l).ok(),
            _ => {}
        }
    }
    let mut items: Vec<(i64, DataItem)> = items.into_values().collect();
    items.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    CatalogEntry {
        code: code.to_string(),
        resource_class: opt("resource_class").and_then(|s| s.parse().ok()),
        name: text(f, "name"),
        summary: text(f, "summary"),
        provider: text(f, "provider"),
        provider_code: text(f, "provider_code"),
        format: opt("format").and_then(|s| s.parse().ok()),
        data_items: items.into_iter().map(|(_, i)| i).collect(),
        share_type: opt("share_type").and_then(|s| s.parse().ok()),
        share_conditions: text(f, "share_conditions"),
        legal_basis: text(f, "legal_basis"),
        share_methods: list("share_methods")
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        open_type: opt("open_type").and_then(|s| s.parse().ok()),
        open_conditions: text(f, "open_conditions"),
        update_cycle: opt("update_cycle").and_then(|s| s.parse().ok()),
        related: list("related"),
        status: opt("status").and_then(|s| s.parse().ok()),
        withdraw_reason: text(f, "withdraw_reason"),
        submitted_at: int(f, "submitted_at").map(UnixMillis),
        resource_changed_at: int(f, "resource_changed_at").map(UnixMillis),
        updated_at: int(f, "updated_at").map(UnixMillis),
    }
}

/// Who sends the changes being received, which decides what they may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// The department (its agent): only `entries/...`.
    Department,
    /// The platform (the hub): only `reviews/...`.
    Platform,
    /// A child platform forwarding the catalog upward: what its
    /// departments wrote and what it reviewed, `entries/...` and
    /// `reviews/...` (never the root, so never another department's
    /// document).
    Federation,
}

/// The actor id a node writes the catalog with: its key.
pub fn actor(node: &NodeId) -> ActorId {
    ActorId::from(node.as_bytes().as_slice())
}

/// One department's catalog document.
#[derive(Debug)]
pub struct CatalogDoc {
    doc: AutoCommit,
    /// The hash of this department's genesis change.
    genesis: ChangeHash,
}

fn genesis(department: &str) -> Result<(AutoCommit, ChangeHash), CatalogError> {
    let actor = [GENESIS_ACTOR, department.as_bytes()].concat();
    let mut doc = AutoCommit::new().with_actor(ActorId::from(actor));
    doc.put(ROOT, "department", department)?;
    doc.put_object(ROOT, "entries", ObjType::Map)?;
    doc.put_object(ROOT, "reviews", ObjType::Map)?;
    let hash = doc
        .commit_with(
            CommitOptions::default()
                .with_time(0)
                .with_message("genesis"),
        )
        .ok_or_else(|| CatalogError::Message("the genesis change is empty".into()))?;
    Ok((doc, hash))
}

fn scalar(v: &Value<'_>) -> Option<ScalarValue> {
    match v {
        Value::Scalar(s) => Some(s.as_ref().clone()),
        Value::Object(_) => None,
    }
}

impl CatalogDoc {
    /// A new document for `department`, written by `node`.
    pub fn new(department: &DepartmentCode, node: &NodeId) -> Result<Self, CatalogError> {
        let (mut doc, genesis) = genesis(department.as_str())?;
        doc.set_actor(actor(node));
        Ok(CatalogDoc { doc, genesis })
    }

    /// Loads a saved document, to be written by `node`.
    pub fn load(bytes: &[u8], node: &NodeId) -> Result<Self, CatalogError> {
        let mut doc = AutoCommit::load(bytes)?;
        doc.set_actor(actor(node));
        let department = match doc.get(ROOT, "department")? {
            Some((Value::Scalar(s), _)) => s.as_str().map(str::to_string).unwrap_or_default(),
            _ => String::new(),
        };
        let (_, genesis) = genesis(&department)?;
        Ok(CatalogDoc { doc, genesis })
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// The document's heads (a version).
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The department named by the genesis change.
    pub fn department(&self) -> Option<String> {
        match self.doc.get(ROOT, "department").ok().flatten() {
            Some((Value::Scalar(s), _)) => s.as_str().map(str::to_string),
            _ => None,
        }
    }

    fn map(&self, parent: &automerge::ObjId, key: &str) -> Option<automerge::ObjId> {
        match self.doc.get(parent, key).ok().flatten() {
            Some((Value::Object(ObjType::Map), id)) => Some(id),
            _ => None,
        }
    }

    fn ensure_map(
        &mut self,
        parent: &automerge::ObjId,
        key: &str,
    ) -> Result<automerge::ObjId, CatalogError> {
        match self.map(parent, key) {
            Some(id) => Ok(id),
            None => Ok(self.doc.put_object(parent, key, ObjType::Map)?),
        }
    }

    /// The fields of every entry (or review) in `map`, by code.
    fn fields(&self, map: &str) -> BTreeMap<String, BTreeMap<String, ScalarValue>> {
        let mut out: BTreeMap<String, BTreeMap<String, ScalarValue>> = BTreeMap::new();
        let Some(obj) = self.map(&ROOT, map) else {
            return out;
        };
        for item in self.doc.map_range(&obj, ..) {
            let Some((code, field)) = item.key.split_once(SEP) else {
                continue;
            };
            if let Some(v) = scalar(&automerge::Value::from(item.value.clone())) {
                out.entry(code.to_string())
                    .or_default()
                    .insert(field.to_string(), v);
            }
        }
        out
    }

    /// Every entry, by code.
    pub fn entries(&self) -> BTreeMap<String, CatalogEntry> {
        self.fields("entries")
            .into_iter()
            .map(|(code, f)| {
                let e = entry_from(&code, &f);
                (code, e)
            })
            .collect()
    }

    /// One entry.
    pub fn entry(&self, code: &str) -> Option<CatalogEntry> {
        let fields = self.fields_of("entries", code);
        (!fields.is_empty()).then(|| entry_from(code, &fields))
    }

    /// The fields of one code in `map` (a key range of the flat map).
    fn fields_of(&self, map: &str, code: &str) -> BTreeMap<String, ScalarValue> {
        let Some(obj) = self.map(&ROOT, map) else {
            return BTreeMap::new();
        };
        let lo = format!("{code}{SEP}");
        let hi = format!("{code}{}", char::from(0x20));
        self.doc
            .map_range(&obj, lo..hi)
            .filter_map(|item| {
                let field = item.key.split_once(SEP)?.1.to_string();
                scalar(&automerge::Value::from(item.value.clone())).map(|v| (field, v))
            })
            .collect()
    }

    /// The review of one entry.
    pub fn review(&self, code: &str) -> Option<Review> {
        review_from(&self.fields_of("reviews", code))
    }

    /// Every review, by code.
    pub fn reviews(&self) -> BTreeMap<String, Review> {
        self.fields("reviews")
            .into_iter()
            .filter_map(|(code, f)| Some((code, review_from(&f)?)))
            .collect()
    }

    /// Writes a department's entry, field by field, touching only the
    /// fields whose value differs. Returns whether anything changed; if so
    /// the change is committed.
    pub fn put_entry(&mut self, e: &CatalogEntry) -> Result<bool, CatalogError> {
        let entries = self.ensure_map(&ROOT, "entries")?;
        let current: BTreeMap<String, ScalarValue> =
            self.fields("entries").remove(&e.code).unwrap_or_default();
        let wanted = entry_fields(e);
        let mut changed = false;
        for (field, value) in &wanted {
            if current.get(field) != Some(value) {
                self.doc.put(&entries, key(&e.code, field), value.clone())?;
                changed = true;
            }
        }
        for field in current.keys().filter(|f| !wanted.contains_key(*f)) {
            self.doc.delete(&entries, key(&e.code, field))?;
            changed = true;
        }
        self.commit(changed, "entry");
        Ok(changed)
    }

    /// Removes an entry (the department's own).
    pub fn remove_entry(&mut self, code: &str) -> Result<bool, CatalogError> {
        let entries = self.ensure_map(&ROOT, "entries")?;
        let fields: Vec<String> = self
            .fields("entries")
            .remove(code)
            .unwrap_or_default()
            .into_keys()
            .collect();
        for field in &fields {
            self.doc.delete(&entries, key(code, field))?;
        }
        self.commit(!fields.is_empty(), "remove entry");
        Ok(!fields.is_empty())
    }

    /// Writes the platform's review of an entry.
    pub fn put_review(&mut self, code: &str, review: &Review) -> Result<bool, CatalogError> {
        let reviews = self.ensure_map(&ROOT, "reviews")?;
        let current: BTreeMap<String, ScalarValue> =
            self.fields("reviews").remove(code).unwrap_or_default();
        let wanted = [
            ("status", ScalarValue::Str(review.status.english().into())),
            (
                "reviewer",
                ScalarValue::Str(review.reviewer.as_str().into()),
            ),
            ("remarks", ScalarValue::Str(review.remarks.as_str().into())),
            ("reviewed_at", ScalarValue::Int(review.reviewed_at.0)),
        ];
        let mut changed = false;
        for (field, value) in wanted {
            if current.get(field) != Some(&value) {
                self.doc.put(&reviews, key(code, field), value)?;
                changed = true;
            }
        }
        self.commit(changed, "review");
        Ok(changed)
    }

    fn commit(&mut self, changed: bool, what: &str) {
        if changed {
            self.doc.commit_with(
                CommitOptions::default()
                    .with_message(what)
                    .with_time(UnixMillis::now().0),
            );
        } else {
            self.doc.rollback();
        }
    }

    /// The next sync message for a peer, if there is anything to say.
    pub fn generate_sync(&mut self, state: &mut sync::State) -> Option<Vec<u8>> {
        self.doc
            .sync()
            .generate_sync_message(state)
            .map(sync::Message::encode)
    }

    /// Receives a sync message from a peer trusted to relay any change (a
    /// replica of the same party). Untrusted peers go through
    /// [`Self::receive_checked`].
    pub fn receive_trusted(
        &mut self,
        state: &mut sync::State,
        message: &[u8],
    ) -> Result<(), CatalogError> {
        let message =
            sync::Message::decode(message).map_err(|e| CatalogError::Message(e.to_string()))?;
        self.doc.sync().receive_sync_message(state, message)?;
        Ok(())
    }

    /// Receives a sync message from `sender`, refusing it, and leaving the
    /// document and the sync state as they were, if any new change writes a
    /// field the sender does not own.
    pub fn receive_checked(
        &mut self,
        state: &mut sync::State,
        message: &[u8],
        sender: Sender,
    ) -> Result<(), CatalogError> {
        let message =
            sync::Message::decode(message).map_err(|e| CatalogError::Message(e.to_string()))?;
        let before = self.doc.get_heads();
        let actor = self.doc.get_actor().clone();
        let mut trial = self.doc.fork();
        let mut trial_state = state.clone();
        let violations = contained(|| {
            trial
                .sync()
                .receive_sync_message(&mut trial_state, message)?;
            violations(&mut trial, &before, self.genesis, sender)
        })?;
        if !violations.is_empty() {
            return Err(CatalogError::NotOwner(violations));
        }
        trial.set_actor(actor);
        self.doc = trial;
        *state = trial_state;
        Ok(())
    }
}

/// Runs `apply` (which works on a trial copy) and turns a panic inside
/// automerge into a refusal. automerge 0.12 panics on some hostile changes
/// (found by the `catalog_change` fuzz target: incrementing a counter past
/// `i64::MAX` overflows with overflow checks on); the trial copy is dropped,
/// so the document and the sync state stay as they were.
fn contained<T>(apply: impl FnOnce() -> Result<T, CatalogError>) -> Result<T, CatalogError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(apply)).unwrap_or_else(|_| {
        Err(CatalogError::Message(
            "automerge failed applying the changes".into(),
        ))
    })
}

/// What the changes of `doc` that are not in `before` write, that `sender`
/// may not write. Each path is checked from the document root, using the
/// objects' current place in the document (deleted objects keep theirs).
fn violations(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    genesis: ChangeHash,
    sender: Sender,
) -> Result<Vec<String>, CatalogError> {
    let allowed: &[&str] = match sender {
        Sender::Department => &["entries"],
        Sender::Platform => &["reviews"],
        Sender::Federation => &["entries", "reviews"],
    };
    let mut out: Vec<String> = Vec::new();
    for change in doc.get_changes(before) {
        // This department's genesis is everyone's starting point; another
        // department's genesis writes the root and is refused below.
        if change.hash() == genesis {
            continue;
        }
        for op in change.decode().operations {
            let mut path: Vec<String> = match &op.obj {
                automerge::legacy::ObjectId::Root => Vec::new(),
                automerge::legacy::ObjectId::Id(id) => {
                    let exid = doc.import_obj(&format!("{}@{}", id.0, id.1))?;
                    doc.parents(&exid)?
                        .path()
                        .into_iter()
                        .map(|(_, p)| p.to_string())
                        .collect()
                }
            };
            match &op.key {
                automerge::legacy::Key::Map(k) => path.push(k.to_string()),
                automerge::legacy::Key::Seq(_) => path.push("[]".into()),
            }
            let ok = path.len() >= 2 && allowed.contains(&path[0].as_str());
            if !ok {
                let what = match (sender, path.first().map(String::as_str)) {
                    (Sender::Department, Some("reviews")) => "review fields belong to the platform",
                    (Sender::Platform, Some("entries")) => "entry fields belong to the department",
                    _ => "the document's root belongs to no one",
                };
                let text = format!("writes {} ({what})", path.join("/"));
                if !out.contains(&text) {
                    out.push(text);
                }
            }
        }
    }
    Ok(out)
}

/// A lifecycle helper: submitting stamps the submission time.
pub fn submit(entry: &mut CatalogEntry, now: UnixMillis) {
    entry.status = Some(Lifecycle::Submitted);
    entry.submitted_at = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;
    use crate::catalog::{ResourceClass, ReviewStatus, ShareType};

    fn dept() -> DepartmentCode {
        "GA-330902".parse().unwrap()
    }

    fn sync_pair(
        a: &mut CatalogDoc,
        b: &mut CatalogDoc,
        b_sends_as: Sender,
        a_sends_as: Sender,
    ) -> Result<(), CatalogError> {
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        for _ in 0..20 {
            let m1 = a.generate_sync(&mut sa);
            if let Some(m) = &m1 {
                b.receive_checked(&mut sb, m, a_sends_as)?;
            }
            let m2 = b.generate_sync(&mut sb);
            if let Some(m) = &m2 {
                a.receive_checked(&mut sa, m, b_sends_as)?;
            }
            if m1.is_none() && m2.is_none() {
                return Ok(());
            }
        }
        panic!("sync did not finish");
    }

    #[test]
    fn entries_round_trip_and_edits_touch_only_changed_fields() {
        let agent = NodeKey::from_seed([1; 32]).id();
        let mut doc = CatalogDoc::new(&dept(), &agent).unwrap();
        let mut e = CatalogEntry::draft(&"101001/00001".parse().unwrap(), "常住人口", "GA-330902");
        e.resource_class = Some(ResourceClass::Base);
        e.data_items = vec![
            DataItem {
                name: "id_number".into(),
                data_type: "TEXT".into(),
                length: Some(18),
                description: "身份号码".into(),
                sensitive: true,
            },
            DataItem {
                name: "name".into(),
                data_type: "TEXT".into(),
                ..Default::default()
            },
        ];
        e.related = vec!["101001/00002".into()];
        assert!(doc.put_entry(&e).unwrap());
        assert!(!doc.put_entry(&e).unwrap(), "no change, no write");
        assert_eq!(doc.entry("101001/00001").unwrap(), e);
        e.data_items.remove(0);
        e.share_type = Some(ShareType::NotShared);
        assert!(doc.put_entry(&e).unwrap());
        let saved = doc.save();
        let again = CatalogDoc::load(&saved, &agent).unwrap();
        assert_eq!(again.entries()["101001/00001"], e);
        assert_eq!(again.department().as_deref(), Some("GA-330902"));
    }

    #[test]
    fn concurrent_summary_and_review_both_survive() {
        let agent = NodeKey::from_seed([1; 32]).id();
        let hub = NodeKey::from_seed([2; 32]).id();
        let mut dep = CatalogDoc::new(&dept(), &agent).unwrap();
        let mut plat = CatalogDoc::new(&dept(), &hub).unwrap();
        let mut e = CatalogEntry::draft(&"101001/00001".parse().unwrap(), "常住人口", "GA-330902");
        dep.put_entry(&e).unwrap();
        sync_pair(&mut dep, &mut plat, Sender::Platform, Sender::Department).unwrap();
        // Offline on both sides: the department edits the summary, the
        // platform reviews the entry.
        e.summary = "新摘要".into();
        dep.put_entry(&e).unwrap();
        let review = Review {
            status: ReviewStatus::Returned,
            reviewer: "王".into(),
            remarks: "补充摘要".into(),
            reviewed_at: UnixMillis(5),
        };
        plat.put_review("101001/00001", &review).unwrap();
        sync_pair(&mut dep, &mut plat, Sender::Platform, Sender::Department).unwrap();
        for d in [&dep, &plat] {
            assert_eq!(d.entry("101001/00001").unwrap().summary, "新摘要");
            assert_eq!(d.reviews()["101001/00001"], review);
        }
        assert_eq!(dep.heads(), plat.heads());
    }

    #[test]
    fn ownership_is_enforced_both_ways() {
        let agent = NodeKey::from_seed([1; 32]).id();
        let hub = NodeKey::from_seed([2; 32]).id();
        let mut plat = CatalogDoc::new(&dept(), &hub).unwrap();
        // A department replica that writes a review field.
        let mut rogue = CatalogDoc::new(&dept(), &agent).unwrap();
        rogue
            .put_review(
                "101001/00001",
                &Review {
                    status: ReviewStatus::Approved,
                    reviewer: "self".into(),
                    remarks: String::new(),
                    reviewed_at: UnixMillis(1),
                },
            )
            .unwrap();
        let before = plat.heads();
        let err =
            sync_pair(&mut rogue, &mut plat, Sender::Platform, Sender::Department).unwrap_err();
        assert!(
            err.to_string().contains("writes reviews/101001/00001"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("review fields belong to the platform"),
            "{err}"
        );
        assert_eq!(
            plat.heads(),
            before,
            "nothing of the refused message was applied"
        );
        assert!(plat.reviews().is_empty());

        // The platform may not write department fields.
        let mut dep = CatalogDoc::new(&dept(), &agent).unwrap();
        let mut meddler = CatalogDoc::new(&dept(), &hub).unwrap();
        meddler
            .put_entry(&CatalogEntry::draft(
                &"101001/00001".parse().unwrap(),
                "x",
                "GA-330902",
            ))
            .unwrap();
        let err =
            sync_pair(&mut dep, &mut meddler, Sender::Platform, Sender::Department).unwrap_err();
        assert!(
            err.to_string()
                .contains("entry fields belong to the department"),
            "{err}"
        );

        // Another department's document writes the root.
        let other: DepartmentCode = "SC-330902".parse().unwrap();
        let mut foreign = CatalogDoc::new(&other, &agent).unwrap();
        let err = sync_pair(
            &mut foreign,
            &mut plat,
            Sender::Platform,
            Sender::Department,
        )
        .unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
    }

    /// Found by the `catalog_change` fuzz target: a department's counter
    /// incremented past `i64::MAX` panicked inside automerge (with overflow
    /// checks on) while the hub applied the message.
    #[test]
    fn a_counter_overflow_is_refused_not_a_panic() {
        use automerge::transaction::Transactable;
        let agent = NodeKey::from_seed([1; 32]).id();
        let hub = NodeKey::from_seed([2; 32]).id();
        let mut plat = CatalogDoc::new(&dept(), &hub).unwrap();
        let mut rogue = CatalogDoc::new(&dept(), &agent).unwrap();
        let entries = rogue.ensure_map(&ROOT, "entries").unwrap();
        rogue
            .doc
            .put(&entries, "x\u{1f}n", ScalarValue::counter(i64::MAX))
            .unwrap();
        rogue.doc.commit();
        sync_pair(&mut rogue, &mut plat, Sender::Platform, Sender::Department).unwrap();
        rogue.doc.increment(&entries, "x\u{1f}n", 1).unwrap();
        rogue.doc.commit();
        let before = plat.heads();
        let outcome = sync_pair(&mut rogue, &mut plat, Sender::Platform, Sender::Department);
        if cfg!(debug_assertions) {
            assert!(
                matches!(&outcome, Err(CatalogError::Message(m)) if m.contains("automerge failed")),
                "{outcome:?}"
            );
        }
        if outcome.is_err() {
            assert_eq!(
                plat.heads(),
                before,
                "nothing of the refused message was applied"
            );
        }
    }

    #[test]
    fn three_levels_merge_entries_and_reviews() {
        let agent = NodeKey::from_seed([1; 32]).id();
        let county = NodeKey::from_seed([2; 32]).id();
        let city = NodeKey::from_seed([3; 32]).id();
        let mut dep = CatalogDoc::new(&dept(), &agent).unwrap();
        let mut mid = CatalogDoc::new(&dept(), &county).unwrap();
        let mut top = CatalogDoc::new(&dept(), &city).unwrap();
        let e = CatalogEntry::draft(&"101001/00001".parse().unwrap(), "常住人口", "GA-330902");
        dep.put_entry(&e).unwrap();
        sync_pair(&mut dep, &mut mid, Sender::Platform, Sender::Department).unwrap();
        let review = Review {
            status: ReviewStatus::Approved,
            reviewer: "县".into(),
            remarks: String::new(),
            reviewed_at: UnixMillis(7),
        };
        mid.put_review("101001/00001", &review).unwrap();
        // The county forwards both the department's entry and its review;
        // the city's own changes come down as platform changes.
        sync_pair(&mut mid, &mut top, Sender::Platform, Sender::Federation).unwrap();
        assert_eq!(top.entry("101001/00001").unwrap(), e);
        assert_eq!(top.reviews()["101001/00001"], review);
        // A city replica may not write the department's entries downward.
        let mut meddler = CatalogDoc::new(&dept(), &city).unwrap();
        sync_pair(&mut mid, &mut meddler, Sender::Platform, Sender::Federation).unwrap();
        meddler
            .put_entry(&CatalogEntry::draft(
                &"101001/00002".parse().unwrap(),
                "x",
                "GA-330902",
            ))
            .unwrap();
        let err =
            sync_pair(&mut mid, &mut meddler, Sender::Platform, Sender::Federation).unwrap_err();
        assert!(err.to_string().contains("entries/101001/00002"), "{err}");
        // Nor may a child platform write another department's root.
        let other: DepartmentCode = "SC-330902".parse().unwrap();
        let mut foreign = CatalogDoc::new(&other, &county).unwrap();
        let err =
            sync_pair(&mut foreign, &mut top, Sender::Platform, Sender::Federation).unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
    }
}
