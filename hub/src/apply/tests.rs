//! The apply rules, run on every engine: each test below is one async
//! function over an [`Engine`], and [`on_every_engine!`] runs it on redb
//! (in a temporary file) and on the in-memory engine. An engine that passes
//! them gives the hub everything it needs.

use std::sync::Arc;

use shuyuan_protocol::batch::{Entry, RangeDigest, RangeRepair, Resync, ZeroUpdate};
use shuyuan_protocol::message::{Ack, VerifyMode, VerifyRefusal};
use shuyuan_protocol::value::encode_key;
use shuyuan_protocol::{
    BatchBody, BatchHash, Column, DepartmentCode, Digest, FeedId, KeyRange, NodeKey, Op,
    RejectReason, RowChange, RowSeed, SignedBatch, TableSchema, UnixMillis, Value,
};

use super::audit::{self, AuditEntry, AuditKind};
use super::keys::{Enrollment, KeyRefusal, NodeKind, RotationChange};
use super::verification::{RunOrigin, VerifyRecord};
use super::*;
use crate::store::Engine;
use crate::store::memory::MemoryEngine;
use crate::store::redb::RedbEngine;
use crate::verify::VerifiedBatch;
use crate::writer::Store;

/// Runs each named test on redb and in memory.
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test]
                async fn redb() {
                    let dir = tempfile::tempdir().unwrap();
                    let engine = RedbEngine::open(&dir.path().join("hub.redb")).unwrap();
                    super::$name(Arc::new(engine)).await;
                }

                #[tokio::test]
                async fn memory() {
                    super::$name(Arc::new(MemoryEngine::new())).await;
                }
            }
        )*
    };
}

on_every_engine!(
    batches_apply_once_and_refusals_are_audited,
    a_resync_removes_the_rows_nobody_wrote,
    the_digest_follows_every_row_written,
    checkpoints_and_range_comparisons_localise_and_repair,
    a_run_the_agent_cannot_answer_ends_unverified,
    key_records_follow_their_rules,
    the_audit_chain_names_an_altered_entry,
    catalogs_are_stored_with_their_sync_state,
    rows_written_under_an_older_shape_compare_under_the_current_one,
);

fn feed() -> FeedId {
    "D:R".parse().unwrap()
}

fn department() -> DepartmentCode {
    "D".parse().unwrap()
}

fn schema(version: u32, columns: &[&str]) -> TableSchema {
    TableSchema {
        version,
        table: "t".into(),
        columns: columns
            .iter()
            .enumerate()
            .map(|(i, name)| Column {
                name: (*name).into(),
                sql_type: if i == 0 { "INTEGER" } else { "TEXT" }.into(),
                nullable: i != 0,
            })
            .collect(),
        key: vec![0],
    }
}

fn agent(key: &NodeKey) -> (NodeId, Enrollment) {
    (
        key.id(),
        Enrollment {
            department: department(),
            name: "测试".into(),
            kind: NodeKind::Agent,
            enrolled_at: UnixMillis(1),
        },
    )
}

fn upsert(id: i64, v: &str) -> Entry {
    Entry::Change(RowChange {
        op: Op::Insert,
        key: vec![Value::Int(id)],
        row: Some(vec![Value::Int(id), Value::Text(v.into())]),
        schema_version: 1,
    })
}

fn delete(id: i64) -> Entry {
    Entry::Change(RowChange {
        op: Op::Delete,
        key: vec![Value::Int(id)],
        row: None,
        schema_version: 1,
    })
}

/// Seals batches of one feed in order, as an agent does.
struct Chain {
    key: NodeKey,
    seq: u64,
    prev: BatchHash,
}

impl Chain {
    fn new(key: &NodeKey) -> Self {
        Chain {
            key: key.clone(),
            seq: 0,
            prev: BatchHash::GENESIS,
        }
    }

    /// The next batch of the chain.
    fn next(&mut self, entries: Vec<Entry>) -> VerifiedBatch {
        let v = self.at(self.seq + 1, self.prev, entries);
        self.seq += 1;
        self.prev = v.hash;
        v
    }

    /// A batch at any place (gaps, forks).
    fn at(&self, seq: u64, prev: BatchHash, entries: Vec<Entry>) -> VerifiedBatch {
        let body = BatchBody {
            feed: feed(),
            seq,
            prev,
            created_at: UnixMillis(7),
            entries,
        };
        let signed = SignedBatch::seal(&self.key, &body).unwrap();
        let hash = signed.hash();
        VerifiedBatch { signed, body, hash }
    }
}

