//! The hub's live view of connected agents (not persisted).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::message::AgentReport;
use shuyuan_protocol::{DepartmentCode, NodeId, ResourceCode, UnixMillis};

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

/// Connected agents by connection id.
#[derive(Debug, Default)]
pub struct Live {
    next: AtomicU64,
    connections: Mutex<BTreeMap<u64, ConnectionInfo>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ConnectionInfo>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
