//! The versioned message envelope spoken on a feed connection.
//!
//! The ALPN names the protocol generation (`shuyuan/1`); inside it, every
//! message is wrapped in [`Message::V1`], so a later generation can add
//! `V2` without guessing. A conversation is:
//!
//! ```text
//! agent -> hub   Hello    (department, resources)
//! hub   -> agent Welcome  (the hub's head of each feed)
//! agent -> hub   Batch... (from each feed's head + 1, pipelined)
//! hub   -> agent Ack      (cumulative: every batch up to seq is durable)
//!              | Reject   (reason code, and where to resend from)
//! agent -> hub   Report   (outbox backlog, now and then)
//! both ways      Catalog  (automerge sync messages of the department's
//!                          catalog, until neither side has more to say)
//! hub   -> agent CatalogRefused (a catalog message was not applied, why)
//! hub   -> agent Verify   (send the source's digests, or rows, of a key
//!                          range as feed entries)
//! hub   -> agent Verified (how a verification of a resource ended)
//! agent -> hub   VerifyRefused (the source cannot be compared, why)
//! ```
//!
//! A child hub speaks the same protocol to its parent, starting with
//! `HubHello` instead of `Hello`; see [`crate::federation`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::batch::SignedBatch;
use crate::chain::FeedCursor;
use crate::digest::KeyRange;
use crate::federation::{HubHello, HubReport, Registration};
use crate::feed::{DepartmentCode, FeedId, ResourceCode};
use crate::rotation::{KeyRotated, KeyRotation};
use crate::time::UnixMillis;

/// The TLS application protocol of this generation of the feed protocol.
pub const ALPN: &[u8] = b"shuyuan/1";

/// The envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    V1(MessageV1),
}

/// Messages of protocol version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageV1 {
    Hello(Hello),
    Welcome(Welcome),
    Batch(SignedBatch),
    Ack(Ack),
    Reject(Reject),
    Report(AgentReport),
    Catalog(CatalogSync),
    CatalogRefused(CatalogRefusal),
    Verify(VerifyRequest),
    Verified(VerifyOutcome),
    VerifyRefused(VerifyRefusal),
    /// A child hub's introduction (instead of `Hello`).
    HubHello(HubHello),
    /// A child hub forwards more feeds; answered by `Welcome`.
    Feeds(Vec<FeedId>),
    /// A key enrolled below, signed by the hub that enrolled it.
    Registration(Registration),
    /// A child hub's subtree, for the parent's console and loop check.
    Tree(HubReport),
    /// An agent announces its next key, signed by both keys.
    KeyRotation(KeyRotation),
    /// The hub recorded the rotation.
    KeyRotated(KeyRotated),
}

/// The agent cannot answer a verification request (the connector cannot
/// compare this table, for example its key type sorts differently at the
/// source); the hub ends the run as not verifiable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRefusal {
    pub feed: FeedId,
    pub run: u64,
    pub reason: String,
}

/// The hub asks the agent to compare a key range of a resource with the
/// source. The answer is a run of [`crate::RangeDigest`] or
/// [`crate::RangeRepair`] entries in the feed that cover `range` in key
/// order, each read at the point of the feed where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    pub feed: FeedId,
    pub run: u64,
    pub range: KeyRange,
    pub mode: VerifyMode,
}

/// How to cover the requested range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyMode {
    /// A full comparison: consecutive ranges of at most `chunk_rows` source
    /// rows each, read at the agent's configured pace.
    Scan { chunk_rows: u32 },
    /// Localise a range known to differ: `parts` ranges of about equal row
    /// counts; a range of at most `leaf_rows` source rows is sent as its rows
    /// (a repair) instead of a digest.
    Split { parts: u16, leaf_rows: u16 },
}

/// How a verification of a resource ended at the hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyOutcome {
    pub feed: FeedId,
    pub run: u64,
    /// The copy equals the source (after any repair).
    pub verified: bool,
    /// The feed sequence at which it ended.
    pub seq: u64,
    pub ranges_compared: u64,
    pub ranges_differing: u64,
    pub rows_repaired: u64,
    pub rows_removed: u64,
    /// Bytes of range entries the hub received and requests it sent.
    pub bytes_exchanged: u64,
    pub detail: String,
    /// The agent could not compare the resource: the run proves nothing.
    pub refused: bool,
}

/// One automerge sync message of a department's catalog document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogSync {
    pub department: DepartmentCode,
    /// `automerge::sync::Message::encode()` bytes.
    pub message: Vec<u8>,
}

/// The hub did not apply a catalog sync message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRefusal {
    pub department: DepartmentCode,
    pub reason: RejectReason,
    pub detail: String,
}

impl MessageV1 {
    /// The message's name, for logs and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            MessageV1::Hello(_) => "Hello",
            MessageV1::Welcome(_) => "Welcome",
            MessageV1::Batch(_) => "Batch",
            MessageV1::Ack(_) => "Ack",
            MessageV1::Reject(_) => "Reject",
            MessageV1::Report(_) => "Report",
            MessageV1::Catalog(_) => "Catalog",
            MessageV1::CatalogRefused(_) => "CatalogRefused",
            MessageV1::Verify(_) => "Verify",
            MessageV1::Verified(_) => "Verified",
            MessageV1::VerifyRefused(_) => "VerifyRefused",
            MessageV1::HubHello(_) => "HubHello",
            MessageV1::Feeds(_) => "Feeds",
            MessageV1::Registration(_) => "Registration",
            MessageV1::Tree(_) => "Tree",
            MessageV1::KeyRotation(_) => "KeyRotation",
            MessageV1::KeyRotated(_) => "KeyRotated",
        }
    }
}

