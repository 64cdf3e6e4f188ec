//! Resource digests: an order-independent hash of a set of rows that is
//! updated in O(1) per change, and key ranges to compare parts of it.
//!
//! The digest is LtHash16 (Lewi, Kim, Maykov, Weis: "Securing Update
//! Propagation with Homomorphic Hashing", 2019, as deployed at Facebook):
//! each row maps to a vector of 1024 16-bit lanes, and the digest of a set is
//! the lane-wise sum modulo 2^16. Insert adds the row's vector, delete
//! subtracts it, update does both; the sum does not depend on the order of
//! the changes. With n = 1024 and 16-bit lanes the paper estimates more than
//! 200 bits of collision resistance.
//!
//! A row's vector is expanded (blake3 in XOF mode) from a 64-byte [`RowSeed`]
//! which is itself a blake3 XOF output over the canonical bytes of the key
//! and the values. Keeping the 64-byte seed lets the agent remember what a
//! row contributed without keeping the row; a seed collision costs 2^256
//! work, above the digest's own bound.
//!
//! Invariant: the same key and values give the same seed on every node and
//! in every version of this crate (the canonical bytes are the postcard
//! encoding of `(key, values)`, which is frozen for postcard 1.x).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::encoding;
use crate::value::{Value, hex};

/// Lanes of the digest.
pub const LANES: usize = 1024;
/// Bytes of a digest's full state.
pub const DIGEST_BYTES: usize = LANES * 2;

const SEED_CONTEXT: &str = "shuyuan v1 2026 row seed";
const ELEMENT_CONTEXT: &str = "shuyuan v1 2026 lthash16 element";
const SUMMARY_CONTEXT: &str = "shuyuan v1 2026 digest summary";

/// What one row contributes, in 64 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowSeed(#[serde(with = "seed_bytes")] pub [u8; 64]);

mod seed_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: Vec<u8> = Deserialize::deserialize(d)?;
        v.try_into()
            .map_err(|v: Vec<u8>| serde::de::Error::invalid_length(v.len(), &"64 bytes"))
    }
}

impl RowSeed {
    /// The seed of a row: its key values and its whole row, in column order.
    pub fn of(key: &[Value], values: &[Value]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(SEED_CONTEXT);
        // Encoding a slice of values cannot fail; an empty input would still
        // be a well-defined seed.
        let bytes = encoding::encode(&(key, values)).unwrap_or_default();
        h.update(&bytes);
        let mut out = [0u8; 64];
        h.finalize_xof().fill(&mut out);
        RowSeed(out)
    }

    fn lanes(&self) -> [u16; LANES] {
        let mut bytes = [0u8; DIGEST_BYTES];
        let mut h = blake3::Hasher::new_derive_key(ELEMENT_CONTEXT);
        h.update(&self.0);
        h.finalize_xof().fill(&mut bytes);
        let mut lanes = [0u16; LANES];
        for (lane, pair) in lanes.iter_mut().zip(bytes.chunks_exact(2)) {
            *lane = u16::from_le_bytes([pair[0], pair[1]]);
        }
        lanes
    }
}

impl fmt::Debug for RowSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RowSeed({}…)", &hex(&self.0[..8]))
    }
}

/// The digest of a multiset of rows, with its row count.
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    lanes: Box<[u16; LANES]>,
    rows: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            lanes: Box::new([0; LANES]),
            rows: 0,
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.summary())
    }
}

/// The stored form of a digest is `rows` (8 bytes, big-endian) then the
/// lanes (little-endian).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stored digest is {0} bytes, expected {expected}", expected = 8 + DIGEST_BYTES)]
pub struct DigestLengthError(pub usize);

