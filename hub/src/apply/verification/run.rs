//! What verification knows of one feed: the latest checkpoint comparison,
//! the run in progress with its pending ranges, and the last finished run.
//!
//! Invariants: the requests of a run cover disjoint key ranges; an answer is
//! taken only for the start of a pending range (a late or repeated answer is
//! ignored); a run ends when no range is pending, verified only if every
//! differing range was resolved; run ids only grow.

use serde::{Deserialize, Serialize};
use shuyuan_protocol::encoding::encode;
use shuyuan_protocol::message::{VerifyMode, VerifyOutcome, VerifyRequest};
use shuyuan_protocol::{DigestSummary, FeedId, KeyRange, MessageV1, UnixMillis};

/// Source rows per range of a full scan.
pub const SCAN_CHUNK_ROWS: u32 = 10_000;
/// Parts a differing range is split into.
pub const SPLIT_PARTS: u16 = 16;
/// A differing range of at most this many source rows is sent as rows.
pub const LEAF_ROWS: u16 = 16;
/// Splits and confirmations of one range before the run gives up on it
/// (a range that keeps differing after repair: the source orders its keys
/// differently from the hub, or it keeps changing without capture).
pub const MAX_DEPTH: u8 = 24;
/// Keys named in a run's record (the rest are counted).
pub const KEYS_SHOWN: usize = 100;
/// A checkpoint mismatch starts a run only if no such run ended this recently.
pub const AUTO_RUN_PAUSE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Everything verification knows about one feed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    /// The latest comparison of the feed digests (agent's checkpoint against
    /// the hub's own digest at the same sequence).
    pub checkpoint: Option<CheckpointResult>,
    /// The run in progress.
    pub run: Option<VerifyRun>,
    /// The latest finished run.
    pub last_run: Option<VerifyRun>,
    /// The last run id the hub gave out.
    pub last_run_id: u64,
}

/// One comparison of feed digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointResult {
    pub seq: u64,
    pub at: UnixMillis,
    pub agent: DigestSummary,
    pub hub: DigestSummary,
    /// Since when the digests have differed (the first mismatching seq).
    pub differing_since: Option<u64>,
}

impl CheckpointResult {
    pub fn matched(&self) -> bool {
        self.agent == self.hub
    }
}

/// Who asked for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunOrigin {
    /// `shuyuan-hub verify`.
    Hub,
    /// The hub itself, after a checkpoint's digests differed.
    Checkpoint,
    /// `shuyuan-agent verify` (the agent scans on its own).
    Agent,
}

/// A range asked of the agent and not yet fully answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRange {
    /// What is still unanswered (its start moves as parts arrive).
    pub range: KeyRange,
    pub mode: VerifyMode,
    /// Splits and confirmations that led here.
    pub depth: u8,
}

/// One verification run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRun {
    pub id: u64,
    pub origin: RunOrigin,
    pub reason: String,
    pub started_at: UnixMillis,
    /// The hub's head of the feed when it started.
    pub started_seq: u64,
    pub pending: Vec<PendingRange>,
    pub ranges_compared: u64,
    pub ranges_differing: u64,
    /// Ranges given up on after [`MAX_DEPTH`] rounds.
    pub unresolved: u64,
    /// Rows the repairs rewrote (missing or different at the hub).
    pub rows_repaired: u64,
    /// Rows the repairs removed (the source no longer has them).
    pub rows_removed: u64,
    /// The first [`KEYS_SHOWN`] keys repaired or removed, in words.
    pub keys: Vec<String>,
    /// Bytes of the range entries received.
    pub bytes_received: u64,
    /// Bytes of the requests sent (first sending only).
    pub bytes_sent: u64,
    pub finished: Option<RunEnd>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    pub at: UnixMillis,
    pub seq: u64,
    pub verified: bool,
    pub detail: String,
    /// The agent cannot compare this resource with its source: the run
    /// proves nothing either way.
    pub refused: bool,
}

