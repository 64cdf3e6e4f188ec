//! Acks from the hub, turned into feed states and outbox pruning.
//!
//! Invariant: an outbox entry is pruned only by the commit that records the
//! ack covering it; acks stay pending until a commit that holds them is
//! built, and an ack that prunes nothing is old news.

use std::collections::BTreeMap;

use shuyuan_protocol::FeedId;

use super::AckNote;
use crate::outbox::FeedState;

/// Applies acks to feed states; returns what they let the outbox prune.
pub(super) fn apply_acks(
    feeds: &mut [(FeedId, FeedState)],
    acks: &[AckNote],
) -> Vec<(FeedId, u64)> {
    let mut prune: BTreeMap<usize, u64> = BTreeMap::new();
    for note in acks {
        if let Some(i) = feeds.iter().position(|(f, _)| *f == note.feed) {
            let state = &mut feeds[i].1;
            if note.seq > state.acked {
                state.acked = note.seq;
                state.last_ack_at = Some(note.at);
                prune.insert(i, note.seq);
            }
        }
    }
    prune
        .iter()
        .map(|(&i, &seq)| (feeds[i].0.clone(), seq))
        .collect()
}

/// The feed states of `new` that differ from `old`.
pub(super) fn changed_feeds(
    new: &[(FeedId, FeedState)],
    old: &[(FeedId, FeedState)],
) -> Vec<(FeedId, FeedState)> {
    new.iter()
        .zip(old)
        .filter(|(new, old)| new.1 != old.1)
        .map(|(new, _)| new.clone())
        .collect()
}
