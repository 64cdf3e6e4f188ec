//! PostgreSQL sources, end to end: a throwaway server per test, pgbench
//! writing, the real agent reading the log and the real hub applying it;
//! every table exported from the hub is compared with the source.
//!
//! The tests run one at a time (each starts its own server and pgbench;
//! on two cores running them together only makes each slower).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shuyuan_tests::pg::{PgInstance, assert_same_csv, csv_records};
use shuyuan_tests::{AgentProcess, ResourceSpec, Sandbox, wait_for};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const DEPT: &str = "PG-330902";

/// The pgbench tables; history has no key and is shared by its whole row.
fn pgbench_resources() -> Vec<ResourceSpec> {
    vec![
        ResourceSpec::new("ACCOUNTS", "pgbench_accounts", &[], "realtime"),
        ResourceSpec::new("BRANCHES", "pgbench_branches", &[], "realtime"),
        ResourceSpec::new("TELLERS", "pgbench_tellers", &[], "realtime"),
        ResourceSpec::new("HISTORY", "pgbench_history", &[], "realtime"),
    ]
}

fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some(u64::from_str_radix(hi, 16).ok()? << 32 | u64::from_str_radix(lo, 16).ok()?)
}

/// Waits until the agent has captured the log up to the server's current
/// position, sealed it, and the hub acknowledged everything.
fn caught_up(pg: &PgInstance, agent: &AgentProcess, timeout: Duration) -> Result<()> {
    let target = parse_lsn(&pg.sql("SELECT pg_current_wal_lsn()")?).context("bad LSN")?;
    wait_for("the agent and the hub to catch up", timeout, || {
        let s = agent.status()?;
        let at = s["source"]["position"]
            .as_str()
            .and_then(parse_lsn)
            .unwrap_or(0);
        let done = at >= target
            && s["source"]["loads"]
                .as_array()
                .is_some_and(|l| l.is_empty())
            && s["outbox"]["batches"] == 0
            && s["resources"].as_array().is_some_and(|rs| {
                rs.iter()
                    .all(|r| r["head_seq"] == r["acked_seq"] && r["head_seq"].as_u64() > Some(0))
            });
        Ok(done.then_some(()))
    })
}

/// Compares one resource's hub copy with the source table, row by row.
fn same_table(
    sb: &Sandbox,
    pg: &PgInstance,
    code: &str,
    table: &str,
    order: &str,
) -> Result<usize> {
    let source = pg.table_csv(table, order)?;
    let hub = sb.hub.export_csv(&format!("{DEPT}:{code}"))?;
    assert_same_csv(&source, &hub).with_context(|| format!("{code} (table {table})"))?;
    Ok(csv_records(&source).len() - 1)
}

/// A table without a key compared as a multiset: both sides' lines sorted.
fn same_table_unordered(sb: &Sandbox, pg: &PgInstance, code: &str, table: &str) -> Result<usize> {
    let sorted = |csv: String| {
        let mut lines: Vec<String> = csv.lines().map(str::to_string).collect();
        lines.sort();
        lines.join("\n")
    };
    let source = sorted(pg.table_csv(table, "1")?);
    let hub = sorted(sb.hub.export_csv(&format!("{DEPT}:{code}"))?);
    assert_same_csv(&source, &hub).with_context(|| format!("{code} (table {table})"))?;
    Ok(source.lines().count() - 1)
}

fn same_pgbench(sb: &Sandbox, pg: &PgInstance) -> Result<usize> {
    let mut n = same_table(sb, pg, "ACCOUNTS", "pgbench_accounts", "aid")?;
    n += same_table(sb, pg, "BRANCHES", "pgbench_branches", "bid")?;
    n += same_table(sb, pg, "TELLERS", "pgbench_tellers", "tid")?;
    n += same_table_unordered(sb, pg, "HISTORY", "pgbench_history")?;
    Ok(n)
}

fn no_rejections(sb: &Sandbox) -> Result<()> {
    let rejected: Vec<_> = sb
        .hub
        .audit()?
        .into_iter()
        .filter(|a| a["kind"] == "batch_rejected")
        .collect();
    assert!(rejected.is_empty(), "the hub refused batches: {rejected:?}");
    Ok(())
}

/// A source with pgbench tables of `scale`, history shared by whole row.
fn pgbench_source(sb: &Sandbox, scale: u32) -> Result<PgInstance> {
    let pg = sb.postgres("pg")?;
    pg.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
    pg.sql("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")?;
    Ok(pg)
}