impl VerifyRun {
    pub fn new(id: u64, origin: RunOrigin, reason: String, now: UnixMillis, seq: u64) -> Self {
        VerifyRun {
            id,
            origin,
            reason,
            started_at: now,
            started_seq: seq,
            pending: Vec::new(),
            ranges_compared: 0,
            ranges_differing: 0,
            unresolved: 0,
            rows_repaired: 0,
            rows_removed: 0,
            keys: Vec::new(),
            bytes_received: 0,
            bytes_sent: 0,
            finished: None,
        }
    }

    /// Asks for a range (unless it has been split and repaired too often).
    pub fn request(&mut self, feed: &FeedId, range: KeyRange, mode: VerifyMode, depth: u8) {
        if depth > MAX_DEPTH {
            self.unresolved += 1;
            return;
        }
        let request = VerifyRequest {
            feed: feed.clone(),
            run: self.id,
            range: range.clone(),
            mode,
        };
        self.bytes_sent += encode(&MessageV1::Verify(request)).map_or(0, |b| b.len() as u64);
        self.pending.push(PendingRange { range, mode, depth });
    }

    /// Takes an answer for `part`: it must start where a pending range
    /// starts and end inside it. Returns that range's mode and depth.
    pub fn answer(&mut self, part: &KeyRange) -> Option<(VerifyMode, u8)> {
        let i = self.pending.iter().position(|p| {
            p.range.lo == part.lo
                && match (&part.hi, &p.range.hi) {
                    (_, None) => true,
                    (Some(a), Some(b)) => a <= b,
                    (None, Some(_)) => false,
                }
        })?;
        let p = &mut self.pending[i];
        let found = (p.mode, p.depth);
        match &part.hi {
            Some(hi) if p.range.hi.as_ref() != Some(hi) => p.range.lo = hi.clone(),
            _ => {
                self.pending.remove(i);
            }
        }
        Some(found)
    }

    /// Records a repaired or removed key.
    pub fn note_key(&mut self, key: String) {
        if self.keys.len() < KEYS_SHOWN {
            self.keys.push(key);
        }
    }

    /// What the agent is told (and the CLI shows) when the run ended.
    pub fn outcome(&self, feed: &FeedId) -> VerifyOutcome {
        let end = self.finished.as_ref();
        VerifyOutcome {
            feed: feed.clone(),
            run: self.id,
            verified: end.is_some_and(|e| e.verified),
            seq: end.map_or(0, |e| e.seq),
            ranges_compared: self.ranges_compared,
            ranges_differing: self.ranges_differing,
            rows_repaired: self.rows_repaired,
            rows_removed: self.rows_removed,
            bytes_exchanged: self.bytes_received + self.bytes_sent,
            detail: end.map_or_else(String::new, |e| e.detail.clone()),
            refused: end.is_some_and(|e| e.refused),
        }
    }

    /// Ends the run if nothing is pending.
    pub fn finish_if_done(&mut self, now: UnixMillis, seq: u64) -> bool {
        if !self.pending.is_empty() || self.finished.is_some() {
            return false;
        }
        let verified = self.unresolved == 0;
        let detail = if self.ranges_differing == 0 {
            format!(
                "copy equals the source: {} ranges compared",
                self.ranges_compared
            )
        } else if verified {
            format!(
                "{} differing ranges localised and repaired ({} rows rewritten, {} removed); copy equals the source",
                self.ranges_differing, self.rows_repaired, self.rows_removed
            )
        } else {
            format!(
                "{} ranges still differ after {MAX_DEPTH} rounds ({} rows rewritten, {} removed); re-read the resource (`shuyuan-agent resync`)",
                self.unresolved, self.rows_repaired, self.rows_removed
            )
        };
        self.finished = Some(RunEnd {
            at: now,
            seq,
            verified,
            detail,
            refused: false,
        });
        true
    }

    /// Ends the run because the agent cannot answer it.
    pub fn refuse(&mut self, now: UnixMillis, seq: u64, reason: &str) {
        self.pending.clear();
        self.finished = Some(RunEnd {
            at: now,
            seq,
            verified: false,
            detail: format!("the agent cannot compare this resource with its source: {reason}"),
            refused: true,
        });
    }
}

