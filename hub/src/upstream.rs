//! The upstream link: this hub as a client of its parent hub (区县平台向上级联).
//!
//! It says `HubHello` with the feeds its share policy lets leave and then
//! streams the stored batches, exactly as the departments signed them.
//! Dialing, the parent's `Welcome`, the chain check against the stored
//! batches, the send window and reconnecting with backoff are the shared
//! link client ([`link::keep_connected`] driving a
//! [`shuyuan_protocol::sender::FeedSender`]), the same an agent's uplink
//! uses; this file is what only a hub does. The stored batches are the
//! durable forwarding queue: the hub keeps every applied batch, so a parent
//! that was down for a day is sent what it lacks from its own head.
//! Registrations go before the batches they vouch for; catalogs sync per
//! department; a report of the subtree goes up every few seconds; a feed
//! the policy lets leave later is announced (`Feeds`) and joins when the
//! parent welcomes it, and a feed it withdraws ends the connection.
//!
//! Invariants: a batch leaves only with its original bytes; a feed whose
//! catalog entry is not shared (不予共享), or whose share type the config
//! does not forward, is never announced and never sent; nothing here
//! deletes anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shuyuan_link::client::{self as link, Connection, LinkError, LinkPhase, LinkSide, PeerWords};
use shuyuan_link::quic;
use shuyuan_protocol::catalog::doc::{CatalogError, Sender};
use shuyuan_protocol::federation::{FeedReport, HubHello, HubReport};
use shuyuan_protocol::message::{CatalogRefusal, CatalogSync, FeedPosition, Welcome};
use shuyuan_protocol::sender::{AtPeerHead, FeedSender, LocalFeed, Role};
use shuyuan_protocol::{DepartmentCode, FeedId, MessageV1, NodeKey, SignedBatch, UnixMillis};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::catalog::{HubCatalog, HubCatalogError};
use crate::config::UpstreamConfig;
use crate::federation;
use crate::live::Live;
use crate::peers::Peers;
use crate::writer::Store;

/// Batches per feed sent ahead of the parent's acks.
pub const MAX_IN_FLIGHT: u64 = 64;
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

/// The upstream link as the shared link client's side, with what one
/// connection keeps.
struct ParentLink<'a> {
    upstream: &'a Upstream,
    client: quinn::ClientConfig,
    shares: Shares,
    plan: Plan,
    /// Registrations sent on this connection, by signature.
    registrations_sent: BTreeSet<Vec<u8>>,
    /// The enrollments' generation they were made from.
    generation: u64,
    catalog_changes: broadcast::Receiver<DepartmentCode>,
    commits: watch::Receiver<u64>,
    tick: tokio::time::Interval,
}

/// What wakes a connection besides the parent's messages.
enum Wake {
    /// The store committed (false: it closed).
    Committed(bool),
    CatalogChanged(Result<DepartmentCode, broadcast::error::RecvError>),
    Report,
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
        let mut side = ParentLink {
            upstream: &self,
            client,
            shares: Shares::default(),
            plan: Plan::default(),
            registrations_sent: BTreeSet::new(),
            generation: 0,
            catalog_changes: self.catalog.subscribe(),
            commits: self.store.commits(),
            tick: tokio::time::interval(REPORT_INTERVAL),
        };
        link::keep_connected(&mut side, &cancel).await;
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

    /// The catalog's share types (read again when a catalog changes).
    async fn shares(&self) -> Result<Shares, LinkError> {
        let city = self.catalog.city().await.map_err(LinkError::local)?;
        Ok(federation::share_types(&city))
    }