/// Runs one group on the engine directly; returns the operations with
/// their outcomes and what the group decided.
fn run(engine: &dyn Engine, mut ops: Vec<WriteOp>) -> (Vec<WriteOp>, Decided) {
    let mut discards = Discards::default();
    let decided = engine
        .write(|t| {
            let mut txn = Txn::new(t, UnixMillis(1_000));
            group(&mut txn, &mut ops, &mut discards)?;
            Ok(txn.finish())
        })
        .unwrap();
    (ops, decided)
}

/// Applies batches one group each; returns their outcomes and what they
/// decided.
fn apply(
    engine: &dyn Engine,
    peer: NodeId,
    batches: Vec<VerifiedBatch>,
) -> Vec<(Outcome, Decided)> {
    batches
        .into_iter()
        .map(|b| {
            let (ops, decided) = run(
                engine,
                vec![WriteOp::Apply {
                    conn: 1,
                    peer,
                    incoming: Incoming::Verified(Box::new(b)),
                    outcome: None,
                }],
            );
            match ops.into_iter().next() {
                Some(WriteOp::Apply {
                    outcome: Some(o), ..
                }) => (o, decided),
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

fn enroll(engine: &dyn Engine, key: &NodeKey) {
    let (id, enrollment) = agent(key);
    run(
        engine,
        vec![WriteOp::Enroll {
            key: id,
            enrollment,
            outcome: None,
        }],
    );
}

/// The stored rows of the feed, in key order.
fn rows(engine: &dyn Engine) -> Vec<Vec<Value>> {
    engine
        .read(|t| {
            let mut out = Vec::new();
            t.rows(&feed(), &[], None, &mut |_, r| {
                out.push(r.values);
                Ok(true)
            })?;
            Ok::<_, crate::store::StoreError>(out)
        })
        .unwrap()
}

/// The feed's stored digest equals the one counted afresh from its rows.
fn assert_digest_in_step(engine: &dyn Engine) {
    let (stored, counted) = engine
        .read(|t| {
            Ok::<_, crate::store::StoreError>((
                t.digest(&feed())?,
                rows::rebuild_digest(t, &feed())?,
            ))
        })
        .unwrap();
    assert_eq!(stored.unwrap_or_default(), counted);
}

async fn batches_apply_once_and_refusals_are_audited(engine: Arc<dyn Engine>) {
    let (store, writer) = Store::start(engine.clone()).unwrap();
    let key = NodeKey::from_seed([8; 32]);
    let (id, enrollment) = agent(&key);
    assert!(store.enroll(id, enrollment.clone()).await.unwrap());
    assert!(!store.enroll(id, enrollment.clone()).await.unwrap());
    let mut other = enrollment.clone();
    other.department = "E".parse().unwrap();
    assert!(matches!(
        store.enroll(id, other).await,
        Err(crate::store::StoreError::Key(
            KeyRefusal::EnrolledElsewhere { .. }
        ))
    ));

    let mut chain = Chain::new(&key);
    let b1 = chain.next(vec![
        Entry::Schema(schema(1, &["id", "v"])),
        upsert(1, "a"),
        upsert(2, "b"),
    ]);
    let b2 = chain.next(vec![upsert(1, "c"), delete(2)]);
    let apply = |b: &VerifiedBatch, conn| {
        let store = store.clone();
        let b = b.clone();
        async move {
            store
                .apply(conn, id, Incoming::Verified(Box::new(b)))
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    assert!(matches!(
        apply(&b1, 1).await,
        Outcome::Ack(Ack { seq: 1, .. })
    ));
    assert!(matches!(
        apply(&b2, 1).await,
        Outcome::Ack(Ack { seq: 2, .. })
    ));
    // Replaying batch 1 changes nothing and is refused.
    match apply(&b1, 2).await {
        Outcome::Reject(r) => {
            assert_eq!(r.reason, RejectReason::Replay);
            assert_eq!(r.resend_from, 3);
        }
        o => panic!("{o:?}"),
    }
    // A different batch 2 is a fork.
    let fork = chain.at(2, b1.hash, vec![upsert(9, "x")]);
    match apply(&fork, 3).await {
        Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::Fork),
        o => panic!("{o:?}"),
    }
    // A gap, then its pipelined successor is discarded quietly.
    let gap = chain.at(5, b2.hash, vec![upsert(5, "g")]);
    let next = chain.at(6, gap.hash, vec![upsert(6, "g")]);
    // Submitted back to back, so they may share one write group.
    let first = store
        .apply(4, id, Incoming::Verified(Box::new(gap.clone())))
        .await
        .unwrap();
    let second = store
        .apply(4, id, Incoming::Verified(Box::new(next.clone())))
        .await
        .unwrap();
    match first.await.unwrap() {
        Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::Gap),
        o => panic!("{o:?}"),
    }
    assert_eq!(second.await.unwrap(), Outcome::Discarded);
    // Content that does not fit the schema is refused before anything applies.
    let bad = chain.at(
        3,
        b2.hash,
        vec![
            upsert(3, "ok"),
            Entry::Change(RowChange {
                op: Op::Insert,
                key: vec![Value::Int(4)],
                row: Some(vec![Value::Int(4)]),
                schema_version: 1,
            }),
        ],
    );
    match apply(&bad, 5).await {
        Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::InvalidContent),
        o => panic!("{o:?}"),
    }
    // A refusal the connection already made (a bad signature) is audited.
    let refused = store
        .apply(
            6,
            id,
            Incoming::Refused {
                feed: Some(feed()),
                seq: 3,
                reason: RejectReason::BadSignature,
                detail: "flipped byte".into(),
            },
        )
        .await
        .unwrap();
    assert!(matches!(refused.await.unwrap(), Outcome::Reject(r) if r.resend_from == 3));
    let zero = chain.at(
        3,
        b2.hash,
        vec![Entry::ZeroUpdate(ZeroUpdate {
            since: UnixMillis(7),
            until: UnixMillis(9),
            source_position: "12".into(),
        })],
    );
    assert!(matches!(
        apply(&zero, 5).await,
        Outcome::Ack(Ack { seq: 3, .. })
    ));

    let rec = store.read(|t| t.feed(&feed())).unwrap().unwrap();
    assert_eq!(rec.cursor.last_seq, 3);
    assert_eq!(rec.rows, 1);
    assert_eq!(rec.rejected, 5);
    assert_eq!(rec.batches_applied, 3);
    assert_eq!(rec.changes_applied, 4);
    assert_eq!(rec.last_zero_update.as_ref().unwrap().seq, 3);
    assert_eq!(
        rows(&*engine),
        vec![vec![Value::Int(1), Value::Text("c".into())]]
    );
    assert_digest_in_step(&*engine);
    let stored = store.read(|t| t.batch(&feed(), 2)).unwrap().unwrap();
    assert_eq!(stored, b2.signed, "kept exactly as received");
    let audit = store.read(|t| audit::recent(t, 10)).unwrap();
    let reasons: Vec<_> = audit.iter().filter_map(|a| a.reason).collect();
    assert_eq!(
        reasons,
        vec![
            RejectReason::BadSignature,
            RejectReason::InvalidContent,
            RejectReason::Gap,
            RejectReason::Fork,
            RejectReason::Replay
        ]
    );
    assert_eq!(audit.last().unwrap().kind, AuditKind::Enrolled);
    let counts = store.audit_counts();
    assert_eq!(
        counts[&(AuditKind::BatchRejected, Some(RejectReason::Gap))],
        1
    );
    assert_eq!(
        counts[&(AuditKind::Enrolled, None)],
        2,
        "enrolled, then renamed"
    );
    drop(store);
    writer.join();
}

async fn a_resync_removes_the_rows_nobody_wrote(engine: Arc<dyn Engine>) {
    let key = NodeKey::from_seed([3; 32]);
    enroll(&*engine, &key);
    let mut chain = Chain::new(&key);
    let before = vec![
        chain.next(vec![
            Entry::Schema(schema(1, &["id", "v"])),
            upsert(1, "a"),
            upsert(2, "b"),
            upsert(3, "c"),
            upsert(4, "d"),
        ]),
        chain.next(vec![
            Entry::Resync(Resync::Begin {
                id: 7,
                reason: "slot lost".into(),
            }),
            upsert(1, "a"),
        ]),
        // A live change and a live delete during the re-read count as written.
        chain.next(vec![upsert(3, "C"), delete(4)]),
        chain.next(vec![Entry::Resync(Resync::End { id: 7, rows: 1 })]),
    ];
    let outcomes = apply(&*engine, key.id(), before);
    assert!(outcomes.iter().all(|(o, _)| matches!(o, Outcome::Ack(_))));
    // Row 2 was neither re-read nor changed: the source no longer has it.
    assert_eq!(
        rows(&*engine),
        vec![
            vec![Value::Int(1), Value::Text("a".into())],
            vec![Value::Int(3), Value::Text("C".into())],
        ]
    );
    let (rec, resync) = engine
        .read(|t| {
            Ok::<_, crate::store::StoreError>((
                t.feed(&feed())?.unwrap(),
                t.resync(&feed())?.unwrap(),
            ))
        })
        .unwrap();
    assert_eq!(rec.rows, 2);
    let finish = resync.finished.unwrap();
    assert_eq!(
        (finish.rows_sent, finish.rows_removed, finish.seq),
        (1, 1, 4)
    );
    assert_eq!(resync.rows_written, 3);
    assert!(
        !engine
            .read(|t| t.touched(&feed(), &encode_key(&[Value::Int(1)])))
            .unwrap()
    );
    assert_digest_in_step(&*engine);
    let kinds: Vec<AuditKind> = engine
        .read(|t| audit::recent(t, 2))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![AuditKind::ResyncFinished, AuditKind::ResyncStarted]
    );
    // An end without its begin is ignored.
    let stray = chain.next(vec![Entry::Resync(Resync::End { id: 99, rows: 0 })]);
    assert!(matches!(
        apply(&*engine, key.id(), vec![stray])[0].0,
        Outcome::Ack(_)
    ));
    assert_eq!(rows(&*engine).len(), 2);
}

async fn the_digest_follows_every_row_written(engine: Arc<dyn Engine>) {
    let key = NodeKey::from_seed([4; 32]);
    enroll(&*engine, &key);
    let mut chain = Chain::new(&key);
    let mut batches = vec![chain.next(vec![Entry::Schema(schema(1, &["id", "v"]))])];
    for i in 0..40i64 {
        let mut entries = vec![upsert(i, "x"), upsert(i / 2, &format!("y{i}"))];
        if i % 3 == 0 {
            entries.push(delete(i / 3));
        }
        batches.push(chain.next(entries));
    }
    apply(&*engine, key.id(), batches);
    assert_digest_in_step(&*engine);
    let stored = engine.read(|t| t.digest(&feed())).unwrap().unwrap();
    let mut expected = Digest::new();
    for row in rows(&*engine) {
        expected.add(&RowSeed::of(&row[..1], &row));
    }
    assert_eq!(stored, expected);
    let rec = engine.read(|t| t.feed(&feed())).unwrap().unwrap();
    assert_eq!(rec.rows as usize, rows(&*engine).len());
}

async fn checkpoints_and_range_comparisons_localise_and_repair(engine: Arc<dyn Engine>) {
    let key = NodeKey::from_seed([5; 32]);
    enroll(&*engine, &key);
    let mut chain = Chain::new(&key);
    let mut first = vec![Entry::Schema(schema(1, &["id", "v"]))];
    first.extend((1..=20).map(|i| upsert(i, "v")));
    apply(&*engine, key.id(), vec![chain.next(first)]);
    // A checkpoint that matches proves the copy at its sequence number.
    let hub = engine
        .read(|t| t.digest(&feed()))
        .unwrap()
        .unwrap()
        .summary();
    let (o, decided) = apply(
        &*engine,
        key.id(),
        vec![chain.next(vec![Entry::Checkpoint(hub)])],
    )
    .remove(0);
    assert!(matches!(o, Outcome::Ack(_)));
    assert!(decided.events.is_empty());
    let vr: VerifyRecord = engine.read(|t| t.verification(&feed())).unwrap().unwrap();
    assert!(vr.checkpoint.as_ref().unwrap().matched());
    // The source differs: row 7 has another value, row 20 is gone, 21 is new.
    let source: Vec<Vec<Value>> = (1..=21)
        .filter(|i| *i != 20)
        .map(|i| {
            vec![
                Value::Int(i),
                Value::Text(if i == 7 { "seven" } else { "v" }.into()),
            ]
        })
        .collect();
    let mut agent = Digest::new();
    for r in &source {
        agent.add(&RowSeed::of(&r[..1], r));
    }
    // A checkpoint that differs is audited and starts a run.
    let (_, decided) = apply(
        &*engine,
        key.id(),
        vec![chain.next(vec![Entry::Checkpoint(agent.summary())])],
    )
    .remove(0);
    assert_eq!(decided.events, vec![VerifyEvent::Requests(feed())]);
    let vr: VerifyRecord = engine.read(|t| t.verification(&feed())).unwrap().unwrap();
    let run = vr.run.clone().unwrap();
    assert_eq!(run.origin, RunOrigin::Checkpoint);
    assert_eq!(run.pending.len(), 1);
    // The agent scans everything in one range: it differs, and is asked for
    // in parts.
    let whole = KeyRange::all();
    let (_, decided) = apply(
        &*engine,
        key.id(),
        vec![chain.next(vec![Entry::RangeDigest(RangeDigest {
            run: run.id,
            range: whole.clone(),
            digest: agent.summary(),
        })])],
    )
    .remove(0);
    assert_eq!(decided.events, vec![VerifyEvent::Requests(feed())]);
    let vr: VerifyRecord = engine.read(|t| t.verification(&feed())).unwrap().unwrap();
    let pending = &vr.run.as_ref().unwrap().pending;
    assert!(matches!(pending[0].mode, VerifyMode::Split { .. }));
    // The agent sends the rows of the range: the hub's become exactly these.
    let repair = RangeRepair {
        run: run.id,
        range: whole.clone(),
        rows: source
            .iter()
            .map(|r| RowChange {
                op: Op::Insert,
                key: r[..1].to_vec(),
                row: Some(r.clone()),
                schema_version: 1,
            })
            .collect(),
    };
    apply(
        &*engine,
        key.id(),
        vec![chain.next(vec![Entry::RangeRepair(repair)])],
    );
    assert_eq!(rows(&*engine), source);
    // The confirming comparison matches: the run ends verified.
    let (_, decided) = apply(
        &*engine,
        key.id(),
        vec![chain.next(vec![Entry::RangeDigest(RangeDigest {
            run: run.id,
            range: whole,
            digest: agent.summary(),
        })])],
    )
    .remove(0);
    let finished = decided.events.iter().find_map(|e| match e {
        VerifyEvent::Finished(o) => Some(o.clone()),
        _ => None,
    });
    let outcome = finished.expect("the run ended");
    assert!(outcome.verified, "{outcome:?}");
    assert_eq!((outcome.rows_repaired, outcome.rows_removed), (2, 1));
    let vr: VerifyRecord = engine.read(|t| t.verification(&feed())).unwrap().unwrap();
    assert!(vr.run.is_none());
    assert_eq!(vr.last_run.as_ref().unwrap().keys, vec!["20", "7", "21"]);
    assert_digest_in_step(&*engine);
    let stored = engine.read(|t| t.digest(&feed())).unwrap().unwrap();
    assert_eq!(stored.summary(), agent.summary());
    let kinds: Vec<AuditKind> = engine
        .read(|t| audit::recent(t, 3))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            AuditKind::Repaired,
            AuditKind::Diverged,
            AuditKind::Diverged
        ]
    );
}

