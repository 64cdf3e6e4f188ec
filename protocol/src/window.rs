//! The send window of one feed connection: per feed, what to transmit next,
//! what is in flight and what the peer acknowledged, as a sans-IO state
//! machine. It is the window inside [`crate::sender::FeedSender`], which the
//! agent's uplink and a hub's upstream link drive; time is an argument,
//! never read.
//!
//! Invariants: a batch is released for pruning only by an ack that covers
//! its sequence number; a connection starts sending each feed right after
//! the peer's durable head (from `Welcome`), so after any disconnect
//! nothing is skipped and nothing acked is sent again; at most
//! `max_in_flight` batches per feed are unacknowledged at once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::feed::FeedId;
use crate::message::FeedPosition;
use crate::sender::SendError;
use crate::time::UnixMillis;

/// First pause after a rejection; doubles per consecutive rejection.
pub const REJECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause after rejections.
pub const REJECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct FeedSend {
    /// Highest sequence number durably held by the peer.
    acked: u64,
    /// Next sequence number to transmit.
    next: u64,
    /// Highest sequence number sealed in the outbox.
    head: u64,
    consecutive_rejects: u32,
    hold_until: Option<UnixMillis>,
}

/// Per-feed send state of one connection.
#[derive(Debug, Clone)]
pub struct SendWindow {
    feeds: BTreeMap<FeedId, FeedSend>,
    order: Vec<FeedId>,
    turn: usize,
    max_in_flight: u64,
}

