//! Verify: a batch's signature and signer, checked on the connection before
//! anything of it is trusted.
//!
//! An agent's batch must be signed by the agent (or a key it rotated from)
//! for a feed of its own department ([`agent_batch`]); a batch a child hub
//! forwards must be signed by a department key that a hub below that child
//! registered, for a feed of that department ([`forwarded_batch`]).
//!
//! Invariants: the signature is checked over the exact bytes received,
//! with `verify_strict`, before the body is decoded as trusted; before
//! that, the body is peeked at only to say which feed a refusal concerns;
//! a revoked or unknown signer is refused whatever the signature.

use shuyuan_protocol::batch::BatchError;
use shuyuan_protocol::encoding::decode;
use shuyuan_protocol::{
    BatchBody, BatchHash, DepartmentCode, FeedId, NodeId, RejectReason, SignedBatch,
};

use crate::peers::Peers;

/// A batch whose signature and signer were checked by the connection.
#[derive(Debug, Clone)]
pub struct VerifiedBatch {
    pub signed: SignedBatch,
    pub body: BatchBody,
    pub hash: BatchHash,
}

/// A batch as it reaches the writer: verified, or already refused by the
/// connection (bad signature, wrong signer) with the feed it claimed.
#[derive(Debug, Clone)]
pub enum Incoming {
    Verified(Box<VerifiedBatch>),
    Refused {
        feed: Option<FeedId>,
        seq: u64,
        reason: RejectReason,
        detail: String,
    },
}

impl Incoming {
    /// The feed and sequence number the batch is about (as claimed, when
    /// it was refused).
    pub fn claimed(&self) -> (Option<FeedId>, u64) {
        match self {
            Incoming::Verified(v) => (Some(v.body.feed.clone()), v.body.seq),
            Incoming::Refused { feed, seq, .. } => (feed.clone(), *seq),
        }
    }
}

/// What a batch claims before its signature is checked: only for naming
/// the feed in a refusal.
struct Claimed {
    feed: Option<FeedId>,
    seq: u64,
}

impl Claimed {
    fn peek(batch: &SignedBatch) -> Claimed {
        let body: Option<BatchBody> = decode(&batch.body).ok();
        let (feed, seq) = body.map_or((None, 0), |b| (Some(b.feed), b.seq));
        Claimed { feed, seq }
    }

    fn refuse(&self, reason: RejectReason, detail: String) -> Incoming {
        Incoming::Refused {
            feed: self.feed.clone(),
            seq: self.seq,
            reason,
            detail,
        }
    }

    /// The feed, or words for an unreadable one.
    fn named(&self) -> String {
        self.feed
            .as_ref()
            .map_or_else(|| "an unreadable feed".to_string(), FeedId::to_string)
    }

    /// Checks the signature over the received bytes and that the feed
    /// belongs to `department`; the words for a foreign feed and an altered
    /// batch come from the caller.
    fn open(
        &self,
        batch: SignedBatch,
        department: &DepartmentCode,
        foreign: impl FnOnce(&BatchBody) -> String,
        altered: impl FnOnce(&BatchError) -> String,
    ) -> Incoming {
        let hash = batch.hash();
        match batch.open() {
            Ok(body) if body.feed.department != *department => {
                self.refuse(RejectReason::WrongDepartment, foreign(&body))
            }
            Ok(body) => Incoming::Verified(Box::new(VerifiedBatch {
                signed: batch,
                body,
                hash,
            })),
            Err(e @ BatchError::BadSignature { .. }) => {
                self.refuse(RejectReason::BadSignature, altered(&e))
            }
            Err(e @ BatchError::Malformed(_)) => {
                self.refuse(RejectReason::Malformed, e.to_string())
            }
            Err(e @ BatchError::Invalid { .. }) => {
                self.refuse(RejectReason::InvalidContent, e.to_string())
            }
        }
    }
}

/// Checks the signature and signer of a batch an agent of `department`
/// sent over its own connection (`peer` is the connection's key).
pub fn agent_batch(
    peers: &Peers,
    peer: NodeId,
    department: &DepartmentCode,
    batch: SignedBatch,
) -> Incoming {
    let claimed = Claimed::peek(&batch);
    if peers.get(&batch.signer).is_none() {
        let detail = match peers.revocation(&batch.signer) {
            Some(r) => format!(
                "signer {} was revoked at {}: {}",
                batch.signer, r.at, r.reason
            ),
            None => format!("signer {} is not enrolled", batch.signer),
        };
        return claimed.refuse(RejectReason::UnknownSigner, detail);
    }
    if batch.signer != peer && !peers.same_agent(&batch.signer, &peer) {
        return claimed.refuse(
            RejectReason::UnknownSigner,
            format!(
                "batch signed by {} but sent by {peer}; agents send only their own batches",
                batch.signer
            ),
        );
    }
    claimed.open(
        batch,
        department,
        |body| {
            format!(
                "feed {} belongs to department {}, the signer is enrolled for {department}",
                body.feed, body.feed.department
            )
        },
        ToString::to_string,
    )
}

/// Checks a batch a child hub forwarded: signed by a department key that a
/// hub below the child registered, for a feed of that department, and the
/// signature holds over the bytes as received.
pub fn forwarded_batch(peers: &Peers, child: NodeId, batch: SignedBatch) -> Incoming {
    let claimed = Claimed::peek(&batch);
    let (seq, named) = (claimed.seq, claimed.named());
    let department = match peers.get(&batch.signer) {
        Some(e) if !e.is_hub() && e.via(&batch.signer) == Some(child) => e.department,
        Some(e) if !e.is_hub() => {
            return claimed.refuse(
                RejectReason::UnknownSigner,
                format!(
                    "batch {seq} of {named} forwarded by child hub {child} is signed by {}, a key that does not reach this hub through it ({})",
                    batch.signer,
                    match e.via(&batch.signer) {
                        Some(v) => format!("it is registered below child hub {v}"),
                        None => "it is enrolled directly here".into(),
                    }
                ),
            );
        }
        _ => {
            return claimed.refuse(
                RejectReason::UnknownSigner,
                format!(
                    "batch {seq} of {named} forwarded by child hub {child} is signed by {}, which no hub below it registered",
                    batch.signer
                ),
            );
        }
    };
    claimed.open(
        batch,
        &department,
        |body| {
            format!(
                "batch {} of {} forwarded by child hub {child} is signed by a key of department {department}",
                body.seq, body.feed
            )
        },
        |e| {
            format!(
                "batch {seq} of {named} forwarded by child hub {child} was altered after department {department} signed it: {e}"
            )
        },
    )
}
