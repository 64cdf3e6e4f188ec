//! The one wire and storage encoding: serde + postcard.
//!
//! Every byte that is signed, hashed, sent or stored goes through [`encode`]
//! and [`decode`], so the choice of format lives in exactly one place. postcard
//! has a documented wire format that is frozen for its 1.x series, which
//! matters because signatures cover these bytes; bincode, the other obvious
//! candidate, is unmaintained (3.0.0 is a `compile_error!`, 2.x is flagged by
//! RUSTSEC-2025-0141).
//!
//! Invariant: [`decode`] never panics and never reads past the input; a value
//! followed by extra bytes is an error, so one byte string has one meaning.

use serde::{Serialize, de::DeserializeOwned};

/// Encoding failed (only possible for types serde cannot describe up front).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode value: {0}")]
pub struct EncodeError(#[from] postcard::Error);

/// Decoding failed: the bytes are not a valid encoding of the expected type.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed encoding: {0}")]
    Malformed(postcard::Error),
    #[error("{0} unexpected trailing bytes after the value")]
    TrailingBytes(usize),
}

/// Encodes `value` into a fresh vector.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(postcard::to_stdvec(value)?)
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: Vec<u8>) -> Result<Vec<u8>, EncodeError> {
    Ok(postcard::to_extend(value, out)?)
}

/// Decodes exactly one `T` from `bytes`, refusing trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(DecodeError::Malformed)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(DecodeError::TrailingBytes(rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&(7u32, "x".to_string())).unwrap();
        bytes.push(0);
        assert_eq!(
            decode::<(u32, String)>(&bytes),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn round_trip() {
        let v = (1u64, vec![1u8, 2, 3], Some("文".to_string()));
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, Vec<u8>, Option<String>)>(&bytes).unwrap(), v);
    }
}
