//! Who may connect: the enrolled keys, checked during the QUIC handshake.
//!
//! Invariant: a key that is not enrolled never completes a handshake; every
//! refusal is counted. A refused key is logged and audited by name only
//! after the client proved it holds that key (the TLS layer asks
//! [`PeerPolicy::admit`] once the handshake signature verified), so nobody
//! can put a refusal on record in another department's name; a client that
//! did not prove its key, or whose certificate holds none, is refused as
//! "unproven" or "unreadable" without a key. Refusals are audited at most
//! once a minute per key (or per "unproven", "unreadable"), and at most
//! [`REFUSAL_ENTRIES`] a minute for all keys together, the rest summed into
//! one entry a minute, so that a flood of fresh keys cannot fill the audit
//! log and its size is still on record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use shuyuan_link::quic::PeerPolicy;
use shuyuan_protocol::{NodeId, UnixMillis};

use tokio::sync::watch;

use crate::apply::audit::{AuditEntry, AuditKind};
use crate::apply::keys::{Enrollment, NodeKind, Revocation, Rotation, RotationChange};
use crate::store::StoreError;
use crate::throttle::AuditThrottle;
use crate::writer::Store;

/// How many rotations back a batch's signer may be from the key that sends it.
const MAX_LINEAGE: usize = 16;

/// Handshake refusals audited one by one per
/// [`crate::throttle::AUDIT_INTERVAL`], all keys together; the refusals
/// beyond them are summed into one entry.
pub const REFUSAL_ENTRIES: usize = 5;

/// What a handshake refusal is throttled by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refused {
    /// A key whose holder proved it holds it.
    Key(NodeId),
    /// A certificate without an ed25519 key.
    Unreadable,
    /// A handshake signature that does not verify against the key of the
    /// certificate.
    Unproven,
    /// The refusals beyond [`REFUSAL_ENTRIES`], summed.
    Beyond,
}

impl Refused {
    /// The key an audit entry names.
    fn key(self) -> Option<NodeId> {
        match self {
            Refused::Key(key) => Some(key),
            Refused::Unreadable | Refused::Unproven | Refused::Beyond => None,
        }
    }
}

/// The enrolled keys, shared with the TLS verifier.
#[derive(Debug)]
pub struct Peers {
    enrolled: RwLock<BTreeMap<NodeId, Enrollment>>,
    revoked: RwLock<BTreeMap<NodeId, Revocation>>,
    /// Old agent key -> its successor.
    rotations: RwLock<BTreeMap<NodeId, Rotation>>,
    /// Counts revocations, so that open connections learn of them.
    revocations: watch::Sender<u64>,
    /// Handshake refusals audited at most once per interval per key, and
    /// [`REFUSAL_ENTRIES`] per interval in all.
    throttle: AuditThrottle<Refused>,
    refused: AtomicU64,
    generation: AtomicU64,
    store: Store,
}

impl Peers {
    /// Loads the enrollments from the store.
    pub fn load(store: Store) -> Result<Self, StoreError> {
        let (enrolled, revoked, rotations) = store.read(|t| {
            Ok::<_, StoreError>((
                t.enrollments()?.into_iter().collect(),
                t.revocations()?.into_iter().collect(),
                t.rotations()?.into_iter().collect(),
            ))
        })?;
        Ok(Peers {
            enrolled: RwLock::new(enrolled),
            revoked: RwLock::new(revoked),
            rotations: RwLock::new(rotations),
            revocations: watch::Sender::new(0),
            throttle: AuditThrottle::capped(REFUSAL_ENTRIES, Refused::Beyond),
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

    /// The revocation of a key, if it was revoked.
    pub fn revocation(&self, key: &NodeId) -> Option<Revocation> {
        self.revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Revokes a key durably, then refuses it: the verifier and the batch
    /// check stop admitting it, and its open connections are told (see
    /// [`Peers::revoked`]).
    pub async fn revoke(&self, key: NodeId, reason: String) -> Result<Revocation, StoreError> {
        let revocation = self.store.revoke(key, reason).await?;
        self.enrolled
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, revocation.clone());
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.revocations.send_modify(|n| *n += 1);
        Ok(revocation)
    }

    /// The rotation that replaced `old`, if any.
    pub fn rotation(&self, old: &NodeId) -> Option<Rotation> {
        self.rotations
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(old)
            .cloned()
    }

    /// Records a verified rotation `old -> new` durably, enrolling the new
    /// key as the old one was; whether it is new (a repeated announcement
    /// is not).
    pub async fn rotate(
        &self,
        old: NodeId,
        new: NodeId,
        department: shuyuan_protocol::DepartmentCode,
    ) -> Result<bool, StoreError> {
        let change = RotationChange::Record {
            old,
            new,
            department,
        };
        let recorded = self.store.rotate(change).await?;
        if let Some(successor) = self.get(&old) {
            self.enrolled
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(new)
                .or_insert(Enrollment {
                    enrolled_at: UnixMillis::now(),
                    ..successor
                });
        }
        self.reload_rotations()?;
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(recorded)
    }

    /// A key connected: a predecessor not yet retired is retired now, so
    /// that only the newest key of an agent may connect.
    pub async fn connected(&self, key: NodeId) -> Result<(), StoreError> {
        let waiting: Vec<NodeId> = self
            .rotations
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, r)| r.new == key && r.retired.is_none())
            .map(|(old, _)| *old)
            .collect();
        if waiting.is_empty() {
            return Ok(()); // the common case: no store read per connection
        }
        for old in waiting {
            self.store.rotate(RotationChange::Retire { old }).await?;
        }
        self.reload_rotations()
    }

    fn reload_rotations(&self) -> Result<(), StoreError> {
        let all = self.store.read(|t| t.rotations())?.into_iter().collect();
        *self
            .rotations
            .write()
            .unwrap_or_else(PoisonError::into_inner) = all;
        Ok(())
    }

    /// Whether `signer` is `key` or one of its predecessors or successors:
    /// an agent's batches signed before or after a rotation are its own.
    pub fn same_agent(&self, signer: &NodeId, key: &NodeId) -> bool {
        let rotations = self
            .rotations
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let descends = |from: &NodeId, to: &NodeId| {
            let mut at = *from;
            for _ in 0..MAX_LINEAGE {
                if at == *to {
                    return true;
                }
                match rotations.get(&at) {
                    Some(r) => at = r.new,
                    None => return false,
                }
            }
            false
        };
        descends(signer, key) || descends(key, signer)
    }

    /// Resolves once `key` is revoked (at once if it already is).
    pub async fn revoked(&self, key: NodeId) -> Revocation {
        let mut changes = self.revocations.subscribe();
        loop {
            if let Some(r) = self.revocation(&key) {
                return r;
            }
            // The sender lives as long as `self`.
            let _ = changes.changed().await;
        }
    }

    /// Changes with every enrollment recorded since the hub started.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Handshakes refused since the hub started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn audit_refusal(&self, refused: Refused, detail: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(text) = self.throttle.admit(refused, detail) {
            self.audit(refused, text);
        }
    }

    fn audit(&self, refused: Refused, detail: String) {
        let mut entry = AuditEntry::new(AuditKind::HandshakeRefused, detail);
        entry.peer = refused.key();
        self.store.audit(entry);
    }

    /// Audits the handshake refusals held back for longer than the
    /// interval (call it at [`crate::throttle::AUDIT_INTERVAL`]).
    pub fn flush_refusals(&self) {
        for (refused, text) in self.throttle.due() {
            self.audit(refused, text);
        }
    }
}

