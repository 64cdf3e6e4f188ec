//! The client side of a feed connection, one driver for the agent's uplink
//! and a hub's upstream link (级联): staying connected with backoff,
//! dialing, the greeting and the peer's `Welcome`, the send pump, the
//! peer's acks and rejections, catalog sync messages, and telling an
//! operator why a connection failed.
//!
//! What is sent and what the peer holds is decided by the sans-IO
//! [`FeedSender`]; this module carries it out on a QUIC stream. What only
//! one of the two links does (its greeting, where its batches are, what an
//! ack means there, its state board, its own messages and wake-ups) is its
//! [`LinkSide`].
//!
//! Invariant: a batch goes on the wire only when the machine lets it out,
//! with the bytes this side stored; every ack and rejection of the peer
//! passes through the machine before the side acts on it.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use quinn::{ConnectionError, ReadError, RecvStream, SendStream, WriteError};
use shuyuan_protocol::message::{CatalogSync, FeedPosition, Reject, Welcome};
use shuyuan_protocol::sender::{FeedSender, LocalFeed, Role, SendError};
use shuyuan_protocol::{DepartmentCode, FeedId, Message, MessageV1, SignedBatch, UnixMillis};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::quic::{self, DialError, QuicError};

/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the peer may take to answer the handshake or the greeting.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a link's connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot resolve {peer} address {address}: {reason}")]
    Resolve {
        peer: &'static str,
        address: String,
        reason: String,
    },
    /// The peer refused this node, or is not the configured peer.
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer's state contradicts this side's chains.
    #[error(transparent)]
    Chain(SendError),
    #[error("cannot set up QUIC: {0}")]
    Setup(String),
    /// This side's own storage failed (the agent's outbox, catalog or key
    /// files; the hub's store or catalog).
    #[error(transparent)]
    Local(Box<dyn std::error::Error + Send + Sync>),
    /// The upstream's share policy withdrew a feed: start over without it.
    #[error("{0}")]
    Replan(String),
}

impl LinkError {
    /// This side's storage error, kept as the source.
    pub fn local(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        LinkError::Local(Box::new(error))
    }
}

impl From<SendError> for LinkError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Rejected { .. } => LinkError::Protocol(e.to_string()),
            other => LinkError::Chain(other),
        }
    }
}

/// A link's state, as its board shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPhase {
    Connecting,
    Connected,
    Disconnected,
    /// The peer refused this node's key, or is not the configured peer.
    Refused,
}

/// Who this node is to the peer, in operators' texts.
fn me(role: Role) -> &'static str {
    match role {
        Role::Agent => "this agent",
        Role::Upstream => "this hub",
    }
}

/// What the link is called in logs.
fn link_name(role: Role) -> &'static str {
    match role {
        Role::Agent => "hub connection",
        Role::Upstream => "upstream link",
    }
}

fn hello_name(role: Role) -> &'static str {
    match role {
        Role::Agent => "Hello",
        Role::Upstream => "HubHello",
    }
}

fn stopping(role: Role) -> &'static [u8] {
    match role {
        Role::Agent => b"agent stopping",
        Role::Upstream => b"hub stopping",
    }
}

/// What a side tells an operator about its peer when a connection fails.
#[derive(Debug, Clone)]
pub struct PeerWords {
    /// The peer's address as configured (`HOST:PORT`).
    pub address: String,
    /// The peer refused this node's key: why, and what to do.
    pub key_refused: String,
    /// Where the peer's key is configured (for a server that is not it).
    pub key_setting: String,
}

/// Turns connection failures into [`LinkError`]s in one side's words.
#[derive(Debug, Clone)]
struct Words {
    role: Role,
    peer: PeerWords,
}

impl Words {
    fn connection(&self, e: &ConnectionError) -> LinkError {
        let explained = quic::explain(e);
        let PeerWords {
            address,
            key_refused,
            key_setting,
        } = &self.peer;
        let peer = self.role.peer();
        if !quic::is_auth_failure(e) {
            LinkError::Lost(format!(
                "connection to the {peer} at {address} lost: {explained}"
            ))
        } else if explained.contains("hub key mismatch") {
            LinkError::Auth(format!(
                "the server at {address} is not the configured {peer} ({explained}); check {key_setting}"
            ))
        } else {
            LinkError::Auth(key_refused.clone())
        }
    }

