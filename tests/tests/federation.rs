//! Federation (级联): district hubs forward their departments' signed feeds
//! and catalogs to a city hub, and the city to a province hub. Every level
//! verifies the departments' own signatures and chains; a middle hub that
//! alters a batch is caught at the top; hubs restart mid-stream; a resource
//! that is not shared (不予共享) stays where it entered.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redb::{ReadableDatabase, TableDefinition};
use serde_json::Value as Json;
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::{BatchBody, Entry, SignedBatch, Value};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{
    AgentProcess, HubProcess, ResourceSpec, Sandbox, assert_same_rows, immediate, source_rows,
    wait_for,
};

const HOUSEHOLD: &str = "101001/00001";
const LICENCE: &str = "101002/00001";
const SHARED: &str = "share_types = [\"unconditional\", \"conditional\"]\n";

fn resources() -> Vec<ResourceSpec> {
    vec![
        ResourceSpec::new(HOUSEHOLD, "household", &["id_number"], "realtime"),
        ResourceSpec::new(LICENCE, "business_licence", &["credit_code"], "daily"),
    ]
}

/// A department under `hub` with both tables, `rows` of each, and its
/// catalog entries' share types set (household conditional, licence as
/// `licence_share`).
fn department(
    sb: &Sandbox,
    hub: &HubProcess,
    name: &str,
    code: &str,
    rows: usize,
    licence_share: &str,
    seed: u64,
) -> Result<(AgentProcess, rusqlite::Connection)> {
    let (db, conn) = sb.database(
        &format!("{name}.db"),
        &[data::HOUSEHOLD_DDL, data::LICENCE_DDL],
    )?;
    let mut rng = Rng::new(seed);
    for _ in 0..rows {
        data::insert_household(&conn, &mut rng)?;
        data::insert_licence(&conn, &mut rng)?;
    }
    let agent = sb.agent_at(
        hub,
        name,
        code,
        &db,
        &resources(),
        "batch_max_changes = 100",
    )?;
    agent.catalog(&["set", HOUSEHOLD, "share_type", "有条件共享"])?;
    agent.catalog(&["set", LICENCE, "share_type", licence_share])?;
    Ok((agent, conn))
}

/// Writes a mix of inserts, updates and deletes to both tables.
fn churn(conn: &rusqlite::Connection, rng: &mut Rng, n: usize) -> Result<()> {
    let tx = immediate(conn)?;
    for _ in 0..n {
        data::churn_one(&tx, "household", rng)?;
        data::churn_one(&tx, "business_licence", rng)?;
    }
    tx.commit()?;
    Ok(())
}

fn feed_seq(hub: &HubProcess, feed: &str) -> Result<u64> {
    Ok(hub
        .feed_status(feed)?
        .and_then(|f| f["last_seq"].as_u64())
        .unwrap_or(0))
}

