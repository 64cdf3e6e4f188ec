//! Key rotation (密钥轮换) announced over an agent's connection.
//!
//! Invariant: a rotation is recorded only when both keys signed it, the
//! sender is one of the two, and it stays in the sender's department;
//! anything else is refused and audited.

use shuyuan_protocol::message::Reject;
use shuyuan_protocol::rotation::{KeyRotated, KeyRotation};
use shuyuan_protocol::{DepartmentCode, MessageV1, NodeId, RejectReason};

use super::Ingest;
use crate::apply::audit::{AuditEntry, AuditKind};

/// Checks and records an agent's key rotation, announced over the old
/// key's connection (or repeated over the new one's); the answer is
/// `KeyRotated`, or a refusal that is audited.
pub(crate) async fn rotate(
    ingest: &Ingest,
    peer: NodeId,
    department: &DepartmentCode,
    rotation: &KeyRotation,
) -> MessageV1 {
    let checked = match rotation.open() {
        Err(e) => Err((RejectReason::BadSignature, e.to_string())),
        Ok(body) if body.old != peer && body.new != peer => Err((
            RejectReason::UnknownSigner,
            format!(
                "a rotation of {} sent by {peer}: an agent announces only its own next key",
                body.old
            ),
        )),
        Ok(body) if body.department != *department => Err((
            RejectReason::WrongDepartment,
            format!(
                "a rotation for department {} from a key enrolled for {department}",
                body.department
            ),
        )),
        Ok(body) => Ok(body),
    };
    let outcome = match checked {
        Ok(body) => ingest
            .peers
            .rotate(body.old, body.new, body.department)
            .await
            .map(|new| (body.old, body.new, new))
            .map_err(|e| (RejectReason::UnknownSigner, e.to_string())),
        Err(e) => Err(e),
    };
    match outcome {
        Ok((old, new, recorded)) => {
            if recorded {
                tracing::info!(%old, %new, "agent key rotated");
            }
            MessageV1::KeyRotated(KeyRotated { old, new })
        }
        Err((reason, detail)) => {
            tracing::warn!(%reason, %detail, "key rotation refused");
            let mut entry = AuditEntry::new(
                AuditKind::ConnectionRefused,
                format!("key rotation refused: {detail}"),
            );
            entry.peer = Some(peer);
            entry.reason = Some(reason);
            ingest.store.audit(entry);
            MessageV1::Reject(Reject {
                feed: None,
                seq: 0,
                reason,
                detail: format!("key rotation refused: {detail}"),
                resend_from: 0,
            })
        }
    }
}