impl SendWindow {
    /// A window that carries no feed yet.
    pub fn new(max_in_flight: u64) -> Self {
        SendWindow {
            feeds: BTreeMap::new(),
            order: Vec::new(),
            turn: 0,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// Adds feeds from the peer's heads of them (`Welcome`, or a later one)
    /// and this side's heads; feeds the window already carries keep their
    /// state. Returns, per added feed, how far the peer durably holds it
    /// (how far an outbox may be pruned); on an error nothing is added.
    pub fn add(
        &mut self,
        positions: &[FeedPosition],
        local_head: impl Fn(&FeedId) -> u64,
    ) -> Result<Vec<(FeedId, u64)>, SendError> {
        let fresh: Vec<&FeedPosition> = positions
            .iter()
            .filter(|p| !self.feeds.contains_key(&p.feed))
            .collect();
        for p in &fresh {
            let head = local_head(&p.feed);
            if p.cursor.last_seq > head {
                return Err(SendError::PeerAhead {
                    feed: p.feed.clone(),
                    peer_seq: p.cursor.last_seq,
                    local_head: head,
                });
            }
        }
        let mut prune = Vec::new();
        for p in fresh {
            let peer_seq = p.cursor.last_seq;
            self.feeds.insert(
                p.feed.clone(),
                FeedSend {
                    acked: peer_seq,
                    next: peer_seq + 1,
                    head: local_head(&p.feed),
                    consecutive_rejects: 0,
                    hold_until: None,
                },
            );
            prune.push((p.feed.clone(), peer_seq));
        }
        self.order = self.feeds.keys().cloned().collect();
        Ok(prune)
    }

    /// Whether the window carries `feed`.
    pub fn carries(&self, feed: &FeedId) -> bool {
        self.feeds.contains_key(feed)
    }

    /// The feeds the window carries.
    pub fn feeds(&self) -> impl Iterator<Item = &FeedId> {
        self.feeds.keys()
    }

    /// Records that the outbox now holds batches of `feed` up to `head`.
    pub fn set_head(&mut self, feed: &FeedId, head: u64) {
        if let Some(f) = self.feeds.get_mut(feed) {
            f.head = f.head.max(head);
        }
    }

    /// The next batch to transmit, if any may go now. Feeds take turns so a
    /// busy feed cannot starve a quiet one's heartbeat.
    pub fn poll_send(&mut self, now: UnixMillis) -> Option<(FeedId, u64)> {
        let n = self.order.len();
        for i in 0..n {
            let idx = (self.turn + i) % n;
            let feed = &self.order[idx];
            let Some(f) = self.feeds.get_mut(feed) else {
                continue;
            };
            if f.hold_until.is_some_and(|t| now < t) {
                continue;
            }
            f.hold_until = None;
            if f.next <= f.head && f.next - f.acked <= self.max_in_flight {
                let seq = f.next;
                f.next += 1;
                self.turn = (idx + 1) % n;
                return Some((feed.clone(), seq));
            }
        }
        None
    }

    /// Applies a cumulative ack. Returns the new ack level when it moved,
    /// which is how far the outbox may be pruned.
    pub fn on_ack(&mut self, feed: &FeedId, seq: u64) -> Result<Option<u64>, SendError> {
        let f = self
            .feeds
            .get_mut(feed)
            .ok_or_else(|| SendError::UnknownFeed(feed.clone()))?;
        if seq >= f.next {
            return Err(SendError::AckBeyondSent {
                feed: feed.clone(),
                seq,
                sent: f.next - 1,
            });
        }
        f.consecutive_rejects = 0;
        if seq > f.acked {
            f.acked = seq;
            Ok(Some(seq))
        } else {
            Ok(None)
        }
    }

    /// Applies a rejection: the peer expects `resend_from` next. Sending of
    /// the feed resumes from there after a backoff that grows with repeated
    /// rejections. Returns the implied ack level when it moved.
    pub fn on_reject(
        &mut self,
        feed: &FeedId,
        resend_from: u64,
        now: UnixMillis,
    ) -> Result<Option<u64>, SendError> {
        let f = self
            .feeds
            .get_mut(feed)
            .ok_or_else(|| SendError::UnknownFeed(feed.clone()))?;
        let held = resend_from.saturating_sub(1);
        if held < f.acked {
            return Err(SendError::PeerWentBack {
                feed: feed.clone(),
                resend_from,
                acked: f.acked,
            });
        }
        if held >= f.next {
            return Err(SendError::AckBeyondSent {
                feed: feed.clone(),
                seq: held,
                sent: f.next - 1,
            });
        }
        let moved = (held > f.acked).then_some(held);
        f.acked = held;
        f.next = resend_from;
        let shift = f.consecutive_rejects.min(16);
        f.consecutive_rejects = f.consecutive_rejects.saturating_add(1);
        let pause = REJECT_BACKOFF_MIN
            .saturating_mul(1u32 << shift)
            .min(REJECT_BACKOFF_MAX);
        f.hold_until = Some(now.saturating_add(pause));
        Ok(moved)
    }

    /// When a held feed may send again (for the caller's timer).
    pub fn next_wakeup(&self) -> Option<UnixMillis> {
        self.feeds.values().filter_map(|f| f.hold_until).min()
    }

    /// The peer's durable head of `feed` as far as this connection knows.
    pub fn acked(&self, feed: &FeedId) -> Option<u64> {
        self.feeds.get(feed).map(|f| f.acked)
    }

    /// Batches sent and not yet acknowledged, over all feeds.
    pub fn in_flight(&self) -> u64 {
        self.feeds.values().map(|f| f.next - 1 - f.acked).sum()
    }
}

#[cfg(test)]
mod tests {
    //! The window's rules one by one; the simulation of whole links with
    //! loss, reconnects and restarts is in [`crate::sender`].

    use super::*;
    use crate::batch::BatchHash;
    use crate::chain::FeedCursor;

    #[test]
    fn ack_and_reject_rules() {
        let feed: FeedId = "D:R".parse().unwrap();
        let pos = [FeedPosition {
            feed: feed.clone(),
            cursor: FeedCursor {
                last_seq: 2,
                last_hash: BatchHash([1; 32]),
            },
        }];
        let mut w = SendWindow::new(3);
        assert!(matches!(
            w.add(&pos, |_| 1),
            Err(SendError::PeerAhead { .. })
        ));
        assert!(!w.carries(&feed));
        let prune = w.add(&pos, |_| 10).unwrap();
        assert_eq!(prune, vec![(feed.clone(), 2)]);
        let now = UnixMillis(1000);
        assert_eq!(w.poll_send(now), Some((feed.clone(), 3)));
        assert_eq!(w.poll_send(now), Some((feed.clone(), 4)));
        assert_eq!(w.poll_send(now), Some((feed.clone(), 5)));
        assert_eq!(w.poll_send(now), None, "window of 3 is full");
        assert!(w.on_ack(&feed, 6).is_err(), "ack beyond sent");
        assert_eq!(w.on_ack(&feed, 3).unwrap(), Some(3));
        assert_eq!(w.on_ack(&feed, 3).unwrap(), None);
        assert_eq!(w.poll_send(now), Some((feed.clone(), 6)));
        assert_eq!(w.on_reject(&feed, 5, now).unwrap(), Some(4));
        assert_eq!(w.poll_send(now), None, "held after a rejection");
        assert_eq!(
            w.next_wakeup(),
            Some(now.saturating_add(REJECT_BACKOFF_MIN))
        );
        let later = now.saturating_add(Duration::from_secs(1));
        assert_eq!(w.poll_send(later), Some((feed.clone(), 5)));
        assert!(matches!(
            w.on_reject(&feed, 2, later),
            Err(SendError::PeerWentBack { .. })
        ));
    }
}
