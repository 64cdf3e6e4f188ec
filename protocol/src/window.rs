//! Send/ack bookkeeping of one feed connection, as a sans-IO state machine.
//!
//! The agent's uplink asks [`SendWindow::poll_send`] what to transmit next,
//! feeds it acks and rejections, and prunes its outbox with what
//! [`SendWindow::on_ack`] returns. Time is an argument, never read.
//!
//! Invariants: an outbox entry is released for pruning only by an ack that
//! covers its sequence number; a connection starts sending each feed right
//! after the hub's durable head (from `Welcome`), so after any disconnect
//! nothing is skipped and nothing acked is sent again; at most
//! `max_in_flight` batches per feed are unacknowledged at once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::feed::FeedId;
use crate::message::FeedPosition;
use crate::time::UnixMillis;

/// First pause after a rejection; doubles per consecutive rejection.
pub const REJECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause after rejections.
pub const REJECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The peer said something that contradicts this side's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error(
        "the hub holds {hub_seq} batches of {feed} but this agent only ever sealed {local_head}; the agent's state was lost or replaced"
    )]
    HubAhead {
        feed: FeedId,
        hub_seq: u64,
        local_head: u64,
    },
    #[error("the hub acknowledged batch {seq} of {feed}, but only {sent} were sent")]
    AckBeyondSent { feed: FeedId, seq: u64, sent: u64 },
    #[error(
        "the hub now expects batch {resend_from} of {feed} although it acknowledged {acked}; the hub lost acknowledged data"
    )]
    HubWentBack {
        feed: FeedId,
        resend_from: u64,
        acked: u64,
    },
    #[error("the hub answered about feed {0}, which this connection does not carry")]
    UnknownFeed(FeedId),
}

#[derive(Debug, Clone)]
struct FeedSend {
    /// Highest sequence number durably held by the hub.
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
    /// Starts a connection from the hub's heads (`Welcome`) and the local
    /// outbox heads. Returns the window and, per feed, the sequence number
    /// the outbox may be pruned up to (the hub already holds it durably).
    pub fn start(
        positions: &[FeedPosition],
        local_head: impl Fn(&FeedId) -> u64,
        max_in_flight: u64,
    ) -> Result<(Self, Vec<(FeedId, u64)>), WindowError> {
        let mut window = SendWindow {
            feeds: BTreeMap::new(),
            order: Vec::new(),
            turn: 0,
            max_in_flight: max_in_flight.max(1),
        };
        let prune = window.add(positions, local_head)?;
        Ok((window, prune))
    }

    /// Adds feeds to a running connection from the hub's heads of them (a
    /// later `Welcome`); feeds the window already carries keep their state.
    /// Returns what [`SendWindow::start`] returns for the new feeds; on an
    /// error nothing is added.
    pub fn add(
        &mut self,
        positions: &[FeedPosition],
        local_head: impl Fn(&FeedId) -> u64,
    ) -> Result<Vec<(FeedId, u64)>, WindowError> {
        let fresh: Vec<&FeedPosition> = positions
            .iter()
            .filter(|p| !self.feeds.contains_key(&p.feed))
            .collect();
        for p in &fresh {
            let head = local_head(&p.feed);
            if p.cursor.last_seq > head {
                return Err(WindowError::HubAhead {
                    feed: p.feed.clone(),
                    hub_seq: p.cursor.last_seq,
                    local_head: head,
                });
            }
        }
        let mut prune = Vec::new();
        for p in fresh {
            let hub_seq = p.cursor.last_seq;
            self.feeds.insert(
                p.feed.clone(),
                FeedSend {
                    acked: hub_seq,
                    next: hub_seq + 1,
                    head: local_head(&p.feed),
                    consecutive_rejects: 0,
                    hold_until: None,
                },
            );
            prune.push((p.feed.clone(), hub_seq));
        }
        self.order = self.feeds.keys().cloned().collect();
        Ok(prune)
    }

