//! The uplink: the agent's QUIC connection to the hub.
//!
//! It introduces the agent (`Hello`), announces a pending key rotation
//! before any batch, syncs the department's catalog with the hub, streams
//! batches from the outbox and hands the hub's acks to the capture loop,
//! which prunes the outbox. Connecting, the hub's `Welcome`, the chain
//! check, the send window and reconnecting with backoff are the shared
//! link client ([`link::keep_connected`] driving a
//! [`shuyuan_protocol::sender::FeedSender`]); this file is what only an
//! agent does: its outbox facts, its key rotation, the hub's comparison
//! requests (`Verify`) and the backlog reports.
//!
//! Invariant: the uplink never deletes anything itself; it only reports acks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use shuyuan_link::client::{self as link, Connection, LinkError, LinkPhase, LinkSide, PeerWords};
use shuyuan_link::quic;
use shuyuan_protocol::message::{
    AgentReport, CatalogRefusal, CatalogSync, FeedPosition, Hello, VerifyOutcome, VerifyRefusal,
    VerifyRequest, Welcome,
};
use shuyuan_protocol::rotation::{KeyRotated, KeyRotation};
use shuyuan_protocol::sender::{AtPeerHead, FeedSender, LocalFeed, Role};
use shuyuan_protocol::{DepartmentCode, FeedId, MessageV1, NodeKey, SignedBatch, UnixMillis};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::capture::{AckNote, CaptureInput, CaptureRequest};
use crate::catalog::{Catalog, CatalogStoreError};
use crate::config::Config;
use crate::outbox::Outbox;
use crate::rotation;
use crate::source::Probe;
use crate::status::{LinkState, StatusBoard};

/// Batches per feed sent ahead of the hub's acks.
pub const MAX_IN_FLIGHT: u64 = 32;
/// How often the agent reports its backlog to the hub.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

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

/// The uplink as the shared link client's side, with what one connection
/// keeps.
struct HubLink<'a> {
    uplink: &'a Uplink,
    catalog_changed: Arc<Notify>,
    /// The capture loop's answers to comparison requests it cannot serve.
    refusals: (
        mpsc::UnboundedSender<VerifyRefusal>,
        mpsc::UnboundedReceiver<VerifyRefusal>,
    ),
    report: tokio::time::Interval,
}

/// What wakes a connection besides the hub's messages.
enum Wake {
    CatalogChanged,
    Refusal(VerifyRefusal),
    Sealed,
    Report,
}

