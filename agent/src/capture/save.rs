//! Saving a commit: the outbox transaction that makes a step durable, and
//! what the loop adopts once it is.
//!
//! Invariant: when a commit fails (a full disk), nothing it would change is
//! adopted (not the feed states, the digests or the position), and the
//! same commit is written again before the source is read any further;
//! acks that came meanwhile are committed first, on their own.

use shuyuan_protocol::{FeedId, UnixMillis};

use super::acks::{apply_acks, changed_feeds};
use super::{CaptureError, CaptureLoop};
use crate::outbox::{Commit, FeedDigest, FeedState};

/// A commit built from a source read that did not reach the outbox (a
/// full disk). The source has already moved past that read (reported its
/// table shapes, answered probes, streamed the log), so reading it again
/// would not give the same entries: the commit is kept and written again
/// as it is, and what it makes current is adopted only once it is durable.
#[derive(Debug)]
pub(super) struct Unsaved {
    pub(super) commit: Commit,
    /// Every feed's state after the commit.
    pub(super) feeds: Vec<(FeedId, FeedState)>,
    /// Every feed's digest after the commit, and the feeds that carried a
    /// checkpoint.
    pub(super) digests: Option<(Vec<FeedDigest>, Vec<usize>)>,
    /// More changes were waiting after the read.
    pub(super) more: bool,
}

impl CaptureLoop {
    /// Commits the acks of a step whose read failed, so the outbox still
    /// drains while the source is unreadable.
    pub(super) fn save_acks(
        &mut self,
        mut commit: Commit,
        feeds: Vec<(FeedId, FeedState)>,
        now: UnixMillis,
    ) -> Result<(), CaptureError> {
        if !commit.prune.is_empty() {
            commit.feeds = changed_feeds(&feeds, &self.feeds);
            self.pending_acks.clear();
            let unsaved = Unsaved {
                commit,
                feeds,
                digests: None,
                more: false,
            };
            self.save(unsaved, now)?;
        }
        Ok(())
    }

    /// Writes a commit and makes what it holds current; if the write fails,
    /// keeps it to be written again and changes nothing else.
    pub(super) fn save(&mut self, unsaved: Unsaved, now: UnixMillis) -> Result<bool, CaptureError> {
        match self.outbox.commit(&unsaved.commit) {
            Ok(totals) => self.totals = totals,
            Err(e) => {
                self.unsaved = Some(unsaved);
                return Err(e.into());
            }
        }
        let Unsaved {
            commit,
            feeds,
            digests,
            more,
        } = unsaved;
        self.feeds = feeds;
        if let Some((digests, checkpointed)) = digests {
            self.digests = digests;
            for i in checkpointed {
                self.last_checkpoint[i] = Some(now);
            }
        }
        if !commit.appended.is_empty() {
            self.sealed.notify_one();
        }
        if let Some(p) = commit.position {
            self.position = p;
            self.try_release(now);
        }
        Ok(more)
    }

    /// Writes a commit that failed before. Acks that came meanwhile are
    /// committed first, on their own: on a full disk, the pages they free
    /// may be just what the waiting batches need.
    pub(super) fn save_again(
        &mut self,
        mut unsaved: Unsaved,
        now: UnixMillis,
    ) -> Result<bool, CaptureError> {
        let mut feeds = self.feeds.clone();
        let prune = apply_acks(&mut feeds, &self.pending_acks);
        if !prune.is_empty() {
            let acks = Commit {
                prune,
                feeds: changed_feeds(&feeds, &self.feeds),
                ..Commit::default()
            };
            match self.outbox.commit(&acks) {
                Ok(totals) => self.totals = totals,
                Err(e) => {
                    self.unsaved = Some(unsaved);
                    return Err(e.into());
                }
            }
            apply_acks(&mut unsaved.feeds, &self.pending_acks);
            self.feeds = feeds;
            unsaved.commit.feeds = changed_feeds(&unsaved.feeds, &self.feeds);
        }
        self.pending_acks.clear();
        self.save(unsaved, now)
    }
}
