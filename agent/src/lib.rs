//! shuyuan agent: runs next to a department database, captures every change
//! of its shared tables, seals the changes into signed, hash-chained feeds,
//! keeps them in a durable outbox and pushes them to the hub over QUIC, with
//! signed zero-updates (零更新) when a resource is quiet.
//!
//! The data path, one module each: [`source`] (capture) -> [`seal`] ->
//! [`outbox`] -> [`uplink`]; [`capture`] is the loop that drives the first
//! three, and the only writer of the outbox.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod capture;
pub mod catalog;
pub mod config;
pub mod digest;
pub mod outbox;
pub mod rotation;
pub mod seal;
pub mod source;
pub mod status;
pub mod uplink;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::catalog::CatalogEntry;
use shuyuan_protocol::{NodeId, UnixMillis};
use shuyuan_service::control;
use shuyuan_service::keyfile::KeyFileError;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::capture::{CaptureError, CaptureInput, CaptureLinks, CaptureLoop, CaptureRequest};
use crate::catalog::{Catalog, CatalogStoreError, CatalogView};
use crate::config::Config;
use crate::outbox::{Outbox, OutboxError};
use crate::source::SourceError;
use crate::status::{AgentStatus, StatusBoard};
use crate::uplink::Uplink;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0} (create the key with `shuyuan-agent init`)")]
    Key(KeyFileError),
    #[error(transparent)]
    Keys(rotation::KeysError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Catalog(#[from] CatalogStoreError),
    #[error("cannot open the control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A request on the agent's control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    /// The catalog, as a [`CatalogView`].
    CatalogShow,
    /// Sets one field of one entry; answers the entry.
    CatalogSet {
        code: String,
        field: String,
        value: String,
    },
    /// Imports entries read from a form; answers how many.
    CatalogImport {
        entries: Vec<CatalogEntry>,
    },
    /// Re-reads one resource from the source (PostgreSQL).
    Resync {
        resource: String,
    },
    /// Compares one resource with the hub's copy through a throttled scan
    /// of the source; answers `{"run": id}`.
    Verify {
        resource: String,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    cancel: CancellationToken,
    capture: Option<std::thread::JoinHandle<()>>,
    uplink: tokio::task::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
    status: StatusBoard,
    node: NodeId,
    socket: PathBuf,
}

impl Agent {
    /// Opens the key, outbox and source, then starts capture, the uplink and
    /// the control socket.
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        let config = Arc::new(config);
        let keys = rotation::load(&config).map_err(|e| match e {
            rotation::KeysError::Key(e) => StartError::Key(e),
            other => StartError::Keys(other),
        })?;
        if let Some(p) = keys.pending.as_ref().and_then(|p| p.open().ok()) {
            tracing::info!(old = %p.old, new = %p.new, "a key rotation (密钥轮换) is pending: signing with the new key, announcing it to the hub");
        }
        let key = keys.identity.clone();
        let outbox = Outbox::open(&config.outbox_path())?;
        let catalog = Catalog::open(&config, key.id())?;
        for r in &config.resources {
            if let Some(declared) = catalog.update_cycle(&r.code)
                && declared != r.update_cycle
            {
                tracing::warn!(
                    resource = %r.code,
                    catalog = %declared,
                    config = %r.update_cycle,
                    "the catalog and the config declare different update cycles; the catalog's is in force (change it with `shuyuan-agent catalog set {} update_cycle ...`)",
                    r.code
                );
            }
        }
        let source = source::open(&config)?;
        let status = StatusBoard::new(AgentStatus::initial(&config, key.id().to_string(), true));
        let sealed = Arc::new(Notify::new());
        let (inbox_tx, inbox_rx) = std::sync::mpsc::channel();
        let capture = CaptureLoop::new(
            config.clone(),
            keys.signing.clone(),
            outbox.clone(),
            source,
            CaptureLinks {
                inbox: inbox_rx,
                sealed: sealed.clone(),
                status: status.clone(),
                catalog: catalog.clone(),
            },
        )?;
        let socket = config.control_socket();
        let listener = control::bind(&socket).map_err(|source| StartError::Control {
            path: socket.clone(),
            source,
        })?;
        let cancel = CancellationToken::new();
        let capture = {
            let cancel = cancel.clone();
            std::thread::Builder::new()
                .name("capture".into())
                .spawn(move || capture.run(cancel))
                .map_err(|source| StartError::Control {
                    path: socket.clone(),
                    source,
                })?
        };
        let node = key.id();
        let uplink = Uplink {
            config: config.clone(),
            keys: std::sync::Mutex::new((key, keys.pending)),
            outbox,
            capture: inbox_tx.clone(),
            sealed,
            status: status.clone(),
            catalog: catalog.clone(),
        };
        let uplink = tokio::spawn(uplink.run(cancel.clone()));
        let links = ControlLinks {
            status: status.clone(),
            catalog: catalog.clone(),
            capture: Arc::new(std::sync::Mutex::new(inbox_tx)),
            config: config.clone(),
        };
        let control = tokio::spawn(control::serve(
            listener,
            cancel.clone().cancelled_owned(),
            move |request, stream| answer(request, stream, links.clone()),
        ));
        tracing::info!(
            node = %node,
            department = %config.department,
            resources = config.resources.len(),
            "agent started"
        );
        Ok(Agent {
            cancel,
            capture: Some(capture),
            uplink,
            control,
            status,
            node,
            socket,
        })
    }

    /// This agent's key.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The live status.
    pub fn status(&self) -> AgentStatus {
        self.status.snapshot()
    }

    /// Stops capture and the uplink and waits for them.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.uplink).await;
        let _ = (&mut self.control).await;
        if let Some(capture) = self.capture.take() {
            let _ = tokio::task::spawn_blocking(move || capture.join()).await;
        }
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("agent stopped");
    }
}

