//! Ingest: the hub's side of a feed connection.
//!
//! Each connection reads `Hello`, answers `Welcome` with the hub's durable
//! head of each feed, then verifies every batch (signature over the exact
//! received bytes, signer, department) and hands it to the store writer;
//! a separate task writes each batch's ack or rejection, in order, once the
//! writer's transaction has committed.
//!
//! A child hub's connection is the same stream opened with `HubHello`: it
//! forwards the batches of the departments registered below it, which are
//! checked against those departments' keys ([`crate::federation`]).
//!
//! Invariants: nothing is acknowledged before it is durable; a batch whose
//! signature fails is never decoded as trusted (its claimed feed is only
//! used to route the rejection); an agent writes only feeds of the
//! department its key is enrolled for; every refusal is audited.
//!
//! Resources are bounded per connection and in total ([`Limits`]): at most
//! `max_connections` connections and `max_handshakes` of them still in the
//! TLS handshake or before `Hello`; a connection's messages read but not
//! yet decided hold at most `connection_buffer` bytes, all connections
//! together `total_buffer` (reserved from the length prefix, before the
//! payload is allocated); beyond that the hub stops reading and QUIC flow
//! control holds the peer back. Every refused connection is counted by
//! reason ([`connection_refusals`]); its audit entry is rate-limited per
//! reason and peer ([`throttle`]), so a flood of connections
//! cannot flood the audit log.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use shuyuan_link::quic::{self, QuicError};
use shuyuan_protocol::batch::BatchError;
use shuyuan_protocol::catalog::doc::{CatalogError, Sender};
use shuyuan_protocol::encoding::decode;
use shuyuan_protocol::frame::MAX_FRAME_SIZE;
use shuyuan_protocol::message::{
    CatalogRefusal, CatalogSync, FeedPosition, Reject, VerifyRequest, Welcome,
};
use shuyuan_protocol::rotation::{KeyRotated, KeyRotation};
use shuyuan_protocol::{
    BatchBody, DepartmentCode, FeedId, Message, MessageV1, NodeId, RejectReason, SignedBatch,
    UnixMillis,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::catalog::{HubCatalog, HubCatalogError};
use crate::federation;
use crate::live::{ChildInfo, ConnectionInfo, Live};
use crate::peers::Peers;
use crate::store::{
    AuditEntry, AuditKind, Enrollment, Incoming, NodeKind, Outcome, Store, StoreError,
    VerifiedBatch, VerifyEvent,
};
use crate::throttle::{self, AuditThrottle};

/// How long a new connection may take, after the QUIC handshake, to open
/// its stream and say `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches of one connection queued for the writer before reading pauses.
const PIPELINE: usize = 256;
/// Bytes of one connection's messages read but not yet decided: room for
/// two batches of the largest size, so a connection streams while the
/// writer decides the previous one.
pub const CONNECTION_BUFFER: usize = 2 * MAX_FRAME_SIZE;
/// Bytes of all connections' messages read but not yet decided.
pub const TOTAL_BUFFER: usize = 256 * 1024 * 1024;

/// What the accept loop admits at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (`hub.max_connections`).
    pub max_connections: usize,
    /// Connections in the QUIC/TLS handshake or waiting for `Hello`:
    /// a quarter of `max_connections`, so stalled handshakes cannot take
    /// every slot.
    pub max_handshakes: usize,
    /// See [`CONNECTION_BUFFER`].
    pub connection_buffer: usize,
    /// See [`TOTAL_BUFFER`].
    pub total_buffer: usize,
}

impl From<usize> for Limits {
    fn from(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            max_handshakes: (max_connections / 4).max(1),
            connection_buffer: CONNECTION_BUFFER,
            total_buffer: TOTAL_BUFFER.max(CONNECTION_BUFFER),
        }
    }
}

/// Why the hub refused or ended a connection (the `reason` label of
/// `shuyuan_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// `max_connections` connections were open.
    Limit,
    /// `max_handshakes` connections were still in their handshake.
    HandshakeLimit,
    /// The TLS handshake refused the client's key (audited by
    /// [`crate::peers`] once a minute per key).
    Unenrolled,
    /// The client abandoned the handshake.
    HandshakeFailed,
    /// No handshake, stream or `Hello` in time.
    HandshakeTimeout,
    /// A frame over the size limit or that does not decode.
    BadFrame,
    /// The stream ended in the middle of a frame.
    Truncated,
    /// A message out of turn, or a `Hello` for another department.
    Protocol,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Limit,
        Refusal::HandshakeLimit,
        Refusal::Unenrolled,
        Refusal::HandshakeFailed,
        Refusal::HandshakeTimeout,
        Refusal::BadFrame,
        Refusal::Truncated,
        Refusal::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Limit => "limit",
            Refusal::HandshakeLimit => "handshake_limit",
            Refusal::Unenrolled => "unenrolled",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::BadFrame => "bad_frame",
            Refusal::Truncated => "truncated",
            Refusal::Protocol => "protocol",
        }
    }

    /// The audit entry's reason.
    fn reason(self) -> RejectReason {
        match self {
            Refusal::Limit | Refusal::HandshakeLimit => RejectReason::Unavailable,
            Refusal::BadFrame | Refusal::Truncated => RejectReason::Malformed,
            Refusal::Unenrolled => RejectReason::UnknownSigner,
            Refusal::HandshakeFailed | Refusal::HandshakeTimeout | Refusal::Protocol => {
                RejectReason::ProtocolViolation
            }
        }
    }

    /// The refusal a read error stands for, if the peer is to blame.
    fn of_read(e: &QuicError) -> Option<Refusal> {
        match e {
            QuicError::Frame(_) => Some(Refusal::BadFrame),
            QuicError::Truncated => Some(Refusal::Truncated),
            _ => None,
        }
    }
}