async fn a_run_the_agent_cannot_answer_ends_unverified(engine: Arc<dyn Engine>) {
    let key = NodeKey::from_seed([6; 32]);
    enroll(&*engine, &key);
    // Nothing to verify before any data.
    let (ops, _) = run(
        &*engine,
        vec![WriteOp::StartVerify {
            feed: feed(),
            reason: "asked".into(),
            outcome: None,
        }],
    );
    assert!(
        matches!(&ops[0], WriteOp::StartVerify { outcome: Some(Err(e)), .. } if e.contains("no data"))
    );
    let mut chain = Chain::new(&key);
    apply(
        &*engine,
        key.id(),
        vec![chain.next(vec![Entry::Schema(schema(1, &["id", "v"])), upsert(1, "a")])],
    );
    let (ops, decided) = run(
        &*engine,
        vec![WriteOp::StartVerify {
            feed: feed(),
            reason: "asked".into(),
            outcome: None,
        }],
    );
    let WriteOp::StartVerify {
        outcome: Some(Ok(id)),
        ..
    } = ops[0]
    else {
        panic!("{ops:?}")
    };
    assert_eq!(decided.events, vec![VerifyEvent::Requests(feed())]);
    // A refusal of another run changes nothing; of this one, ends it.
    for (run_id, ends) in [(id + 1, false), (id, true)] {
        let (_, decided) = run(
            &*engine,
            vec![WriteOp::RefuseVerify {
                peer: key.id(),
                refusal: VerifyRefusal {
                    feed: feed(),
                    run: run_id,
                    reason: "keys sort differently".into(),
                },
            }],
        );
        assert_eq!(!decided.events.is_empty(), ends);
    }
    let vr: VerifyRecord = engine.read(|t| t.verification(&feed())).unwrap().unwrap();
    let end = vr.last_run.unwrap().finished.unwrap();
    assert!(end.refused && !end.verified);
    let last = engine.read(|t| audit::recent(t, 1)).unwrap().remove(0);
    assert_eq!(last.kind, AuditKind::VerifyRefused);
}

