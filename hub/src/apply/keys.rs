//! Key records: who may connect and sign, for which department; rotations
//! (密钥轮换) and revocations.
//!
//! Invariants: one key serves one department, as one kind of node, for good;
//! a revoked key is never enrolled again; a rotation is recorded once and
//! enrolls the new key exactly as the old one was; every change is audited
//! in the transaction that makes it.

use serde::{Deserialize, Serialize};
use shuyuan_protocol::federation::Registration;
use shuyuan_protocol::{DepartmentCode, NodeId, UnixMillis};

use super::Txn;
use super::audit::{AuditEntry, AuditKind};
use crate::store::{ReadTxn, StoreError};

/// Why a change to the key records is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error(
        "key {key} is already enrolled for department {department}; one key serves one department"
    )]
    EnrolledElsewhere {
        key: NodeId,
        department: DepartmentCode,
    },
    #[error("key {key} is already enrolled as {was}, not as {now}")]
    KindChanged {
        key: NodeId,
        was: &'static str,
        now: &'static str,
    },
    #[error("key {key} was revoked at {at}: {reason}; a revoked key is never enrolled again")]
    Revoked {
        key: NodeId,
        at: UnixMillis,
        reason: String,
    },
    #[error("key {0} is not enrolled")]
    NotEnrolled(NodeId),
    #[error("key {old} was already replaced by {new}")]
    AlreadyRotated { old: NodeId, new: NodeId },
}

/// An agent key replaced by its successor (密钥轮换), announced signed by
/// both keys. Batches the old key signed stay valid; once the new key has
/// connected the old one is retired and may no longer connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub new: NodeId,
    pub department: DepartmentCode,
    pub at: UnixMillis,
    pub retired: Option<UnixMillis>,
}

/// A change to the rotation records.
#[derive(Debug, Clone)]
pub enum RotationChange {
    /// Record `old -> new` (a verified announcement): the new key is
    /// enrolled as the old one was.
    Record {
        old: NodeId,
        new: NodeId,
        department: DepartmentCode,
    },
    /// The new key connected: retire its predecessor.
    Retire { old: NodeId },
}

/// A key withdrawn by an administrator: it may no longer connect, and
/// batches it signed are refused. The enrollment is kept to say whose it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub at: UnixMillis,
    pub reason: String,
    pub enrollment: Enrollment,
}

/// What kind of node a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// A department agent.
    Agent,
    /// A child hub (a platform one level down) that forwards its feeds here;
    /// the enrollment's `department` is its platform code.
    Hub,
    /// A key enrolled at a hub further down, known from its signed
    /// registration; it never connects here. `via` is the child hub whose
    /// subtree it belongs to; `hub` says whether the key is a hub's (as the
    /// registration says, checked when it was recorded).
    Below {
        via: NodeId,
        hub: bool,
        registration: Registration,
    },
}

impl NodeKind {
    pub fn name(&self) -> &'static str {
        match self {
            NodeKind::Agent => "agent",
            NodeKind::Hub => "hub",
            NodeKind::Below { .. } => "registration from below",
        }
    }
}

/// A key the hub accepts, and for which department.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The department; for a hub, its platform code.
    pub department: DepartmentCode,
    /// The department's name (部门名称), or the platform's.
    pub name: String,
    pub kind: NodeKind,
    pub enrolled_at: UnixMillis,
}

impl Enrollment {
    /// The key is a hub: a child hub, or a hub registered below one.
    pub fn is_hub(&self) -> bool {
        match &self.kind {
            NodeKind::Agent => false,
            NodeKind::Hub => true,
            NodeKind::Below { hub, .. } => *hub,
        }
    }

    /// The child hub this key's data arrives through (itself for a child
    /// hub), or None for a directly connected agent.
    pub fn via(&self, key: &NodeId) -> Option<NodeId> {
        match &self.kind {
            NodeKind::Agent => None,
            NodeKind::Hub => Some(*key),
            NodeKind::Below { via, .. } => Some(*via),
        }
    }
}

/// Enrolls `key` (or renames its enrollment); whether it is new.
pub fn enroll(
    txn: &mut Txn<'_>,
    key: &NodeId,
    enrollment: &Enrollment,
) -> Result<Result<bool, KeyRefusal>, StoreError> {
    if let Some(r) = txn.store.revocation(key)? {
        return Ok(Err(KeyRefusal::Revoked {
            key: *key,
            at: r.at,
            reason: r.reason,
        }));
    }
    let old = txn.store.enrollment(key)?;
    match &old {
        Some(old) if old.department != enrollment.department => {
            return Ok(Err(KeyRefusal::EnrolledElsewhere {
                key: *key,
                department: old.department.clone(),
            }));
        }
        Some(old)
            if std::mem::discriminant(&old.kind) != std::mem::discriminant(&enrollment.kind) =>
        {
            return Ok(Err(KeyRefusal::KindChanged {
                key: *key,
                was: old.kind.name(),
                now: enrollment.kind.name(),
            }));
        }
        _ => {}
    }
    txn.store.put_enrollment(key, enrollment)?;
    let mut entry = AuditEntry::new(
        AuditKind::Enrolled,
        format!(
            "{} {} for {} {} ({}){}",
            if old.is_some() { "renamed" } else { "enrolled" },
            if enrollment.is_hub() {
                "hub key"
            } else {
                "key"
            },
            if enrollment.is_hub() {
                "platform"
            } else {
                "department"
            },
            enrollment.department,
            enrollment.name,
            match &enrollment.kind {
                NodeKind::Below {
                    via, registration, ..
                } => format!(
                    ", registered by hub {} and forwarded by child hub {via}",
                    registration.signer
                ),
                _ => String::new(),
            }
        ),
    );
    entry.peer = Some(*key);
    txn.audit(entry)?;
    Ok(Ok(old.is_none()))
}

