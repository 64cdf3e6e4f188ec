//! SQL values, kept faithful from source to shared copy.
//!
//! A value never changes type or precision on the way: exact decimals travel
//! as their decimal text, reals as their exact bits, bytes as bytes, and NULL
//! is distinct from the empty string. Date and time values carry their ISO
//! 8601 text, which is what every source database can produce losslessly.
//!
//! [`encode_key`] gives an order-preserving byte encoding of a row key, so
//! the hub stores rows in key order and can split the key space into ranges.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One SQL value.
#[derive(Clone, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// IEEE 754 double; compared by its bits, so NaN equals itself and
    /// `-0.0` differs from `0.0`.
    Real(f64),
    /// An exact decimal as text: optional `-`, digits, optional `.` and digits.
    Decimal(String),
    Text(String),
    Bytes(Vec<u8>),
    /// `YYYY-MM-DD`
    Date(String),
    /// `HH:MM:SS` with optional fraction
    Time(String),
    /// `YYYY-MM-DD HH:MM:SS` with optional fraction, no zone
    Timestamp(String),
    /// `YYYY-MM-DD HH:MM:SS` with optional fraction and a `+HH:MM` offset
    TimestampTz(String),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        use Value::*;
        match (self, other) {
            (Null, Null) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (Real(a), Real(b)) => a.to_bits() == b.to_bits(),
            (Decimal(a), Decimal(b))
            | (Text(a), Text(b))
            | (Date(a), Date(b))
            | (Time(a), Time(b))
            | (Timestamp(a), Timestamp(b))
            | (TimestampTz(a), TimestampTz(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r:?}"),
            Value::Decimal(d) => write!(f, "decimal {d}"),
            Value::Text(t) => write!(f, "{t:?}"),
            Value::Bytes(b) => write!(f, "x'{}'", hex(b)),
            Value::Date(d) => write!(f, "date {d}"),
            Value::Time(t) => write!(f, "time {t}"),
            Value::Timestamp(t) => write!(f, "timestamp {t}"),
            Value::TimestampTz(t) => write!(f, "timestamptz {t}"),
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

/// A value whose text does not have the form its type promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} value {text:?} is malformed")]
pub struct ValueError {
    pub kind: &'static str,
    pub text: String,
}

impl Value {
    /// The type's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Real(_) => "real",
            Value::Decimal(_) => "decimal",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Date(_) => "date",
            Value::Time(_) => "time",
            Value::Timestamp(_) => "timestamp",
            Value::TimestampTz(_) => "timestamptz",
        }
    }

    /// Checks that textual types have the form they promise. Cheap; the hub
    /// runs it on every value it applies.
    pub fn check(&self) -> Result<(), ValueError> {
        let ok = match self {
            Value::Decimal(t) => is_decimal(t),
            Value::Date(t) => is_date(t.as_bytes()),
            Value::Time(t) => is_time(t.as_bytes()),
            Value::Timestamp(t) => is_timestamp(t.as_bytes(), false),
            Value::TimestampTz(t) => is_timestamp(t.as_bytes(), true),
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(ValueError {
                kind: self.kind(),
                text: match self {
                    Value::Decimal(t)
                    | Value::Date(t)
                    | Value::Time(t)
                    | Value::Timestamp(t)
                    | Value::TimestampTz(t) => t.clone(),
                    _ => String::new(),
                },
            })
        }
    }
}

fn all_digits(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(u8::is_ascii_digit)
}

fn is_decimal(t: &str) -> bool {
    let body = t.strip_prefix('-').unwrap_or(t);
    match body.split_once('.') {
        Some((int, frac)) => all_digits(int.as_bytes()) && all_digits(frac.as_bytes()),
        None => all_digits(body.as_bytes()),
    }
}

fn is_date(b: &[u8]) -> bool {
    b.len() == 10
        && all_digits(&b[0..4])
        && b[4] == b'-'
        && all_digits(&b[5..7])
        && b[7] == b'-'
        && all_digits(&b[8..10])
}

fn is_time(b: &[u8]) -> bool {
    if b.len() < 8
        || !(all_digits(&b[0..2])
            && b[2] == b':'
            && all_digits(&b[3..5])
            && b[5] == b':'
            && all_digits(&b[6..8]))
    {
        return false;
    }
    match &b[8..] {
        [] => true,
        [b'.', frac @ ..] => all_digits(frac),
        _ => false,
    }
}