async fn key_records_follow_their_rules(engine: Arc<dyn Engine>) {
    let [old, new, hub, other] = [11u8, 12, 13, 14].map(|s| NodeKey::from_seed([s; 32]));
    let rotate = |old: &NodeKey, new: &NodeKey| WriteOp::Rotate {
        change: RotationChange::Record {
            old: old.id(),
            new: new.id(),
            department: department(),
        },
        outcome: None,
    };
    enroll(&*engine, &old);
    let mut as_hub = agent(&hub).1;
    as_hub.kind = NodeKind::Hub;
    let (ops, _) = run(
        &*engine,
        vec![
            WriteOp::Enroll {
                key: hub.id(),
                enrollment: as_hub,
                outcome: None,
            },
            // The same key again as an agent: refused.
            WriteOp::Enroll {
                key: hub.id(),
                enrollment: agent(&hub).1,
                outcome: None,
            },
            rotate(&old, &new),
            // Announced again: nothing new.
            rotate(&old, &new),
            // The old key to yet another successor: refused.
            rotate(&old, &other),
            // A key nobody enrolled cannot rotate.
            rotate(&other, &hub),
            WriteOp::Rotate {
                change: RotationChange::Retire { old: old.id() },
                outcome: None,
            },
            WriteOp::Rotate {
                change: RotationChange::Retire { old: old.id() },
                outcome: None,
            },
            WriteOp::Revoke {
                key: new.id(),
                reason: "laptop stolen".into(),
                outcome: None,
            },
            WriteOp::Revoke {
                key: new.id(),
                reason: "again".into(),
                outcome: None,
            },
            WriteOp::Enroll {
                key: new.id(),
                enrollment: agent(&new).1,
                outcome: None,
            },
        ],
    );
    let outcomes: Vec<String> = ops
        .iter()
        .map(|op| match op {
            WriteOp::Enroll { outcome, .. } | WriteOp::Rotate { outcome, .. } => match outcome {
                Some(Ok(new)) => format!("ok {new}"),
                Some(Err(e)) => format!("{e:?}")
                    .split([' ', '{', '('])
                    .next()
                    .unwrap()
                    .to_string(),
                None => "none".into(),
            },
            WriteOp::Revoke { outcome, .. } => match outcome {
                Some(Ok(r)) => format!("revoked {}", r.reason),
                Some(Err(e)) => format!("{e:?}")
                    .split([' ', '{', '('])
                    .next()
                    .unwrap()
                    .to_string(),
                None => "none".into(),
            },
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            "ok true",
            "KindChanged",
            "ok true",
            "ok false",
            "AlreadyRotated",
            "NotEnrolled",
            "ok true",
            "ok false",
            "revoked laptop stolen",
            "Revoked",
            "Revoked",
        ]
    );
    let (enrolled, revoked, rotations) = engine
        .read(|t| {
            Ok::<_, crate::store::StoreError>((t.enrollments()?, t.revocations()?, t.rotations()?))
        })
        .unwrap();
    let enrolled: Vec<NodeId> = enrolled.into_iter().map(|(k, _)| k).collect();
    assert!(enrolled.contains(&old.id()) && enrolled.contains(&hub.id()));
    assert!(
        !enrolled.contains(&new.id()),
        "revoked keys leave the enrollments"
    );
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].1.enrollment.department, department());
    assert_eq!(rotations.len(), 1);
    assert!(rotations[0].1.retired.is_some());
    let kinds: Vec<AuditKind> = engine
        .read(|t| audit::recent(t, 10))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            AuditKind::Revoked,
            AuditKind::KeyRotated,
            AuditKind::KeyRotated,
            AuditKind::Enrolled,
            AuditKind::Enrolled,
        ]
    );
}

