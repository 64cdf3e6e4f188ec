//! Comparisons with the hub: probes the hub asks for, and full scans the
//! operator or the schedule (`[verify] every`) starts.
//!
//! A comparison is queued at the source, which answers it in the snapshot
//! of a later read, so the answer stands at an exact point of the feed; the
//! answers are sealed with that read's changes (see `read`).
//!
//! Invariant: a comparison the source cannot answer is refused, and the
//! hub is told why; the agent's own runs number on from the highest run id
//! the hub used, so the hub takes each as a new scan.

use shuyuan_protocol::message::{VerifyMode, VerifyRefusal};
use shuyuan_protocol::{Entry, FeedId, KeyRange, UnixMillis};

use super::CaptureLoop;
use crate::outbox::FeedState;
use crate::source::{Probe, SourceError};

/// Source rows per range of a full comparison the operator starts (the
/// hub asks for the same).
pub const VERIFY_CHUNK_ROWS: u32 = 10_000;

impl CaptureLoop {
    /// Queues a comparison the hub asked for; a refusal goes back to the
    /// hub.
    pub(super) fn queue_probe(
        &mut self,
        probe: Probe,
        refusals: &tokio::sync::mpsc::UnboundedSender<VerifyRefusal>,
    ) {
        let (resource, run, range) = (probe.resource, probe.run, probe.range.clone());
        self.last_run = self.last_run.max(run);
        match self.source.probe(probe) {
            Ok(()) => {
                tracing::debug!(resource, run, %range, "comparison with the hub queued");
                self.probes_pending = true;
            }
            Err(e) => {
                tracing::warn!(resource, run, error = %e, "cannot compare with the hub; telling it why");
                let _ = refusals.send(VerifyRefusal {
                    feed: self.feeds[resource].0.clone(),
                    run,
                    reason: e.to_string(),
                });
            }
        }
    }

    /// Starts a full comparison of one resource with the hub (a throttled
    /// scan of the source); returns the run's id.
    pub(super) fn start_scan(
        &mut self,
        resource: usize,
        now: UnixMillis,
    ) -> Result<u64, SourceError> {
        let run = u64::try_from(now.0)
            .unwrap_or(0)
            .max(self.last_run.saturating_add(1));
        self.source.probe(Probe {
            resource,
            run,
            range: KeyRange::all(),
            mode: VerifyMode::Scan {
                chunk_rows: VERIFY_CHUNK_ROWS,
            },
        })?;
        self.last_run = run;
        self.probes_pending = true;
        Ok(run)
    }

    /// Starts the scheduled comparisons that are due (`[verify] every`). A
    /// resource the source cannot compare is left off the schedule.
    pub(super) fn start_scheduled_scans(&mut self, now: UnixMillis) {
        let Some(every) = self.config.verify.every else {
            return;
        };
        if self.next_scan.is_empty() {
            self.next_scan = vec![Some(now.saturating_add(every)); self.feeds.len()];
        }
        for i in 0..self.next_scan.len() {
            if self.next_scan[i].is_some_and(|t| now >= t) {
                self.next_scan[i] = match self.start_scan(i, now) {
                    Ok(run) => {
                        tracing::info!(feed = %self.feeds[i].0, run, "scheduled comparison with the hub started");
                        Some(now.saturating_add(every))
                    }
                    Err(e) => {
                        tracing::info!(feed = %self.feeds[i].0, error = %e, "no scheduled comparisons for this resource");
                        None
                    }
                };
            }
        }
    }
}

/// Places the answers of a read, `(resource, entry)`, after every change of
/// the read in their feeds' entries; rows of a range repair carry their
/// feed's current shape version.
pub(super) fn place_answers(
    answers: Vec<(usize, Entry)>,
    feeds: &[(FeedId, FeedState)],
    entries: &mut [Vec<Entry>],
) {
    for (r, mut entry) in answers {
        if let Entry::RangeRepair(repair) = &mut entry {
            let version = feeds[r].1.schema.as_ref().map_or(0, |s| s.version);
            for c in &mut repair.rows {
                c.schema_version = version;
            }
        }
        entries[r].push(entry);
    }
}
