//! Zero-updates (零更新): a quiet resource reports, within its cycle, a
//! signed "no changes from T0 to T1" entry that the hub verifies and shows.

use std::time::Duration;

use anyhow::Result;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{AgentSpec, Nodes, ResourceSpec, Topology, wait_for};

#[test]
fn an_idle_resource_reports_verified_zero_updates_within_its_cycle() -> Result<()> {
    let Nodes(sb, [], [mut agent]) = Topology::new()
        .agent(
            AgentSpec::sqlite("zr", "ZR", &[data::PARCEL_DDL, data::PERMIT_DDL]).resources(vec![
                ResourceSpec::land_parcel("realtime"),
                ResourceSpec::new("B02/0009", "planning_permit", &["permit_no"], "3s"),
            ]),
        )
        .start()?;
    let conn = agent.database()?;
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut rng = Rng::new(5);
        for _ in 0..80 {
            data::churn_one(&conn, "land_parcel", &mut rng)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    });

    let cycle_ms = 3000;
    let quiet = "ZR:B02/0009";
    let first = wait_for("a zero-update at the hub", Duration::from_secs(20), || {
        Ok(sb
            .hub
            .feed_status(quiet)?
            .filter(|f| !f["last_zero_update"].is_null()))
    })?;
    let z = &first["last_zero_update"];
    let (since, until, received) = (
        z["since"].as_i64().unwrap(),
        z["until"].as_i64().unwrap(),
        z["received_at"].as_i64().unwrap(),
    );
    // The schema is batch 1; the first quiet cycle ends in batch 2.
    assert_eq!(z["seq"], 2, "{first}");
    assert!(
        until - since >= cycle_ms,
        "a zero-update covers a whole cycle: {z}"
    );
    assert!(
        until - since <= cycle_ms + 1500,
        "and is sent as soon as the cycle passes: {z}"
    );
    assert!(
        received - since <= cycle_ms + 2500,
        "the hub has it within the cycle (plus transit): {z}"
    );
    assert!(
        z["source_position"]
            .as_str()
            .is_some_and(|p| p.parse::<u64>().is_ok()),
        "{z}"
    );
    assert_eq!(
        first["signer"],
        agent.key.as_str(),
        "verified against the agent's key"
    );
    assert_eq!(first["rows"], 0);

    // The next one starts where the last ended: the periods tile time.
    let second = wait_for("the next zero-update", Duration::from_secs(20), || {
        Ok(sb
            .hub
            .feed_status(quiet)?
            .filter(|f| f["last_zero_update"]["seq"] == 3))
    })?;
    assert_eq!(second["last_zero_update"]["since"], z["until"], "{second}");

    // The busy resource changed within its cycle: no zero-update for it.
    let busy = sb.hub.feed_status("ZR:B02/0007")?.expect("busy feed");
    assert!(busy["last_zero_update"].is_null(), "{busy}");
    assert!(busy["rows"].as_u64() > Some(0));

    let text = sb.hub.status_text()?;
    assert!(text.contains("last zero-update (零更新) #"), "{text}");
    let agent_status = agent.status()?;
    assert!(agent_status["resources"][1]["next_zero_update_due"].as_i64() > Some(until));

    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    agent.stop()?;
    Ok(())
}
