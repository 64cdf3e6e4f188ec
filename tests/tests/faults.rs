//! Faults: the agent killed mid-stream, the hub down for a while, the
//! outbox full. Each time, nothing is lost, duplicated or skipped.

use std::time::Duration;

use anyhow::Result;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{
    AgentSpec, Nodes, ResourceSpec, Topology, assert_in_sync, immediate, wait_for,
};

#[test]
fn agent_killed_mid_stream_loses_and_repeats_nothing() -> Result<()> {
    let Nodes(sb, [], [mut agent]) = Topology::new()
        // Small batches, so that the stream is long enough to interrupt.
        .agent(AgentSpec::household("ga", "GA").outbox("batch_max_changes = 20"))
        .start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(11);
    let total = 8000;
    let tx = immediate(&conn)?;
    for _ in 0..total {
        data::insert_household(&tx, &mut rng)?;
    }
    tx.commit()?;
    let at_kill = wait_for(
        "the hub to be part-way through",
        Duration::from_secs(60),
        || {
            let rows = sb
                .hub
                .feed_status("GA:A01/0001")?
                .and_then(|f| f["rows"].as_u64())
                .unwrap_or(0);
            Ok((rows > 0).then_some(rows))
        },
    )?;
    agent.kill()?;
    let after_kill = sb.hub.feed_status("GA:A01/0001")?.unwrap()["rows"]
        .as_u64()
        .unwrap();
    assert!(
        after_kill < total as u64,
        "the agent was killed after everything arrived ({at_kill} rows), so the test proved nothing"
    );

    // The department keeps working while its agent is down.
    let tx = immediate(&conn)?;
    for _ in 0..500 {
        data::churn_one(&tx, "household", &mut rng)?;
    }
    tx.commit()?;
    agent.start()?;
    for _ in 0..500 {
        data::churn_one(&conn, "household", &mut rng)?;
    }
    agent.wait_drained(Duration::from_secs(180))?;
    let rows = assert_in_sync(&sb.hub, &agent)?;
    assert!(rows >= total, "{rows} rows");
    sb.hub.assert_applied_once("GA:A01/0001")?;
    sb.assert_no_rejections()?;
    Ok(())
}

#[test]
fn hub_down_for_a_while_agent_buffers_and_catches_up() -> Result<()> {
    let resources = vec![
        ResourceSpec::household(),
        ResourceSpec::land_parcel("daily"),
    ];
    let Nodes(mut sb, [], [agent]) = Topology::new()
        .agent(
            AgentSpec::sqlite("zr", "ZR", &[data::HOUSEHOLD_DDL, data::PARCEL_DDL])
                .resources(resources),
        )
        .start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(12);
    for _ in 0..300 {
        data::churn_one(&conn, "household", &mut rng)?;
    }
    agent.wait_drained(Duration::from_secs(60))?;
    sb.hub.stop()?;

    let tx = immediate(&conn)?;
    for _ in 0..3000 {
        data::churn_one(&tx, "household", &mut rng)?;
        data::churn_one(&tx, "land_parcel", &mut rng)?;
    }
    tx.commit()?;
    // Everything is sealed into the outbox and waits there.
    let buffered = wait_for(
        "the agent to buffer the changes",
        Duration::from_secs(60),
        || {
            let s = agent.status()?;
            let sealed = s["source"]["backlog"] == 0 && s["outbox"]["batches"].as_u64() > Some(0);
            Ok((sealed && s["hub"]["link"] != "connected").then_some(s))
        },
    )?;
    assert!(
        buffered["hub"]["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{buffered}"
    );

    std::thread::sleep(Duration::from_secs(2));
    sb.hub.start()?;
    agent.wait_drained(Duration::from_secs(120))?;
    assert_in_sync(&sb.hub, &agent)?;
    sb.hub.assert_applied_once("ZR:A01/0001")?;
    sb.hub.assert_applied_once("ZR:B02/0007")?;
    sb.assert_no_rejections()?;
    Ok(())
}

#[test]
fn full_outbox_pauses_capture_without_losing_changes() -> Result<()> {
    let Nodes(mut sb, [], [mut agent]) = Topology::new()
        .agent(
            AgentSpec::household("ga", "GA")
                .outbox("max_size = \"64 KiB\"\nbatch_max_size = \"8 KiB\""),
        )
        .build()?;
    // The hub is enrolled but not running: nothing is acknowledged.
    agent.start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(13);
    let tx = immediate(&conn)?;
    for _ in 0..3000 {
        data::insert_household(&tx, &mut rng)?;
    }
    tx.commit()?;
    let paused = wait_for(
        "capture to pause on the full outbox",
        Duration::from_secs(60),
        || {
            let s = agent.status()?;
            Ok((s["source"]["paused_outbox_full"] == true).then_some(s))
        },
    )?;
    let bytes = paused["outbox"]["bytes"].as_u64().unwrap();
    assert!(
        (64 * 1024..=96 * 1024).contains(&bytes),
        "the outbox stops near its limit: {paused}"
    );
    assert!(
        paused["source"]["backlog"].as_u64() > Some(0),
        "changes wait in the source: {paused}"
    );
    let text = agent.status_text()?;
    assert!(text.contains("CAPTURE PAUSED"), "{text}");

    sb.hub.start()?;
    let s = agent.wait_drained(Duration::from_secs(120))?;
    assert_eq!(s["source"]["paused_outbox_full"], false);
    assert_in_sync(&sb.hub, &agent)?;
    sb.hub.assert_applied_once("GA:A01/0001")?;
    sb.assert_no_rejections()?;
    Ok(())
}
