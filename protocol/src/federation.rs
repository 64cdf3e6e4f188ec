//! Federation: a hub that is a client of a parent hub (区县平台向上级联).
//!
//! A child hub connects to its parent like an agent, with its own key,
//! enrolled at the parent as a hub. It forwards the departments' signed
//! batches with their bytes unchanged, so the parent verifies the original
//! signatures and chains itself. To know the departments' keys, the parent
//! receives signed [`Registration`]s: each says "this key is enrolled here
//! for department D (or as hub H)", signed by the hub that enrolled it. A
//! registration signed by a hub further down is forwarded unchanged, next
//! to the registration of that hub signed by the hub above it, so the top
//! can follow the chain of signatures down from a hub it enrolled itself.
//!
//! ```text
//! child  -> parent  HubHello     (software, name, the feeds it forwards)
//! parent -> child   Welcome      (the parent's head of each of those feeds)
//! child  -> parent  Registration (signed, one per key below; before their batches)
//! child  -> parent  Batch...     (the departments' batches, as they signed them)
//! parent -> child   Ack | Reject
//! child  -> parent  Feeds        (more feeds to forward; answered by Welcome)
//! child  -> parent  Tree         (the child's subtree and heads, now and then)
//! both ways         Catalog      (automerge sync of each department's catalog)
//! ```
//!
//! Invariant: a registration's bytes are what its signer signed; nothing
//! below the top can change, drop or invent a department's key without the
//! signature check or the chain check failing.

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::encoding::{self, DecodeError, EncodeError};
use crate::feed::{DepartmentCode, FeedId};
use crate::identity::{NodeId, NodeKey};
use crate::time::UnixMillis;

/// Context string of registration signatures.
pub const REGISTRATION_SIGNATURE_CONTEXT: &[u8] = b"shuyuan/v1/registration-signature\0";

/// What a registered key is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Registered {
    /// A department's agent.
    Agent { department: DepartmentCode },
    /// A hub (a platform one level further down), by its platform code.
    Hub { code: DepartmentCode },
}

/// The signed content of a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationBody {
    /// The registered key.
    pub key: NodeId,
    pub what: Registered,
    /// The department's or platform's name.
    pub name: String,
    /// When the signer enrolled the key.
    pub enrolled_at: UnixMillis,
}

/// A registration with the enrolling hub's signature over its exact bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub body: Vec<u8>,
    pub signer: NodeId,
    pub signature: Signature,
}

/// A registration that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error("the registration's signature does not verify against {0}")]
    BadSignature(NodeId),
    #[error("the registration cannot be decoded: {0}")]
    Malformed(#[from] DecodeError),
}

impl Registration {
    /// Encodes and signs a registration.
    pub fn sign(key: &NodeKey, body: &RegistrationBody) -> Result<Self, EncodeError> {
        let bytes = encoding::encode(body)?;
        Ok(Registration {
            signature: key.sign(REGISTRATION_SIGNATURE_CONTEXT, &bytes),
            body: bytes,
            signer: key.id(),
        })
    }

    /// Checks the signature over the received bytes, then decodes them.
    pub fn open(&self) -> Result<RegistrationBody, RegistrationError> {
        if !self
            .signer
            .verify(REGISTRATION_SIGNATURE_CONTEXT, &self.body, &self.signature)
        {
            return Err(RegistrationError::BadSignature(self.signer));
        }
        Ok(encoding::decode(&self.body)?)
    }
}

/// A child hub introduces itself after the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubHello {
    pub software: String,
    /// The platform's name, for the parent's console.
    pub name: String,
    /// The feeds it forwards now.
    pub feeds: Vec<FeedId>,
}

/// A child hub's view of itself and what is below it, for the parent's
/// console: the tree of hubs, and each feed's head at each level.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubReport {
    pub hub: Option<NodeId>,
    pub name: String,
    pub at: UnixMillis,
    /// Every feed this hub holds (forwarded or held back).
    pub feeds: Vec<FeedReport>,
    /// Agents connected to this hub right now, by department.
    pub agents_online: Vec<DepartmentCode>,
    /// The last reports of this hub's connected child hubs.
    pub children: Vec<HubReport>,
}

/// One feed as a hub in the tree holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedReport {
    pub feed: FeedId,
    pub last_seq: u64,
    pub last_batch_received_at: Option<UnixMillis>,
    /// Forwarded upward; false when its share type keeps it here.
    pub forwarded: bool,
    /// Why it is not forwarded, in words.
    pub held: String,
}

impl HubReport {
    /// Every hub id in the subtree, this one first.
    pub fn hubs(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self.hub.into_iter().collect();
        for c in &self.children {
            out.extend(c.hubs());
        }
        out
    }

    /// How deep the tree goes (1 for a hub without children).
    pub fn depth(&self) -> usize {
        1 + self
            .children
            .iter()
            .map(HubReport::depth)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> RegistrationBody {
        RegistrationBody {
            key: NodeKey::from_seed([7; 32]).id(),
            what: Registered::Agent {
                department: "D1".parse().unwrap(),
            },
            name: "一局".into(),
            enrolled_at: UnixMillis(1_795_219_200_000),
        }
    }

    #[test]
    fn a_registration_opens_only_with_its_bytes_and_signer() {
        let hub = NodeKey::from_seed([1; 32]);
        let signed = Registration::sign(&hub, &body()).unwrap();
        assert_eq!(signed.open().unwrap(), body());
        for i in 0..signed.body.len() {
            let mut bad = signed.clone();
            bad.body[i] ^= 0x20;
            assert!(
                matches!(bad.open(), Err(RegistrationError::BadSignature(_))),
                "byte {i}"
            );
        }
        let mut other = signed.clone();
        other.signer = NodeKey::from_seed([2; 32]).id();
        assert_eq!(
            other.open(),
            Err(RegistrationError::BadSignature(other.signer))
        );
    }

    #[test]
    fn a_batch_signature_is_not_a_registration_signature() {
        let hub = NodeKey::from_seed([1; 32]);
        let bytes = encoding::encode(&body()).unwrap();
        let forged = Registration {
            signature: hub.sign(crate::batch::BATCH_SIGNATURE_CONTEXT, &bytes),
            body: bytes,
            signer: hub.id(),
        };
        assert!(forged.open().is_err());
    }

    #[test]
    fn the_tree_lists_its_hubs_and_depth() {
        let id = |s| Some(NodeKey::from_seed([s; 32]).id());
        let leaf = |s| HubReport {
            hub: id(s),
            ..HubReport::default()
        };
        let mid = HubReport {
            hub: id(2),
            children: vec![leaf(3), leaf(4)],
            ..HubReport::default()
        };
        let top = HubReport {
            hub: id(1),
            children: vec![mid],
            ..HubReport::default()
        };
        assert_eq!(top.depth(), 3);
        assert_eq!(
            top.hubs(),
            vec![id(1), id(2), id(3), id(4)]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
        );
    }
}