impl Uplink {
    /// Connects, streams, reconnects; until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut side = HubLink {
            uplink: &self,
            catalog_changed: self.catalog.changed(),
            refusals: mpsc::unbounded_channel(),
            report: tokio::time::interval(REPORT_INTERVAL),
        };
        link::keep_connected(&mut side, &cancel).await;
    }

    /// The key to connect with and the rotation still to announce.
    fn identity(&self) -> (NodeKey, Option<KeyRotation>) {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The hub recorded the rotation: the next key becomes current.
    fn rotated(&self, r: &KeyRotated) -> Result<(), LinkError> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(pending) = keys.1.as_ref().and_then(|p| p.open().ok()) else {
            return Ok(());
        };
        if (pending.old, pending.new) != (r.old, r.new) {
            return Err(LinkError::Protocol(format!(
                "the hub confirmed a rotation {} -> {} that this agent did not announce",
                r.old, r.new
            )));
        }
        let key = rotation::finish(&self.config).map_err(LinkError::local)?;
        tracing::info!(old = %r.old, new = %r.new, "the hub confirmed the key rotation (密钥轮换); the new key is now the agent's key");
        let text = key.id().to_string();
        *keys = (key, None);
        drop(keys);
        self.status.update(|s| s.node = text);
        Ok(())
    }

    /// Hands the hub's comparison request to the capture loop.
    fn verify(&self, v: VerifyRequest, refusals: &mpsc::UnboundedSender<VerifyRefusal>) {
        let resource = (v.feed.department == self.config.department)
            .then(|| {
                self.config
                    .resources
                    .iter()
                    .position(|r| r.code == v.feed.resource)
            })
            .flatten();
        let Some(resource) = resource else {
            tracing::warn!(feed = %v.feed, "the hub asks to compare a resource this agent does not share; ignored");
            return;
        };
        tracing::debug!(feed = %v.feed, run = v.run, range = %v.range, "the hub asks to compare a range");
        let probe = Probe {
            resource,
            run: v.run,
            range: v.range,
            mode: v.mode,
        };
        let refusals = refusals.clone();
        let _ = self
            .capture
            .send(CaptureInput::Request(CaptureRequest::Probe {
                probe,
                refusals,
            }));
    }

    fn verified(&self, outcome: VerifyOutcome) {
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

    /// The agent's backlog, for the hub's view of it.
    fn report(&self) -> AgentReport {
        let s = self.status.snapshot();
        AgentReport {
            at: UnixMillis::now(),
            outbox_batches: s.outbox.batches,
            outbox_bytes: s.outbox.bytes,
            outbox_limit_bytes: s.outbox.limit_bytes,
            capture_paused: s.source.paused_outbox_full || s.outbox.write_failure.is_some(),
        }
    }

    /// What the outbox holds of each feed at the hub's head: the link of
    /// the batch after it (or the head's own hash) tells whether the hub's
    /// chain is this agent's.
    fn outbox_facts(
        &self,
        peer: &[FeedPosition],
    ) -> Result<BTreeMap<FeedId, LocalFeed>, LinkError> {
        let held = self.outbox.feeds().map_err(LinkError::local)?;
        let mut facts = BTreeMap::new();
        for p in peer {
            let state = held.get(&p.feed).cloned().unwrap_or_default();
            let (head, n) = (state.head.last_seq, p.cursor.last_seq);
            let at_peer_head = if n == 0 || n > head {
                AtPeerHead::Unknown
            } else if n == head {
                AtPeerHead::Hash(state.head.last_hash)
            } else {
                match self
                    .outbox
                    .batch(&p.feed, n + 1)
                    .map_err(LinkError::local)?
                {
                    None => AtPeerHead::Pruned,
                    Some(next) => match next.open() {
                        Ok(body) => AtPeerHead::Hash(body.prev),
                        Err(e) => AtPeerHead::Damaged {
                            seq: n + 1,
                            reason: e.to_string(),
                        },
                    },
                }
            };
            let local = LocalFeed {
                head,
                acked: state.acked,
                at_peer_head,
            };
            facts.insert(p.feed.clone(), local);
        }
        Ok(facts)
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
}

impl LinkSide for HubLink<'_> {
    const ROLE: Role = Role::Agent;
    const MAX_IN_FLIGHT: u64 = MAX_IN_FLIGHT;
    type Wake = Wake;

    fn client_config(&self) -> Result<quinn::ClientConfig, LinkError> {
        // Built for each attempt: a confirmed key rotation changes the key.
        let key = self.uplink.identity().0;
        quic::client_config(&key, self.uplink.config.hub.key)
            .map_err(|e| LinkError::Setup(e.to_string()))
    }

    fn words(&self) -> PeerWords {
        let config = &self.uplink.config;
        let key = self.uplink.identity().0.id();
        PeerWords {
            address: config.hub.address.clone(),
            key_refused: format!(
                "authentication failed: the hub at {} refused this agent's key {key}. \
                 Ask the hub administrator to run: shuyuan-hub enroll --department {} --name \"<department name>\" {key}",
                config.hub.address, config.department,
            ),
            key_setting: format!("hub.key in {}", config.file.display()),
        }
    }

    fn show_link(&self, phase: LinkPhase, detail: Option<String>) {
        let state = match phase {
            LinkPhase::Connecting => LinkState::Connecting,
            LinkPhase::Connected => LinkState::Connected,
            LinkPhase::Disconnected => LinkState::Disconnected,
            LinkPhase::Refused => LinkState::AuthenticationFailed,
        };
        self.uplink.set_link(state, detail);
    }

    fn show_rejection(&self, text: String) {
        self.uplink.status.update(|s| {
            s.hub.rejections += 1;
            s.hub.last_rejection = Some(text);
        });
    }

    async fn hello(&mut self) -> Result<MessageV1, LinkError> {
        let config = &self.uplink.config;
        Ok(MessageV1::Hello(Hello {
            software: shuyuan_protocol::SOFTWARE.to_string(),
            department: config.department.clone(),
            resources: config.resources.iter().map(|r| r.code.clone()).collect(),
        }))
    }

    fn local_feeds(&self, peer: &[FeedPosition]) -> Result<BTreeMap<FeedId, LocalFeed>, LinkError> {
        self.uplink.outbox_facts(peer)
    }

    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, LinkError> {
        self.uplink
            .outbox
            .batch(feed, seq)
            .map_err(LinkError::local)
    }

    /// The capture loop prunes the outbox up to `seq`.
    fn acked(&mut self, _: &FeedSender, feed: FeedId, seq: u64) {
        let at = UnixMillis::now();
        let _ = self
            .uplink
            .capture
            .send(CaptureInput::Ack(AckNote { feed, seq, at }));
    }

    async fn begin_catalog(&self, _: &DepartmentCode) -> Result<(), LinkError> {
        let hub = self.uplink.config.hub.key;
        self.uplink
            .catalog
            .begin_sync(&hub)
            .map_err(LinkError::local)
    }

    async fn catalog_message(&self, _: &DepartmentCode) -> Result<Option<Vec<u8>>, LinkError> {
        Ok(self
            .uplink
            .catalog
            .next_message(&self.uplink.config.hub.key))
    }

    async fn welcomed(&mut self, link: &mut Connection, _: &Welcome) -> Result<(), LinkError> {
        // Before any batch: those sealed since the rotation are signed by
        // the new key, which the hub learns of here.
        if let Some(rotation) = self.uplink.identity().1 {
            link.send(MessageV1::KeyRotation(rotation)).await?;
        }
        link.sender.catalog_changed(&self.uplink.config.department);
        link.send_catalogs(self).await?;
        self.refusals = mpsc::unbounded_channel();
        self.report = tokio::time::interval(REPORT_INTERVAL);
        Ok(())
    }

    async fn receive(&mut self, link: &mut Connection, m: MessageV1) -> Result<(), LinkError> {
        match m {
            MessageV1::Catalog(sync) => {
                self.uplink.receive_catalog(sync).await;
                link.sender.catalog_received(&self.uplink.config.department);
                link.send_catalogs(self).await?;
            }
            MessageV1::CatalogRefused(r) => self.uplink.catalog_refused(&r),
            MessageV1::KeyRotated(r) => self.uplink.rotated(&r)?,
            MessageV1::Verify(v) => self.uplink.verify(v, &self.refusals.0),
            MessageV1::Verified(outcome) => self.uplink.verified(outcome),
            other => return Err(link.unexpected(&other)),
        }
        Ok(())
    }

    async fn wake(&mut self) -> Wake {
        tokio::select! {
            _ = self.catalog_changed.notified() => Wake::CatalogChanged,
            Some(refusal) = self.refusals.1.recv() => Wake::Refusal(refusal),
            _ = self.uplink.sealed.notified() => Wake::Sealed,
            _ = self.report.tick() => Wake::Report,
        }
    }

    async fn woken(&mut self, link: &mut Connection, wake: Wake) -> Result<(), LinkError> {
        match wake {
            Wake::CatalogChanged => {
                link.sender.catalog_changed(&self.uplink.config.department);
                link.send_catalogs(self).await?;
            }
            Wake::Refusal(refusal) => link.send(MessageV1::VerifyRefused(refusal)).await?,
            Wake::Sealed => {
                for (feed, state) in self.uplink.outbox.feeds().map_err(LinkError::local)? {
                    link.sender.set_head(&feed, state.head.last_seq);
                }
            }
            Wake::Report => link.send(MessageV1::Report(self.uplink.report())).await?,
        }
        Ok(())
    }
}
