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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use shuyuan_protocol::batch::BatchError;
use shuyuan_protocol::catalog::doc::{CatalogError, Sender};
use shuyuan_protocol::encoding::decode;
use shuyuan_protocol::message::{
    CatalogRefusal, CatalogSync, FeedPosition, Reject, VerifyRequest, Welcome,
};
use shuyuan_protocol::quic::{self, QuicError};
use shuyuan_protocol::{
    BatchBody, DepartmentCode, FeedId, Message, MessageV1, NodeId, RejectReason, SignedBatch,
    UnixMillis,
};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
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

/// How long a new connection may take to open its stream and say `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches of one connection queued for the writer before reading pauses.
const PIPELINE: usize = 256;

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

/// Accepts connections until `cancel` fires, at most `max` at once.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ingest: Arc<Ingest>,
    max: usize,
    cancel: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(max));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let ingest = ingest.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            handle(ingest, incoming, cancel).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn handle(ingest: Arc<Ingest>, incoming: quinn::Incoming, cancel: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Refused keys were already logged and audited by the verifier.
            tracing::debug!(%remote, error = %quic::explain(&e), "handshake failed");
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
    if enrollment.kind == NodeKind::Hub {
        let span = tracing::info_span!("child_hub", peer = %peer.short(), code = %enrollment.department, %remote);
        async move {
            match child_session(&ingest, &conn, peer, &enrollment, remote, &cancel).await {
                Ok(()) => tracing::info!("child hub disconnected"),
                Err(e) => tracing::info!(reason = %e, "child hub connection ended"),
            }
        }
        .instrument(span)
        .await;
        return;
    }
    let span = tracing::info_span!("connection", peer = %peer.short(), department = %enrollment.department, %remote);
    async move {
        match session(&ingest, &conn, peer, &enrollment, remote, &cancel).await {
            Ok(()) => tracing::info!("agent disconnected"),
            Err(e) => tracing::info!(reason = %e, "connection ended"),
        }
    }
    .instrument(span)
    .await;
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

/// Accepts the connection's stream and reads its first message, each
/// within [`HELLO_TIMEOUT`].
async fn greeting(
    conn: &Connection,
) -> Result<(SendStream, RecvStream, Option<Message>), SessionError> {
    let opened = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await;
    let (send, mut recv) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(QuicError::Connection(e).into()),
        Err(_) => return Err(SessionError::Refused("no stream opened".into())),
    };
    match tokio::time::timeout(HELLO_TIMEOUT, quic::read_message(&mut recv)).await {
        Ok(Ok(first)) => Ok((send, recv, first)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(SessionError::Refused("no greeting".into())),
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
    conn: &Connection,
    peer: NodeId,
    enrollment: &Enrollment,
    remote: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let (mut send, recv, first) = greeting(conn).await?;
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
        },
    );
    tracing::info!(software = %hello.software, resources = hello.resources.len(), "agent connected");
    let who = Who::Agent(enrollment.department.clone());
    let result = stream_batches(ingest, id, peer, &who, send, recv, cancel).await;
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
    conn: &Connection,
    peer: NodeId,
    enrollment: &Enrollment,
    remote: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let (mut send, recv, first) = greeting(conn).await?;
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
        },
    );
    tracing::info!(software = %hello.software, name = %hello.name, feeds = hello.feeds.len(), "child hub connected");
    let result = stream_batches(ingest, id, peer, &Who::Hub, send, recv, cancel).await;
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
    tracing::warn!(%detail, "connection refused");
    let mut entry = AuditEntry::new(AuditKind::ConnectionRefused, detail.clone());
    entry.peer = Some(peer);
    ingest.store.audit(entry);
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
    /// A batch's ack or rejection, once the store has decided.
    Outcome(oneshot::Receiver<Outcome>),
    /// A message to send as it is (catalog sync).
    Message(MessageV1),
}

async fn stream_batches(
    ingest: &Ingest,
    id: u64,
    peer: NodeId,
    who: &Who,
    send: SendStream,
    mut recv: RecvStream,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(PIPELINE);
    let replies = tokio::spawn(write_replies(send, out_rx));
    // Reading is not cancel-safe, so it runs on its own and hands over whole
    // messages; the bounded channel keeps QUIC flow control in charge.
    let (in_tx, mut in_rx) = mpsc::channel(PIPELINE);
    let reader = tokio::spawn(async move {
        loop {
            let m = quic::read_message(&mut recv).await;
            let end = !matches!(m, Ok(Some(_)));
            if in_tx.send(m).await.is_err() || end {
                break;
            }
        }
    });
    let mut catalog_changes = ingest.catalog.subscribe();
    let mut verify_events = ingest.store.verify_events();
    let mut sent = SentRequests::default();
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
        let message = match message {
            Ok(Some(Message::V1(m))) => m,
            Ok(None) => break Ok(()),
            Err(QuicError::Frame(e)) => {
                let detail = format!("unreadable frame: {e}");
                let mut entry = AuditEntry::new(AuditKind::ConnectionRefused, detail.clone());
                entry.peer = Some(peer);
                entry.reason = Some(RejectReason::Malformed);
                ingest.store.audit(entry);
                break Err(SessionError::Refused(detail));
            }
            Err(e) => break Err(e.into()),
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
                if out_tx.send(Outgoing::Outcome(outcome)).await.is_err() {
                    break Err(SessionError::Refused("could not write replies".into()));
                }
            }
            (Who::Agent(_), MessageV1::Report(report)) => ingest.live.report(id, report),
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
                    let mut entry = AuditEntry::new(AuditKind::ConnectionRefused, detail.clone());
                    entry.peer = Some(peer);
                    entry.reason = Some(RejectReason::ProtocolViolation);
                    ingest.store.audit(entry);
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
                let mut entry = AuditEntry::new(AuditKind::ConnectionRefused, detail.clone());
                entry.peer = Some(peer);
                entry.reason = Some(RejectReason::ProtocolViolation);
                ingest.store.audit(entry);
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

/// Writes each batch's outcome in the order the batches arrived, and the
/// catalog messages between them.
async fn write_replies(mut send: SendStream, mut pending: mpsc::Receiver<Outgoing>) {
    while let Some(next) = pending.recv().await {
        let rx = match next {
            Outgoing::Outcome(rx) => rx,
            Outgoing::Message(m) => {
                if quic::write_message(&mut send, &m.into()).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let message = match rx.await {
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
        return refused(
            RejectReason::UnknownSigner,
            format!("signer {} is not enrolled", batch.signer),
        );
    }
    if batch.signer != peer {
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
