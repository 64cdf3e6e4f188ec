//! Clock faults: agents whose clocks are hours off keep healthy feeds
//! fresh, because freshness goes by the hub's clock, and the hub flags each
//! skew in status, metrics and the audit log. The clocks are faked by
//! libfaketime (Debian package `faketime`, installed by `.ci/run`), not by
//! anything in the agent.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{AgentSpec, Nodes, ResourceSpec, Topology, assert_in_sync, wait_for};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// An agent of `department` whose wall clock is `offset` off (libfaketime
/// syntax, e.g. `-3h`); its timers keep the real monotonic clock.
fn skewed_agent(name: &str, department: &str, offset: &str) -> AgentSpec<'static> {
    AgentSpec::sqlite(name, department, &[data::HOUSEHOLD_DDL])
        .resources(vec![
            ResourceSpec::new("A01/0001", "household", &["id_number"], "3s").heartbeat("1s"),
        ])
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
}

#[test]
fn agent_clocks_hours_off_are_flagged_and_their_feeds_stay_fresh() -> Result<()> {
    ensure!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install the Debian package faketime (.ci/run does)"
    );
    let Nodes(sb, [], [mut behind, mut ahead]) = Topology::new()
        .hub_config("[freshness]\ngrace = \"1s\"\n")
        .agent(skewed_agent("ga", "GA", "-3h"))
        .agent(skewed_agent("mz", "MZ", "+5h"))
        .start()?;
    let (ga_db, mz_db) = (behind.database()?, ahead.database()?);
    let mut rng = Rng::new(4);
    for _ in 0..20 {
        data::insert_household(&ga_db, &mut rng)?;
        data::insert_household(&mz_db, &mut rng)?;
    }
    // `wait_drained` compares the agent's clock with the test's; wait at
    // the hub instead.
    for feed in ["GA:A01/0001", "MZ:A01/0001"] {
        wait_for(
            &format!("{feed} at the hub"),
            Duration::from_secs(60),
            || {
                let rows = sb.hub.feed_status(feed)?.and_then(|f| f["rows"].as_u64());
                Ok((rows == Some(20)).then_some(()))
            },
        )?;
    }
    assert_in_sync(&sb.hub, &behind)?;
    assert_in_sync(&sb.hub, &ahead)?;

    // The hub measures each skew from the agents' reports.
    let skews = wait_for("both skews measured", Duration::from_secs(30), || {
        let status = sb.hub.status()?;
        let skew = |key: &str| {
            status["departments"].as_array().and_then(|ds| {
                ds.iter()
                    .flat_map(|d| d["agents"].as_array().into_iter().flatten())
                    .find(|a| a["key"] == key)
                    .and_then(|a| a["clock_skew_ms"].as_i64())
            })
        };
        Ok(skew(&behind.key).zip(skew(&ahead.key)))
    })?;
    let near = |ms: i64, hours: i64| (ms - hours * 3_600_000).abs() < 120_000;
    ensure!(near(skews.0, -3) && near(skews.1, 5), "{skews:?}");

    // Over several update cycles, both feeds stay fresh by the hub's
    // clock, and zero-updates (零更新) arrive while nothing changes.
    let mut seen = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        for feed in ["GA:A01/0001", "MZ:A01/0001"] {
            let f = sb.hub.feed_status(feed)?.context("the feed")?;
            let verdict = f["freshness"].as_str().unwrap_or_default().to_string();
            ensure!(
                verdict == "on_time" || verdict == "zero_updated",
                "{feed} judged {verdict} although its agent is healthy: {f}"
            );
            seen.insert((feed, verdict));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for feed in ["GA:A01/0001", "MZ:A01/0001"] {
        ensure!(
            seen.contains(&(feed, "zero_updated".to_string())),
            "{feed} never zero-updated: {seen:?}"
        );
    }

    // Flagged: once per connection in the audit log, in status and metrics.
    let audit = sb.hub.audit()?;
    for (key, word) in [(&behind.key, "behind"), (&ahead.key, "ahead of")] {
        let flagged: Vec<_> = audit
            .iter()
            .filter(|a| a["kind"] == "clock_skew" && a["peer"] == key.as_str())
            .collect();
        assert_eq!(flagged.len(), 1, "{audit:?}");
        let detail = flagged[0]["detail"].as_str().unwrap_or_default();
        ensure!(detail.contains(word), "{detail}");
    }
    let text = sb.hub.status_text()?;
    ensure!(
        text.contains("CLOCK its clock is") && text.contains("behind the hub's"),
        "{text}"
    );
    let metrics = sb.hub.admin_get("/metrics")?;
    let sample = |key: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("shuyuan_agent_clock_skew_seconds{") && l.contains(key))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let (b, a) = (sample(&behind.key), sample(&ahead.key));
    ensure!(
        b.is_some_and(|s| (s + 10_800.0).abs() < 120.0)
            && a.is_some_and(|s| (s - 18_000.0).abs() < 120.0),
        "{b:?} {a:?}"
    );
    behind.stop()?;
    ahead.stop()?;
    Ok(())
}