impl Digest {
    /// The digest of the empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows in the set.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds one row.
    pub fn add(&mut self, seed: &RowSeed) {
        let e = seed.lanes();
        for (a, b) in self.lanes.iter_mut().zip(e.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.rows = self.rows.wrapping_add(1);
    }

    /// Removes one row (that was added before).
    pub fn remove(&mut self, seed: &RowSeed) {
        let e = seed.lanes();
        for (a, b) in self.lanes.iter_mut().zip(e.iter()) {
            *a = a.wrapping_sub(*b);
        }
        self.rows = self.rows.wrapping_sub(1);
    }

    /// Replaces one row by another.
    pub fn replace(&mut self, old: &RowSeed, new: &RowSeed) {
        self.remove(old);
        self.add(new);
    }

    /// Adds every row of another digest (the union of disjoint sets).
    pub fn combine(&mut self, other: &Digest) {
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.rows = self.rows.wrapping_add(other.rows);
    }

    /// The 32-byte fingerprint sent in place of the 2 KiB state.
    pub fn summary(&self) -> DigestSummary {
        let mut h = blake3::Hasher::new_derive_key(SUMMARY_CONTEXT);
        h.update(&self.rows.to_be_bytes());
        for lane in self.lanes.iter() {
            h.update(&lane.to_le_bytes());
        }
        DigestSummary {
            rows: self.rows,
            hash: *h.finalize().as_bytes(),
        }
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + DIGEST_BYTES);
        out.extend_from_slice(&self.rows.to_be_bytes());
        for lane in self.lanes.iter() {
            out.extend_from_slice(&lane.to_le_bytes());
        }
        out
    }

    /// Reads the stored form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DigestLengthError> {
        if bytes.len() != 8 + DIGEST_BYTES {
            return Err(DigestLengthError(bytes.len()));
        }
        let (rows, lanes_bytes) = bytes.split_at(8);
        let mut rows_be = [0u8; 8];
        rows_be.copy_from_slice(rows);
        let mut lanes = Box::new([0u16; LANES]);
        for (lane, pair) in lanes.iter_mut().zip(lanes_bytes.chunks_exact(2)) {
            *lane = u16::from_le_bytes([pair[0], pair[1]]);
        }
        Ok(Digest {
            lanes,
            rows: u64::from_be_bytes(rows_be),
        })
    }
}

/// What travels in the feed: the row count and a hash of the digest state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DigestSummary {
    pub rows: u64,
    pub hash: [u8; 32],
}

impl fmt::Display for DigestSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rows, {}", self.rows, &hex(&self.hash[..8]))
    }
}

impl fmt::Debug for DigestSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestSummary({self})")
    }
}

