//! PostgreSQL sources, end to end: a throwaway server per test, pgbench
//! writing, the real agent reading the log and the real hub applying it;
//! every table exported from the hub is compared with the source.
//!
//! The tests run one at a time (each starts its own server and pgbench;
//! on two cores running them together only makes each slower).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shuyuan_tests::pg::{PgInstance, parse_lsn, pgbench_resources};
use shuyuan_tests::{
    AgentProcess, AgentSpec, Nodes, ResourceSpec, Sandbox, Topology, assert_pg_in_sync,
    pg_slot_name, wait_for,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const DEPT: &str = "PG-330902";

/// The department's agent on `pg`, sharing `resources`.
fn pg_agent(pg: &PgInstance, resources: Vec<ResourceSpec>) -> AgentSpec<'static> {
    AgentSpec::postgres("agent", DEPT, pg).resources(resources)
}

/// A started hub, a server with one table made by `setup`, and a started
/// agent that shares it as resource `code` and has loaded it.
fn one_table(
    setup: &[&str],
    code: &str,
    table: &str,
) -> Result<(Sandbox, PgInstance, AgentProcess)> {
    let sb = Sandbox::new()?;
    let pg = sb.postgres("pg")?;
    for sql in setup {
        pg.sql(sql)?;
    }
    let resources = vec![ResourceSpec::new(code, table, &[], "realtime")];
    let Nodes(sb, [], [agent]) = Topology::new()
        .agent(pg_agent(&pg, resources))
        .start_in(sb)?;
    agent.wait_pg_caught_up(&pg, Duration::from_secs(60))?;
    Ok((sb, pg, agent))
}

/// A started hub, a source with pgbench tables of `scale` and a started
/// agent sharing them.
fn pgbench(scale: u32) -> Result<(Sandbox, PgInstance, AgentProcess)> {
    let sb = Sandbox::new()?;
    let pg = sb.pgbench(scale)?;
    let Nodes(sb, [], [agent]) = Topology::new()
        .agent(pg_agent(&pg, pgbench_resources()))
        .start_in(sb)?;
    Ok((sb, pg, agent))
}

fn slot_position(pg: &PgInstance) -> Result<u64> {
    let text = pg.sql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
        pg_slot_name(DEPT)
    ))?;
    parse_lsn(&text).with_context(|| format!("slot position {text:?}"))
}

#[test]
fn pgbench_run_is_captured_from_the_log() -> Result<()> {
    let _one = serial();
    let (sb, pg, mut agent) = pgbench(2)?;
    let out = pg.pgbench(&["-T", "20", "-c", "4", "-j", "2", "-n"])?;
    assert!(out.contains("tps = "), "pgbench output: {out}");
    agent.wait_pg_caught_up(&pg, Duration::from_secs(180))?;
    let history: u64 = pg
        .sql("SELECT count(*) FROM pgbench_history")?
        .trim()
        .parse()?;
    assert!(history > 1000, "pgbench wrote only {history} transactions");
    let rows = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    eprintln!("{rows} rows equal after {history} pgbench transactions");
    sb.assert_no_rejections()?;
    // The agent's position is a log position, and the slot's confirmed
    // position follows it (released at most once a second after the outbox
    // commit), so the server keeps no WAL for what the hub already has.
    let captured = agent.status()?["source"]["position"]
        .as_str()
        .and_then(parse_lsn)
        .context("the status position is a log position")?;
    wait_for(
        "the slot to reach the captured position",
        Duration::from_secs(10),
        || Ok((slot_position(&pg)? >= captured).then_some(())),
    )?;
    agent.stop()?;
    Ok(())
}

