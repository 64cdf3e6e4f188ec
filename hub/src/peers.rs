//! Who may connect: the enrolled keys, checked during the QUIC handshake.
//!
//! Invariant: a key that is not enrolled never completes a handshake; every
//! refusal is logged with the refused key and counted, and audited at most
//! once a minute per key so that a flood cannot fill the audit log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use shuyuan_protocol::quic::PeerPolicy;
use shuyuan_protocol::{NodeId, UnixMillis};

use crate::store::{AuditEntry, AuditKind, Enrollment, NodeKind, Store, StoreError};

/// How often one refused key is audited.
pub const REFUSAL_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

/// The enrolled keys, shared with the TLS verifier.
#[derive(Debug)]
pub struct Peers {
    enrolled: RwLock<BTreeMap<NodeId, Enrollment>>,
    last_audited: Mutex<BTreeMap<NodeId, UnixMillis>>,
    refused: AtomicU64,
    generation: AtomicU64,
    store: Store,
}

impl Peers {
    /// Loads the enrollments from the store.
    pub fn load(store: Store) -> Result<Self, StoreError> {
        let enrolled = store.backend().enrollments()?.into_iter().collect();
        Ok(Peers {
            enrolled: RwLock::new(enrolled),
            last_audited: Mutex::new(BTreeMap::new()),
            refused: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            store,
        })
    }

    /// The enrollment of a key.
    pub fn get(&self, key: &NodeId) -> Option<Enrollment> {
        self.enrolled
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Every enrollment.
    pub fn all(&self) -> Vec<(NodeId, Enrollment)> {
        self.enrolled
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, e)| (*k, e.clone()))
            .collect()
    }

    /// Records an enrollment durably, then admits the key.
    pub async fn enroll(&self, key: NodeId, enrollment: Enrollment) -> Result<bool, StoreError> {
        let new = self.store.enroll(key, enrollment.clone()).await?;
        self.enrolled
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, enrollment);
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(new)
    }

    /// Changes with every enrollment recorded since the hub started.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Handshakes refused since the hub started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn audit_refusal(&self, key: Option<NodeId>, detail: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = UnixMillis::now();
        if let Some(k) = key {
            let mut last = self
                .last_audited
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last
                .get(&k)
                .is_some_and(|t| now.since(*t) < REFUSAL_AUDIT_INTERVAL)
            {
                return;
            }
            last.insert(k, now);
        }
        let mut entry = AuditEntry::new(AuditKind::HandshakeRefused, detail);
        entry.peer = key;
        self.store.audit(entry);
    }
}

impl PeerPolicy for Peers {
    fn admit(&self, peer: &NodeId) -> bool {
        match self.get(peer).map(|e| e.kind) {
            Some(NodeKind::Agent | NodeKind::Hub) => return true,
            Some(NodeKind::Below { via, .. }) => {
                tracing::warn!(key = %peer, %via, "refused a key registered below child hub {via}: it sends through that hub (handshake)");
                self.audit_refusal(
                    Some(*peer),
                    format!("key {peer} is registered below child hub {via}, not enrolled here"),
                );
                return false;
            }
            None => {}
        }
        tracing::warn!(key = %peer, "refused a key that is not enrolled (handshake)");
        self.audit_refusal(Some(*peer), format!("key {peer} is not enrolled"));
        false
    }

    fn refuse_unreadable(&self, reason: &str) {
        tracing::warn!(%reason, "refused a client certificate without an ed25519 key (handshake)");
        self.audit_refusal(None, format!("unreadable client certificate: {reason}"));
    }
}
