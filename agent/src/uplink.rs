//! The uplink: the agent's QUIC connection to the hub.
//!
//! It introduces the agent (`Hello`), learns the hub's durable head of each
//! feed (`Welcome`), checks that the hub's chain is the agent's own, then
//! streams batches from the outbox through the [`SendWindow`] and hands the
//! hub's acks to the capture loop, which prunes the outbox. Lost
//! connections are retried with backoff; every new connection resumes right
//! after what the hub durably holds.
//!
//! Invariant: the uplink never deletes anything itself; it only reports acks.

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use quinn::{ConnectionError, Endpoint};
use shuyuan_link::client::{self as link, WelcomeError};
use shuyuan_link::quic::{self, DialError, QuicError};
use shuyuan_protocol::message::{
    AgentReport, CatalogRefusal, CatalogSync, FeedPosition, Hello, Reject, VerifyRefusal,
};
use shuyuan_protocol::rotation::{KeyRotated, KeyRotation};
use shuyuan_protocol::window::{SendWindow, WindowError};
use shuyuan_protocol::{FeedId, Message, MessageV1, NodeKey, UnixMillis};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::capture::{AckNote, CaptureInput, CaptureRequest};
use crate::catalog::{Catalog, CatalogStoreError};
use crate::config::Config;
use crate::outbox::{Outbox, OutboxError};
use crate::rotation;
use crate::source::Probe;
use crate::status::{LinkState, StatusBoard};

/// Batches per feed sent ahead of the hub's acks.
pub const MAX_IN_FLIGHT: u64 = 32;
/// How often the agent reports its backlog to the hub.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How long the hub may take to answer `Hello` or the handshake.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot resolve hub address {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Chain(String),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("cannot set up QUIC: {0}")]
    Setup(String),
}

/// The uplink task.
#[derive(Debug)]
pub struct Uplink {
    pub config: Arc<Config>,
    /// The key to connect with, and a key rotation to announce first on
    /// every connection until the hub confirms it.
    pub keys: std::sync::Mutex<(NodeKey, Option<KeyRotation>)>,
    pub outbox: Outbox,
    /// Acks, and the hub's comparison requests, go to the capture loop.
    pub capture: Sender<CaptureInput>,
    pub sealed: Arc<Notify>,
    pub status: StatusBoard,
    pub catalog: Catalog,
}

/// One uplink connection attempt after another (see [`link::keep_connected`]).
struct Link<'a> {
    uplink: &'a Uplink,
    cancel: &'a CancellationToken,
}

impl link::Session for Link<'_> {
    type Error = SessionError;

    async fn session(
        &self,
        endpoint: &mut Option<quinn::Endpoint>,
        established: &mut bool,
    ) -> Result<(), SessionError> {
        self.uplink.set_link(LinkState::Connecting, None);
        // Built for each attempt: a confirmed key rotation changes the key.
        let key = self.uplink.identity().0;
        let client = quic::client_config(&key, self.uplink.config.hub.key)
            .map_err(|e| SessionError::Setup(e.to_string()))?;
        self.uplink
            .session(&client, endpoint, self.cancel, established)
            .await
    }

    fn failed(&self, e: &SessionError, news: bool) {
        let text = e.to_string();
        let auth = matches!(e, SessionError::Auth(_));
        self.uplink.set_link(
            if auth {
                LinkState::AuthenticationFailed
            } else {
                LinkState::Disconnected
            },
            Some(text.clone()),
        );
        if news {
            if auth || matches!(e, SessionError::Chain(_)) {
                tracing::error!(error = %text, "hub connection failed");
            } else {
                tracing::warn!(error = %text, "hub connection lost; reconnecting with backoff");
            }
        }
    }
}

