//! Watches the hub's state on a tick: keeps the recent history the overview's
//! sparklines draw, tells open consoles when something changed, and turns
//! state changes into alerts (overdue, disconnected, diverged, rejected
//! batch, enrollment).
//!
//! Invariant: an alert is raised once per transition into a state, compared
//! with the previous tick; the first look after start is the baseline and
//! raises nothing (after a restart every feed looks quiet until its agent
//! reconnects).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::UnixMillis;
use tokio::sync::watch;

use super::view::{Overview, ResourceState, Sample};
use crate::status::HubStatus;

/// How often the state is looked at.
pub const TICK: Duration = Duration::from_secs(1);
/// How many samples the sparklines keep (ten minutes at one per tick).
pub const HISTORY: usize = 600;

/// One alert, as posted to the webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `overdue`, `disconnected`, `diverged`, `rejected_batch`, `enrolled`,
    /// or for the hub itself `store_failing` and `store_recovered`.
    pub event: String,
    pub hub: String,
    pub hub_key: String,
    /// RFC 3339.
    pub at: String,
    pub at_ms: i64,
    pub department: String,
    pub department_name: String,
    /// The feed (`DEPT:RES`), for resource events.
    pub feed: Option<String>,
    pub resource: Option<String>,
    /// The agent's key, for `disconnected` and `enrolled`.
    pub agent: Option<String>,
    /// The resource's state after the change.
    pub state: Option<String>,
    /// A sentence saying what happened.
    pub detail: String,
    /// Facts about the event (cycle, due time, rejected sequence, reason...).
    pub facts: BTreeMap<String, serde_json::Value>,
}

/// What the previous tick saw.
#[derive(Debug, Default)]
struct Seen {
    states: BTreeMap<String, ResourceState>,
    rejected: BTreeMap<String, u64>,
    connected: BTreeSet<String>,
    enrolled: BTreeSet<String>,
    changes: u64,
    at: Option<UnixMillis>,
    fingerprint: u64,
    store_failing: bool,
}

/// The watcher's shared state.
#[derive(Debug)]
pub struct Monitor {
    history: Mutex<VecDeque<Sample>>,
    seen: Mutex<Option<Seen>>,
    changed: watch::Sender<u64>,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            history: Mutex::new(VecDeque::new()),
            seen: Mutex::new(None),
            changed: watch::channel(0).0,
        }
    }
}

