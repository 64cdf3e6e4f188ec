//! Chain verification: where a batch stands relative to a feed's head.
//!
//! Invariant: a feed accepts batch `n + 1` only, and only if it links to the
//! hash of batch `n`. Anything else is a gap (batches missing), a replay (a
//! batch already accepted, byte for byte) or a fork (a different batch at a
//! position already taken, or a wrong link).

use serde::{Deserialize, Serialize};

use crate::batch::BatchHash;

/// The head of a feed: the last accepted batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedCursor {
    pub last_seq: u64,
    pub last_hash: BatchHash,
}

impl Default for FeedCursor {
    fn default() -> Self {
        FeedCursor::START
    }
}

/// Why a batch cannot extend the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("replay of batch {seq}, which was already accepted")]
    Replay { seq: u64 },
    #[error("fork at batch {seq}: it does not match the accepted chain")]
    Fork { seq: u64 },
}

impl FeedCursor {
    /// A feed with no batches yet.
    pub const START: FeedCursor = FeedCursor {
        last_seq: 0,
        last_hash: BatchHash::GENESIS,
    };

    /// The sequence number the next batch must have. A head at `u64::MAX`
    /// has none: this saturates (so "resend from" stays a number) and
    /// [`Self::check`] refuses every batch at such a head.
    pub fn next_seq(&self) -> u64 {
        self.last_seq.saturating_add(1)
    }

    /// Decides whether a batch with `seq`, linking to `prev` and hashing to
    /// `hash`, extends this chain. `accepted` looks up the hash of an
    /// already-accepted batch by sequence number (for telling a replay from
    /// a fork); it is only called for `seq <= last_seq`.
    pub fn check(
        &self,
        seq: u64,
        prev: BatchHash,
        hash: BatchHash,
        accepted: impl FnOnce(u64) -> Option<BatchHash>,
    ) -> Result<(), ChainError> {
        let next = self.last_seq.checked_add(1);
        if Some(seq) == next {
            if prev == self.last_hash {
                Ok(())
            } else {
                Err(ChainError::Fork { seq })
            }
        } else if let Some(expected) = next.filter(|&n| seq > n) {
            Err(ChainError::Gap { expected, got: seq })
        } else if accepted(seq) == Some(hash) {
            Err(ChainError::Replay { seq })
        } else {
            Err(ChainError::Fork { seq })
        }
    }

    /// Moves the head to an accepted batch.
    pub fn advance(&mut self, seq: u64, hash: BatchHash) {
        self.last_seq = seq;
        self.last_hash = hash;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let h1 = BatchHash([1; 32]);
        let h2 = BatchHash([2; 32]);
        let mut c = FeedCursor::START;
        assert_eq!(c.check(1, BatchHash::GENESIS, h1, |_| None), Ok(()));
        c.advance(1, h1);
        assert_eq!(
            c.check(2, h2, h2, |_| None),
            Err(ChainError::Fork { seq: 2 })
        );
        assert_eq!(c.check(2, h1, h2, |_| None), Ok(()));
        assert_eq!(
            c.check(4, h1, h2, |_| None),
            Err(ChainError::Gap {
                expected: 2,
                got: 4
            })
        );
        assert_eq!(
            c.check(1, BatchHash::GENESIS, h1, |_| Some(h1)),
            Err(ChainError::Replay { seq: 1 })
        );
        assert_eq!(
            c.check(1, BatchHash::GENESIS, h2, |_| Some(h1)),
            Err(ChainError::Fork { seq: 1 })
        );
    }

    /// Found by the `batch_verify` fuzz target: a head at the last sequence
    /// number overflowed computing the next one (a panic with overflow
    /// checks, a wrap to 0 without). Nothing extends such a head.
    #[test]
    fn a_head_at_the_last_sequence_number_is_not_extended() {
        let h = BatchHash([1; 32]);
        let head = FeedCursor {
            last_seq: u64::MAX,
            last_hash: h,
        };
        assert_eq!(head.next_seq(), u64::MAX);
        assert_eq!(
            head.check(u64::MAX, h, h, |_| Some(h)),
            Err(ChainError::Replay { seq: u64::MAX })
        );
        assert_eq!(
            head.check(u64::MAX, h, h, |_| None),
            Err(ChainError::Fork { seq: u64::MAX })
        );
        assert_eq!(
            head.check(5, h, h, |_| None),
            Err(ChainError::Fork { seq: 5 })
        );
    }
}
