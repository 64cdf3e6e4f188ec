//! Length-prefixed frames: a big-endian `u32` length, then one encoded
//! [`Message`].
//!
//! Invariant: a length above [`MAX_FRAME_SIZE`] is refused before anything
//! is allocated for it, and "not enough bytes yet" ([`Decoded::Incomplete`])
//! is never confused with "these bytes are wrong" ([`FrameError`]).

use crate::encoding::{self, DecodeError};
use crate::message::Message;

/// The largest frame payload either side accepts or sends: 16 MiB.
pub const MAX_FRAME_SIZE: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// The largest batch body an agent may seal, leaving room in a frame for the
/// envelope, signer key and signature.
pub const MAX_BATCH_BODY: usize = MAX_FRAME_SIZE - 1024;

/// A frame that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")]
    TooLarge { len: usize },
    #[error("peer speaks protocol version {0}, this build speaks version 1")]
    UnsupportedVersion(u64),
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// The outcome of looking for a frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer holds only part of a frame; `needed` more bytes at least.
    Incomplete { needed: usize },
    /// A whole frame: the message and how many bytes it used.
    Frame { message: Message, consumed: usize },
}

/// Encodes `message` as one frame.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, FrameError> {
    let out = encoding::encode_into(message, vec![0; LENGTH_PREFIX])
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - LENGTH_PREFIX;
    let prefix = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_FRAME_SIZE)
        .ok_or(FrameError::TooLarge { len })?;
    let mut out = out;
    out[..LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Reads a length prefix, refusing lengths over the limit.
pub fn payload_len(prefix: [u8; LENGTH_PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_SIZE {
        Err(FrameError::TooLarge { len })
    } else {
        Ok(len)
    }
}

/// Decodes a frame's payload.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    // The envelope's first byte is the version variant (a postcard varint);
    // name a version we do not speak rather than calling it garbage.
    match payload.first() {
        Some(&v) if v != 0 && v < 0x80 => {
            return Err(FrameError::UnsupportedVersion(u64::from(v) + 1));
        }
        _ => {}
    }
    Ok(encoding::decode(payload)?)
}

/// Looks for one frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Result<Decoded, FrameError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX>() else {
        return Ok(Decoded::Incomplete {
            needed: LENGTH_PREFIX - buf.len(),
        });
    };
    let len = payload_len(*prefix)?;
    let total = LENGTH_PREFIX + len;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    let message = decode_payload(&buf[LENGTH_PREFIX..total])?;
    Ok(Decoded::Frame {
        message,
        consumed: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ack, MessageV1};

    fn ack() -> Message {
        Message::V1(MessageV1::Ack(Ack {
            feed: "D:R".parse().unwrap(),
            seq: 300,
        }))
    }

    #[test]
    fn oversize_prefix_refused_before_allocation() {
        let prefix = u32::try_from(MAX_FRAME_SIZE + 1).unwrap().to_be_bytes();
        assert_eq!(
            decode_frame(&prefix),
            Err(FrameError::TooLarge {
                len: MAX_FRAME_SIZE + 1
            })
        );
        assert!(payload_len(u32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn incomplete_is_not_invalid() {
        let frame = encode_frame(&ack()).unwrap();
        for cut in 0..frame.len() {
            assert!(
                matches!(decode_frame(&frame[..cut]), Ok(Decoded::Incomplete { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn future_version_is_named() {
        let mut frame = encode_frame(&ack()).unwrap();
        frame[LENGTH_PREFIX] = 1;
        assert_eq!(decode_frame(&frame), Err(FrameError::UnsupportedVersion(2)));
    }
}
