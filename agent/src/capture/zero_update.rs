//! Zero-updates (零更新): a resource whose update cycle passed in silence
//! gets a signed "no changes from T0 to T1, source read up to P" in its
//! feed, so the hub can tell a quiet source from a dead one.
//!
//! Invariant: a zero-update is sealed only from a read that saw every
//! pending change (and after the feed's first shape), so it never claims
//! "no changes" while changes wait. The catalog's update cycle is the one
//! in force.

use shuyuan_protocol::UnixMillis;
use shuyuan_protocol::batch::{Entry, ZeroUpdate};

use super::CaptureLoop;
use crate::outbox::FeedState;

impl CaptureLoop {
    /// The zero-update resource `i` is due, if any, from a read that found
    /// nothing for it; records it in the feed's state.
    pub(super) fn zero_update(
        &self,
        i: usize,
        state: &mut FeedState,
        complete: bool,
        position: &str,
        now: UnixMillis,
    ) -> Option<Entry> {
        if !complete || state.schema.is_none() {
            return None;
        }
        let resource = &self.config.resources[i];
        let cycle = self
            .catalog
            .update_cycle(&resource.code)
            .unwrap_or(resource.update_cycle);
        match state.last_batch_at {
            Some(last) if now >= last.saturating_add(resource.heartbeat_under(cycle)) => {
                state.last_zero_update_at = Some(now);
                Some(Entry::ZeroUpdate(ZeroUpdate {
                    since: last,
                    until: now,
                    // In the connector's words (for PostgreSQL, the log
                    // position).
                    source_position: self.source.report(position).position,
                }))
            }
            _ => None,
        }
    }
}