#[test]
fn agent_killed_twice_during_pgbench_loses_nothing() -> Result<()> {
    let _one = serial();
    let (sb, pg, mut agent) = pgbench(2)?;
    let mut bench = pg.pgbench_spawn(&["-T", "20", "-c", "4", "-j", "2", "-n"])?;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(6));
        // The kill must land while changes flow: pgbench is still running.
        assert!(bench.try_wait()?.is_none(), "pgbench ended before the kill");
        agent.kill()?;
        std::thread::sleep(Duration::from_millis(500));
        agent.start()?;
    }
    let status = bench.wait()?;
    assert!(status.success(), "pgbench failed");
    agent.wait_pg_caught_up(&pg, Duration::from_secs(180))?;
    let rows = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    eprintln!("{rows} rows equal after two SIGKILLs");
    sb.assert_no_rejections()?;
    // No batch was applied twice: sequence numbers are gap-free and each
    // was applied once.
    for code in ["ACCOUNTS", "HISTORY"] {
        let f = sb
            .hub
            .feed_status(&format!("{DEPT}:{code}"))?
            .context("feed at the hub")?;
        assert_eq!(f["batches_applied"], f["last_seq"], "{code}: {f}");
    }
    // No change from the log was sent twice either. The history starts
    // empty and only grows by pgbench's inserts; its initial load runs
    // after the other tables' and re-reads rows the log already carried
    // (an insert of the same row again), so the changes from the log are
    // those applied minus the rows the load sent: one per row, even for
    // transactions a kill cut in the middle.
    let history: u64 = pg
        .sql("SELECT count(*) FROM pgbench_history")?
        .trim()
        .parse()?;
    let f = sb
        .hub
        .feed_status(&format!("{DEPT}:HISTORY"))?
        .context("feed at the hub")?;
    let applied = f["changes_applied"].as_u64().context("changes_applied")?;
    let loaded = f["resync"]["finished"]["rows_sent"]
        .as_u64()
        .context("the history's initial load finished")?;
    assert_eq!(applied - loaded, history, "HISTORY: {f}");
    Ok(())
}

#[test]
fn initial_load_of_a_million_rows_while_pgbench_writes() -> Result<()> {
    let _one = serial();
    let sb = Sandbox::new()?;
    let pg = sb.pgbench(10)?;
    let Nodes(mut sb, [], [mut agent]) = Topology::new()
        .agent(pg_agent(&pg, pgbench_resources()))
        .build_in(sb)?;
    sb.hub.start()?;
    let mut bench = pg.pgbench_spawn(&["-T", "40", "-c", "2", "-j", "2", "-n"])?;
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    agent.start()?;
    // The load runs while pgbench writes; check that it was still loading
    // when writes were going on.
    let loading = wait_for(
        "the initial load to show progress",
        Duration::from_secs(60),
        || {
            let s = agent.status()?;
            let rows = s["source"]["loads"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["resource"] == "ACCOUNTS"))
                .and_then(|l| l["rows"].as_u64());
            Ok(rows.filter(|&r| r > 0))
        },
    )?;
    assert!(
        bench.try_wait()?.is_none(),
        "pgbench ended before the load ran"
    );
    eprintln!(
        "initial load under way ({loading} rows) after {:?}",
        started.elapsed()
    );
    assert!(bench.wait()?.success(), "pgbench failed");
    agent.wait_pg_caught_up(&pg, Duration::from_secs(600))?;
    eprintln!("loaded and caught up after {:?}", started.elapsed());
    let rows = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    assert!(rows >= 1_000_000, "only {rows} rows");
    sb.assert_no_rejections()?;
    let audit = sb.hub.audit()?;
    assert!(
        audit
            .iter()
            .any(|a| a["kind"] == "resync_finished" && a["feed"] == format!("{DEPT}:ACCOUNTS")),
        "the hub recorded the end of the load: {audit:?}"
    );
    Ok(())
}

