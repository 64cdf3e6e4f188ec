//! What `shuyuan-hub status` shows: per department and resource, the last
//! sequence number, last change, last zero-update (零更新), whether an agent
//! is connected, and rejections; plus recent audit entries.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::message::AgentReport;
use shuyuan_protocol::{FeedId, UnixMillis};

use crate::apply::audit::AuditEntry;
use crate::apply::feed::{FeedRecord, RejectionRecord, ResyncRecord, ZeroUpdateRecord};
use crate::apply::keys::{Enrollment, NodeKind};
use crate::apply::verification::{Verdict, VerifyRecord};
use crate::catalog::CityEntry;
use crate::live::{ChildInfo, ConnectionInfo};
use crate::store::{ReadTxn, StoreError};
use crate::upstream::UpstreamStatus;
use crate::writer::StoreHealth;
use shuyuan_protocol::UpdateCycle;
use shuyuan_protocol::federation::HubReport;
use std::time::Duration;

/// Everything `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubStatus {
    pub running: bool,
    pub software: String,
    pub name: String,
    pub node: String,
    pub listen: Option<String>,
    pub started_at: Option<UnixMillis>,
    pub departments: Vec<DepartmentStatus>,
    /// Handshakes refused since the hub started.
    pub handshakes_refused: u64,
    pub audit_entries: u64,
    pub recent_audit: Vec<AuditEntry>,
    /// The link to the parent hub (级联上级), when configured.
    #[serde(default)]
    pub upstream: Option<UpstreamStatus>,
    /// The child hubs enrolled here, with their subtrees while connected.
    #[serde(default)]
    pub children: Vec<ChildStatus>,
    /// Whether the store can write (a full disk stops it).
    #[serde(default)]
    pub store: StoreHealth,
    /// Why the store cannot be read, when it cannot: the departments,
    /// feeds and audit entries are then missing from this status.
    #[serde(default)]
    pub unreadable: Option<String>,
}

/// A child hub enrolled here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildStatus {
    pub key: String,
    /// Its platform code.
    pub code: String,
    pub name: String,
    pub enrolled_at: UnixMillis,
    pub connected: bool,
    pub connected_since: Option<UnixMillis>,
    pub remote: Option<String>,
    pub software: Option<String>,
    /// The departments registered below it.
    pub departments: Vec<String>,
    /// The feeds it forwards.
    pub feeds: Vec<String>,
    /// Its last report of itself and its subtree.
    pub tree: Option<HubReport>,
}

/// One feed at one hub of the tree below this one: its head there, and how
/// far the level above it (this hub for a child) is behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeRow {
    /// 1 for a child hub, 2 for its children, ...
    pub depth: usize,
    pub hub: String,
    pub hub_key: String,
    pub feed: String,
    pub seq: u64,
    pub received_at: Option<UnixMillis>,
    /// The feed's head one level up, when that level holds it.
    pub above: Option<u64>,
    /// Batches the level above lacks (0 when it is level).
    pub lag: Option<u64>,
    /// Why the feed stays at this hub, when it does.
    pub held: Option<String>,
}

impl HubStatus {
    /// Every feed at every hub below this one, depth first, with its lag
    /// against the level above.
    pub fn tree_rows(&self) -> Vec<TreeRow> {
        let top: BTreeMap<String, u64> = self
            .departments
            .iter()
            .flat_map(|d| d.resources.iter())
            .map(|r| (r.feed.clone(), r.last_seq))
            .collect();
        let mut out = Vec::new();
        for c in &self.children {
            if let Some(tree) = &c.tree {
                tree_rows(tree, 1, &top, &mut out);
            }
        }
        out
    }
}

