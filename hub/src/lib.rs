//! shuyuan hub: accepts departments' signed change feeds over QUIC,
//! verifies and applies them to a durable shared copy, acknowledges only
//! after commit, and keeps per-feed state, verification runs, key records,
//! catalogs and a hash-chained audit log.
//!
//! The data path, one module each, in order:
//! - [`ingest`]: the listener and its limits; one connection handler for
//!   agents and child hubs; catalog sync, key rotation and comparison
//!   requests over the same connection.
//! - [`verify`]: a batch's signature and signer, checked before anything of
//!   it is trusted.
//! - [`writer`]: one thread groups what the connections hand over into one
//!   transaction and answers (acks) only after its durable commit.
//! - [`apply`]: every rule, written once against the store's transaction
//!   traits: the chain, the content, the rows and digests, re-reads,
//!   verification runs, key records, the audit chain.
//! - [`store`]: the engines, nothing but tables and encoding: redb, and one
//!   in memory for tests.
//!
//! Beside it, reading the store: [`status`], [`export`], the admin console
//! ([`admin`]), the catalog ([`catalog`]), the control socket ([`control`]),
//! and the upstream link to a parent hub ([`upstream`], [`federation`]);
//! [`peers`] decides who may connect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod apply;
pub mod catalog;
pub mod config;
pub mod control;
pub mod export;
pub mod federation;
pub mod ingest;
pub mod live;
pub mod peers;
pub mod status;
pub mod store;
pub mod throttle;
pub mod upstream;
pub mod verify;
pub mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use shuyuan_link::quic;
use shuyuan_protocol::{NodeId, UnixMillis};
use shuyuan_service::keyfile::KeyFileError;
use tokio_util::sync::CancellationToken;

use crate::catalog::HubCatalog;
use crate::config::Config;
use crate::ingest::Ingest;
use crate::live::Live;
use crate::peers::Peers;
use crate::store::StoreError;
use crate::store::redb::RedbEngine;
use crate::writer::{Store, Writer};

pub use control::{ControlRequest, ReviewRequest, VerifyStarted, enrollment, review};

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0} (create the key with `shuyuan-hub init`)")]
    Key(KeyFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot set up QUIC: {0}")]
    Quic(#[from] quic::QuicError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("{0}: upstream.key is this hub's own key; a hub cannot be its own parent")]
    OwnParent(PathBuf),
    #[error("cannot open the control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    cancel: CancellationToken,
    endpoint: quinn::Endpoint,
    accept: tokio::task::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
    store: Store,
    writer: Option<Writer>,
    node: NodeId,
    local_addr: SocketAddr,
    socket: PathBuf,
    admin: Option<admin::AdminServer>,
    monitor: tokio::task::JoinHandle<()>,
    upstream: Option<tokio::task::JoinHandle<()>>,
}

/// What the control socket's and the admin server's handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) node: NodeId,
    pub(crate) store: Store,
    pub(crate) peers: Arc<Peers>,
    pub(crate) live: Arc<Live>,
    pub(crate) catalog: Arc<HubCatalog>,
    pub(crate) alerts: admin::webhook::Alerts,
    pub(crate) local_addr: SocketAddr,
    pub(crate) started_at: UnixMillis,
    /// The link to the parent hub, when configured.
    pub(crate) upstream: Option<upstream::UpstreamBoard>,
}

impl Hub {
    /// Opens the key and store, starts listening for agents and opens the
    /// control socket.
    pub async fn bind(config: Config) -> Result<Hub, StartError> {
        let key = shuyuan_service::keyfile::load(&config.key_file).map_err(StartError::Key)?;
        if config.upstream.as_ref().is_some_and(|u| u.key == key.id()) {
            return Err(StartError::OwnParent(config.file.clone()));
        }
        let engine = Arc::new(RedbEngine::open(&config.store_path())?);
        let (store, writer) = Store::start(engine)?;
        let peers = Arc::new(Peers::load(store.clone())?);
        let server = quic::server_config(&key, peers.clone())?;
        let endpoint = quic::server_endpoint(&key, server, config.listen).map_err(|source| {
            StartError::Listen {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let socket = config.control_socket();
        let listener =
            shuyuan_service::control::bind(&socket).map_err(|source| StartError::Control {
                path: socket.clone(),
                source,
            })?;
        let live = Arc::new(Live::default());
        let catalog = Arc::new(HubCatalog::new(key.id(), store.clone()));
        let cancel = CancellationToken::new();
        let ingest = Arc::new(Ingest {
            node: key.id(),
            store: store.clone(),
            peers: peers.clone(),
            live: live.clone(),
            catalog: catalog.clone(),
        });
        let accept = tokio::spawn(ingest::serve(
            endpoint.clone(),
            ingest,
            config.max_connections,
            cancel.clone(),
        ));
        let alerts = admin::webhook::Alerts::start(&config.alerts, key.clone(), cancel.clone());
        let admin_config = config.admin.clone();
        let (upstream, upstream_board) = match &config.upstream {
            Some(u) => {
                let board = upstream::UpstreamBoard::default();
                let link = upstream::Upstream {
                    config: u.clone(),
                    name: config.name.clone(),
                    key: key.clone(),
                    store: store.clone(),
                    peers: peers.clone(),
                    catalog: catalog.clone(),
                    live: live.clone(),
                    board: board.clone(),
                };
                (Some(tokio::spawn(link.run(cancel.clone()))), Some(board))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            config,
            node: key.id(),
            store: store.clone(),
            peers,
            live,
            catalog,
            alerts,
            local_addr,
            started_at: UnixMillis::now(),
            upstream: upstream_board,
        });
        let watcher = Arc::new(admin::Monitor::default());
        let monitor = tokio::spawn(admin::monitor::run(
            shared.clone(),
            watcher.clone(),
            cancel.clone(),
        ));
        let admin = match admin_config {
            Some(c) => Some(admin::start(shared.clone(), c, watcher, cancel.clone()).await?),
            None => None,
        };
        let control = tokio::spawn(shuyuan_service::control::serve(
            listener,
            cancel.clone().cancelled_owned(),
            move |request, stream| control::serve_request(shared.clone(), request, stream),
        ));
        tracing::info!(listen = %local_addr, key = %key.id(), "hub listening");
        Ok(Hub {
            cancel,
            endpoint,
            accept,
            control,
            store,
            writer: Some(writer),
            node: key.id(),
            local_addr,
            socket,
            admin,
            monitor,
            upstream,
        })
    }

    /// The admin console's address, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr)
    }

    /// The address agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The hub's key.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Stops accepting, closes connections, lets the writer finish its queue.
    pub async fn shutdown(mut self) {
        // Connections stop reading, then write the answers to what they
        // already handed to the store, before the endpoint closes.
        self.cancel.cancel();
        let _ = (&mut self.accept).await;
        let _ = (&mut self.control).await;
        let _ = (&mut self.monitor).await;
        if let Some(link) = self.upstream.take() {
            let _ = link.await;
        }
        if let Some(admin) = self.admin.take() {
            let _ = admin.task.await;
        }
        self.endpoint.close(0u32.into(), b"hub stopping");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.endpoint.wait_idle())
            .await;
        self.store.close().await;
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("hub stopped");
    }
}
