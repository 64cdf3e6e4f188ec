//! Disk full at the agent (issue 8, part 3): the agent's data directory
//! (its outbox) lives on a small real tmpfs that fills up while the hub is
//! down. Capture pauses with the changes in the source, status says so, and
//! once the filesystem has room again the agent recovers by itself (no
//! restart), seals everything and delivers it once.
//!
//! Mounting needs root, which the tests have here and in CI; without it
//! the test fails and says so rather than skipping ([`Tmpfs`]).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rusqlite::params;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{AgentSpec, Nodes, Topology, assert_in_sync, immediate, now_millis, wait_for};

/// A household row with a long address and a 4 KiB photo (about 6 KiB in a
/// batch), random so that nothing compresses it away. Returns whether a
/// row was inserted (the ID number may repeat).
fn insert_large_household(conn: &rusqlite::Connection, rng: &mut Rng) -> Result<bool> {
    let id = data::id_number(rng);
    let address: String = (0..600)
        .map(|_| char::from_u32(0x4e00 + rng.below(0x5000) as u32).unwrap_or('路'))
        .collect();
    let photo: Vec<u8> = (0..4096).map(|_| rng.below(256) as u8).collect();
    let n = conn.execute(
        "INSERT OR IGNORE INTO household VALUES (?1, ?2, '女', '1990-01-01', ?3, ?4, ?5, datetime('now'))",
        params![
            id,
            data::chinese_name(rng),
            format!("舟山市定海区{address}"),
            format!("{:09}", rng.below(1_000_000_000)),
            photo,
        ],
    )?;
    Ok(n == 1)
}

/// Inserts `n` large rows in one transaction; returns how many were new.
fn insert_rows(conn: &rusqlite::Connection, rng: &mut Rng, n: usize) -> Result<usize> {
    let tx = immediate(conn)?;
    let mut added = 0;
    for _ in 0..n {
        added += usize::from(insert_large_household(&tx, rng)?);
    }
    tx.commit()?;
    Ok(added)
}

fn df(dir: &Path) -> String {
    shuyuan_tests::run(Command::new("df").arg("-h").arg(dir))
        .unwrap_or_default()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn full_disk_pauses_capture_and_the_agent_recovers_by_itself() -> Result<()> {
    let Nodes(mut sb, [], [mut agent]) = Topology::new()
        // The agent's data directory (`data` next to its config) is the
        // mount point: the outbox and the catalog are on an 8 MiB
        // filesystem, unmounted after the agent stopped.
        .tmpfs("ga/data", "8m")
        .agent(AgentSpec::household("ga", "GA"))
        .build()?;
    // After the harness built the binaries.
    let started = Instant::now();
    let data_dir = agent.dir.join("data");
    // The hub is enrolled but not running: nothing is acknowledged, so the
    // outbox only grows.
    agent.start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(83);

    // Fill the disk, 100 rows (about 600 KiB) at a time, until status says
    // the outbox cannot be written.
    let filling = Instant::now();
    let mut inserted = 0;
    let full = loop {
        inserted += insert_rows(&conn, &mut rng, 100)?;
        let s = agent.status()?;
        if !s["outbox"]["write_failure"].is_null() {
            break s;
        }
        if inserted >= 5000 {
            bail!(
                "{inserted} rows (about 30 MiB) and the agent still writes its outbox on an 8 MiB filesystem ({}): {s}",
                df(&data_dir)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let filled_in = filling.elapsed();
    eprintln!(
        "outbox cannot write after {inserted} rows, {:.1} s: {}; filesystem: {}",
        filled_in.as_secs_f64(),
        full["outbox"]["write_failure"],
        df(&data_dir)
    );
    let failure = &full["outbox"]["write_failure"];
    assert!(
        failure["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "the status names the cause: {full}"
    );

    // Paused, nothing lost: let it retry for a few seconds. The committed
    // position and the outbox do not move, the changes wait in the source,
    // and the agent keeps trying (reopening the file) instead of giving up.
    std::thread::sleep(Duration::from_secs(3));
    let paused = agent.status()?;
    let pf = &paused["outbox"]["write_failure"];
    assert_eq!(
        pf["since"], failure["since"],
        "still the same failure: {paused}"
    );
    assert!(
        pf["failed_writes"].as_u64() > failure["failed_writes"].as_u64()
            && pf["reopens"].as_u64() >= Some(1),
        "the agent retries, reopening the file: before {failure}, after {pf}"
    );
    assert_eq!(paused["source"]["position"], full["source"]["position"]);
    assert_eq!(paused["outbox"]["batches"], full["outbox"]["batches"]);
    let backlog = paused["source"]["backlog"].as_u64().unwrap_or(0);
    assert!(backlog > 0, "changes wait in the source: {paused}");
    assert!(
        paused["source"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{paused}"
    );
    let text = agent.status_text()?;
    assert!(
        text.contains("OUTBOX CANNOT WRITE since")
            && text.contains("No space left on device")
            && text.contains("capture paused, source changes wait in the source"),
        "{text}"
    );
    eprintln!("paused: {backlog} changes wait in the source; status says:\n{text}");

    // The department keeps writing while the disk is full.
    inserted += insert_rows(&conn, &mut rng, 200)?;

    // Space returns. The agent picks up by itself: no restart, hub still
    // down, so this is the reopened outbox taking the backlog, not acks
    // making room.
    let remounted = Instant::now();
    let asked = now_millis();
    sb.tmpfs("ga/data")?.resize("64m")?;
    let recovered = wait_for(
        "the agent to seal the backlog after space returned",
        Duration::from_secs(120),
        || {
            let s = agent.status()?;
            let done = s["outbox"]["write_failure"].is_null()
                && s["source"]["error"].is_null()
                && s["source"]["backlog"] == 0
                && s["source"]["last_read_at"]
                    .as_i64()
                    .is_some_and(|t| t > asked);
            Ok(done.then_some(s))
        },
    )?;
    let recovered_in = remounted.elapsed();
    assert!(
        recovered["outbox"]["batches"].as_u64() > full["outbox"]["batches"].as_u64(),
        "{recovered}"
    );
    assert_eq!(recovered["running"], true);
    eprintln!(
        "recovered {:.2} s after the remount: outbox {} batches, {} bytes; filesystem: {}",
        recovered_in.as_secs_f64(),
        recovered["outbox"]["batches"],
        recovered["outbox"]["bytes"],
        df(&data_dir)
    );

    let hub_started = Instant::now();
    sb.hub.start()?;
    agent.wait_drained(Duration::from_secs(180))?;
    let drained_in = hub_started.elapsed();
    let rows = assert_in_sync(&sb.hub, &agent)?;
    assert_eq!(rows, inserted, "every inserted row is at the hub");
    let feed = sb.hub.assert_applied_once("GA:A01/0001")?;
    sb.assert_no_rejections()?;
    let log = agent.log();
    assert_eq!(
        log.matches("agent started").count(),
        1,
        "one run of the agent from start to finish"
    );
    assert!(
        log.contains("outbox file opened again after an I/O error"),
        "the agent log shows the reopen"
    );
    assert!(log.contains("the outbox can be written again"));
    eprintln!(
        "drained {:.1} s after the hub started: {rows} rows equal, {} batches applied once; test took {:.1} s",
        drained_in.as_secs_f64(),
        feed["batches_applied"],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
