//! What the fuzz targets and the seed-corpus generator share: the layout of
//! each target's input, so that `examples/seed_corpus.rs` writes seeds that
//! the targets read the way they were meant, and real protocol values to
//! seed them with.
//!
//! The layouts are deliberately plain (a header of a few bytes, then the
//! payload) rather than `arbitrary`-derived: a seed is then a real frame, a
//! real batch body or a real sync message with a short header in front, and
//! libFuzzer's byte mutations land in the real encoding.

use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, RangeDigest, Resync, ZeroUpdate};
use shuyuan_protocol::change::{Column, Op, RowChange, TableSchema};
use shuyuan_protocol::digest::{DigestSummary, KeyRange};
use shuyuan_protocol::message::{Ack, Hello, Message, MessageV1, Reject};
use shuyuan_protocol::{NodeKey, RejectReason, UnixMillis, Value};

/// The key the batch target signs fuzzer-built bodies with, so that the
/// fuzzer's bodies get past the signature check and reach decoding,
/// validation and the chain check.
pub fn test_key() -> NodeKey {
    NodeKey::from_seed([7; 32])
}

/// The department every target's documents and feeds belong to.
pub const DEPARTMENT: &str = "GA-330902";

/// Where the chain check of the batch target stands relative to the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorMode {
    /// A feed with no batches yet.
    Start,
    /// The head is the batch's predecessor: the batch must be accepted.
    Linked,
    /// The head is at or past the batch: a replay or a fork.
    Behind,
    /// A head read from the input, anywhere.
    Raw,
}

/// The input of the `batch_verify` target:
///
/// ```text
/// byte 0      bits 0-1 cursor mode, bit 2 "the accepted batch at seq is this one"
/// byte 1      number of flips (mod 9)
/// 3 per flip  u16 LE position in body ++ signature ++ signer, u8 xor mask
/// 8 bytes     u64 LE: the raw head (Raw) or how far past the batch (Behind)
/// the rest    the body bytes, signed with [`test_key`]
/// ```
#[derive(Clone, Debug)]
pub struct BatchInput<'a> {
    pub cursor: CursorMode,
    pub same_as_accepted: bool,
    pub flips: Vec<(u16, u8)>,
    pub position: u64,
    pub body: &'a [u8],
}

impl<'a> BatchInput<'a> {
    /// Reads the layout; too short an input is `None`.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&flags, rest) = data.split_first()?;
        let (&count, mut rest) = rest.split_first()?;
        let mut flips = Vec::new();
        for _ in 0..count % 9 {
            let (flip, tail) = rest.split_first_chunk::<3>()?;
            flips.push((u16::from_le_bytes([flip[0], flip[1]]), flip[2]));
            rest = tail;
        }
        let (position, body) = rest.split_first_chunk::<8>()?;
        let cursor = match flags & 3 {
            0 => CursorMode::Start,
            1 => CursorMode::Linked,
            2 => CursorMode::Behind,
            _ => CursorMode::Raw,
        };
        Some(BatchInput {
            cursor,
            same_as_accepted: flags & 4 != 0,
            flips,
            position: u64::from_le_bytes(*position),
            body,
        })
    }

    /// The bytes [`Self::parse`] reads back as `self`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mode = match self.cursor {
            CursorMode::Start => 0,
            CursorMode::Linked => 1,
            CursorMode::Behind => 2,
            CursorMode::Raw => 3,
        };
        let mut out = vec![mode | (u8::from(self.same_as_accepted) << 2)];
        out.push(u8::try_from(self.flips.len()).unwrap_or(0) % 9);
        for (pos, mask) in self.flips.iter().take(8) {
            out.extend_from_slice(&pos.to_le_bytes());
            out.push(*mask);
        }
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(self.body);
        out
    }
}

/// Who the catalog target's hub receives the changes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogSender {
    Department,
    Platform,
    Federation,
}

/// The input of the `catalog_change` target:
///
/// ```text
/// byte 0     bits 0-1 sender, bit 2 edits (else raw), bit 3 the hub's
///            document already holds an entry and a review
/// the rest   raw: one automerge sync message, received as it is;
///            edits: `arbitrary` bytes for a list of edits that a peer
///            replica makes and then syncs to the hub
/// ```
#[derive(Clone, Debug)]
pub struct CatalogInput<'a> {
    pub sender: CatalogSender,
    pub edits: bool,
    pub populated: bool,
    pub rest: &'a [u8],
}

