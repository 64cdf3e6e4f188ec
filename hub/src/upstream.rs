//! The upstream link: this hub as a client of its parent hub (区县平台向上级联).
//!
//! It dials the parent with its own key ([`quic::dial`]) and stays connected
//! ([`link::keep_connected`]) as an agent's uplink does,
//! says `HubHello` with the feeds its share policy lets leave, learns the
//! parent's durable head of each (`Welcome`), checks that the parent's chain
//! is the one stored here, and then streams the stored batches, exactly as
//! the departments signed them, through the same [`SendWindow`] an agent's
//! uplink uses. The stored batches are the durable forwarding queue: the
//! hub keeps every applied batch, so a parent that was down for a day is
//! sent what it lacks from its own head. Registrations go before the
//! batches they vouch for; catalogs sync per department; a report of the
//! subtree goes up every few seconds.
//!
//! Invariants: a batch leaves only with its original bytes; a feed whose
//! catalog entry is not shared (不予共享), or whose share type the config
//! does not forward, is never announced and never sent; nothing here
//! deletes anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::ConnectionError;
use serde::{Deserialize, Serialize};
use shuyuan_link::client::{self as link, WelcomeError};
use shuyuan_link::quic::{self, DialError, QuicError};
use shuyuan_protocol::catalog::doc::{CatalogError, Sender};
use shuyuan_protocol::federation::{FeedReport, HubHello, HubReport};
use shuyuan_protocol::message::{CatalogSync, FeedPosition, Reject};
use shuyuan_protocol::window::{SendWindow, WindowError};
use shuyuan_protocol::{DepartmentCode, FeedId, Message, MessageV1, NodeKey, UnixMillis};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::catalog::{HubCatalog, HubCatalogError};
use crate::config::UpstreamConfig;
use crate::federation;
use crate::live::Live;
use crate::peers::Peers;
use crate::store::StoreError;
use crate::writer::Store;

/// Batches per feed sent ahead of the parent's acks.
pub const MAX_IN_FLIGHT: u64 = 64;
/// How long the parent may take to answer the handshake or `HubHello`.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the subtree report goes up.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// The link as the console and `status` show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub parent: String,
    pub address: String,
    /// `connecting`, `connected`, `disconnected` or `refused`.
    pub link: String,
    pub since: Option<UnixMillis>,
    /// The last error, while not connected.
    pub detail: Option<String>,
    pub parent_software: Option<String>,
    /// Every feed of this hub: forwarded (with the parent's head) or held.
    pub feeds: Vec<ForwardState>,
    pub rejections: u64,
    pub last_rejection: Option<String>,
    pub catalog_error: Option<String>,
}

/// One feed's forwarding.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ForwardState {
    pub feed: String,
    /// The last batch stored here.
    pub head: u64,
    /// The last batch the parent acknowledged (as last known).
    pub acked: Option<u64>,
    /// Why its data stays here, or None when it is forwarded.
    pub held: Option<String>,
}

/// Shared view of the link.
pub type UpstreamBoard = Arc<Mutex<UpstreamStatus>>;

#[derive(Debug, thiserror::Error)]
enum LinkError {
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
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] HubCatalogError),
    #[error("{0}")]
    Setup(String),
    /// The share policy withdrew a feed: start over without it.
    #[error("{0}")]
    Replan(String),
}

/// What the link needs from the hub.
#[derive(Debug)]
pub struct Upstream {
    pub config: UpstreamConfig,
    pub name: String,
    pub key: NodeKey,
    pub store: Store,
    pub peers: Arc<Peers>,
    pub catalog: Arc<HubCatalog>,
    pub live: Arc<Live>,
    pub board: UpstreamBoard,
}

/// Each catalog entry's share type, by department and resource code.
type Shares = BTreeMap<(String, String), Option<shuyuan_protocol::catalog::ShareType>>;