    fn quic(&self, e: QuicError) -> LinkError {
        if let Some(c) = lost_connection(&e) {
            return self.connection(c);
        }
        match e {
            QuicError::Frame(f) => LinkError::Protocol(f.to_string()),
            other => LinkError::Lost(other.to_string()),
        }
    }

    fn dial(&self, e: DialError) -> LinkError {
        let peer = self.role.peer();
        match e {
            DialError::Resolve { address, reason } => LinkError::Resolve {
                peer,
                address,
                reason,
            },
            DialError::Setup(e) => LinkError::Setup(e),
            DialError::Timeout(addr, t) => LinkError::Lost(format!(
                "no answer from the {peer} at {addr} within {}s",
                t.as_secs()
            )),
            DialError::Connection(e) => self.connection(&e),
        }
    }

    fn welcome(&self, e: WelcomeError) -> LinkError {
        match e {
            WelcomeError::Quic(e) => self.quic(e),
            WelcomeError::Refused(r) => LinkError::Auth(format!(
                "the {} refused {}: {} ({})",
                self.role.peer(),
                me(self.role),
                r.detail,
                r.reason
            )),
            other => LinkError::Protocol(format!("answering {}: {other}", hello_name(self.role))),
        }
    }
}

/// What the agent's uplink and a hub's upstream link each do their own
/// way; [`keep_connected`] does the rest. Hooks that take a [`Connection`]
/// run while connected and may send on it.
pub trait LinkSide {
    /// Which link this is.
    const ROLE: Role;
    /// Batches per feed sent ahead of the peer's acks.
    const MAX_IN_FLIGHT: u64;
    /// This side's own wake-ups while connected (see [`LinkSide::wake`]).
    type Wake;

    /// The TLS identity to dial with and the pinned peer.
    fn client_config(&self) -> Result<quinn::ClientConfig, LinkError>;

    /// The peer's address and what to tell an operator when it refuses.
    fn words(&self) -> PeerWords;

    /// Shows the link's state on this side's board.
    fn show_link(&self, phase: LinkPhase, detail: Option<String>);

    /// Records the peer's rejection (`text` says what and why) on the board.
    fn show_rejection(&self, text: String);

    /// The greeting that opens a connection (`Hello`, `HubHello`).
    fn hello(&mut self) -> impl Future<Output = Result<MessageV1, LinkError>>;

    /// What this side holds of each feed at the peer's heads.
    fn local_feeds(&self, peer: &[FeedPosition]) -> Result<BTreeMap<FeedId, LocalFeed>, LinkError>;

    /// Batch `seq` of `feed` as stored here, if it is.
    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, LinkError>;

    /// The peer now durably holds `feed` up to `seq` (news to this side).
    fn acked(&mut self, sender: &FeedSender, feed: FeedId, seq: u64);

    /// Starts a catalog sync session with the peer.
    fn begin_catalog(
        &self,
        department: &DepartmentCode,
    ) -> impl Future<Output = Result<(), LinkError>>;

    /// The next catalog sync message for the peer, if there is one.
    fn catalog_message(
        &self,
        department: &DepartmentCode,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, LinkError>>;

    /// The peer welcomed this node: this side's first messages, before any
    /// batch.
    fn welcomed(
        &mut self,
        link: &mut Connection,
        welcome: &Welcome,
    ) -> impl Future<Output = Result<(), LinkError>>;

    /// A message from the peer other than `Ack` and `Reject`.
    fn receive(
        &mut self,
        link: &mut Connection,
        message: MessageV1,
    ) -> impl Future<Output = Result<(), LinkError>>;

    /// Waits for one of this side's wake-ups; must be cancel-safe.
    fn wake(&mut self) -> impl Future<Output = Self::Wake>;

    /// Acts on a wake-up.
    fn woken(
        &mut self,
        link: &mut Connection,
        wake: Self::Wake,
    ) -> impl Future<Output = Result<(), LinkError>>;
}

/// One established connection: the machine and the stream it sends on.
#[derive(Debug)]
pub struct Connection {
    pub sender: FeedSender,
    send: SendStream,
    conn: quinn::Connection,
    words: Words,
}

impl Connection {
    /// Writes one message to the peer.
    pub async fn send(&mut self, message: MessageV1) -> Result<(), LinkError> {
        quic::write_message(&mut self.send, &message.into())
            .await
            .map_err(|e| self.words.quic(e))
    }