#[test]
fn every_supported_type_round_trips_exactly() -> Result<()> {
    let _one = serial();
    let create = "CREATE TABLE typed (
            id int PRIMARY KEY,
            i2 smallint, i4 integer, i8 bigint,
            num numeric, num_scaled numeric(20,6),
            r4 real, r8 double precision,
            t text, vc varchar(12), ch char(5),
            b boolean, d date, tm time, ts timestamp, tstz timestamptz,
            by bytea, js json, jsb jsonb, u uuid,
            ia integer[], ta text[], big text
        )";
    let rows = [
        // Edge values first; loaded by the initial load.
        "(1, -32768, -2147483648, -9223372036854775808, 0, -0.000001, -3.4e38, -1.7976931348623157e308, '', '', '', false, '0001-01-01', '00:00:00', '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', '', 'null', '{}', '00000000-0000-0000-0000-000000000000', '{}', '{}', '')",
        "(2, 32767, 2147483647, 9223372036854775807, 123456789012345678901234567890.123456789, 99999999999999.999999, 1.17549435e-38, 2.2250738585072014e-308, E'quote \" comma , newline \\n tab \\t 中文', 'ten chars!', 'ab', true, '9999-12-31', '23:59:59.999999', '2026-11-21 08:30:00.123456', '2026-11-21 08:30:00.123456+08', '\\x00ff10', '{\"a\": [1, 2.50, \"x\"]}', '{\"b\": {\"c\": null}, \"a\": 1}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}', '{\"a b\",\"c,d\",NULL}', repeat('large value ', 1000))",
        "(3, NULL, NULL, NULL, 'NaN', NULL, 'NaN', 'Infinity', NULL, NULL, NULL, NULL, 'infinity', '24:00:00', '-infinity', 'infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        "(4, 0, 0, 0, -0.0, 0, '-0', '-Infinity', 'NULL', 'null', 'x', NULL, '2000-02-29', '12:00:00.5', '2000-02-29 12:00:00', '2000-02-29 12:00:00.5-03:30', '\\x', '[]', '[]', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '{-1}', '{\"\"}', 'x')",
    ];
    let first = format!("INSERT INTO typed VALUES {}", rows[..2].join(", "));
    let (sb, pg, agent) = one_table(&[create, &first], "TYPED", "typed")?;
    assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    // The same values through the log: inserts, an update that leaves the
    // large (TOASTed) value unchanged, an update of the key.
    pg.sql(&format!(
        "INSERT INTO typed VALUES {}",
        rows[2..].join(", ")
    ))?;
    pg.sql("INSERT INTO typed SELECT id + 100, i2, i4, i8, num, num_scaled, r4, r8, t, vc, ch, b, d, tm, ts, tstz, by, js, jsb, u, ia, ta, big FROM typed")?;
    pg.sql("UPDATE typed SET t = 'changed' WHERE id = 102")?;
    pg.sql("UPDATE typed SET id = 202 WHERE id = 101")?;
    agent.wait_pg_caught_up(&pg, Duration::from_secs(60))?;
    let n = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    assert_eq!(n, 8);
    let hub = sb.hub.export_jsonl(&format!("{DEPT}:TYPED"))?;
    let row2 = hub.iter().find(|r| r["id"] == 102).context("row 102")?;
    assert_eq!(
        row2["big"].as_str().map(str::len),
        Some(12_000),
        "the unchanged large value survived the update"
    );
    Ok(())
}

#[test]
fn columns_added_and_dropped_while_streaming() -> Result<()> {
    let _one = serial();
    let (sb, pg, agent) = one_table(
        &[
            "CREATE TABLE permit (id int PRIMARY KEY, holder text, issued date)",
            "INSERT INTO permit SELECT g, 'holder ' || g, date '2026-01-01' + g FROM generate_series(1, 3000) g",
        ],
        "PERMIT",
        "permit",
    )?;
    pg.sql("UPDATE permit SET holder = 'before' WHERE id <= 10")?;
    pg.sql("ALTER TABLE permit ADD COLUMN status text DEFAULT 'valid'")?;
    pg.sql("UPDATE permit SET status = 'revoked' WHERE id BETWEEN 11 AND 20")?;
    pg.sql("INSERT INTO permit VALUES (5000, 'new', '2026-11-21', 'pending')")?;
    pg.sql("ALTER TABLE permit DROP COLUMN issued")?;
    pg.sql("UPDATE permit SET holder = 'after drop' WHERE id BETWEEN 21 AND 30")?;
    pg.sql("DELETE FROM permit WHERE id BETWEEN 31 AND 40")?;
    agent.wait_pg_caught_up(&pg, Duration::from_secs(60))?;
    let n = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    assert_eq!(n, 2991);
    let feed = sb
        .hub
        .feed_status(&format!("{DEPT}:PERMIT"))?
        .context("feed")?;
    let version = feed["schema_version"].as_u64().unwrap_or(0);
    assert!(version >= 3, "two shape changes after the first: {feed}");
    Ok(())
}

