//! Rate-limited audit entries for refusals: a flood of refused handshakes
//! or connections is counted in full but audited at most once per
//! [`AUDIT_INTERVAL`] per key (a reason, a peer). The refusals in between
//! are summed into the next entry, or into a closing entry that
//! [`AuditThrottle::due`] hands out once the flood has stopped, so the end
//! of a flood is on record even if nothing follows it.
//!
//! A throttle made with [`AuditThrottle::capped`] also bounds the entries
//! of all keys together: at most `entries` per [`AUDIT_INTERVAL`], closing
//! entries included, so that a flood of fresh keys cannot fill the audit
//! log either. The refusals beyond the cap are summed into one entry of
//! their own, which [`AuditThrottle::due`] hands out once the interval
//! they fell in has ended; a fresh key beyond the cap is not remembered,
//! so the throttle's memory stays bounded too.
//!
//! Invariant: every refusal handed to [`AuditThrottle::admit`] is on record
//! once, in its own entry or in a sum, after at most two intervals (given
//! `due` is called every interval).

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

/// The bound on the entries of all keys together.
#[derive(Debug)]
struct Cap<K> {
    entries: usize,
    /// The key the sum of the refusals beyond the cap is handed out with.
    beyond: K,
}

/// The entries written in the current interval of the cap, and the
/// refusals beyond it.
#[derive(Debug, Default)]
struct Budget {
    /// When the current interval began.
    window: Option<Instant>,
    written: usize,
    over: Option<Over>,
}

/// Refusals beyond the cap, not yet summed into an entry.
#[derive(Debug)]
struct Over {
    count: u64,
    /// The start of the interval the first of them fell in.
    since: Instant,
    latest: String,
}

impl Budget {
    /// Starts a new interval once the current one has ended (the next one
    /// follows it directly, unless the throttle was quiet for longer).
    fn roll(&mut self, now: Instant) {
        match self.window {
            Some(start) if now.duration_since(start) < AUDIT_INTERVAL => {}
            Some(start) if now.duration_since(start) < 2 * AUDIT_INTERVAL => {
                self.window = Some(start + AUDIT_INTERVAL);
                self.written = 0;
            }
            _ => {
                self.window = Some(now);
                self.written = 0;
            }
        }
    }

    /// Whether one more entry fits the current interval; takes its place.
    fn take(&mut self, entries: usize, now: Instant) -> bool {
        self.roll(now);
        if self.written < entries {
            self.written += 1;
            true
        } else {
            false
        }
    }

    /// Counts `count` refusals beyond the cap, the last described by `latest`.
    fn exceed(&mut self, count: u64, latest: String, now: Instant) {
        let since = self.window.unwrap_or(now);
        let over = self.over.get_or_insert(Over {
            count: 0,
            since,
            latest: String::new(),
        });
        over.count += count;
        over.latest = latest;
    }
}

#[derive(Debug)]
struct State<K> {
    held: BTreeMap<K, Held>,
    budget: Budget,
}

/// The refusals of one kind, by key.
#[derive(Debug)]
pub struct AuditThrottle<K> {
    state: Mutex<State<K>>,
    cap: Option<Cap<K>>,
}

impl<K: Ord> Default for AuditThrottle<K> {
    fn default() -> Self {
        AuditThrottle::new()
    }
}

impl<K: Ord> AuditThrottle<K> {
    /// A throttle per key only.
    pub const fn new() -> Self {
        AuditThrottle::with(None)
    }

    /// A throttle per key that also writes at most `entries` entries per
    /// [`AUDIT_INTERVAL`] for all keys together; [`AuditThrottle::due`]
    /// hands out the sum of the refusals beyond them with the key `beyond`.
    pub const fn capped(entries: usize, beyond: K) -> Self {
        AuditThrottle::with(Some(Cap { entries, beyond }))
    }

    const fn with(cap: Option<Cap<K>>) -> Self {
        AuditThrottle {
            state: Mutex::new(State {
                held: BTreeMap::new(),
                budget: Budget {
                    window: None,
                    written: 0,
                    over: None,
                },
            }),
            cap,
        }
    }

    /// A refusal of `key`: the text to audit now (with the refusals held
    /// back since the last entry), or None when `key` was audited less
    /// than [`AUDIT_INTERVAL`] ago, or the cap is reached.
    pub fn admit(&self, key: K, detail: String) -> Option<String> {
        self.admit_at(key, detail, Instant::now())
    }