#[test]
fn pgbench_run_is_captured_from_the_log() -> Result<()> {
    let _one = serial();
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = pgbench_source(&sb, 2)?;
    let mut agent = sb.pg_agent("agent", DEPT, &pg, &pgbench_resources(), "")?;
    agent.start()?;
    let out = pg.pgbench(&["-T", "20", "-c", "4", "-j", "2", "-n"])?;
    assert!(out.contains("tps = "), "pgbench output: {out}");
    caught_up(&pg, &agent, Duration::from_secs(180))?;
    let history: u64 = pg
        .sql("SELECT count(*) FROM pgbench_history")?
        .trim()
        .parse()?;
    assert!(history > 1000, "pgbench wrote only {history} transactions");
    let rows = same_pgbench(&sb, &pg)?;
    eprintln!("{rows} rows equal after {history} pgbench transactions");
    no_rejections(&sb)?;
    // Zero-update heartbeats carry the log position.
    let status = agent.status()?;
    assert!(
        status["source"]["position"]
            .as_str()
            .and_then(parse_lsn)
            .is_some(),
        "status position is a log position: {status}"
    );
    // The slot's confirmed position followed the outbox: no WAL kept for
    // changes the hub already has (released at most once a second).
    let slot = crate::parse_lsn(&pg.sql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
        shuyuan_tests::pg_slot_name(DEPT)
    ))?)
    .context("slot position")?;
    let captured = status["source"]["position"]
        .as_str()
        .and_then(parse_lsn)
        .unwrap_or(0);
    wait_for("the slot to advance", Duration::from_secs(10), || {
        let now = crate::parse_lsn(&pg.sql(&format!(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
            shuyuan_tests::pg_slot_name(DEPT)
        ))?)
        .unwrap_or(0);
        Ok((now >= captured || now > slot).then_some(()))
    })?;
    agent.stop()?;
    Ok(())
}

#[test]
fn agent_killed_twice_during_pgbench_loses_nothing() -> Result<()> {
    let _one = serial();
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = pgbench_source(&sb, 2)?;
    let mut agent = sb.pg_agent("agent", DEPT, &pg, &pgbench_resources(), "")?;
    agent.start()?;
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
    caught_up(&pg, &agent, Duration::from_secs(180))?;
    let rows = same_pgbench(&sb, &pg)?;
    eprintln!("{rows} rows equal after two SIGKILLs");
    no_rejections(&sb)?;
    // No batch was applied twice: sequence numbers are gap-free and each
    // was applied once.
    for code in ["ACCOUNTS", "HISTORY"] {
        let f = sb
            .hub
            .feed_status(&format!("{DEPT}:{code}"))?
            .context("feed at the hub")?;
        assert_eq!(f["batches_applied"], f["last_seq"], "{code}: {f}");
    }
    Ok(())
}

