//! The hub's live view of connected agents and child hubs (not persisted).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::federation::HubReport;
use shuyuan_protocol::message::AgentReport;
use shuyuan_protocol::{DepartmentCode, FeedId, NodeId, ResourceCode, UnixMillis};

/// One connected agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub peer: NodeId,
    pub department: DepartmentCode,
    pub resources: Vec<ResourceCode>,
    pub remote: SocketAddr,
    pub since: UnixMillis,
    pub software: String,
    /// The agent's last backlog report.
    pub report: Option<AgentReport>,
    /// How far the agent's clock is ahead of the hub's (negative: behind),
    /// from its last report's timestamp.
    #[serde(default)]
    pub clock_skew_ms: Option<i64>,
    /// The connection, so that `remote` follows the agent when its address
    /// changes mid-connection (QUIC path migration, a NAT rebinding).
    #[serde(skip)]
    pub connection: Option<quinn::Connection>,
}

/// One connected child hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildInfo {
    pub peer: NodeId,
    /// Its platform code, as enrolled here.
    pub code: DepartmentCode,
    pub name: String,
    pub remote: SocketAddr,
    pub since: UnixMillis,
    pub software: String,
    /// The feeds it forwards.
    pub feeds: Vec<FeedId>,
    /// Its last report of itself and its subtree.
    pub tree: Option<HubReport>,
    /// The connection, so that `remote` follows the child's address.
    #[serde(skip)]
    pub connection: Option<quinn::Connection>,
}

/// Where a peer is now: its connection's current address (QUIC path
/// migration, a NAT rebinding), else where it connected from.
fn current(connection: Option<&quinn::Connection>, connected_from: SocketAddr) -> SocketAddr {
    connection.map_or(connected_from, quinn::Connection::remote_address)
}

/// Connected agents and child hubs by connection id.
#[derive(Debug, Default)]
pub struct Live {
    next: AtomicU64,
    connections: Mutex<BTreeMap<u64, ConnectionInfo>>,
    children: Mutex<BTreeMap<u64, ChildInfo>>,
    /// When each agent's last connection ended.
    disconnected: Mutex<BTreeMap<NodeId, UnixMillis>>,
}

impl Live {
    /// A fresh connection id.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn register(&self, id: u64, info: ConnectionInfo) {
        self.lock().insert(id, info);
    }

    pub fn unregister(&self, id: u64) {
        if let Some(c) = self.lock().remove(&id) {
            self.disconnected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(c.peer, UnixMillis::now());
        }
    }

    /// When each agent's last connection ended, since the hub started.
    pub fn disconnected(&self) -> BTreeMap<NodeId, UnixMillis> {
        self.disconnected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records an agent's report, received at `now`, and with it how far
    /// the agent's clock is off; returns that skew.
    pub fn report(&self, id: u64, report: AgentReport, now: UnixMillis) -> i64 {
        let skew = report.at.0.saturating_sub(now.0);
        if let Some(c) = self.lock().get_mut(&id) {
            c.report = Some(report);
            c.clock_skew_ms = Some(skew);
        }
        skew
    }

    /// All current connections, each at the address it is on now.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.lock()
            .values()
            .map(|c| ConnectionInfo {
                remote: current(c.connection.as_ref(), c.remote),
                ..c.clone()
            })
            .collect()
    }

    pub fn register_child(&self, id: u64, info: ChildInfo) {
        self.lock_children().insert(id, info);
    }

    pub fn unregister_child(&self, id: u64) {
        self.lock_children().remove(&id);
    }

    /// Updates a child's forwarded feeds or tree.
    pub fn update_child(&self, id: u64, f: impl FnOnce(&mut ChildInfo)) {
        if let Some(c) = self.lock_children().get_mut(&id) {
            f(c);
        }
    }

    /// All connected child hubs, each at the address it is on now.
    pub fn children(&self) -> Vec<ChildInfo> {
        self.lock_children()
            .values()
            .map(|c| ChildInfo {
                remote: current(c.connection.as_ref(), c.remote),
                ..c.clone()
            })
            .collect()
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ChildInfo>> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ConnectionInfo>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
