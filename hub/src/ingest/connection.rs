//! One feed connection, from its handshake to its end: the same handler
//! for a department's agent and for a child hub (级联), parameterised by who
//! is on the other side (`Peer`).
//!
//! The connection opens one stream and greets: an agent with `Hello` (its
//! department and resources), a child hub with `HubHello` (the feeds it
//! forwards). The hub answers `Welcome` with its durable head of each feed,
//! after the writer decided what the peer's previous connection had queued.
//! Then every batch is verified ([`crate::verify`]) and handed to the
//! writer, and its reply written once decided ([`super::stream`]); catalogs
//! sync ([`super::catalog`]); an agent also reports its backlog, announces
//! key rotations ([`super::rotation`]) and answers comparison requests
//! ([`super::requests`]); a child hub registers the keys below it, adds
//! feeds and reports its subtree.
//!
//! Invariants: a peer greets within [`super::HELLO_TIMEOUT`] or is refused;
//! an agent speaks only for the department its key is enrolled for, a child
//! hub only for the departments registered below it; a message out of turn
//! ends the connection, counted and audited; a revoked key's connection is
//! closed at once, what it had in flight unanswered.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use shuyuan_link::quic::{self, QuicError};
use shuyuan_protocol::catalog::doc::Sender;
use shuyuan_protocol::federation::{HubHello, HubReport, Registration};
use shuyuan_protocol::message::{
    AgentReport, CatalogSync, FeedPosition, Hello, Reject, VerifyRefusal, Welcome,
};
use shuyuan_protocol::rotation::KeyRotation;
use shuyuan_protocol::{
    DepartmentCode, FeedId, Message, MessageV1, NodeId, RejectReason, SignedBatch, UnixMillis,
};
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::catalog::{receive_catalog, refuse_catalog, send_catalog, start_catalog};
use super::requests::{SentRequests, send_verify_requests};
use super::stream::{Outgoing, Read, read_messages, write_replies};
use super::{Budget, HELLO_TIMEOUT, Held, Ingest, PIPELINE, Refusal, handshake_refused, refused};
use crate::apply::VerifyEvent;
use crate::apply::audit::{AuditEntry, AuditKind};
use crate::apply::keys::{Enrollment, NodeKind};
use crate::federation;
use crate::live::{ChildInfo, ConnectionInfo};
use crate::verify;

/// How far an agent's clock may be off before the hub flags it.
pub const CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(300);

/// The QUIC close code of a connection whose key was revoked.
pub const REVOKED_CLOSE: u32 = 3;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    /// A department's agent.
    Agent(DepartmentCode),
    /// A child hub, carrying the departments registered below it.
    Hub(DepartmentCode),
}

impl Peer {
    fn of(enrollment: &Enrollment) -> Peer {
        match enrollment.kind {
            NodeKind::Hub => Peer::Hub(enrollment.department.clone()),
            _ => Peer::Agent(enrollment.department.clone()),
        }
    }

    /// The departments whose catalogs and feeds this connection carries.
    fn departments(&self, ingest: &Ingest, peer: &NodeId) -> BTreeSet<DepartmentCode> {
        match self {
            Peer::Agent(d) => BTreeSet::from([d.clone()]),
            Peer::Hub(_) => federation::carried(&ingest.peers, peer),
        }
    }

    fn span(&self, peer: &NodeId, remote: SocketAddr) -> tracing::Span {
        match self {
            Peer::Agent(department) => {
                tracing::info_span!("connection", peer = %peer.short(), %department, %remote)
            }
            Peer::Hub(code) => {
                tracing::info_span!("child_hub", peer = %peer.short(), %code, %remote)
            }
        }
    }
}

/// What a peer said in its greeting, once checked.
enum Greeting {
    Agent(Hello),
    Hub(HubHello),
}

impl Greeting {
    /// The feeds to report the hub's heads of.
    fn feeds(&self) -> Vec<FeedId> {
        match self {
            Greeting::Agent(h) => h
                .resources
                .iter()
                .map(|r| FeedId::new(h.department.clone(), r.clone()))
                .collect(),
            Greeting::Hub(h) => h.feeds.clone(),
        }
    }
}

/// A connection past its handshake and greeting.
struct Admitted {
    conn: Connection,
    peer: NodeId,
    remote: SocketAddr,
    budget: Budget,
}