impl Monitor {
    /// The recent samples, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        lock(&self.history).iter().copied().collect()
    }

    /// Changes whenever the state a console shows changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Looks at the state once: records a sample, notifies consoles of a
    /// change, and returns the alerts since the previous look.
    pub fn observe(&self, status: &HubStatus, grace: Duration, now: UnixMillis) -> Vec<Alert> {
        if status.unreadable.is_some() {
            // Nothing but the store's state is known: keep what the last
            // full look saw, so that feeds coming back raise nothing.
            let mut seen_slot = lock(&self.seen);
            let alerts = match seen_slot.as_mut() {
                Some(prev) => {
                    let alert = store_alert(status, prev.store_failing, now);
                    prev.store_failing = !status.store.writable();
                    alert.into_iter().collect()
                }
                None => Vec::new(),
            };
            drop(seen_slot);
            self.changed.send_modify(|v| *v += 1);
            return alerts;
        }
        let overview = Overview::of(status, grace, now, Vec::new());
        let mut states = BTreeMap::new();
        let mut rejected = BTreeMap::new();
        let mut changes = 0u64;
        let mut backlog = 0u64;
        let mut max_lag = 0u64;
        let mut connected = BTreeSet::new();
        let mut enrolled = BTreeSet::new();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for d in &overview.departments {
            for a in &d.agents {
                enrolled.insert(a.key.clone());
                if a.connected {
                    connected.insert(a.key.clone());
                    backlog += a.report.as_ref().map_or(0, |r| r.outbox_batches);
                }
                (
                    &a.key,
                    a.connected,
                    a.report.as_ref().map(|r| r.outbox_batches),
                )
                    .hash(&mut hasher);
            }
            for r in &d.resources {
                states.insert(r.entry.feed.clone(), r.state);
                rejected.insert(r.entry.feed.clone(), r.entry.rejected);
                changes += r.entry.changes_applied;
                if r.entry.connected {
                    max_lag = max_lag.max(r.lag.seconds.unwrap_or(0));
                }
                (
                    &r.entry.feed,
                    r.state,
                    r.entry.last_seq,
                    r.entry.rows,
                    r.entry.rejected,
                    r.entry.connected,
                )
                    .hash(&mut hasher);
                serde_json::to_string(&r.entry.verdict)
                    .unwrap_or_default()
                    .hash(&mut hasher);
            }
        }
        status.audit_entries.hash(&mut hasher);
        (status.store.failing_since, &status.store.error).hash(&mut hasher);
        let fingerprint = hasher.finish();

        let mut seen_slot = lock(&self.seen);
        let alerts = match seen_slot.as_ref() {
            None => Vec::new(),
            Some(prev) => alerts(status, &overview, prev, &states, &rejected, &connected, now),
        };
        let per_sec = match seen_slot
            .as_ref()
            .and_then(|p| p.at.map(|at| (at, p.changes)))
        {
            Some((at, before)) if now.0 > at.0 => {
                changes.saturating_sub(before) as f64 * 1000.0 / (now.0 - at.0) as f64
            }
            _ => 0.0,
        };
        let notify = seen_slot
            .as_ref()
            .is_none_or(|p| p.fingerprint != fingerprint);
        *seen_slot = Some(Seen {
            states,
            rejected,
            connected,
            enrolled,
            changes,
            at: Some(now),
            fingerprint,
            store_failing: !status.store.writable(),
        });
        drop(seen_slot);
        {
            let mut history = lock(&self.history);
            history.push_back(Sample {
                at: now,
                changes_per_sec: per_sec,
                backlog_batches: backlog,
                max_lag_secs: max_lag,
            });
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        if notify {
            self.changed.send_modify(|v| *v += 1);
        }
        alerts
    }
}

