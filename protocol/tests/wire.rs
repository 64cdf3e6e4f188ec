//! Property and golden tests of the wire format: round trips, exact lengths,
//! and decoding of mutated or truncated bytes that never panics.

use proptest::prelude::*;
use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, SignedBatch, ZeroUpdate};
use shuyuan_protocol::chain::FeedCursor;
use shuyuan_protocol::change::{Column, Op, RowChange, TableSchema};
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::frame::{Decoded, LENGTH_PREFIX, decode_frame, encode_frame};
use shuyuan_protocol::message::{
    Ack, AgentReport, CatalogRefusal, CatalogSync, FeedPosition, Hello, Message, MessageV1, Reject,
    RejectReason, VerifyMode, VerifyOutcome, VerifyRefusal, VerifyRequest, Welcome,
};
use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{
    Digest, FeedId, KeyRange, NodeKey, RangeDigest, RangeRepair, RowSeed, UnixMillis, Value,
};

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Real),
        "-?[0-9]{1,20}(\\.[0-9]{1,10})?".prop_map(Value::Decimal),
        any::<String>().prop_map(Value::Text),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}".prop_map(Value::Date),
        "[0-9]{2}:[0-9]{2}:[0-9]{2}".prop_map(Value::Time),
        "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}".prop_map(Value::Timestamp),
        "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\\+08:00"
            .prop_map(Value::TimestampTz),
    ]
}

fn feed() -> impl Strategy<Value = FeedId> {
    ("[A-Z0-9]{1,12}", "[A-Za-z0-9/._-]{1,20}")
        .prop_map(|(d, r)| FeedId::new(d.parse().unwrap(), r.parse().unwrap()))
}

fn change() -> impl Strategy<Value = RowChange> {
    (
        prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete)],
        proptest::collection::vec(value(), 1..3),
        proptest::collection::vec(value(), 0..8),
        any::<u32>(),
    )
        .prop_map(|(op, key, row, schema_version)| RowChange {
            op,
            key,
            row: (op != Op::Delete).then_some(row),
            schema_version,
        })
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => change().prop_map(Entry::Change),
        1 => ("[a-z_]{1,10}", proptest::collection::vec(("[a-z_]{1,10}", "[A-Z]{3,8}", any::<bool>()), 1..5))
            .prop_map(|(table, cols)| Entry::Schema(TableSchema {
                version: 1,
                table,
                columns: cols.into_iter().map(|(name, sql_type, nullable)| Column { name, sql_type, nullable }).collect(),
                key: vec![0],
            })),
    ]
}

fn body() -> impl Strategy<Value = BatchBody> {
    (
        feed(),
        1u64..u64::MAX,
        any::<[u8; 32]>(),
        any::<i64>(),
        prop_oneof![
            proptest::collection::vec(entry(), 1..6),
            (any::<i64>(), any::<i64>(), "[0-9]{1,10}").prop_map(|(a, b, p)| vec![
                Entry::ZeroUpdate(ZeroUpdate {
                    since: UnixMillis(a.min(b)),
                    until: UnixMillis(a.max(b)),
                    source_position: p,
                })
            ]),
        ],
    )
        .prop_map(|(feed, seq, prev, at, entries)| BatchBody {
            feed,
            seq,
            prev: if seq == 1 {
                BatchHash::GENESIS
            } else {
                BatchHash(prev)
            },
            created_at: UnixMillis(at),
            entries,
        })
}