async fn the_audit_chain_names_an_altered_entry(engine: Arc<dyn Engine>) {
    let entries = (0..5)
        .map(|i| {
            WriteOp::Audit(AuditEntry::new(
                AuditKind::CatalogReviewed,
                format!("entry {i}"),
            ))
        })
        .collect();
    run(&*engine, entries);
    run(
        &*engine,
        vec![WriteOp::Audit(AuditEntry::new(
            AuditKind::Enrolled,
            "later",
        ))],
    );
    let report = engine.read(|t| audit::verify(t, None)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.intact, 6);
    let head = audit::chain::parse_head(report.head.as_deref().unwrap()).unwrap();
    assert!(engine.read(|t| audit::verify(t, Some(head))).unwrap().ok());
    // Entry 3 rewritten in place, its link kept: the chain breaks there.
    let link = engine.read(|t| t.audit_link(3)).unwrap().unwrap();
    let mut forged = AuditEntry::new(AuditKind::CatalogReviewed, "entry 2, forged");
    forged.id = 3;
    let bytes = shuyuan_protocol::encoding::encode(&forged).unwrap();
    engine.write(|t| t.append_audit(3, &bytes, &link)).unwrap();
    let report = engine.read(|t| audit::verify(t, None)).unwrap();
    assert_eq!(report.broken, Some((3, audit::chain::Break::Altered)));
    assert_eq!(report.intact, 2);
    // Bytes that are no entry at all.
    engine
        .write(|t| t.append_audit(3, b"not an entry", &link))
        .unwrap();
    let report = engine.read(|t| audit::verify(t, None)).unwrap();
    assert_eq!(report.broken, Some((3, audit::chain::Break::Unreadable)));
    assert_eq!(engine.read(|t| t.audit_count()).unwrap(), 6);
}