/// Records a verified rotation (the new key enrolled as the old one was)
/// or retires an old key; whether anything changed.
pub fn rotate(
    txn: &mut Txn<'_>,
    change: &RotationChange,
) -> Result<Result<bool, KeyRefusal>, StoreError> {
    let (old, detail) = match change {
        RotationChange::Record {
            old,
            new,
            department,
        } => {
            if let Some(r) = txn.store.rotation(old)? {
                if r.new == *new {
                    return Ok(Ok(false));
                }
                return Ok(Err(KeyRefusal::AlreadyRotated {
                    old: *old,
                    new: r.new,
                }));
            }
            let Some(enrollment) = txn
                .store
                .enrollment(old)?
                .filter(|e| e.department == *department && e.kind == NodeKind::Agent)
            else {
                return Ok(Err(KeyRefusal::NotEnrolled(*old)));
            };
            if let Some(r) = txn.store.revocation(new)? {
                return Ok(Err(KeyRefusal::Revoked {
                    key: *new,
                    at: r.at,
                    reason: r.reason,
                }));
            }
            if let Some(e) = txn.store.enrollment(new)? {
                return Ok(Err(KeyRefusal::EnrolledElsewhere {
                    key: *new,
                    department: e.department,
                }));
            }
            let successor = Enrollment {
                enrolled_at: txn.now,
                ..enrollment
            };
            txn.store.put_enrollment(new, &successor)?;
            let rotation = Rotation {
                new: *new,
                department: department.clone(),
                at: txn.now,
                retired: None,
            };
            txn.store.put_rotation(old, &rotation)?;
            (
                old,
                format!(
                    "key {old} of department {department} rotated to {new}, announced signed by both keys"
                ),
            )
        }
        RotationChange::Retire { old } => {
            let Some(mut r) = txn.store.rotation(old)?.filter(|r| r.retired.is_none()) else {
                return Ok(Ok(false));
            };
            r.retired = Some(txn.now);
            txn.store.put_rotation(old, &r)?;
            (
                old,
                format!(
                    "key {old} of department {} retired: its successor {} connected",
                    r.department, r.new
                ),
            )
        }
    };
    let mut entry = AuditEntry::new(AuditKind::KeyRotated, detail);
    entry.at = txn.now;
    entry.peer = Some(*old);
    txn.audit(entry)?;
    Ok(Ok(true))
}

/// Withdraws an enrolled key: moved from the enrollments to the
/// revocations, and audited.
pub fn revoke(
    txn: &mut Txn<'_>,
    key: &NodeId,
    reason: &str,
) -> Result<Result<Revocation, KeyRefusal>, StoreError> {
    if let Some(r) = txn.store.revocation(key)? {
        return Ok(Err(KeyRefusal::Revoked {
            key: *key,
            at: r.at,
            reason: r.reason,
        }));
    }
    let Some(enrollment) = txn.store.enrollment(key)? else {
        return Ok(Err(KeyRefusal::NotEnrolled(*key)));
    };
    let revocation = Revocation {
        at: txn.now,
        reason: reason.to_string(),
        enrollment,
    };
    txn.store.remove_enrollment(key)?;
    txn.store.put_revocation(key, &revocation)?;
    let e = &revocation.enrollment;
    let mut entry = AuditEntry::new(
        AuditKind::Revoked,
        format!(
            "revoked {} {key} of {} {} ({}): {reason}",
            if e.is_hub() { "hub key" } else { "key" },
            if e.is_hub() { "platform" } else { "department" },
            e.department,
            e.name
        ),
    );
    entry.at = txn.now;
    entry.peer = Some(*key);
    txn.audit(entry)?;
    Ok(Ok(revocation))
}

/// Whether the child hub `hub` forwards the department's feeds (an agent
/// of the department is registered below it).
pub fn carries(
    txn: &dyn ReadTxn,
    hub: &NodeId,
    department: &DepartmentCode,
) -> Result<bool, StoreError> {
    Ok(txn.enrollments()?.into_iter().any(|(_, e)| {
        e.department == *department
            && !e.is_hub()
            && matches!(e.kind, NodeKind::Below { via, .. } if via == *hub)
    }))
}
