//! Key rotation (密钥轮换): an agent replaces its key without a new
//! enrollment. The announcement names the department, the old key and the
//! new one; the old key signs it (the enrolled identity vouches for its
//! successor) and so does the new key (whoever announces it holds it).
//!
//! Invariant: a rotation is accepted only with both signatures over the
//! exact bytes received, each domain-separated by its own context, so
//! neither can be replayed as a batch or registration signature.

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::encoding::{self, DecodeError, EncodeError};
use crate::{DepartmentCode, NodeId, NodeKey, UnixMillis};

/// The context of the old key's signature.
pub const ROTATION_BY_OLD_CONTEXT: &[u8] = b"shuyuan/v1/rotation-by-old-key\0";
/// The context of the new key's signature.
pub const ROTATION_BY_NEW_CONTEXT: &[u8] = b"shuyuan/v1/rotation-by-new-key\0";

/// What a rotation says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationBody {
    pub department: DepartmentCode,
    pub old: NodeId,
    pub new: NodeId,
    pub at: UnixMillis,
}

/// A rotation's exact bytes, signed by both keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub body: Vec<u8>,
    pub by_old: Signature,
    pub by_new: Signature,
}

/// The hub recorded a rotation: batches signed by `new` are accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotated {
    pub old: NodeId,
    pub new: NodeId,
}

/// Why a rotation cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("the rotation does not decode: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the old key {0} did not sign this rotation")]
    OldSignature(NodeId),
    #[error("the new key {0} did not sign this rotation")]
    NewSignature(NodeId),
    #[error("a key cannot rotate to itself")]
    SameKey,
}

impl KeyRotation {
    /// Announces `new` as the successor of `old` for `department`.
    pub fn sign(
        old: &NodeKey,
        new: &NodeKey,
        department: DepartmentCode,
        at: UnixMillis,
    ) -> Result<Self, EncodeError> {
        let body = encoding::encode(&RotationBody {
            department,
            old: old.id(),
            new: new.id(),
            at,
        })?;
        Ok(KeyRotation {
            by_old: old.sign(ROTATION_BY_OLD_CONTEXT, &body),
            by_new: new.sign(ROTATION_BY_NEW_CONTEXT, &body),
            body,
        })
    }

    /// Decodes the body and checks both signatures over the bytes received.
    pub fn open(&self) -> Result<RotationBody, RotationError> {
        let body: RotationBody = encoding::decode(&self.body)?;
        if body.old == body.new {
            return Err(RotationError::SameKey);
        }
        if !body
            .old
            .verify(ROTATION_BY_OLD_CONTEXT, &self.body, &self.by_old)
        {
            return Err(RotationError::OldSignature(body.old));
        }
        if !body
            .new
            .verify(ROTATION_BY_NEW_CONTEXT, &self.body, &self.by_new)
        {
            return Err(RotationError::NewSignature(body.new));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation() -> (NodeKey, NodeKey, KeyRotation) {
        let old = NodeKey::from_seed([1; 32]);
        let new = NodeKey::from_seed([2; 32]);
        let r = KeyRotation::sign(&old, &new, "GA".parse().unwrap(), UnixMillis(5)).unwrap();
        (old, new, r)
    }

    #[test]
    fn both_keys_must_sign() {
        let (old, new, r) = rotation();
        let body = r.open().unwrap();
        assert_eq!((body.old, body.new), (old.id(), new.id()));
        // Signed by a stranger instead of the old key.
        let stranger = NodeKey::from_seed([3; 32]);
        let mut forged = r.clone();
        forged.by_old = stranger.sign(ROTATION_BY_OLD_CONTEXT, &r.body);
        assert!(matches!(forged.open(), Err(RotationError::OldSignature(_))));
        // The old key's signature offered as the new key's.
        let mut forged = r.clone();
        forged.by_new = r.by_old;
        assert!(matches!(forged.open(), Err(RotationError::NewSignature(_))));
        // A changed body.
        let mut forged = r;
        let last = forged.body.len() - 1;
        forged.body[last] ^= 1;
        assert!(forged.open().is_err());
    }

    #[test]
    fn a_key_does_not_rotate_to_itself() {
        let k = NodeKey::from_seed([1; 32]);
        let r = KeyRotation::sign(&k, &k, "GA".parse().unwrap(), UnixMillis(5)).unwrap();
        assert!(matches!(r.open(), Err(RotationError::SameKey)));
    }
}