impl<'a> CatalogInput<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&flags, rest) = data.split_first()?;
        let sender = match flags & 3 {
            1 => CatalogSender::Platform,
            2 => CatalogSender::Federation,
            _ => CatalogSender::Department,
        };
        Some(CatalogInput {
            sender,
            edits: flags & 4 != 0,
            populated: flags & 8 != 0,
            rest,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let sender = match self.sender {
            CatalogSender::Department => 0,
            CatalogSender::Platform => 1,
            CatalogSender::Federation => 2,
        };
        let mut out = vec![sender | (u8::from(self.edits) << 2) | (u8::from(self.populated) << 3)];
        out.extend_from_slice(self.rest);
        out
    }
}

fn feed() -> shuyuan_protocol::FeedId {
    shuyuan_protocol::FeedId::new(
        DEPARTMENT.parse().expect("a valid department code"),
        "101001/00001".parse().expect("a valid resource code"),
    )
}

fn schema() -> TableSchema {
    let column = |name: &str, sql_type: &str, nullable| Column {
        name: name.into(),
        sql_type: sql_type.into(),
        nullable,
    };
    TableSchema {
        version: 1,
        table: "residents".into(),
        columns: vec![
            column("id", "INTEGER", false),
            column("name", "TEXT", true),
            column("born", "DATE", true),
            column("balance", "NUMERIC(12,2)", true),
            column("photo", "BLOB", true),
        ],
        key: vec![0],
    }
}

fn row(id: i64) -> RowChange {
    RowChange {
        op: Op::Insert,
        key: vec![Value::Int(id)],
        row: Some(vec![
            Value::Int(id),
            Value::Text("张三".into()),
            Value::Date("1990-01-02".into()),
            Value::Decimal("-12.50".into()),
            Value::Bytes(vec![0, 1, 2]),
        ]),
        schema_version: 1,
    }
}

/// Real batch bodies of every kind the agent seals: a first batch with a
/// schema and rows, a later one with an update, a delete and a checkpoint,
/// a heartbeat, a re-read and a range digest.
pub fn sample_bodies() -> Vec<BatchBody> {
    let body = |seq, entries| BatchBody {
        feed: feed(),
        seq,
        prev: if seq == 1 {
            BatchHash::GENESIS
        } else {
            BatchHash([seq as u8; 32])
        },
        created_at: UnixMillis(1_795_219_200_000),
        entries,
    };
    let mut update = row(1);
    update.op = Op::Update;
    let delete = RowChange {
        op: Op::Delete,
        key: vec![Value::Int(2)],
        row: None,
        schema_version: 1,
    };
    let summary = DigestSummary {
        rows: 1,
        hash: [9; 32],
    };
    vec![
        body(
            1,
            vec![
                Entry::Schema(schema()),
                Entry::Change(row(1)),
                Entry::Change(row(2)),
            ],
        ),
        body(
            2,
            vec![
                Entry::Change(update),
                Entry::Change(delete),
                Entry::Checkpoint(summary.clone()),
            ],
        ),
        body(
            3,
            vec![
                Entry::ZeroUpdate(ZeroUpdate {
                    since: UnixMillis(1_795_219_200_000),
                    until: UnixMillis(1_795_222_800_000),
                    source_position: "42".into(),
                }),
                Entry::Checkpoint(summary.clone()),
            ],
        ),
        body(
            4,
            vec![
                Entry::Resync(Resync::Begin {
                    id: 1,
                    reason: "initial load".into(),
                }),
                Entry::Change(row(3)),
                Entry::Resync(Resync::End { id: 1, rows: 1 }),
            ],
        ),
        body(
            5,
            vec![Entry::RangeDigest(RangeDigest {
                run: 1,
                range: KeyRange {
                    lo: vec![1],
                    hi: Some(vec![9]),
                },
                digest: summary,
            })],
        ),
    ]
}

/// Real messages of several kinds, for the frame target's seeds.
pub fn sample_messages() -> Vec<Message> {
    let key = test_key();
    let mut out: Vec<Message> = sample_bodies()
        .iter()
        .take(2)
        .filter_map(|b| shuyuan_protocol::SignedBatch::seal(&key, b).ok())
        .map(|b| MessageV1::Batch(b).into())
        .collect();
    out.push(
        MessageV1::Hello(Hello {
            software: shuyuan_protocol::SOFTWARE.into(),
            department: DEPARTMENT.parse().expect("a valid department code"),
            resources: vec![feed().resource],
        })
        .into(),
    );
    out.push(
        MessageV1::Ack(Ack {
            feed: feed(),
            seq: 300,
        })
        .into(),
    );
    out.push(
        MessageV1::Reject(Reject {
            feed: Some(feed()),
            seq: 7,
            reason: RejectReason::Gap,
            detail: "sequence gap".into(),
            resend_from: 5,
        })
        .into(),
    );
    out
}

