//! The platform's side of the data resource catalog (数据资源目录): one
//! automerge document per department, synced with the department's agent,
//! merged here into the city catalog, reviewed by administrators, and
//! checked against publication deadlines.
//!
//! Invariants: a department's document is stored together with the sync
//! state of the peer whose message changed it; an agent's message is
//! applied only if every new change writes that department's entry fields
//! (review fields and other departments' documents are refused, audited and
//! answered with the reason); the hub itself writes only review fields.

pub mod deadline;

use std::collections::BTreeMap;

use automerge::sync;
use serde::{Deserialize, Serialize};
use shuyuan_protocol::catalog::doc::{CatalogDoc, CatalogError, Sender};
use shuyuan_protocol::catalog::{CatalogEntry, EntryState, Problem, Review, ReviewStatus};
use shuyuan_protocol::{DepartmentCode, NodeId, UnixMillis};
use tokio::sync::{Mutex, broadcast};

use crate::apply::CatalogSave;
use crate::store::{Engine, StoreError};
use crate::writer::Store;
use deadline::Calendar;

/// Errors of the hub's catalog.
#[derive(Debug, thiserror::Error)]
pub enum HubCatalogError {
    #[error(transparent)]
    Doc(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("department {department} has no catalog entry {code}")]
    NoEntry { department: String, code: String },
    #[error("{0}")]
    Ambiguous(String),
}

#[derive(Default)]
struct State {
    /// Every stored document has been loaded into `docs`.
    all_loaded: bool,
    docs: BTreeMap<DepartmentCode, CatalogDoc>,
    sessions: BTreeMap<(DepartmentCode, NodeId), sync::State>,
}

/// Every department's catalog, as the hub holds it.
pub struct HubCatalog {
    node: NodeId,
    store: Store,
    state: Mutex<State>,
    changed: broadcast::Sender<DepartmentCode>,
}

impl std::fmt::Debug for HubCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCatalog").finish_non_exhaustive()
    }
}

fn load(
    stored: Option<Vec<u8>>,
    node: &NodeId,
    department: &DepartmentCode,
) -> Result<CatalogDoc, HubCatalogError> {
    Ok(match stored {
        Some(bytes) => CatalogDoc::load(&bytes, node)?,
        None => CatalogDoc::new(department, node)?,
    })
}

impl HubCatalog {
    pub fn new(node: NodeId, store: Store) -> Self {
        let (changed, _) = broadcast::channel(256);
        HubCatalog {
            node,
            store,
            state: Mutex::new(State::default()),
            changed,
        }
    }

    /// Tells when a department's catalog changed at the hub (a review, or a
    /// peer's changes), so that its other peers are sent the change.
    pub fn subscribe(&self) -> broadcast::Receiver<DepartmentCode> {
        self.changed.subscribe()
    }

    async fn with_doc<T>(
        &self,
        department: &DepartmentCode,
        f: impl FnOnce(&mut CatalogDoc, &mut BTreeMap<(DepartmentCode, NodeId), sync::State>) -> T,
    ) -> Result<T, HubCatalogError> {
        let mut guard = self.state.lock().await;
        let State { docs, sessions, .. } = &mut *guard;
        if !docs.contains_key(department) {
            let stored = self.store.read(|t| t.catalog(department))?;
            let doc = load(stored, &self.node, department)?;
            docs.insert(department.clone(), doc);
        }
        let doc = docs
            .get_mut(department)
            .ok_or_else(|| HubCatalogError::Ambiguous("catalog cache".into()))?;
        Ok(f(doc, sessions))
    }

    /// Starts a sync session with an agent from the stored state.
    pub async fn begin_sync(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
    ) -> Result<(), HubCatalogError> {
        let stored = self.store.read(|t| t.catalog_sync(department, peer))?;
        let state = stored
            .and_then(|b| sync::State::decode(&b).ok())
            .unwrap_or_default();
        self.with_doc(department, |_, sessions| {
            sessions.insert((department.clone(), *peer), state);
        })
        .await
    }

    /// The next sync message for an agent, if there is anything to say.
    pub async fn next_message(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
    ) -> Result<Option<Vec<u8>>, HubCatalogError> {
        self.with_doc(department, |doc, sessions| {
            let state = sessions.entry((department.clone(), *peer)).or_default();
            doc.generate_sync(state)
        })
        .await
    }

