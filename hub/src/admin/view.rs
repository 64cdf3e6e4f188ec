//! What the console pages, the JSON API, the metrics and the alerts all
//! show: one resource state per feed, derived from the status the CLI
//! prints, so every view agrees.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::UnixMillis;

use crate::apply::verification::Verdict;
use crate::catalog::CityEntry;
use crate::status::{ChildStatus, DepartmentStatus, HubStatus, ResourceEntry, TreeRow};
use crate::upstream::UpstreamStatus;
use crate::writer::StoreHealth;

/// The one state a resource is shown in, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceState {
    /// The copy differs from the source (一致性核验不通过).
    Diverged,
    /// The newest thing the feed sent was refused.
    Rejected,
    /// Neither a change nor a zero-update within the update cycle plus grace.
    Overdue,
    /// No agent of the department is connected for it.
    Disconnected,
    /// The last thing received was a zero-update (零更新), within the cycle.
    ZeroUpdated,
    /// A change arrived within the cycle.
    OnTime,
    /// Connected, but no update cycle is declared yet, or nothing arrived.
    Unknown,
}

impl ResourceState {
    pub const ALL: [ResourceState; 7] = [
        ResourceState::Diverged,
        ResourceState::Rejected,
        ResourceState::Overdue,
        ResourceState::Disconnected,
        ResourceState::ZeroUpdated,
        ResourceState::OnTime,
        ResourceState::Unknown,
    ];

    /// The stable name used in the API, the metrics and the pages'
    /// `data-state` attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceState::Diverged => "diverged",
            ResourceState::Rejected => "rejected",
            ResourceState::Overdue => "overdue",
            ResourceState::Disconnected => "disconnected",
            ResourceState::ZeroUpdated => "zero_updated",
            ResourceState::OnTime => "on_time",
            ResourceState::Unknown => "unknown",
        }
    }

    /// Whether an administrator should look at it.
    pub fn is_alarm(self) -> bool {
        matches!(
            self,
            ResourceState::Diverged
                | ResourceState::Rejected
                | ResourceState::Overdue
                | ResourceState::Disconnected
        )
    }

    /// The state of one resource.
    pub fn of(r: &ResourceEntry) -> ResourceState {
        if matches!(r.verdict, Verdict::Diverged { .. }) {
            return ResourceState::Diverged;
        }
        let rejected_last = r.last_rejection.as_ref().is_some_and(|j| {
            r.last_batch_received_at
                .is_none_or(|applied| j.at > applied)
        });
        if rejected_last {
            return ResourceState::Rejected;
        }
        match r.freshness.as_str() {
            "overdue" => ResourceState::Overdue,
            _ if !r.connected => ResourceState::Disconnected,
            "zero_updated" => ResourceState::ZeroUpdated,
            "on_time" => ResourceState::OnTime,
            _ => ResourceState::Unknown,
        }
    }
}

impl std::fmt::Display for ResourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lag of a resource behind its source, as far as the hub can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lag {
    /// Batches the agent reports waiting in its outbox for this department
    /// (sealed, not yet acknowledged): the lag in sequence numbers.
    pub batches: Option<u64>,
    /// Seconds since anything (change or zero-update) arrived.
    pub seconds: Option<u64>,
}

impl Lag {
    pub fn of(d: &DepartmentStatus, r: &ResourceEntry, now: UnixMillis) -> Lag {
        let seconds = r
            .last_batch_received_at
            .map(|t| (now.0.saturating_sub(t.0).max(0) / 1000) as u64);
        let batches = r.connected.then(|| {
            d.agents
                .iter()
                .filter_map(|a| a.report.as_ref())
                .map(|rep| rep.outbox_batches)
                .sum()
        });
        Lag { batches, seconds }
    }
}

/// A resource row as the console and API show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceRow {
    pub department: String,
    pub state: ResourceState,
    pub lag: Lag,
    #[serde(flatten)]
    pub entry: ResourceEntry,
}

