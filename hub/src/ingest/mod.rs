//! Ingest: the hub's listener and what it admits.
//!
//! This module accepts QUIC connections within limits and hands each to
//! [`connection`], one handler for agents and child hubs alike: it reads
//! `Hello` (or `HubHello`), answers `Welcome` with the hub's durable head
//! of each feed, then has every batch verified ([`crate::verify`]) and
//! handed to the writer ([`crate::writer`]); replies go back in order once
//! the writer's transaction has committed ([`stream`]). The same connection
//! syncs catalogs ([`catalog`]), carries key rotations ([`rotation`]) and
//! the hub's comparison requests to the agent ([`requests`]).
//!
//! Invariants: nothing is acknowledged before it is durable; a batch whose
//! signature fails is never decoded as trusted (its claimed feed is only
//! used to route the rejection); an agent writes only feeds of the
//! department its key is enrolled for; every refusal is counted and audited.
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

pub mod catalog;
pub mod connection;
pub mod requests;
pub mod rotation;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shuyuan_link::quic::{self, QuicError};
use shuyuan_protocol::frame::MAX_FRAME_SIZE;
use shuyuan_protocol::{NodeId, RejectReason};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::apply::audit::{AuditEntry, AuditKind};
use crate::catalog::HubCatalog;
use crate::live::Live;
use crate::peers::Peers;
use crate::throttle::{self, AuditThrottle};
use crate::writer::Store;

pub use connection::{CLOCK_SKEW_LIMIT, REVOKED_CLOSE};

/// How long a new connection may take, after the QUIC handshake, to open
/// its stream and say `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches of one connection queued for the writer before reading pauses.
pub(crate) const PIPELINE: usize = 256;
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
    pub(crate) fn of_read(e: &QuicError) -> Option<Refusal> {
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
pub(crate) fn refused(store: &Store, refusal: Refusal, peer: Option<NodeId>, detail: String) {
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
pub(crate) struct Budget {
    connection: Arc<Semaphore>,
    total: Arc<Semaphore>,
}

/// The budget one read message holds until it is decided.
#[derive(Debug)]
pub(crate) struct Held {
    _connection: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Budget {
    /// Waits until `bytes` fit both budgets; `None` if the hub closed them.
    pub(crate) async fn hold(&self, bytes: usize) -> Option<Held> {
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
            connection::handle(ingest, incoming, handshake, budget, cancel).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Counts and audits a handshake that did not complete.
pub(crate) fn handshake_refused(
    ingest: &Ingest,
    remote: std::net::SocketAddr,
    e: &quinn::ConnectionError,
) {
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