fn message() -> impl Strategy<Value = Message> {
    let key = NodeKey::from_seed([5; 32]);
    prop_oneof![
        body().prop_map(move |b| MessageV1::Batch(SignedBatch::seal(&key, &b).unwrap())),
        (feed(), any::<u64>()).prop_map(|(feed, seq)| MessageV1::Ack(Ack { feed, seq })),
        (
            proptest::option::of(feed()),
            any::<u64>(),
            any::<u16>(),
            any::<String>(),
            any::<u64>()
        )
            .prop_map(
                |(feed, seq, code, detail, resend_from)| MessageV1::Reject(Reject {
                    feed,
                    seq,
                    reason: RejectReason::from(code),
                    detail,
                    resend_from,
                })
            ),
        (feed(), proptest::collection::vec("[A-Z0-9]{1,8}", 0..4)).prop_map(|(f, rs)| {
            MessageV1::Hello(Hello {
                software: "shuyuan/test".into(),
                department: f.department,
                resources: rs.into_iter().map(|r| r.parse().unwrap()).collect(),
            })
        }),
        proptest::collection::vec((feed(), any::<u64>(), any::<[u8; 32]>()), 0..4).prop_map(|fs| {
            MessageV1::Welcome(Welcome {
                software: "shuyuan/test".into(),
                feeds: fs
                    .into_iter()
                    .map(|(feed, last_seq, h)| FeedPosition {
                        feed,
                        cursor: FeedCursor {
                            last_seq,
                            last_hash: BatchHash(h),
                        },
                    })
                    .collect(),
            })
        }),
        (
            "[A-Z0-9]{1,8}",
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(d, message)| {
                MessageV1::Catalog(CatalogSync {
                    department: d.parse().unwrap(),
                    message,
                })
            }),
        ("[A-Z0-9]{1,8}", any::<u16>(), any::<String>()).prop_map(|(d, code, detail)| {
            MessageV1::CatalogRefused(CatalogRefusal {
                department: d.parse().unwrap(),
                reason: RejectReason::from(code),
                detail,
            })
        }),
        (
            feed(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..20),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            any::<bool>(),
            any::<u16>(),
        )
            .prop_map(|(feed, run, lo, hi, split, n)| {
                MessageV1::Verify(VerifyRequest {
                    feed,
                    run,
                    range: KeyRange { lo, hi },
                    mode: if split {
                        VerifyMode::Split {
                            parts: n,
                            leaf_rows: n,
                        }
                    } else {
                        VerifyMode::Scan {
                            chunk_rows: u32::from(n),
                        }
                    },
                })
            }),
        (feed(), any::<u64>(), any::<String>()).prop_map(|(feed, run, reason)| {
            MessageV1::VerifyRefused(VerifyRefusal { feed, run, reason })
        }),
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(a, b, p)| MessageV1::Report(
            AgentReport {
                at: UnixMillis(1),
                outbox_batches: a,
                outbox_bytes: b,
                outbox_limit_bytes: b,
                capture_paused: p,
            }
        )),
    ]
    .prop_map(Message::V1)
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn values_round_trip_with_exact_lengths(v in value()) {
        let bytes = encode(&v).unwrap();
        prop_assert_eq!(decode::<Value>(&bytes).unwrap(), v.clone());
        let expected = match &v {
            Value::Null => 1,
            Value::Bool(_) => 2,
            Value::Real(_) => 9,
            Value::Int(i) => 1 + varint_len(((i << 1) ^ (i >> 63)) as usize),
            Value::Bytes(b) => 1 + varint_len(b.len()) + b.len(),
            Value::Decimal(t) | Value::Text(t) | Value::Date(t) | Value::Time(t)
            | Value::Timestamp(t) | Value::TimestampTz(t) => 1 + varint_len(t.len()) + t.len(),
        };
        prop_assert_eq!(bytes.len(), expected);
    }

    #[test]
    fn messages_round_trip_through_frames(m in message()) {
        let frame = encode_frame(&m).unwrap();
        let payload = encode(&m).unwrap();
        prop_assert_eq!(frame.len(), LENGTH_PREFIX + payload.len());
        prop_assert_eq!(&frame[..LENGTH_PREFIX], &(payload.len() as u32).to_be_bytes()[..]);
        prop_assert_eq!(&frame[LENGTH_PREFIX..], &payload[..]);
        match decode_frame(&frame).unwrap() {
            Decoded::Frame { message, consumed } => {
                prop_assert_eq!(consumed, frame.len());
                prop_assert_eq!(message, m);
            }
            Decoded::Incomplete { .. } => prop_assert!(false, "whole frame reported incomplete"),
        }
        // Two frames back to back: the first is found, with its exact length.
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        match decode_frame(&two).unwrap() {
            Decoded::Frame { consumed, .. } => prop_assert_eq!(consumed, frame.len()),
            Decoded::Incomplete { .. } => prop_assert!(false),
        }
    }

    #[test]
    fn truncated_frames_are_incomplete_never_errors(m in message(), cut in any::<prop::sample::Index>()) {
        let frame = encode_frame(&m).unwrap();
        let cut = cut.index(frame.len());
        let decoded = decode_frame(&frame[..cut]);
        prop_assert!(matches!(decoded, Ok(Decoded::Incomplete { .. })), "{:?}", decoded);
    }

    #[test]
    fn truncated_payloads_never_panic(m in message(), cut in any::<prop::sample::Index>()) {
        let payload = encode(&m).unwrap();
        let cut = cut.index(payload.len());
        prop_assert!(decode::<Message>(&payload[..cut]).is_err());
    }

    #[test]
    fn mutated_frames_never_panic_and_never_forge(
        m in message(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut frame = encode_frame(&m).unwrap();
        let n = frame.len();
        for (i, x) in &flips {
            frame[i.index(n)] ^= x;
        }
        // Whatever the bytes, decoding returns; a batch that still decodes
        // either fails verification or is exactly the original.
        if let Ok(Decoded::Frame { message: Message::V1(MessageV1::Batch(b)), .. }) = decode_frame(&frame)
            && let Ok(opened) = b.open()
            && let Message::V1(MessageV1::Batch(orig)) = &m
        {
            prop_assert_eq!(opened, orig.open().unwrap());
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
        let _ = decode::<Message>(&bytes);
        let _ = decode::<BatchBody>(&bytes);
    }
}

/// A fixed batch must encode to the checked-in bytes, so that any change of
/// the wire format (which would invalidate stored signatures) is deliberate.
/// Regenerate with `SHUYUAN_BLESS=1 cargo test -p shuyuan-protocol --test wire`.
#[test]
fn golden_batch_frame() {
    let key = NodeKey::from_seed([42; 32]);
    let body = BatchBody {
        feed: "GA-330902:A01/0001".parse().unwrap(),
        seq: 7,
        prev: BatchHash([0xab; 32]),
        created_at: UnixMillis(1_795_219_200_000),
        entries: vec![
            Entry::Schema(TableSchema {
                version: 1,
                table: "household".into(),
                columns: vec![
                    Column {
                        name: "id_number".into(),
                        sql_type: "TEXT".into(),
                        nullable: false,
                    },
                    Column {
                        name: "name".into(),
                        sql_type: "TEXT".into(),
                        nullable: true,
                    },
                    Column {
                        name: "area_m2".into(),
                        sql_type: "REAL".into(),
                        nullable: true,
                    },
                    Column {
                        name: "photo".into(),
                        sql_type: "BLOB".into(),
                        nullable: true,
                    },
                ],
                key: vec![0],
            }),
            Entry::Change(RowChange {
                op: Op::Insert,
                key: vec![Value::Text("330902199001011234".into())],
                row: Some(vec![
                    Value::Text("330902199001011234".into()),
                    Value::Text("张三".into()),
                    Value::Real(88.5),
                    Value::Bytes(vec![0, 1, 2]),
                ]),
                schema_version: 1,
            }),
            Entry::Change(RowChange {
                op: Op::Delete,
                key: vec![Value::Text("330902199001015678".into())],
                row: None,
                schema_version: 1,
            }),
        ],
    };
    let batch = SignedBatch::seal(&key, &body).unwrap();
    let frame = encode_frame(&Message::V1(MessageV1::Batch(batch.clone()))).unwrap();
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/batch_v1.hex");
    if std::env::var_os("SHUYUAN_BLESS").is_some() {
        std::fs::write(&path, format!("{hex}\n")).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        hex,
        golden.trim(),
        "wire format changed; if deliberate, bless the fixture"
    );
    assert_eq!(
        batch.hash().to_string(),
        blake3_hex(&batch.body),
        "batch hash is blake3 over context and body"
    );
}

/// The consistency entries and messages, pinned byte for byte, together
/// with the digest of a fixed set of rows: seeds must never change, or
/// agents and hubs of different versions would disagree about equal data.
#[test]
fn golden_verification_frames() {
    let key = NodeKey::from_seed([42; 32]);
    let feed: FeedId = "GA-330902:A01/0001".parse().unwrap();
    let k = |i: i64| encode_key(&[Value::Int(i)]);
    let row = |i: i64| vec![Value::Int(i), Value::Text(format!("第{i}行")), Value::Null];
    let mut digest = Digest::new();
    for i in 1..=3 {
        digest.add(&RowSeed::of(&[Value::Int(i)], &row(i)));
    }
    let summary = digest.summary();
    let body = BatchBody {
        feed: feed.clone(),
        seq: 9,
        prev: BatchHash([0xcd; 32]),
        created_at: UnixMillis(1_795_219_200_000),
        entries: vec![
            Entry::Checkpoint(summary),
            Entry::RangeDigest(RangeDigest {
                run: 1_795_219_200_001,
                range: KeyRange {
                    lo: Vec::new(),
                    hi: Some(k(100)),
                },
                digest: summary,
            }),
            Entry::RangeRepair(RangeRepair {
                run: 1_795_219_200_001,
                range: KeyRange {
                    lo: k(100),
                    hi: None,
                },
                rows: vec![RowChange {
                    op: Op::Update,
                    key: vec![Value::Int(100)],
                    row: Some(row(100)),
                    schema_version: 1,
                }],
            }),
        ],
    };
    body.validate().unwrap();
    let messages = [
        MessageV1::Batch(SignedBatch::seal(&key, &body).unwrap()),
        MessageV1::Verify(VerifyRequest {
            feed: feed.clone(),
            run: 7,
            range: KeyRange {
                lo: k(1),
                hi: Some(k(5000)),
            },
            mode: VerifyMode::Split {
                parts: 16,
                leaf_rows: 16,
            },
        }),
        MessageV1::Verified(VerifyOutcome {
            feed: feed.clone(),
            run: 7,
            verified: true,
            seq: 12,
            ranges_compared: 40,
            ranges_differing: 3,
            rows_repaired: 2,
            rows_removed: 1,
            bytes_exchanged: 4096,
            detail: "repaired".into(),
            refused: false,
        }),
        MessageV1::VerifyRefused(VerifyRefusal {
            feed,
            run: 8,
            reason: "numeric key".into(),
        }),
    ];
    let mut lines: Vec<String> = vec![format!(
        "{}:{}",
        summary.rows,
        summary
            .hash
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )];
    for m in messages {
        let frame = encode_frame(&Message::V1(m)).unwrap();
        lines.push(frame.iter().map(|b| format!("{b:02x}")).collect());
    }
    let text = lines.join("\n");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/verify_v1.hex");
    if std::env::var_os("SHUYUAN_BLESS").is_some() {
        std::fs::write(&path, format!("{text}\n")).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        golden.trim(),
        "row seeds or the wire format changed; if deliberate, bless the fixture"
    );
    // The digest summary is what was pinned, whatever order the rows come in.
    let mut reversed = Digest::new();
    for i in (1..=3).rev() {
        reversed.add(&RowSeed::of(&[Value::Int(i)], &row(i)));
    }
    assert_eq!(reversed.summary(), summary);
}

fn blake3_hex(body: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"shuyuan/v1/batch-hash\0");
    h.update(body);
    h.finalize().to_hex().to_string()
}