/// A department as the console and API show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepartmentView {
    pub code: String,
    pub name: String,
    pub agents_online: usize,
    pub agents: Vec<crate::status::AgentEntry>,
    pub resources: Vec<ResourceRow>,
    /// The freshness grace beyond each update cycle, in seconds.
    pub grace_secs: u64,
}

impl DepartmentView {
    pub fn of(d: &DepartmentStatus, grace: Duration, now: UnixMillis) -> DepartmentView {
        DepartmentView {
            code: d.code.clone(),
            name: d.name.clone(),
            agents_online: d.agents.iter().filter(|a| a.connected).count(),
            agents: d.agents.clone(),
            resources: d
                .resources
                .iter()
                .map(|r| ResourceRow {
                    department: d.code.clone(),
                    state: ResourceState::of(r),
                    lag: Lag::of(d, r, now),
                    entry: r.clone(),
                })
                .collect(),
            grace_secs: grace.as_secs(),
        }
    }

    /// The most urgent state among the department's resources.
    pub fn worst(&self) -> Option<ResourceState> {
        self.resources.iter().map(|r| r.state).min()
    }
}

/// One point of a sparkline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at: UnixMillis,
    /// Row changes applied per second since the previous sample.
    pub changes_per_sec: f64,
    /// Batches agents report waiting in their outboxes.
    pub backlog_batches: u64,
    /// The largest seconds-since-last-update among connected resources.
    pub max_lag_secs: u64,
}

/// The overview: every department, counts by state, and recent history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overview {
    pub hub: String,
    pub node: String,
    pub software: String,
    pub started_at: Option<UnixMillis>,
    pub now: UnixMillis,
    pub agents_online: usize,
    pub agents_offline: usize,
    /// Resources by state (every state listed, zero included).
    pub states: Vec<(ResourceState, usize)>,
    pub departments: Vec<DepartmentView>,
    pub history: Vec<Sample>,
    pub grace_secs: u64,
    /// Whether the store can write.
    #[serde(default)]
    pub store: StoreHealth,
    /// Why the store cannot be read, when it cannot.
    #[serde(default)]
    pub unreadable: Option<String>,
}

impl Overview {
    pub fn of(status: &HubStatus, grace: Duration, now: UnixMillis, history: Vec<Sample>) -> Self {
        let departments: Vec<DepartmentView> = status
            .departments
            .iter()
            .map(|d| DepartmentView::of(d, grace, now))
            .collect();
        let agents = departments.iter().flat_map(|d| &d.agents);
        let online = agents.clone().filter(|a| a.connected).count();
        let offline = agents.count() - online;
        let states = ResourceState::ALL
            .iter()
            .map(|s| {
                let n = departments
                    .iter()
                    .flat_map(|d| &d.resources)
                    .filter(|r| r.state == *s)
                    .count();
                (*s, n)
            })
            .collect();
        Overview {
            hub: status.name.clone(),
            node: status.node.clone(),
            software: status.software.clone(),
            started_at: status.started_at,
            now,
            agents_online: online,
            agents_offline: offline,
            states,
            departments,
            history,
            grace_secs: grace.as_secs(),
            store: status.store.clone(),
            unreadable: status.unreadable.clone(),
        }
    }
}

/// One applied batch, as the resource page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub seq: u64,
    /// The key that signed it.
    pub signer: String,
    pub sealed_at: UnixMillis,
    /// Row changes it carried.
    pub changes: u64,
    /// Whether it was a zero-update (零更新).
    pub zero_update: bool,
    /// Other entries (schema, re-read markers, checkpoints, range digests).
    pub other_entries: u64,
    pub bytes: u64,
    /// The batch hash, hex.
    pub hash: String,
}

/// A sample of the shared copy: column names and the first rows, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowSample {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// Everything the resource page shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceView {
    pub department_name: String,
    pub row: ResourceRow,
    /// The catalog entry with the resource's code, when the department
    /// catalogued it.
    pub catalog: Option<CityEntry>,
    /// The newest applied batches, newest first.
    pub batches: Vec<BatchSummary>,
    pub sample: RowSample,
    pub grace_secs: u64,
}