    fn admit_at(&self, key: K, detail: String, now: Instant) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let State { held, budget } = &mut *state;
        if let Some(h) = held.get_mut(&key)
            && now.duration_since(h.last) < AUDIT_INTERVAL
        {
            h.suppressed += 1;
            h.latest = detail;
            return None;
        }
        if let Some(cap) = &self.cap
            && !budget.take(cap.entries, now)
        {
            match held.get_mut(&key) {
                // Summed into this key's next entry.
                Some(h) => {
                    h.suppressed += 1;
                    h.latest = detail;
                }
                None => budget.exceed(1, detail, now),
            }
            return None;
        }
        match held.get_mut(&key) {
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

    /// The entries for refusals held back longer than [`AUDIT_INTERVAL`],
    /// and for a capped throttle the sum of those beyond the cap in an
    /// interval that has ended: call it at that interval.
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
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let State { held, budget } = &mut *state;
        // Keys quiet for two intervals have nothing to say any more.
        held.retain(|_, h| h.suppressed > 0 || now.duration_since(h.last) < 2 * AUDIT_INTERVAL);
        let mut entries = Vec::new();
        for (key, h) in held
            .iter_mut()
            .filter(|(_, h)| h.suppressed > 0 && now.duration_since(h.last) >= AUDIT_INTERVAL)
        {
            let latest = std::mem::take(&mut h.latest);
            let count = std::mem::take(&mut h.suppressed);
            h.last = now;
            match &self.cap {
                Some(cap) if !budget.take(cap.entries, now) => budget.exceed(count, latest, now),
                _ => entries.push((
                    key.clone(),
                    format!(
                        "{count} more refused within {}s; the last: {latest}",
                        AUDIT_INTERVAL.as_secs(),
                    ),
                )),
            }
        }
        if let Some(cap) = &self.cap
            && let Some(over) = budget
                .over
                .take_if(|o| now.duration_since(o.since) >= AUDIT_INTERVAL)
        {
            entries.push((
                cap.beyond.clone(),
                format!(
                    "{} more refused beyond the {} entries audited per {}s for all keys together; the last: {}",
                    over.count,
                    cap.entries,
                    AUDIT_INTERVAL.as_secs(),
                    over.latest
                ),
            ));
        }
        entries
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
        assert!(t.state.lock().unwrap().held.is_empty());
    }

    #[test]
    fn fresh_keys_beyond_the_cap_are_summed_into_one_entry() {
        // Keys 1 to 10; 0 stands for all keys together.
        let t = AuditThrottle::capped(3, 0);
        let start = Instant::now();
        let admitted: Vec<String> = (1..=10)
            .filter_map(|key| t.admit_at(key, format!("key {key}"), start))
            .collect();
        assert_eq!(admitted, ["key 1", "key 2", "key 3"]);
        // A key beyond the cap is not remembered: memory stays bounded.
        assert_eq!(t.state.lock().unwrap().held.len(), 3);
        // Within the interval the sum waits; once it has ended, it is one
        // entry, handed out once.
        assert!(t.due_at(start + AUDIT_INTERVAL / 2).is_empty());
        let sum = "7 more refused beyond the 3 entries audited per 60s for all keys together; \
                   the last: key 10";
        assert_eq!(t.due_at(start + AUDIT_INTERVAL), vec![(0, sum.to_string())]);
        assert!(t.due_at(start + AUDIT_INTERVAL).is_empty());
        // The next interval has room again.
        let next = start + AUDIT_INTERVAL + Duration::from_secs(1);
        assert_eq!(t.admit_at(11, "key 11".into(), next), Some("key 11".into()));
    }

    #[test]
    fn closing_entries_count_against_the_cap() {
        let t = AuditThrottle::capped(2, "all");
        let start = Instant::now();
        for key in ["a", "b"] {
            assert_eq!(
                t.admit_at(key, format!("{key} first"), start),
                Some(format!("{key} first"))
            );
            assert_eq!(t.admit_at(key, format!("{key} held"), start), None);
        }
        assert_eq!(t.admit_at("c", "c first".into(), start), None);
        let beyond = |n: u64, last: &str| {
            format!(
                "{n} more refused beyond the 2 entries audited per 60s for all keys together; \
                 the last: {last}"
            )
        };
        // The closing entries of a and b take the next interval's places ...
        let next = start + AUDIT_INTERVAL;
        assert_eq!(
            t.due_at(next),
            vec![
                (
                    "a",
                    "1 more refused within 60s; the last: a held".to_string()
                ),
                (
                    "b",
                    "1 more refused within 60s; the last: b held".to_string()
                ),
                ("all", beyond(1, "c first")),
            ]
        );
        assert_eq!(t.admit_at("d", "d first".into(), next), None);
        assert_eq!(t.admit_at("a", "a again".into(), next), None);
        // ... and when fresh keys took the places first, a closing entry is
        // summed with the refusals beyond the cap.
        let later = next + AUDIT_INTERVAL;
        assert!(t.admit_at("e", "e first".into(), later).is_some());
        assert!(t.admit_at("f", "f first".into(), later).is_some());
        assert_eq!(t.due_at(later), vec![("all", beyond(2, "a again"))]);
        assert!(t.due_at(later + AUDIT_INTERVAL).is_empty());
    }

    #[test]
    fn a_flood_of_fresh_keys_is_all_on_record() {
        // 1,000 fresh keys a second for ten minutes: at most the cap per
        // interval one by one, plus one sum per interval, and every refusal
        // counted once.
        let t = AuditThrottle::capped(5, 0u64);
        let start = Instant::now();
        let (mut entries, mut recorded) = (0u64, 0u64);
        let mut tally = |texts: Vec<(u64, String)>| {
            for (key, text) in texts {
                entries += 1;
                recorded += if key == 0 {
                    text.split(' ').next().unwrap().parse::<u64>().unwrap()
                } else {
                    1
                };
            }
        };
        let mut key = 0;
        for second in 0..600u64 {
            let now = start + Duration::from_secs(second);
            for _ in 0..1000 {
                key += 1;
                if let Some(text) = t.admit_at(key, "refused".into(), now) {
                    tally(vec![(key, text)]);
                }
            }
            if second % AUDIT_INTERVAL.as_secs() == 0 {
                tally(t.due_at(now));
            }
        }
        tally(t.due_at(start + Duration::from_secs(600) + AUDIT_INTERVAL));
        assert_eq!(recorded, key);
        assert!(entries <= 11 * 6, "{entries} entries");
        assert!(t.state.lock().unwrap().held.len() <= 10);
    }
}
