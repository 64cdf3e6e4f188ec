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
}

/// Connected agents and child hubs by connection id.
#[derive(Debug, Default)]
pub struct Live {
    next: AtomicU64,
    connections: Mutex<BTreeMap<u64, ConnectionInfo>>,
    children: Mutex<BTreeMap<u64, ChildInfo>>,
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
        self.lock().remove(&id);
    }

    pub fn report(&self, id: u64, report: AgentReport) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.report = Some(report);
        }
    }

    /// All current connections.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.lock().values().cloned().collect()
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

    /// All connected child hubs.
    pub fn children(&self) -> Vec<ChildInfo> {
        self.lock_children().values().cloned().collect()
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