/// The verdict shown for a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Verdict {
    /// The copy was proven equal at `seq` (by a checkpoint of the feed
    /// digest, or by a comparison with the source).
    Verified {
        seq: u64,
        at: UnixMillis,
        by: String,
    },
    /// The copy differs: `rows` differing rows found so far.
    Diverged {
        since_seq: u64,
        rows: u64,
        repairing: bool,
        detail: String,
    },
    Unverified,
}

impl VerifyRecord {
    /// The current verdict.
    pub fn verdict(&self) -> Verdict {
        if let Some(run) = self.run.as_ref().filter(|r| r.ranges_differing > 0) {
            return Verdict::Diverged {
                since_seq: run.started_seq,
                rows: run.rows_repaired + run.rows_removed,
                repairing: true,
                detail: format!(
                    "{} differing ranges so far; {} still being compared",
                    run.ranges_differing,
                    run.pending.len()
                ),
            };
        }
        let from_checkpoint = self.checkpoint.as_ref().map(|c| {
            let verdict = if c.matched() {
                Verdict::Verified {
                    seq: c.seq,
                    at: c.at,
                    by: "checkpoint".into(),
                }
            } else {
                Verdict::Diverged {
                    since_seq: c.differing_since.unwrap_or(c.seq),
                    rows: c.agent.rows.abs_diff(c.hub.rows),
                    repairing: self.run.is_some(),
                    detail: format!("hub digest {} ≠ agent digest {}", c.hub, c.agent),
                }
            };
            (c.at, verdict)
        });
        let from_run = self.last_run.as_ref().and_then(|r| {
            let end = r.finished.as_ref().filter(|e| !e.refused)?;
            let verdict = if end.verified {
                Verdict::Verified {
                    seq: end.seq,
                    at: end.at,
                    by: "source comparison".into(),
                }
            } else {
                Verdict::Diverged {
                    since_seq: r.started_seq,
                    rows: r.rows_repaired + r.rows_removed,
                    repairing: false,
                    detail: end.detail.clone(),
                }
            };
            Some((end.at, verdict))
        });
        match (from_checkpoint, from_run) {
            (Some((a, va)), Some((b, vb))) => {
                if a >= b {
                    va
                } else {
                    vb
                }
            }
            (Some((_, v)), None) | (None, Some((_, v))) => v,
            (None, None) => Verdict::Unverified,
        }
    }

    /// Starts a run (ending one in progress as superseded).
    pub fn start(
        &mut self,
        feed: &FeedId,
        origin: RunOrigin,
        id: Option<u64>,
        reason: String,
        now: UnixMillis,
        seq: u64,
    ) -> u64 {
        if let Some(mut old) = self.run.take() {
            old.pending.clear();
            old.unresolved += 1;
            old.finished = Some(RunEnd {
                at: now,
                seq,
                verified: false,
                detail: "superseded by a newer run".into(),
                refused: false,
            });
            self.last_run = Some(old);
        }
        // Run ids only grow: the hub's count on from its clock in
        // milliseconds, the agent's are its clock; an answer to an older run
        // is never taken for a new one.
        let id = id.unwrap_or_else(|| {
            self.last_run_id
                .max(u64::try_from(now.0).unwrap_or(0))
                .saturating_add(1)
        });
        self.last_run_id = self.last_run_id.max(id);
        let mut run = VerifyRun::new(id, origin, reason, now, seq);
        run.request(
            feed,
            KeyRange::all(),
            VerifyMode::Scan {
                chunk_rows: SCAN_CHUNK_ROWS,
            },
            0,
        );
        if origin == RunOrigin::Agent {
            // The agent began this scan itself: nothing was sent for it.
            run.bytes_sent = 0;
        }
        self.run = Some(run);
        id
    }