    /// Which feeds leave now, from the catalog's share types.
    fn plan(&self, shares: &Shares) -> Result<Plan, LinkError> {
        let mut plan = Plan::default();
        for (feed, rec) in self.store.read(|t| t.feeds()).map_err(LinkError::local)? {
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
    fn show(&self, plan: &Plan, sender: &FeedSender) {
        let mut b = self.board();
        let old: BTreeMap<String, Option<u64>> =
            b.feeds.iter().map(|f| (f.feed.clone(), f.acked)).collect();
        b.feeds = plan
            .report
            .iter()
            .map(|r| {
                let feed = r.feed.to_string();
                ForwardState {
                    acked: sender
                        .acked(&r.feed)
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

    /// Applies the parent's catalog changes (review fields only).
    async fn receive_catalog(&self, sync: &CatalogSync) {
        let department = &sync.department;
        let result = self
            .catalog
            .receive_as(
                department,
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
    }

    fn catalog_refused(&self, r: &CatalogRefusal) {
        let text = format!(
            "the parent refused catalog changes of {}: {} ({})",
            r.department, r.detail, r.reason
        );
        tracing::error!(%text);
        self.board().catalog_error = Some(text);
    }
}

impl ParentLink<'_> {
    /// Sends the registrations not sent on this connection yet: the parent
    /// needs the keys before the batches.
    async fn send_registrations(&mut self, link: &mut Connection) -> Result<(), LinkError> {
        for r in federation::registrations(&self.upstream.key, &self.upstream.peers) {
            if self
                .registrations_sent
                .insert(r.signature.to_bytes().to_vec())
            {
                link.send(MessageV1::Registration(r)).await?;
            }
        }
        Ok(())
    }

    /// The store or a catalog changed: new keys below, feeds that may leave
    /// now, feeds that may not any more.
    async fn replan(
        &mut self,
        link: &mut Connection,
        catalog_changed: bool,
    ) -> Result<(), LinkError> {
        // New keys below: their registrations before their batches.
        let generation = self.upstream.peers.generation();
        if generation != self.generation {
            self.generation = generation;
            self.send_registrations(link).await?;
        }
        if catalog_changed {
            self.shares = self.upstream.shares().await?;
        }
        self.plan = self.upstream.plan(&self.shares)?;
        let fresh = link.sender.announce(self.plan.forward.keys());
        if !fresh.is_empty() {
            link.send(MessageV1::Feeds(fresh)).await?;
        }
        for (feed, head) in &self.plan.forward {
            link.sender.set_head(feed, *head);
        }
        if let Some(withdrawn) = link.sender.withdrawn(|f| self.plan.forward.contains_key(f)) {
            let text = format!(
                "{withdrawn} is no longer forwarded (its share type changed); reconnecting without it"
            );
            link.close(b"share policy changed");
            return Err(LinkError::Replan(text));
        }
        self.upstream.show(&self.plan, &link.sender);
        Ok(())
    }
}

impl LinkSide for ParentLink<'_> {
    const ROLE: Role = Role::Upstream;
    const MAX_IN_FLIGHT: u64 = MAX_IN_FLIGHT;
    type Wake = Wake;

    fn client_config(&self) -> Result<quinn::ClientConfig, LinkError> {
        Ok(self.client.clone())
    }

    fn words(&self) -> PeerWords {
        let (config, id) = (&self.upstream.config, self.upstream.key.id());
        PeerWords {
            address: config.address.clone(),
            key_refused: format!(
                "the parent hub at {} refused this hub's key {id}. Ask its administrator to run: \
                 shuyuan-hub enroll --hub <platform code> --name \"{}\" {id}",
                config.address, self.upstream.name,
            ),
            key_setting: "upstream.key".into(),
        }
    }

    fn show_link(&self, phase: LinkPhase, detail: Option<String>) {
        let link = match phase {
            LinkPhase::Connecting => "connecting",
            LinkPhase::Connected => "connected",
            LinkPhase::Disconnected => "disconnected",
            LinkPhase::Refused => "refused",
        };
        self.upstream.set_link(link, detail);
    }

    fn show_rejection(&self, text: String) {
        let mut b = self.upstream.board();
        b.rejections += 1;
        b.last_rejection = Some(text);
    }

    async fn hello(&mut self) -> Result<MessageV1, LinkError> {
        self.shares = self.upstream.shares().await?;
        self.plan = self.upstream.plan(&self.shares)?;
        Ok(MessageV1::HubHello(HubHello {
            software: shuyuan_protocol::SOFTWARE.to_string(),
            name: self.upstream.name.clone(),
            feeds: self.plan.forward.keys().cloned().collect(),
        }))
    }

    /// The stored batch at the parent's head tells whether its chain is
    /// the one stored here.
    fn local_feeds(&self, peer: &[FeedPosition]) -> Result<BTreeMap<FeedId, LocalFeed>, LinkError> {
        let mut facts = BTreeMap::new();
        for p in peer {
            let n = p.cursor.last_seq;
            let stored = match n {
                0 => None,
                n => self
                    .upstream
                    .store
                    .read(|t| t.batch(&p.feed, n))
                    .map_err(LinkError::local)?,
            };
            let local = LocalFeed {
                head: self.plan.forward.get(&p.feed).copied().unwrap_or(0),
                acked: 0,
                at_peer_head: stored.map_or(AtPeerHead::Unknown, |b| AtPeerHead::Hash(b.hash())),
            };
            facts.insert(p.feed.clone(), local);
        }
        Ok(facts)
    }

    fn batch(&self, feed: &FeedId, seq: u64) -> Result<Option<SignedBatch>, LinkError> {
        self.upstream
            .store
            .read(|t| t.batch(feed, seq))
            .map_err(LinkError::local)
    }

    /// Nothing is pruned here: the board shows the parent's head.
    fn acked(&mut self, sender: &FeedSender, _: FeedId, _: u64) {
        self.upstream.show(&self.plan, sender);
    }

    async fn begin_catalog(&self, department: &DepartmentCode) -> Result<(), LinkError> {
        let upstream = self.upstream;
        upstream
            .catalog
            .begin_sync(department, &upstream.config.key)
            .await
            .map_err(LinkError::local)
    }

    async fn catalog_message(
        &self,
        department: &DepartmentCode,
    ) -> Result<Option<Vec<u8>>, LinkError> {
        let upstream = self.upstream;
        upstream
            .catalog
            .next_message(department, &upstream.config.key)
            .await
            .map_err(LinkError::local)
    }

    async fn welcomed(
        &mut self,
        link: &mut Connection,
        welcome: &Welcome,
    ) -> Result<(), LinkError> {
        let upstream = self.upstream;
        upstream.board().parent_software = Some(welcome.software.clone());
        self.registrations_sent.clear();
        self.generation = upstream.peers.generation();
        self.send_registrations(link).await?;
        self.catalog_changes = upstream.catalog.subscribe();
        for d in upstream.catalog.departments().map_err(LinkError::local)? {
            link.sender.catalog_changed(&d);
        }
        link.send_catalogs(self).await?;
        link.send(MessageV1::Tree(upstream.report(&self.plan)))
            .await?;
        upstream.show(&self.plan, &link.sender);
        self.commits = upstream.store.commits();
        self.tick = tokio::time::interval(REPORT_INTERVAL);
        self.tick.tick().await;
        Ok(())
    }

    async fn receive(&mut self, link: &mut Connection, m: MessageV1) -> Result<(), LinkError> {
        match m {
            // The answer to `Feeds`.
            MessageV1::Welcome(w) => link.welcome_more(self, &w)?,
            MessageV1::Catalog(sync) => {
                self.upstream.receive_catalog(&sync).await;
                link.sender.catalog_received(&sync.department);
                link.send_catalogs(self).await?;
            }
            MessageV1::CatalogRefused(r) => self.upstream.catalog_refused(&r),
            other => return Err(link.unexpected(&other)),
        }
        self.upstream.show(&self.plan, &link.sender);
        Ok(())
    }

    async fn wake(&mut self) -> Wake {
        tokio::select! {
            changed = self.commits.changed() => Wake::Committed(changed.is_ok()),
            changed = self.catalog_changes.recv() => Wake::CatalogChanged(changed),
            _ = self.tick.tick() => Wake::Report,
        }
    }

    async fn woken(&mut self, link: &mut Connection, wake: Wake) -> Result<(), LinkError> {
        match wake {
            Wake::Committed(false) => Err(LinkError::Lost("the store closed".into())),
            Wake::Committed(true) => self.replan(link, false).await,
            Wake::CatalogChanged(changed) => {
                match changed {
                    Ok(d) => link.sender.catalog_changed(&d),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        link.sender.all_catalogs_changed()
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                }
                link.send_catalogs(self).await?;
                // A share type may have changed.
                self.replan(link, true).await
            }
            Wake::Report => {
                let report = self.upstream.report(&self.plan);
                link.send(MessageV1::Tree(report)).await
            }
        }
    }
}
