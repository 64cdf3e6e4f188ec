//! Consistency proofs at the hub (一致性核验): the feed's checkpoints and the
//! range comparisons with the source, applied as their batches are.
//!
//! A verification run compares the shared copy with the source range by
//! range. Each answer from the agent ([`RangeDigest`] or [`RangeRepair`]) is
//! read at its own point of the feed and compared when the hub applies the
//! batch that carries it, so changes flowing meanwhile never cause false
//! alarms. A range whose digests differ is split into [`SPLIT_PARTS`] parts
//! and compared again, until a part is small enough to be sent as rows
//! ([`LEAF_ROWS`]); such a repaired part is then compared once more to
//! confirm it. The cost grows with the number of differing rows, not with
//! the size of the table. The run's bookkeeping is [`run`].
//!
//! Invariants: a checkpoint is compared with the hub's digest at exactly
//! its sequence number; a repair makes the rows of its range exactly the
//! source's, whatever the run's state (the agent's digest took it in too);
//! when a run that found differences ends, the feed's digest is counted
//! afresh from the rows it proved.

pub mod run;

use serde::Serialize;
use shuyuan_protocol::batch::{RangeDigest, RangeRepair};
use shuyuan_protocol::encoding::encode;
use shuyuan_protocol::message::{VerifyMode, VerifyRefusal};
use shuyuan_protocol::value::{describe_key, encode_key};
use shuyuan_protocol::{BatchBody, Digest, DigestSummary, FeedId, NodeId, TableSchema};

pub use run::{
    CheckpointResult, LEAF_ROWS, RunOrigin, SCAN_CHUNK_ROWS, SPLIT_PARTS, Verdict, VerifyRecord,
    VerifyRun,
};

use super::audit::AuditKind;
use super::feed::FeedRecord;
use super::{Txn, VerifyEvent, rows};
use crate::store::StoreError;

/// A feed's verification record as one batch works on it: loaded by the
/// first entry that needs it, stored at the end if it changed.
#[derive(Debug, Default)]
pub struct Loaded(Option<(VerifyRecord, VerifyRecord)>);

impl Loaded {
    /// The record, loaded on first use.
    pub fn get(&mut self, txn: &Txn<'_>, feed: &FeedId) -> Result<&mut VerifyRecord, StoreError> {
        let loaded = match self.0.take() {
            Some(loaded) => loaded,
            None => {
                let vr = txn.store.verification(feed)?.unwrap_or_default();
                (vr.clone(), vr)
            }
        };
        Ok(&mut self.0.insert(loaded).0)
    }
}

/// Starts a verification run of a feed at the administrator's request:
/// the run's id, or why none started.
pub fn start(
    txn: &mut Txn<'_>,
    feed: &FeedId,
    reason: &str,
) -> Result<Result<u64, String>, StoreError> {
    let rec = txn.store.feed(feed)?.unwrap_or_default();
    if rec.schema.is_none() {
        return Ok(Err(format!(
            "feed {feed} has no data at this hub yet; nothing to verify"
        )));
    }
    let mut vr = txn.store.verification(feed)?.unwrap_or_default();
    let id = vr.start(
        feed,
        RunOrigin::Hub,
        None,
        reason.to_string(),
        txn.now,
        rec.cursor.last_seq,
    );
    txn.store.put_verification(feed, &vr)?;
    txn.event(VerifyEvent::Requests(feed.clone()));
    Ok(Ok(id))
}

/// Ends a run the agent cannot answer, and audits why.
pub fn refuse(txn: &mut Txn<'_>, peer: NodeId, refusal: &VerifyRefusal) -> Result<(), StoreError> {
    let feed = &refusal.feed;
    let mut vr = txn.store.verification(feed)?.unwrap_or_default();
    let Some(mut run) = vr.run.take().filter(|r| r.id == refusal.run) else {
        return Ok(()); // not the run in progress (ended or superseded)
    };
    let seq = txn.store.feed(feed)?.unwrap_or_default().cursor.last_seq;
    run.refuse(txn.now, seq, &refusal.reason);
    tracing::warn!(%feed, run = run.id, reason = %refusal.reason, "the agent cannot compare the resource with its source");
    txn.audit_feed(
        AuditKind::VerifyRefused,
        peer,
        feed,
        seq,
        format!("run {}: {}", run.id, refusal.reason),
    )?;
    txn.event(VerifyEvent::Finished(run.outcome(feed)));
    vr.last_run = Some(run);
    txn.store.put_verification(feed, &vr)?;
    Ok(())
}