    /// Whether an answer for an unknown run is the start of a scan the agent
    /// began on its own (and not a late answer to an ended run).
    pub fn is_new_agent_run(&self, run: u64, range: &KeyRange) -> bool {
        range.lo.is_empty() && run > self.last_run_id
    }

    /// Whether a checkpoint mismatch may start a run now: none is running,
    /// and the last run a checkpoint started did not end just now (the
    /// digests can still differ after the copy was proven equal, when it is
    /// the agent's digest that is wrong; this keeps such a feed from being
    /// scanned over and over).
    pub fn may_auto_start(&self, now: UnixMillis) -> bool {
        self.run.is_none()
            && self.last_run.as_ref().is_none_or(|r| {
                r.origin != RunOrigin::Checkpoint
                    || r.finished
                        .as_ref()
                        .is_none_or(|e| now.since(e.at) >= AUTO_RUN_PAUSE)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::Value;
    use shuyuan_protocol::value::encode_key;

    fn k(i: i64) -> Vec<u8> {
        encode_key(&[Value::Int(i)])
    }

    fn feed() -> FeedId {
        "D:R".parse().unwrap()
    }

    #[test]
    fn answers_advance_the_pending_range_and_end_the_run() {
        let mut rec = VerifyRecord::default();
        let id = rec.start(
            &feed(),
            RunOrigin::Hub,
            None,
            "test".into(),
            UnixMillis(5),
            1,
        );
        let run = rec.run.as_mut().unwrap();
        assert_eq!(run.id, id);
        // A part that does not start where the pending range starts is not taken.
        let stray = KeyRange {
            lo: k(3),
            hi: Some(k(9)),
        };
        assert_eq!(run.answer(&stray), None);
        let first = KeyRange {
            lo: Vec::new(),
            hi: Some(k(10)),
        };
        assert!(matches!(
            run.answer(&first),
            Some((VerifyMode::Scan { .. }, 0))
        ));
        assert_eq!(run.pending[0].range.lo, k(10));
        // Answering the same part again is ignored.
        assert_eq!(run.answer(&first), None);
        assert!(!run.finish_if_done(UnixMillis(6), 2));
        let last = KeyRange {
            lo: k(10),
            hi: None,
        };
        assert!(run.answer(&last).is_some());
        assert!(run.finish_if_done(UnixMillis(7), 3));
        assert!(run.finished.as_ref().unwrap().verified);
        // A late answer to this run cannot pass for a new agent scan; a
        // newer id from the agent can.
        assert!(!rec.is_new_agent_run(id, &KeyRange::all()));
        assert!(rec.is_new_agent_run(id + 1, &KeyRange::all()));
        assert!(!rec.is_new_agent_run(id + 1, &stray));
    }

    #[test]
    fn ranges_that_keep_differing_are_given_up() {
        let mut run = VerifyRun::new(1, RunOrigin::Hub, "t".into(), UnixMillis(1), 1);
        run.request(
            &feed(),
            KeyRange::all(),
            VerifyMode::Split {
                parts: 2,
                leaf_rows: 1,
            },
            MAX_DEPTH + 1,
        );
        assert!(run.pending.is_empty());
        assert!(run.finish_if_done(UnixMillis(2), 2));
        assert!(!run.finished.unwrap().verified);
    }

    #[test]
    fn the_verdict_follows_the_latest_evidence() {
        let mut rec = VerifyRecord::default();
        assert_eq!(rec.verdict(), Verdict::Unverified);
        let d = |rows| DigestSummary {
            rows,
            hash: [rows as u8; 32],
        };
        rec.checkpoint = Some(CheckpointResult {
            seq: 4,
            at: UnixMillis(10),
            agent: d(3),
            hub: d(3),
            differing_since: None,
        });
        assert!(matches!(rec.verdict(), Verdict::Verified { seq: 4, .. }));
        rec.checkpoint = Some(CheckpointResult {
            seq: 5,
            at: UnixMillis(11),
            agent: d(3),
            hub: d(2),
            differing_since: Some(5),
        });
        assert!(matches!(rec.verdict(), Verdict::Diverged { rows: 1, .. }));
    }
}