/// The federation (级联) view: the link to the parent hub, the child hubs
/// enrolled here, and every feed at every hub below with its lag.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FederationView {
    /// The link to the parent hub, when `[upstream]` is configured.
    pub upstream: Option<UpstreamStatus>,
    pub children: Vec<ChildStatus>,
    /// [`HubStatus::tree_rows`]: depth first, each feed with its lag
    /// against the level above.
    pub tree: Vec<TreeRow>,
    /// The feeds this hub holds (`DEPT:RES`), whose pages can be linked.
    #[serde(skip)]
    pub here: BTreeSet<String>,
}

impl FederationView {
    pub fn of(status: &HubStatus) -> FederationView {
        FederationView {
            upstream: status.upstream.clone(),
            children: status.children.clone(),
            tree: status.tree_rows(),
            here: status
                .departments
                .iter()
                .flat_map(|d| d.resources.iter().map(|r| r.feed.clone()))
                .collect(),
        }
    }

    /// Neither a parent nor a child hub: this hub is not federated.
    pub fn is_empty(&self) -> bool {
        self.upstream.is_none() && self.children.is_empty()
    }
}

/// The audit log's filters (query string of `/audit` and `/api/v1/audit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Only this kind (`batch_rejected`, `enrolled`, `catalog_reviewed`,
    /// `repaired`, ...).
    pub kind: Option<String>,
    /// Only entries about this feed (`DEPT:RES`) or department (`DEPT`).
    pub feed: Option<String>,
    /// Only entries whose detail contains this text.
    pub q: Option<String>,
    /// At most this many, newest first (default 200, at most 5,000).
    pub limit: Option<usize>,
}

impl AuditQuery {
    pub const DEFAULT_LIMIT: usize = 200;
    pub const MAX_LIMIT: usize = 5_000;

    pub fn limit(&self) -> usize {
        self.limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .clamp(1, Self::MAX_LIMIT)
    }

    /// Refuses a kind no audit entry has (a typo would show nothing).
    pub fn validate(&self) -> Result<(), String> {
        let Some(kind) = self.kind.as_deref().filter(|k| !k.is_empty()) else {
            return Ok(());
        };
        let known: Vec<String> = crate::admin::i18n::AUDIT_KINDS
            .iter()
            .map(|k| k.name())
            .collect();
        if known.iter().any(|k| k == kind) {
            Ok(())
        } else {
            Err(format!(
                "{kind:?} is not an audit kind: use one of {}",
                known.join(", ")
            ))
        }
    }

    /// Whether an entry passes the filters.
    pub fn matches(&self, e: &crate::apply::audit::AuditEntry) -> bool {
        let kind_ok = self
            .kind
            .as_deref()
            .is_none_or(|k| k.is_empty() || e.kind.name() == k);
        let feed_ok = self.feed.as_deref().is_none_or(|f| {
            f.is_empty()
                || e.feed.as_ref().is_some_and(|feed| {
                    let s = feed.to_string();
                    s == f || feed.department.as_str() == f
                })
        });
        let q_ok = self
            .q
            .as_deref()
            .is_none_or(|q| q.is_empty() || e.detail.contains(q));
        kind_ok && feed_ok && q_ok
    }
}

/// A federated hub's status built by hand, for the page and metrics tests.
#[cfg(test)]
pub(crate) mod example {
    use shuyuan_protocol::federation::{FeedReport, HubReport};
    use shuyuan_protocol::{NodeKey, UnixMillis};

    use crate::apply::verification::Verdict;
    use crate::status::{ChildStatus, DepartmentStatus, HubStatus, ResourceEntry};
    use crate::upstream::{ForwardState, UpstreamStatus};

    pub const NOW: UnixMillis = UnixMillis(1_800_000_000_000);
    /// The feed this hub and both hubs below hold.
    pub const FEED: &str = "D1:101001/00003";
    /// The feed the child hub keeps (不予共享).
    pub const SECRET: &str = "D1:101001/00009";

    pub fn key(seed: u8) -> String {
        NodeKey::from_seed([seed; 32]).id().to_string()
    }

