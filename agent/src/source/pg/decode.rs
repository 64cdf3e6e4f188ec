//! pgoutput (protocol version 1) messages, and PostgreSQL's text output of a
//! value turned into a [`Value`].
//!
//! Values travel as the server prints them, under fixed session settings
//! (ISO dates, UTC, shortest exact floats, hex bytea), and both the log and
//! the initial load go through [`text_value`], so a row reads the same
//! whichever way it arrived. A text that does not fit its typed form (a
//! numeric `NaN`, a date `infinity`) travels as text, unchanged.

use shuyuan_protocol::Value;

/// The session settings that fix how values are printed.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, YMD"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
];

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change (the log does not carry it).
    Unchanged,
    Text(String),
}

/// A relation as the log describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// (name, type oid, type modifier, part of the identity)
    pub columns: Vec<(String, u32, i32, bool)>,
}

/// One pgoutput message (those the agent uses; others are `Other`).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        xid: u32,
    },
    Commit {
        end_lsn: u64,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Datum>,
    },
    Update {
        rel: u32,
        /// The old key (`K`) or old row (`O`), when the log has one.
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        rel: u32,
        old: Vec<Datum>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    Other(u8),
}

/// A message that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(String);

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| {
            DecodeError(format!("short message (wanted {n} bytes at {})", self.at))
        })?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let at = self.at;
        self.take(N)?
            .try_into()
            .map_err(|_| DecodeError(format!("short field at {at}")))
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.bytes()?))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.bytes()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.b[self.at..];
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        self.at += end + 1;
        String::from_utf8(rest[..end].to_vec()).map_err(|e| DecodeError(e.to_string()))
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = usize::try_from(self.i32()?)
                        .map_err(|_| DecodeError("negative length".into()))?;
                    let bytes = self.take(len)?;
                    Datum::Text(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|e| DecodeError(e.to_string()))?,
                    )
                }
                other => return Err(DecodeError(format!("tuple column kind {other}"))),
            });
        }
        Ok(out)
    }
}

/// Parses one pgoutput message.
pub fn parse(b: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { b, at: 1 };
    let tag = *b
        .first()
        .ok_or_else(|| DecodeError("empty message".into()))?;
    Ok(match tag {
        b'B' => {
            let final_lsn = r.u64()?;
            let _commit_time = r.u64()?;
            Message::Begin {
                final_lsn,
                xid: r.u32()?,
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            Message::Commit { end_lsn: r.u64()? }
        }
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::new();
            for _ in 0..n {
                let flags = r.u8()?;
                let col = r.string()?;
                let ty = r.u32()?;
                let typmod = r.i32()?;
                columns.push((col, ty, typmod, flags & 1 == 1));
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                other => return Err(DecodeError(format!("insert tuple tag {other}"))),
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError(format!("update tuple tag {kind}")));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: r.tuple()?,
                },
                other => return Err(DecodeError(format!("delete tuple tag {other}"))),
            }
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            let mut rels = Vec::new();
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Truncate { rels }
        }
        other => Message::Other(other),
    })
}

// Type oids from pg_type.dat (stable across versions).
const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const DATE: u32 = 1082;
const TIME: u32 = 1083;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;

/// The value PostgreSQL printed as `text` for a column of type `ty`.
pub fn text_value(ty: u32, text: &str) -> Value {
    let typed = match ty {
        BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        INT2 | INT4 | INT8 | OID => text.parse().ok().map(Value::Int),
        FLOAT4 | FLOAT8 => parse_float(text).map(Value::Real),
        NUMERIC => Some(Value::Decimal(text.to_string())),
        DATE => Some(Value::Date(text.to_string())),
        TIME => Some(Value::Time(text.to_string())),
        TIMESTAMP => Some(Value::Timestamp(text.to_string())),
        TIMESTAMPTZ => Some(Value::TimestampTz(text.to_string())),
        BYTEA => text.strip_prefix("\\x").and_then(unhex).map(Value::Bytes),
        _ => None,
    };
    match typed {
        Some(v) if v.check().is_ok() => v,
        _ => Value::Text(text.to_string()),
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        t => t.parse().ok().filter(|x: &f64| x.is_finite()),
    }
}

fn unhex(h: &str) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A SQL literal for a value PostgreSQL printed (for key bounds of chunked
/// reads): the text, quoted, cast to the column's type.
pub fn literal(text: &str, sql_type: &str) -> String {
    format!("'{}'::{sql_type}", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_text() {
        assert_eq!(text_value(INT4, "-42"), Value::Int(-42));
        assert_eq!(text_value(BOOL, "t"), Value::Bool(true));
        assert_eq!(
            text_value(NUMERIC, "123.4500"),
            Value::Decimal("123.4500".into())
        );
        assert_eq!(text_value(NUMERIC, "NaN"), Value::Text("NaN".into()));
        assert_eq!(text_value(FLOAT8, "0.1"), Value::Real(0.1));
        assert!(matches!(text_value(FLOAT8, "NaN"), Value::Real(x) if x.is_nan()));
        assert_eq!(
            text_value(TIMESTAMPTZ, "2026-11-21 08:30:00.5+00"),
            Value::TimestampTz("2026-11-21 08:30:00.5+00".into())
        );
        assert_eq!(text_value(DATE, "infinity"), Value::Text("infinity".into()));
        assert_eq!(text_value(BYTEA, "\\x00ff"), Value::Bytes(vec![0, 255]));
        assert_eq!(text_value(BYTEA, "\\x"), Value::Bytes(vec![]));
        assert_eq!(
            text_value(3802, "{\"a\": 1}"),
            Value::Text("{\"a\": 1}".into())
        );
        assert_eq!(literal("O'Brien", "text"), "'O''Brien'::text");
    }

    #[test]
    fn parses_messages() {
        let mut m = vec![b'I'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.push(b'N');
        m.extend_from_slice(&3i16.to_be_bytes());
        m.push(b'n');
        m.push(b'u');
        m.push(b't');
        m.extend_from_slice(&2i32.to_be_bytes());
        m.extend_from_slice(b"hi");
        assert_eq!(
            parse(&m).unwrap(),
            Message::Insert {
                rel: 16384,
                new: vec![Datum::Null, Datum::Unchanged, Datum::Text("hi".into())]
            }
        );
        assert!(parse(&m[..m.len() - 1]).is_err(), "truncated");
        assert!(parse(&[]).is_err());
    }
}
