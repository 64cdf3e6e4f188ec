//! The shared copy is proven equal to the source: checkpoints compare the
//! feed digests continuously; a comparison with the source finds rows that
//! differ however they came to differ (the hub's store damaged, the source
//! changed behind capture's back), localises them to their keys, repairs
//! them through the feed and verifies again. All through the real binaries.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use shuyuan_protocol::Value;
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::value::encode_key;
use shuyuan_tests::{
    AgentProcess, AgentSpec, Nodes, ResourceSpec, Sandbox, Topology, assert_in_sync, wait_for,
};

const DDL: &str = "CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL)";
const DEPT: &str = "GA-330902";
const FEED: &str = "GA-330902:A01/0001";

fn resources() -> [ResourceSpec; 1] {
    [ResourceSpec::new("A01/0001", "person", &["id"], "daily").heartbeat("2s")]
}

/// A department with `rows` people, synced to the hub.
fn synced(rows: i64) -> Result<(Sandbox, rusqlite::Connection, AgentProcess)> {
    synced_with(rows, "")
}

/// The same, with more agent settings after the `[outbox]` ones (for
/// example a `[verify]` section).
fn synced_with(rows: i64, settings: &str) -> Result<(Sandbox, rusqlite::Connection, AgentProcess)> {
    let Nodes(sb, [], [agent]) = Topology::new()
        .agent(
            AgentSpec::sqlite("ga", DEPT, &[DDL])
                .resources(resources().to_vec())
                .seed(|conn| {
                    conn.execute_batch("BEGIN")?;
                    {
                        let mut insert = conn.prepare("INSERT INTO person VALUES (?1, ?2, ?3)")?;
                        for i in 1..=rows {
                            insert.execute(rusqlite::params![
                                i,
                                format!("person {i}"),
                                i as f64 / 7.0
                            ])?;
                        }
                    }
                    conn.execute_batch("COMMIT")?;
                    Ok(())
                })
                .outbox(&format!("batch_max_changes = 2000\n{settings}")),
        )
        .start()?;
    agent.wait_drained(Duration::from_secs(600))?;
    assert_in_sync(&sb.hub, &agent)?;
    Ok((sb, agent.database()?, agent))
}

/// Changes rows without capture seeing them: the agent is stopped, and
/// the change records the triggers wrote are removed with the change.
fn behind_capture(conn: &rusqlite::Connection, sql: &str) -> Result<()> {
    let before: i64 = conn.query_row(
        "SELECT coalesce(max(id), 0) FROM _shuyuan_changes",
        [],
        |r| r.get(0),
    )?;
    conn.execute_batch(sql)?;
    conn.execute("DELETE FROM _shuyuan_changes WHERE id > ?1", [before])?;
    Ok(())
}

/// Waits until the hub's verdict for the feed is `verified` by a
/// checkpoint at or after `seq`.
fn checkpoint_verified(sb: &Sandbox, seq: u64) -> Result<Json> {
    wait_for("a matching checkpoint", Duration::from_secs(60), || {
        let r = sb.hub.feed_status(FEED)?.context("no feed")?;
        let v = &r["verdict"];
        Ok(
            (v["state"] == "verified" && v["by"] == "checkpoint" && v["seq"].as_u64() >= Some(seq))
                .then(|| r.clone()),
        )
    })
}