    /// Whether the window carries `feed`.
    pub fn carries(&self, feed: &FeedId) -> bool {
        self.feeds.contains_key(feed)
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
    pub fn on_ack(&mut self, feed: &FeedId, seq: u64) -> Result<Option<u64>, WindowError> {
        let f = self
            .feeds
            .get_mut(feed)
            .ok_or_else(|| WindowError::UnknownFeed(feed.clone()))?;
        if seq >= f.next {
            return Err(WindowError::AckBeyondSent {
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

    /// Applies a rejection: the hub expects `resend_from` next. Sending of
    /// the feed resumes from there after a backoff that grows with repeated
    /// rejections. Returns the implied ack level when it moved.
    pub fn on_reject(
        &mut self,
        feed: &FeedId,
        resend_from: u64,
        now: UnixMillis,
    ) -> Result<Option<u64>, WindowError> {
        let f = self
            .feeds
            .get_mut(feed)
            .ok_or_else(|| WindowError::UnknownFeed(feed.clone()))?;
        let held = resend_from.saturating_sub(1);
        if held < f.acked {
            return Err(WindowError::HubWentBack {
                feed: feed.clone(),
                resend_from,
                acked: f.acked,
            });
        }
        if held >= f.next {
            return Err(WindowError::AckBeyondSent {
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

    /// The hub's durable head of `feed` as far as this connection knows.
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
    //! A deterministic simulation of sender and receiver (quinn-proto's test
    //! pair idea): a seeded schedule of sealing, delivery, lost connections
    //! (which drop every frame in flight in both directions), slow acks and
    //! agent restarts that forget unpersisted prunes. Whatever the schedule,
    //! the receiver must accept every batch exactly once, in order, and the
    //! outbox must never drop a batch the receiver does not hold.

    use super::*;
    use crate::batch::{BatchBody, BatchHash, Entry, SignedBatch, ZeroUpdate};
    use crate::chain::{ChainError, FeedCursor};
    use crate::identity::NodeKey;
    use std::collections::VecDeque;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    enum ToHub {
        Batch(SignedBatch),
    }
    enum ToAgent {
        Ack(FeedId, u64),
        Reject(FeedId, u64),
    }

    struct Agent {
        key: NodeKey,
        heads: BTreeMap<FeedId, (u64, BatchHash)>,
        outbox: BTreeMap<(FeedId, u64), SignedBatch>,
    }

    impl Agent {
        fn seal(&mut self, feed: &FeedId, now: UnixMillis) {
            let (seq, prev) = self
                .heads
                .get(feed)
                .copied()
                .unwrap_or((0, BatchHash::GENESIS));
            let body = BatchBody {
                feed: feed.clone(),
                seq: seq + 1,
                prev,
                created_at: now,
                entries: vec![Entry::ZeroUpdate(ZeroUpdate {
                    since: now,
                    until: now,
                    source_position: seq.to_string(),
                })],
            };
            let signed = SignedBatch::seal(&self.key, &body).unwrap();
            self.heads.insert(feed.clone(), (seq + 1, signed.hash()));
            self.outbox.insert((feed.clone(), seq + 1), signed);
        }
    }

    /// Per feed: the head, the accepted sequence numbers, their hashes.
    type HubFeed = (FeedCursor, Vec<u64>, BTreeMap<u64, BatchHash>);

    struct Hub {
        feeds: BTreeMap<FeedId, HubFeed>,
        /// After a rejection, batches are dropped until the expected one.
        awaiting: BTreeMap<FeedId, u64>,
    }

    impl Hub {
        fn welcome(&self, feeds: &[FeedId]) -> Vec<FeedPosition> {
            feeds
                .iter()
                .map(|f| FeedPosition {
                    feed: f.clone(),
                    cursor: self.feeds.get(f).map(|x| x.0).unwrap_or_default(),
                })
                .collect()
        }

        fn receive(&mut self, batch: SignedBatch) -> Option<ToAgent> {
            let body = batch.open().unwrap();
            let entry = self.feeds.entry(body.feed.clone()).or_default();
            if let Some(&want) = self.awaiting.get(&body.feed) {
                if body.seq != want {
                    return None;
                }
                self.awaiting.remove(&body.feed);
            }
            let hash = batch.hash();
            match entry
                .0
                .check(body.seq, body.prev, hash, |s| entry.2.get(&s).copied())
            {
                Ok(()) => {
                    entry.0.advance(body.seq, hash);
                    entry.1.push(body.seq);
                    entry.2.insert(body.seq, hash);
                    Some(ToAgent::Ack(body.feed, body.seq))
                }
                Err(
                    ChainError::Gap { .. } | ChainError::Replay { .. } | ChainError::Fork { .. },
                ) => {
                    let next = entry.0.next_seq();
                    self.awaiting.insert(body.feed.clone(), next);
                    Some(ToAgent::Reject(body.feed, next))
                }
            }
        }
    }

    fn simulate(seed: u64) {
        let mut rng = Rng(seed | 1);
        let feeds: Vec<FeedId> = (0..3).map(|i| format!("D:R{i}").parse().unwrap()).collect();
        let mut agent = Agent {
            key: NodeKey::from_seed([9; 32]),
            heads: BTreeMap::new(),
            outbox: BTreeMap::new(),
        };
        let mut hub = Hub {
            feeds: BTreeMap::new(),
            awaiting: BTreeMap::new(),
        };
        let mut now = UnixMillis(0);
        let mut conn: Option<(SendWindow, VecDeque<ToHub>, VecDeque<ToAgent>)> = None;
        let mut sealed_total = 0u64;

        for _step in 0..4000 {
            now = now.saturating_add(Duration::from_millis(rng.next() % 50));
            // The department writes.
            if rng.chance(20) && sealed_total < 600 {
                let f = &feeds[(rng.next() % 3) as usize];
                agent.seal(f, now);
                sealed_total += 1;
                if let Some((w, ..)) = conn.as_mut() {
                    w.set_head(f, agent.heads[f].0);
                }
            }
            // Connect.
            if conn.is_none() && rng.chance(30) {
                hub.awaiting.clear();
                let heads = agent.heads.clone();
                let positions = hub.welcome(&feeds);
                let (w, prune) = SendWindow::start(
                    &positions,
                    |f| heads.get(f).map(|h| h.0).unwrap_or(0),
                    1 + rng.next() % 8,
                )
                .unwrap();
                for (f, upto) in prune {
                    agent.outbox.retain(|(ff, s), _| !(ff == &f && *s <= upto));
                }
                conn = Some((w, VecDeque::new(), VecDeque::new()));
            }
            let Some((window, to_hub, to_agent)) = conn.as_mut() else {
                continue;
            };
            // Transmit what the window allows.
            while let Some((f, seq)) = window.poll_send(now) {
                let batch = agent.outbox.get(&(f.clone(), seq)).cloned();
                let batch = batch.unwrap_or_else(|| panic!("seed {seed}: outbox lost {f} {seq}"));
                to_hub.push_back(ToHub::Batch(batch));
            }
            // Deliver some frames in each direction, in stream order.
            for _ in 0..(rng.next() % 4) {
                if let Some(ToHub::Batch(b)) = to_hub.pop_front()
                    && let Some(reply) = hub.receive(b)
                {
                    to_agent.push_back(reply);
                }
            }
            for _ in 0..(rng.next() % 4) {
                match to_agent.pop_front() {
                    Some(ToAgent::Ack(f, seq)) => {
                        if let Some(upto) = window.on_ack(&f, seq).unwrap() {
                            agent.outbox.retain(|(ff, s), _| !(ff == &f && *s <= upto));
                        }
                    }
                    Some(ToAgent::Reject(f, from)) => {
                        if let Some(upto) = window.on_reject(&f, from, now).unwrap() {
                            agent.outbox.retain(|(ff, s), _| !(ff == &f && *s <= upto));
                        }
                    }
                    None => {}
                }
            }
            // The connection dies, losing everything in flight.
            if rng.chance(2) {
                conn = None;
            }
        }
        // Drain: one clean connection until everything is acknowledged.
        let positions = hub.welcome(&feeds);
        let heads = agent.heads.clone();
        let (mut window, prune) =
            SendWindow::start(&positions, |f| heads.get(f).map(|h| h.0).unwrap_or(0), 4).unwrap();
        for (f, upto) in prune {
            agent.outbox.retain(|(ff, s), _| !(ff == &f && *s <= upto));
        }
        hub.awaiting.clear();
        for _ in 0..10_000 {
            now = now.saturating_add(Duration::from_millis(200));
            while let Some((f, seq)) = window.poll_send(now) {
                let b = agent.outbox[&(f.clone(), seq)].clone();
                match hub.receive(b) {
                    Some(ToAgent::Ack(f, s)) => {
                        if let Some(upto) = window.on_ack(&f, s).unwrap() {
                            agent.outbox.retain(|(ff, s), _| !(ff == &f && *s <= upto));
                        }
                    }
                    Some(ToAgent::Reject(..)) => panic!("seed {seed}: clean link rejected"),
                    None => {}
                }
            }
            if agent.outbox.is_empty() {
                break;
            }
        }
        assert!(agent.outbox.is_empty(), "seed {seed}: outbox not drained");
        for f in &feeds {
            let head = agent.heads.get(f).map(|h| h.0).unwrap_or(0);
            let accepted = hub.feeds.get(f).map(|x| x.1.clone()).unwrap_or_default();
            assert_eq!(
                accepted,
                (1..=head).collect::<Vec<_>>(),
                "seed {seed}: feed {f}"
            );
        }
    }

    #[test]
    fn simulated_links_deliver_every_batch_exactly_once() {
        for seed in 1..=40u64 {
            simulate(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }

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
        assert!(matches!(
            SendWindow::start(&pos, |_| 1, 4),
            Err(WindowError::HubAhead { .. })
        ));
        let (mut w, prune) = SendWindow::start(&pos, |_| 10, 3).unwrap();
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
            Err(WindowError::HubWentBack { .. })
        ));
    }
}
