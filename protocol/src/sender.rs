//! The sending side of a feed connection, as a sans-IO state machine: the
//! one that the agent's uplink and a hub's upstream link both drive.
//!
//! A driver (`shuyuan-link`'s client) dials, says hello and reads the
//! peer's `Welcome`; it looks up what this side holds of each feed at the
//! peer's head ([`LocalFeed`], from the agent's outbox or the hub's store)
//! and starts a [`FeedSender`] with both. From then on it asks the machine
//! what to send ([`FeedSender::poll_send`], [`FeedSender::next_catalog`]),
//! hands it the peer's acks and rejections and carries out what they
//! return. Time is an argument, never read.
//!
//! Invariants: nothing is sent on a feed until the peer's head of it was
//! found to be a batch of this side's own chain (a peer ahead of this side,
//! a fork and a peer behind a batch already pruned here each stop the
//! connection with their own error); a batch is released for pruning only
//! by an ack, or a rejection's resend point, that covers it; after any
//! reconnect each feed resumes right after the peer's durable head, so
//! nothing is skipped and nothing acknowledged is sent again (the
//! [`SendWindow`] inside).

use std::collections::{BTreeMap, BTreeSet};

use crate::batch::BatchHash;
use crate::feed::{DepartmentCode, FeedId};
use crate::message::{FeedPosition, Reject, RejectReason};
use crate::time::UnixMillis;
use crate::window::SendWindow;

/// Which link a sender serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent sends the batches it sealed to its hub and prunes its
    /// outbox on the hub's acks. It sends nothing the hub may refuse
    /// without naming a feed, so such a refusal ends the connection.
    Agent,
    /// A hub forwards the batches it stores to its parent hub and never
    /// prunes. The parent may refuse a registration (no feed) and the
    /// connection goes on; feeds can join a running connection (`Feeds`,
    /// answered by a later `Welcome`).
    Upstream,
}

impl Role {
    /// What the peer is, in operators' texts.
    pub fn peer(self) -> &'static str {
        match self {
            Role::Agent => "hub",
            Role::Upstream => "parent hub",
        }
    }

    /// Where this side keeps the batches it sends, in operators' texts.
    pub fn store(self) -> &'static str {
        match self {
            Role::Agent => "the outbox",
            Role::Upstream => "this hub's store",
        }
    }
}

fn fork_text(role: Role, feed: &FeedId, seq: u64) -> String {
    match role {
        Role::Agent => format!(
            "the hub's chain of {feed} differs from this agent's at batch {seq}; this agent's data directory was probably replaced. \
             Sending stopped to avoid a fork; ask the hub administrator"
        ),
        Role::Upstream => format!(
            "the parent's chain of {feed} differs from this hub's at batch {seq}: one of the two stores was replaced or altered. \
             Forwarding stopped to avoid a fork; compare with the parent's administrator"
        ),
    }
}

/// The peer said something that contradicts this side's state; sending on
/// could only lose data or make a fork.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error(
        "the hub holds {peer_seq} batches of {feed} but this agent only ever sealed {local_head}; the agent's state was lost or replaced"
    )]
    PeerAhead {
        feed: FeedId,
        peer_seq: u64,
        local_head: u64,
    },
    #[error("the hub acknowledged batch {seq} of {feed}, but only {sent} were sent")]
    AckBeyondSent { feed: FeedId, seq: u64, sent: u64 },
    #[error(
        "the hub now expects batch {resend_from} of {feed} although it acknowledged {acked}; the hub lost acknowledged data"
    )]
    PeerWentBack {
        feed: FeedId,
        resend_from: u64,
        acked: u64,
    },
    #[error("the hub answered about feed {0}, which this connection does not carry")]
    UnknownFeed(FeedId),
    /// The peer's head is behind a batch this side already pruned (only an
    /// agent prunes).
    #[error(
        "the hub holds {peer_seq} batches of {feed} but this agent already pruned batch {}; the hub lost acknowledged data",
        .peer_seq.saturating_add(1)
    )]
    Pruned { feed: FeedId, peer_seq: u64 },
    /// The batch that tells this side's hash at the peer's head is
    /// unreadable.
    #[error("outbox batch {seq} of {feed} is damaged: {reason}")]
    Damaged {
        feed: FeedId,
        seq: u64,
        reason: String,
    },
    /// The peer's batch at its head is not this side's batch there.
    #[error("{}", fork_text(*.role, .feed, *.seq))]
    Fork { role: Role, feed: FeedId, seq: u64 },
    /// A batch the window let out is not where this side keeps batches.
    #[error("batch {seq} of {feed} is missing from {}", .role.store())]
    Missing { role: Role, feed: FeedId, seq: u64 },
    /// The hub refused a message that is not a batch (see [`Role::Agent`]).
    #[error("the hub rejected a message: {detail} ({reason})")]
    Rejected {
        detail: String,
        reason: RejectReason,
    },
}

/// What this side holds of one feed, for checking the peer's head against
/// it: looked up by the driver (in the outbox, or the hub's store) before
/// it starts the machine or adds feeds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalFeed {
    /// The last batch held here (sealed by the agent, stored by the hub).
    pub head: u64,
    /// How far this side already knows that the peer holds the feed (an
    /// agent's outbox is pruned up to here); 0 where it keeps no record.
    pub acked: u64,
    /// This side's chain where the peer's head is.
    pub at_peer_head: AtPeerHead,
}