impl PeerPolicy for Peers {
    fn admit(&self, peer: &NodeId) -> bool {
        if let Some(r) = self.rotation(peer).filter(|r| r.retired.is_some()) {
            tracing::warn!(key = %peer, successor = %r.new, "refused a retired key (handshake)");
            self.audit_refusal(
                Refused::Key(*peer),
                format!(
                    "key {peer} was replaced by {} (key rotation) and is retired",
                    r.new
                ),
            );
            return false;
        }
        match self.get(peer).map(|e| e.kind) {
            Some(NodeKind::Agent | NodeKind::Hub) => return true,
            Some(NodeKind::Below { via, .. }) => {
                tracing::warn!(key = %peer, %via, "refused a key registered below child hub {via}: it sends through that hub (handshake)");
                self.audit_refusal(
                    Refused::Key(*peer),
                    format!("key {peer} is registered below child hub {via}, not enrolled here"),
                );
                return false;
            }
            None => {}
        }
        if let Some(r) = self.revocation(peer) {
            tracing::warn!(key = %peer, reason = %r.reason, "refused a revoked key (handshake)");
            self.audit_refusal(
                Refused::Key(*peer),
                format!("key {peer} was revoked at {}: {}", r.at, r.reason),
            );
            return false;
        }
        tracing::warn!(key = %peer, "refused a key that is not enrolled (handshake)");
        self.audit_refusal(Refused::Key(*peer), format!("key {peer} is not enrolled"));
        false
    }

    fn refuse_unreadable(&self, reason: &str) {
        tracing::warn!(%reason, "refused a client certificate without an ed25519 key (handshake)");
        self.audit_refusal(
            Refused::Unreadable,
            format!("unreadable client certificate: {reason}"),
        );
    }

    fn refuse_unproven(&self, reason: &str) {
        // The certificate's key is not named: its holder may not be the
        // client.
        tracing::warn!(%reason, "refused a client whose handshake signature does not match its certificate (handshake)");
        self.audit_refusal(
            Refused::Unproven,
            format!(
                "unproven key: the client's handshake signature does not verify against \
                 the key of its certificate ({reason})"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shuyuan_protocol::NodeKey;

    use super::*;
    use crate::apply::audit;
    use crate::store::memory::MemoryEngine;

    async fn refusals(store: &Store) -> Vec<AuditEntry> {
        store.barrier().await.unwrap();
        store
            .read(|t| audit::recent(t, 1000))
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == AuditKind::HandshakeRefused)
            .collect()
    }

    #[tokio::test]
    async fn a_flood_of_fresh_keys_and_unreadable_certificates_is_audited_within_the_cap() {
        let (store, _writer) = Store::start(Arc::new(MemoryEngine::new())).unwrap();
        let peers = Peers::load(store.clone()).unwrap();
        for seed in 0..20 {
            assert!(!peers.admit(&NodeKey::from_seed([seed; 32]).id()));
        }
        for _ in 0..3 {
            peers.refuse_unreadable("certificate does not hold an ed25519 key");
        }
        let entries = refusals(&store).await;
        assert_eq!(entries.len(), REFUSAL_ENTRIES, "{entries:#?}");
        assert_eq!(peers.refused(), 23);
    }

    #[tokio::test]
    async fn an_unproven_key_is_refused_without_its_name() {
        let (store, _writer) = Store::start(Arc::new(MemoryEngine::new())).unwrap();
        let peers = Peers::load(store.clone()).unwrap();
        for _ in 0..2 {
            peers.refuse_unproven("invalid peer certificate: BadSignature");
        }
        let entries = refusals(&store).await;
        assert_eq!(entries.len(), 1, "{entries:#?}");
        assert_eq!(entries[0].peer, None);
        assert!(
            entries[0].detail.starts_with("unproven key"),
            "{entries:#?}"
        );
        assert_eq!(peers.refused(), 2);
    }
}