/// Compares the agent's feed digest with the hub's at this point.
/// Returns whether a run was started (requests to send).
pub fn checkpoint(
    txn: &mut Txn<'_>,
    peer: NodeId,
    body: &BatchBody,
    vr: &mut VerifyRecord,
    agent: DigestSummary,
    hub: DigestSummary,
) -> Result<bool, StoreError> {
    let previous = vr.checkpoint.take();
    let matched = agent == hub;
    let was_differing = previous.as_ref().is_some_and(|c| !c.matched());
    vr.checkpoint = Some(CheckpointResult {
        seq: body.seq,
        at: txn.now,
        agent,
        hub,
        differing_since: if matched {
            None
        } else {
            previous.and_then(|c| c.differing_since).or(Some(body.seq))
        },
    });
    if matched {
        return Ok(false);
    }
    if !was_differing {
        tracing::warn!(feed = %body.feed, seq = body.seq, %hub, %agent, "feed digests differ");
        let detail = format!(
            "checkpoint: the hub's digest ({hub}) differs from the agent's ({agent}); comparing with the source"
        );
        txn.audit_feed(AuditKind::Diverged, peer, &body.feed, body.seq, detail)?;
    }
    if vr.may_auto_start(txn.now) {
        let head = body.seq;
        vr.start(
            &body.feed,
            RunOrigin::Checkpoint,
            None,
            format!("checkpoint at seq {head}: digests differ"),
            txn.now,
            head,
        );
        return Ok(true);
    }
    Ok(false)
}

/// Compares a source range digest with the copy; a differing range is
/// asked for again in parts. Returns whether there are requests to send.
pub fn range_digest(
    txn: &mut Txn<'_>,
    peer: NodeId,
    body: &BatchBody,
    schema: &TableSchema,
    vr: &mut VerifyRecord,
    d: &RangeDigest,
) -> Result<bool, StoreError> {
    if vr.run.as_ref().is_none_or(|r| r.id != d.run) {
        if !vr.is_new_agent_run(d.run, &d.range) {
            return Ok(false); // a late answer to an ended run
        }
        // The agent began a scan of its own (`shuyuan-agent verify`).
        vr.start(
            &body.feed,
            RunOrigin::Agent,
            Some(d.run),
            "requested at the agent (shuyuan-agent verify)".into(),
            txn.now,
            body.seq,
        );
    }
    let Some(run) = vr.run.as_mut() else {
        return Ok(false);
    };
    run.bytes_received += entry_bytes(d);
    let Some((_, depth)) = run.answer(&d.range) else {
        return Ok(false);
    };
    run.ranges_compared += 1;
    let hub = rows::range_digest(&*txn.store, &body.feed, schema, &d.range)?.summary();
    if hub == d.digest {
        return Ok(false);
    }
    run.ranges_differing += 1;
    let first = run.ranges_differing == 1;
    run.request(
        &body.feed,
        d.range.clone(),
        VerifyMode::Split {
            parts: SPLIT_PARTS,
            leaf_rows: LEAF_ROWS,
        },
        depth + 1,
    );
    if first {
        let detail = format!(
            "run {}: range {} differs from the source (source {}, hub {}); localising",
            d.run, d.range, d.digest, hub
        );
        tracing::warn!(feed = %body.feed, %detail, "copy differs from the source");
        txn.audit_feed(AuditKind::Diverged, peer, &body.feed, body.seq, detail)?;
    }
    Ok(true)
}