async fn catalogs_are_stored_with_their_sync_state(engine: Arc<dyn Engine>) {
    let peer = NodeKey::from_seed([21; 32]).id();
    run(
        &*engine,
        vec![
            WriteOp::SaveCatalog(CatalogSave {
                department: department(),
                document: Some(b"doc v1".to_vec()),
                sync: Some((peer, b"state".to_vec())),
            }),
            WriteOp::SaveCatalog(CatalogSave {
                department: department(),
                document: None,
                sync: Some((peer, b"state 2".to_vec())),
            }),
        ],
    );
    let (doc, all, sync) = engine
        .read(|t| {
            Ok::<_, crate::store::StoreError>((
                t.catalog(&department())?,
                t.catalogs()?,
                t.catalog_sync(&department(), &peer)?,
            ))
        })
        .unwrap();
    assert_eq!(doc.as_deref(), Some(&b"doc v1"[..]));
    assert_eq!(all, vec![(department(), b"doc v1".to_vec())]);
    assert_eq!(sync.as_deref(), Some(&b"state 2"[..]));
}

async fn rows_written_under_an_older_shape_compare_under_the_current_one(engine: Arc<dyn Engine>) {
    let key = NodeKey::from_seed([22; 32]);
    enroll(&*engine, &key);
    let mut chain = Chain::new(&key);
    let v2 = schema(2, &["id", "v", "added"]);
    apply(
        &*engine,
        key.id(),
        vec![
            chain.next(vec![Entry::Schema(schema(1, &["id", "v"])), upsert(1, "a")]),
            chain.next(vec![Entry::Schema(v2.clone())]),
        ],
    );
    // A schema that skips a version is refused.
    let skip = chain.next(vec![Entry::Schema(schema(4, &["id"]))]);
    match &apply(&*engine, key.id(), vec![skip])[0].0 {
        Outcome::Reject(r) => assert_eq!(r.reason, RejectReason::InvalidContent),
        o => panic!("{o:?}"),
    }
    let source = [Value::Int(1), Value::Text("a".into()), Value::Null];
    let digest = engine
        .read(|t| rows::range_digest(t, &feed(), &v2, &KeyRange::all()))
        .unwrap();
    let mut expected = Digest::new();
    expected.add(&RowSeed::of(&source[..1], &source));
    assert_eq!(digest, expected, "the added column reads as NULL");
}
