//! The hub's admin HTTP server: the console pages (server-rendered, Chinese
//! and English), the JSON API the CLI `status` also reads, Prometheus
//! `/metrics`, live updates by server-sent events, and webhook alerts.
//!
//! Invariant: every request passes [`auth::Auth::check`] first. On loopback
//! without a password the console is open to local users (and refuses
//! foreign `Host` names, against DNS rebinding); with named administrators
//! every request needs a login, a bearer token or an administrator's HTTP
//! basic credentials; every state-changing request must come from the
//! console's own origin; and every answer carries the headers of
//! [`headers`].

pub mod accounts;
pub mod auth;
pub mod headers;
pub mod i18n;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod pages;
mod routes;
pub mod view;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::AdminConfig;

pub use monitor::Monitor;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen for the admin console on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct AdminState {
    pub shared: Arc<Shared>,
    pub auth: auth::Auth,
    pub monitor: Arc<Monitor>,
    /// Ends the live-update streams when the hub stops.
    pub cancel: CancellationToken,
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds the admin server and serves it until `cancel`.
pub(crate) async fn start(
    shared: Arc<Shared>,
    config: AdminConfig,
    monitor: Arc<Monitor>,
    cancel: CancellationToken,
) -> Result<AdminServer, AdminError> {
    let token_file = shared.config.local_token_file();
    let store = shared.store.clone();
    let audit: auth::Auditor = std::sync::Arc::new(move |text| {
        store.audit(crate::apply::audit::AuditEntry::new(
            crate::apply::audit::AuditKind::LoginLimited,
            text,
        ));
    });
    let auth =
        auth::Auth::new(&config, &token_file, audit).map_err(|source| AdminError::Token {
            path: token_file.clone(),
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AdminError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| AdminError::Listen {
        addr: config.listen,
        source,
    })?;
    let addr_file = shared.config.admin_addr_file();
    std::fs::write(&addr_file, format!("{local_addr}\n")).map_err(|source| AdminError::Token {
        path: addr_file,
        source,
    })?;
    let state = Arc::new(AdminState {
        shared,
        auth,
        monitor,
        cancel: cancel.clone(),
    });
    let app = routes::router(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    tracing::info!(listen = %local_addr, "admin console listening");
    Ok(AdminServer { local_addr, task })
}