impl Uplink {
    /// Connects, streams, reconnects; until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let link = Link {
            uplink: &self,
            cancel: &cancel,
        };
        link::keep_connected(&link, &cancel).await;
    }

    /// The key to connect with and the rotation still to announce.
    fn identity(&self) -> (NodeKey, Option<KeyRotation>) {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The hub recorded the rotation: the next key becomes current.
    fn rotated(&self, r: &KeyRotated) -> Result<(), SessionError> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(pending) = keys.1.as_ref().and_then(|p| p.open().ok()) else {
            return Ok(());
        };
        if (pending.old, pending.new) != (r.old, r.new) {
            return Err(SessionError::Protocol(format!(
                "the hub confirmed a rotation {} -> {} that this agent did not announce",
                r.old, r.new
            )));
        }
        let key = rotation::finish(&self.config).map_err(|e| SessionError::Setup(e.to_string()))?;
        tracing::info!(old = %r.old, new = %r.new, "the hub confirmed the key rotation (密钥轮换); the new key is now the agent's key");
        let text = key.id().to_string();
        *keys = (key, None);
        drop(keys);
        self.status.update(|s| s.node = text);
        Ok(())
    }

    /// Records the link state. `since` is when the link last went up or
    /// down; while reconnecting, the last error stays visible.
    fn set_link(&self, link: LinkState, detail: Option<String>) {
        self.status.update(|s| {
            let was_up = s.hub.link == LinkState::Connected;
            let is_up = link == LinkState::Connected;
            if was_up != is_up || s.hub.since.is_none() {
                s.hub.since = Some(UnixMillis::now());
            }
            s.hub.link = link;
            if detail.is_some() || link == LinkState::Connected {
                s.hub.detail = detail;
            }
        });
    }

    fn connection_error(&self, e: &ConnectionError) -> SessionError {
        let explained = quic::explain(e);
        if quic::is_auth_failure(e) {
            if explained.contains("hub key mismatch") {
                SessionError::Auth(format!(
                    "the server at {} is not the configured hub ({explained}); check hub.key in {}",
                    self.config.hub.address,
                    self.config.file.display()
                ))
            } else {
                let key = self.identity().0.id();
                SessionError::Auth(format!(
                    "authentication failed: the hub at {} refused this agent's key {key}. \
                     Ask the hub administrator to run: shuyuan-hub enroll --department {} --name \"<department name>\" {key}",
                    self.config.hub.address, self.config.department,
                ))
            }
        } else {
            SessionError::Lost(format!(
                "connection to the hub at {} lost: {explained}",
                self.config.hub.address
            ))
        }
    }

    fn quic_error(&self, e: QuicError) -> SessionError {
        if let Some(c) = link::lost_connection(&e) {
            return self.connection_error(c);
        }
        match e {
            QuicError::Frame(f) => SessionError::Protocol(f.to_string()),
            other => SessionError::Lost(other.to_string()),
        }
    }

    async fn session(
        &self,
        client: &quinn::ClientConfig,
        endpoint: &mut Option<Endpoint>,
        cancel: &CancellationToken,
        established: &mut bool,
    ) -> Result<(), SessionError> {
        let (addr, conn, mut send, mut recv) =
            quic::dial(endpoint, client, &self.config.hub.address, ANSWER_TIMEOUT)
                .await
                .map_err(|e| match e {
                    DialError::Resolve { address, reason } => {
                        SessionError::Resolve { address, reason }
                    }
                    DialError::Setup(e) => SessionError::Setup(e),
                    DialError::Timeout(addr, t) => SessionError::Lost(format!(
                        "no answer from the hub at {addr} within {}s",
                        t.as_secs()
                    )),
                    DialError::Connection(e) => self.connection_error(&e),
                })?;
        let hello = Hello {
            software: shuyuan_protocol::SOFTWARE.to_string(),
            department: self.config.department.clone(),
            resources: self
                .config
                .resources
                .iter()
                .map(|r| r.code.clone())
                .collect(),
        };
        quic::write_message(&mut send, &MessageV1::Hello(hello).into())
            .await
            .map_err(|e| self.quic_error(e))?;
        let welcome = link::read_welcome(&mut recv, ANSWER_TIMEOUT)
            .await
            .map_err(|e| match e {
                WelcomeError::Quic(e) => self.quic_error(e),
                WelcomeError::Refused(r) => SessionError::Auth(format!(
                    "the hub refused this agent: {} ({})",
                    r.detail, r.reason
                )),
                other => SessionError::Protocol(format!("answering Hello: {other}")),
            })?;
        self.check_chains(&welcome.feeds)?;
        // Before any batch: those sealed since the rotation are signed by
        // the new key, which the hub learns of here.
        if let Some(rotation) = self.identity().1 {
            quic::write_message(&mut send, &MessageV1::KeyRotation(rotation).into())
                .await
                .map_err(|e| self.quic_error(e))?;
        }
        let local = self.outbox.feeds()?;
        let (mut window, prune) = SendWindow::start(
            &welcome.feeds,
            |f| local.get(f).map_or(0, |s| s.head.last_seq),
            MAX_IN_FLIGHT,
        )?;
        let now = UnixMillis::now();
        for (feed, seq) in prune {
            if seq > local.get(&feed).map_or(0, |s| s.acked) {
                let _ = self
                    .capture
                    .send(CaptureInput::Ack(AckNote { feed, seq, at: now }));
            }
        }
        *established = true;
        tracing::info!(hub = %addr, hub_software = %welcome.software, "connected to the hub");
        self.set_link(LinkState::Connected, None);
        let hub = self.config.hub.key;
        self.catalog
            .begin_sync(&hub)
            .map_err(|e| SessionError::Setup(e.to_string()))?;
        let catalog_changed = self.catalog.changed();
        let (refusals_tx, mut refusals_rx) = mpsc::unbounded_channel::<VerifyRefusal>();
        self.send_catalog(&mut send).await?;

        let (_reader, mut rx) = link::spawn_reader(recv);
        let mut report = tokio::time::interval(REPORT_INTERVAL);
        loop {
            let now = UnixMillis::now();
            while let Some((feed, seq)) = window.poll_send(now) {
                let batch = self.outbox.batch(&feed, seq)?.ok_or_else(|| {
                    SessionError::Chain(format!("batch {seq} of {feed} is missing from the outbox"))
                })?;
                quic::write_message(&mut send, &MessageV1::Batch(batch).into())
                    .await
                    .map_err(|e| self.quic_error(e))?;
            }
            let wake = window
                .next_wakeup()
                .map(|t| tokio::time::Instant::now() + t.since(UnixMillis::now()));
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = send.finish();
                    conn.close(0u32.into(), b"agent stopping");
                    return Ok(());
                }
                m = rx.recv() => match m {
                    Some(Ok(Some(Message::V1(MessageV1::Catalog(sync))))) => {
                        self.receive_catalog(sync).await;
                        self.send_catalog(&mut send).await?;
                    }
                    Some(Ok(Some(Message::V1(MessageV1::CatalogRefused(r))))) => self.catalog_refused(&r),
                    Some(Ok(Some(Message::V1(m)))) => self.handle(&mut window, m, &refusals_tx)?,
                    Some(Ok(None)) | None => return Err(SessionError::Lost("the hub closed the stream".into())),
                    Some(Err(e)) => return Err(self.quic_error(e)),
                },
                _ = catalog_changed.notified() => self.send_catalog(&mut send).await?,
                Some(refusal) = refusals_rx.recv() => {
                    quic::write_message(&mut send, &MessageV1::VerifyRefused(refusal).into())
                        .await
                        .map_err(|e| self.quic_error(e))?;
                }
                _ = self.sealed.notified() => {
                    for (feed, state) in self.outbox.feeds()? {
                        window.set_head(&feed, state.head.last_seq);
                    }
                }
                _ = async { if let Some(w) = wake { tokio::time::sleep_until(w).await } }, if wake.is_some() => {}
                _ = report.tick() => {
                    let s = self.status.snapshot();
                    let r = AgentReport {
                        at: UnixMillis::now(),
                        outbox_batches: s.outbox.batches,
                        outbox_bytes: s.outbox.bytes,
                        outbox_limit_bytes: s.outbox.limit_bytes,
                        capture_paused: s.source.paused_outbox_full
                            || s.outbox.write_failure.is_some(),
                    };
                    quic::write_message(&mut send, &MessageV1::Report(r).into())
                        .await
                        .map_err(|e| self.quic_error(e))?;
                }
            }
        }
    }

    fn handle(
        &self,
        window: &mut SendWindow,
        m: MessageV1,
        refusals: &mpsc::UnboundedSender<VerifyRefusal>,
    ) -> Result<(), SessionError> {
        let now = UnixMillis::now();
        match m {
            MessageV1::Ack(ack) => {
                if let Some(seq) = window.on_ack(&ack.feed, ack.seq)? {
                    let _ = self.capture.send(CaptureInput::Ack(AckNote {
                        feed: ack.feed,
                        seq,
                        at: now,
                    }));
                }
                Ok(())
            }
            MessageV1::KeyRotated(r) => self.rotated(&r),
            MessageV1::Reject(r) => {
                self.record_rejection(&r);
                let Some(feed) = r.feed else {
                    return Err(SessionError::Protocol(format!(
                        "the hub rejected a message: {} ({})",
                        r.detail, r.reason
                    )));
                };
                if let Some(seq) = window.on_reject(&feed, r.resend_from, now)? {
                    let _ = self
                        .capture
                        .send(CaptureInput::Ack(AckNote { feed, seq, at: now }));
                }
                Ok(())
            }
            MessageV1::Verify(v) => {
                let resource = (v.feed.department == self.config.department)
                    .then(|| {
                        self.config
                            .resources
                            .iter()
                            .position(|r| r.code == v.feed.resource)
                    })
                    .flatten();
                match resource {
                    Some(resource) => {
                        tracing::debug!(feed = %v.feed, run = v.run, range = %v.range, "the hub asks to compare a range");
                        let _ = self
                            .capture
                            .send(CaptureInput::Request(CaptureRequest::Probe {
                                probe: Probe {
                                    resource,
                                    run: v.run,
                                    range: v.range,
                                    mode: v.mode,
                                },
                                refusals: refusals.clone(),
                            }));
                    }
                    None => {
                        tracing::warn!(feed = %v.feed, "the hub asks to compare a resource this agent does not share; ignored")
                    }
                }
                Ok(())
            }
            MessageV1::Verified(outcome) => {
                if outcome.refused {
                    tracing::warn!(feed = %outcome.feed, run = outcome.run, detail = %outcome.detail, "the hub could not verify its copy");
                } else if outcome.verified {
                    tracing::info!(feed = %outcome.feed, run = outcome.run, seq = outcome.seq, repaired = outcome.rows_repaired, removed = outcome.rows_removed, "the hub verified its copy against the source");
                } else {
                    tracing::warn!(feed = %outcome.feed, run = outcome.run, detail = %outcome.detail, "the hub's copy still differs from the source");
                }
                self.status.update(|s| {
                    s.verifications.retain(|v| v.feed != outcome.feed);
                    s.verifications.push(outcome);
                });
                Ok(())
            }
            other => Err(SessionError::Protocol(format!(
                "unexpected message from the hub: {other:?}"
            ))),
        }
    }

    /// Sends every catalog sync message there is to send now.
    async fn send_catalog(&self, send: &mut quinn::SendStream) -> Result<(), SessionError> {
        let hub = self.config.hub.key;
        while let Some(message) = self.catalog.next_message(&hub) {
            let sync = CatalogSync {
                department: self.config.department.clone(),
                message,
            };
            quic::write_message(send, &MessageV1::Catalog(sync).into())
                .await
                .map_err(|e| self.quic_error(e))?;
        }
        Ok(())
    }

    /// Applies the hub's catalog changes (review fields only).
    async fn receive_catalog(&self, sync: CatalogSync) {
        if sync.department != self.config.department {
            tracing::warn!(department = %sync.department, "the hub sent another department's catalog; ignored");
            return;
        }
        let catalog = self.catalog.clone();
        let hub = self.config.hub.key;
        let result =
            tokio::task::spawn_blocking(move || catalog.receive(&hub, &sync.message)).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(CatalogStoreError::Doc(e))) => {
                Some(format!("refused the hub's catalog changes: {e}"))
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(text) = &error {
            tracing::error!(error = %text, "catalog sync");
        }
        self.status.update(|s| s.hub.catalog_error = error);
    }

    fn catalog_refused(&self, r: &CatalogRefusal) {
        let text = format!(
            "the hub refused catalog changes: {} ({})",
            r.detail, r.reason
        );
        tracing::error!(reason = %r.reason, detail = %r.detail, "the hub refused catalog changes");
        self.status.update(|s| s.hub.catalog_error = Some(text));
    }

    fn record_rejection(&self, r: &Reject) {
        let feed = r
            .feed
            .as_ref()
            .map_or_else(|| "?".to_string(), FeedId::to_string);
        let text = format!(
            "batch {} of {feed}: {} ({}); resending from {}",
            r.seq, r.detail, r.reason, r.resend_from
        );
        tracing::warn!(%feed, seq = r.seq, reason = %r.reason, detail = %r.detail, "the hub rejected a batch");
        self.status.update(|s| {
            s.hub.rejections += 1;
            s.hub.last_rejection = Some(text);
        });
    }

    /// The hub's head of each feed must be a batch of this agent's own
    /// chain; otherwise the two disagree about history and sending on would
    /// only produce forks.
    fn check_chains(&self, positions: &[FeedPosition]) -> Result<(), SessionError> {
        let local = self.outbox.feeds()?;
        for p in positions {
            let hub = p.cursor;
            if hub.last_seq == 0 {
                continue;
            }
            let state = local.get(&p.feed).cloned().unwrap_or_default();
            let ours = if hub.last_seq == state.head.last_seq {
                Some(state.head.last_hash)
            } else if hub.last_seq < state.head.last_seq {
                match self.outbox.batch(&p.feed, hub.last_seq + 1)? {
                    Some(next) => Some(
                        next.open()
                            .map_err(|e| {
                                SessionError::Chain(format!(
                                    "outbox batch {} of {} is damaged: {e}",
                                    hub.last_seq + 1,
                                    p.feed
                                ))
                            })?
                            .prev,
                    ),
                    None => {
                        return Err(SessionError::Chain(format!(
                            "the hub holds {} batches of {} but this agent already pruned batch {}; the hub lost acknowledged data",
                            hub.last_seq,
                            p.feed,
                            hub.last_seq + 1
                        )));
                    }
                }
            } else {
                None // the window reports "hub ahead"
            };
            if let Some(ours) = ours
                && ours != hub.last_hash
            {
                return Err(SessionError::Chain(format!(
                    "the hub's chain of {} differs from this agent's at batch {}; this agent's data directory was probably replaced. \
                     Sending stopped to avoid a fork; ask the hub administrator",
                    p.feed, hub.last_seq
                )));
            }
        }
        Ok(())
    }
}
