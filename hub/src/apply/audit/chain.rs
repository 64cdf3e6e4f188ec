//! The audit log's hash chain.
//!
//! Every audit entry is stored with a link: the hash of the previous link,
//! the entry's id and the entry's stored bytes. Changing, removing or
//! inserting an entry breaks the link of that entry (or leaves a gap in the
//! ids), so `shuyuan-hub audit verify` can name the first entry that is no
//! longer what was written. Someone able to rewrite the whole tail of the
//! log, links included, is caught only by comparing the head with one
//! recorded earlier (`audit verify --head`), which is why the head is
//! printed and can be kept elsewhere.
//!
//! Invariant: the link of entry `n` depends on every entry up to `n`.

use serde::{Deserialize, Serialize};

/// A chain link: 32 bytes of blake3.
pub type Link = [u8; 32];

/// The link before the first entry.
pub const GENESIS: Link = [0; 32];

const CONTEXT: &str = "shuyuan hub audit chain v1";

/// The link of entry `id` with the stored bytes `entry`, after `prev`.
pub fn link(prev: &Link, id: u64, entry: &[u8]) -> Link {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    h.update(prev);
    h.update(&id.to_be_bytes());
    h.update(&(entry.len() as u64).to_be_bytes());
    h.update(entry);
    *h.finalize().as_bytes()
}

/// Why the chain is broken at an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Break {
    /// The entry's content no longer matches its link.
    Altered,
    /// The entry was removed: the ids jump over it.
    Missing,
    /// The entry is stored without a link.
    Unlinked,
    /// A link is stored for an entry that is not there (the last entries
    /// were removed).
    Removed,
    /// The entry cannot be decoded.
    Unreadable,
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReport {
    /// Entries checked and found linked, in order, before any break.
    pub intact: u64,
    /// The link of the last intact entry, as hex (none for an empty log).
    pub head: Option<String>,
    /// The first broken entry and why.
    pub broken: Option<(u64, Break)>,
    /// Whether the head given to check against is a link of the intact
    /// chain; `None` when none was given.
    pub head_found: Option<bool>,
}

impl ChainReport {
    /// Whether the log is intact (and contains the expected head, if one
    /// was given).
    pub fn ok(&self) -> bool {
        self.broken.is_none() && self.head_found != Some(false)
    }

    /// One line for the operator.
    pub fn render(&self) -> String {
        let head = self.head.as_deref().unwrap_or("none (empty log)");
        match &self.broken {
            Some((id, why)) => {
                let why = match why {
                    Break::Altered => "its content does not match its chain link: it was changed",
                    Break::Missing => "it is missing: the ids jump over it",
                    Break::Unlinked => "it has no chain link",
                    Break::Removed => "it was removed: its chain link is still there",
                    Break::Unreadable => "it cannot be decoded",
                };
                format!(
                    "audit chain BROKEN at entry {id}: {why}; the {} entries before it are intact (head {head})",
                    self.intact
                )
            }
            None if self.head_found == Some(false) => format!(
                "audit chain NOT the one recorded: the given head is not a link of this log \
                 ({} entries, head {head}): it was rewritten or cut after that point",
                self.intact
            ),
            None => format!("audit chain intact: {} entries, head {head}", self.intact),
        }
    }
}

/// Walks the log in id order, checking each entry against its link.
#[derive(Debug)]
pub struct ChainCheck {
    prev: Link,
    next_id: Option<u64>,
    expect_head: Option<Link>,
    report: ChainReport,
}

impl ChainCheck {
    pub fn new(expect_head: Option<Link>) -> Self {
        ChainCheck {
            prev: GENESIS,
            next_id: None,
            expect_head,
            report: ChainReport {
                intact: 0,
                head: None,
                broken: None,
                head_found: expect_head.map(|_| false),
            },
        }
    }