/// The hub's key in the catalog target.
pub fn hub_key() -> NodeKey {
    NodeKey::from_seed([8; 32])
}

/// When the seeds' catalog changes were made (fixed, so that the seeds are
/// the same bytes on every run).
const EDITED_AT: i64 = 1_795_219_200_000;

/// A replica of the department's catalog at its genesis, writing as
/// `actor`: how every party's replica starts.
pub fn replica(actor: automerge::ActorId) -> automerge::AutoCommit {
    use shuyuan_protocol::catalog::doc::CatalogDoc;
    let department = DEPARTMENT.parse().expect("a valid department code");
    let mut genesis = CatalogDoc::new(&department, &hub_key().id()).expect("a new document");
    automerge::AutoCommit::load(&genesis.save())
        .expect("a saved document loads")
        .with_actor(actor)
}

/// Writes `fields` of entry (or review) `code` into the top-level map
/// `map`, in the document's layout, as one change.
pub fn write_fields(
    doc: &mut automerge::AutoCommit,
    map: &str,
    code: &str,
    fields: &[(&str, &str)],
) {
    use automerge::transaction::{CommitOptions, Transactable};
    use automerge::{ROOT, ReadDoc, Value as AmValue};
    let obj = match doc.get(ROOT, map) {
        Ok(Some((AmValue::Object(_), id))) => id,
        _ => doc
            .put_object(ROOT, map, automerge::ObjType::Map)
            .expect("a map is made"),
    };
    for (field, value) in fields {
        doc.put(&obj, format!("{code}\u{1f}{field}"), *value)
            .expect("a field is written");
    }
    doc.commit_with(CommitOptions::default().with_time(EDITED_AT));
}

/// Syncs `from` to `to` until neither has more to say; returns the
/// messages `from` sent, encoded.
pub fn sync_all(from: &mut automerge::AutoCommit, to: &mut automerge::AutoCommit) -> Vec<Vec<u8>> {
    use automerge::sync::{State, SyncDoc};
    let (mut sf, mut st) = (State::new(), State::new());
    let mut sent = Vec::new();
    for _ in 0..16 {
        let a = from.sync().generate_sync_message(&mut sf);
        if let Some(m) = &a {
            sent.push(m.clone().encode());
            to.sync()
                .receive_sync_message(&mut st, m.clone())
                .expect("a replica's own message");
        }
        let b = to.sync().generate_sync_message(&mut st);
        if let Some(m) = &b {
            from.sync()
                .receive_sync_message(&mut sf, m.clone())
                .expect("a replica's own message");
        }
        if a.is_none() && b.is_none() {
            break;
        }
    }
    sent
}

/// The department's actor in the catalog seeds.
pub fn department_actor() -> automerge::ActorId {
    shuyuan_protocol::catalog::doc::actor(&test_key().id())
}

/// The hub's actor in the catalog seeds.
pub fn hub_actor() -> automerge::ActorId {
    shuyuan_protocol::catalog::doc::actor(&hub_key().id())
}

/// The fields of the seeds' catalog entry.
pub const ENTRY: &[(&str, &str)] = &[
    ("name", "常住人口"),
    ("summary", "户籍人口基本信息"),
    ("provider_code", DEPARTMENT),
    ("share_type", "conditional"),
    ("update_cycle", "daily"),
];

/// The fields of the seeds' review.
pub const REVIEW: &[(&str, &str)] = &[
    ("status", "returned"),
    ("reviewer", "王"),
    ("remarks", "补充摘要"),
];

/// The code of the seeds' catalog entry.
pub const ENTRY_CODE: &str = "101001/00001";

/// The hub's replica holding the department's entry and the hub's review
/// of it: the catalog target's "populated" document.
pub fn populated_hub() -> automerge::AutoCommit {
    let mut dep = replica(department_actor());
    write_fields(&mut dep, "entries", ENTRY_CODE, ENTRY);
    let mut hub = replica(hub_actor());
    sync_all(&mut dep, &mut hub);
    write_fields(&mut hub, "reviews", ENTRY_CODE, REVIEW);
    hub
}
