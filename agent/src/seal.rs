//! Sealing: turning captured entries into signed, hash-chained batches.
//!
//! Invariant: sequence numbers of a feed increase by one per batch and each
//! batch names the hash of the one before it; the feed's head in
//! [`FeedState`] is advanced only on a copy that the capture loop stores in
//! the same outbox transaction as the batches.

use shuyuan_protocol::batch::{BatchBody, Entry, SignedBatch};
use shuyuan_protocol::encoding::encode;
use shuyuan_protocol::frame::MAX_BATCH_BODY;
use shuyuan_protocol::{FeedId, NodeKey, UnixMillis, Value};

use crate::outbox::FeedState;

/// How big a batch may grow.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_changes: usize,
    pub max_bytes: usize,
}

/// Sealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "batch {seq} of {feed} encodes to {len} bytes, over the {MAX_BATCH_BODY}-byte frame limit; a single row is too large to share"
    )]
    TooLarge { feed: FeedId, seq: u64, len: usize },
    #[error("cannot encode batch {seq} of {feed}: {reason}")]
    Encode {
        feed: FeedId,
        seq: u64,
        reason: String,
    },
}

/// A rough upper estimate of an entry's encoded size, for cutting batches.
fn estimate(entry: &Entry) -> usize {
    fn values(vs: &[Value]) -> usize {
        vs.iter()
            .map(|v| match v {
                Value::Decimal(t)
                | Value::Text(t)
                | Value::Date(t)
                | Value::Time(t)
                | Value::Timestamp(t)
                | Value::TimestampTz(t) => t.len() + 6,
                Value::Bytes(b) => b.len() + 6,
                _ => 10,
            })
            .sum()
    }
    match entry {
        Entry::Change(c) => 8 + values(&c.key) + c.row.as_deref().map_or(0, values),
        Entry::Schema(s) => {
            32 + s
                .columns
                .iter()
                .map(|c| c.name.len() + c.sql_type.len() + 4)
                .sum::<usize>()
        }
        Entry::ZeroUpdate(z) => 32 + z.source_position.len(),
        Entry::Resync(shuyuan_protocol::Resync::Begin { reason, .. }) => 16 + reason.len(),
        Entry::Resync(shuyuan_protocol::Resync::End { .. }) => 24,
        Entry::Checkpoint(_) => 48,
        Entry::RangeDigest(d) => 64 + d.range.lo.len() + d.range.hi.as_ref().map_or(0, Vec::len),
        Entry::RangeRepair(r) => {
            24 + r.range.lo.len()
                + r.range.hi.as_ref().map_or(0, Vec::len)
                + r.rows
                    .iter()
                    .map(|c| 8 + values(&c.key) + c.row.as_deref().map_or(0, values))
                    .sum::<usize>()
        }
    }
}

/// Seals `entries` into as few batches as the limits allow, advancing
/// `state.head`. Returns `(seq, encoded SignedBatch)` per batch.
pub fn seal_entries(
    key: &NodeKey,
    feed: &FeedId,
    state: &mut FeedState,
    entries: Vec<Entry>,
    now: UnixMillis,
    limits: BatchLimits,
) -> Result<Vec<(u64, Vec<u8>)>, SealError> {
    let mut out = Vec::new();
    let mut chunk: Vec<Entry> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut entries = entries.into_iter().peekable();
    while let Some(entry) = entries.next() {
        chunk_bytes += estimate(&entry);
        chunk.push(entry);
        let full = chunk.len() >= limits.max_changes
            || entries
                .peek()
                .is_some_and(|next| chunk_bytes + estimate(next) > limits.max_bytes);
        if full || entries.peek().is_none() {
            out.push(seal_one(key, feed, state, std::mem::take(&mut chunk), now)?);
            chunk_bytes = 0;
        }
    }
    Ok(out)
}

fn seal_one(
    key: &NodeKey,
    feed: &FeedId,
    state: &mut FeedState,
    entries: Vec<Entry>,
    now: UnixMillis,
) -> Result<(u64, Vec<u8>), SealError> {
    let seq = state.head.next_seq();
    let body = BatchBody {
        feed: feed.clone(),
        seq,
        prev: state.head.last_hash,
        created_at: now,
        entries,
    };
    let encode_err = |reason: String| SealError::Encode {
        feed: feed.clone(),
        seq,
        reason,
    };
    let signed = SignedBatch::seal(key, &body).map_err(|e| encode_err(e.to_string()))?;
    if signed.body.len() > MAX_BATCH_BODY {
        return Err(SealError::TooLarge {
            feed: feed.clone(),
            seq,
            len: signed.body.len(),
        });
    }
    let bytes = encode(&signed).map_err(|e| encode_err(e.to_string()))?;
    state.head.advance(seq, signed.hash());
    state.last_batch_at = Some(now);
    Ok((seq, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::encoding::decode;
    use shuyuan_protocol::{BatchHash, Op, RowChange};

    #[test]
    fn splits_by_count_and_size_and_chains() {
        let key = NodeKey::from_seed([4; 32]);
        let feed: FeedId = "D:R".parse().unwrap();
        let mut state = FeedState::default();
        let change = |i: i64, text: usize| {
            Entry::Change(RowChange {
                op: Op::Insert,
                key: vec![Value::Int(i)],
                row: Some(vec![Value::Int(i), Value::Text("x".repeat(text))]),
                schema_version: 1,
            })
        };
        let entries: Vec<Entry> = (0..25).map(|i| change(i, 10)).collect();
        let limits = BatchLimits {
            max_changes: 10,
            max_bytes: 1 << 20,
        };
        let sealed = seal_entries(&key, &feed, &mut state, entries, UnixMillis(5), limits).unwrap();
        assert_eq!(
            sealed.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let mut prev = BatchHash::GENESIS;
        let mut total = 0;
        for (seq, bytes) in &sealed {
            let b: SignedBatch = decode(bytes).unwrap();
            let body = b.open().unwrap();
            assert_eq!(body.seq, *seq);
            assert_eq!(body.prev, prev);
            prev = b.hash();
            total += body.entries.len();
        }
        assert_eq!(total, 25);
        assert_eq!(state.head.last_seq, 3);
        assert_eq!(state.head.last_hash, prev);

        let big: Vec<Entry> = (0..6).map(|i| change(i, 4000)).collect();
        let limits = BatchLimits {
            max_changes: 1000,
            max_bytes: 9000,
        };
        let sealed = seal_entries(&key, &feed, &mut state, big, UnixMillis(6), limits).unwrap();
        assert_eq!(sealed.len(), 3, "two 4 KB rows per 9 KB batch");
        assert_eq!(sealed[0].0, 4);
    }

    #[test]
    fn refuses_rows_over_the_frame_limit() {
        let key = NodeKey::from_seed([4; 32]);
        let feed: FeedId = "D:R".parse().unwrap();
        let mut state = FeedState::default();
        let huge = Entry::Change(RowChange {
            op: Op::Insert,
            key: vec![Value::Int(1)],
            row: Some(vec![
                Value::Int(1),
                Value::Bytes(vec![0; MAX_BATCH_BODY + 1]),
            ]),
            schema_version: 1,
        });
        let limits = BatchLimits {
            max_changes: 10,
            max_bytes: 1 << 20,
        };
        let err =
            seal_entries(&key, &feed, &mut state, vec![huge], UnixMillis(1), limits).unwrap_err();
        assert!(matches!(err, SealError::TooLarge { seq: 1, .. }));
        assert_eq!(state.head.last_seq, 0, "nothing advanced");
    }
}