fn is_timestamp(b: &[u8], with_zone: bool) -> bool {
    if b.len() < 19 || !is_date(&b[..10]) || !(b[10] == b' ' || b[10] == b'T') {
        return false;
    }
    let rest = &b[11..];
    if !with_zone {
        return is_time(rest);
    }
    if let Some(time) = rest.strip_suffix(b"Z") {
        return is_time(time);
    }
    // `+08:00`, or `+08` as PostgreSQL prints whole-hour offsets.
    let zone_ok = |zone: &[u8]| match zone {
        [sign, h @ .., b':', m1, m2] if h.len() == 2 => {
            matches!(sign, b'+' | b'-') && all_digits(h) && all_digits(&[*m1, *m2])
        }
        [sign, h1, h2] => matches!(sign, b'+' | b'-') && all_digits(&[*h1, *h2]),
        _ => false,
    };
    [6, 3].into_iter().any(|n| {
        rest.len() > n && {
            let (time, zone) = rest.split_at(rest.len() - n);
            is_time(time) && zone_ok(zone)
        }
    })
}

// Key encoding tags, in the order SQL databases sort types:
// NULL < booleans < numbers < text-like < bytes.
const TAG_NULL: u8 = 0x05;
const TAG_BOOL: u8 = 0x10;
const TAG_INT: u8 = 0x20;
const TAG_REAL: u8 = 0x21;
const TAG_DECIMAL: u8 = 0x22;
const TAG_DATE: u8 = 0x28;
const TAG_TIME: u8 = 0x29;
const TAG_TIMESTAMP: u8 = 0x2a;
const TAG_TIMESTAMPTZ: u8 = 0x2b;
const TAG_TEXT: u8 = 0x30;
const TAG_BYTES: u8 = 0x40;

/// Encodes a row key so that byte order equals key order: integers and reals
/// numerically within their type, text and bytes bytewise (SQL's BINARY
/// collation), dates and times chronologically, the first column first.
/// Decimals compare as text. Strings are escaped (0x00 becomes 0x00 0xff) and
/// end in 0x00, so no key is a prefix of another with a different column split.
pub fn encode_key(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 10);
    for value in values {
        match value {
            Value::Null => out.push(TAG_NULL),
            Value::Bool(b) => {
                out.push(TAG_BOOL);
                out.push(u8::from(*b));
            }
            Value::Int(i) => {
                out.push(TAG_INT);
                out.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes());
            }
            Value::Real(r) => {
                out.push(TAG_REAL);
                let bits = r.to_bits();
                let ordered = if bits >> 63 == 1 {
                    !bits
                } else {
                    bits | (1 << 63)
                };
                out.extend_from_slice(&ordered.to_be_bytes());
            }
            Value::Decimal(t) => escaped(&mut out, TAG_DECIMAL, t.as_bytes()),
            Value::Date(t) => escaped(&mut out, TAG_DATE, t.as_bytes()),
            Value::Time(t) => escaped(&mut out, TAG_TIME, t.as_bytes()),
            Value::Timestamp(t) => escaped(&mut out, TAG_TIMESTAMP, t.as_bytes()),
            Value::TimestampTz(t) => escaped(&mut out, TAG_TIMESTAMPTZ, t.as_bytes()),
            Value::Text(t) => escaped(&mut out, TAG_TEXT, t.as_bytes()),
            Value::Bytes(b) => escaped(&mut out, TAG_BYTES, b),
        }
    }
    out
}