/// What the control socket reaches.
#[derive(Debug, Clone)]
struct ControlLinks {
    status: StatusBoard,
    catalog: Catalog,
    capture: Arc<std::sync::Mutex<std::sync::mpsc::Sender<CaptureInput>>>,
    config: Arc<Config>,
}

/// Sends a request about one resource to the capture loop and waits for
/// its answer.
async fn ask_capture<T>(
    config: &Config,
    capture: &std::sync::Mutex<std::sync::mpsc::Sender<CaptureInput>>,
    resource: &str,
    request: impl FnOnce(usize, tokio::sync::oneshot::Sender<Result<T, String>>) -> CaptureRequest,
) -> Result<T, String> {
    let i = config
        .resources
        .iter()
        .position(|r| r.code.as_str() == resource)
        .ok_or_else(|| format!("no resource {resource} in {}", config.file.display()))?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    capture
        .lock()
        .map_err(|_| "capture is not running".to_string())?
        .send(CaptureInput::Request(request(i, reply)))
        .map_err(|_| "capture is not running".to_string())?;
    answer.await.map_err(|_| "capture stopped".to_string())?
}

/// Answers a request on the control socket.
async fn answer(request: ControlRequest, mut stream: tokio::net::UnixStream, links: ControlLinks) {
    let ControlLinks {
        status,
        catalog,
        capture,
        config,
    } = links;
    let result: Result<serde_json::Value, String> = match request {
        ControlRequest::Resync { resource } => {
            let reason = "requested by the operator (shuyuan-agent resync)".to_string();
            ask_capture(&config, &capture, &resource, |i, reply| {
                CaptureRequest::Resync {
                    resource: i,
                    reason,
                    reply,
                }
            })
            .await
            .map(|()| serde_json::json!({ "resource": resource }))
        }
        ControlRequest::Verify { resource } => {
            ask_capture(&config, &capture, &resource, |i, reply| {
                CaptureRequest::Verify { resource: i, reply }
            })
            .await
            .map(|run| serde_json::json!({ "resource": resource, "run": run }))
        }
        ControlRequest::Status => {
            serde_json::to_value(status.snapshot()).map_err(|e| e.to_string())
        }
        ControlRequest::CatalogShow => {
            serde_json::to_value(CatalogView::of(&catalog)).map_err(|e| e.to_string())
        }
        ControlRequest::CatalogSet { code, field, value } => {
            let result = tokio::task::spawn_blocking(move || {
                catalog.set(&code, &field, &value, UnixMillis::now())
            })
            .await;
            match result {
                Ok(Ok(entry)) => serde_json::to_value(entry).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        ControlRequest::CatalogImport { entries } => {
            let result =
                tokio::task::spawn_blocking(move || catalog.import(entries, UnixMillis::now()))
                    .await;
            match result {
                Ok(Ok(n)) => Ok(serde_json::json!({ "imported": n })),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    match result {
        Ok(body) => {
            let _ = control::write_ok(&mut stream).await;
            let _ = stream.write_all(body.to_string().as_bytes()).await;
            let _ = stream.write_all(b"\n").await;
        }
        Err(e) => {
            let _ = control::write_error(&mut stream, &e).await;
        }
    }
}
