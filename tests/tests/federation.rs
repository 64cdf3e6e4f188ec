//! Federation (级联): district hubs forward their departments' signed feeds
//! and catalogs to a city hub, and the city to a province hub. Every level
//! verifies the departments' own signatures and chains; a middle hub that
//! alters a batch is caught at the top; hubs restart mid-stream; a resource
//! that is not shared (不予共享) stays where it entered.

use std::time::Duration;

use anyhow::{Context, Result};
use redb::{ReadableTable, TableDefinition};
use serde_json::Value as Json;
use shuyuan_protocol::batch::BatchHash;
use shuyuan_protocol::encoding::{decode, encode};
use shuyuan_protocol::federation::{Registered, Registration, RegistrationBody};
use shuyuan_protocol::{
    BatchBody, Entry, MessageV1, NodeKey, RejectReason, SignedBatch, UnixMillis, Value,
};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::peer::{FeedPeer, batch, expect_ack, expect_reject};
use shuyuan_tests::{
    AgentProcess, AgentSpec, HubProcess, HubSpec, Nodes, ResourceSpec, Sandbox, Topology,
    assert_same_rows, immediate, source_rows, wait_for,
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

/// A department with both tables, `rows` of each written before its agent
/// is installed, and its catalog entries' share types set (household
/// conditional, licence as `licence_share`). Reports to the sandbox's hub
/// unless placed [`AgentSpec::at`] another.
fn department(
    name: &str,
    code: &str,
    rows: usize,
    licence_share: &str,
    seed: u64,
) -> AgentSpec<'static> {
    AgentSpec::sqlite(name, code, &[data::HOUSEHOLD_DDL, data::LICENCE_DDL])
        .resources(resources())
        .seed(move |conn| {
            let mut rng = Rng::new(seed);
            for _ in 0..rows {
                data::insert_household(conn, &mut rng)?;
                data::insert_licence(conn, &mut rng)?;
            }
            Ok(())
        })
        .outbox("batch_max_changes = 100")
        .catalog_set(HOUSEHOLD, "share_type", "有条件共享")
        .catalog_set(LICENCE, "share_type", licence_share)
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
        || Ok((hub.feed_seq(&feed)? >= head).then_some(())),
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

#[test]
fn three_levels_carry_every_department_to_the_top() -> Result<()> {
    let Nodes(sb, [city, d1, d2], agents) = Topology::new()
        .hub_name("province")
        .hub(HubSpec::child("city", "330000").share(SHARED))
        .hub(
            HubSpec::child("district-a", "330902")
                .under("city")
                .enrolled_as("district")
                .share(SHARED),
        )
        .hub(
            HubSpec::child("district-b", "330903")
                .under("city")
                .enrolled_as("district")
                .share(SHARED),
        )
        .agent(department("dept0", "GA-A", 200, "无条件共享", 0).at("district-a"))
        .agent(department("dept1", "SC-A", 200, "无条件共享", 1).at("district-a"))
        .agent(department("dept2", "GA-B", 200, "无条件共享", 2).at("district-b"))
        .agent(department("dept3", "SC-B", 200, "无条件共享", 3).at("district-b"))
        .start::<3, 4>()?;
    let mut departments = Vec::new();
    for agent in agents {
        let conn = agent.database()?;
        departments.push((agent, conn));
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
        h.assert_nothing_refused()?;
    }
    Ok(())
}

const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("batches_v1");

/// Changes one row value inside batch `seq` of `feed` in a stopped hub's
/// store, keeping the department's signature: what a middle hub that
/// "corrects" data before forwarding would do. Returns the altered value.
fn alter_stored_batch(hub: &HubProcess, feed: &str, seq: u64) -> Result<String> {
    let db = redb::Database::open(hub.dir.join("data").join("hub.redb"))?;
    let tx = db.begin_write()?;
    let altered;
    {
        let mut table = tx.open_table(BATCHES)?;
        let mut signed: SignedBatch = decode(
            table
                .get((feed, seq))?
                .with_context(|| format!("batch {seq} of {feed}"))?
                .value(),
        )?;
        let mut body: BatchBody = decode(&signed.body)?;
        let row = body
            .entries
            .iter_mut()
            .find_map(|e| match e {
                Entry::Change(c) => c.row.as_mut(),
                _ => None,
            })
            .context("a row change in the batch")?;
        let text = row
            .iter_mut()
            .find(|v| matches!(v, Value::Text(_)))
            .context("a text value")?;
        altered = format!("{text:?}");
        *text = Value::Text("由中间平台修改".into());
        signed.body = encode(&body)?;
        table.insert((feed, seq), encode(&signed)?.as_slice())?;
    }
    tx.commit()?;
    Ok(altered)
}

#[test]
fn a_middle_hub_that_alters_a_batch_is_caught_at_the_top() -> Result<()> {
    let Nodes(mut sb, [mut middle], [mut agent]) = Topology::new()
        .hub(HubSpec::new("middle"))
        .agent(department("dept", "GA-M", 0, "无条件共享", 1).at("middle"))
        .build()?;
    let conn = agent.database()?;
    // The middle hub first runs on its own: the department's batches are
    // verified and stored there.
    middle.start()?;
    agent.start()?;
    let mut rng = Rng::new(5);
    for _ in 0..8 {
        let tx = immediate(&conn)?;
        for _ in 0..30 {
            data::insert_household(&tx, &mut rng)?;
        }
        tx.commit()?;
        agent.wait_drained(Duration::from_secs(60))?;
    }
    let feed = format!("GA-M:{HOUSEHOLD}");
    let head = middle.feed_seq(&feed)?;
    assert!(head >= 8, "only {head} batches");
    agent.stop()?;
    middle.stop()?;
    // Then someone at the middle alters batch 5 and links it upward.
    let before = alter_stored_batch(&middle, &feed, 5)?;
    assert!(!before.is_empty());
    sb.hub.enroll_hub("330900", "middle", &middle.key)?;
    middle.set_upstream(&sb.hub, SHARED)?;
    sb.hub.start()?;
    middle.start()?;
    let timeout = Duration::from_secs(60);
    let refusal =
        wait_for("the top to refuse the altered batch", timeout, || {
            Ok(sb.hub.audit()?.into_iter().find(|a| {
                a["kind"] == "batch_rejected" && a["feed"] == feed.as_str() && a["seq"] == 5
            }))
        })?;
    assert_eq!(refusal["reason"], 2, "bad signature: {refusal}");
    let detail = refusal["detail"].as_str().unwrap_or_default();
    for words in [
        "batch 5 of GA-M:101001/00001",
        "GA-M",
        &middle.key,
        "altered",
    ] {
        assert!(detail.contains(words), "{words:?} missing from {detail:?}");
    }
    // The top keeps what came before, and nothing after the gap.
    let top = sb.hub.feed_status(&feed)?.context("the feed at the top")?;
    assert_eq!(top["last_seq"], 4, "{top}");
    assert_eq!(top["last_rejection"]["seq"], 5, "{top}");
    let rows = sb.hub.export_jsonl(&feed)?;
    assert!(
        rows.iter()
            .all(|r| r.to_string().find("由中间平台修改").is_none()),
        "the altered row reached the top"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sb.hub.feed_seq(&feed)?, 4, "still refused on resend");
    // The console raises the feed's state to "rejected" (which alerts).
    let view: Json =
        serde_json::from_str(&sb.hub.admin_get("/api/v1/resources/GA-M/101001%2F00001")?)?;
    assert_eq!(view["row"]["state"], "rejected", "{view}");
    // The middle hub sees its refusal too.
    let up = middle.status()?;
    assert!(up["upstream"]["rejections"].as_u64() > Some(0), "{up}");
    let text = sb.hub.status_text()?;
    assert!(text.contains("REJECTED"), "{text}");
    Ok(())
}

#[test]
fn parent_and_child_restart_mid_stream_and_nothing_is_lost_or_doubled() -> Result<()> {
    let Nodes(mut sb, [mut middle], [mut agent]) = Topology::new()
        .hub(HubSpec::child("middle", "330900").share(SHARED))
        .agent(department("dept", "GA-R", 100, "无条件共享", 3).at("middle"))
        .start()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let db = agent.db.clone();
        std::thread::spawn(move || -> Result<u64> {
            let conn = rusqlite::Connection::open(&db)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            let mut rng = Rng::new(11);
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                churn(&conn, &mut rng, 10)?;
                rounds += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(rounds)
        })
    };
    let feed = format!("GA-R:{HOUSEHOLD}");
    let moving = |hub: &HubProcess, above: u64| {
        wait_for("the feed to move on", Duration::from_secs(60), || {
            let s = hub.feed_seq(&feed)?;
            Ok((s > above).then_some(s))
        })
    };
    let s = moving(&sb.hub, 5)?;
    // The parent dies mid-stream and comes back.
    sb.hub.kill()?;
    std::thread::sleep(Duration::from_millis(700));
    sb.hub.start()?;
    let s = moving(&sb.hub, s + 5)?;
    // The child dies mid-stream (its departments buffer) and comes back.
    middle.kill()?;
    std::thread::sleep(Duration::from_millis(700));
    middle.start()?;
    moving(&sb.hub, s + 5)?;
    // Both at once, in the other order.
    middle.stop()?;
    sb.hub.stop()?;
    std::thread::sleep(Duration::from_millis(300));
    sb.hub.start()?;
    middle.start()?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    assert!(rounds > 20, "only {rounds} rounds of writes");
    let timeout = Duration::from_secs(120);
    for r in resources() {
        for hub in [&middle, &sb.hub] {
            assert_reached(hub, &agent, &r, timeout)?;
        }
        // Every batch applied once at the top: as many as the feed is long.
        let top = sb
            .hub
            .feed_status(&format!("GA-R:{}", r.code))?
            .context("feed at the top")?;
        assert_eq!(top["batches_applied"], top["last_seq"], "{top}");
    }
    sb.hub.assert_nothing_refused()?;
    // Comparisons with the source run where the agent connects.
    let err = sb.hub.start_verify(&feed).unwrap_err().to_string();
    assert!(err.contains("served below child hub"), "{err}");
    assert!(middle.start_verify(&feed).is_ok());
    agent.stop()?;
    Ok(())
}

