//! The control socket (the local channel of `shuyuan-hub status`,
//! `enroll`, `export`, `audit`, `catalog` and `verify`) and what its
//! requests do, shared with the admin console where both offer the same.
//!
//! Invariant: a request is answered with a header line saying whether it
//! was done, then its body; a refusal says why in the header and changes
//! nothing.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shuyuan_protocol::catalog::{EntryState, Review, ReviewStatus};
use shuyuan_protocol::identity::IdentityError;
use shuyuan_protocol::{DepartmentCode, FeedId, NodeId, UnixMillis};
use shuyuan_service::control;
use tokio::io::AsyncWriteExt;

use crate::Shared;
use crate::apply::audit::{self, AuditEntry, AuditKind};
use crate::apply::keys::{Enrollment, NodeKind};
use crate::catalog::{self, CityEntry, Filter, HubCatalog};
use crate::export::{self, Format};
use crate::status::{self, HubStatus, LiveFacts};
use crate::writer::Store;

/// A request on the hub's control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Enroll {
        department: String,
        name: String,
        key: String,
        /// A child hub; `department` is its platform code.
        #[serde(default)]
        hub: bool,
    },
    Export {
        resource: String,
        department: Option<String>,
        format: Format,
    },
    Audit {
        limit: usize,
    },
    /// Revokes a key: the [`Revocation`](crate::apply::keys::Revocation).
    Revoke {
        key: String,
        reason: String,
    },
    /// Checks the audit log's hash chain: a [`ChainReport`](crate::apply::audit::ChainReport).
    AuditVerify {
        /// A head recorded earlier, as 64 hex digits.
        head: Option<String>,
    },
    /// The city catalog, filtered: a list of [`CityEntry`].
    CatalogList {
        filter: Filter,
    },
    /// Approves or returns an entry.
    CatalogReview(ReviewRequest),
    /// The publication-deadline and yearly-review report: a list of [`catalog::Finding`].
    CatalogDeadlines,
    /// Starts a comparison with the source of one resource (or of every
    /// resource): a list of [`VerifyStarted`].
    Verify {
        resource: Option<String>,
        department: Option<String>,
    },
}

/// A verification run started by `shuyuan-hub verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyStarted {
    pub feed: String,
    /// The run's id, or why none started.
    pub run: Result<u64, String>,
}

/// An administrator's verdict on a catalog entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReviewRequest {
    /// The department, when several use the code.
    pub department: Option<String>,
    pub code: String,
    /// Approve (审核通过), or return for changes (退回修改).
    pub approve: bool,
    /// Who reviewed: taken from the login when an administrator is logged
    /// in (a different name is refused); stated otherwise.
    #[serde(default)]
    pub reviewer: String,
    pub remarks: String,
}

/// How a review's reviewer is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouched {
    /// The named administrator logged in to the console or API.
    Login,
    /// As stated by whoever made the request: on the hub's host (the
    /// control socket, the local token) or on an open loopback console.
    Stated,
}

/// Checks and records a review (used online and offline).
pub async fn review(
    catalog: &HubCatalog,
    store: &Store,
    city: &[CityEntry],
    request: &ReviewRequest,
    vouched: Vouched,
) -> Result<Review, String> {
    let ReviewRequest {
        department,
        code,
        approve,
        reviewer,
        remarks,
    } = request;
    let (code, approve) = (code.as_str(), *approve);
    let entry = catalog::pick(city, code, department.as_deref()).map_err(|e| e.to_string())?;
    if reviewer.trim().is_empty() {
        return Err("name the reviewer (--reviewer, or the field reviewer)".into());
    }
    if !approve && remarks.trim().is_empty() {
        return Err(
            "an entry returned for changes needs remarks saying what to change (--remarks)".into(),
        );
    }
    match entry.state {
        EntryState::Draft => {
            return Err(format!(
                "entry {code} of {} is a draft: the department has not submitted it",
                entry.department
            ));
        }
        EntryState::Withdrawn => {
            return Err(format!("entry {code} of {} is withdrawn", entry.department));
        }
        _ => {}
    }
    let department: DepartmentCode = entry
        .department
        .parse()
        .map_err(|e: shuyuan_protocol::feed::CodeError| e.to_string())?;
    let review = Review {
        status: if approve {
            ReviewStatus::Approved
        } else {
            ReviewStatus::Returned
        },
        reviewer: reviewer.trim().to_string(),
        remarks: remarks.trim().to_string(),
        reviewed_at: UnixMillis::now(),
    };
    catalog
        .review(&department, code, &review)
        .await
        .map_err(|e| e.to_string())?;
    let audit = AuditEntry::new(
        AuditKind::CatalogReviewed,
        format!(
            "{} entry {code} of {department} by {}{}{}",
            if approve { "approved" } else { "returned" },
            review.reviewer,
            match vouched {
                Vouched::Login => " (logged in)",
                Vouched::Stated => " (as stated on the hub's host or open console, not verified)",
            },
            if review.remarks.is_empty() {
                String::new()
            } else {
                format!(": {}", review.remarks)
            }
        ),
    );
    store.audit(audit);
    Ok(review)
}