/// Decodes what [`encode_key`] wrote; `None` when the bytes are not a key
/// encoding (a range bound from a peer is checked with this before use).
pub fn decode_key(mut bytes: &[u8]) -> Option<Vec<Value>> {
    fn fixed(bytes: &mut &[u8]) -> Option<[u8; 8]> {
        let (head, rest) = bytes.split_first_chunk::<8>()?;
        *bytes = rest;
        Some(*head)
    }
    fn unescaped(bytes: &mut &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            match *bytes.get(i)? {
                0 if bytes.get(i + 1) == Some(&0xff) => {
                    out.push(0);
                    i += 2;
                }
                0 => {
                    *bytes = &bytes[i + 1..];
                    return Some(out);
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
    }
    fn text(bytes: &mut &[u8]) -> Option<String> {
        String::from_utf8(unescaped(bytes)?).ok()
    }
    let mut out = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        out.push(match tag {
            TAG_NULL => Value::Null,
            TAG_BOOL => {
                let (&b, rest) = bytes.split_first()?;
                bytes = rest;
                Value::Bool(b == 1)
            }
            TAG_INT => Value::Int((u64::from_be_bytes(fixed(&mut bytes)?) ^ (1 << 63)) as i64),
            TAG_REAL => {
                let ordered = u64::from_be_bytes(fixed(&mut bytes)?);
                let bits = if ordered >> 63 == 1 {
                    ordered & !(1 << 63)
                } else {
                    !ordered
                };
                Value::Real(f64::from_bits(bits))
            }
            TAG_DECIMAL => Value::Decimal(text(&mut bytes)?),
            TAG_DATE => Value::Date(text(&mut bytes)?),
            TAG_TIME => Value::Time(text(&mut bytes)?),
            TAG_TIMESTAMP => Value::Timestamp(text(&mut bytes)?),
            TAG_TIMESTAMPTZ => Value::TimestampTz(text(&mut bytes)?),
            TAG_TEXT => Value::Text(text(&mut bytes)?),
            TAG_BYTES => Value::Bytes(unescaped(&mut bytes)?),
            _ => return None,
        });
    }
    Some(out)
}

/// An encoded key in words, for messages: `42`, `"a", 7`.
pub fn describe_key(bytes: &[u8]) -> String {
    match decode_key(bytes) {
        Some(values) => values
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        None => format!("x'{}'", hex(bytes)),
    }
}

fn escaped(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keys_decode_to_what_was_encoded(
            ints in proptest::collection::vec(any::<i64>(), 0..3),
            texts in proptest::collection::vec(".{0,8}", 0..3),
            bytes in proptest::collection::vec(any::<u8>(), 0..8),
            real in any::<f64>(),
        ) {
            let mut key: Vec<Value> = ints.into_iter().map(Value::Int).collect();
            key.extend(texts.into_iter().map(Value::Text));
            key.push(Value::Bytes(bytes));
            key.push(Value::Real(real));
            key.push(Value::Null);
            key.push(Value::Bool(true));
            key.push(Value::Date("2026-11-21".into()));
            prop_assert_eq!(decode_key(&encode_key(&key)), Some(key));
        }
    }

    #[test]
    fn bad_key_bytes_do_not_decode() {
        assert_eq!(decode_key(&[0x20, 1, 2]), None);
        assert_eq!(decode_key(&[0x30, b'a']), None);
        assert_eq!(decode_key(&[0x77]), None);
        assert_eq!(
            describe_key(&encode_key(&[Value::Int(7), Value::Text("a".into())])),
            "7, \"a\""
        );
    }

    #[test]
    fn null_differs_from_empty() {
        assert_ne!(Value::Null, Value::Text(String::new()));
        assert_ne!(
            encode_key(&[Value::Null]),
            encode_key(&[Value::Text(String::new())])
        );
        assert_ne!(Value::Real(0.0), Value::Real(-0.0));
        assert_eq!(Value::Real(f64::NAN), Value::Real(f64::NAN));
    }

    #[test]
    fn checks_textual_forms() {
        for ok in [
            Value::Decimal("-12.50".into()),
            Value::Decimal("0".into()),
            Value::Date("2026-11-21".into()),
            Value::Time("08:30:00.125".into()),
            Value::Timestamp("2026-11-21 08:30:00".into()),
            Value::TimestampTz("2026-11-21T08:30:00.5+08:00".into()),
            Value::TimestampTz("2026-11-21 08:30:00Z".into()),
            Value::TimestampTz("2026-11-21 08:30:00.123456+00".into()),
        ] {
            assert!(ok.check().is_ok(), "{ok:?}");
        }
        for bad in [
            Value::Decimal("1e5".into()),
            Value::Decimal("12.".into()),
            Value::Decimal("".into()),
            Value::Date("2026-1-21".into()),
            Value::Time("8:30".into()),
            Value::TimestampTz("2026-11-21 08:30:00".into()),
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn composite_keys_do_not_collide() {
        let a = encode_key(&[Value::Text("a".into()), Value::Text("bc".into())]);
        let b = encode_key(&[Value::Text("ab".into()), Value::Text("c".into())]);
        assert_ne!(a, b);
        let c = encode_key(&[Value::Text("a\0".into())]);
        let d = encode_key(&[Value::Text("a".into())]);
        assert!(d < c);
    }

    proptest! {
        #[test]
        fn int_keys_sort_numerically(a: i64, b: i64) {
            prop_assert_eq!(a.cmp(&b), encode_key(&[Value::Int(a)]).cmp(&encode_key(&[Value::Int(b)])));
        }

        #[test]
        fn real_keys_sort_numerically(a in -1e300f64..1e300, b in -1e300f64..1e300) {
            let ord = a.partial_cmp(&b).unwrap();
            if ord != std::cmp::Ordering::Equal {
                prop_assert_eq!(ord, encode_key(&[Value::Real(a)]).cmp(&encode_key(&[Value::Real(b)])));
            }
        }

        #[test]
        fn text_keys_sort_bytewise(a: String, b: String, x: i64, y: i64) {
            let ka = encode_key(&[Value::Text(a.clone()), Value::Int(x)]);
            let kb = encode_key(&[Value::Text(b.clone()), Value::Int(y)]);
            prop_assert_eq!((a.as_bytes(), x).cmp(&(b.as_bytes(), y)), ka.cmp(&kb));
        }

        #[test]
        fn byte_keys_sort_bytewise(a: Vec<u8>, b: Vec<u8>) {
            prop_assert_eq!(a.cmp(&b), encode_key(&[Value::Bytes(a.clone())]).cmp(&encode_key(&[Value::Bytes(b.clone())])));
        }
    }
}