/// Which feeds leave, and which stay (with why).
#[derive(Debug, Default)]
struct Plan {
    /// Forwarded feeds and their head here.
    forward: BTreeMap<FeedId, u64>,
    /// Every feed, for the report.
    report: Vec<FeedReport>,
}

/// One connection attempt to the parent after another (see
/// [`link::keep_connected`]).
struct Link<'a> {
    upstream: &'a Upstream,
    client: quinn::ClientConfig,
    cancel: &'a CancellationToken,
}

impl link::Session for Link<'_> {
    type Error = LinkError;

    async fn session(
        &self,
        endpoint: &mut Option<quinn::Endpoint>,
        established: &mut bool,
    ) -> Result<(), LinkError> {
        self.upstream
            .session(&self.client, endpoint, self.cancel, established)
            .await
    }

    fn failed(&self, e: &LinkError, news: bool) {
        let text = e.to_string();
        let auth = matches!(e, LinkError::Auth(_));
        self.upstream.set_link(
            if auth { "refused" } else { "disconnected" },
            Some(text.clone()),
        );
        if news {
            if auth || matches!(e, LinkError::Chain(_)) {
                tracing::error!(error = %text, "upstream link failed");
            } else {
                tracing::warn!(error = %text, "upstream link lost; reconnecting with backoff");
            }
        }
    }
}