    /// Checks the next entry; returns whether to go on.
    pub fn entry(&mut self, id: u64, bytes: &[u8], stored: Option<&[u8]>, readable: bool) -> bool {
        if let Some(expected) = self.next_id.filter(|n| *n != id) {
            return self.broken(expected, Break::Missing);
        }
        if !readable {
            return self.broken(id, Break::Unreadable);
        }
        let Some(stored) = stored else {
            return self.broken(id, Break::Unlinked);
        };
        let computed = link(&self.prev, id, bytes);
        if stored != computed {
            return self.broken(id, Break::Altered);
        }
        self.prev = computed;
        self.next_id = Some(id + 1);
        self.report.intact += 1;
        self.report.head = Some(hex(&computed));
        if self.expect_head == Some(computed) {
            self.report.head_found = Some(true);
        }
        true
    }

    /// Ends the walk. `link_from(n)` is the lowest id at or after `n` that
    /// has a link: one past the last entry means entries were cut off.
    pub fn finish(mut self, link_from: impl FnOnce(u64) -> Option<u64>) -> ChainReport {
        if self.report.broken.is_none()
            && let Some(id) = link_from(self.next_id.unwrap_or(0))
        {
            self.broken(id, Break::Removed);
        }
        self.report
    }

    fn broken(&mut self, id: u64, why: Break) -> bool {
        self.report.broken = Some((id, why));
        false
    }
}

pub fn hex(link: &Link) -> String {
    link.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a head given as 64 hex digits.
pub fn parse_head(text: &str) -> Result<Link, String> {
    let text = text.trim();
    let bytes: Option<Vec<u8>> = (text.len() == 64)
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    bytes
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{text:?} is not an audit chain head: expected 64 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of `n` entries with their links.
    fn log(n: u64) -> Vec<(u64, Vec<u8>, Link)> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|id| {
                let bytes = format!("entry {id}").into_bytes();
                prev = link(&prev, id, &bytes);
                (id, bytes, prev)
            })
            .collect()
    }

    fn check(entries: &[(u64, Vec<u8>, Link)], head: Option<Link>) -> ChainReport {
        let mut c = ChainCheck::new(head);
        for (id, bytes, l) in entries {
            if !c.entry(*id, bytes, Some(l), true) {
                break;
            }
        }
        let last = entries.last().map(|e| e.0);
        c.finish(|from| last.filter(|l| *l >= from))
    }

    #[test]
    fn an_untouched_log_is_intact() {
        let l = log(5);
        let r = check(&l, Some(l[2].2));
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.intact, 5);
        assert_eq!(r.head, Some(hex(&l[4].2)));
        assert!(check(&[], None).ok());
    }

    #[test]
    fn the_first_changed_entry_is_named() {
        let mut l = log(6);
        l[3].1 = b"entry 4, edited".to_vec();
        l[4].1 = b"entry 5, edited".to_vec();
        let r = check(&l, None);
        assert_eq!(r.broken, Some((4, Break::Altered)));
        assert_eq!(r.intact, 3);
        assert!(r.render().contains("entry 4"), "{}", r.render());
    }

    #[test]
    fn a_removed_entry_is_named() {
        let mut l = log(6);
        l.remove(2);
        assert_eq!(check(&l, None).broken, Some((3, Break::Missing)));
        // The last entry removed with its link: only a recorded head shows it.
        let l = log(6);
        let r = check(&l[..5], Some(l[5].2));
        assert!(r.broken.is_none() && !r.ok(), "{r:?}");
        // Removed but its link left behind.
        let mut c = ChainCheck::new(None);
        for (id, bytes, link) in &l[..5] {
            c.entry(*id, bytes, Some(link), true);
        }
        assert_eq!(
            c.finish(|from| (from <= 6).then_some(6)).broken,
            Some((6, Break::Removed))
        );
    }

    #[test]
    fn a_rewritten_tail_is_caught_by_a_recorded_head() {
        let l = log(4);
        let recorded = l[3].2;
        let mut forged = l[..2].to_vec();
        let mut prev = l[1].2;
        for id in 3..=4 {
            let bytes = format!("forged {id}").into_bytes();
            prev = link(&prev, id, &bytes);
            forged.push((id, bytes, prev));
        }
        assert!(check(&forged, None).ok());
        assert!(!check(&forged, Some(recorded)).ok());
    }

    #[test]
    fn heads_parse_from_hex() {
        let l = log(1)[0].2;
        assert_eq!(parse_head(&hex(&l)).unwrap(), l);
        assert!(parse_head("abc").is_err());
        assert!(parse_head(&"zz".repeat(32)).is_err());
    }
}