#[test]
fn dropped_slot_is_detected_reported_and_repaired() -> Result<()> {
    let _one = serial();
    let (sb, pg, mut agent) = one_table(
        &[
            "CREATE TABLE licence (id int PRIMARY KEY, holder text)",
            "INSERT INTO licence SELECT g, 'holder ' || g FROM generate_series(1, 5000) g",
        ],
        "LICENCE",
        "licence",
    )?;
    agent.stop()?;
    // While the agent is stopped: the slot is dropped, and rows change,
    // are deleted and added where no log will ever show it to the agent.
    pg.sql(&format!(
        "SELECT pg_drop_replication_slot('{}')",
        pg_slot_name(DEPT)
    ))?;
    pg.sql("DELETE FROM licence WHERE id % 10 = 0")?;
    pg.sql("UPDATE licence SET holder = 'changed' WHERE id % 7 = 0")?;
    pg.sql("INSERT INTO licence VALUES (9001, 'added')")?;
    agent.start()?;
    let alarm = wait_for("the lost slot alarm", Duration::from_secs(30), || {
        Ok(agent.status()?["source"]["alarm"]
            .as_str()
            .map(str::to_string))
    })?;
    assert!(alarm.contains("lost"), "alarm: {alarm}");
    agent.wait_pg_caught_up(&pg, Duration::from_secs(60))?;
    let n = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    assert_eq!(n, 4501);
    let audit = sb.hub.audit()?;
    let started = audit
        .iter()
        .find(|a| {
            a["kind"] == "resync_started"
                && a["detail"].as_str().is_some_and(|d| d.contains("lost"))
        })
        .with_context(|| format!("the hub was told: {audit:?}"))?;
    assert_eq!(started["feed"], format!("{DEPT}:LICENCE"));
    let finished = audit
        .iter()
        .find(|a| a["kind"] == "resync_finished" && a["id"].as_u64() > started["id"].as_u64())
        .context("repair finished")?;
    assert!(
        finished["detail"]
            .as_str()
            .is_some_and(|d| d.contains("500 rows removed")),
        "the 500 rows deleted while unseen were removed: {finished}"
    );
    Ok(())
}

#[test]
fn resync_on_demand_and_tables_the_log_cannot_identify() -> Result<()> {
    let _one = serial();
    let Nodes(sb, [], []) = Topology::new().start()?;
    let pg = sb.postgres("pg")?;
    pg.sql("CREATE TABLE nokey (a int, b text)")?;
    let agent = sb.add_agent(
        AgentSpec::postgres("agent", DEPT, &pg).resources(vec![ResourceSpec::new(
            "NOKEY",
            "nokey",
            &[],
            "realtime",
        )]),
    );
    let err = match agent {
        Ok(_) => bail!("pg setup accepted a table without key or replica identity"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("REPLICA IDENTITY FULL") && err.contains("nokey"),
        "the refusal says what to do: {err}"
    );
    pg.sql("CREATE TABLE seal (id int PRIMARY KEY, v text)")?;
    pg.sql("INSERT INTO seal SELECT g, 'v' || g FROM generate_series(1, 12000) g")?;
    let mut agent = sb.add_agent(
        AgentSpec::postgres("agent2", "PG-2", &pg).resources(vec![ResourceSpec::new(
            "SEAL",
            "seal",
            &[],
            "realtime",
        )]),
    )?;
    agent.start()?;
    let out = agent.resync("SEAL")?;
    assert!(out.contains("requested"), "{out}");
    wait_for("the resync to finish", Duration::from_secs(60), || {
        let s = agent.status()?;
        Ok(s["source"]["finished_loads"]
            .as_array()
            .is_some_and(|l| {
                l.iter()
                    .any(|l| l["reason"].as_str().is_some_and(|r| r.contains("operator")))
            })
            .then_some(()))
    })?;
    // The copy is still exact, and capture goes on after the re-read.
    pg.sql("DELETE FROM seal WHERE id > 11000")?;
    agent.wait_pg_caught_up(&pg, Duration::from_secs(60))?;
    assert_eq!(assert_pg_in_sync(&sb.hub, &agent, &pg)?, 11000);
    let err = agent.resync("NOPE").unwrap_err();
    assert!(format!("{err:#}").contains("no resource NOPE"), "{err:#}");
    Ok(())
}

#[test]
fn initial_load_resumes_after_the_agent_is_killed_mid_load() -> Result<()> {
    let _one = serial();
    let (sb, pg, mut agent) = pgbench(5)?;
    let loaded = |agent: &AgentProcess| -> Result<Option<u64>> {
        Ok(agent.status()?["source"]["loads"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["resource"] == "ACCOUNTS"))
            .and_then(|l| l["rows"].as_u64()))
    };
    let before = wait_for(
        "the load to pass 100,000 rows",
        Duration::from_secs(120),
        || Ok(loaded(&agent)?.filter(|&r| r >= 100_000)),
    )?;
    agent.kill()?;
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 1000 = 0")?;
    agent.start()?;
    assert!(
        before < 500_000,
        "the kill came mid-load ({before} rows read)"
    );
    agent.wait_pg_caught_up(&pg, Duration::from_secs(600))?;
    let rows = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    assert!(rows >= 500_000, "only {rows} rows");
    sb.assert_no_rejections()?;
    let starts = sb
        .hub
        .audit()?
        .into_iter()
        .filter(|a| a["kind"] == "resync_started" && a["feed"] == format!("{DEPT}:ACCOUNTS"))
        .count();
    // A load that lost its committed progress would begin again (a second
    // Begin); this one went on from its last chunk.
    assert_eq!(starts, 1, "one load, resumed, not begun again");
    Ok(())
}