/// Connection refusals since the process started.
#[derive(Debug)]
struct Refusals {
    counts: [AtomicU64; Refusal::ALL.len()],
    /// Audited at most once per interval per reason and peer (`None`:
    /// before the peer's key is known).
    throttle: AuditThrottle<(Refusal, Option<NodeId>)>,
}

// One per process, like the endpoint it counts for: the metrics read it
// without a handle on the accept loop.
static REFUSALS: Refusals = Refusals {
    counts: [const { AtomicU64::new(0) }; Refusal::ALL.len()],
    throttle: AuditThrottle::new(),
};

/// Connections refused since the process started, by reason label.
pub fn connection_refusals() -> Vec<(&'static str, u64)> {
    Refusal::ALL
        .iter()
        .map(|r| {
            (
                r.label(),
                REFUSALS.counts[*r as usize].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Counts a refused connection and audits it unless the same refusal of
/// the same peer was audited within [`throttle::AUDIT_INTERVAL`].
fn refused(store: &Store, refusal: Refusal, peer: Option<NodeId>, detail: String) {
    REFUSALS.counts[refusal as usize].fetch_add(1, Ordering::Relaxed);
    if refusal == Refusal::Unenrolled {
        return;
    }
    match REFUSALS.throttle.admit((refusal, peer), detail) {
        Some(text) => {
            tracing::warn!(reason = refusal.label(), detail = %text, "connection refused");
            audit_refusal(store, refusal, peer, text);
        }
        None => tracing::debug!(reason = refusal.label(), "connection refused"),
    }
}

fn audit_refusal(store: &Store, refusal: Refusal, peer: Option<NodeId>, text: String) {
    let mut entry = AuditEntry::new(
        AuditKind::ConnectionRefused,
        format!("{}: {text}", refusal.label()),
    );
    entry.peer = peer;
    entry.reason = Some(refusal.reason());
    store.audit(entry);
}

/// Audits the refusals held back for longer than the interval, so the end
/// of a flood is on record even if no refusal follows it.
fn flush_refusals(store: &Store) {
    for ((refusal, peer), text) in REFUSALS.throttle.due() {
        audit_refusal(store, refusal, peer, text);
    }
}

/// What a connection's reader may hold: its own byte budget and its share
/// of the hub's.
#[derive(Debug, Clone)]
struct Budget {
    connection: Arc<Semaphore>,
    total: Arc<Semaphore>,
}

/// The budget one read message holds until it is decided.
#[derive(Debug)]
struct Held {
    _connection: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Budget {
    /// Waits until `bytes` fit both budgets; `None` if the hub closed them.
    async fn hold(&self, bytes: usize) -> Option<Held> {
        let n = u32::try_from(bytes).ok()?;
        let connection = self.connection.clone().acquire_many_owned(n).await.ok()?;
        let total = self.total.clone().acquire_many_owned(n).await.ok()?;
        Some(Held {
            _connection: connection,
            _total: total,
        })
    }
}

/// What every connection task shares.
#[derive(Debug)]
pub struct Ingest {
    /// This hub's key (a registration of it from below is a loop).
    pub node: NodeId,
    pub store: Store,
    pub peers: Arc<Peers>,
    pub live: Arc<Live>,
    pub catalog: Arc<HubCatalog>,
}

/// Accepts connections until `cancel` fires, within `limits`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ingest: Arc<Ingest>,
    limits: impl Into<Limits>,
    cancel: CancellationToken,
) {
    let limits = limits.into();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let handshaking = Arc::new(Semaphore::new(limits.max_handshakes));
    let total = Arc::new(Semaphore::new(limits.total_buffer));
    let mut flush = tokio::time::interval(throttle::AUDIT_INTERVAL);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = flush.tick() => {
                flush_refusals(&ingest.store);
                ingest.peers.flush_refusals();
                continue;
            }
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let Ok(permit) = open.clone().try_acquire_owned() else {
            let detail = format!(
                "{} connections open; refused a connection from {remote}",
                limits.max_connections
            );
            refused(&ingest.store, Refusal::Limit, None, detail);
            incoming.refuse();
            continue;
        };
        let Ok(handshake) = handshaking.clone().try_acquire_owned() else {
            let detail = format!(
                "{} connections in their handshake; refused a connection from {remote}",
                limits.max_handshakes
            );
            refused(&ingest.store, Refusal::HandshakeLimit, None, detail);
            incoming.refuse();
            continue;
        };
        let ingest = ingest.clone();
        let cancel = cancel.clone();
        let budget = Budget {
            connection: Arc::new(Semaphore::new(limits.connection_buffer)),
            total: total.clone(),
        };
        tasks.spawn(async move {
            handle(ingest, incoming, handshake, budget, cancel).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Counts and audits a handshake that did not complete.
fn handshake_refused(ingest: &Ingest, remote: std::net::SocketAddr, e: &quinn::ConnectionError) {
    let refusal = match e {
        // Our verifier refused the key (it logged and audited that).
        quinn::ConnectionError::TransportError(_) if quic::is_auth_failure(e) => {
            Refusal::Unenrolled
        }
        quinn::ConnectionError::TimedOut => Refusal::HandshakeTimeout,
        _ => {
            REFUSALS.counts[Refusal::HandshakeFailed as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, error = %quic::explain(e), "handshake failed");
            return;
        }
    };
    let detail = format!("handshake from {remote}: {}", quic::explain(e));
    refused(&ingest.store, refusal, None, detail);
}

async fn handle(
    ingest: Arc<Ingest>,
    incoming: quinn::Incoming,
    handshake: OwnedSemaphorePermit,
    budget: Budget,
    cancel: CancellationToken,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            handshake_refused(&ingest, remote, &e);
            return;
        }
    };
    let Some(peer) = quic::peer_id(&conn) else {
        conn.close(1u32.into(), b"no peer key");
        return;
    };
    let Some(enrollment) = ingest.peers.get(&peer) else {
        conn.close(1u32.into(), b"not enrolled");
        return;
    };
    let greeted = match greeting(&conn).await {
        Ok(g) => g,
        Err(e) => {
            greeting_failed(&ingest, &conn, peer, remote, e);
            return;
        }
    };
    drop(handshake);
    let admitted = Admitted {
        conn,
        peer,
        remote,
        budget,
    };
    let (span, work) = if enrollment.kind == NodeKind::Hub {
        let span = tracing::info_span!("child_hub", peer = %peer.short(), code = %enrollment.department, %remote);
        let work = async {
            match child_session(&ingest, &admitted, &enrollment, greeted, &cancel).await {
                Ok(()) => tracing::info!("child hub disconnected"),
                Err(e) => tracing::info!(reason = %e, "child hub connection ended"),
            }
        };
        (span, futures_util::future::Either::Left(work))
    } else {
        let span = tracing::info_span!("connection", peer = %peer.short(), department = %enrollment.department, %remote);
        let work = async {
            match session(&ingest, &admitted, &enrollment, greeted, &cancel).await {
                Ok(()) => tracing::info!("agent disconnected"),
                Err(e) => tracing::info!(reason = %e, "connection ended"),
            }
        };
        (span, futures_util::future::Either::Right(work))
    };
    async {
        tokio::select! {
            () = work => {}
            r = ingest.peers.revoked(peer) => {
                // What the connection had in flight is dropped unanswered;
                // batches it signed are refused from now on.
                tracing::warn!(reason = %r.reason, "key revoked: connection closed");
                admitted.conn.close(REVOKED_CLOSE.into(), format!("key revoked: {}", r.reason).as_bytes());
            }
        }
    }
    .instrument(span)
    .await;
}

/// How far an agent's clock may be off before the hub flags it.
pub const CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(300);

/// The QUIC close code of a connection whose key was revoked.
pub const REVOKED_CLOSE: u32 = 3;

/// A connection past its handshake and greeting.
struct Admitted {
    conn: Connection,
    peer: NodeId,
    remote: std::net::SocketAddr,
    budget: Budget,
}

/// Why a connection ended before its greeting was read.
#[derive(Debug)]
enum GreetingError {
    Timeout,
    Quic(QuicError),
}

/// Counts, audits and closes a connection that did not greet properly; a
/// lost connection is only logged.
fn greeting_failed(
    ingest: &Ingest,
    conn: &Connection,
    peer: NodeId,
    remote: std::net::SocketAddr,
    e: GreetingError,
) {
    let (refusal, detail) = match e {
        GreetingError::Timeout => (
            Refusal::HandshakeTimeout,
            format!("no Hello from {remote} within {HELLO_TIMEOUT:?} of the handshake"),
        ),
        GreetingError::Quic(e) => match Refusal::of_read(&e) {
            Some(r) => (r, format!("greeting from {remote}: {e}")),
            None => {
                tracing::debug!(peer = %peer.short(), %remote, error = %e, "connection lost before Hello");
                return;
            }
        },
    };
    let reason = format!("{}: {detail}", refusal.label());
    refused(&ingest.store, refusal, Some(peer), detail);
    conn.close(2u32.into(), reason.as_bytes());
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Quic(#[from] QuicError),
    #[error("{0}")]
    Refused(String),
    #[error("hub is shutting down")]
    Stopping,
}

/// A connection's feed stream and its first message.
type Greeted = (SendStream, RecvStream, Option<Message>);

/// Accepts the connection's stream and reads its first message, together
/// within [`HELLO_TIMEOUT`].
async fn greeting(conn: &Connection) -> Result<Greeted, GreetingError> {
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(QuicError::Connection)?;
        let first = quic::read_message(&mut recv).await?;
        Ok::<_, QuicError>((send, recv, first))
    };
    match tokio::time::timeout(HELLO_TIMEOUT, first).await {
        Ok(Ok(greeted)) => Ok(greeted),
        Ok(Err(e)) => Err(GreetingError::Quic(e)),
        Err(_) => Err(GreetingError::Timeout),
    }
}

/// The name of a connection's first message, for a refusal.
fn first_name(m: &Option<Message>) -> &'static str {
    match m {
        Some(Message::V1(m)) => m.name(),
        None => "the end of the stream",
    }
}

async fn session(
    ingest: &Ingest,
    admitted: &Admitted,
    enrollment: &Enrollment,
    (mut send, recv, first): Greeted,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let Admitted {
        conn, peer, remote, ..
    } = admitted;
    let (peer, remote) = (*peer, *remote);
    let hello = match first {
        Some(Message::V1(MessageV1::Hello(h))) => h,
        other => {
            return Err(refuse_connection(
                ingest,
                conn,
                &mut send,
                peer,
                format!("expected Hello, got {}", first_name(&other)),
            )
            .await);
        }
    };
    if hello.department != enrollment.department {
        let detail = format!(
            "key {peer} is enrolled for department {}, but the agent says it serves {}",
            enrollment.department, hello.department
        );
        return Err(refuse_connection(ingest, conn, &mut send, peer, detail).await);
    }
    // Batches of this agent's previous connection may still wait in the
    // writer's queue; report the heads after they are decided, or the agent
    // would resend (and the hub refuse as replays) batches it already has.
    ingest
        .store
        .barrier()
        .await
        .map_err(|e| SessionError::Refused(e.to_string()))?;
    let welcome = welcome(ingest, &hello.department, &hello.resources)?;
    quic::write_message(&mut send, &MessageV1::Welcome(welcome).into()).await?;
    let id = ingest.live.next_id();
    ingest.live.register(
        id,
        ConnectionInfo {
            peer,
            department: hello.department.clone(),
            resources: hello.resources.clone(),
            remote,
            since: UnixMillis::now(),
            software: hello.software.clone(),
            report: None,
            clock_skew_ms: None,
            connection: Some(conn.clone()),
        },
    );
    tracing::info!(software = %hello.software, resources = hello.resources.len(), "agent connected");
    if let Err(e) = ingest.peers.connected(peer).await {
        tracing::warn!(error = %e, "cannot retire the key this one replaced");
    }
    let who = Who::Agent(enrollment.department.clone());
    let result = stream_batches(ingest, id, admitted, &who, (send, recv), cancel).await;
    ingest.live.unregister(id);
    ingest.store.connection_closed(id);
    if let Err(SessionError::Refused(reason)) = &result {
        conn.close(2u32.into(), reason.as_bytes());
    }
    result
}

/// A child hub's connection: the same stream as an agent's, opened with
/// `HubHello`, carrying the feeds of the departments registered below it.
async fn child_session(
    ingest: &Ingest,
    admitted: &Admitted,
    enrollment: &Enrollment,
    (mut send, recv, first): Greeted,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let Admitted {
        conn, peer, remote, ..
    } = admitted;
    let (peer, remote) = (*peer, *remote);
    let hello = match first {
        Some(Message::V1(MessageV1::HubHello(h))) => h,
        other => {
            return Err(refuse_connection(
                ingest,
                conn,
                &mut send,
                peer,
                format!(
                    "key {peer} is enrolled as a child hub, but it sent {} instead of HubHello",
                    first_name(&other)
                ),
            )
            .await);
        }
    };
    ingest
        .store
        .barrier()
        .await
        .map_err(|e| SessionError::Refused(e.to_string()))?;
    let welcome = positions(ingest, &hello.feeds)?;
    quic::write_message(&mut send, &MessageV1::Welcome(welcome).into()).await?;
    let id = ingest.live.next_id();
    ingest.live.register_child(
        id,
        ChildInfo {
            peer,
            code: enrollment.department.clone(),
            name: hello.name.clone(),
            remote,
            since: UnixMillis::now(),
            software: hello.software.clone(),
            feeds: hello.feeds.clone(),
            tree: None,
            connection: Some(conn.clone()),
        },
    );
    tracing::info!(software = %hello.software, name = %hello.name, feeds = hello.feeds.len(), "child hub connected");
    let result = stream_batches(ingest, id, admitted, &Who::Hub, (send, recv), cancel).await;
    ingest.live.unregister_child(id);
    ingest.store.connection_closed(id);
    if let Err(SessionError::Refused(reason)) = &result {
        conn.close(2u32.into(), reason.as_bytes());
    }
    result
}

/// Who is on the other end of a connection.
enum Who {
    /// A department's agent.
    Agent(DepartmentCode),
    /// A child hub, carrying the departments registered below it.
    Hub,
}

impl Who {
    /// The departments whose catalogs and feeds this connection carries.
    fn departments(&self, ingest: &Ingest, peer: &NodeId) -> BTreeSet<DepartmentCode> {
        match self {
            Who::Agent(d) => BTreeSet::from([d.clone()]),
            Who::Hub => federation::carried(&ingest.peers, peer),
        }
    }
}

fn welcome(
    ingest: &Ingest,
    department: &DepartmentCode,
    resources: &[shuyuan_protocol::ResourceCode],
) -> Result<Welcome, SessionError> {
    let feeds: Vec<FeedId> = resources
        .iter()
        .map(|r| FeedId::new(department.clone(), r.clone()))
        .collect();
    positions(ingest, &feeds)
}

/// The hub's durable head of each feed.
fn positions(ingest: &Ingest, feeds: &[FeedId]) -> Result<Welcome, SessionError> {
    let mut out = Vec::with_capacity(feeds.len());
    for feed in feeds {
        let feed = feed.clone();
        let record = ingest
            .store
            .backend()
            .feed(&feed)
            .map_err(|e| SessionError::Refused(e.to_string()))?;
        out.push(FeedPosition {
            feed,
            cursor: record.map(|r| r.cursor).unwrap_or_default(),
        });
    }
    Ok(Welcome {
        software: shuyuan_protocol::SOFTWARE.to_string(),
        feeds: out,
    })
}

async fn refuse_connection(
    ingest: &Ingest,
    conn: &Connection,
    send: &mut SendStream,
    peer: NodeId,
    detail: String,
) -> SessionError {
    refused(&ingest.store, Refusal::Protocol, Some(peer), detail.clone());
    let reject = Reject {
        feed: None,
        seq: 0,
        reason: RejectReason::WrongDepartment,
        detail: detail.clone(),
        resend_from: 0,
    };
    let _ = quic::write_message(send, &MessageV1::Reject(reject).into()).await;
    let _ = send.finish();
    // Give the rejection a moment to leave before the connection closes.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    conn.close(2u32.into(), b"refused");
    SessionError::Refused(detail)
}

/// What the reply writer sends, in order.
enum Outgoing {
    /// A batch's ack or rejection, once the store has decided, and the
    /// budget its bytes hold until then.
    Outcome(oneshot::Receiver<Outcome>, Held),
    /// A message to send as it is (catalog sync).
    Message(MessageV1),
}

async fn stream_batches(
    ingest: &Ingest,
    id: u64,
    admitted: &Admitted,
    who: &Who,
    (send, recv): (SendStream, RecvStream),
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let peer = admitted.peer;
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(PIPELINE);
    let replies = tokio::spawn(write_replies(send, out_rx));
    let (in_tx, mut in_rx) = mpsc::channel(PIPELINE);
    let reader = tokio::spawn(read_messages(recv, admitted.budget.clone(), in_tx));
    let mut catalog_changes = ingest.catalog.subscribe();
    let mut verify_events = ingest.store.verify_events();
    let mut sent = SentRequests::default();
    // Whether this connection's clock skew was audited already.
    let mut clock_flagged = false;
    if let Who::Agent(department) = who
        && let Err(e) = send_verify_requests(ingest, department, None, &mut sent, &out_tx).await
    {
        tracing::warn!(error = %e, "cannot send pending verification requests");
    }
    // The departments whose catalog sync has begun on this connection.
    let mut syncing: BTreeSet<DepartmentCode> = BTreeSet::new();
    for department in who.departments(ingest, &peer) {
        start_catalog(ingest, &department, &peer, &out_tx).await;
        syncing.insert(department);
    }
    let result = loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break Err(SessionError::Stopping),
            changed = catalog_changes.recv() => {
                let changed = match changed {
                    Ok(d) => Some(d),
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => continue,
                };
                for department in syncing.iter().filter(|d| changed.as_ref().is_none_or(|c| c == *d)) {
                    if let Err(e) = send_catalog(ingest, department, &peer, &out_tx).await {
                        tracing::warn!(error = %e, "cannot send catalog changes");
                    }
                }
                continue;
            }
            event = verify_events.recv() => {
                let Who::Agent(department) = who else { continue };
                let feed = match event {
                    Ok(VerifyEvent::Requests(feed)) if feed.department == *department => Some(feed),
                    Ok(VerifyEvent::Finished(outcome)) if outcome.feed.department == *department => {
                        let _ = out_tx.send(Outgoing::Message(MessageV1::Verified(outcome))).await;
                        continue;
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => continue,
                };
                if let Err(e) = send_verify_requests(ingest, department, feed.as_ref(), &mut sent, &out_tx).await {
                    tracing::warn!(error = %e, "cannot send verification requests");
                }
                continue;
            }
            m = in_rx.recv() => match m {
                Some(m) => m,
                None => Ok(None),
            },
        };
        let (message, held) = match message {
            Ok(Some((Message::V1(m), held))) => (m, held),
            Ok(None) => break Ok(()),
            Err(e) => match Refusal::of_read(&e) {
                Some(refusal) => {
                    let detail = format!("unreadable frame: {e}");
                    refused(&ingest.store, refusal, Some(peer), detail.clone());
                    break Err(SessionError::Refused(format!(
                        "{}: {detail}",
                        refusal.label()
                    )));
                }
                None => break Err(e.into()),
            },
        };
        match (who, message) {
            (_, MessageV1::Batch(batch)) => {
                let incoming = match who {
                    Who::Agent(department) => verify(&ingest.peers, peer, department, batch),
                    Who::Hub => federation::verify_forwarded(&ingest.peers, peer, batch),
                };
                let outcome = match ingest.store.apply(id, peer, incoming).await {
                    Ok(rx) => rx,
                    Err(_) => break Err(SessionError::Stopping),
                };
                if out_tx.send(Outgoing::Outcome(outcome, held)).await.is_err() {
                    break Err(SessionError::Refused("could not write replies".into()));
                }
            }
            (Who::Agent(_), MessageV1::Report(report)) => {
                let skew = ingest.live.report(id, report, UnixMillis::now());
                if skew.unsigned_abs() > CLOCK_SKEW_LIMIT.as_millis() as u64 && !clock_flagged {
                    // Freshness goes by the hub's clock, so a wrong agent
                    // clock misleads only the timestamps the agent writes.
                    clock_flagged = true;
                    let detail = format!(
                        "the agent's clock is {} the hub's by {}s; its batch and zero-update timestamps are off by as much (fix its time sync)",
                        if skew > 0 { "ahead of" } else { "behind" },
                        skew.unsigned_abs() / 1000
                    );
                    tracing::warn!(skew_ms = skew, "{detail}");
                    let mut entry = AuditEntry::new(AuditKind::ClockSkew, detail);
                    entry.peer = Some(peer);
                    ingest.store.audit(entry);
                }
            }
            (Who::Agent(department), MessageV1::KeyRotation(rotation)) => {
                // Recorded before the next message is read: the batches
                // after it may be signed by the new key.
                let reply = rotate(ingest, peer, department, &rotation).await;
                if out_tx.send(Outgoing::Message(reply)).await.is_err() {
                    break Err(SessionError::Refused("could not write replies".into()));
                }
            }
            (Who::Agent(department), MessageV1::VerifyRefused(refusal))
                if refusal.feed.department == *department =>
            {
                ingest.store.refuse_verify(peer, refusal).await;
            }
            (Who::Agent(department), MessageV1::Catalog(sync)) => {
                receive_catalog(ingest, peer, department, Sender::Department, sync, &out_tx).await
            }
            (Who::Hub, MessageV1::Catalog(sync)) => {
                if !syncing.contains(&sync.department) {
                    // Registered since the connection began?
                    if who.departments(ingest, &peer).contains(&sync.department) {
                        start_catalog(ingest, &sync.department, &peer, &out_tx).await;
                        syncing.insert(sync.department.clone());
                    }
                }
                let department = sync.department.clone();
                if syncing.contains(&department) {
                    receive_catalog(ingest, peer, &department, Sender::Federation, sync, &out_tx)
                        .await;
                } else {
                    let detail = format!(
                        "child hub {peer} sent the catalog of department {department}, which no hub below it registered"
                    );
                    refuse_catalog(
                        ingest,
                        peer,
                        sync.department,
                        RejectReason::WrongDepartment,
                        detail,
                        &out_tx,
                    )
                    .await;
                }
            }
            (Who::Hub, MessageV1::Registration(registration)) => {
                match federation::check_registration(
                    &ingest.peers,
                    &ingest.node,
                    &peer,
                    registration,
                ) {
                    Ok(None) => {}
                    Ok(Some((key, enrollment))) => {
                        let department =
                            (!enrollment.is_hub()).then(|| enrollment.department.clone());
                        match ingest.peers.enroll(key, enrollment).await {
                            Ok(_) => {
                                if let Some(d) = department
                                    && syncing.insert(d.clone())
                                {
                                    start_catalog(ingest, &d, &peer, &out_tx).await;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(%key, error = %e, "cannot record a registration from below");
                                let reject = Reject {
                                    feed: None,
                                    seq: 0,
                                    reason: RejectReason::Unavailable,
                                    detail: format!("registration of {key}: {e}"),
                                    resend_from: 0,
                                };
                                let _ = out_tx
                                    .send(Outgoing::Message(MessageV1::Reject(reject)))
                                    .await;
                            }
                        }
                    }
                    Err(refusal) => {
                        tracing::warn!(reason = %refusal.reason, detail = %refusal.detail, "registration from a child hub refused");
                        let mut entry =
                            AuditEntry::new(AuditKind::ConnectionRefused, refusal.detail.clone());
                        entry.peer = Some(peer);
                        entry.reason = Some(refusal.reason);
                        ingest.store.audit(entry);
                        let reject = Reject {
                            feed: None,
                            seq: 0,
                            reason: refusal.reason,
                            detail: refusal.detail.clone(),
                            resend_from: 0,
                        };
                        let _ = out_tx
                            .send(Outgoing::Message(MessageV1::Reject(reject)))
                            .await;
                        if refusal.is_loop {
                            break Err(SessionError::Refused(refusal.detail));
                        }
                    }
                }
            }
            (Who::Hub, MessageV1::Feeds(feeds)) => {
                // Batches of these feeds already queued are decided first.
                if ingest.store.barrier().await.is_err() {
                    break Err(SessionError::Stopping);
                }
                let welcome = match positions(ingest, &feeds) {
                    Ok(w) => w,
                    Err(e) => break Err(e),
                };
                ingest.live.update_child(id, |c| {
                    for f in feeds {
                        if !c.feeds.contains(&f) {
                            c.feeds.push(f);
                        }
                    }
                });
                let _ = out_tx
                    .send(Outgoing::Message(MessageV1::Welcome(welcome)))
                    .await;
            }
            (Who::Hub, MessageV1::Tree(tree)) => {
                if tree.hubs().contains(&ingest.node) {
                    let detail = format!(
                        "child hub {peer} reports this hub in its own subtree: a loop; refusing the link"
                    );
                    tracing::error!(%detail);
                    refused(&ingest.store, Refusal::Protocol, Some(peer), detail.clone());
                    break Err(SessionError::Refused(detail));
                }
                ingest.live.update_child(id, |c| c.tree = Some(tree));
            }
            (_, other) => {
                let detail = format!(
                    "unexpected message from {} after the greeting: {}",
                    if matches!(who, Who::Hub) {
                        "a child hub"
                    } else {
                        "an agent"
                    },
                    other.name()
                );
                refused(&ingest.store, Refusal::Protocol, Some(peer), detail.clone());
                break Err(SessionError::Refused(detail));
            }
        }
    };
    reader.abort();
    drop(out_tx);
    let _ = replies.await;
    result
}

/// Begins the catalog sync of one department with a peer and sends what
/// there is.
async fn start_catalog(
    ingest: &Ingest,
    department: &DepartmentCode,
    peer: &NodeId,
    out: &mpsc::Sender<Outgoing>,
) {
    let begun = async {
        ingest.catalog.begin_sync(department, peer).await?;
        send_catalog(ingest, department, peer, out).await
    };
    if let Err(e) = begun.await {
        tracing::warn!(%department, error = %e, "cannot start catalog sync");
    }
}

/// The verification requests already sent on this connection: feed, run,
/// the end of the range and its depth (pending ranges of a run are
/// disjoint, and a range asked for again is one level deeper).
type SentRequests = std::collections::BTreeSet<(FeedId, u64, Option<Vec<u8>>, u8)>;

/// Sends the pending verification requests of the department's feeds (or
/// of one feed) that this connection has not sent yet.
async fn send_verify_requests(
    ingest: &Ingest,
    department: &DepartmentCode,
    only: Option<&FeedId>,
    sent: &mut SentRequests,
    out: &mpsc::Sender<Outgoing>,
) -> Result<(), StoreError> {
    let feeds: Vec<FeedId> = match only {
        Some(f) => vec![f.clone()],
        None => ingest
            .store
            .backend()
            .feeds()?
            .into_iter()
            .map(|(f, _)| f)
            .filter(|f| f.department == *department)
            .collect(),
    };
    for feed in feeds {
        let Some(run) = ingest
            .store
            .backend()
            .verification(&feed)?
            .and_then(|v| v.run)
        else {
            continue;
        };
        for p in run.pending {
            if !sent.insert((feed.clone(), run.id, p.range.hi.clone(), p.depth)) {
                continue;
            }
            let request = VerifyRequest {
                feed: feed.clone(),
                run: run.id,
                range: p.range,
                mode: p.mode,
            };
            tracing::debug!(%feed, run = run.id, range = %request.range, "verification request sent");
            if out
                .send(Outgoing::Message(MessageV1::Verify(request)))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Checks and records an agent's key rotation, announced over the old
/// key's connection (or repeated over the new one's); the answer is
/// `KeyRotated`, or a refusal that is audited.
async fn rotate(
    ingest: &Ingest,
    peer: NodeId,
    department: &DepartmentCode,
    rotation: &KeyRotation,
) -> MessageV1 {
    let checked = match rotation.open() {
        Err(e) => Err((RejectReason::BadSignature, e.to_string())),
        Ok(body) if body.old != peer && body.new != peer => Err((
            RejectReason::UnknownSigner,
            format!(
                "a rotation of {} sent by {peer}: an agent announces only its own next key",
                body.old
            ),
        )),
        Ok(body) if body.department != *department => Err((
            RejectReason::WrongDepartment,
            format!(
                "a rotation for department {} from a key enrolled for {department}",
                body.department
            ),
        )),
        Ok(body) => Ok(body),
    };
    let outcome = match checked {
        Ok(body) => ingest
            .peers
            .rotate(body.old, body.new, body.department)
            .await
            .map(|new| (body.old, body.new, new))
            .map_err(|e| (RejectReason::UnknownSigner, e.to_string())),
        Err(e) => Err(e),
    };
    match outcome {
        Ok((old, new, recorded)) => {
            if recorded {
                tracing::info!(%old, %new, "agent key rotated");
            }
            MessageV1::KeyRotated(KeyRotated { old, new })
        }
        Err((reason, detail)) => {
            tracing::warn!(%reason, %detail, "key rotation refused");
            let mut entry = AuditEntry::new(
                AuditKind::ConnectionRefused,
                format!("key rotation refused: {detail}"),
            );
            entry.peer = Some(peer);
            entry.reason = Some(reason);
            ingest.store.audit(entry);
            MessageV1::Reject(Reject {
                feed: None,
                seq: 0,
                reason,
                detail: format!("key rotation refused: {detail}"),
                resend_from: 0,
            })
        }
    }
}

/// Queues every catalog sync message there is to send to this agent now.
async fn send_catalog(
    ingest: &Ingest,
    department: &DepartmentCode,
    peer: &NodeId,
    out: &mpsc::Sender<Outgoing>,
) -> Result<(), HubCatalogError> {
    while let Some(message) = ingest.catalog.next_message(department, peer).await? {
        let sync = CatalogSync {
            department: department.clone(),
            message,
        };
        if out
            .send(Outgoing::Message(MessageV1::Catalog(sync)))
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Applies a peer's catalog message, or refuses it with the reason (and
/// audits the refusal); then answers with what the peer lacks. An agent
/// writes its own department's entries; a child hub the entries and
/// reviews of the departments below it.
async fn receive_catalog(
    ingest: &Ingest,
    peer: NodeId,
    department: &DepartmentCode,
    sender: Sender,
    sync: CatalogSync,
    out: &mpsc::Sender<Outgoing>,
) {
    let refusal = if sync.department != *department {
        Some((
            RejectReason::WrongDepartment,
            format!(
                "key {peer} is enrolled for department {department}, not {}; a department edits only its own catalog",
                sync.department
            ),
        ))
    } else {
        match ingest
            .catalog
            .receive_as(department, &peer, &sync.message, sender)
            .await
        {
            Ok(()) => None,
            Err(HubCatalogError::Doc(CatalogError::NotOwner(v))) => {
                Some((RejectReason::NotOwner, v.join("; ")))
            }
            Err(HubCatalogError::Store(e)) => Some((RejectReason::Unavailable, e.to_string())),
            Err(e) => Some((RejectReason::Malformed, e.to_string())),
        }
    };
    match refusal {
        None => {
            if let Err(e) = send_catalog(ingest, department, &peer, out).await {
                tracing::warn!(error = %e, "cannot answer catalog sync");
            }
        }
        Some((reason, detail)) => {
            refuse_catalog(ingest, peer, sync.department, reason, detail, out).await;
        }
    }
}

/// Refuses a catalog message: logged, audited (unless the store was only
/// unavailable) and answered with the reason.
async fn refuse_catalog(
    ingest: &Ingest,
    peer: NodeId,
    department: DepartmentCode,
    reason: RejectReason,
    detail: String,
    out: &mpsc::Sender<Outgoing>,
) {
    tracing::warn!(%reason, %detail, "catalog changes refused");
    if reason != RejectReason::Unavailable {
        let mut entry = AuditEntry::new(
            AuditKind::CatalogRejected,
            format!("catalog of {department}: {detail}"),
        );
        entry.peer = Some(peer);
        entry.reason = Some(reason);
        ingest.store.audit(entry);
    }
    let refusal = CatalogRefusal {
        department,
        reason,
        detail,
    };
    let _ = out
        .send(Outgoing::Message(MessageV1::CatalogRefused(refusal)))
        .await;
}

/// A message read from a peer, with the budget it holds.
type Read = Result<Option<(Message, Held)>, QuicError>;

/// Reads whole messages for the session loop. A payload is read (and
/// allocated) only once its length, from the prefix, fits the connection's
/// and the hub's budget: until then the stream is not read and QUIC flow
/// control holds the peer back. Reading is not cancel-safe, so it runs on
/// its own.
async fn read_messages(mut recv: RecvStream, budget: Budget, out: mpsc::Sender<Read>) {
    loop {
        let m = match quic::read_prefix(&mut recv).await {
            Ok(Some(len)) => {
                let Some(held) = budget.hold(len).await else {
                    return;
                };
                quic::read_payload(&mut recv, len)
                    .await
                    .map(|m| Some((m, held)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let end = !matches!(m, Ok(Some(_)));
        if out.send(m).await.is_err() || end {
            return;
        }
    }
}

/// Writes each batch's outcome in the order the batches arrived, and the
/// catalog messages between them.
async fn write_replies(mut send: SendStream, mut pending: mpsc::Receiver<Outgoing>) {
    while let Some(next) = pending.recv().await {
        let rx = match next {
            Outgoing::Outcome(rx, held) => (rx, held),
            Outgoing::Message(m) => {
                if quic::write_message(&mut send, &m.into()).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let (rx, held) = rx;
        let decided = rx.await;
        drop(held);
        let message = match decided {
            Ok(Outcome::Ack(a)) => MessageV1::Ack(a),
            Ok(Outcome::Reject(r)) => MessageV1::Reject(r),
            Ok(Outcome::Discarded) => continue,
            Err(_) => break,
        };
        if quic::write_message(&mut send, &message.into())
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = send.finish();
}

/// Checks a batch's signature and signer before it may reach the store.
/// Only the signature check makes the body trustworthy; before it, the body
/// is peeked at solely to say which feed a rejection is about.
pub fn verify(
    peers: &Peers,
    peer: NodeId,
    department: &DepartmentCode,
    batch: SignedBatch,
) -> Incoming {
    let claimed: Option<BatchBody> = decode(&batch.body).ok();
    let (feed, seq) = claimed.map_or((None, 0), |b| (Some(b.feed), b.seq));
    let refused = |reason, detail: String| Incoming::Refused {
        feed: feed.clone(),
        seq,
        reason,
        detail,
    };
    if peers.get(&batch.signer).is_none() {
        let detail = match peers.revocation(&batch.signer) {
            Some(r) => format!(
                "signer {} was revoked at {}: {}",
                batch.signer, r.at, r.reason
            ),
            None => format!("signer {} is not enrolled", batch.signer),
        };
        return refused(RejectReason::UnknownSigner, detail);
    }
    if batch.signer != peer && !peers.same_agent(&batch.signer, &peer) {
        return refused(
            RejectReason::UnknownSigner,
            format!(
                "batch signed by {} but sent by {peer}; agents send only their own batches",
                batch.signer
            ),
        );
    }
    let hash = batch.hash();
    match batch.open() {
        Ok(body) if body.feed.department != *department => refused(
            RejectReason::WrongDepartment,
            format!(
                "feed {} belongs to department {}, the signer is enrolled for {department}",
                body.feed, body.feed.department
            ),
        ),
        Ok(body) => Incoming::Verified(Box::new(VerifiedBatch {
            signed: batch,
            body,
            hash,
        })),
        Err(e @ BatchError::BadSignature { .. }) => {
            refused(RejectReason::BadSignature, e.to_string())
        }
        Err(e @ BatchError::Malformed(_)) => refused(RejectReason::Malformed, e.to_string()),
        Err(e @ BatchError::Invalid { .. }) => refused(RejectReason::InvalidContent, e.to_string()),
    }
}