impl Upstream {
    /// Connects, forwards, reconnects; until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        self.set_link("connecting", None);
        let client = match quic::client_config(&self.key, self.config.key) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot configure QUIC; the upstream link is not running");
                self.set_link("disconnected", Some(e.to_string()));
                return;
            }
        };
        let link = Link {
            upstream: &self,
            client,
            cancel: &cancel,
        };
        link::keep_connected(&link, &cancel).await;
    }

    fn board(&self) -> std::sync::MutexGuard<'_, UpstreamStatus> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_link(&self, link: &str, detail: Option<String>) {
        let mut b = self.board();
        if b.link != link {
            b.since = Some(UnixMillis::now());
        }
        b.link = link.to_string();
        b.parent = self.config.key.to_string();
        b.address = self.config.address.clone();
        if detail.is_some() || link == "connected" {
            b.detail = detail;
        }
    }

    fn connection_error(&self, e: &ConnectionError) -> LinkError {
        let explained = quic::explain(e);
        if quic::is_auth_failure(e) {
            if explained.contains("hub key mismatch") {
                LinkError::Auth(format!(
                    "the server at {} is not the configured parent hub ({explained}); check upstream.key",
                    self.config.address
                ))
            } else {
                LinkError::Auth(format!(
                    "the parent hub at {} refused this hub's key {}. Ask its administrator to run: \
                     shuyuan-hub enroll --hub <platform code> --name \"{}\" {}",
                    self.config.address,
                    self.key.id(),
                    self.name,
                    self.key.id()
                ))
            }
        } else {
            LinkError::Lost(format!(
                "connection to the parent hub at {} lost: {explained}",
                self.config.address
            ))
        }
    }

    fn quic_error(&self, e: QuicError) -> LinkError {
        if let Some(c) = link::lost_connection(&e) {
            return self.connection_error(c);
        }
        match e {
            QuicError::Frame(f) => LinkError::Protocol(f.to_string()),
            other => LinkError::Lost(other.to_string()),
        }
    }

    /// The catalog's share types (read again when a catalog changes).
    async fn shares(&self) -> Result<Shares, LinkError> {
        Ok(federation::share_types(&self.catalog.city().await?))
    }

    /// Which feeds leave now, from the catalog's share types.
    fn plan(&self, shares: &Shares) -> Result<Plan, LinkError> {
        let mut plan = Plan::default();
        for (feed, rec) in self.store.read(|t| t.feeds())? {
            let held = federation::held(&feed, shares, &self.config);
            if held.is_none() {
                plan.forward.insert(feed.clone(), rec.cursor.last_seq);
            }
            plan.report.push(FeedReport {
                feed,
                last_seq: rec.cursor.last_seq,
                last_batch_received_at: rec.last_batch_received_at,
                forwarded: held.is_none(),
                held: held.unwrap_or_default(),
            });
        }
        Ok(plan)
    }

    /// Shows the plan and the parent's heads on the board.
    fn show(&self, plan: &Plan, window: Option<&SendWindow>) {
        let mut b = self.board();
        let old: BTreeMap<String, Option<u64>> =
            b.feeds.iter().map(|f| (f.feed.clone(), f.acked)).collect();
        b.feeds = plan
            .report
            .iter()
            .map(|r| {
                let feed = r.feed.to_string();
                ForwardState {
                    acked: window
                        .and_then(|w| w.acked(&r.feed))
                        .or_else(|| old.get(&feed).copied().flatten()),
                    feed,
                    head: r.last_seq,
                    held: (!r.forwarded).then(|| r.held.clone()),
                }
            })
            .collect();
    }

    /// The report of this hub and its subtree.
    fn report(&self, plan: &Plan) -> HubReport {
        let agents: BTreeSet<DepartmentCode> = self
            .live
            .connections()
            .into_iter()
            .map(|c| c.department)
            .collect();
        HubReport {
            hub: Some(self.key.id()),
            name: self.name.clone(),
            at: UnixMillis::now(),
            feeds: plan.report.clone(),
            agents_online: agents.into_iter().collect(),
            children: self
                .live
                .children()
                .into_iter()
                .filter_map(|c| c.tree)
                .collect(),
        }
    }

    /// The parent's head of each feed must be a batch stored here.
    fn check_chains(&self, positions: &[FeedPosition]) -> Result<(), LinkError> {
        for p in positions {
            if p.cursor.last_seq == 0 {
                continue;
            }
            let Some(ours) = self.store.read(|t| t.batch(&p.feed, p.cursor.last_seq))? else {
                continue; // the window reports "parent ahead"
            };
            if ours.hash() != p.cursor.last_hash {
                return Err(LinkError::Chain(format!(
                    "the parent's chain of {} differs from this hub's at batch {}: one of the two stores was replaced or altered. \
                     Forwarding stopped to avoid a fork; compare with the parent's administrator",
                    p.feed, p.cursor.last_seq
                )));
            }
        }
        Ok(())
    }

    async fn send(&self, send: &mut quinn::SendStream, m: MessageV1) -> Result<(), LinkError> {
        quic::write_message(send, &m.into())
            .await
            .map_err(|e| self.quic_error(e))
    }

    /// Sends every catalog sync message there is for one department.
    async fn send_catalog(
        &self,
        send: &mut quinn::SendStream,
        department: &DepartmentCode,
    ) -> Result<(), LinkError> {
        while let Some(message) = self
            .catalog
            .next_message(department, &self.config.key)
            .await?
        {
            let sync = CatalogSync {
                department: department.clone(),
                message,
            };
            self.send(send, MessageV1::Catalog(sync)).await?;
        }
        Ok(())
    }

    async fn session(
        &self,
        client: &quinn::ClientConfig,
        endpoint: &mut Option<quinn::Endpoint>,
        cancel: &CancellationToken,
        established: &mut bool,
    ) -> Result<(), LinkError> {
        self.set_link("connecting", None);
        let (addr, conn, mut send, mut recv) =
            quic::dial(endpoint, client, &self.config.address, ANSWER_TIMEOUT)
                .await
                .map_err(|e| match e {
                    DialError::Connection(c) => self.connection_error(&c),
                    DialError::Setup(s) => LinkError::Setup(s),
                    other => LinkError::Lost(other.to_string()),
                })?;
        let mut shares = self.shares().await?;
        let mut plan = self.plan(&shares)?;
        let hello = HubHello {
            software: shuyuan_protocol::SOFTWARE.to_string(),
            name: self.name.clone(),
            feeds: plan.forward.keys().cloned().collect(),
        };
        self.send(&mut send, MessageV1::HubHello(hello)).await?;
        let welcome = link::read_welcome(&mut recv, ANSWER_TIMEOUT)
            .await
            .map_err(|e| match e {
                WelcomeError::Quic(e) => self.quic_error(e),
                WelcomeError::Refused(r) => LinkError::Auth(format!(
                    "the parent hub refused this hub: {} ({})",
                    r.detail, r.reason
                )),
                other => LinkError::Protocol(format!("answering HubHello: {other}")),
            })?;
        self.check_chains(&welcome.feeds)?;
        let heads = plan.forward.clone();
        let (mut window, _) = SendWindow::start(
            &welcome.feeds,
            |f| heads.get(f).copied().unwrap_or(0),
            MAX_IN_FLIGHT,
        )?;
        *established = true;
        self.set_link("connected", None);
        self.board().parent_software = Some(welcome.software.clone());
        tracing::info!(parent = %addr, parent_software = %welcome.software, feeds = plan.forward.len(), "connected to the parent hub");

        // Registrations first: the parent needs the keys before the batches.
        let mut registrations_sent: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut generation = self.peers.generation();
        for r in federation::registrations(&self.key, &self.peers) {
            registrations_sent.insert(r.signature.to_bytes().to_vec());
            self.send(&mut send, MessageV1::Registration(r)).await?;
        }
        let mut catalog_changes = self.catalog.subscribe();
        let mut syncing: BTreeSet<DepartmentCode> = BTreeSet::new();
        for d in self.catalog.departments()? {
            self.catalog.begin_sync(&d, &self.config.key).await?;
            self.send_catalog(&mut send, &d).await?;
            syncing.insert(d);
        }
        self.send(&mut send, MessageV1::Tree(self.report(&plan)))
            .await?;
        self.show(&plan, Some(&window));

        let (_reader, mut rx) = link::spawn_reader(recv);
        let mut commits = self.store.commits();
        let mut announced: BTreeSet<FeedId> = BTreeSet::new();
        let mut tick = tokio::time::interval(REPORT_INTERVAL);
        tick.tick().await;
        loop {
            let now = UnixMillis::now();
            while let Some((feed, seq)) = window.poll_send(now) {
                let batch = self.store.read(|t| t.batch(&feed, seq))?.ok_or_else(|| {
                    LinkError::Chain(format!(
                        "batch {seq} of {feed} is missing from this hub's store"
                    ))
                })?;
                self.send(&mut send, MessageV1::Batch(batch)).await?;
            }
            let wake = window
                .next_wakeup()
                .map(|t| tokio::time::Instant::now() + t.since(UnixMillis::now()));
            let mut replan = false;
            let mut catalog_changed = false;
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = send.finish();
                    conn.close(0u32.into(), b"hub stopping");
                    return Ok(());
                }
                m = rx.recv() => match m {
                    Some(Ok(Some(Message::V1(m)))) => {
                        self.handle(&mut window, &plan, m, &mut send).await?;
                        self.show(&plan, Some(&window));
                    }
                    Some(Ok(None)) | None => return Err(LinkError::Lost("the parent closed the stream".into())),
                    Some(Err(e)) => return Err(self.quic_error(e)),
                },
                changed = commits.changed() => {
                    if changed.is_err() {
                        return Err(LinkError::Lost("the store closed".into()));
                    }
                    replan = true;
                }
                changed = catalog_changes.recv() => {
                    match changed {
                        Ok(d) => {
                            if syncing.insert(d.clone()) {
                                self.catalog.begin_sync(&d, &self.config.key).await?;
                            }
                            self.send_catalog(&mut send, &d).await?;
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            for d in &syncing {
                                self.send_catalog(&mut send, d).await?;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => {}
                    }
                    // A share type may have changed.
                    replan = true;
                    catalog_changed = true;
                }
                _ = async { if let Some(w) = wake { tokio::time::sleep_until(w).await } }, if wake.is_some() => {}
                _ = tick.tick() => {
                    self.send(&mut send, MessageV1::Tree(self.report(&plan))).await?;
                }
            }
            if !replan {
                continue;
            }
            // New keys below: their registrations before their batches.
            let g = self.peers.generation();
            if g != generation {
                generation = g;
                for r in federation::registrations(&self.key, &self.peers) {
                    if registrations_sent.insert(r.signature.to_bytes().to_vec()) {
                        self.send(&mut send, MessageV1::Registration(r)).await?;
                    }
                }
            }
            if catalog_changed {
                shares = self.shares().await?;
            }
            plan = self.plan(&shares)?;
            let fresh: Vec<FeedId> = plan
                .forward
                .keys()
                .filter(|f| !window.carries(f) && !announced.contains(*f))
                .cloned()
                .collect();
            if !fresh.is_empty() {
                announced.extend(fresh.iter().cloned());
                self.send(&mut send, MessageV1::Feeds(fresh)).await?;
            }
            for (feed, head) in &plan.forward {
                window.set_head(feed, *head);
            }
            if let Some(withdrawn) = announced
                .iter()
                .chain(welcome.feeds.iter().map(|p| &p.feed))
                .find(|f| !plan.forward.contains_key(*f))
            {
                let _ = send.finish();
                conn.close(0u32.into(), b"share policy changed");
                return Err(LinkError::Replan(format!(
                    "{withdrawn} is no longer forwarded (its share type changed); reconnecting without it"
                )));
            }
            self.show(&plan, Some(&window));
        }
    }

    async fn handle(
        &self,
        window: &mut SendWindow,
        plan: &Plan,
        m: MessageV1,
        send: &mut quinn::SendStream,
    ) -> Result<(), LinkError> {
        let now = UnixMillis::now();
        match m {
            MessageV1::Ack(ack) => {
                window.on_ack(&ack.feed, ack.seq)?;
            }
            MessageV1::Reject(r) => {
                self.record_rejection(&r);
                if let Some(feed) = r.feed {
                    window.on_reject(&feed, r.resend_from, now)?;
                }
            }
            MessageV1::Welcome(w) => {
                // The answer to `Feeds`.
                self.check_chains(&w.feeds)?;
                window.add(&w.feeds, |f| plan.forward.get(f).copied().unwrap_or(0))?;
            }
            MessageV1::Catalog(sync) => {
                let department = sync.department.clone();
                let result = self
                    .catalog
                    .receive_as(
                        &department,
                        &self.config.key,
                        &sync.message,
                        Sender::Platform,
                    )
                    .await;
                let error = match result {
                    Ok(()) => None,
                    Err(HubCatalogError::Doc(CatalogError::NotOwner(v))) => Some(format!(
                        "refused the parent's changes to the catalog of {department}: {}",
                        v.join("; ")
                    )),
                    Err(e) => Some(format!("catalog of {department}: {e}")),
                };
                if let Some(text) = &error {
                    tracing::error!(error = %text, "catalog sync with the parent");
                }
                self.board().catalog_error = error;
                self.send_catalog(send, &department).await?;
            }
            MessageV1::CatalogRefused(r) => {
                let text = format!(
                    "the parent refused catalog changes of {}: {} ({})",
                    r.department, r.detail, r.reason
                );
                tracing::error!(%text);
                self.board().catalog_error = Some(text);
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "unexpected message from the parent: {}",
                    other.name()
                )));
            }
        }
        Ok(())
    }

    fn record_rejection(&self, r: &Reject) {
        let feed = r
            .feed
            .as_ref()
            .map_or_else(|| "-".to_string(), FeedId::to_string);
        let text = format!(
            "{}: {} ({})",
            if r.feed.is_some() {
                format!("batch {} of {feed}", r.seq)
            } else {
                "registration".into()
            },
            r.detail,
            r.reason
        );
        tracing::warn!(%feed, seq = r.seq, reason = %r.reason, detail = %r.detail, "the parent hub refused");
        let mut b = self.board();
        b.rejections += 1;
        b.last_rejection = Some(text);
    }
}