impl From<MessageV1> for Message {
    fn from(m: MessageV1) -> Self {
        Message::V1(m)
    }
}

/// The agent introduces itself after the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub software: String,
    pub department: DepartmentCode,
    pub resources: Vec<ResourceCode>,
}

/// The hub answers `Hello` with what it already holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub software: String,
    /// One entry per resource named in `Hello`; a feed the hub has never
    /// seen is at [`FeedCursor::START`].
    pub feeds: Vec<FeedPosition>,
}

/// The hub's head of one feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedPosition {
    pub feed: FeedId,
    pub cursor: FeedCursor,
}

/// Every batch of `feed` up to and including `seq` is durably applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub feed: FeedId,
    pub seq: u64,
}

/// A batch was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The feed, when the hub could tell which one.
    pub feed: Option<FeedId>,
    /// The refused batch's sequence number as it claimed (0 if unknown).
    pub seq: u64,
    pub reason: RejectReason,
    /// Human-readable detail for the operator's log.
    pub detail: String,
    /// The sequence number the hub expects next on this feed.
    pub resend_from: u64,
}

/// The agent's backlog, reported so the hub can show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub at: UnixMillis,
    pub outbox_batches: u64,
    pub outbox_bytes: u64,
    pub outbox_limit_bytes: u64,
    /// Capture is paused because the outbox is full.
    pub capture_paused: bool,
}

/// Why a batch or connection was refused. Each reason has a stable numeric
/// code on the wire; codes a peer does not know decode as `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum RejectReason {
    /// The bytes are not a valid message or batch.
    Malformed,
    /// The signature does not verify.
    BadSignature,
    /// The signer is not enrolled at this hub.
    UnknownSigner,
    /// The signer is enrolled, but for another department than the feed's.
    WrongDepartment,
    /// Batches are missing before this one.
    Gap,
    /// The batch conflicts with the accepted chain.
    Fork,
    /// The batch was already accepted.
    Replay,
    /// The entries do not fit the feed's schema or rules.
    InvalidContent,
    /// The frame exceeds the size limit.
    TooLarge,
    /// The hub could not store the batch now; send it again later.
    Unavailable,
    /// A message arrived out of turn.
    ProtocolViolation,
    /// Catalog changes write fields the sender does not own.
    NotOwner,
    /// A code this build does not know.
    Unknown(u16),
}

impl RejectReason {
    /// The stable wire code.
    pub fn code(self) -> u16 {
        match self {
            RejectReason::Malformed => 1,
            RejectReason::BadSignature => 2,
            RejectReason::UnknownSigner => 3,
            RejectReason::WrongDepartment => 4,
            RejectReason::Gap => 5,
            RejectReason::Fork => 6,
            RejectReason::Replay => 7,
            RejectReason::InvalidContent => 8,
            RejectReason::TooLarge => 9,
            RejectReason::Unavailable => 10,
            RejectReason::ProtocolViolation => 11,
            RejectReason::NotOwner => 12,
            RejectReason::Unknown(c) => c,
        }
    }

    /// A short stable name for logs, metrics and the audit table.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::UnknownSigner => "unknown_signer",
            RejectReason::WrongDepartment => "wrong_department",
            RejectReason::Gap => "gap",
            RejectReason::Fork => "fork",
            RejectReason::Replay => "replay",
            RejectReason::InvalidContent => "invalid_content",
            RejectReason::TooLarge => "too_large",
            RejectReason::Unavailable => "unavailable",
            RejectReason::ProtocolViolation => "protocol_violation",
            RejectReason::NotOwner => "not_owner",
            RejectReason::Unknown(_) => "unknown",
        }
    }
}

impl From<u16> for RejectReason {
    fn from(code: u16) -> Self {
        match code {
            1 => RejectReason::Malformed,
            2 => RejectReason::BadSignature,
            3 => RejectReason::UnknownSigner,
            4 => RejectReason::WrongDepartment,
            5 => RejectReason::Gap,
            6 => RejectReason::Fork,
            7 => RejectReason::Replay,
            8 => RejectReason::InvalidContent,
            9 => RejectReason::TooLarge,
            10 => RejectReason::Unavailable,
            11 => RejectReason::ProtocolViolation,
            12 => RejectReason::NotOwner,
            c => RejectReason::Unknown(c),
        }
    }
}

impl From<RejectReason> for u16 {
    fn from(r: RejectReason) -> u16 {
        r.code()
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_stable() {
        for code in 0..20u16 {
            assert_eq!(RejectReason::from(code).code(), code);
        }
        assert_eq!(RejectReason::Replay.code(), 7);
        let bytes = crate::encoding::encode(&RejectReason::Gap).unwrap();
        assert_eq!(bytes, vec![5]);
    }
}