/// Why a connection ended before its greeting was read.
#[derive(Debug)]
enum GreetingError {
    Timeout,
    Quic(QuicError),
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

/// Completes the handshake, reads the greeting and serves the connection
/// until it ends or its key is revoked.
pub(super) async fn handle(
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
    let who = Peer::of(&enrollment);
    let span = who.span(&peer, remote);
    let work = async {
        let (ended, lost) = match who {
            Peer::Agent(_) => ("agent disconnected", "connection ended"),
            Peer::Hub(_) => ("child hub disconnected", "child hub connection ended"),
        };
        match session(&ingest, &admitted, &who, greeted, &cancel).await {
            Ok(()) => tracing::info!("{ended}"),
            Err(e) => tracing::info!(reason = %e, "{lost}"),
        }
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

/// Counts, audits and closes a connection that did not greet properly; a
/// lost connection is only logged.
fn greeting_failed(
    ingest: &Ingest,
    conn: &Connection,
    peer: NodeId,
    remote: SocketAddr,
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

/// Checks the first message against who the key is enrolled as.
fn check_greeting(peer: NodeId, who: &Peer, first: Option<Message>) -> Result<Greeting, String> {
    match (who, first) {
        (Peer::Agent(department), Some(Message::V1(MessageV1::Hello(h)))) => {
            if h.department != *department {
                return Err(format!(
                    "key {peer} is enrolled for department {department}, but the agent says it serves {}",
                    h.department
                ));
            }
            Ok(Greeting::Agent(h))
        }
        (Peer::Hub(_), Some(Message::V1(MessageV1::HubHello(h)))) => Ok(Greeting::Hub(h)),
        (Peer::Agent(_), other) => Err(format!("expected Hello, got {}", first_name(&other))),
        (Peer::Hub(_), other) => Err(format!(
            "key {peer} is enrolled as a child hub, but it sent {} instead of HubHello",
            first_name(&other)
        )),
    }
}

/// Serves a greeted connection: `Welcome`, then its messages until it ends.
async fn session(
    ingest: &Ingest,
    admitted: &Admitted,
    who: &Peer,
    (mut send, recv, first): Greeted,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let Admitted {
        conn, peer, remote, ..
    } = admitted;
    let (peer, remote) = (*peer, *remote);
    let greeting = match check_greeting(peer, who, first) {
        Ok(g) => g,
        Err(detail) => return Err(refuse_connection(ingest, conn, &mut send, peer, detail).await),
    };
    // Batches of this peer's previous connection may still wait in the
    // writer's queue; report the heads after they are decided, or the peer
    // would resend (and the hub refuse as replays) batches it already has.
    ingest
        .store
        .barrier()
        .await
        .map_err(|e| SessionError::Refused(e.to_string()))?;
    let welcome = positions(ingest, &greeting.feeds())?;
    quic::write_message(&mut send, &MessageV1::Welcome(welcome).into()).await?;
    let id = ingest.live.next_id();
    let since = UnixMillis::now();
    match greeting {
        Greeting::Agent(hello) => {
            tracing::info!(software = %hello.software, resources = hello.resources.len(), "agent connected");
            ingest.live.register(
                id,
                ConnectionInfo {
                    peer,
                    department: hello.department,
                    resources: hello.resources,
                    remote,
                    since,
                    software: hello.software,
                    report: None,
                    clock_skew_ms: None,
                    connection: Some(conn.clone()),
                },
            );
            if let Err(e) = ingest.peers.connected(peer).await {
                tracing::warn!(error = %e, "cannot retire the key this one replaced");
            }
        }
        Greeting::Hub(hello) => {
            tracing::info!(software = %hello.software, name = %hello.name, feeds = hello.feeds.len(), "child hub connected");
            let code = match who {
                Peer::Hub(code) | Peer::Agent(code) => code.clone(),
            };
            ingest.live.register_child(
                id,
                ChildInfo {
                    peer,
                    code,
                    name: hello.name,
                    remote,
                    since,
                    software: hello.software,
                    feeds: hello.feeds,
                    tree: None,
                    connection: Some(conn.clone()),
                },
            );
        }
    }
    let (session, inbox) = Session::start(ingest, id, admitted, who.clone(), (send, recv)).await;
    let result = session.run(inbox, cancel).await;
    match who {
        Peer::Agent(_) => ingest.live.unregister(id),
        Peer::Hub(_) => ingest.live.unregister_child(id),
    }
    ingest.store.connection_closed(id);
    if let Err(SessionError::Refused(reason)) = &result {
        conn.close(2u32.into(), reason.as_bytes());
    }
    result
}

/// The hub's durable head of each feed.
fn positions(ingest: &Ingest, feeds: &[FeedId]) -> Result<Welcome, SessionError> {
    let heads = ingest
        .store
        .read(|t| {
            feeds
                .iter()
                .map(|feed| {
                    Ok(FeedPosition {
                        feed: feed.clone(),
                        cursor: t.feed(feed)?.map(|r| r.cursor).unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, crate::store::StoreError>>()
        })
        .map_err(|e| SessionError::Refused(e.to_string()))?;
    Ok(Welcome {
        software: shuyuan_protocol::SOFTWARE.to_string(),
        feeds: heads,
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

/// What the message loop does next.
type Flow = Result<(), SessionError>;

/// A connection's message loop and what it keeps.
struct Session<'a> {
    ingest: &'a Ingest,
    id: u64,
    peer: NodeId,
    who: Peer,
    out: mpsc::Sender<Outgoing>,
    replies: tokio::task::JoinHandle<()>,
    /// Comparison requests already sent on this connection.
    sent: SentRequests,
    /// The departments whose catalog sync has begun on this connection.
    syncing: BTreeSet<DepartmentCode>,
    /// Whether this connection's clock skew was audited already.
    clock_flagged: bool,
}

/// What the message loop waits on besides the hub stopping.
struct Inbox {
    /// The peer's messages, read on their own task.
    messages: mpsc::Receiver<Read>,
    reader: tokio::task::JoinHandle<()>,
    catalog_changes: broadcast::Receiver<DepartmentCode>,
    verify_events: broadcast::Receiver<VerifyEvent>,
}

impl<'a> Session<'a> {
    /// Starts the reply writer and the reader, and sends what is due at
    /// once: pending comparison requests and the catalogs. Subscribes to
    /// catalog and verification events first, so that none is missed
    /// between those sends and the loop.
    async fn start(
        ingest: &'a Ingest,
        id: u64,
        admitted: &Admitted,
        who: Peer,
        (send, recv): (SendStream, RecvStream),
    ) -> (Session<'a>, Inbox) {
        let (out, out_rx) = mpsc::channel::<Outgoing>(PIPELINE);
        let replies = tokio::spawn(write_replies(send, out_rx));
        let (in_tx, messages) = mpsc::channel::<Read>(PIPELINE);
        let reader = tokio::spawn(read_messages(recv, admitted.budget.clone(), in_tx));
        let inbox = Inbox {
            messages,
            reader,
            catalog_changes: ingest.catalog.subscribe(),
            verify_events: ingest.store.verify_events(),
        };
        let mut s = Session {
            ingest,
            id,
            peer: admitted.peer,
            who,
            out,
            replies,
            sent: SentRequests::default(),
            syncing: BTreeSet::new(),
            clock_flagged: false,
        };
        if let Peer::Agent(department) = &s.who
            && let Err(e) =
                send_verify_requests(ingest, department, None, &mut s.sent, &s.out).await
        {
            tracing::warn!(error = %e, "cannot send pending verification requests");
        }
        for department in s.who.departments(ingest, &s.peer) {
            start_catalog(ingest, &department, &s.peer, &s.out).await;
            s.syncing.insert(department);
        }
        (s, inbox)
    }

    /// Reads and answers messages until the peer ends the stream, breaks
    /// the protocol or the hub stops.
    async fn run(mut self, mut inbox: Inbox, cancel: &CancellationToken) -> Flow {
        let result = loop {
            let read = tokio::select! {
                _ = cancel.cancelled() => break Err(SessionError::Stopping),
                changed = inbox.catalog_changes.recv() => {
                    self.catalog_changed(changed).await;
                    continue;
                }
                event = inbox.verify_events.recv() => {
                    self.verify_event(event).await;
                    continue;
                }
                m = inbox.messages.recv() => m.unwrap_or(Ok(None)),
            };
            let (message, held) = match read {
                Ok(Some((Message::V1(m), held))) => (m, held),
                Ok(None) => break Ok(()),
                Err(e) => break Err(self.unreadable(e)),
            };
            if let Err(e) = self.message(message, held).await {
                break Err(e);
            }
        };
        inbox.reader.abort();
        let Session { out, replies, .. } = self;
        drop(out);
        let _ = replies.await;
        result
    }

    /// A read error: the peer's fault (a bad or cut frame) is counted and
    /// audited; a lost connection is not.
    fn unreadable(&self, e: QuicError) -> SessionError {
        match Refusal::of_read(&e) {
            Some(refusal) => {
                let detail = format!("unreadable frame: {e}");
                refused(&self.ingest.store, refusal, Some(self.peer), detail.clone());
                SessionError::Refused(format!("{}: {detail}", refusal.label()))
            }
            None => e.into(),
        }
    }

    /// One message from the peer.
    async fn message(&mut self, message: MessageV1, held: Held) -> Flow {
        match (&self.who, message) {
            (_, MessageV1::Batch(batch)) => self.batch(batch, held).await,
            (Peer::Agent(_), MessageV1::Report(report)) => {
                self.report(report);
                Ok(())
            }
            (Peer::Agent(_), MessageV1::KeyRotation(rotation)) => {
                self.key_rotation(&rotation).await
            }
            (Peer::Agent(department), MessageV1::VerifyRefused(refusal))
                if refusal.feed.department == *department =>
            {
                self.verify_refused(refusal).await;
                Ok(())
            }
            (_, MessageV1::Catalog(sync)) => {
                self.catalog(sync).await;
                Ok(())
            }
            (Peer::Hub(_), MessageV1::Registration(registration)) => {
                self.registration(registration).await
            }
            (Peer::Hub(_), MessageV1::Feeds(feeds)) => self.feeds(feeds).await,
            (Peer::Hub(_), MessageV1::Tree(tree)) => self.tree(tree),
            (who, other) => {
                let detail = format!(
                    "unexpected message from {} after the greeting: {}",
                    match who {
                        Peer::Hub(_) => "a child hub",
                        Peer::Agent(_) => "an agent",
                    },
                    other.name()
                );
                refused(
                    &self.ingest.store,
                    Refusal::Protocol,
                    Some(self.peer),
                    detail.clone(),
                );
                Err(SessionError::Refused(detail))
            }
        }
    }

    /// Queues a message for the reply writer.
    async fn send(&self, message: MessageV1) -> Flow {
        self.out
            .send(Outgoing::Message(message))
            .await
            .map_err(|_| SessionError::Refused("could not write replies".into()))
    }

    /// A batch: verified here, decided by the writer, answered in order.
    async fn batch(&self, batch: SignedBatch, held: Held) -> Flow {
        let incoming = match &self.who {
            Peer::Agent(department) => {
                verify::agent_batch(&self.ingest.peers, self.peer, department, batch)
            }
            Peer::Hub(_) => verify::forwarded_batch(&self.ingest.peers, self.peer, batch),
        };
        let outcome = match self.ingest.store.apply(self.id, self.peer, incoming).await {
            Ok(rx) => rx,
            Err(_) => return Err(SessionError::Stopping),
        };
        self.out
            .send(Outgoing::Outcome(outcome, held))
            .await
            .map_err(|_| SessionError::Refused("could not write replies".into()))
    }

    /// An agent's backlog report; a clock far off is audited once.
    fn report(&mut self, report: AgentReport) {
        let skew = self.ingest.live.report(self.id, report, UnixMillis::now());
        if skew.unsigned_abs() > CLOCK_SKEW_LIMIT.as_millis() as u64 && !self.clock_flagged {
            // Freshness goes by the hub's clock, so a wrong agent clock
            // misleads only the timestamps the agent writes.
            self.clock_flagged = true;
            let detail = format!(
                "the agent's clock is {} the hub's by {}s; its batch and zero-update timestamps are off by as much (fix its time sync)",
                if skew > 0 { "ahead of" } else { "behind" },
                skew.unsigned_abs() / 1000
            );
            tracing::warn!(skew_ms = skew, "{detail}");
            let mut entry = AuditEntry::new(AuditKind::ClockSkew, detail);
            entry.peer = Some(self.peer);
            self.ingest.store.audit(entry);
        }
    }

    /// An agent announces its next key. Recorded before the next message is
    /// read: the batches after it may be signed by the new key.
    async fn key_rotation(&self, rotation: &KeyRotation) -> Flow {
        let Peer::Agent(department) = &self.who else {
            return Ok(());
        };
        let reply = super::rotation::rotate(self.ingest, self.peer, department, rotation).await;
        self.send(reply).await
    }

    /// The agent cannot answer a comparison run.
    async fn verify_refused(&self, refusal: VerifyRefusal) {
        self.ingest.store.refuse_verify(self.peer, refusal).await;
    }

    /// A catalog sync message: an agent's of its own department, a child
    /// hub's of a department registered below it.
    async fn catalog(&mut self, sync: CatalogSync) {
        let (ingest, peer) = (self.ingest, self.peer);
        if let Peer::Agent(department) = &self.who {
            receive_catalog(
                ingest,
                peer,
                department,
                Sender::Department,
                sync,
                &self.out,
            )
            .await;
            return;
        }
        if !self.syncing.contains(&sync.department)
            && self
                .who
                .departments(ingest, &peer)
                .contains(&sync.department)
        {
            // Registered since the connection began.
            start_catalog(ingest, &sync.department, &peer, &self.out).await;
            self.syncing.insert(sync.department.clone());
        }
        let department = sync.department.clone();
        if self.syncing.contains(&department) {
            receive_catalog(
                ingest,
                peer,
                &department,
                Sender::Federation,
                sync,
                &self.out,
            )
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
                &self.out,
            )
            .await;
        }
    }

    /// A catalog changed at the hub: its peers on this connection are sent
    /// the change (every catalog when changes were missed).
    async fn catalog_changed(&self, changed: Result<DepartmentCode, broadcast::error::RecvError>) {
        let changed = match changed {
            Ok(d) => Some(d),
            Err(broadcast::error::RecvError::Lagged(_)) => None,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for department in self
            .syncing
            .iter()
            .filter(|d| changed.as_ref().is_none_or(|c| c == *d))
        {
            if let Err(e) = send_catalog(self.ingest, department, &self.peer, &self.out).await {
                tracing::warn!(error = %e, "cannot send catalog changes");
            }
        }
    }

    /// A committed verification event: an agent is sent its feeds' new
    /// requests and the verdicts of its runs.
    async fn verify_event(&mut self, event: Result<VerifyEvent, broadcast::error::RecvError>) {
        let Peer::Agent(department) = &self.who else {
            return;
        };
        let feed = match event {
            Ok(VerifyEvent::Requests(feed)) if feed.department == *department => Some(feed),
            Ok(VerifyEvent::Finished(outcome)) if outcome.feed.department == *department => {
                let _ = self.send(MessageV1::Verified(outcome)).await;
                return;
            }
            Ok(_) | Err(broadcast::error::RecvError::Closed) => return,
            Err(broadcast::error::RecvError::Lagged(_)) => None,
        };
        if let Err(e) = send_verify_requests(
            self.ingest,
            department,
            feed.as_ref(),
            &mut self.sent,
            &self.out,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot send verification requests");
        }
    }

    /// A child hub registers a key below it (an agent's or a hub's).
    async fn registration(&mut self, registration: Registration) -> Flow {
        let (ingest, peer) = (self.ingest, self.peer);
        match federation::check_registration(&ingest.peers, &ingest.node, &peer, registration) {
            Ok(None) => Ok(()),
            Ok(Some((key, enrollment))) => {
                let department = (!enrollment.is_hub()).then(|| enrollment.department.clone());
                match ingest.peers.enroll(key, enrollment).await {
                    Ok(_) => {
                        if let Some(d) = department
                            && self.syncing.insert(d.clone())
                        {
                            start_catalog(ingest, &d, &peer, &self.out).await;
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
                        let _ = self.send(MessageV1::Reject(reject)).await;
                    }
                }
                Ok(())
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
                let _ = self.send(MessageV1::Reject(reject)).await;
                if refusal.is_loop {
                    return Err(SessionError::Refused(refusal.detail));
                }
                Ok(())
            }
        }
    }

    /// A child hub forwards more feeds: the hub's heads of them.
    async fn feeds(&self, feeds: Vec<FeedId>) -> Flow {
        // Batches of these feeds already queued are decided first.
        if self.ingest.store.barrier().await.is_err() {
            return Err(SessionError::Stopping);
        }
        let welcome = positions(self.ingest, &feeds)?;
        self.ingest.live.update_child(self.id, |c| {
            for f in feeds {
                if !c.feeds.contains(&f) {
                    c.feeds.push(f);
                }
            }
        });
        let _ = self.send(MessageV1::Welcome(welcome)).await;
        Ok(())
    }

    /// A child hub's report of its subtree; this hub inside it is a loop.
    fn tree(&self, tree: HubReport) -> Flow {
        if tree.hubs().contains(&self.ingest.node) {
            let detail = format!(
                "child hub {} reports this hub in its own subtree: a loop; refusing the link",
                self.peer
            );
            tracing::error!(%detail);
            refused(
                &self.ingest.store,
                Refusal::Protocol,
                Some(self.peer),
                detail.clone(),
            );
            return Err(SessionError::Refused(detail));
        }
        self.ingest
            .live
            .update_child(self.id, |c| c.tree = Some(tree));
        Ok(())
    }
}