/// A department that rotates its key (密钥轮换) at its county hub: the county
/// registers the successor upward, so the city keeps verifying the same
/// chain, now signed by the new key, and refuses nothing.
#[test]
fn a_key_rotated_below_keeps_the_chain_verified_at_the_top() -> Result<()> {
    let Nodes(sb, [middle], [mut agent]) = Topology::new()
        .hub(HubSpec::child("middle", "330900").share(SHARED))
        .agent(department("dept", "GA-K", 50, "无条件共享", 5).at("middle"))
        .start()?;
    let conn = agent.database()?;
    let timeout = Duration::from_secs(120);
    let household = &resources()[0];
    assert_reached(&sb.hub, &agent, household, timeout)?;
    let old_key = agent.key.clone();

    let out = agent.rotate_key()?;
    let new_key = out
        .split_whitespace()
        .nth(2)
        .map(str::to_string)
        .unwrap_or_default();
    assert!(new_key.len() == 52 && new_key != old_key, "{out}");
    // The agent announces the rotation when it next connects.
    agent.stop()?;
    agent.start()?;
    let mut rng = Rng::new(6);
    churn(&conn, &mut rng, 40)?;
    wait_for("the agent on its new key", timeout, || {
        let s = agent.status()?;
        Ok((s["node"] == new_key.as_str()).then_some(()))
    })?;
    churn(&conn, &mut rng, 40)?;
    for r in resources() {
        for hub in [&middle, &sb.hub] {
            assert_reached(hub, &agent, &r, timeout)?;
        }
        let top = sb
            .hub
            .feed_status(&format!("GA-K:{}", r.code))?
            .context("feed at the top")?;
        assert_eq!(top["batches_applied"], top["last_seq"], "{top}");
    }
    let top = sb
        .hub
        .feed_status(&format!("GA-K:{HOUSEHOLD}"))?
        .context("feed at the top")?;
    assert_eq!(top["signer"], new_key.as_str(), "{top}");
    sb.hub.assert_nothing_refused()?;
    middle.assert_nothing_refused()?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_resource_that_is_not_shared_stays_but_its_catalog_entry_goes_up() -> Result<()> {
    let Nodes(sb, [county], [agent]) = Topology::new()
        .hub(HubSpec::child("county", "330902").share(SHARED))
        .agent(department("dept", "GA-N", 50, "不予共享", 4).at("county"))
        .start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(8);
    churn(&conn, &mut rng, 30)?;
    let timeout = Duration::from_secs(60);
    let [household, licence] =
        <[ResourceSpec; 2]>::try_from(resources()).map_err(|_| anyhow::anyhow!("two resources"))?;
    // The shared table reaches the top; the other one only the county.
    assert_reached(&sb.hub, &agent, &household, timeout)?;
    assert_reached(&county, &agent, &licence, timeout)?;
    let secret = format!("GA-N:{LICENCE}");
    assert_eq!(sb.hub.feed_status(&secret)?, None, "the top holds {secret}");
    assert!(
        sb.hub.export_jsonl(&secret).is_err(),
        "the top exports {secret}"
    );
    // Its catalog entry does go up, saying why.
    let entry = wait_for("the not-shared entry at the top", timeout, || {
        catalog_entry(&sb.hub, "GA-N", LICENCE)
    })?;
    assert_eq!(entry["entry"]["share_type"], "not-shared");
    let up = county.status()?;
    let held = up["upstream"]["feeds"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["feed"] == secret.as_str()).cloned())
        .context("the county's forwarding state")?;
    assert!(
        held["held"]
            .as_str()
            .is_some_and(|h| h.contains("不予共享")),
        "{held}"
    );
    // Later changes of it stay too, while the shared table moves on.
    churn(&conn, &mut rng, 30)?;
    assert_reached(&sb.hub, &agent, &household, timeout)?;
    assert_reached(&county, &agent, &licence, timeout)?;
    assert_eq!(sb.hub.feed_status(&secret)?, None);
    Ok(())
}