    /// Applies an agent's sync message: refused whole if any new change
    /// writes anything but this department's entry fields. The document and
    /// the sync state are stored in one transaction before this returns.
    pub async fn receive(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
        message: &[u8],
    ) -> Result<(), HubCatalogError> {
        self.receive_as(department, peer, message, Sender::Department)
            .await
    }

    /// Applies a sync message from a peer that may write what `sender`
    /// owns: a department (its entries), a parent hub (reviews) or a child
    /// hub (entries and reviews). Other peers of the department are told
    /// when the document changed.
    pub async fn receive_as(
        &self,
        department: &DepartmentCode,
        peer: &NodeId,
        message: &[u8],
        sender: Sender,
    ) -> Result<(), HubCatalogError> {
        let save = self
            .with_doc(
                department,
                |doc, sessions| -> Result<CatalogSave, CatalogError> {
                    let state = sessions.entry((department.clone(), *peer)).or_default();
                    let before = doc.heads();
                    doc.receive_checked(state, message, sender)?;
                    let changed = doc.heads() != before;
                    Ok(CatalogSave {
                        department: department.clone(),
                        document: changed.then(|| doc.save()),
                        sync: Some((*peer, state.encode())),
                    })
                },
            )
            .await??;
        let changed = save.document.is_some();
        self.store.save_catalog(save).await?;
        if changed {
            let _ = self.changed.send(department.clone());
        }
        Ok(())
    }

    /// The departments whose catalog this hub holds.
    pub fn departments(&self) -> Result<Vec<DepartmentCode>, HubCatalogError> {
        Ok(self
            .store
            .read(|t| t.catalogs())?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// Records the platform's review of an entry and stores it; the agent
    /// receives it with the next sync.
    pub async fn review(
        &self,
        department: &DepartmentCode,
        code: &str,
        review: &Review,
    ) -> Result<(), HubCatalogError> {
        let document = self
            .with_doc(
                department,
                |doc, _| -> Result<Option<Vec<u8>>, HubCatalogError> {
                    if doc.entry(code).is_none() {
                        return Err(HubCatalogError::NoEntry {
                            department: department.to_string(),
                            code: code.to_string(),
                        });
                    }
                    Ok(doc.put_review(code, review)?.then(|| doc.save()))
                },
            )
            .await??;
        if let Some(document) = document {
            self.store
                .save_catalog(CatalogSave {
                    department: department.clone(),
                    document: Some(document),
                    sync: None,
                })
                .await?;
            let _ = self.changed.send(department.clone());
        }
        Ok(())
    }

    /// Every department's entries and reviews (all documents stay in
    /// memory once read).
    pub async fn city(&self) -> Result<Vec<CityEntry>, HubCatalogError> {
        let mut state = self.state.lock().await;
        if !state.all_loaded {
            for (department, bytes) in self.store.read(|t| t.catalogs())? {
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    state.docs.entry(department)
                {
                    slot.insert(CatalogDoc::load(&bytes, &self.node)?);
                }
            }
            state.all_loaded = true;
        }
        Ok(state
            .docs
            .iter()
            .flat_map(|(department, doc)| city_entries(department, doc))
            .collect())
    }
}

/// The city catalog read straight from a store (for commands run while the
/// hub is not running).
pub fn city_from_store(
    engine: &dyn Engine,
    node: &NodeId,
) -> Result<Vec<CityEntry>, HubCatalogError> {
    let mut out = Vec::new();
    for (department, bytes) in engine.read(|t| t.catalogs())? {
        out.extend(city_entries(&department, &CatalogDoc::load(&bytes, node)?));
    }
    Ok(out)
}

/// One entry of the city catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CityEntry {
    pub department: String,
    pub entry: CatalogEntry,
    pub review: Option<Review>,
    pub state: EntryState,
    pub problems: Vec<Problem>,
}

fn city_entries(department: &DepartmentCode, doc: &CatalogDoc) -> Vec<CityEntry> {
    let mut reviews = doc.reviews();
    doc.entries()
        .into_values()
        .map(|entry| {
            let review = reviews.remove(&entry.code);
            CityEntry {
                department: department.to_string(),
                state: EntryState::of(&entry, review.as_ref()),
                problems: entry.problems(),
                review,
                entry,
            }
        })
        .collect()
}

/// Filters of `catalog list` and `catalog export`; empty fields match all.
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
pub struct Filter {
    /// Only this department.
    #[arg(long)]
    pub department: Option<String>,
    /// Only this resource class: base (基础), thematic (主题) or department (部门).
    #[arg(long)]
    pub class: Option<String>,
    /// Only this share type: unconditional, conditional, not-shared (or 无条件共享 ...).
    #[arg(long)]
    pub share_type: Option<String>,
    /// Only this update cycle: realtime, daily, ... (or 实时, 每日 ...).
    #[arg(long)]
    pub cycle: Option<String>,
    /// Only entries in this state: draft, submitted, published, returned, withdrawn.
    #[arg(long)]
    pub state: Option<String>,
}

impl Filter {
    /// Checks that every filter value means something.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.class {
            c.parse::<shuyuan_protocol::catalog::ResourceClass>()
                .map_err(|e| e.to_string())?;
        }
        if let Some(t) = &self.share_type {
            t.parse::<shuyuan_protocol::catalog::ShareType>()
                .map_err(|e| e.to_string())?;
        }
        if let Some(c) = &self.cycle {
            c.parse::<shuyuan_protocol::UpdateCycle>()
                .map_err(|e| e.to_string())?;
        }
        if let Some(s) = &self.state
            && !["draft", "submitted", "published", "returned", "withdrawn"].contains(&s.as_str())
        {
            return Err(format!(
                "{s:?} is not a state: draft, submitted, published, returned, withdrawn"
            ));
        }
        Ok(())
    }

    pub fn matches(&self, e: &CityEntry) -> bool {
        self.department.as_ref().is_none_or(|d| *d == e.department)
            && self
                .class
                .as_ref()
                .is_none_or(|c| c.parse().ok() == e.entry.resource_class)
            && self
                .share_type
                .as_ref()
                .is_none_or(|t| t.parse().ok() == e.entry.share_type)
            && self
                .cycle
                .as_ref()
                .is_none_or(|c| c.parse().ok() == e.entry.update_cycle)
            && self.state.as_ref().is_none_or(|s| s == e.state.english())
    }
}

