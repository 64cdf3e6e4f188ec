//! Signed, hash-chained batches: the unit of a feed.
//!
//! A batch is the canonical postcard encoding of a [`BatchBody`] plus the
//! signer's ed25519 signature over `BATCH_SIGNATURE_CONTEXT || body`. The
//! exact body bytes are what is signed, stored in the outbox, sent, verified
//! and hashed; the receiver verifies the bytes it received before decoding
//! them. Each body names the hash of the previous batch of its feed, so the
//! feed is a chain: changing, dropping or reordering any batch breaks it.
//!
//! Invariant: a batch is either a non-empty list of schema, row-change,
//! re-read, checkpoint and range entries, or one zero-update entry that may
//! be followed by one checkpoint.

use std::fmt;

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::change::{Op, RowChange, TableSchema};
use crate::digest::{DigestSummary, KeyRange};
use crate::encoding::{self, DecodeError, EncodeError};
use crate::feed::FeedId;
use crate::identity::{NodeId, NodeKey};
use crate::time::UnixMillis;

/// Context string of batch signatures.
pub const BATCH_SIGNATURE_CONTEXT: &[u8] = b"shuyuan/v1/batch-signature\0";
/// Context string of batch hashes.
pub const BATCH_HASH_CONTEXT: &[u8] = b"shuyuan/v1/batch-hash\0";

/// The blake3 hash that links a batch to its predecessor.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchHash(pub [u8; 32]);

impl BatchHash {
    /// The `prev` of a feed's first batch.
    pub const GENESIS: BatchHash = BatchHash([0; 32]);

    /// Hashes a batch body's bytes.
    pub fn of_body(body: &[u8]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(BATCH_HASH_CONTEXT);
        h.update(body);
        BatchHash(*h.finalize().as_bytes())
    }
}

impl fmt::Display for BatchHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::value::hex(&self.0))
    }
}

impl fmt::Debug for BatchHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BatchHash({})", &self.to_string()[..16])
    }
}

/// The signed content of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchBody {
    pub feed: FeedId,
    /// 1 for a feed's first batch, then +1 per batch, with no gaps.
    pub seq: u64,
    /// Hash of batch `seq - 1`, or [`BatchHash::GENESIS`] for `seq == 1`.
    pub prev: BatchHash,
    /// When the agent sealed the batch.
    pub created_at: UnixMillis,
    pub entries: Vec<Entry>,
}

/// One entry of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A new table shape; row changes after it use its version.
    Schema(TableSchema),
    Change(RowChange),
    /// 零更新: the resource had no changes in `since..until`.
    ZeroUpdate(ZeroUpdate),
    /// The source re-reads the resource from scratch (initial load, a
    /// requested resync, or repair after a lost capture position).
    Resync(Resync),
    /// The sender's digest of the feed's rows after every entry before this
    /// one: the receiver compares it with its own.
    Checkpoint(DigestSummary),
    /// The digest of the source's rows in a key range, read at this point of
    /// the feed (an answer to a verification request, or a step of a full
    /// scan).
    RangeDigest(RangeDigest),
    /// The source's rows in a key range, read at this point of the feed:
    /// the receiver makes its rows in the range exactly these.
    RangeRepair(RangeRepair),
}

/// The source's digest of one key range at one point of the feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDigest {
    /// The verification this answers.
    pub run: u64,
    pub range: KeyRange,
    /// Rows under the current table shape.
    pub digest: DigestSummary,
}

/// The source's rows of one key range at one point of the feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRepair {
    pub run: u64,
    pub range: KeyRange,
    /// Every row of the range, as upserts under the current table shape.
    pub rows: Vec<RowChange>,
}

/// Marks around a full re-read of a resource. Between `Begin` and the `End`
/// with the same id, every row that exists in the source is written by some
/// change entry (a re-read row or a live change); at `End` the receiver
/// deletes the rows of the resource that no entry wrote since `Begin`, which
/// removes rows deleted at the source while capture could not see them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resync {
    Begin {
        id: u64,
        /// Why, in words for the administrator ("initial load", "replication
        /// slot lost: ...", "requested by the operator").
        reason: String,
    },
    End {
        id: u64,
        /// How many rows the re-read itself sent.
        rows: u64,
    },
}

/// A signed statement that a resource had no changes in a period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZeroUpdate {
    /// Start of the quiet period: the previous batch of the feed (or the
    /// start of capture).
    pub since: UnixMillis,
    /// End of the quiet period: when the source was last read.
    pub until: UnixMillis,
    /// The capture position the source was read up to, in the connector's
    /// text form (for SQLite, the change-table id).
    pub source_position: String,
}

/// A batch whose structure breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("signature does not verify against signer {signer}")]
    BadSignature { signer: NodeId },
    #[error("batch body cannot be decoded: {0}")]
    Malformed(#[from] DecodeError),
    #[error("batch {seq} of {feed}: {reason}")]
    Invalid {
        feed: FeedId,
        seq: u64,
        reason: &'static str,
    },
}