/// Makes the rows of a range exactly the source's. Applied whatever the
/// run's state: the agent's digest took it in too.
pub fn range_repair(
    txn: &mut Txn<'_>,
    body: &BatchBody,
    vr: &mut VerifyRecord,
    r: &RangeRepair,
    rec: &mut FeedRecord,
    digest: &mut Digest,
) -> Result<bool, StoreError> {
    let feed = &body.feed;
    let schema = rec.schema.clone();
    let incoming: std::collections::BTreeSet<Vec<u8>> =
        r.rows.iter().map(|c| encode_key(&c.key)).collect();
    let mut stale = Vec::new();
    rows::visit_range(&*txn.store, feed, &r.range, &mut |key, _| {
        let k = encode_key(&key);
        if !incoming.contains(&k) {
            stale.push(k);
        }
        Ok(())
    })?;
    let mut removed_keys = Vec::new();
    for k in &stale {
        if rows::remove(txn.store, feed, k, rec, digest)? {
            removed_keys.push(describe_key(k));
        }
    }
    let mut repaired_keys = Vec::new();
    for c in &r.rows {
        let Some(values) = &c.row else { continue };
        let old = rows::write(
            txn.store,
            feed,
            &c.key,
            values,
            c.schema_version,
            rec,
            digest,
        )?;
        let same = match (old, &schema) {
            (Some(old), Some(s)) => rows::current_values(&*txn.store, feed, s, old)? == *values,
            _ => false,
        };
        if !same {
            repaired_keys.push(describe_key(&encode_key(&c.key)));
        }
    }
    let Some(run) = vr.run.as_mut().filter(|run| run.id == r.run) else {
        return Ok(false);
    };
    run.bytes_received += entry_bytes(r);
    run.rows_removed += removed_keys.len() as u64;
    run.rows_repaired += repaired_keys.len() as u64;
    for k in removed_keys.into_iter().chain(repaired_keys) {
        run.note_key(k);
    }
    let Some((_, depth)) = run.answer(&r.range) else {
        return Ok(false);
    };
    // Confirm: compare the repaired range once more.
    run.request(
        feed,
        r.range.clone(),
        VerifyMode::Scan {
            chunk_rows: SCAN_CHUNK_ROWS,
        },
        depth + 1,
    );
    Ok(true)
}

/// At the end of a batch: ends a run that has nothing pending (auditing
/// what it repaired) and stores the record if it changed. Returns the
/// feed's digest counted afresh when the run proved rows that were wrong.
pub fn end_batch(
    txn: &mut Txn<'_>,
    peer: NodeId,
    body: &BatchBody,
    loaded: Loaded,
) -> Result<Option<Digest>, StoreError> {
    let Some((mut vr, before)) = loaded.0 else {
        return Ok(None);
    };
    let mut rebuilt = None;
    let finished = match vr.run.as_mut() {
        Some(run) => run.finish_if_done(txn.now, body.seq),
        None => false,
    };
    if finished && let Some(run) = vr.run.take() {
        let checkpoint_differs = vr.checkpoint.as_ref().is_some_and(|c| !c.matched());
        if run.ranges_differing > 0 || checkpoint_differs {
            // Rows were wrong at the hub (damaged, or repaired): the
            // running digest added and subtracted what was stored, so
            // count it afresh from the rows the run just proved.
            rebuilt = Some(rows::rebuild_digest(&*txn.store, &body.feed)?);
        }
        if run.ranges_differing > 0 {
            audit_run_end(txn, peer, body, &run)?;
        }
        txn.event(VerifyEvent::Finished(run.outcome(&body.feed)));
        vr.last_run = Some(run);
    }
    if vr != before {
        txn.store.put_verification(&body.feed, &vr)?;
    }
    Ok(rebuilt)
}

fn audit_run_end(
    txn: &mut Txn<'_>,
    peer: NodeId,
    body: &BatchBody,
    run: &VerifyRun,
) -> Result<(), StoreError> {
    let end = run.finished.as_ref().map_or("", |e| e.detail.as_str());
    let mut keys = run.keys.join("; ");
    let named = run.keys.len() as u64;
    let total = run.rows_repaired + run.rows_removed;
    if total > named {
        keys.push_str(&format!(" and {} more", total - named));
    }
    let detail = format!(
        "run {}: {} ranges compared, {} differed; {} rows rewritten, {} removed; {} bytes exchanged; keys: {keys}. {end}",
        run.id,
        run.ranges_compared,
        run.ranges_differing,
        run.rows_repaired,
        run.rows_removed,
        run.bytes_received + run.bytes_sent,
    );
    txn.audit_feed(AuditKind::Repaired, peer, &body.feed, body.seq, detail)
}

/// The encoded size of a range entry, for counting what a verification
/// cost: its variant tag (one byte) and its content.
fn entry_bytes(content: &impl Serialize) -> u64 {
    1 + encode(content).map_or(0, |b| b.len() as u64)
}
