//! Releasing the source: deleting the source's record of changes (for
//! SQLite, change-table rows; for PostgreSQL, moving the slot) that are
//! durable in the outbox.
//!
//! Invariant: the source is released only up to the committed position,
//! so a change is forgotten by the source only after the outbox
//! transaction covering it committed; a release that fails only delays the
//! deletion.

use std::time::Duration;

use shuyuan_protocol::UnixMillis;

use super::{CaptureError, CaptureLoop};

/// The shortest time between two deletions from the source's change table.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(1);

impl CaptureLoop {
    /// Deletes the source's record of changes that are durable in the
    /// outbox (including those an earlier run committed but did not get to
    /// delete). Each release is a write on the department's database, so it
    /// happens at most every [`RELEASE_INTERVAL`] to stay out of the way of
    /// the department's own writers.
    fn release_if_due(&mut self, now: UnixMillis) -> Result<(), CaptureError> {
        let behind = self.released.as_deref() != Some(self.position.as_str());
        let due = self
            .last_release
            .is_none_or(|t| now.since(t) >= RELEASE_INTERVAL);
        if behind && due {
            self.source.release(&self.position)?;
            self.released = Some(self.position.clone());
            self.last_release = Some(now);
        }
        Ok(())
    }

    /// Releases what is due; a failure (say, a department transaction holds
    /// the write lock) only delays the deletion, so capture goes on.
    pub(super) fn try_release(&mut self, now: UnixMillis) {
        if let Err(e) = self.release_if_due(now) {
            tracing::warn!(error = %e, "cannot delete sent changes from the change table yet; will retry");
        }
    }
}