/// This side's chain at the peer's head of a feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AtPeerHead {
    /// Nothing here to compare with: the peer holds nothing, or more than
    /// this side.
    #[default]
    Unknown,
    /// The hash of this side's batch at the peer's head.
    Hash(BatchHash),
    /// The batch after the peer's head was already pruned here.
    Pruned,
    /// The batch that would tell the hash (`seq`) is unreadable here.
    Damaged { seq: u64, reason: String },
}

/// A catalog with sync messages to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogDue {
    pub department: DepartmentCode,
    /// Its first sync on this connection: start a session (from what is
    /// stored for the peer) before asking for messages.
    pub begin: bool,
}

/// The sending side of one connection.
#[derive(Debug, Clone)]
pub struct FeedSender {
    role: Role,
    window: SendWindow,
    /// Feeds asked for with `Feeds` (they stay here once welcomed).
    announced: BTreeSet<FeedId>,
    /// Catalogs synced on this connection.
    syncing: BTreeSet<DepartmentCode>,
    /// Catalogs with messages due, in the order they became due.
    catalogs_due: Vec<CatalogDue>,
}

const NOTHING_HELD: LocalFeed = LocalFeed {
    head: 0,
    acked: 0,
    at_peer_head: AtPeerHead::Unknown,
};

/// The peer's head must be a batch of this side's own chain.
fn check_chain(role: Role, peer: &FeedPosition, local: &LocalFeed) -> Result<(), SendError> {
    let peer_seq = peer.cursor.last_seq;
    if peer_seq == 0 {
        return Ok(());
    }
    let feed = || peer.feed.clone();
    match &local.at_peer_head {
        AtPeerHead::Hash(ours) if *ours != peer.cursor.last_hash => Err(SendError::Fork {
            role,
            feed: feed(),
            seq: peer_seq,
        }),
        AtPeerHead::Pruned => Err(SendError::Pruned {
            feed: feed(),
            peer_seq,
        }),
        AtPeerHead::Damaged { seq, reason } => Err(SendError::Damaged {
            feed: feed(),
            seq: *seq,
            reason: reason.clone(),
        }),
        AtPeerHead::Hash(_) | AtPeerHead::Unknown => Ok(()),
    }
}

impl FeedSender {
    /// Starts a connection from the peer's `Welcome` and what this side
    /// holds (`local`; a feed missing there is held nowhere here). Returns
    /// the machine and, per feed, how far the peer holds it where that is
    /// news here (how far an agent may prune).
    pub fn start(
        role: Role,
        peer: &[FeedPosition],
        local: &BTreeMap<FeedId, LocalFeed>,
        max_in_flight: u64,
    ) -> Result<(Self, Vec<(FeedId, u64)>), SendError> {
        let mut sender = FeedSender {
            role,
            window: SendWindow::new(max_in_flight),
            announced: BTreeSet::new(),
            syncing: BTreeSet::new(),
            catalogs_due: Vec::new(),
        };
        let held = sender.welcome(peer, local)?;
        Ok((sender, held))
    }

    /// Takes the peer's heads (the first `Welcome`, or a later one that
    /// answers `Feeds`): checks each against this side's chain, then sends
    /// the feeds not carried yet from right after the peer's head. Returns
    /// what [`FeedSender::start`] returns; on an error nothing changes.
    pub fn welcome(
        &mut self,
        peer: &[FeedPosition],
        local: &BTreeMap<FeedId, LocalFeed>,
    ) -> Result<Vec<(FeedId, u64)>, SendError> {
        let local_of = |f: &FeedId| local.get(f).unwrap_or(&NOTHING_HELD);
        for p in peer {
            check_chain(self.role, p, local_of(&p.feed))?;
        }
        let added = self.window.add(peer, |f| local_of(f).head)?;
        Ok(added
            .into_iter()
            .filter(|(f, seq)| *seq > local_of(f).acked)
            .collect())
    }

    /// Which link this machine serves.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Records that this side now holds batches of `feed` up to `head`.
    pub fn set_head(&mut self, feed: &FeedId, head: u64) {
        self.window.set_head(feed, head);
    }

    /// The next batch to send, if any may go now; feeds take turns.
    pub fn poll_send(&mut self, now: UnixMillis) -> Option<(FeedId, u64)> {
        self.window.poll_send(now)
    }

    /// When a feed held after a rejection may send again.
    pub fn next_wakeup(&self) -> Option<UnixMillis> {
        self.window.next_wakeup()
    }

    /// Applies the peer's cumulative ack. Returns how far the peer now
    /// holds the feed when that moved.
    pub fn on_ack(&mut self, feed: &FeedId, seq: u64) -> Result<Option<u64>, SendError> {
        self.window.on_ack(feed, seq)
    }

    /// Applies the peer's rejection: its feed is sent again from the
    /// peer's resend point after a growing pause. Returns how far the peer
    /// now holds the feed when that moved. A rejection without a feed ends
    /// an agent's connection and is only recorded upstream (see [`Role`]).
    pub fn on_reject(
        &mut self,
        reject: &Reject,
        now: UnixMillis,
    ) -> Result<Option<(FeedId, u64)>, SendError> {
        match (&reject.feed, self.role) {
            (Some(feed), _) => Ok(self
                .window
                .on_reject(feed, reject.resend_from, now)?
                .map(|seq| (feed.clone(), seq))),
            (None, Role::Agent) => Err(SendError::Rejected {
                detail: reject.detail.clone(),
                reason: reject.reason,
            }),
            (None, Role::Upstream) => Ok(None),
        }
    }