#[test]
fn quiet_tables_in_a_busy_database_still_move_the_slot() -> Result<()> {
    let _one = serial();
    let (_sb, pg, agent) = one_table(
        &[
            "CREATE TABLE quiet (id int PRIMARY KEY, v text)",
            "INSERT INTO quiet VALUES (1, 'only row')",
            "CREATE TABLE busy (id serial PRIMARY KEY, v text)",
        ],
        "QUIET",
        "quiet",
    )?;
    let start = slot_position(&pg)?;
    // Another application's table, not shared, takes a stream of writes.
    for _ in 0..20 {
        pg.sql("INSERT INTO busy (v) SELECT repeat('x', 200) FROM generate_series(1, 2000)")?;
    }
    let written = pg.current_lsn()?;
    assert!(written > start + 1_000_000, "the busy table wrote WAL");
    // Nothing of the shared table changed, yet the agent's position and the
    // slot follow the log, so the server keeps no WAL for the agent.
    wait_for(
        "the slot to pass the busy writes",
        Duration::from_secs(30),
        || Ok((slot_position(&pg)? >= written).then_some(())),
    )?;
    let status = agent.status()?;
    let at = status["source"]["position"].as_str().and_then(parse_lsn);
    assert!(at >= Some(written), "agent position {status}");
    Ok(())
}

/// Writes to `ledger` until told to stop, one transaction at a time: a few
/// neighbouring rows updated (never an id divisible by 250), and rows of
/// 5001..6000 inserted, updated and deleted. Returns the transactions done.
fn ledger_writer(
    dsn: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Result<()>> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = shuyuan_tests::pg::connect(&dsn).await?;
            let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut next = |n: u64| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (seed >> 33) % n
            };
            // At most 100 transactions a second (pgbench's rate in the crash
            // test): a department writing steadily. Unpaced, the writer
            // outran capture on a loaded 2-core machine (the agent fell
            // 100 MB of WAL behind), and each range compared must wait for
            // capture to reach its snapshot, so a run took over 300 s.
            let mut pace = tokio::time::interval(std::time::Duration::from_millis(10));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::SeqCst) {
                pace.tick().await;
                let a = 1 + next(3990);
                let (b, c) = (5001 + next(1000), 5001 + next(1000));
                client
                    .batch_execute(&format!(
                        "BEGIN; \
                         UPDATE ledger SET v = v + 1, note = 'written ' || v WHERE id BETWEEN {a} AND {a} + 5 AND id % 250 <> 0; \
                         INSERT INTO ledger VALUES ({b}, 0, 'new') ON CONFLICT (id) DO UPDATE SET v = ledger.v + 1; \
                         DELETE FROM ledger WHERE id = {c}; \
                         COMMIT;"
                    ))
                    .await?;
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    })
}