fn keys(run: &Json) -> BTreeSet<String> {
    run["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(String::from))
        .collect()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// The hub's row store, as the hub lays it out (see hub/src/store/redb.rs).
const ROWS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("rows_v1");

#[derive(Serialize, Deserialize)]
struct StoredRow {
    schema_version: u32,
    values: Vec<Value>,
}

/// Edits the stopped hub's rows directly in its redb file, in one
/// transaction.
fn edit_hub_rows(
    path: &Path,
    edit: impl FnOnce(&mut redb::Table<(&str, &[u8]), &[u8]>) -> Result<()>,
) -> Result<()> {
    let db = redb::Database::open(path)?;
    let tx = db.begin_write()?;
    edit(&mut tx.open_table(ROWS)?)?;
    tx.commit()?;
    Ok(())
}

/// Changes the name of one stored row behind the hub's back; returns it.
fn rename_stored(
    rows: &mut redb::Table<(&str, &[u8]), &[u8]>,
    id: i64,
    name: &str,
) -> Result<StoredRow> {
    let k = encode_key(&[Value::Int(id)]);
    let mut row: StoredRow = decode(
        rows.get((FEED, k.as_slice()))?
            .with_context(|| format!("row {id}"))?
            .value(),
    )?;
    row.values[1] = Value::Text(name.into());
    rows.insert((FEED, k.as_slice()), encode(&row)?.as_slice())?;
    Ok(row)
}

/// Damages the stopped hub's copy: one row's value changed, one row
/// deleted, one row that the source never had added.
fn damage_hub_store(path: &Path) -> Result<()> {
    edit_hub_rows(path, |rows| {
        let row = rename_stored(rows, 1234, "tampered")?;
        rows.remove((FEED, encode_key(&[Value::Int(77)]).as_slice()))?;
        let extra = StoredRow {
            schema_version: row.schema_version,
            values: vec![
                Value::Int(99_999),
                Value::Text("invented".into()),
                Value::Null,
            ],
        };
        rows.insert(
            (FEED, encode_key(&[Value::Int(99_999)]).as_slice()),
            encode(&extra)?.as_slice(),
        )?;
        Ok(())
    })?;
    let db = redb::Database::open(path)?;
    let check = db.begin_read()?;
    assert!(
        check
            .open_table(ROWS)?
            .get((FEED, encode_key(&[Value::Int(77)]).as_slice()))?
            .is_none()
    );
    Ok(())
}

#[test]
fn checkpoints_verify_the_copy_and_a_damaged_hub_store_is_found_and_repaired() -> Result<()> {
    let (mut sb, conn, mut agent) = synced(3000)?;
    // The feed's digests agree at the agent and the hub.
    let head = agent.status()?["resources"][0]["head_seq"]
        .as_u64()
        .unwrap_or(0);
    let status = checkpoint_verified(&sb, head)?;
    assert_eq!(status["verification"]["checkpoint"]["agent"]["rows"], 3000);

    sb.hub.stop()?;
    damage_hub_store(&sb.hub.dir.join("data").join("hub.redb"))?;
    sb.hub.start()?;
    let run = sb.hub.verify(FEED)?;
    let end = &run["finished"];
    assert_eq!(end["verified"], true, "{run:#}");
    assert!(run["ranges_differing"].as_u64() >= Some(1), "{run:#}");
    assert_eq!(run["rows_repaired"], 2, "{run:#}"); // 1234 rewritten, 77 restored
    assert_eq!(run["rows_removed"], 1, "{run:#}"); // 99999 removed
    assert_eq!(keys(&run), set(&["1234", "77", "99999"]), "{run:#}");
    assert_in_sync(&sb.hub, &agent)?;

    let audit = sb.hub.audit()?;
    assert!(
        audit
            .iter()
            .any(|a| a["kind"] == "diverged" && a["feed"] == FEED),
        "{audit:#?}"
    );
    let repaired = audit
        .iter()
        .find(|a| a["kind"] == "repaired" && a["feed"] == FEED)
        .context("no repair audited")?;
    let detail = repaired["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("2 rows rewritten, 1 removed"), "{detail}");

    // Afterwards the feed digests agree again, at a later checkpoint.
    conn.execute("UPDATE person SET score = 1 WHERE id = 5", [])?;
    agent.wait_drained(Duration::from_secs(60))?;
    let head = agent.status()?["resources"][0]["head_seq"]
        .as_u64()
        .unwrap_or(0);
    checkpoint_verified(&sb, head)?;

    // Damage that a later change overwrites still shows: the hub's digest
    // subtracts what it stored, the checkpoint differs, and the hub starts
    // a comparison by itself, after which the digests agree again.
    sb.hub.stop()?;
    edit_hub_rows(&sb.hub.dir.join("data").join("hub.redb"), |rows| {
        rename_stored(rows, 2000, "tampered again").map(drop)
    })?;
    sb.hub.start()?;
    conn.execute("UPDATE person SET name = 'renamed' WHERE id = 2000", [])?;
    let mismatch = wait_for("the checkpoint to differ", Duration::from_secs(60), || {
        Ok(sb.hub.audit()?.into_iter().find(|a| {
            a["kind"] == "diverged"
                && a["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("checkpoint"))
        }))
    })?;
    let since = mismatch["seq"].as_u64().unwrap_or(0);
    let auto = wait_for(
        "the comparison the hub started",
        Duration::from_secs(120),
        || {
            let r = sb.hub.feed_status(FEED)?.context("no feed")?;
            let last = r["verification"]["last_run"].clone();
            Ok((last["reason"]
                .as_str()
                .is_some_and(|x| x.starts_with("checkpoint at seq"))
                && !last["finished"].is_null())
            .then_some(last))
        },
    )?;
    assert_eq!(auto["origin"], "Checkpoint");
    assert_eq!(auto["finished"]["verified"], true, "{auto:#}");
    assert_in_sync(&sb.hub, &agent)?;
    conn.execute("UPDATE person SET score = 2 WHERE id = 6", [])?;
    agent.wait_drained(Duration::from_secs(60))?;
    checkpoint_verified(&sb, since + 1)?;
    sb.assert_no_rejections()?;
    agent.stop()?;
    Ok(())
}

#[test]
fn source_changes_capture_never_saw_are_found_localised_and_repaired() -> Result<()> {
    let (sb, conn, mut agent) = synced(2000)?;

    // A row changed while capture was stopped; found by the agent's scan.
    agent.stop()?;
    behind_capture(
        &conn,
        "UPDATE person SET name = 'changed behind capture' WHERE id = 500",
    )?;
    agent.start()?;
    let run_id = agent.verify("A01/0001")?;
    let run = wait_for(
        "the agent's comparison to end",
        Duration::from_secs(120),
        || sb.hub.finished_run(FEED, run_id),
    )?;
    assert_eq!(run["finished"]["verified"], true, "{run:#}");
    assert_eq!(run["origin"], "Agent");
    assert_eq!(run["rows_repaired"], 1, "{run:#}");
    assert_eq!(run["rows_removed"], 0, "{run:#}");
    assert_eq!(keys(&run), set(&["500"]));
    assert_in_sync(&sb.hub, &agent)?;
    // The agent hears the verdict too.
    wait_for(
        "the agent to hear the verdict",
        Duration::from_secs(30),
        || {
            let s = agent.status()?;
            Ok(s["verifications"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["run"].as_u64() == Some(run_id) && v["verified"] == true)
                .then_some(()))
        },
    )?;

    // Rows deleted (and one inserted) while the agent was down; found by
    // the hub's request.
    agent.stop()?;
    behind_capture(
        &conn,
        "DELETE FROM person WHERE id BETWEEN 1500 AND 1509;
         INSERT INTO person VALUES (5000, 'born behind capture', NULL);",
    )?;
    agent.start()?;
    let run = sb.hub.verify(FEED)?;
    assert_eq!(run["finished"]["verified"], true, "{run:#}");
    assert_eq!(run["rows_removed"], 10, "{run:#}");
    assert_eq!(run["rows_repaired"], 1, "{run:#}");
    let expected: BTreeSet<String> = (1500..1510)
        .map(|i| i.to_string())
        .chain(["5000".to_string()])
        .collect();
    assert_eq!(keys(&run), expected);
    assert_in_sync(&sb.hub, &agent)?;
    // Nothing differs any more: a new comparison finds every range equal.
    let clean = sb.hub.verify(FEED)?;
    assert_eq!(clean["ranges_differing"], 0, "{clean:#}");
    assert_eq!(clean["finished"]["verified"], true);
    sb.assert_no_rejections()?;
    agent.stop()?;
    Ok(())
}

#[test]
fn ten_differing_rows_in_a_million_are_repaired_exchanging_a_small_fraction() -> Result<()> {
    const ROWS: i64 = 1_000_000;
    let (sb, conn, mut agent) = synced(ROWS)?;
    agent.stop()?;
    let changed: Vec<i64> = (0..10).map(|i| 37 + i * 99_991).collect();
    let sql: String = changed
        .iter()
        .map(|id| format!("UPDATE person SET score = -1 WHERE id = {id};"))
        .collect();
    behind_capture(&conn, &sql)?;
    agent.start()?;
    let run = sb.hub.verify(FEED)?;
    assert_eq!(run["finished"]["verified"], true, "{run:#}");
    assert_eq!(run["rows_repaired"], 10, "{run:#}");
    let expected: BTreeSet<String> = changed.iter().map(ToString::to_string).collect();
    assert_eq!(keys(&run), expected);
    assert_in_sync(&sb.hub, &agent)?;

    // A full comparison needs at least a 32-byte hash per row; the table
    // itself is far larger. Localising ten rows must cost a small fraction.
    let exchanged = run["bytes_received"].as_u64().unwrap_or(u64::MAX)
        + run["bytes_sent"].as_u64().unwrap_or(u64::MAX);
    let per_row_hashes = 32 * ROWS as u64;
    eprintln!(
        "localised and repaired 10 of {ROWS} rows exchanging {exchanged} bytes in {} ranges",
        run["ranges_compared"]
    );
    assert!(
        exchanged * 100 < per_row_hashes,
        "{exchanged} bytes exchanged; a per-row comparison needs {per_row_hashes}"
    );
    assert!(exchanged < 200_000, "{exchanged} bytes exchanged");
    agent.stop()?;
    Ok(())
}

#[test]
fn the_agent_compares_on_its_schedule_and_the_difference_is_repaired_unasked() -> Result<()> {
    let (sb, conn, mut agent) = synced_with(500, "[verify]\nevery = \"2s\"")?;
    agent.stop()?;
    behind_capture(&conn, "UPDATE person SET score = 99 WHERE id = 250")?;
    agent.start()?;
    // Nobody asks: the agent's own schedule finds and repairs it (later
    // scheduled runs find nothing, so the audit log tells which run it was).
    let repaired = wait_for(
        "a scheduled comparison that repairs",
        Duration::from_secs(60),
        || {
            Ok(sb
                .hub
                .audit()?
                .into_iter()
                .find(|a| a["kind"] == "repaired" && a["feed"] == FEED))
        },
    )?;
    let detail = repaired["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("1 rows rewritten, 0 removed") && detail.contains("keys: 250."),
        "{detail}"
    );
    assert!(detail.contains("copy equals the source"), "{detail}");
    assert_in_sync(&sb.hub, &agent)?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_comparison_resumes_after_the_agent_is_killed_mid_scan() -> Result<()> {
    // A slow scan (10 ranges of 10,000 rows at 5,000 rows/s) so that the
    // agent dies in the middle of it.
    let (sb, conn, mut agent) = synced_with(100_000, "[verify]\nrows_per_second = 5000")?;
    agent.stop()?;
    behind_capture(
        &conn,
        "UPDATE person SET name = 'early' WHERE id = 1500;
         UPDATE person SET name = 'late' WHERE id = 95000;",
    )?;
    agent.start()?;
    let run = sb.hub.start_verify(FEED)?;
    // Part of the table compared, not all of it: then the agent dies.
    wait_for("part of the scan", Duration::from_secs(60), || {
        let r = sb.hub.feed_status(FEED)?.context("no feed")?;
        let compared = r["verification"]["run"]["ranges_compared"]
            .as_u64()
            .unwrap_or(0);
        Ok((compared >= 2).then_some(()))
    })?;
    let mid = sb.hub.feed_status(FEED)?.context("no feed")?;
    assert!(
        mid["verification"]["run"]["finished"].is_null(),
        "the scan ended before the agent was killed: {mid:#}"
    );
    agent.kill()?;
    agent.start()?;
    // The hub asks again from where the answers stopped; the run ends.
    let ended = wait_for("the run to end", Duration::from_secs(120), || {
        sb.hub.finished_run(FEED, run)
    })?;
    assert_eq!(ended["finished"]["verified"], true, "{ended:#}");
    assert_eq!(ended["rows_repaired"], 2, "{ended:#}");
    assert_eq!(keys(&ended), set(&["1500", "95000"]));
    assert_in_sync(&sb.hub, &agent)?;
    sb.assert_no_rejections()?;
    agent.stop()?;
    Ok(())
}
