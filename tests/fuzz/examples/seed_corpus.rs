//! Writes the checked-in seed corpus, `corpus/<target>/<name>`, from real
//! protocol values: frames of real messages, signed batch bodies of every
//! kind, catalog sync messages of real edits, the example configs in
//! `deploy/`. Deterministic: running it again rewrites the same bytes.
//! Files named `regression-*` are inputs the fuzzer found that once failed,
//! kept by hand next to the generated seeds (this program leaves them).
//!
//! `cargo run --example seed_corpus` (from `tests/fuzz`).

use std::path::{Path, PathBuf};

use automerge::transaction::Transactable;
use automerge::{ObjType, ROOT, ScalarValue};
use shuyuan_fuzz::{
    BatchInput, CatalogInput, CatalogSender, CursorMode, ENTRY, ENTRY_CODE, REVIEW,
    department_actor, hub_actor, populated_hub, replica, sample_bodies, sample_messages, sync_all,
    write_fields,
};
use shuyuan_protocol::encoding::encode;
use shuyuan_protocol::frame::encode_frame;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus");
    frames(&corpus.join("frame"))?;
    batches(&corpus.join("batch_verify"))?;
    catalog(&corpus.join("catalog_change"))?;
    configs(&root.join("../../deploy"), &corpus.join("config"))?;
    Ok(())
}

fn dir(path: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(path)?;
    Ok(path.to_path_buf())
}

fn frames(out: &Path) -> std::io::Result<()> {
    let out = dir(out)?;
    for (i, m) in sample_messages().iter().enumerate() {
        let frame = encode_frame(m).expect("a sample message encodes");
        std::fs::write(out.join(format!("message-{i}")), frame)?;
    }
    Ok(())
}

fn batches(out: &Path) -> std::io::Result<()> {
    let out = dir(out)?;
    let modes = [
        CursorMode::Linked,
        CursorMode::Start,
        CursorMode::Behind,
        CursorMode::Raw,
    ];
    for (i, body) in sample_bodies().iter().enumerate() {
        let bytes = encode(body).expect("a sample body encodes");
        let input = BatchInput {
            cursor: modes[i % modes.len()],
            same_as_accepted: i % 2 == 0,
            flips: if i == 0 { vec![(3, 0x10)] } else { Vec::new() },
            position: 3,
            body: &bytes,
        };
        std::fs::write(out.join(format!("body-{i}")), input.to_bytes())?;
    }
    // A head at the last sequence number (it once overflowed).
    let bytes = encode(&sample_bodies()[0]).expect("a sample body encodes");
    let input = BatchInput {
        cursor: CursorMode::Raw,
        same_as_accepted: false,
        flips: Vec::new(),
        position: u64::MAX,
        body: &bytes,
    };
    std::fs::write(out.join("head-at-max"), input.to_bytes())?;
    Ok(())
}

fn catalog(out: &Path) -> std::io::Result<()> {
    let out = dir(out)?;
    let raw = |sender, populated, message: &[u8]| {
        CatalogInput {
            sender,
            edits: false,
            populated,
            rest: message,
        }
        .to_bytes()
    };
    // The department sends its entry to a fresh hub.
    let mut dep = replica(department_actor());
    write_fields(&mut dep, "entries", ENTRY_CODE, ENTRY);
    let sent = sync_all(&mut dep, &mut replica(hub_actor()));
    for (i, m) in sent.iter().enumerate() {
        std::fs::write(
            out.join(format!("entry-{i}")),
            raw(CatalogSender::Department, false, m),
        )?;
    }
    // A platform sends a review, and a department sends one it may not.
    let mut reviewer = replica(hub_actor());
    write_fields(&mut reviewer, "reviews", ENTRY_CODE, REVIEW);
    if let Some(m) = sync_all(&mut reviewer, &mut replica(department_actor())).last() {
        std::fs::write(out.join("review"), raw(CatalogSender::Platform, false, m))?;
        std::fs::write(
            out.join("review-from-department"),
            raw(CatalogSender::Department, true, m),
        )?;
    }
    // The department edits the summary of an entry the hub holds and reviewed.
    let mut dep = replica(department_actor());
    sync_all(&mut populated_hub(), &mut dep);
    write_fields(&mut dep, "entries", ENTRY_CODE, &[("summary", "新摘要")]);
    if let Some(m) = sync_all(&mut dep, &mut populated_hub()).last() {
        std::fs::write(
            out.join("edit-populated"),
            raw(CatalogSender::Department, true, m),
        )?;
    }
    // A counter incremented past i64::MAX (automerge once panicked on it).
    let mut rogue = replica(department_actor());
    let entries = rogue
        .put_object(ROOT, "entries", ObjType::Map)
        .expect("a map");
    let field = format!("{ENTRY_CODE}\u{1f}n");
    rogue
        .put(&entries, field.as_str(), ScalarValue::counter(i64::MAX))
        .expect("a counter");
    rogue
        .increment(&entries, field.as_str(), 1)
        .expect("an increment");
    rogue.commit();
    if let Some(m) = changes_for_fresh_hub(&mut rogue) {
        std::fs::write(
            out.join("counter-overflow"),
            raw(CatalogSender::Department, false, &m),
        )?;
    }
    // Edit lists for the `arbitrary` decoder: a few shapes of bytes.
    for (i, bytes) in [
        &[0u8, 1, 1, 0, 2, 5][..],
        &[1, 3, 0, 0, 1, 2, 3, 4, 9, 9, 2],
    ]
    .iter()
    .enumerate()
    {
        let input = CatalogInput {
            sender: CatalogSender::Department,
            edits: true,
            populated: i % 2 == 1,
            rest: bytes,
        };
        std::fs::write(out.join(format!("edits-{i}")), input.to_bytes())?;
    }
    Ok(())
}

fn configs(deploy: &Path, out: &Path) -> std::io::Result<()> {
    let out = dir(out)?;
    for name in ["agent.toml", "hub.toml"] {
        std::fs::copy(deploy.join(name), out.join(name))?;
    }
    Ok(())
}

/// The message in which `peer` sends its changes to a fresh hub replica,
/// which is not applied here (the hub's side is what the target checks).
fn changes_for_fresh_hub(peer: &mut automerge::AutoCommit) -> Option<Vec<u8>> {
    use automerge::sync::{State, SyncDoc};
    let mut hub = replica(hub_actor());
    let (mut ps, mut hs) = (State::new(), State::new());
    let hello = peer.sync().generate_sync_message(&mut ps)?;
    hub.sync().receive_sync_message(&mut hs, hello).ok()?;
    let reply = hub.sync().generate_sync_message(&mut hs)?;
    peer.sync().receive_sync_message(&mut ps, reply).ok()?;
    Some(peer.sync().generate_sync_message(&mut ps)?.encode())
}