#[test]
fn initial_load_of_a_million_rows_while_pgbench_writes() -> Result<()> {
    let _one = serial();
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = pgbench_source(&sb, 10)?;
    let mut agent = sb.pg_agent("agent", DEPT, &pg, &pgbench_resources(), "")?;
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
    caught_up(&pg, &agent, Duration::from_secs(600))?;
    eprintln!("loaded and caught up after {:?}", started.elapsed());
    let rows = same_pgbench(&sb, &pg)?;
    assert!(rows >= 1_000_000, "only {rows} rows");
    no_rejections(&sb)?;
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
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = sb.postgres("pg")?;
    pg.sql(
        "CREATE TABLE typed (
            id int PRIMARY KEY,
            i2 smallint, i4 integer, i8 bigint,
            num numeric, num_scaled numeric(20,6),
            r4 real, r8 double precision,
            t text, vc varchar(12), ch char(5),
            b boolean, d date, tm time, ts timestamp, tstz timestamptz,
            by bytea, js json, jsb jsonb, u uuid,
            ia integer[], ta text[], big text
        )",
    )?;
    let rows = [
        // Edge values first; loaded by the initial load.
        "(1, -32768, -2147483648, -9223372036854775808, 0, -0.000001, -3.4e38, -1.7976931348623157e308, '', '', '', false, '0001-01-01', '00:00:00', '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', '', 'null', '{}', '00000000-0000-0000-0000-000000000000', '{}', '{}', '')",
        "(2, 32767, 2147483647, 9223372036854775807, 123456789012345678901234567890.123456789, 99999999999999.999999, 1.17549435e-38, 2.2250738585072014e-308, E'quote \" comma , newline \\n tab \\t 中文', 'ten chars!', 'ab', true, '9999-12-31', '23:59:59.999999', '2026-11-21 08:30:00.123456', '2026-11-21 08:30:00.123456+08', '\\x00ff10', '{\"a\": [1, 2.50, \"x\"]}', '{\"b\": {\"c\": null}, \"a\": 1}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}', '{\"a b\",\"c,d\",NULL}', repeat('large value ', 1000))",
        "(3, NULL, NULL, NULL, 'NaN', NULL, 'NaN', 'Infinity', NULL, NULL, NULL, NULL, 'infinity', '24:00:00', '-infinity', 'infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        "(4, 0, 0, 0, -0.0, 0, '-0', '-Infinity', 'NULL', 'null', 'x', NULL, '2000-02-29', '12:00:00.5', '2000-02-29 12:00:00', '2000-02-29 12:00:00.5-03:30', '\\x', '[]', '[]', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '{-1}', '{\"\"}', 'x')",
    ];
    pg.sql(&format!(
        "INSERT INTO typed VALUES {}",
        rows[..2].join(", ")
    ))?;
    let resources = [ResourceSpec::new("TYPED", "typed", &[], "realtime")];
    let mut agent = sb.pg_agent("agent", DEPT, &pg, &resources, "")?;
    agent.start()?;
    caught_up(&pg, &agent, Duration::from_secs(60))?;
    same_table(&sb, &pg, "TYPED", "typed", "id")?;
    // The same values through the log: inserts, an update that leaves the
    // large (TOASTed) value unchanged, an update of the key.
    pg.sql(&format!(
        "INSERT INTO typed VALUES {}",
        rows[2..].join(", ")
    ))?;
    pg.sql("INSERT INTO typed SELECT id + 100, i2, i4, i8, num, num_scaled, r4, r8, t, vc, ch, b, d, tm, ts, tstz, by, js, jsb, u, ia, ta, big FROM typed")?;
    pg.sql("UPDATE typed SET t = 'changed' WHERE id = 102")?;
    pg.sql("UPDATE typed SET id = 202 WHERE id = 101")?;
    caught_up(&pg, &agent, Duration::from_secs(60))?;
    let n = same_table(&sb, &pg, "TYPED", "typed", "id")?;
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
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = sb.postgres("pg")?;
    pg.sql("CREATE TABLE permit (id int PRIMARY KEY, holder text, issued date)")?;
    pg.sql("INSERT INTO permit SELECT g, 'holder ' || g, date '2026-01-01' + g FROM generate_series(1, 3000) g")?;
    let resources = [ResourceSpec::new("PERMIT", "permit", &[], "realtime")];
    let mut agent = sb.pg_agent("agent", DEPT, &pg, &resources, "")?;
    agent.start()?;
    caught_up(&pg, &agent, Duration::from_secs(60))?;
    pg.sql("UPDATE permit SET holder = 'before' WHERE id <= 10")?;
    pg.sql("ALTER TABLE permit ADD COLUMN status text DEFAULT 'valid'")?;
    pg.sql("UPDATE permit SET status = 'revoked' WHERE id BETWEEN 11 AND 20")?;
    pg.sql("INSERT INTO permit VALUES (5000, 'new', '2026-11-21', 'pending')")?;
    pg.sql("ALTER TABLE permit DROP COLUMN issued")?;
    pg.sql("UPDATE permit SET holder = 'after drop' WHERE id BETWEEN 21 AND 30")?;
    pg.sql("DELETE FROM permit WHERE id BETWEEN 31 AND 40")?;
    caught_up(&pg, &agent, Duration::from_secs(60))?;
    let n = same_table(&sb, &pg, "PERMIT", "permit", "id")?;
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
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = sb.postgres("pg")?;
    pg.sql("CREATE TABLE licence (id int PRIMARY KEY, holder text)")?;
    pg.sql("INSERT INTO licence SELECT g, 'holder ' || g FROM generate_series(1, 5000) g")?;
    let resources = [ResourceSpec::new("LICENCE", "licence", &[], "realtime")];
    let mut agent = sb.pg_agent("agent", DEPT, &pg, &resources, "")?;
    agent.start()?;
    caught_up(&pg, &agent, Duration::from_secs(60))?;
    agent.stop()?;
    // While the agent is stopped: the slot is dropped, and rows change,
    // are deleted and added where no log will ever show it to the agent.
    pg.sql(&format!(
        "SELECT pg_drop_replication_slot('{}')",
        shuyuan_tests::pg_slot_name(DEPT)
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
    caught_up(&pg, &agent, Duration::from_secs(60))?;
    let n = same_table(&sb, &pg, "LICENCE", "licence", "id")?;
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
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = sb.postgres("pg")?;
    pg.sql("CREATE TABLE nokey (a int, b text)")?;
    let resources = [ResourceSpec::new("NOKEY", "nokey", &[], "realtime")];
    let agent = sb.pg_agent("agent", DEPT, &pg, &resources, "");
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
    let resources = [ResourceSpec::new("SEAL", "seal", &[], "realtime")];
    let mut agent = sb.pg_agent("agent2", "PG-2", &pg, &resources, "")?;
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
    let err = agent.resync("NOPE").unwrap_err();
    assert!(format!("{err:#}").contains("no resource NOPE"), "{err:#}");
    Ok(())
}
