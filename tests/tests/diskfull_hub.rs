//! Disk full at the hub: its data directory is a small real filesystem
//! (tmpfs) that fills up while an agent streams. The hub must stop
//! acknowledging, say so (status, metrics, console), never acknowledge a
//! batch it did not store, and recover by itself once the filesystem is
//! grown again; afterwards the copy equals the source, each batch applied
//! once, and the audit chain is intact.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde_json::Value as Json;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{AgentSpec, Nodes, Topology, assert_in_sync, immediate, wait_for};

const FEED: &str = "GA:A01/0001";

/// Inserts `n` households, each with an 8 KiB photo (random, so nothing
/// compresses), in one transaction.
fn insert_big(conn: &rusqlite::Connection, rng: &mut Rng, n: usize) -> Result<()> {
    let tx = immediate(conn)?;
    for _ in 0..n {
        let id = data::insert_household(&tx, rng)?;
        tx.execute(
            "UPDATE household SET photo = randomblob(8192) WHERE id_number = ?1",
            [&id],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The agent's acknowledged head of the feed.
fn acked(agent_status: &Json) -> u64 {
    agent_status["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["feed"] == FEED)
        .and_then(|r| r["acked_seq"].as_u64())
        .unwrap_or(0)
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_full_disk_stops_acks_is_reported_and_the_hub_recovers_when_space_returns() -> Result<()> {
    let Nodes(sb, [], [agent]) = Topology::new()
        // The hub's store on an 8 MiB filesystem.
        .tmpfs("hub/data", "8m")
        .agent(AgentSpec::household("ga", "GA").outbox("batch_max_changes = 50"))
        .start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(31);
    insert_big(&conn, &mut rng, 20)?;
    agent.wait_drained(Duration::from_secs(60))?;

    // Fill the hub's filesystem.
    let started = Instant::now();
    let failing = loop {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the hub's store never reported a failed write on a full 8 MiB filesystem: {}",
                sb.hub.status_text()?
            );
        }
        insert_big(&conn, &mut rng, 100)?;
        std::thread::sleep(Duration::from_millis(500));
        let s = sb.hub.status()?;
        if !s["store"]["failing_since"].is_null() {
            break s;
        }
    };
    let error = failing["store"]["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("No space left on device"),
        "the status names the cause: {failing}"
    );
    let text = sb.hub.status_text()?;
    ensure!(text.contains("STORE CANNOT WRITE"), "{text}");

    // Nothing is acknowledged while the store cannot write: the agent
    // keeps its batches and resends them, and its acknowledged head stays.
    insert_big(&conn, &mut rng, 50)?;
    let before = agent.status()?;
    std::thread::sleep(Duration::from_secs(5));
    let during = agent.status()?;
    let now = sb.hub.status()?;
    ensure!(
        now["store"]["failing_since"] == failing["store"]["failing_since"],
        "the store stays failing while full: was {}, now {}; the hub's log ends:\n{}",
        failing["store"],
        now["store"],
        tail(&sb.hub.log(), 40)
    );
    assert_eq!(
        acked(&before),
        acked(&during),
        "no batch is acknowledged while the store cannot write: {during}"
    );
    ensure!(
        during["outbox"]["batches"].as_u64() > Some(0),
        "the agent keeps what was refused: {during}"
    );
    ensure!(
        during["hub"]["last_rejection"]
            .as_str()
            .is_some_and(|r| r.contains("unavailable") && r.contains("No space left")),
        "the agent is told why: {during}"
    );
    let metrics = sb.hub.admin_get("/metrics")?;
    assert_eq!(
        metric(&metrics, "shuyuan_store_writable"),
        Some(0.0),
        "{metrics}"
    );
    ensure!(
        metric(&metrics, "shuyuan_store_failed_writes_total").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // Space returns: the hub reopens its store by itself, with no restart.
    let pid = sb.hub.pid();
    let space_back = Instant::now();
    sb.tmpfs("hub/data")?.resize("256m")?;
    let recovered = wait_for(
        "the hub's store to write again",
        // Agents resend refused batches within 30 s (their backoff cap);
        // the first that commits ends the spell.
        Duration::from_secs(90),
        || {
            let s = sb.hub.status()?;
            Ok(s["store"]["failing_since"].is_null().then_some(s))
        },
    )?;
    assert_eq!(recovered["store"]["recoveries"], 1, "{recovered}");
    assert_eq!(sb.hub.pid(), pid, "the same hub process recovered");
    let writable_after = space_back.elapsed();
    agent.wait_drained(Duration::from_secs(120))?;
    eprintln!(
        "filled in {:.1}s; writable again {:.1}s after space returned, drained {:.1}s after",
        space_back.duration_since(started).as_secs_f64(),
        writable_after.as_secs_f64(),
        space_back.elapsed().as_secs_f64()
    );
    assert_in_sync(&sb.hub, &agent)?;
    sb.hub.assert_applied_once(FEED)?;
    sb.assert_no_rejections()?;

    // The spell is in the audit log, and the log's chain is intact.
    let audit = sb.hub.audit()?;
    let spells: Vec<_> = audit
        .iter()
        .filter(|a| a["kind"] == "store_failed")
        .collect();
    assert_eq!(spells.len(), 1, "{audit:?}");
    ensure!(
        spells[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("No space left") && d.contains("nothing was acknowledged")),
        "{:?}",
        spells[0]
    );
    let out = sb.hub.cli(&["audit", "verify"])?;
    ensure!(
        out.status.success(),
        "audit verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