    fn report(seed: u8, name: &str, seq: u64, children: Vec<HubReport>) -> HubReport {
        let feed = |f: &str| f.parse().unwrap();
        HubReport {
            hub: Some(NodeKey::from_seed([seed; 32]).id()),
            name: name.to_string(),
            at: NOW,
            feeds: vec![
                FeedReport {
                    feed: feed(FEED),
                    last_seq: seq,
                    last_batch_received_at: Some(UnixMillis(NOW.0 - 3_000)),
                    forwarded: true,
                    held: String::new(),
                },
                FeedReport {
                    feed: feed(SECRET),
                    last_seq: 4,
                    last_batch_received_at: None,
                    forwarded: false,
                    held: "not shared (不予共享)".to_string(),
                },
            ],
            agents_online: Vec::new(),
            children,
        }
    }

    /// A city hub holding `FEED` at #7, connected to its parent (which
    /// holds #5 of it), with a county below holding #9 and a town below
    /// the county holding #10; a second county never connected.
    pub fn status() -> HubStatus {
        let town = report(3, "乡镇平台", 10, Vec::new());
        let county = report(2, "<script>alert(1)</script>", 9, vec![town]);
        let resource = ResourceEntry {
            resource: "101001/00003".to_string(),
            feed: FEED.to_string(),
            table: Some("people".to_string()),
            schema_version: 1,
            connected: true,
            update_cycle: None,
            freshness: "unknown".to_string(),
            fresh_until: None,
            last_seq: 7,
            rows: 12,
            batches_applied: 7,
            changes_applied: 30,
            last_batch_received_at: Some(UnixMillis(NOW.0 - 7_000)),
            last_change_at: None,
            last_zero_update: None,
            rejected: 0,
            last_rejection: None,
            signer: None,
            resync: None,
            verdict: Verdict::Unverified,
            verification: None,
        };
        HubStatus {
            running: true,
            software: "shuyuan 0.1".to_string(),
            name: "市平台".to_string(),
            node: key(1),
            listen: None,
            started_at: None,
            departments: vec![DepartmentStatus {
                code: "D1".to_string(),
                name: "民政局".to_string(),
                agents: Vec::new(),
                resources: vec![resource],
            }],
            handshakes_refused: 0,
            audit_entries: 0,
            recent_audit: Vec::new(),
            store: crate::writer::StoreHealth::default(),
            unreadable: None,
            upstream: Some(UpstreamStatus {
                parent: key(9),
                address: "10.0.0.1:7700".to_string(),
                link: "connected".to_string(),
                since: Some(UnixMillis(NOW.0 - 60_000)),
                detail: None,
                parent_software: Some("shuyuan 0.1".to_string()),
                feeds: vec![
                    ForwardState {
                        feed: FEED.to_string(),
                        head: 7,
                        acked: Some(5),
                        held: None,
                    },
                    ForwardState {
                        feed: "D1:101001/00008".to_string(),
                        head: 3,
                        acked: None,
                        held: Some("excluded by upstream.exclude".to_string()),
                    },
                ],
                rejections: 2,
                last_rejection: Some("#6 bad signature <forged>".to_string()),
                catalog_error: Some("catalog of D1 refused".to_string()),
            }),
            children: vec![
                ChildStatus {
                    key: key(2),
                    code: "330902".to_string(),
                    name: "<script>alert(1)</script>".to_string(),
                    enrolled_at: UnixMillis(NOW.0 - 86_400_000),
                    connected: true,
                    connected_since: Some(UnixMillis(NOW.0 - 30_000)),
                    remote: Some("10.0.0.2:51000".to_string()),
                    software: Some("shuyuan 0.1".to_string()),
                    departments: vec!["D1".to_string()],
                    feeds: vec![FEED.to_string()],
                    tree: Some(county),
                },
                ChildStatus {
                    key: key(4),
                    code: "330903".to_string(),
                    name: "普陀区".to_string(),
                    enrolled_at: UnixMillis(NOW.0 - 86_400_000),
                    connected: false,
                    connected_since: None,
                    remote: None,
                    software: None,
                    departments: Vec::new(),
                    feeds: Vec::new(),
                    tree: None,
                },
            ],
        }
    }
}
