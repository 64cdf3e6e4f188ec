//! Frame decoding from arbitrary bytes, as a peer's stream delivers them.
//!
//! Beyond "no panic": "incomplete" means the length prefix asks for more
//! than there is, a frame is self-delimiting (decoding just its bytes gives
//! the same answer), and every message that decodes encodes to a frame that
//! decodes to the same message, no longer than the one received.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shuyuan_protocol::frame::{
    Decoded, FrameError, LENGTH_PREFIX, decode_frame, decode_payload, encode_frame, payload_len,
};
use shuyuan_protocol::{MAX_FRAME_SIZE, Message};

fuzz_target!(|data: &[u8]| {
    check_frame(data);
    // The same bytes as a payload whose length the transport already read.
    if let Ok(message) = decode_payload(data) {
        let frame = round_trip(&message);
        assert!(frame.len() - LENGTH_PREFIX <= data.len());
    }
});

fn check_frame(data: &[u8]) {
    match decode_frame(data) {
        Ok(Decoded::Incomplete { needed }) => {
            assert!(needed > 0);
            if let Some(prefix) = data.first_chunk::<LENGTH_PREFIX>() {
                let len = payload_len(*prefix).expect("an incomplete frame has a valid length");
                assert_eq!(LENGTH_PREFIX + len, data.len() + needed);
            } else {
                assert_eq!(data.len() + needed, LENGTH_PREFIX);
            }
        }
        Ok(Decoded::Frame { message, consumed }) => {
            assert!((LENGTH_PREFIX..=data.len()).contains(&consumed));
            assert_eq!(
                decode_frame(&data[..consumed]),
                Ok(Decoded::Frame {
                    message: message.clone(),
                    consumed
                })
            );
            let frame = round_trip(&message);
            assert!(frame.len() <= consumed);
        }
        Err(FrameError::TooLarge { len }) => assert!(len > MAX_FRAME_SIZE),
        Err(FrameError::Encode(e)) => panic!("decoding reported an encoding error: {e}"),
        Err(FrameError::UnsupportedVersion(v)) => assert!(v >= 2),
        Err(FrameError::Malformed(_)) => {}
    }
}

/// Encodes `message` as a frame and checks that it decodes back to it.
fn round_trip(message: &Message) -> Vec<u8> {
    let frame = encode_frame(message).expect("a decoded message encodes");
    assert_eq!(
        decode_frame(&frame),
        Ok(Decoded::Frame {
            message: message.clone(),
            consumed: frame.len()
        })
    );
    frame
}
