//! The watermark: rows read in a REPEATABLE READ snapshot are placed in
//! the feed at the point of the log where the snapshot stands.
//!
//! With the snapshot, the read records the WAL insert position `H` (every
//! commit the snapshot sees was written before it, however committed;
//! every commit written after it the snapshot cannot see). While the log is
//! read up to `H`, each transaction is asked whether the snapshot saw it
//! ([`Snapshot::sees`]); at `H` the rows stand exactly at that point.
//!
//! Invariant: rows are never older than what the feed already carries: a
//! snapshot that cannot see a transaction already emitted (its commit is in
//! the log, it is not visible yet) is discarded and taken again.

use std::collections::VecDeque;

use tokio_postgres::SimpleQueryRow;

use super::PgSource;
use super::wire::parse_lsn;

/// Emitted transactions remembered for the visibility check of new chunks.
const RECENT_XIDS: usize = 8192;

/// A transaction snapshot: `xmin:xmax:xip,...` (64-bit transaction ids).
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    pub(super) fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether a transaction (32-bit id from the log) had committed, visibly,
    /// when the snapshot was taken.
    ///
    /// The log's id is widened to the 64-bit id nearest `xmax`: a live
    /// transaction is within 2^31 of it on either side. `xmax` is one past
    /// the latest *completed* transaction, so a transaction still running
    /// (or committing) when the snapshot was taken can have a larger id in
    /// the same epoch; such an id is not seen, and must not be mistaken for
    /// one of the previous epoch.
    pub(super) fn sees(&self, xid: u32) -> bool {
        const HALF: u64 = 1 << 31;
        const EPOCH: u64 = 1 << 32;
        let mut x = (self.xmax & !(EPOCH - 1)) | u64::from(xid);
        if x > self.xmax.saturating_add(HALF) && x >= EPOCH {
            x -= EPOCH;
        } else if x.saturating_add(HALF) < self.xmax {
            x += EPOCH;
        }
        x < self.xmin || (x < self.xmax && !self.xip.contains(&x))
    }
}

/// The snapshot and its high mark from the first row a chunk's query
/// returns: the snapshot in column 0, the WAL insert position in column 1,
/// the WAL block and segment sizes in columns `sizes` and `sizes + 1`.
pub(super) fn watermark(r: &SimpleQueryRow, sizes: usize) -> (Option<Snapshot>, u64) {
    let number = |c: usize| r.get(c).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    (
        r.get(0).and_then(Snapshot::parse),
        record_end(
            r.get(1).and_then(parse_lsn).unwrap_or(u64::MAX),
            number(sizes),
            number(sizes + 1),
        ),
    )
}

/// The end of the last WAL record inserted, from the insert position: when
/// the insert position is at the start of a page it points past the page
/// header (24 bytes, 40 at the start of a segment), where no record ends;
/// the log's positions (the end of the last record sent) stop before it.
fn record_end(insert: u64, block: u64, segment: u64) -> u64 {
    if segment > 0 && insert % segment == 40 {
        insert - 40
    } else if block > 0 && insert % block == 24 {
        insert - 24
    } else {
        insert
    }
}

impl PgSource {
    /// A transaction already emitted that the snapshot cannot see yet, if
    /// any: rows read in it may be older than what was sent.
    pub(super) fn misses_emitted(&self, snapshot: &Snapshot) -> Option<u32> {
        self.recent_xids
            .iter()
            .copied()
            .find(|&x| !snapshot.sees(x))
    }

    /// Remembers a transaction whose changes were emitted.
    pub(super) fn emitted(&mut self, xid: u32) {
        remember(&mut self.recent_xids, xid);
    }
}

fn remember(recent: &mut VecDeque<u32>, xid: u32) {
    recent.push_back(xid);
    if recent.len() > RECENT_XIDS {
        recent.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::{Snapshot, record_end};

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).expect("a snapshot")
    }

    #[test]
    fn a_snapshot_sees_what_committed_before_it_and_nothing_else() {
        // xmax is one past the latest completed transaction: 11827 and
        // 11826 were running (11826 listed), 11829 had an id but had not
        // completed (committing, or not yet), 11828 never ran.
        let s = snapshot("11820:11828:11820,11826");
        assert!(s.sees(11819), "before xmin");
        assert!(!s.sees(11820), "running");
        assert!(s.sees(11821), "completed between xmin and xmax");
        assert!(!s.sees(11826), "running");
        assert!(!s.sees(11828), "xmax itself");
        // The case that once made an initial load emit a row older than a
        // change already sent: an id above xmax in the same epoch is a
        // transaction the snapshot cannot see, not one of the last epoch.
        assert!(!s.sees(11829));
        assert!(!s.sees(11829 + 1_000_000));
    }

    #[test]
    fn ids_from_the_log_are_placed_in_the_nearest_epoch() {
        // Just after the wraparound: epoch 1, xmax 10.
        let epoch = 1u64 << 32;
        let s = snapshot(&format!("{}:{}:{}", epoch + 5, epoch + 10, epoch + 7));
        assert!(s.sees(u32::MAX - 5), "from the previous epoch: long done");
        assert!(s.sees(6), "completed in this epoch");
        assert!(!s.sees(7), "running");
        assert!(!s.sees(20), "after xmax in this epoch");
        // Just before the wraparound: a running id that has already wrapped
        // belongs to the next epoch.
        let s = snapshot(&format!("{}:{}:", epoch - 100, epoch - 50));
        assert!(s.sees(u32::try_from(epoch - 60).unwrap()));
        assert!(!s.sees(3), "next epoch, after xmax");
    }

    #[test]
    fn the_insert_position_after_a_page_header_is_the_page_start() {
        let (block, segment) = (8192, 16 << 20);
        assert_eq!(record_end(3 * 8192 + 24, block, segment), 3 * 8192);
        assert_eq!(record_end(2 * segment + 40, block, segment), 2 * segment);
        assert_eq!(record_end(3 * 8192 + 40, block, segment), 3 * 8192 + 40);
        assert_eq!(record_end(3 * 8192 + 96, block, segment), 3 * 8192 + 96);
    }
}
