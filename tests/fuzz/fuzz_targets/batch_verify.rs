//! Verifying a signed batch against its signer and a feed's head, as the
//! hub's ingest does before anything reaches the store.
//!
//! The fuzzer's body bytes are signed with a fixed test key, so they get
//! past the signature and exercise decoding, the structural rules and the
//! chain check; then fuzzer-chosen bytes of the body, signature or signer
//! are flipped, and any change at all must be refused as a bad signature.
//! Beyond "no panic": a correctly signed body is never called a bad
//! signature, an opened body obeys the batch rules (checked here
//! independently of `BatchBody::validate`) and survives re-encoding, and
//! the chain verdict matches where the head stands.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shuyuan_fuzz::{BatchInput, CursorMode, test_key};
use shuyuan_protocol::batch::{BATCH_SIGNATURE_CONTEXT, BatchBody, BatchError};
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::{BatchHash, ChainError, Entry, FeedCursor, NodeId, SignedBatch};

fuzz_target!(|data: &[u8]| {
    let Some(input) = BatchInput::parse(data) else {
        return;
    };
    let key = test_key();
    let signed = SignedBatch {
        body: input.body.to_vec(),
        signer: key.id(),
        signature: key.sign(BATCH_SIGNATURE_CONTEXT, input.body),
    };
    match signed.open() {
        Ok(body) => {
            obeys_batch_rules(&body);
            let again = encode(&body).expect("an opened body encodes");
            assert_eq!(decode::<BatchBody>(&again).as_ref(), Ok(&body));
            check_chain(&input, &body, signed.hash());
        }
        Err(BatchError::BadSignature { .. }) => panic!("a correct signature was refused"),
        Err(BatchError::Malformed(_)) => assert!(decode::<BatchBody>(input.body).is_err()),
        Err(BatchError::Invalid { .. }) => {
            let body: BatchBody = decode(input.body).expect("an invalid body decoded");
            assert!(body.validate().is_err());
        }
    }
    if let Some(tampered) = flip(&signed, &input.flips)
        && tampered != signed
    {
        assert!(matches!(
            tampered.open(),
            Err(BatchError::BadSignature { .. })
        ));
    }
});

/// The batch rules, restated: sequence numbers from 1, the first batch
/// links to genesis, no empty batch, a zero-update only as a heartbeat.
fn obeys_batch_rules(body: &BatchBody) {
    assert!(body.seq >= 1);
    assert!(body.seq != 1 || body.prev == BatchHash::GENESIS);
    assert!(!body.entries.is_empty());
    let zero_updates = body
        .entries
        .iter()
        .filter(|e| matches!(e, Entry::ZeroUpdate(_)))
        .count();
    match body.zero_update() {
        Some(z) => {
            assert_eq!(zero_updates, 1);
            assert!(body.entries.len() <= 2);
            assert!(z.since <= z.until);
        }
        None => assert_eq!(zero_updates, 0),
    }
}

/// The chain verdict for a head placed where the input says.
fn check_chain(input: &BatchInput, body: &BatchBody, hash: BatchHash) {
    let other = BatchHash::of_body(b"another batch");
    let accepted = if input.same_as_accepted { hash } else { other };
    let cursor = match input.cursor {
        CursorMode::Start => FeedCursor::START,
        CursorMode::Linked => FeedCursor {
            last_seq: body.seq - 1,
            last_hash: body.prev,
        },
        CursorMode::Behind => FeedCursor {
            last_seq: body.seq.saturating_add(input.position % 1024),
            last_hash: other,
        },
        CursorMode::Raw => FeedCursor {
            last_seq: input.position,
            last_hash: other,
        },
    };
    let verdict = cursor.check(body.seq, body.prev, hash, |seq| {
        assert!(seq <= cursor.last_seq, "looked up a batch past the head");
        Some(accepted)
    });
    let extends = Some(body.seq) == cursor.last_seq.checked_add(1);
    match verdict {
        Ok(()) => assert!(extends && body.prev == cursor.last_hash),
        Err(ChainError::Fork { seq }) => {
            assert_eq!(seq, body.seq);
            assert!(extends || (body.seq <= cursor.last_seq && accepted != hash));
        }
        Err(ChainError::Replay { seq }) => {
            assert_eq!(seq, body.seq);
            assert!(body.seq <= cursor.last_seq && accepted == hash);
        }
        Err(ChainError::Gap { expected, got }) => {
            assert_eq!(got, body.seq);
            assert_eq!(Some(expected), cursor.last_seq.checked_add(1));
            assert!(got > expected);
        }
    }
    if input.cursor == CursorMode::Linked {
        assert_eq!(verdict, Ok(()), "the batch after the head was refused");
    }
}

/// The batch with `flips` applied to body ++ signature ++ signer; `None`
/// when the flipped signer is not a valid key (it would not decode).
fn flip(signed: &SignedBatch, flips: &[(u16, u8)]) -> Option<SignedBatch> {
    let mut bytes = signed.body.clone();
    bytes.extend_from_slice(&signed.signature.to_bytes());
    bytes.extend_from_slice(signed.signer.as_bytes());
    for &(pos, mask) in flips {
        let i = usize::from(pos) % bytes.len();
        bytes[i] ^= mask;
    }
    let (rest, signer) = bytes.split_last_chunk::<32>()?;
    let (body, signature) = rest.split_last_chunk::<64>()?;
    Some(SignedBatch {
        body: body.to_vec(),
        signer: NodeId::from_bytes(signer).ok()?,
        signature: ed25519_dalek::Signature::from_bytes(signature),
    })
}