#[test]
fn verify_finds_exactly_the_rows_changed_behind_capture_while_writes_go_on() -> Result<()> {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _one = serial();
    let (sb, pg, agent) = one_table(
        &[
            "CREATE TABLE ledger (id int PRIMARY KEY, v int NOT NULL, note text)",
            "INSERT INTO ledger SELECT g, g, 'row ' || g FROM generate_series(1, 4000) g",
        ],
        "LEDGER",
        "ledger",
    )?;
    let feed = format!("{DEPT}:LEDGER");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = ledger_writer(pg.dsn(), stop.clone(), done.clone());
    wait_for("the writer to get going", Duration::from_secs(30), || {
        Ok((done.load(Ordering::SeqCst) >= 50).then_some(()))
    })?;
    // Behind capture's back, while the writer goes on: in one transaction
    // the table leaves the publication, so its changes in between never
    // reach the log's consumer; the writer's own transactions stay in.
    pg.sql(&format!(
        "ALTER PUBLICATION \"{pub_}\" DROP TABLE ledger; \
         UPDATE ledger SET note = 'behind capture' WHERE id IN (250, 1000, 1750, 2500, 3250); \
         DELETE FROM ledger WHERE id IN (500, 1500, 3500); \
         INSERT INTO ledger VALUES (4750, 0, 'unseen'); \
         ALTER PUBLICATION \"{pub_}\" ADD TABLE ledger",
        pub_ = pg_slot_name(DEPT)
    ))?;
    let before = done.load(Ordering::SeqCst);
    let run = sb.hub.verify(&feed)?;
    let during = done.load(Ordering::SeqCst) - before;
    assert!(during > 0, "the writer wrote while the comparison ran");
    assert_eq!(run["finished"]["verified"], true, "{run:#}");
    assert_eq!(run["rows_repaired"], 6, "5 updated, 1 inserted: {run:#}");
    assert_eq!(run["rows_removed"], 3, "{run:#}");
    let keys: BTreeSet<String> = run["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    let changed: BTreeSet<String> = [250, 1000, 1750, 2500, 3250, 4750, 500, 1500, 3500]
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, changed, "{run:#}");
    eprintln!(
        "first run: {} ranges compared, {} differed, {} writer transactions meanwhile",
        run["ranges_compared"], run["ranges_differing"], during
    );
    // Compared again, still under writes: nothing differs any more.
    let before = done.load(Ordering::SeqCst);
    let again = sb.hub.verify(&feed)?;
    assert!(done.load(Ordering::SeqCst) > before, "writes went on");
    assert_eq!(again["finished"]["verified"], true, "{again:#}");
    assert_eq!(again["ranges_differing"], 0, "{again:#}");
    assert_eq!(again["rows_repaired"], 0, "{again:#}");
    assert_eq!(again["rows_removed"], 0, "{again:#}");
    stop.store(true, Ordering::SeqCst);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    agent.wait_pg_caught_up(&pg, Duration::from_secs(60))?;
    let n = assert_pg_in_sync(&sb.hub, &agent, &pg)?;
    eprintln!(
        "{n} rows equal after {} writer transactions",
        done.load(Ordering::SeqCst)
    );
    sb.assert_no_rejections()?;
    Ok(())
}

#[test]
fn verify_of_a_key_that_sorts_differently_ends_at_once_with_the_reason() -> Result<()> {
    let _one = serial();
    let (sb, _pg, _agent) = one_table(
        &[
            "CREATE TABLE price (code numeric PRIMARY KEY, amount int)",
            "INSERT INTO price SELECT g / 10.0, g FROM generate_series(1, 200) g",
        ],
        "PRICE",
        "price",
    )?;
    let feed = format!("{DEPT}:PRICE");
    let started = Instant::now();
    let out = std::process::Command::new(shuyuan_tests::bin("shuyuan-hub"))
        .arg("--config")
        .arg(&sb.hub.config)
        .args(["verify", &feed, "--timeout", "120"])
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Refused with the reason, not left to time out; nothing is claimed.
    assert!(!out.status.success(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(60), "{text}");
    assert!(
        text.contains("NOT VERIFIABLE") && text.contains("sort"),
        "{text}"
    );
    let status = sb.hub.feed_status(&feed)?.context("no feed")?;
    assert_eq!(
        status["verification"]["last_run"]["finished"]["refused"],
        true
    );
    assert_ne!(status["verdict"]["state"], "diverged", "{status:#}");
    let audit = sb.hub.audit()?;
    assert!(
        audit
            .iter()
            .any(|a| a["kind"] == "verify_refused" && a["feed"] == feed.as_str()),
        "{audit:#?}"
    );
    Ok(())
}
