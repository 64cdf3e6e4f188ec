//! Rate-limited audit entries for refusals: a flood of refused handshakes
//! or connections is counted in full but audited at most once per
//! [`AUDIT_INTERVAL`] per key (a reason, a peer). The refusals in between
//! are summed into the next entry, or into a closing entry that
//! [`AuditThrottle::due`] hands out once the flood has stopped, so the end
//! of a flood is on record even if nothing follows it.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often one kind of refusal of one peer is audited.
pub const AUDIT_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Held {
    last: Instant,
    /// Refusals since `last` that were not audited.
    suppressed: u64,
    latest: String,
}

/// The refusals of one kind, by key.
#[derive(Debug)]
pub struct AuditThrottle<K> {
    held: Mutex<BTreeMap<K, Held>>,
}

impl<K: Ord> Default for AuditThrottle<K> {
    fn default() -> Self {
        AuditThrottle::new()
    }
}

impl<K: Ord> AuditThrottle<K> {
    pub const fn new() -> Self {
        AuditThrottle {
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// A refusal of `key`: the text to audit now (with the refusals held
    /// back since the last entry), or None when `key` was audited less
    /// than [`AUDIT_INTERVAL`] ago.
    pub fn admit(&self, key: K, detail: String) -> Option<String> {
        self.admit_at(key, detail, Instant::now())
    }

    fn admit_at(&self, key: K, detail: String, now: Instant) -> Option<String> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        match held.get_mut(&key) {
            Some(h) if now.duration_since(h.last) < AUDIT_INTERVAL => {
                h.suppressed += 1;
                h.latest = detail;
                None
            }
            Some(h) => {
                let text = if h.suppressed == 0 {
                    detail.clone()
                } else {
                    format!(
                        "{detail} (and {} more refused for this reason since the last entry)",
                        h.suppressed
                    )
                };
                *h = Held {
                    last: now,
                    suppressed: 0,
                    latest: detail,
                };
                Some(text)
            }
            None => {
                held.insert(
                    key,
                    Held {
                        last: now,
                        suppressed: 0,
                        latest: detail.clone(),
                    },
                );
                Some(detail)
            }
        }
    }

    /// The entries for refusals held back longer than [`AUDIT_INTERVAL`]:
    /// call it at that interval.
    pub fn due(&self) -> Vec<(K, String)>
    where
        K: Clone,
    {
        self.due_at(Instant::now())
    }

    fn due_at(&self, now: Instant) -> Vec<(K, String)>
    where
        K: Clone,
    {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        // Keys quiet for two intervals have nothing to say any more.
        held.retain(|_, h| h.suppressed > 0 || now.duration_since(h.last) < 2 * AUDIT_INTERVAL);
        held.iter_mut()
            .filter(|(_, h)| h.suppressed > 0 && now.duration_since(h.last) >= AUDIT_INTERVAL)
            .map(|(key, h)| {
                let text = format!(
                    "{} more refused within {}s; the last: {}",
                    h.suppressed,
                    AUDIT_INTERVAL.as_secs(),
                    h.latest
                );
                h.last = now;
                h.suppressed = 0;
                (key.clone(), text)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_audited_once_per_interval_and_its_end_is_summed_up() {
        let t = AuditThrottle::new();
        let start = Instant::now();
        assert_eq!(t.admit_at("a", "first".into(), start), Some("first".into()));
        assert_eq!(t.admit_at("a", "second".into(), start), None);
        assert_eq!(t.admit_at("a", "third".into(), start), None);
        // Another key is audited on its own.
        assert_eq!(t.admit_at("b", "other".into(), start), Some("other".into()));
        assert!(t.due_at(start + AUDIT_INTERVAL / 2).is_empty());
        assert_eq!(
            t.due_at(start + AUDIT_INTERVAL),
            vec![(
                "a",
                "2 more refused within 60s; the last: third".to_string()
            )]
        );
        // Summed once, not again.
        assert!(t.due_at(start + AUDIT_INTERVAL).is_empty());
        let later = start + 2 * AUDIT_INTERVAL + Duration::from_secs(1);
        assert_eq!(t.admit_at("a", "again".into(), later), Some("again".into()));
        assert_eq!(t.admit_at("a", "held".into(), later), None);
        assert_eq!(
            t.admit_at("a", "next".into(), later + AUDIT_INTERVAL),
            Some("next (and 1 more refused for this reason since the last entry)".into())
        );
        // Quiet keys are forgotten.
        t.due_at(later + 3 * AUDIT_INTERVAL);
        assert!(t.held.lock().unwrap().is_empty());
    }
}