fn tree_rows(
    report: &HubReport,
    depth: usize,
    above: &BTreeMap<String, u64>,
    out: &mut Vec<TreeRow>,
) {
    let here: BTreeMap<String, u64> = report
        .feeds
        .iter()
        .map(|f| (f.feed.to_string(), f.last_seq))
        .collect();
    for f in &report.feeds {
        let feed = f.feed.to_string();
        let up = above.get(&feed).copied();
        out.push(TreeRow {
            depth,
            hub: report.name.clone(),
            hub_key: report.hub.map(|k| k.to_string()).unwrap_or_default(),
            seq: f.last_seq,
            received_at: f.last_batch_received_at,
            above: up,
            lag: f
                .forwarded
                .then(|| f.last_seq.saturating_sub(up.unwrap_or(0))),
            held: (!f.forwarded).then(|| f.held.clone()),
            feed,
        });
    }
    for c in &report.children {
        tree_rows(c, depth + 1, &here, out);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepartmentStatus {
    pub code: String,
    pub name: String,
    pub agents: Vec<AgentEntry>,
    pub resources: Vec<ResourceEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentEntry {
    pub key: String,
    pub name: String,
    pub enrolled_at: UnixMillis,
    pub connected: bool,
    pub connected_since: Option<UnixMillis>,
    /// When its last connection ended, if that was since the hub started
    /// and it is not connected now.
    #[serde(default)]
    pub disconnected_at: Option<UnixMillis>,
    pub remote: Option<String>,
    pub software: Option<String>,
    /// The agent's last backlog report.
    pub report: Option<AgentReport>,
    /// How far the agent's clock is ahead of the hub's (negative: behind).
    #[serde(default)]
    pub clock_skew_ms: Option<i64>,
    /// For an agent registered below a child hub: that child hub's key.
    #[serde(default)]
    pub via: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceEntry {
    pub resource: String,
    pub feed: String,
    pub table: Option<String>,
    pub schema_version: u32,
    pub connected: bool,
    /// The update cycle the department's catalog declares (更新周期).
    pub update_cycle: Option<String>,
    /// `on_time` (a change within the cycle plus grace), `zero_updated`
    /// (零更新 within it), `overdue`, or `unknown` (no cycle declared yet).
    pub freshness: String,
    /// When the resource becomes overdue if nothing arrives.
    pub fresh_until: Option<UnixMillis>,
    pub last_seq: u64,
    pub rows: u64,
    pub batches_applied: u64,
    pub changes_applied: u64,
    pub last_batch_received_at: Option<UnixMillis>,
    pub last_change_at: Option<UnixMillis>,
    pub last_zero_update: Option<ZeroUpdateRecord>,
    pub rejected: u64,
    pub last_rejection: Option<RejectionRecord>,
    pub signer: Option<String>,
    /// The latest re-read from the source (initial load, resync, repair
    /// after a lost capture position), running or finished.
    #[serde(default)]
    pub resync: Option<ResyncRecord>,
    /// Verified at a sequence, diverged, or unverified (一致性核验).
    #[serde(default = "unverified")]
    pub verdict: Verdict,
    /// The checkpoints, the run in progress and the latest finished run.
    #[serde(default)]
    pub verification: Option<VerifyRecord>,
}

fn unverified() -> Verdict {
    Verdict::Unverified
}

/// Facts beyond the feed store: what a running hub knows, and the update
/// cycles its catalog declares.
#[derive(Debug, Clone, Default)]
pub struct LiveFacts {
    pub listen: Option<String>,
    pub started_at: Option<UnixMillis>,
    pub connections: Vec<ConnectionInfo>,
    /// When each agent's last connection ended.
    pub disconnected: BTreeMap<shuyuan_protocol::NodeId, UnixMillis>,
    pub handshakes_refused: u64,
    /// Feed (`DEPT:RES`) -> the catalog's update cycle.
    pub cycles: BTreeMap<String, UpdateCycle>,
    pub grace: Duration,
    pub now: UnixMillis,
    pub children: Vec<ChildInfo>,
    pub upstream: Option<UpstreamStatus>,
    pub store: StoreHealth,
}

impl LiveFacts {
    /// The update cycles of every catalog entry.
    pub fn with_catalog(mut self, city: &[CityEntry], grace: Duration) -> Self {
        self.cycles = city
            .iter()
            .filter_map(|e| {
                Some((
                    format!("{}:{}", e.department, e.entry.code),
                    e.entry.update_cycle?,
                ))
            })
            .collect();
        self.grace = grace;
        self.now = UnixMillis::now();
        self
    }
}

/// The freshness rule: a resource is overdue when neither a change nor a
/// zero-update arrived within its update cycle plus the grace.
pub fn freshness(
    r: &FeedRecord,
    cycle: Option<UpdateCycle>,
    now: UnixMillis,
    grace: Duration,
) -> (String, Option<UnixMillis>) {
    let (Some(cycle), Some(last)) = (cycle, r.last_batch_received_at) else {
        return ("unknown".into(), None);
    };
    let until = last.saturating_add(cycle.period()).saturating_add(grace);
    let verdict = if now > until {
        "overdue"
    } else if r
        .last_zero_update
        .as_ref()
        .is_some_and(|z| z.seq == r.cursor.last_seq)
    {
        "zero_updated"
    } else {
        "on_time"
    };
    (verdict.into(), Some(until))
}

/// Builds the status from the store and, for a running hub, its live state.
pub fn collect(
    txn: &dyn ReadTxn,
    name: &str,
    node: String,
    running: bool,
    live: LiveFacts,
) -> Result<HubStatus, StoreError> {
    let enrollments: Vec<(shuyuan_protocol::NodeId, Enrollment)> = txn.enrollments()?;
    let feeds: Vec<(FeedId, FeedRecord)> = txn.feeds()?;
    let mut departments: BTreeMap<String, DepartmentStatus> = BTreeMap::new();
    let mut children = Vec::new();
    for (key, e) in &enrollments {
        if e.kind == NodeKind::Hub {
            let conn = live.children.iter().find(|c| c.peer == *key);
            children.push(ChildStatus {
                key: key.to_string(),
                code: e.department.to_string(),
                name: conn.map_or_else(|| e.name.clone(), |c| c.name.clone()),
                enrolled_at: e.enrolled_at,
                connected: conn.is_some(),
                connected_since: conn.map(|c| c.since),
                remote: conn.map(|c| c.remote.to_string()),
                software: conn.map(|c| c.software.clone()),
                departments: enrollments
                    .iter()
                    .filter(|(k, b)| !b.is_hub() && b.via(k) == Some(*key))
                    .map(|(_, b)| b.department.to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                feeds: conn.map_or_else(Vec::new, |c| {
                    c.feeds.iter().map(ToString::to_string).collect()
                }),
                tree: conn.and_then(|c| c.tree.clone()),
            });
            continue;
        }
        if e.is_hub() {
            continue; // a hub further down: shown in its parent's tree
        }
        let d = department(&mut departments, e.department.as_str());
        if d.name.is_empty() {
            d.name = e.name.clone();
        }
        let conn = live.connections.iter().find(|c| c.peer == *key);
        d.agents.push(AgentEntry {
            key: key.to_string(),
            name: e.name.clone(),
            enrolled_at: e.enrolled_at,
            connected: conn.is_some(),
            connected_since: conn.map(|c| c.since),
            disconnected_at: conn
                .is_none()
                .then(|| live.disconnected.get(key).copied())
                .flatten(),
            remote: conn.map(|c| c.remote.to_string()),
            software: conn.map(|c| c.software.clone()),
            report: conn.and_then(|c| c.report.clone()),
            clock_skew_ms: conn.and_then(|c| c.clock_skew_ms),
            via: e.via(key).map(|v| v.to_string()),
        });
    }
    let connected = |f: &FeedId| {
        live.connections
            .iter()
            .any(|c| c.department == f.department && c.resources.contains(&f.resource))
            || live.children.iter().any(|c| c.feeds.contains(f))
    };
    let entry = |feed: &FeedId, r: &FeedRecord| {
        let resync = txn.resync(feed).unwrap_or_else(|e| {
            tracing::warn!(%feed, error = %e, "cannot read the feed's resync state");
            None
        });
        let verification = txn.verification(feed).unwrap_or_else(|e| {
            tracing::warn!(%feed, error = %e, "cannot read the feed's verification state");
            None
        });
        let cycle = live.cycles.get(&feed.to_string()).copied();
        let (freshness, fresh_until) = freshness(r, cycle, live.now, live.grace);
        ResourceEntry {
            resource: feed.resource.to_string(),
            feed: feed.to_string(),
            table: r.schema.as_ref().map(|s| s.table.clone()),
            schema_version: r.schema.as_ref().map_or(0, |s| s.version),
            connected: connected(feed),
            update_cycle: cycle.map(|c| c.to_string()),
            freshness,
            fresh_until,
            last_seq: r.cursor.last_seq,
            rows: r.rows,
            batches_applied: r.batches_applied,
            changes_applied: r.changes_applied,
            last_batch_received_at: r.last_batch_received_at,
            last_change_at: r.last_change_at,
            last_zero_update: r.last_zero_update.clone(),
            rejected: r.rejected,
            last_rejection: r.last_rejection.clone(),
            signer: r.signer.map(|s| s.to_string()),
            resync,
            verdict: verification
                .as_ref()
                .map_or(Verdict::Unverified, VerifyRecord::verdict),
            verification,
        }
    };
    for (feed, r) in &feeds {
        let e = entry(feed, r);
        department(&mut departments, feed.department.as_str())
            .resources
            .push(e);
    }
    // Resources an agent announced but never sent a batch for.
    for c in &live.connections {
        for res in &c.resources {
            let feed = FeedId::new(c.department.clone(), res.clone());
            if feeds.iter().any(|(f, _)| *f == feed) {
                continue;
            }
            let e = entry(&feed, &FeedRecord::default());
            let d = department(&mut departments, feed.department.as_str());
            if !d.resources.iter().any(|r| r.feed == e.feed) {
                d.resources.push(e);
            }
        }
    }
    Ok(HubStatus {
        running,
        software: shuyuan_protocol::SOFTWARE.to_string(),
        name: name.to_string(),
        node,
        listen: live.listen,
        started_at: live.started_at,
        departments: departments.into_values().collect(),
        handshakes_refused: live.handshakes_refused,
        audit_entries: txn.audit_count()?,
        recent_audit: crate::apply::audit::recent(txn, 10)?,
        upstream: live.upstream,
        children,
        store: live.store,
        unreadable: None,
    })
}

/// What a running hub can say when its store cannot be read (after a
/// failed write, until it is reopened): its live facts and why.
pub fn unreadable(name: &str, node: String, live: LiveFacts, error: String) -> HubStatus {
    HubStatus {
        running: true,
        software: shuyuan_protocol::SOFTWARE.to_string(),
        name: name.to_string(),
        node,
        listen: live.listen,
        started_at: live.started_at,
        departments: Vec::new(),
        handshakes_refused: live.handshakes_refused,
        audit_entries: 0,
        recent_audit: Vec::new(),
        upstream: live.upstream,
        children: Vec::new(),
        store: live.store,
        unreadable: Some(error),
    }
}

fn department<'a>(
    map: &'a mut BTreeMap<String, DepartmentStatus>,
    code: &str,
) -> &'a mut DepartmentStatus {
    map.entry(code.to_string())
        .or_insert_with(|| DepartmentStatus {
            code: code.to_string(),
            name: String::new(),
            agents: Vec::new(),
            resources: Vec::new(),
        })
}

fn t(x: Option<UnixMillis>) -> String {
    x.map_or_else(|| "-".to_string(), |x| x.to_string())
}

impl HubStatus {
    /// Human-readable form.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} ({})  hub key {}",
            self.name, self.software, self.node
        );
        let _ = writeln!(
            s,
            "{}{}",
            if self.running {
                "running"
            } else {
                "NOT RUNNING (figures from the store)"
            },
            self.listen
                .as_ref()
                .map(|l| format!(", listening on {l}"))
                .unwrap_or_default()
        );
        if let Some(since) = self.store.failing_since {
            let _ = writeln!(
                s,
                "STORE CANNOT WRITE since {since}: {}\n  batches are refused as unavailable and none is acknowledged; agents keep them, and the hub reopens the store until it writes again (free space in its data directory)",
                self.store.error.as_deref().unwrap_or("?")
            );
        } else if self.store.recoveries > 0 {
            let _ = writeln!(
                s,
                "the store failed to write and recovered {} time(s) since start (audit kind store_failed)",
                self.store.recoveries
            );
        }
        if let Some(e) = &self.unreadable {
            let _ = writeln!(
                s,
                "STORE CANNOT BE READ: {e}\n  departments and feeds are not shown until it is reopened"
            );
        } else if self.departments.is_empty() {
            let _ = writeln!(
                s,
                "no departments enrolled yet (shuyuan-hub enroll --department CODE --name NAME KEY)"
            );
        }
        for d in &self.departments {
            let _ = writeln!(s, "\ndepartment {} {}", d.code, d.name);
            for a in &d.agents {
                let link = if a.connected {
                    format!(
                        "connected since {} from {}",
                        t(a.connected_since),
                        a.remote.as_deref().unwrap_or("?")
                    )
                } else {
                    "not connected".to_string()
                };
                let _ = writeln!(s, "  agent {}  {}", a.key, link);
                if let Some(ms) = a.clock_skew_ms.filter(|ms| {
                    ms.unsigned_abs() > crate::ingest::CLOCK_SKEW_LIMIT.as_millis() as u64
                }) {
                    let _ = writeln!(
                        s,
                        "        CLOCK its clock is {}s {} the hub's (freshness goes by the hub's clock)",
                        ms.unsigned_abs() / 1000,
                        if ms > 0 { "ahead of" } else { "behind" }
                    );
                }
                if let Some(r) = &a.report {
                    let _ = writeln!(
                        s,
                        "        outbox {} batches, {} bytes{}",
                        r.outbox_batches,
                        r.outbox_bytes,
                        if r.capture_paused {
                            ", CAPTURE PAUSED (outbox full)"
                        } else {
                            ""
                        }
                    );
                }
            }
            for r in &d.resources {
                let _ = writeln!(
                    s,
                    "  resource {}  table {}  {}  {}{}",
                    r.resource,
                    r.table.as_deref().unwrap_or("-"),
                    if r.connected {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    r.freshness,
                    r.update_cycle
                        .as_ref()
                        .map(|c| format!(" (update cycle {c}, until {})", t(r.fresh_until)))
                        .unwrap_or_default()
                );
                let _ = writeln!(
                    s,
                    "        last seq #{}  rows {}  last change {}  last batch received {}",
                    r.last_seq,
                    r.rows,
                    t(r.last_change_at),
                    t(r.last_batch_received_at)
                );
                match &r.last_zero_update {
                    Some(z) => {
                        let _ = writeln!(
                            s,
                            "        last zero-update (零更新) #{} received {}: no changes {} .. {}",
                            z.seq, z.received_at, z.since, z.until
                        );
                    }
                    None => {
                        let _ = writeln!(s, "        last zero-update (零更新) -");
                    }
                }
                match &r.resync {
                    Some(x) if x.finished.is_none() => {
                        let _ = writeln!(
                            s,
                            "        RE-READING since {} (#{}, {} rows written so far): {}",
                            x.started_at, x.started_seq, x.rows_written, x.reason
                        );
                    }
                    Some(x) => {
                        if let Some(f) = &x.finished {
                            let _ = writeln!(
                                s,
                                "        last re-read finished {} ({} rows, {} removed): {}",
                                f.at, f.rows_sent, f.rows_removed, x.reason
                            );
                        }
                    }
                    None => {}
                }
                let _ = writeln!(s, "        {}", render_verdict(&r.verdict));
                if let Some(end) = r
                    .verification
                    .as_ref()
                    .and_then(|v| v.last_run.as_ref())
                    .and_then(|run| run.finished.as_ref())
                    .filter(|e| e.refused)
                {
                    let _ = writeln!(s, "        last comparison not possible: {}", end.detail);
                }
                if let Some(run) = r.verification.as_ref().and_then(|v| v.run.as_ref()) {
                    let _ = writeln!(
                        s,
                        "        verifying (run {}, since {}): {} ranges compared, {} differ, {} pending; {} rows rewritten, {} removed",
                        run.id,
                        run.started_at,
                        run.ranges_compared,
                        run.ranges_differing,
                        run.pending.len(),
                        run.rows_repaired,
                        run.rows_removed
                    );
                }
                if r.rejected > 0 {
                    let last = r
                        .last_rejection
                        .as_ref()
                        .map(|x| format!("#{} {}: {}", x.seq, x.reason, x.detail))
                        .unwrap_or_default();
                    let _ = writeln!(s, "        REJECTED {} batches; last {last}", r.rejected);
                }
            }
        }
        self.render_federation(&mut s);
        let _ = writeln!(
            s,
            "\naudit: {} entries; {} handshakes refused since start",
            self.audit_entries, self.handshakes_refused
        );
        for a in &self.recent_audit {
            let _ = writeln!(s, "  {}", render_audit(a));
        }
        s
    }
}

impl HubStatus {
    /// The upstream link and the tree below, for `render`.
    fn render_federation(&self, s: &mut String) {
        if let Some(u) = &self.upstream {
            let _ = writeln!(
                s,
                "\nupstream (级联上级) {} at {}: {}{}{}",
                u.parent,
                u.address,
                u.link,
                u.since.map(|t| format!(" since {t}")).unwrap_or_default(),
                u.detail
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
            for f in &u.feeds {
                match (&f.held, f.acked) {
                    (Some(why), _) => {
                        let _ = writeln!(s, "  {}  held here: {why}", f.feed);
                    }
                    (None, acked) => {
                        let _ = writeln!(
                            s,
                            "  {}  head #{}  parent holds #{}  backlog {}",
                            f.feed,
                            f.head,
                            acked.map_or_else(|| "?".into(), |a| a.to_string()),
                            acked.map_or_else(
                                || "?".into(),
                                |a| f.head.saturating_sub(a).to_string()
                            )
                        );
                    }
                }
            }
            if let Some(r) = &u.last_rejection {
                let _ = writeln!(
                    s,
                    "  REFUSED by the parent {} times; last: {r}",
                    u.rejections
                );
            }
            if let Some(e) = &u.catalog_error {
                let _ = writeln!(s, "  catalog: {e}");
            }
        }
        if self.children.is_empty() {
            return;
        }
        let _ = writeln!(s, "\nchild hubs (下级平台):");
        for c in &self.children {
            let _ = writeln!(
                s,
                "  hub {} {} ({})  {}  departments: {}",
                c.code,
                c.name,
                c.key,
                if c.connected {
                    format!(
                        "connected since {} from {}",
                        t(c.connected_since),
                        c.remote.as_deref().unwrap_or("?")
                    )
                } else {
                    "not connected".into()
                },
                if c.departments.is_empty() {
                    "-".into()
                } else {
                    c.departments.join(", ")
                }
            );
        }
        let rows = self.tree_rows();
        if !rows.is_empty() {
            let _ = writeln!(
                s,
                "  tree (level, hub, feed, head there, lag of the level above):"
            );
        }
        for r in rows {
            let _ = writeln!(
                s,
                "  {}{} {}  #{}  {}",
                "  ".repeat(r.depth),
                r.hub,
                r.feed,
                r.seq,
                match (&r.held, r.lag) {
                    (Some(why), _) => format!("held there: {why}"),
                    (None, Some(lag)) => format!("lag {lag}"),
                    (None, None) => String::new(),
                }
            );
        }
    }
}

/// A resource's consistency verdict on one line.
pub fn render_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Verified { seq, at, by } => {
            format!("consistency (一致性): VERIFIED at seq #{seq}, {at} (by {by})")
        }
        Verdict::Diverged {
            since_seq,
            rows,
            repairing,
            detail,
        } => format!(
            "consistency (一致性): DIVERGED since seq #{since_seq}: {rows} rows{}; {detail}",
            if *repairing { ", being repaired" } else { "" }
        ),
        Verdict::Unverified => "consistency (一致性): unverified".to_string(),
    }
}

/// One audit entry on one line.
pub fn render_audit(a: &AuditEntry) -> String {
    let mut line = format!("#{} {} {:?}", a.id, a.at, a.kind);
    if let Some(r) = a.reason {
        let _ = write!(line, " {r}");
    }
    if let Some(f) = &a.feed {
        let _ = write!(line, " feed {f}");
    }
    if let Some(q) = a.seq {
        let _ = write!(line, " seq {q}");
    }
    if let Some(p) = &a.peer {
        let _ = write!(line, " peer {p}");
    }
    let _ = write!(line, ": {}", a.detail);
    line
}