/// A range of row keys in the order of [`crate::value::encode_key`]: from
/// `lo` (inclusive; empty is the start) to `hi` (exclusive; `None` is the end).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyRange {
    pub lo: Vec<u8>,
    pub hi: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> Self {
        KeyRange::default()
    }

    /// Whether an encoded key is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.lo.as_slice() && self.hi.as_deref().is_none_or(|hi| key < hi)
    }

    /// Whether the range holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.hi
            .as_deref()
            .is_some_and(|hi| hi <= self.lo.as_slice())
    }

    /// Whether this is every key.
    pub fn is_all(&self) -> bool {
        self.lo.is_empty() && self.hi.is_none()
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lo = if self.lo.is_empty() {
            "start".to_string()
        } else {
            crate::value::describe_key(&self.lo)
        };
        let hi = match &self.hi {
            None => "end".to_string(),
            Some(hi) => crate::value::describe_key(hi),
        };
        write!(f, "[{lo} .. {hi})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(i: i64, text: &str) -> (Vec<Value>, Vec<Value>) {
        (
            vec![Value::Int(i)],
            vec![Value::Int(i), Value::Text(text.to_string())],
        )
    }

    fn seed(i: i64, text: &str) -> RowSeed {
        let (k, v) = row(i, text);
        RowSeed::of(&k, &v)
    }

    fn digest_of(rows: &[(i64, String)]) -> Digest {
        let mut d = Digest::new();
        for (i, t) in rows {
            d.add(&seed(*i, t));
        }
        d
    }

    proptest! {
        #[test]
        fn every_insertion_order_gives_the_same_digest(
            rows in proptest::collection::vec((any::<i64>(), ".{0,12}"), 0..40),
            shuffle in any::<u64>(),
        ) {
            let a = digest_of(&rows);
            let mut shuffled = rows.clone();
            // A deterministic permutation from the seed.
            let mut state = shuffle | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let j = (state % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let b = digest_of(&shuffled);
            prop_assert_eq!(a.summary(), b.summary());
            prop_assert_eq!(a.rows(), rows.len() as u64);
        }

        #[test]
        fn add_then_remove_is_the_identity(
            base in proptest::collection::vec((any::<i64>(), ".{0,12}"), 0..20),
            extra in proptest::collection::vec((any::<i64>(), ".{0,12}"), 1..20),
        ) {
            let before = digest_of(&base);
            let mut d = before.clone();
            for (i, t) in &extra {
                d.add(&seed(*i, t));
            }
            prop_assert_ne!(d.summary(), before.summary());
            for (i, t) in extra.iter().rev() {
                d.remove(&seed(*i, t));
            }
            prop_assert_eq!(d, before);
        }

        #[test]
        fn update_equals_remove_plus_add(
            base in proptest::collection::vec((any::<i64>(), ".{0,12}"), 0..20),
            key in any::<i64>(),
            old in ".{0,12}",
            new in ".{0,12}",
        ) {
            let mut via_replace = digest_of(&base);
            via_replace.add(&seed(key, &old));
            let mut via_steps = via_replace.clone();
            via_replace.replace(&seed(key, &old), &seed(key, &new));
            via_steps.remove(&seed(key, &old));
            via_steps.add(&seed(key, &new));
            prop_assert_eq!(&via_replace, &via_steps);
            let mut fresh: Vec<(i64, String)> = base.clone();
            fresh.push((key, new.clone()));
            prop_assert_eq!(via_replace.summary(), digest_of(&fresh).summary());
        }

        #[test]
        fn stored_form_round_trips(rows in proptest::collection::vec((any::<i64>(), ".{0,12}"), 0..10)) {
            let d = digest_of(&rows);
            prop_assert_eq!(Digest::from_bytes(&d.to_bytes()).unwrap(), d);
        }
    }

    #[test]
    fn a_changed_value_changes_the_digest() {
        let a = digest_of(&[(1, "a".into()), (2, "b".into())]);
        let b = digest_of(&[(1, "a".into()), (2, "c".into())]);
        assert_ne!(a.summary(), b.summary());
        // Same values, split differently between key and row.
        assert_ne!(
            RowSeed::of(&[Value::Int(1)], &[Value::Int(1), Value::Null]),
            RowSeed::of(&[Value::Int(1), Value::Int(1)], &[Value::Null])
        );
        // A NULL differs from an empty string.
        assert_ne!(seed(1, ""), {
            RowSeed::of(&[Value::Int(1)], &[Value::Int(1), Value::Null])
        });
        assert!(Digest::from_bytes(&[0; 10]).is_err());
    }

    #[test]
    fn ranges_hold_their_keys() {
        use crate::value::encode_key;
        let k = |i: i64| encode_key(&[Value::Int(i)]);
        let r = KeyRange {
            lo: k(10),
            hi: Some(k(20)),
        };
        assert!(r.contains(&k(10)) && r.contains(&k(19)));
        assert!(!r.contains(&k(9)) && !r.contains(&k(20)));
        assert!(KeyRange::all().contains(&k(i64::MIN)) && KeyRange::all().is_all());
        assert!(
            KeyRange {
                lo: k(5),
                hi: Some(k(5))
            }
            .is_empty()
        );
        assert_eq!(r.to_string(), "[10 .. 20)");
    }
}