/// Picks the one entry meant by `code` (and `department` when several
/// departments use the code).
pub fn pick<'a>(
    city: &'a [CityEntry],
    code: &str,
    department: Option<&str>,
) -> Result<&'a CityEntry, HubCatalogError> {
    let found: Vec<&CityEntry> = city
        .iter()
        .filter(|e| e.entry.code == code && department.is_none_or(|d| d == e.department))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(HubCatalogError::NoEntry {
            department: department.unwrap_or("any").to_string(),
            code: code.to_string(),
        }),
        many => Err(HubCatalogError::Ambiguous(format!(
            "entry {code} exists in several departments ({}); pass --department",
            many.iter()
                .map(|e| e.department.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Who has to act for an entry to be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitingFor {
    /// The department must update and submit the entry.
    Department,
    /// The platform must review the submitted entry.
    Platform,
}

/// What the deadline report says about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The table changed; the updated entry is not published yet, but
    /// there is time.
    PublicationPending,
    /// The table changed and the updated entry was not published in time.
    PublicationOverdue,
    /// The entry's last full review is more than a year old.
    AnnualReviewDue,
}

/// One line of the deadline report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub department: String,
    pub code: String,
    pub name: String,
    pub kind: FindingKind,
    pub changed_at: Option<UnixMillis>,
    pub due: Option<UnixMillis>,
    pub waiting_for: Option<WaitingFor>,
    pub last_review: Option<UnixMillis>,
}

/// How long a full review stays valid.
pub const REVIEW_VALIDITY_MS: i64 = 365 * 86_400_000;

/// Checks every entry against the publication deadline (`days` working
/// days after its table changed) and the yearly review.
pub fn findings(
    city: &[CityEntry],
    now: UnixMillis,
    days: u32,
    calendar: &Calendar,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for e in city {
        if e.state == EntryState::Withdrawn {
            continue;
        }
        let approved_at = e
            .review
            .as_ref()
            .filter(|r| r.status == ReviewStatus::Approved)
            .map(|r| r.reviewed_at);
        let finding = |kind, changed_at, due, waiting_for| Finding {
            department: e.department.clone(),
            code: e.entry.code.clone(),
            name: e.entry.name.clone(),
            kind,
            changed_at,
            due,
            waiting_for,
            last_review: approved_at,
        };
        if let Some(changed) = e.entry.resource_changed_at {
            let submitted_since = e.entry.submitted_at.is_some_and(|s| s >= changed);
            let published_since = e.state == EntryState::Published && submitted_since;
            if !published_since {
                let due = calendar.deadline(changed, days);
                let waiting = if submitted_since && e.state == EntryState::Submitted {
                    WaitingFor::Platform
                } else {
                    WaitingFor::Department
                };
                let kind = if now > due {
                    FindingKind::PublicationOverdue
                } else {
                    FindingKind::PublicationPending
                };
                out.push(finding(kind, Some(changed), Some(due), Some(waiting)));
                continue;
            }
        }
        if e.state == EntryState::Published
            && approved_at.is_some_and(|t| now.0 - t.0 > REVIEW_VALIDITY_MS)
        {
            out.push(finding(
                FindingKind::AnnualReviewDue,
                None,
                None,
                Some(WaitingFor::Platform),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::catalog::Lifecycle;

    fn city(
        state_changed: Option<i64>,
        submitted: Option<i64>,
        review: Option<(ReviewStatus, i64)>,
    ) -> CityEntry {
        let entry = CatalogEntry {
            code: "101001/00001".into(),
            name: "常住人口".into(),
            status: Some(if submitted.is_some() {
                Lifecycle::Submitted
            } else {
                Lifecycle::Draft
            }),
            submitted_at: submitted.map(UnixMillis),
            resource_changed_at: state_changed.map(UnixMillis),
            ..CatalogEntry::default()
        };
        let review = review.map(|(status, at)| Review {
            status,
            reviewer: "李".into(),
            remarks: String::new(),
            reviewed_at: UnixMillis(at),
        });
        CityEntry {
            department: "GA".into(),
            state: EntryState::of(&entry, review.as_ref()),
            problems: vec![],
            review,
            entry,
        }
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn deadline_report() {
        // 2026-11-19 is a Thursday; UTC calendar for simple numbers.
        let thu = 20_776 * DAY + 3_600_000;
        let cal = Calendar::weekdays(0);
        let days = 2;
        // Changed, not yet resubmitted: the department's turn, due Monday.
        let f = findings(
            &[city(Some(thu), None, None)],
            UnixMillis(thu + DAY),
            days,
            &cal,
        );
        assert_eq!(f[0].kind, FindingKind::PublicationPending);
        assert_eq!(f[0].waiting_for, Some(WaitingFor::Department));
        assert_eq!(f[0].due, Some(UnixMillis(20_781 * DAY)), "end of Monday");
        let f = findings(
            &[city(Some(thu), None, None)],
            UnixMillis(20_781 * DAY + 1),
            days,
            &cal,
        );
        assert_eq!(f[0].kind, FindingKind::PublicationOverdue);
        // Resubmitted after the change: the platform's turn.
        let f = findings(
            &[city(Some(thu), Some(thu + 1000), None)],
            UnixMillis(20_782 * DAY),
            days,
            &cal,
        );
        assert_eq!(
            (f[0].kind, f[0].waiting_for),
            (FindingKind::PublicationOverdue, Some(WaitingFor::Platform))
        );
        // Approved after the resubmission: nothing to report.
        let ok = city(
            Some(thu),
            Some(thu + 1000),
            Some((ReviewStatus::Approved, thu + 2000)),
        );
        assert!(
            findings(
                std::slice::from_ref(&ok),
                UnixMillis(20_781 * DAY),
                days,
                &cal
            )
            .is_empty()
        );
        // ... until a year has passed since that review.
        let f = findings(
            &[ok],
            UnixMillis(thu + 2000 + REVIEW_VALIDITY_MS + 1),
            days,
            &cal,
        );
        assert_eq!(f[0].kind, FindingKind::AnnualReviewDue);
    }
}
