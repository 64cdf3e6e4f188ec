//! One verified batch applied to its feed: the chain first, then the
//! content, then every entry in order.
//!
//! Invariants: a batch is applied only right after the feed's head
//! ([`FeedCursor::check`]: a gap, a replay or a fork is refused and changes
//! nothing but the feed's rejection count and the audit log); its content
//! is checked whole first ([`super::content`]); it is stored as received
//! and the feed's head advances in the same transaction as its rows; rows
//! written while a re-read runs are marked, and at the re-read's end the
//! rows nobody wrote since it began are removed (the source no longer has
//! them).

use shuyuan_protocol::batch::{Entry, Resync};
use shuyuan_protocol::message::{Ack, Reject};
use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{ChainError, FeedCursor, FeedId, NodeId, RejectReason};

use super::audit::{AuditEntry, AuditKind};
use super::feed::{RejectionRecord, ResyncFinish, ResyncRecord, ZeroUpdateRecord};
use super::keys::{self, NodeKind};
use super::verification::{self, Loaded};
use super::{Outcome, Txn, VerifyEvent, content, rows};
use crate::store::StoreError;
use crate::verify::VerifiedBatch;

/// Refuses a batch: counts it on the feed (when the feed belongs to the
/// peer's department), audits it and builds the reply.
pub fn reject(
    txn: &mut Txn<'_>,
    peer: NodeId,
    feed: Option<FeedId>,
    seq: u64,
    reason: RejectReason,
    detail: String,
) -> Result<Outcome, StoreError> {
    let own_department = match (&feed, txn.store.enrollment(&peer)?) {
        (Some(f), Some(e)) if e.kind == NodeKind::Hub => {
            keys::carries(&*txn.store, &peer, &f.department)?
        }
        (Some(f), Some(e)) => f.department == e.department,
        _ => false,
    };
    let mut resend_from = 1;
    if let Some(f) = feed.as_ref().filter(|_| own_department) {
        let mut rec = txn.store.feed(f)?.unwrap_or_default();
        rec.rejected += 1;
        rec.last_rejection = Some(RejectionRecord {
            at: txn.now,
            seq,
            reason,
            detail: detail.clone(),
        });
        resend_from = rec.cursor.next_seq();
        txn.store.put_feed(f, &rec)?;
    }
    tracing::warn!(peer = %peer, feed = ?feed.as_ref().map(ToString::to_string), seq, reason = %reason, %detail, "batch rejected");
    txn.audit(AuditEntry {
        id: 0,
        at: txn.now,
        kind: AuditKind::BatchRejected,
        peer: Some(peer),
        feed: feed.clone(),
        seq: Some(seq),
        reason: Some(reason),
        detail: detail.clone(),
    })?;
    Ok(Outcome::Reject(Reject {
        feed,
        seq,
        reason,
        detail,
        resend_from,
    }))
}