    /// How far the peer holds `feed`, as far as this connection knows.
    pub fn acked(&self, feed: &FeedId) -> Option<u64> {
        self.window.acked(feed)
    }

    /// Whether this connection sends `feed`.
    pub fn carries(&self, feed: &FeedId) -> bool {
        self.window.carries(feed)
    }

    /// Batches sent and not yet acknowledged, over all feeds.
    pub fn in_flight(&self) -> u64 {
        self.window.in_flight()
    }

    /// The feeds of `wanted` this connection neither carries nor asked
    /// for yet: they go in a `Feeds` message (whose answer is a later
    /// `Welcome`), and count as asked for from now on.
    pub fn announce<'a>(&mut self, wanted: impl IntoIterator<Item = &'a FeedId>) -> Vec<FeedId> {
        let fresh: Vec<FeedId> = wanted
            .into_iter()
            .filter(|f| !self.window.carries(f) && !self.announced.contains(*f))
            .cloned()
            .collect();
        self.announced.extend(fresh.iter().cloned());
        fresh
    }

    /// A feed this connection carries or asked for that is not `wanted`
    /// any more: the connection must start over without it.
    pub fn withdrawn(&self, wanted: impl Fn(&FeedId) -> bool) -> Option<&FeedId> {
        self.announced
            .iter()
            .chain(self.window.feeds())
            .find(|f| !wanted(f))
    }

    /// A catalog changed here (or is synced from the start): its messages
    /// are due, after starting a session the first time.
    pub fn catalog_changed(&mut self, department: &DepartmentCode) {
        let begin = self.syncing.insert(department.clone());
        self.due(department, begin);
    }

    /// The peer sent sync messages for a catalog: the answer is due.
    pub fn catalog_received(&mut self, department: &DepartmentCode) {
        self.due(department, false);
    }

    /// Every catalog synced on this connection may have changed.
    pub fn all_catalogs_changed(&mut self) {
        for department in self.syncing.clone() {
            self.due(&department, false);
        }
    }

    fn due(&mut self, department: &DepartmentCode, begin: bool) {
        match self
            .catalogs_due
            .iter_mut()
            .find(|c| &c.department == department)
        {
            Some(due) => due.begin |= begin,
            None => self.catalogs_due.push(CatalogDue {
                department: department.clone(),
                begin,
            }),
        }
    }

    /// The next catalog to send sync messages for (each until it has none).
    pub fn next_catalog(&mut self) -> Option<CatalogDue> {
        (!self.catalogs_due.is_empty()).then(|| self.catalogs_due.remove(0))
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic simulation of both uses (quinn-proto's test pair
    //! idea): a sender driven like the agent's uplink or a hub's upstream
    //! link, and a peer that checks chains as a hub does, with a virtual
    //! clock, a seeded schedule of new batches, lost connections (which
    //! drop every frame in flight both ways), slow acks and restarts.
    //! Whatever the schedule, the peer accepts every batch exactly once and
    //! in order, and an agent never prunes a batch the peer does not hold.
    //! A replaced data directory, a peer that lost data and a peer that
    //! holds more than this side end the way the operator is told.

    use super::*;
    use crate::batch::{BatchBody, Entry, SignedBatch, ZeroUpdate};
    use crate::chain::{ChainError, FeedCursor};
    use crate::identity::NodeKey;
    use std::collections::VecDeque;
    use std::time::Duration;

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
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[(self.next() % items.len() as u64) as usize]
        }
    }

    fn feeds(n: usize) -> Vec<FeedId> {
        (0..n).map(|i| format!("D:R{i}").parse().unwrap()).collect()
    }

    /// Department-signed batches as this side holds them: the agent's
    /// outbox (pruned on acks) or the hub's store (never pruned).
    #[derive(Clone)]
    struct Chains {
        key: NodeKey,
        heads: BTreeMap<FeedId, (u64, BatchHash)>,
        batches: BTreeMap<(FeedId, u64), SignedBatch>,
        /// How far each feed was pruned (durably).
        pruned: BTreeMap<FeedId, u64>,
    }

    impl Chains {
        fn new() -> Self {
            Chains {
                key: NodeKey::from_seed([9; 32]),
                heads: BTreeMap::new(),
                batches: BTreeMap::new(),
                pruned: BTreeMap::new(),
            }
        }

        fn head(&self, feed: &FeedId) -> u64 {
            self.heads.get(feed).map_or(0, |h| h.0)
        }

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
            self.batches.insert((feed.clone(), seq + 1), signed);
        }

        fn prune(&mut self, feed: &FeedId, upto: u64) {
            self.batches.retain(|(f, s), _| !(f == feed && *s <= upto));
            let p = self.pruned.entry(feed.clone()).or_default();
            *p = (*p).max(upto);
        }

        /// What the agent's uplink looks up: its head, how far it pruned,
        /// and the link of the batch after the peer's head.
        fn outbox_facts(&self, peer: &[FeedPosition]) -> BTreeMap<FeedId, LocalFeed> {
            peer.iter()
                .map(|p| {
                    let (head, hash) = self
                        .heads
                        .get(&p.feed)
                        .copied()
                        .unwrap_or((0, BatchHash::GENESIS));
                    let n = p.cursor.last_seq;
                    let at_peer_head = if n == head {
                        AtPeerHead::Hash(hash)
                    } else if n < head {
                        match self.batches.get(&(p.feed.clone(), n + 1)) {
                            Some(next) => AtPeerHead::Hash(next.open().unwrap().prev),
                            None => AtPeerHead::Pruned,
                        }
                    } else {
                        AtPeerHead::Unknown
                    };
                    let acked = self.pruned.get(&p.feed).copied().unwrap_or(0);
                    (
                        p.feed.clone(),
                        LocalFeed {
                            head,
                            acked,
                            at_peer_head,
                        },
                    )
                })
                .collect()
        }

        /// What the upstream link looks up: the head of each forwarded
        /// feed, and the stored batch at the peer's head.
        fn store_facts(
            &self,
            peer: &[FeedPosition],
            forwarded: &BTreeSet<FeedId>,
        ) -> BTreeMap<FeedId, LocalFeed> {
            peer.iter()
                .map(|p| {
                    let head = if forwarded.contains(&p.feed) {
                        self.head(&p.feed)
                    } else {
                        0
                    };
                    let at_peer_head = self
                        .batches
                        .get(&(p.feed.clone(), p.cursor.last_seq))
                        .map_or(AtPeerHead::Unknown, |b| AtPeerHead::Hash(b.hash()));
                    let local = LocalFeed {
                        head,
                        acked: 0,
                        at_peer_head,
                    };
                    (p.feed.clone(), local)
                })
                .collect()
        }
    }

    enum ToPeer {
        Batch(SignedBatch),
        Feeds(Vec<FeedId>),
    }
    enum FromPeer {
        Ack(FeedId, u64),
        Reject(Reject),
        Welcome(Vec<FeedPosition>),
    }

    fn reject(feed: Option<FeedId>, resend_from: u64) -> Reject {
        Reject {
            feed,
            seq: 0,
            reason: RejectReason::Gap,
            detail: "simulated".into(),
            resend_from,
        }
    }

    /// The receiving hub (or parent hub): its durable chains.
    #[derive(Clone, Default)]
    struct Peer {
        feeds: BTreeMap<FeedId, PeerFeed>,
        /// After a rejection, batches are dropped until the expected one.
        awaiting: BTreeMap<FeedId, u64>,
    }

    #[derive(Clone, Default)]
    struct PeerFeed {
        head: FeedCursor,
        accepted: Vec<u64>,
        hashes: BTreeMap<u64, BatchHash>,
    }

    impl Peer {
        fn connect(&mut self, feeds: &[FeedId]) -> Vec<FeedPosition> {
            self.awaiting.clear();
            self.welcome(feeds)
        }

        fn welcome(&self, feeds: &[FeedId]) -> Vec<FeedPosition> {
            feeds
                .iter()
                .map(|f| FeedPosition {
                    feed: f.clone(),
                    cursor: self.feeds.get(f).map(|x| x.head).unwrap_or_default(),
                })
                .collect()
        }

        fn holds(&self, feed: &FeedId) -> u64 {
            self.feeds.get(feed).map_or(0, |f| f.head.last_seq)
        }

        /// Takes one frame; `unavailable` makes it refuse a batch it would
        /// accept (its store cannot write now).
        fn receive(&mut self, m: ToPeer, unavailable: bool) -> Option<FromPeer> {
            let batch = match m {
                ToPeer::Feeds(feeds) => return Some(FromPeer::Welcome(self.welcome(&feeds))),
                ToPeer::Batch(b) => b,
            };
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
                .head
                .check(body.seq, body.prev, hash, |s| entry.hashes.get(&s).copied())
            {
                Ok(()) if unavailable => {
                    let next = entry.head.next_seq();
                    self.awaiting.insert(body.feed.clone(), next);
                    let mut refusal = reject(Some(body.feed), next);
                    refusal.reason = RejectReason::Unavailable;
                    Some(FromPeer::Reject(refusal))
                }
                Ok(()) => {
                    entry.head.advance(body.seq, hash);
                    entry.accepted.push(body.seq);
                    entry.hashes.insert(body.seq, hash);
                    Some(FromPeer::Ack(body.feed, body.seq))
                }
                Err(
                    ChainError::Gap { .. } | ChainError::Replay { .. } | ChainError::Fork { .. },
                ) => {
                    let next = entry.head.next_seq();
                    self.awaiting.insert(body.feed.clone(), next);
                    Some(FromPeer::Reject(reject(Some(body.feed), next)))
                }
            }
        }

        fn assert_exactly_once(&self, chains: &Chains, feeds: &[FeedId], seed: u64) {
            for f in feeds {
                let accepted = self
                    .feeds
                    .get(f)
                    .map(|x| x.accepted.clone())
                    .unwrap_or_default();
                assert_eq!(
                    accepted,
                    (1..=chains.head(f)).collect::<Vec<_>>(),
                    "seed {seed}: feed {f}"
                );
            }
        }
    }

    /// One connection: the machine and the frames in flight each way.
    struct Connection {
        sender: FeedSender,
        to_peer: VecDeque<ToPeer>,
        to_us: VecDeque<FromPeer>,
    }

    impl Connection {
        fn new(sender: FeedSender) -> Self {
            Connection {
                sender,
                to_peer: VecDeque::new(),
                to_us: VecDeque::new(),
            }
        }

        /// The driver's send pump: what the machine lets out, fetched from
        /// where this side keeps batches.
        fn pump(&mut self, chains: &Chains, now: UnixMillis, seed: u64) {
            while let Some((f, seq)) = self.sender.poll_send(now) {
                let batch = chains.batches.get(&(f.clone(), seq));
                let batch = batch.unwrap_or_else(|| panic!("seed {seed}: {f} {seq} is gone here"));
                self.to_peer.push_back(ToPeer::Batch(batch.clone()));
            }
        }

        /// One clean connection until the peer holds every batch of
        /// `feeds`. Returns how far the peer came to hold them, in turn.
        fn drain(
            &mut self,
            chains: &Chains,
            peer: &mut Peer,
            feeds: &[FeedId],
            now: &mut UnixMillis,
            seed: u64,
        ) -> Vec<(FeedId, u64)> {
            let mut held = Vec::new();
            for _ in 0..10_000 {
                *now = now.saturating_add(Duration::from_millis(200));
                self.pump(chains, *now, seed);
                self.deliver(peer, u64::MAX, None);
                while let Some(m) = self.to_us.pop_front() {
                    let FromPeer::Ack(f, seq) = m else {
                        panic!("seed {seed}: a clean link rejected");
                    };
                    held.extend(self.sender.on_ack(&f, seq).unwrap().map(|upto| (f, upto)));
                }
                if feeds
                    .iter()
                    .all(|f| self.sender.acked(f) == Some(chains.head(f)))
                {
                    return held;
                }
            }
            panic!("seed {seed}: not drained");
        }

        /// Delivers up to `n` frames to the peer, in stream order; with a
        /// `refusing` schedule the peer's store now and then cannot write.
        fn deliver(&mut self, peer: &mut Peer, n: u64, mut refusing: Option<&mut Rng>) {
            for _ in 0..n {
                let Some(m) = self.to_peer.pop_front() else {
                    break;
                };
                let unavailable = refusing.as_mut().is_some_and(|rng| rng.chance(3));
                if let Some(reply) = peer.receive(m, unavailable) {
                    self.to_us.push_back(reply);
                }
            }
        }
    }

    /// What a run went through, so the tests can tell that the seeds cover
    /// every path.
    #[derive(Debug, Default)]
    struct Seen {
        resends: u64,
        lost_prune_notes: u64,
        joined_later: u64,
        peer_lost_data: u64,
        peer_ahead: u64,
        forks: u64,
    }

    impl Seen {
        /// Resends, and each disagreement about history, came up.
        fn covers_both_uses(&self) -> bool {
            self.resends > 0 && self.peer_lost_data > 0 && self.peer_ahead > 0 && self.forks > 0
        }
    }

    impl std::ops::AddAssign for Seen {
        fn add_assign(&mut self, o: Seen) {
            self.resends += o.resends;
            self.lost_prune_notes += o.lost_prune_notes;
            self.joined_later += o.joined_later;
            self.peer_lost_data += o.peer_lost_data;
            self.peer_ahead += o.peer_ahead;
            self.forks += o.forks;
        }
    }

    /// The agent's uplink: batches are pruned on acks, through a queue of
    /// prune notes that a restart loses (the capture loop had not stored
    /// them yet).
    fn simulate_agent(seed: u64) -> Seen {
        let mut seen = Seen::default();
        let mut rng = Rng(seed | 1);
        let feeds = feeds(3);
        let mut agent = Chains::new();
        let mut notes: Vec<(FeedId, u64)> = Vec::new();
        let mut peer = Peer::default();
        let mut peer_backup = peer.clone();
        let mut agent_backup = agent.clone();
        let mut now = UnixMillis(0);
        let mut conn: Option<Connection> = None;
        let mut sealed = 0;

        let store_notes = |agent: &mut Chains, peer: &Peer, notes: &mut Vec<(FeedId, u64)>| {
            for (f, upto) in notes.drain(..) {
                assert!(
                    peer.holds(&f) >= upto,
                    "seed {seed}: pruned {f} {upto} unheld"
                );
                agent.prune(&f, upto);
            }
        };

        for step in 0..4000 {
            now = now.saturating_add(Duration::from_millis(rng.next() % 50));
            if step == 2000 {
                peer_backup = peer.clone();
                agent_backup = agent.clone();
            }
            if rng.chance(20) && sealed < 600 {
                let f = rng.pick(&feeds).clone();
                agent.seal(&f, now);
                sealed += 1;
                if let Some(c) = conn.as_mut() {
                    c.sender.set_head(&f, agent.head(&f));
                }
            }
            if rng.chance(10) {
                store_notes(&mut agent, &peer, &mut notes);
            }
            if rng.chance(1) {
                // The agent restarts: unstored prune notes are lost.
                seen.lost_prune_notes += notes.len() as u64;
                notes.clear();
                conn = None;
            }
            if conn.is_none() && rng.chance(30) {
                let positions = peer.connect(&feeds);
                let facts = agent.outbox_facts(&positions);
                let (sender, held) =
                    FeedSender::start(Role::Agent, &positions, &facts, 1 + rng.next() % 8)
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                notes.extend(held);
                conn = Some(Connection::new(sender));
            }
            let Some(c) = conn.as_mut() else {
                continue;
            };
            c.pump(&agent, now, seed);
            let n = rng.next() % 4;
            c.deliver(&mut peer, n, Some(&mut rng));
            for _ in 0..(rng.next() % 4) {
                let held = match c.to_us.pop_front() {
                    Some(FromPeer::Ack(f, seq)) => {
                        c.sender.on_ack(&f, seq).unwrap().map(|upto| (f, upto))
                    }
                    Some(FromPeer::Reject(r)) => {
                        seen.resends += 1;
                        c.sender.on_reject(&r, now).unwrap()
                    }
                    Some(FromPeer::Welcome(_)) => panic!("seed {seed}: a second Welcome"),
                    None => None,
                };
                notes.extend(held);
            }
            if rng.chance(2) {
                conn = None;
            }
        }

        // Drain: one clean connection until everything is acknowledged.
        let positions = peer.connect(&feeds);
        let (sender, held) =
            FeedSender::start(Role::Agent, &positions, &agent.outbox_facts(&positions), 4).unwrap();
        notes.extend(held);
        let mut c = Connection::new(sender);
        notes.extend(c.drain(&agent, &mut peer, &feeds, &mut now, seed));
        store_notes(&mut agent, &peer, &mut notes);
        assert!(agent.batches.is_empty(), "seed {seed}: outbox not drained");
        peer.assert_exactly_once(&agent, &feeds, seed);

        // The hub is restored from a backup: it lost batches this agent
        // already pruned.
        let mut old_peer = peer_backup.clone();
        let positions = old_peer.connect(&feeds);
        let lost_peer: BTreeSet<FeedId> = feeds
            .iter()
            .filter(|f| old_peer.holds(f) < peer.holds(f))
            .cloned()
            .collect();
        match FeedSender::start(Role::Agent, &positions, &agent.outbox_facts(&positions), 4) {
            Err(SendError::Pruned { feed, .. }) => {
                assert!(lost_peer.contains(&feed), "seed {seed}: {feed}");
                seen.peer_lost_data += 1;
            }
            Err(e) => panic!("seed {seed}: {e}"),
            Ok(_) => assert!(lost_peer.is_empty(), "seed {seed}: a hub that lost data"),
        }
        // The agent's data directory is restored from a backup: the hub
        // holds more than it, and once it seals again, other batches.
        let positions = peer.connect(&feeds);
        let start = |restored: &Chains| {
            let facts = restored.outbox_facts(&positions);
            FeedSender::start(Role::Agent, &positions, &facts, 4).map(|_| ())
        };
        seen += restored_from_backup(agent_backup, &agent, &feeds, now, seed, start);
        seen
    }

    /// A hub's upstream link: stored batches are never pruned, feeds join
    /// the running connection (`Feeds`, then a later `Welcome`), the parent
    /// refuses registrations now and then, and may lose data (the stored
    /// batches are sent again).
    fn simulate_upstream(seed: u64) -> Seen {
        let mut seen = Seen::default();
        let mut rng = Rng(seed | 1);
        let feeds = feeds(4);
        let mut store = Chains::new();
        let mut forwarded: BTreeSet<FeedId> = feeds[..1].iter().cloned().collect();
        let mut parent = Peer::default();
        let mut parent_backup = parent.clone();
        let mut store_backup = store.clone();
        let mut now = UnixMillis(0);
        let mut conn: Option<Connection> = None;
        let mut sealed = 0;

        let connect = |parent: &mut Peer, store: &Chains, forwarded: &BTreeSet<FeedId>, n| {
            let hello: Vec<FeedId> = forwarded.iter().cloned().collect();
            let positions = parent.connect(&hello);
            let facts = store.store_facts(&positions, forwarded);
            FeedSender::start(Role::Upstream, &positions, &facts, n)
        };

        for step in 0..4000 {
            now = now.saturating_add(Duration::from_millis(rng.next() % 50));
            if step == 2000 {
                parent_backup = parent.clone();
                store_backup = store.clone();
            }
            if rng.chance(20) && sealed < 800 {
                store.seal(rng.pick(&feeds), now);
                sealed += 1;
            }
            if rng.chance(1) {
                // The share policy lets one more feed leave.
                forwarded.insert(rng.pick(&feeds).clone());
            }
            if conn.is_none() && rng.chance(30) {
                let (sender, _) = connect(&mut parent, &store, &forwarded, 1 + rng.next() % 8)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                conn = Some(Connection::new(sender));
            }
            let Some(c) = conn.as_mut() else {
                continue;
            };
            // A store commit or a catalog change: replan.
            let fresh = c.sender.announce(&forwarded);
            if !fresh.is_empty() {
                c.to_peer.push_back(ToPeer::Feeds(fresh));
            }
            for f in &forwarded {
                c.sender.set_head(f, store.head(f));
            }
            assert_eq!(c.sender.withdrawn(|f| forwarded.contains(f)), None);
            c.pump(&store, now, seed);
            let n = rng.next() % 4;
            c.deliver(&mut parent, n, Some(&mut rng));
            if rng.chance(3) {
                c.to_us.push_back(FromPeer::Reject(reject(None, 0)));
            }
            for _ in 0..(rng.next() % 4) {
                match c.to_us.pop_front() {
                    Some(FromPeer::Ack(f, seq)) => {
                        c.sender.on_ack(&f, seq).unwrap();
                    }
                    Some(FromPeer::Reject(r)) => {
                        seen.resends += u64::from(r.feed.is_some());
                        c.sender.on_reject(&r, now).unwrap();
                    }
                    Some(FromPeer::Welcome(positions)) => {
                        seen.joined_later += 1;
                        let facts = store.store_facts(&positions, &forwarded);
                        c.sender.welcome(&positions, &facts).unwrap();
                    }
                    None => {}
                }
            }
            if rng.chance(2) {
                conn = None;
            }
        }

        forwarded.extend(feeds.iter().cloned());
        let drain = |parent: &mut Peer, store: &Chains, now: &mut UnixMillis| {
            let (sender, _) = connect(parent, store, &forwarded, 4).unwrap();
            Connection::new(sender).drain(store, parent, &feeds, now, seed);
        };
        drain(&mut parent, &store, &mut now);
        parent.assert_exactly_once(&store, &feeds, seed);
        assert!(
            feeds
                .iter()
                .all(|f| store.head(f) == 0 || store.batches.contains_key(&(f.clone(), 1))),
            "seed {seed}: the store never prunes"
        );

        // The parent is restored from a backup: it is sent what it lost.
        seen.peer_lost_data += u64::from(
            feeds
                .iter()
                .any(|f| parent_backup.holds(f) < parent.holds(f)),
        );
        parent = parent_backup;
        drain(&mut parent, &store, &mut now);
        parent.assert_exactly_once(&store, &feeds, seed);

        // This hub's store is restored from a backup: the parent holds
        // more than it, and once it stores other batches, a fork.
        let start =
            |restored: &Chains| connect(&mut parent.clone(), restored, &forwarded, 4).map(|_| ());
        seen += restored_from_backup(store_backup, &store, &feeds, now, seed, start);
        seen
    }

    /// This side's data is restored from `backup` while the peer keeps
    /// what it holds of `current`: the peer holds more than this side on
    /// every feed that moved since, and once this side has sealed past the
    /// peer again, other batches. `start` connects from the restored data.
    fn restored_from_backup(
        mut backup: Chains,
        current: &Chains,
        feeds: &[FeedId],
        mut now: UnixMillis,
        seed: u64,
        start: impl Fn(&Chains) -> Result<(), SendError>,
    ) -> Seen {
        let mut seen = Seen::default();
        let moved: BTreeSet<FeedId> = feeds
            .iter()
            .filter(|f| backup.head(f) < current.head(f))
            .cloned()
            .collect();
        match start(&backup) {
            Err(SendError::PeerAhead { feed, .. }) if moved.contains(&feed) => seen.peer_ahead += 1,
            Ok(()) if moved.is_empty() => {}
            other => panic!("seed {seed}: {other:?} with {moved:?} moved"),
        }
        for f in feeds {
            while backup.head(f) <= current.head(f) {
                now = now.saturating_add(Duration::from_millis(1));
                backup.seal(f, now);
            }
        }
        match start(&backup) {
            Err(SendError::Fork { feed, .. }) if moved.contains(&feed) => seen.forks += 1,
            Ok(()) if moved.is_empty() => {}
            other => panic!("seed {seed}: {other:?} with {moved:?} moved"),
        }
        seen
    }

    /// Runs a simulation with forty seeds.
    fn seeds(simulate: fn(u64) -> Seen) -> Seen {
        let mut seen = Seen::default();
        for seed in 1..=40u64 {
            seen += simulate(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        seen
    }

    #[test]
    fn simulated_agent_links_deliver_every_batch_exactly_once() {
        let seen = seeds(simulate_agent);
        assert!(
            seen.lost_prune_notes > 0 && seen.covers_both_uses(),
            "{seen:?}"
        );
    }

    #[test]
    fn simulated_upstream_links_deliver_every_batch_exactly_once() {
        let seen = seeds(simulate_upstream);
        assert!(seen.joined_later > 0 && seen.covers_both_uses(), "{seen:?}");
    }

    fn position(feed: &FeedId, last_seq: u64, hash: u8) -> FeedPosition {
        FeedPosition {
            feed: feed.clone(),
            cursor: FeedCursor {
                last_seq,
                last_hash: BatchHash([hash; 32]),
            },
        }
    }

    fn holding(head: u64, at_peer_head: AtPeerHead) -> BTreeMap<FeedId, LocalFeed> {
        let local = LocalFeed {
            head,
            acked: 0,
            at_peer_head,
        };
        [("D:R".parse().unwrap(), local)].into_iter().collect()
    }

    #[test]
    fn each_disagreement_about_history_is_its_own_error() {
        let feed: FeedId = "D:R".parse().unwrap();
        let peer = [position(&feed, 5, 1)];
        let start = |role, local| FeedSender::start(role, &peer, &local, 4).map(|_| ());
        assert_eq!(
            start(Role::Upstream, holding(3, AtPeerHead::Unknown)),
            Err(SendError::PeerAhead {
                feed: feed.clone(),
                peer_seq: 5,
                local_head: 3
            })
        );
        let fork = start(
            Role::Agent,
            holding(7, AtPeerHead::Hash(BatchHash([2; 32]))),
        );
        assert_eq!(
            fork,
            Err(SendError::Fork {
                role: Role::Agent,
                feed: feed.clone(),
                seq: 5
            })
        );
        assert!(
            fork.unwrap_err()
                .to_string()
                .contains("this agent's data directory")
        );
        let fork = start(
            Role::Upstream,
            holding(7, AtPeerHead::Hash(BatchHash([2; 32]))),
        );
        assert!(
            fork.unwrap_err()
                .to_string()
                .contains("Forwarding stopped to avoid a fork")
        );
        assert_eq!(
            start(Role::Agent, holding(7, AtPeerHead::Pruned)),
            Err(SendError::Pruned {
                feed: feed.clone(),
                peer_seq: 5
            })
        );
        let damaged = AtPeerHead::Damaged {
            seq: 6,
            reason: "bad bytes".into(),
        };
        assert!(matches!(
            start(Role::Agent, holding(7, damaged)),
            Err(SendError::Damaged { seq: 6, .. })
        ));
        assert_eq!(
            start(
                Role::Upstream,
                holding(7, AtPeerHead::Hash(BatchHash([1; 32])))
            ),
            Ok(())
        );
        // A peer that holds nothing needs no comparison.
        let fresh = [position(&feed, 0, 0)];
        assert!(FeedSender::start(Role::Agent, &fresh, &holding(7, AtPeerHead::Pruned), 4).is_ok());
    }

    #[test]
    fn only_news_about_the_peer_is_handed_back() {
        let feed: FeedId = "D:R".parse().unwrap();
        let mut local = holding(9, AtPeerHead::Hash(BatchHash([1; 32])));
        local.get_mut(&feed).unwrap().acked = 5;
        let (_, held) =
            FeedSender::start(Role::Agent, &[position(&feed, 5, 1)], &local, 4).unwrap();
        assert!(held.is_empty(), "already pruned up to the peer's head");
        local.get_mut(&feed).unwrap().acked = 4;
        let (_, held) =
            FeedSender::start(Role::Agent, &[position(&feed, 5, 1)], &local, 4).unwrap();
        assert_eq!(held, vec![(feed, 5)]);
    }

    #[test]
    fn a_rejection_without_a_feed_ends_only_an_agents_connection() {
        let feed: FeedId = "D:R".parse().unwrap();
        let peer = [position(&feed, 0, 0)];
        let now = UnixMillis(0);
        let (mut agent, _) =
            FeedSender::start(Role::Agent, &peer, &holding(2, AtPeerHead::Unknown), 4).unwrap();
        let (mut hub, _) =
            FeedSender::start(Role::Upstream, &peer, &holding(2, AtPeerHead::Unknown), 4).unwrap();
        let refused = reject(None, 0);
        assert!(matches!(
            agent.on_reject(&refused, now),
            Err(SendError::Rejected { .. })
        ));
        assert_eq!(hub.on_reject(&refused, now), Ok(None));
        for sender in [&mut agent, &mut hub] {
            assert_eq!(sender.poll_send(now), Some((feed.clone(), 1)));
            assert_eq!(sender.poll_send(now), Some((feed.clone(), 2)));
            assert_eq!(
                sender.on_reject(&reject(Some(feed.clone()), 2), now),
                Ok(Some((feed.clone(), 1)))
            );
            assert_eq!(sender.poll_send(now), None, "held after a rejection");
        }
    }

    #[test]
    fn feeds_join_and_leave_a_running_connection() {
        let [a, b, c] = [0, 1, 2].map(|i| format!("D:R{i}").parse::<FeedId>().unwrap());
        let local: BTreeMap<FeedId, LocalFeed> = [&a, &b, &c]
            .into_iter()
            .map(|f| {
                (
                    f.clone(),
                    LocalFeed {
                        head: 3,
                        ..LocalFeed::default()
                    },
                )
            })
            .collect();
        let (mut sender, _) =
            FeedSender::start(Role::Upstream, &[position(&a, 0, 0)], &local, 4).unwrap();
        let wanted = [a.clone(), b.clone(), c.clone()];
        assert_eq!(sender.announce(&wanted), vec![b.clone(), c.clone()]);
        assert_eq!(
            sender.announce(&wanted),
            Vec::<FeedId>::new(),
            "asked for once"
        );
        // The parent's answer names a fork: nothing joins.
        let mut forked = local.clone();
        forked.get_mut(&c).unwrap().at_peer_head = AtPeerHead::Hash(BatchHash([7; 32]));
        let answer = [position(&b, 0, 0), position(&c, 2, 1)];
        assert!(matches!(
            sender.welcome(&answer, &forked),
            Err(SendError::Fork { .. })
        ));
        assert!(!sender.carries(&b));
        let answer = [position(&b, 0, 0), position(&c, 2, 1)];
        assert_eq!(sender.welcome(&answer, &local), Ok(vec![(c.clone(), 2)]));
        assert!(sender.carries(&b) && sender.carries(&c));
        assert_eq!(sender.acked(&c), Some(2));
        assert_eq!(sender.withdrawn(|f| wanted.contains(f)), None);
        assert_eq!(sender.withdrawn(|f| *f != b), Some(&b));
    }

    #[test]
    fn catalogs_are_due_once_each_in_order() {
        let [x, y] = ["X", "Y"].map(|d| d.parse::<DepartmentCode>().unwrap());
        let feed: FeedId = "D:R".parse().unwrap();
        let (mut sender, _) = FeedSender::start(Role::Upstream, &[], &BTreeMap::new(), 4).unwrap();
        assert_eq!(sender.next_catalog(), None);
        sender.catalog_changed(&y);
        sender.catalog_changed(&x);
        sender.catalog_changed(&y);
        let due = |department: &DepartmentCode, begin| CatalogDue {
            department: department.clone(),
            begin,
        };
        assert_eq!(sender.next_catalog(), Some(due(&y, true)));
        assert_eq!(sender.next_catalog(), Some(due(&x, true)));
        assert_eq!(sender.next_catalog(), None);
        // Answers and later changes need no new session.
        sender.catalog_received(&x);
        sender.catalog_changed(&x);
        assert_eq!(sender.next_catalog(), Some(due(&x, false)));
        assert_eq!(sender.next_catalog(), None);
        sender.all_catalogs_changed();
        assert_eq!(sender.next_catalog(), Some(due(&x, false)));
        assert_eq!(sender.next_catalog(), Some(due(&y, false)));
        // An answer for a catalog not synced here starts no session.
        let z: DepartmentCode = "Z".parse().unwrap();
        sender.catalog_received(&z);
        assert_eq!(sender.next_catalog(), Some(due(&z, false)));
        sender.catalog_changed(&z);
        assert_eq!(sender.next_catalog(), Some(due(&z, true)));
        assert!(!sender.carries(&feed));
    }
}