    /// Sends the sync messages of every catalog the machine says is due.
    pub async fn send_catalogs<S: LinkSide>(&mut self, side: &S) -> Result<(), LinkError> {
        while let Some(due) = self.sender.next_catalog() {
            if due.begin {
                side.begin_catalog(&due.department).await?;
            }
            while let Some(message) = side.catalog_message(&due.department).await? {
                let sync = CatalogSync {
                    department: due.department.clone(),
                    message,
                };
                self.send(MessageV1::Catalog(sync)).await?;
            }
        }
        Ok(())
    }

    /// Takes a later `Welcome` (the answer to `Feeds`): the feeds it names
    /// join the connection once their chains check out.
    pub fn welcome_more<S: LinkSide>(
        &mut self,
        side: &mut S,
        welcome: &Welcome,
    ) -> Result<(), LinkError> {
        let local = side.local_feeds(&welcome.feeds)?;
        for (feed, seq) in self.sender.welcome(&welcome.feeds, &local)? {
            side.acked(&self.sender, feed, seq);
        }
        Ok(())
    }

    /// The error for a message this side does not take.
    pub fn unexpected(&self, message: &MessageV1) -> LinkError {
        LinkError::Protocol(format!(
            "unexpected message from the {}: {}",
            self.words.role.peer(),
            message.name()
        ))
    }

    /// Ends the connection politely, saying why.
    pub fn close(&mut self, reason: &[u8]) {
        let _ = self.send.finish();
        self.conn.close(0u32.into(), reason);
    }

    /// Sends every batch the machine lets out now.
    async fn pump<S: LinkSide>(&mut self, side: &S) -> Result<(), LinkError> {
        let now = UnixMillis::now();
        while let Some((feed, seq)) = self.sender.poll_send(now) {
            let Some(batch) = side.batch(&feed, seq)? else {
                let role = S::ROLE;
                return Err(SendError::Missing { role, feed, seq }.into());
            };
            self.send(MessageV1::Batch(batch)).await?;
        }
        Ok(())
    }

    /// Handles one message from the peer.
    async fn receive<S: LinkSide>(&mut self, side: &mut S, m: MessageV1) -> Result<(), LinkError> {
        match m {
            MessageV1::Ack(ack) => {
                if let Some(seq) = self.sender.on_ack(&ack.feed, ack.seq)? {
                    side.acked(&self.sender, ack.feed, seq);
                }
            }
            MessageV1::Reject(r) => {
                side.show_rejection(self.rejection(&r));
                if let Some((feed, seq)) = self.sender.on_reject(&r, UnixMillis::now())? {
                    side.acked(&self.sender, feed, seq);
                }
            }
            other => side.receive(self, other).await?,
        }
        Ok(())
    }