/// Looks at the hub's state every [`TICK`] until `cancel`, handing alerts
/// to the webhook.
pub(crate) async fn run(
    shared: std::sync::Arc<crate::Shared>,
    monitor: std::sync::Arc<Monitor>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        match crate::control::live_status(&shared).await {
            Ok(status) => {
                let grace = shared.config.freshness_grace;
                for alert in monitor.observe(&status, grace, UnixMillis::now()) {
                    shared.alerts.send(alert);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the hub's state"),
        }
    }
}

/// An alert about the hub itself (no department).
fn hub_alert(status: &HubStatus, event: &str, detail: String, now: UnixMillis) -> Alert {
    Alert {
        event: event.into(),
        hub: status.name.clone(),
        hub_key: status.node.clone(),
        at: now.to_string(),
        at_ms: now.0,
        department: String::new(),
        department_name: String::new(),
        feed: None,
        resource: None,
        agent: None,
        state: None,
        detail,
        facts: BTreeMap::new(),
    }
}

/// `store_failing` when the store stopped writing since the last look,
/// `store_recovered` when it writes again.
fn store_alert(status: &HubStatus, was_failing: bool, now: UnixMillis) -> Option<Alert> {
    let store = &status.store;
    match (store.failing_since, was_failing) {
        (Some(since), false) => {
            let error = store.error.clone().unwrap_or_default();
            let mut alert = hub_alert(
                status,
                "store_failing",
                format!(
                    "the hub's store cannot write since {since} ({error}): batches are refused as unavailable, none acknowledged, until space returns"
                ),
                now,
            );
            alert.facts.insert("since_ms".into(), since.0.into());
            alert.facts.insert("error".into(), error.into());
            Some(alert)
        }
        (None, true) => {
            let mut alert = hub_alert(
                status,
                "store_recovered",
                "the hub's store writes again; agents resend what was refused".to_string(),
                now,
            );
            alert
                .facts
                .insert("recoveries".into(), store.recoveries.into());
            Some(alert)
        }
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[allow(clippy::too_many_arguments)]
fn alerts(
    status: &HubStatus,
    overview: &Overview,
    prev: &Seen,
    states: &BTreeMap<String, ResourceState>,
    rejected: &BTreeMap<String, u64>,
    connected: &BTreeSet<String>,
    now: UnixMillis,
) -> Vec<Alert> {
    let base = |event: &str, department: &str, name: &str, detail: String| Alert {
        department: department.into(),
        department_name: name.into(),
        ..hub_alert(status, event, detail, now)
    };
    let mut out: Vec<Alert> = store_alert(status, prev.store_failing, now)
        .into_iter()
        .collect();
    for d in &overview.departments {
        for a in &d.agents {
            if !prev.enrolled.contains(&a.key) {
                let mut alert = base(
                    "enrolled",
                    &d.code,
                    &d.name,
                    format!("agent key {} enrolled for {} ({})", a.key, d.code, a.name),
                );
                alert.agent = Some(a.key.clone());
                out.push(alert);
            }
            // Connected at the last tick, or for a moment between ticks.
            let left = a
                .disconnected_at
                .is_some_and(|t| prev.at.is_some_and(|p| t.0 > p.0));
            if !connected.contains(&a.key) && (prev.connected.contains(&a.key) || left) {
                let mut alert = base(
                    "disconnected",
                    &d.code,
                    &d.name,
                    format!("the agent of {} ({}) disconnected", d.code, d.name),
                );
                alert.agent = Some(a.key.clone());
                alert.facts.insert(
                    "resources".into(),
                    d.resources
                        .iter()
                        .map(|r| r.entry.resource.clone())
                        .collect::<Vec<_>>()
                        .into(),
                );
                out.push(alert);
            }
        }
        for r in &d.resources {
            let feed = &r.entry.feed;
            let state = states.get(feed).copied().unwrap_or(ResourceState::Unknown);
            let before = prev.states.get(feed).copied();
            let resource_alert = |event: &str, detail: String| {
                let mut alert = base(event, &d.code, &d.name, detail);
                alert.feed = Some(feed.clone());
                alert.resource = Some(r.entry.resource.clone());
                alert.state = Some(state.as_str().into());
                alert
                    .facts
                    .insert("last_seq".into(), r.entry.last_seq.into());
                alert
            };
            if state == ResourceState::Overdue && before != Some(ResourceState::Overdue) {
                let mut alert = resource_alert(
                    "overdue",
                    format!(
                        "{feed}: neither a change nor a zero-update (零更新) within its update cycle {} plus grace {} s",
                        r.entry.update_cycle.as_deref().unwrap_or("?"),
                        overview.grace_secs
                    ),
                );
                alert
                    .facts
                    .insert("update_cycle".into(), r.entry.update_cycle.clone().into());
                alert
                    .facts
                    .insert("grace_secs".into(), overview.grace_secs.into());
                alert.facts.insert(
                    "fresh_until".into(),
                    r.entry.fresh_until.map(|t| t.to_string()).into(),
                );
                alert.facts.insert(
                    "last_received_at".into(),
                    r.entry.last_batch_received_at.map(|t| t.to_string()).into(),
                );
                out.push(alert);
            }
            if state == ResourceState::Diverged && before != Some(ResourceState::Diverged) {
                out.push(resource_alert(
                    "diverged",
                    format!(
                        "{feed}: the shared copy differs from the source: {}",
                        crate::status::render_verdict(&r.entry.verdict)
                    ),
                ));
            }
            let before_rejected = prev.rejected.get(feed).copied().unwrap_or(0);
            let now_rejected = rejected.get(feed).copied().unwrap_or(0);
            if now_rejected > before_rejected {
                let mut alert = resource_alert(
                    "rejected_batch",
                    format!(
                        "{feed}: {} batch(es) refused{}",
                        now_rejected - before_rejected,
                        r.entry
                            .last_rejection
                            .as_ref()
                            .map(|j| format!(", the last #{} ({}): {}", j.seq, j.reason, j.detail))
                            .unwrap_or_default()
                    ),
                );
                alert
                    .facts
                    .insert("rejected_total".into(), now_rejected.into());
                if let Some(j) = &r.entry.last_rejection {
                    alert.facts.insert("seq".into(), j.seq.into());
                    alert
                        .facts
                        .insert("reason".into(), j.reason.to_string().into());
                }
                out.push(alert);
            }
        }
    }
    out
}