/// Applies a batch whose signature and signer were checked, or refuses it.
pub fn apply(txn: &mut Txn<'_>, peer: NodeId, v: &VerifiedBatch) -> Result<Outcome, StoreError> {
    let body = &v.body;
    let feed = &body.feed;
    let mut rec = txn.store.feed(feed)?.unwrap_or_default();
    if let Err(e) = chain_check(txn, &rec.cursor, v)? {
        let reason = match e {
            ChainError::Gap { .. } => RejectReason::Gap,
            ChainError::Replay { .. } => RejectReason::Replay,
            ChainError::Fork { .. } => RejectReason::Fork,
        };
        return reject(
            txn,
            peer,
            Some(feed.clone()),
            body.seq,
            reason,
            e.to_string(),
        );
    }
    if let Err(detail) = content::check(rec.schema.as_ref(), &body.entries) {
        return reject(
            txn,
            peer,
            Some(feed.clone()),
            body.seq,
            RejectReason::InvalidContent,
            detail,
        );
    }
    let mut had_changes = false;
    let mut resync = txn.store.resync(feed)?;
    let resync_before = resync.clone();
    let mut digest = txn.store.digest(feed)?.unwrap_or_default();
    let digest_before = digest.clone();
    // Loaded when an entry needs it; stored if it changed.
    let mut verify = Loaded::default();
    let mut requests = false;
    for entry in &body.entries {
        match entry {
            Entry::Schema(s) => {
                txn.store.put_schema(feed, s)?;
                rec.schema = Some(s.clone());
            }
            Entry::Change(c) => {
                had_changes = true;
                rec.changes_applied += 1;
                let running = resync.as_mut().filter(|r| r.finished.is_none());
                match &c.row {
                    Some(values) => {
                        if let Some(r) = running {
                            r.rows_written += 1;
                            txn.store.touch(feed, &encode_key(&c.key))?;
                        }
                        rows::write(
                            txn.store,
                            feed,
                            &c.key,
                            values,
                            c.schema_version,
                            &mut rec,
                            &mut digest,
                        )?;
                    }
                    None => {
                        let row_key = encode_key(&c.key);
                        if let Some(r) = running {
                            r.rows_written += 1;
                            txn.store.touch(feed, &row_key)?;
                        }
                        rows::remove(txn.store, feed, &row_key, &mut rec, &mut digest)?;
                    }
                }
            }
            Entry::Resync(Resync::Begin { id, reason }) => {
                txn.store.clear_touched(feed)?;
                resync = Some(ResyncRecord {
                    id: *id,
                    reason: reason.clone(),
                    started_seq: body.seq,
                    started_at: txn.now,
                    rows_written: 0,
                    finished: None,
                });
                txn.audit_feed(
                    AuditKind::ResyncStarted,
                    peer,
                    feed,
                    body.seq,
                    reason.clone(),
                )?;
            }
            Entry::Resync(Resync::End { id, rows }) => {
                let Some(r) = resync
                    .as_mut()
                    .filter(|r| r.id == *id && r.finished.is_none())
                else {
                    tracing::warn!(%feed, id, "resync end without its begin; ignored");
                    continue;
                };
                let removed = rows::remove_untouched(txn.store, feed, &mut rec, &mut digest)?;
                txn.store.clear_touched(feed)?;
                r.finished = Some(ResyncFinish {
                    seq: body.seq,
                    at: txn.now,
                    rows_sent: *rows,
                    rows_removed: removed,
                });
                let detail = format!(
                    "re-read finished: {rows} rows sent, {} rows written since it began, {removed} rows removed that the source no longer has",
                    r.rows_written
                );
                txn.audit_feed(AuditKind::ResyncFinished, peer, feed, body.seq, detail)?;
            }
            Entry::ZeroUpdate(z) => {
                rec.last_zero_update = Some(ZeroUpdateRecord {
                    seq: body.seq,
                    since: z.since,
                    until: z.until,
                    source_position: z.source_position.clone(),
                    received_at: txn.now,
                });
            }
            Entry::Checkpoint(agent) => {
                let hub = digest.summary();
                let vr = verify.get(txn, feed)?;
                requests |= verification::checkpoint(txn, peer, body, vr, *agent, hub)?;
            }
            Entry::RangeDigest(d) => {
                let Some(schema) = rec.schema.clone() else {
                    continue;
                };
                let vr = verify.get(txn, feed)?;
                requests |= verification::range_digest(txn, peer, body, &schema, vr, d)?;
            }
            Entry::RangeRepair(r) => {
                let vr = verify.get(txn, feed)?;
                requests |= verification::range_repair(txn, body, vr, r, &mut rec, &mut digest)?;
                if let Some(run) = resync.as_mut().filter(|r| r.finished.is_none()) {
                    run.rows_written += r.rows.len() as u64;
                    for c in &r.rows {
                        txn.store.touch(feed, &encode_key(&c.key))?;
                    }
                }
            }
        }
    }
    if had_changes {
        rec.last_change_at = Some(body.created_at);
    }
    if let Some(rebuilt) = verification::end_batch(txn, peer, body, verify)? {
        digest = rebuilt;
    }
    if requests {
        txn.event(VerifyEvent::Requests(feed.clone()));
    }
    if digest != digest_before {
        txn.store.put_digest(feed, &digest)?;
    }
    if resync != resync_before
        && let Some(r) = &resync
    {
        txn.store.put_resync(feed, r)?;
    }
    rec.cursor.advance(body.seq, v.hash);
    rec.signer = Some(v.signed.signer);
    rec.batches_applied += 1;
    rec.last_batch_received_at = Some(txn.now);
    txn.store.put_batch(feed, body.seq, &v.signed)?;
    txn.store.put_feed(feed, &rec)?;
    tracing::debug!(
        %feed,
        seq = body.seq,
        entries = body.entries.len(),
        peer = %peer.short(),
        "batch applied"
    );
    Ok(Outcome::Ack(Ack {
        feed: feed.clone(),
        seq: body.seq,
    }))
}

/// Whether the batch follows the feed's head (a replay or fork is told
/// apart by the stored batch at its sequence number).
fn chain_check(
    txn: &Txn<'_>,
    cursor: &FeedCursor,
    v: &VerifiedBatch,
) -> Result<Result<(), ChainError>, StoreError> {
    let body = &v.body;
    let mut lookup_err = None;
    let verdict = cursor.check(body.seq, body.prev, v.hash, |s| {
        match txn.store.batch(&body.feed, s) {
            Ok(b) => b.map(|b| b.hash()),
            Err(e) => {
                lookup_err = Some(e);
                None
            }
        }
    });
    match lookup_err {
        Some(e) => Err(e),
        None => Ok(verdict),
    }
}