    /// Logs a rejection and says it in words for the board.
    fn rejection(&self, r: &Reject) -> String {
        let role = self.words.role;
        let feed = r
            .feed
            .as_ref()
            .map_or_else(|| "-".into(), FeedId::to_string);
        tracing::warn!(%feed, seq = r.seq, reason = %r.reason, detail = %r.detail, "the {} rejected a message", role.peer());
        match &r.feed {
            Some(feed) => format!(
                "batch {} of {feed}: {} ({}); resending from {}",
                r.seq, r.detail, r.reason, r.resend_from
            ),
            None => format!(
                "{}: {} ({})",
                match role {
                    Role::Agent => "message",
                    Role::Upstream => "registration",
                },
                r.detail,
                r.reason
            ),
        }
    }
}

/// Runs connections until `cancel` fires, waiting [`BACKOFF_MIN`] doubling
/// to [`BACKOFF_MAX`] between failed ones (reset once a peer welcomed this
/// node); closes the endpoint at the end.
pub async fn keep_connected<S: LinkSide>(side: &mut S, cancel: &CancellationToken) {
    let mut endpoint = None;
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    while !cancel.is_cancelled() {
        let mut established = false;
        let result = session(side, &mut endpoint, cancel, &mut established).await;
        if established {
            backoff = BACKOFF_MIN;
        }
        match result {
            Ok(()) => break,
            Err(e) => {
                let text = e.to_string();
                failed::<S>(side, &e, text != last_error || established);
                last_error = text;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    if let Some(ep) = endpoint {
        ep.close(0u32.into(), b"stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
}

/// A connection failed; `news` is false when it failed again the same way
/// without ever being established (logged once, not every attempt).
fn failed<S: LinkSide>(side: &S, e: &LinkError, news: bool) {
    let text = e.to_string();
    let auth = matches!(e, LinkError::Auth(_));
    let phase = if auth {
        LinkPhase::Refused
    } else {
        LinkPhase::Disconnected
    };
    side.show_link(phase, Some(text.clone()));
    if news {
        let link = link_name(S::ROLE);
        if auth || matches!(e, LinkError::Chain(_)) {
            tracing::error!(error = %text, "{link} failed");
        } else {
            tracing::warn!(error = %text, "{link} lost; reconnecting with backoff");
        }
    }
}

/// One connection: `Ok` when `cancel` fired, `Err` to try again. Sets
/// `established` once the peer welcomed this node.
async fn session<S: LinkSide>(
    side: &mut S,
    endpoint: &mut Option<quinn::Endpoint>,
    cancel: &CancellationToken,
    established: &mut bool,
) -> Result<(), LinkError> {
    side.show_link(LinkPhase::Connecting, None);
    let client = side.client_config()?;
    let words = Words {
        role: S::ROLE,
        peer: side.words(),
    };
    let (addr, conn, mut send, mut recv) =
        quic::dial(endpoint, &client, &words.peer.address, ANSWER_TIMEOUT)
            .await
            .map_err(|e| words.dial(e))?;
    let hello = side.hello().await?;
    quic::write_message(&mut send, &hello.into())
        .await
        .map_err(|e| words.quic(e))?;
    let welcome = read_welcome(&mut recv, ANSWER_TIMEOUT)
        .await
        .map_err(|e| words.welcome(e))?;
    let local = side.local_feeds(&welcome.feeds)?;
    let (sender, held) = FeedSender::start(S::ROLE, &welcome.feeds, &local, S::MAX_IN_FLIGHT)?;
    for (feed, seq) in held {
        side.acked(&sender, feed, seq);
    }
    let mut link = Connection {
        sender,
        send,
        conn,
        words,
    };
    *established = true;
    side.show_link(LinkPhase::Connected, None);
    tracing::info!(peer = %addr, peer_software = %welcome.software, feeds = welcome.feeds.len(), "connected to the {}", S::ROLE.peer());
    side.welcomed(&mut link, &welcome).await?;

    let (_reader, mut rx) = spawn_reader(recv);
    loop {
        link.pump(side).await?;
        let wake = link
            .sender
            .next_wakeup()
            .map(|t| tokio::time::Instant::now() + t.since(UnixMillis::now()));
        tokio::select! {
            _ = cancel.cancelled() => {
                link.close(stopping(S::ROLE));
                return Ok(());
            }
            m = rx.recv() => match m {
                Some(Ok(Some(Message::V1(m)))) => link.receive(side, m).await?,
                Some(Ok(None)) | None => {
                    return Err(LinkError::Lost(format!("the {} closed the stream", S::ROLE.peer())));
                }
                Some(Err(e)) => return Err(link.words.quic(e)),
            },
            w = side.wake() => side.woken(&mut link, w).await?,
            _ = async { if let Some(w) = wake { tokio::time::sleep_until(w).await } }, if wake.is_some() => {}
        }
    }
}

/// The connection underneath a stream error, if the connection broke.
pub fn lost_connection(e: &QuicError) -> Option<&ConnectionError> {
    match e {
        QuicError::Connection(c)
        | QuicError::Read(ReadError::ConnectionLost(c))
        | QuicError::Write(WriteError::ConnectionLost(c)) => Some(c),
        _ => None,
    }
}

/// Why no `Welcome` came.
#[derive(Debug, thiserror::Error)]
pub enum WelcomeError {
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("the peer closed the stream")]
    Closed,
    #[error("the peer refused: {} ({})", .0.detail, .0.reason)]
    Refused(Reject),
    #[error("expected Welcome, got {0}")]
    Unexpected(&'static str),
}

/// Reads the answer to `Hello` or `HubHello` within `timeout`.
pub async fn read_welcome(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<Welcome, WelcomeError> {
    match tokio::time::timeout(timeout, quic::read_message(recv)).await {
        Err(_) => Err(WelcomeError::Timeout(timeout)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(WelcomeError::Closed),
        Ok(Ok(Some(Message::V1(MessageV1::Welcome(w))))) => Ok(w),
        Ok(Ok(Some(Message::V1(MessageV1::Reject(r))))) => Err(WelcomeError::Refused(r)),
        Ok(Ok(Some(Message::V1(other)))) => Err(WelcomeError::Unexpected(other.name())),
    }
}

/// A task that reads the peer's messages; aborted when dropped.
#[derive(Debug)]
pub struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the reader hands over: a message, the end of the stream, or why
/// reading failed (the last item either way).
pub type Incoming = Result<Option<Message>, QuicError>;

/// Reads `recv` on its own task (reading is not cancel-safe, so a select
/// loop must not do it) and hands over whole messages. The queue holds at
/// most what the peer answers to batches the window let out, plus the
/// peer's own few messages.
pub fn spawn_reader(mut recv: RecvStream) -> (Reader, mpsc::UnboundedReceiver<Incoming>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let m = quic::read_message(&mut recv).await;
            let end = !matches!(m, Ok(Some(_)));
            if tx.send(m).is_err() || end {
                break;
            }
        }
    });
    (Reader(task), rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::RejectReason;

    fn words(role: Role) -> Words {
        Words {
            role,
            peer: PeerWords {
                address: "peer.example:4433".into(),
                key_refused: "enroll this key".into(),
                key_setting: "the key setting".into(),
            },
        }
    }

    #[test]
    fn failures_are_told_in_each_sides_words() {
        let refused = |role| {
            let r = Reject {
                feed: None,
                seq: 0,
                reason: RejectReason::UnknownSigner,
                detail: "not enrolled".into(),
                resend_from: 0,
            };
            let e = words(role).welcome(WelcomeError::Refused(r));
            assert!(matches!(e, LinkError::Auth(_)), "{e:?}");
            e.to_string()
        };
        assert!(refused(Role::Agent).starts_with("the hub refused this agent: not enrolled ("));
        assert!(
            refused(Role::Upstream).starts_with("the parent hub refused this hub: not enrolled (")
        );
        let odd = words(Role::Upstream).welcome(WelcomeError::Unexpected("Ack"));
        assert_eq!(
            odd.to_string(),
            "protocol error: answering HubHello: expected Welcome, got Ack"
        );
        let resolve = words(Role::Agent).dial(DialError::Resolve {
            address: "nowhere:1".into(),
            reason: "no addresses".into(),
        });
        assert_eq!(
            resolve.to_string(),
            "cannot resolve hub address nowhere:1: no addresses"
        );
        let addr = "127.0.0.1:9".parse().unwrap();
        let timeout = words(Role::Agent).dial(DialError::Timeout(addr, ANSWER_TIMEOUT));
        assert_eq!(
            timeout.to_string(),
            "no answer from the hub at 127.0.0.1:9 within 10s"
        );
        let lost = words(Role::Upstream).connection(&ConnectionError::TimedOut);
        assert_eq!(
            lost.to_string(),
            "connection to the parent hub at peer.example:4433 lost: no answer from the peer (timed out)"
        );
    }

    #[test]
    fn the_machines_errors_keep_their_kind_and_local_errors_their_source() {
        let feed: FeedId = "D:R".parse().unwrap();
        let fork = LinkError::from(SendError::Fork {
            role: Role::Agent,
            feed,
            seq: 3,
        });
        assert!(matches!(
            fork,
            LinkError::Chain(SendError::Fork { seq: 3, .. })
        ));
        assert!(fork.to_string().contains("Sending stopped to avoid a fork"));
        let rejected = LinkError::from(SendError::Rejected {
            detail: "what is this".into(),
            reason: RejectReason::ProtocolViolation,
        });
        assert!(
            rejected
                .to_string()
                .starts_with("protocol error: the hub rejected a message: what is this")
        );
        let io = std::io::Error::other("disk on fire");
        let local = LinkError::local(io);
        assert_eq!(local.to_string(), "disk on fire");
        let LinkError::Local(inner) = &local else {
            panic!("{local:?}")
        };
        assert!(inner.downcast_ref::<std::io::Error>().is_some());
    }
}