/// Validates the arguments of `enroll` (`hub`: a child hub, and
/// `department` is its platform code).
pub fn enrollment(
    department: &str,
    name: &str,
    key: &str,
    hub: bool,
) -> Result<(NodeId, Enrollment), String> {
    let department = DepartmentCode::new(department).map_err(|e| e.to_string())?;
    let key: NodeId = key.parse().map_err(|e: IdentityError| e.to_string())?;
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err("the department name must be 1 to 200 characters".into());
    }
    Ok((
        key,
        Enrollment {
            department,
            name: name.to_string(),
            kind: if hub { NodeKind::Hub } else { NodeKind::Agent },
            enrolled_at: UnixMillis::now(),
        },
    ))
}

/// Sends what a blocking export writes to the control connection.
struct ChannelWriter(tokio::sync::mpsc::Sender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.blocking_send(buf.to_vec()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "control client went away")
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Answers one control request; a refusal is written as the header.
pub(crate) async fn serve_request(
    shared: Arc<Shared>,
    request: ControlRequest,
    mut stream: tokio::net::UnixStream,
) {
    if let Err(e) = answer(&shared, request, &mut stream).await {
        let _ = control::write_error(&mut stream, &e).await;
    }
}

/// The city catalog, filtered.
pub(crate) async fn city(shared: &Shared, filter: &Filter) -> Result<Vec<CityEntry>, String> {
    filter.validate()?;
    let all = shared.catalog.city().await.map_err(|e| e.to_string())?;
    Ok(all.into_iter().filter(|e| filter.matches(e)).collect())
}

async fn answer(
    shared: &Arc<Shared>,
    request: ControlRequest,
    out: &mut tokio::net::UnixStream,
) -> Result<(), String> {
    match request {
        ControlRequest::Status => {
            let status = live_status(shared).await?;
            let body = serde_json::to_vec(&status).map_err(|e| e.to_string())?;
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out.write_all(&body).await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::Enroll {
            department,
            name,
            key,
            hub,
        } => {
            if hub && key.parse::<NodeId>().is_ok_and(|k| k == shared.node) {
                return Err("that is this hub's own key".into());
            }
            let (key, enrollment) = enrollment(&department, &name, &key, hub)?;
            let new = shared
                .peers
                .enroll(key, enrollment)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(%key, %department, new, "enrolled");
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(format!("{}\n", serde_json::json!({ "new": new })).as_bytes())
                .await;
        }
        ControlRequest::Revoke { key, reason } => {
            let key: NodeId = key.parse().map_err(|e: IdentityError| e.to_string())?;
            let revocation = shared
                .peers
                .revoke(key, reason)
                .await
                .map_err(|e| e.to_string())?;
            tracing::warn!(%key, reason = %revocation.reason, "key revoked");
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&revocation).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::Audit { limit } => {
            // What was queued before the request (a refusal just answered,
            // say) is on record first.
            shared.store.barrier().await.map_err(|e| e.to_string())?;
            let entries = shared
                .store
                .read(|t| audit::recent(t, limit))
                .map_err(|e| e.to_string())?;
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&entries).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::AuditVerify { head } => {
            let head = head.as_deref().map(audit::chain::parse_head).transpose()?;
            let report = shared
                .store
                .read(|t| audit::verify(t, head))
                .map_err(|e| e.to_string())?;
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&report).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::CatalogList { filter } => {
            let list = city(shared, &filter).await?;
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&list).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::CatalogReview(request) => {
            let all = shared.catalog.city().await.map_err(|e| e.to_string())?;
            let review = review(
                &shared.catalog,
                &shared.store,
                &all,
                &request,
                Vouched::Stated,
            )
            .await?;
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&review).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::CatalogDeadlines => {
            let all = shared.catalog.city().await.map_err(|e| e.to_string())?;
            let list = catalog::findings(
                &all,
                UnixMillis::now(),
                shared.config.publication_deadline_days,
                &shared.config.calendar,
            );
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&list).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::Verify {
            resource,
            department,
        } => {
            let feeds: Vec<FeedId> = match &resource {
                Some(r) => vec![
                    shared
                        .store
                        .read(|t| export::resolve(t, r, department.as_deref()))
                        .map_err(|e| e.to_string())?,
                ],
                None => shared
                    .store
                    .read(|t| t.feeds())
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(f, _)| f)
                    .filter(|f| {
                        department
                            .as_deref()
                            .is_none_or(|d| f.department.as_str() == d)
                    })
                    .collect(),
            };
            let mut started = Vec::new();
            let below: std::collections::BTreeMap<DepartmentCode, NodeId> = shared
                .peers
                .all()
                .into_iter()
                .filter(|(_, e)| !e.is_hub())
                .filter_map(|(k, e)| {
                    let via = e.via(&k)?;
                    Some((e.department, via))
                })
                .collect();
            for feed in feeds {
                if let Some(via) = below.get(&feed.department) {
                    // Only the hub the agent connects to can ask it.
                    started.push(VerifyStarted {
                        feed: feed.to_string(),
                        run: Err(format!(
                            "department {} is served below child hub {via}: run the comparison there (this hub compares the checkpoints in the forwarded batches)",
                            feed.department
                        )),
                    });
                    continue;
                }
                let run = shared
                    .store
                    .start_verify(
                        feed.clone(),
                        "requested at the hub (shuyuan-hub verify)".into(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%feed, ?run, "verification requested");
                started.push(VerifyStarted {
                    feed: feed.to_string(),
                    run,
                });
            }
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let _ = out
                .write_all(&serde_json::to_vec(&started).unwrap_or_default())
                .await;
            let _ = out.write_all(b"\n").await;
        }
        ControlRequest::Export {
            resource,
            department,
            format,
        } => {
            let feed = shared
                .store
                .read(|t| export::resolve(t, &resource, department.as_deref()))
                .map_err(|e| e.to_string())?;
            control::write_ok(out).await.map_err(|e| e.to_string())?;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
            let store = shared.store.clone();
            let task = tokio::task::spawn_blocking(move || {
                let mut w = std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter(tx));
                store.read(|t| export::export(t, &feed, format, &mut w))
            });
            while let Some(chunk) = rx.recv().await {
                if out.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            drop(rx);
            if let Ok(Err(e)) = task.await {
                tracing::warn!(error = %e, "export failed");
            }
        }
    }
    Ok(())
}

pub(crate) async fn live_status(shared: &Shared) -> Result<HubStatus, String> {
    let store = shared.store.health();
    let facts = || LiveFacts {
        listen: Some(shared.local_addr.to_string()),
        started_at: Some(shared.started_at),
        connections: shared.live.connections(),
        disconnected: shared.live.disconnected(),
        children: shared.live.children(),
        upstream: shared.upstream.as_ref().map(|b| {
            b.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }),
        handshakes_refused: shared.peers.refused(),
        store: store.clone(),
        ..LiveFacts::default()
    };
    // A failed write can leave the store unreadable until it is reopened:
    // then say so instead of failing the status.
    let unreadable = |e: String| {
        if store.writable() {
            Err(e)
        } else {
            Ok(status::unreadable(
                &shared.config.name,
                shared.node.to_string(),
                facts(),
                e,
            ))
        }
    };
    let city = match shared.catalog.city().await {
        Ok(city) => city,
        Err(e) => return unreadable(e.to_string()),
    };
    shared
        .store
        .read(|t| {
            status::collect(
                t,
                &shared.config.name,
                shared.node.to_string(),
                true,
                facts().with_catalog(&city, shared.config.freshness_grace),
            )
        })
        .or_else(|e| unreadable(e.to_string()))
}