#[test]
fn hubs_that_would_form_a_loop_are_refused() -> Result<()> {
    // Each enrolls the other as its child and names it as its parent.
    let Nodes(mut sb, [mut other], []) = Topology::new()
        .hub(HubSpec::child("other", "A").share(SHARED))
        .build()?;
    other.enroll_hub("B", "first", &sb.hub.key)?;
    sb.hub.set_upstream(&other, SHARED)?;
    sb.hub.start()?;
    other.start()?;
    for hub in [&sb.hub, &other] {
        let refusal = wait_for("a loop refusal", Duration::from_secs(30), || {
            Ok(hub.audit()?.into_iter().find(|a| {
                a["kind"] == "connection_refused"
                    && a["detail"].as_str().is_some_and(|d| d.contains("loop"))
            }))
        })?;
        assert_eq!(refusal["reason"], 11, "protocol violation: {refusal}");
    }
    let status = sb.hub.status()?;
    assert_ne!(status["upstream"]["link"], "connected", "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_hub_cannot_drop_reorder_or_invent_a_departments_batches() -> Result<()> {
    let mut sb = Sandbox::new()?;
    let child = NodeKey::generate()?;
    let department = NodeKey::generate()?;
    sb.hub
        .enroll_hub("330999", "hostile county", &child.id().to_string())?;
    sb.hub.start()?;
    let feed = "MZ:M01/0001";
    let (mut peer, welcome) = FeedPeer::connect_hub(&sb.hub, &child, &[feed]).await?;
    assert_eq!(welcome.feeds[0].cursor.last_seq, 0);
    // The child vouches for the department's key, as it may.
    let registration = Registration::sign(
        &child,
        &RegistrationBody {
            key: department.id(),
            what: Registered::Agent {
                department: "MZ".parse()?,
            },
            name: "民政局".into(),
            enrolled_at: UnixMillis::now(),
        },
    )?;
    peer.say(MessageV1::Registration(registration)).await?;
    let b1 = batch(&department, feed, 1, BatchHash::GENESIS, "J-000001")?;
    let b2 = batch(&department, feed, 2, b1.hash(), "J-000002")?;
    let b3 = batch(&department, feed, 3, b2.hash(), "J-000003")?;
    // Dropped: batch 2 before batch 1.
    expect_reject(peer.send(&b2).await?, RejectReason::Gap, 1);
    expect_ack(peer.send(&b1).await?, 1);
    // Reordered: 3 before 2.
    expect_reject(peer.send(&b3).await?, RejectReason::Gap, 2);
    // Invented: a batch 2 the child signed itself, then one it altered.
    let invented = batch(&child, feed, 2, b1.hash(), "J-FAKE")?;
    expect_reject(peer.send(&invented).await?, RejectReason::UnknownSigner, 2);
    let mut altered = b2.clone();
    let last = altered.body.len() - 1;
    altered.body[last] ^= 0x01;
    expect_reject(peer.send(&altered).await?, RejectReason::BadSignature, 2);
    // A department key used for a feed of another department.
    let foreign = batch(&department, "GA:A01/0001", 1, BatchHash::GENESIS, "x")?;
    expect_reject(peer.send(&foreign).await?, RejectReason::WrongDepartment, 1);
    // The honest chain still goes through.
    expect_ack(peer.send(&b2).await?, 2);
    expect_ack(peer.send(&b3).await?, 3);
    peer.conn.close(0u32.into(), b"done");
    let rows = sb.hub.export_jsonl(feed)?;
    let certs: Vec<&str> = rows.iter().filter_map(|r| r["cert_no"].as_str()).collect();
    assert_eq!(certs, ["J-000001", "J-000002", "J-000003"]);
    let refused: Vec<(String, u64, u64)> = sb
        .hub
        .audit()?
        .iter()
        .filter(|a| a["kind"] == "batch_rejected")
        .map(|a| {
            (
                a["feed"].as_str().unwrap_or_default().to_string(),
                a["seq"].as_u64().unwrap_or(0),
                a["reason"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for expected in [
        (feed.to_string(), 2, 5),
        (feed.to_string(), 3, 5),
        (feed.to_string(), 2, 3),
        (feed.to_string(), 2, 2),
        ("GA:A01/0001".to_string(), 1, 4),
    ] {
        assert!(
            refused.contains(&expected),
            "{expected:?} not in {refused:?}"
        );
    }
    Ok(())
}
