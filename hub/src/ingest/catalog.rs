//! Catalog sync (数据资源目录) over a feed connection: an agent syncs its own
//! department's catalog, a child hub the catalogs of the departments below
//! it.
//!
//! Invariant: a catalog message whose new changes write fields the sender
//! does not own, or another department's catalog, is refused whole,
//! audited and answered with the reason; nothing of it is stored.

use shuyuan_protocol::catalog::doc::{CatalogError, Sender};
use shuyuan_protocol::message::{CatalogRefusal, CatalogSync};
use shuyuan_protocol::{DepartmentCode, MessageV1, NodeId, RejectReason};
use tokio::sync::mpsc;

use super::Ingest;
use super::stream::Outgoing;
use crate::apply::audit::{AuditEntry, AuditKind};
use crate::catalog::HubCatalogError;

/// Begins the catalog sync of one department with a peer and sends what
/// there is.
pub(crate) async fn start_catalog(
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

/// Queues every catalog sync message there is to send to this agent now.
pub(crate) async fn send_catalog(
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
pub(crate) async fn receive_catalog(
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
pub(crate) async fn refuse_catalog(
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