/// Waits until `hub` holds every batch the agent sealed of `resource`
/// (after the agent drained), then compares the rows with the source.
fn assert_reached(
    hub: &HubProcess,
    agent: &AgentProcess,
    resource: &ResourceSpec,
    timeout: Duration,
) -> Result<usize> {
    let feed = format!("{}:{}", agent.department, resource.code);
    let status = agent.wait_drained(timeout)?;
    let head = status["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["code"] == resource.code.as_str()))
        .and_then(|r| r["head_seq"].as_u64())
        .context("the agent's head")?;
    wait_for(
        &format!("{feed} to reach {} at #{head}", hub.dir.display()),
        timeout,
        || Ok((feed_seq(hub, &feed)? >= head).then_some(())),
    )?;
    let source = source_rows(&agent.db, &resource.table, &resource.key)?;
    let copy = hub.export_jsonl(&feed)?;
    assert_same_rows(&source, &copy).with_context(|| format!("{feed} at {}", hub.dir.display()))?;
    Ok(source.len())
}

fn catalog_entry(hub: &HubProcess, department: &str, code: &str) -> Result<Option<Json>> {
    Ok(hub
        .catalog_list()?
        .into_iter()
        .find(|e| e["department"] == department && e["entry"]["code"] == code))
}

fn no_rejections(hub: &HubProcess) -> Result<()> {
    let refused: Vec<Json> = hub
        .audit()?
        .into_iter()
        .filter(|a| a["kind"] == "batch_rejected" || a["kind"] == "connection_refused")
        .collect();
    if !refused.is_empty() {
        bail!("{} refused: {refused:?}", hub.dir.display());
    }
    Ok(())
}

#[test]
fn three_levels_carry_every_department_to_the_top() -> Result<()> {
    let mut sb = Sandbox::new()?;
    sb.hub.rename("province")?;
    let mut city = sb.extra_hub("city")?;
    let mut d1 = sb.extra_hub("district-a")?;
    let mut d2 = sb.extra_hub("district-b")?;
    sb.hub.enroll_hub("330000", "city", &city.key)?;
    city.set_upstream(&sb.hub, SHARED)?;
    for (d, code) in [(&d1, "330902"), (&d2, "330903")] {
        city.enroll_hub(code, "district", &d.key)?;
        d.set_upstream(&city, SHARED)?;
    }
    let mut departments = Vec::new();
    for (i, (hub, code)) in [(&d1, "GA-A"), (&d1, "SC-A"), (&d2, "GA-B"), (&d2, "SC-B")]
        .into_iter()
        .enumerate()
    {
        let name = format!("dept{i}");
        departments.push(department(
            &sb,
            hub,
            &name,
            code,
            200,
            "无条件共享",
            i as u64,
        )?);
    }
    for h in [&mut sb.hub, &mut city, &mut d1, &mut d2] {
        h.start()?;
    }
    for (agent, _) in &mut departments {
        agent.start()?;
    }
    let mut rng = Rng::new(99);
    for _ in 0..5 {
        for (_, conn) in &departments {
            churn(conn, &mut rng, 40)?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let timeout = Duration::from_secs(120);
    let mut compared = 0;
    for (agent, _) in &departments {
        let district = if agent.department.ends_with('A') {
            &d1
        } else {
            &d2
        };
        for r in resources() {
            for hub in [district, &city, &sb.hub] {
                compared += assert_reached(hub, agent, &r, timeout)?;
            }
        }
    }
    assert!(compared > 4 * 2 * 3 * 150, "only {compared} rows compared");

    // The top knows the tree: the city, the districts below it, and the
    // departments below them, with each level's head of each feed.
    let status = wait_for("the top to see the whole tree", timeout, || {
        let s = sb.hub.status()?;
        let tree = &s["children"][0]["tree"];
        Ok((tree["children"].as_array().map(Vec::len) == Some(2)).then_some(s))
    })?;
    let child = &status["children"][0];
    assert_eq!(child["key"], city.key.as_str());
    assert_eq!(child["connected"], true);
    let carried: Vec<&str> = child["departments"]
        .as_array()
        .context("departments")?
        .iter()
        .filter_map(Json::as_str)
        .collect();
    assert_eq!(carried, ["GA-A", "GA-B", "SC-A", "SC-B"]);
    let text = sb.hub.status_text()?;
    for words in [
        "child hubs",
        "district-a",
        "district-b",
        "GA-B:101001/00001",
    ] {
        assert!(text.contains(words), "{words:?} missing from:\n{text}");
    }
    // Agents below the city are registrations, never direct connections.
    let ga_a = status["departments"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["code"] == "GA-A"))
        .context("GA-A at the top")?;
    assert_eq!(ga_a["agents"][0]["connected"], false);
    assert_eq!(ga_a["agents"][0]["via"], city.key.as_str());

    // Catalogs merged at every level.
    for hub in [&d1, &city, &sb.hub] {
        wait_for("the catalog entries at every level", timeout, || {
            Ok(catalog_entry(hub, "GA-A", HOUSEHOLD)?
                .filter(|e| e["entry"]["share_type"] == "conditional")
                .map(|_| ()))
        })?;
    }
    for (agent, _) in &departments {
        for hub in [&city, &sb.hub] {
            wait_for(
                &format!("{}'s entries at {}", agent.department, hub.dir.display()),
                timeout,
                || {
                    Ok(catalog_entry(hub, &agent.department, LICENCE)?
                        .filter(|e| e["entry"]["share_type"] == "unconditional")
                        .map(|_| ()))
                },
            )?;
        }
    }
    for h in [&sb.hub, &city, &d1, &d2] {
        no_rejections(h)?;
    }
    Ok(())
}