impl BatchBody {
    /// Checks the structural rules of a body.
    pub fn validate(&self) -> Result<(), BatchError> {
        let invalid = |reason| {
            Err(BatchError::Invalid {
                feed: self.feed.clone(),
                seq: self.seq,
                reason,
            })
        };
        if self.seq == 0 {
            return invalid("sequence numbers start at 1");
        }
        if self.seq == 1 && self.prev != BatchHash::GENESIS {
            return invalid("the first batch must link to the genesis hash");
        }
        if self.entries.is_empty() {
            return invalid("a batch must have at least one entry");
        }
        let zero_updates = self
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::ZeroUpdate(_)))
            .count();
        let heartbeat = matches!(
            self.entries.as_slice(),
            [Entry::ZeroUpdate(_)] | [Entry::ZeroUpdate(_), Entry::Checkpoint(_)]
        );
        if zero_updates > 0 && !heartbeat {
            return invalid(
                "a zero-update must be the only entry of its batch (with at most a checkpoint)",
            );
        }
        for entry in &self.entries {
            match entry {
                Entry::RangeDigest(RangeDigest { range, .. }) if range.is_empty() => {
                    return invalid("a range digest covers an empty key range");
                }
                Entry::RangeRepair(r) if r.range.is_empty() => {
                    return invalid("a range repair covers an empty key range");
                }
                Entry::RangeRepair(r)
                    if r.rows.iter().any(|c| c.op == Op::Delete || c.row.is_none()) =>
                {
                    return invalid("a range repair carries rows, not deletions");
                }
                _ => {}
            }
        }
        if let Some(Entry::ZeroUpdate(z)) = self.entries.first()
            && z.since > z.until
        {
            return invalid("a zero-update period must not end before it starts");
        }
        Ok(())
    }

    /// The zero-update this batch carries, if it is a heartbeat.
    pub fn zero_update(&self) -> Option<&ZeroUpdate> {
        match self.entries.as_slice() {
            [Entry::ZeroUpdate(z)] | [Entry::ZeroUpdate(z), Entry::Checkpoint(_)] => Some(z),
            _ => None,
        }
    }

    /// The row changes of the batch.
    pub fn changes(&self) -> impl Iterator<Item = &RowChange> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Change(c) => Some(c),
            _ => None,
        })
    }
}

/// A body's exact bytes with the signer's signature over them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBatch {
    pub body: Vec<u8>,
    pub signer: NodeId,
    pub signature: Signature,
}

impl SignedBatch {
    /// Encodes and signs `body`.
    pub fn seal(key: &NodeKey, body: &BatchBody) -> Result<Self, EncodeError> {
        let bytes = encoding::encode(body)?;
        let signature = key.sign(BATCH_SIGNATURE_CONTEXT, &bytes);
        Ok(SignedBatch {
            body: bytes,
            signer: key.id(),
            signature,
        })
    }

    /// Verifies the signature over the received bytes, then decodes and
    /// validates the body. Nothing is decoded before the signature holds.
    pub fn open(&self) -> Result<BatchBody, BatchError> {
        if !self
            .signer
            .verify(BATCH_SIGNATURE_CONTEXT, &self.body, &self.signature)
        {
            return Err(BatchError::BadSignature {
                signer: self.signer,
            });
        }
        let body: BatchBody = encoding::decode(&self.body)?;
        body.validate()?;
        Ok(body)
    }

    /// The hash the next batch of the feed must name as `prev`.
    pub fn hash(&self) -> BatchHash {
        BatchHash::of_body(&self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Column, Op};
    use crate::value::Value;

    pub(crate) fn sample_body(seq: u64, prev: BatchHash) -> BatchBody {
        BatchBody {
            feed: "DEPT1:RES1".parse().unwrap(),
            seq,
            prev,
            created_at: UnixMillis(1_795_219_200_000),
            entries: vec![
                Entry::Schema(TableSchema {
                    version: 1,
                    table: "t".into(),
                    columns: vec![
                        Column {
                            name: "id".into(),
                            sql_type: "INTEGER".into(),
                            nullable: false,
                        },
                        Column {
                            name: "v".into(),
                            sql_type: "TEXT".into(),
                            nullable: true,
                        },
                    ],
                    key: vec![0],
                }),
                Entry::Change(RowChange {
                    op: Op::Insert,
                    key: vec![Value::Int(1)],
                    row: Some(vec![Value::Int(1), Value::Text("一".into())]),
                    schema_version: 1,
                }),
            ],
        }
    }

    #[test]
    fn seal_and_open() {
        let key = NodeKey::from_seed([3; 32]);
        let body = sample_body(1, BatchHash::GENESIS);
        let signed = SignedBatch::seal(&key, &body).unwrap();
        assert_eq!(signed.open().unwrap(), body);
        assert_eq!(signed.hash(), BatchHash::of_body(&signed.body));
    }

    #[test]
    fn every_flipped_body_bit_is_caught() {
        let key = NodeKey::from_seed([3; 32]);
        let signed = SignedBatch::seal(&key, &sample_body(1, BatchHash::GENESIS)).unwrap();
        for i in 0..signed.body.len() {
            let mut bad = signed.clone();
            bad.body[i] ^= 0x01;
            assert!(
                matches!(bad.open(), Err(BatchError::BadSignature { .. })),
                "byte {i}"
            );
        }
    }

    #[test]
    fn structural_rules() {
        let mut body = sample_body(1, BatchHash([1; 32]));
        assert!(body.validate().is_err(), "first batch must link to genesis");
        body.prev = BatchHash::GENESIS;
        body.entries.push(Entry::ZeroUpdate(ZeroUpdate {
            since: UnixMillis(0),
            until: UnixMillis(1),
            source_position: "0".into(),
        }));
        assert!(body.validate().is_err(), "zero-update must be alone");
        body.entries.clear();
        assert!(body.validate().is_err(), "empty batch");
        body.entries.push(Entry::ZeroUpdate(ZeroUpdate {
            since: UnixMillis(5),
            until: UnixMillis(1),
            source_position: "0".into(),
        }));
        assert!(body.validate().is_err(), "backwards period");
    }
}
