//! Network faults between an agent and its hub, made by a UDP relay
//! ([`FaultProxy`]) that the agent uses as its hub address: a partition of
//! tens of seconds, loss with reordering and duplication, a NAT rebinding
//! mid-stream and a hub that moved to another port. The department keeps
//! writing throughout; afterwards the hub's copy equals the source row by
//! row, every batch was applied once, and nothing was refused. While the
//! network is down, both sides' status and the console's API say so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use serde_json::Value as Json;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::faultproxy::{FaultProxy, Faults};
use shuyuan_tests::{
    AgentProcess, AgentSpec, HubProcess, HubSpec, Nodes, Sandbox, Topology, assert_in_sync,
    immediate, wait_for,
};

const FEED: &str = "GA:A01/0001";

/// A department application writing household changes in small
/// transactions until told to stop.
#[derive(Debug)]
struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<u64>>,
}

impl Writer {
    /// Writes `per_tick` changes every 100 ms.
    fn start(conn: rusqlite::Connection, seed: u64, per_tick: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<u64> {
            let mut rng = Rng::new(seed);
            let mut written = 0;
            while !flag.load(Ordering::Relaxed) {
                let tx = immediate(&conn)?;
                for _ in 0..per_tick {
                    data::churn_one(&tx, "household", &mut rng)?;
                }
                tx.commit()?;
                written += per_tick as u64;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(written)
        });
        Writer { stop, thread }
    }

    /// Stops writing; the number of changes written.
    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the writer panicked"))?
    }
}

/// A hub, and an agent that reaches it only through a fault proxy.
#[derive(Debug)]
struct Relayed {
    sb: Sandbox,
    agent: AgentProcess,
    proxy: FaultProxy,
}

impl Relayed {
    /// Starts the hub, the proxy (faults drawn from `seed`) and the agent,
    /// with some rows already at the hub; returns the department's
    /// connection for writing.
    fn start(seed: u64) -> Result<(Relayed, rusqlite::Connection)> {
        let Nodes(mut sb, [], [mut agent]) = Topology::new()
            // Small batches: many round trips for the faults to hit.
            .agent(AgentSpec::household("ga", "GA").outbox("batch_max_changes = 20"))
            .build()?;
        let proxy = FaultProxy::start(sb.hub.addr, seed)?;
        agent.set_hub_address(proxy.addr())?;
        sb.hub.start()?;
        agent.start()?;
        let conn = agent.database()?;
        let mut rng = Rng::new(seed);
        for _ in 0..100 {
            data::churn_one(&conn, "household", &mut rng)?;
        }
        agent.wait_drained(Duration::from_secs(60))?;
        Ok((Relayed { sb, agent, proxy }, conn))
    }

    /// Waits for the outbox to drain, then checks the copy row by row,
    /// that every batch was applied once and that nothing was refused;
    /// returns the rows compared.
    fn converged(&self, timeout: Duration) -> Result<usize> {
        self.agent.wait_drained(timeout)?;
        let rows = assert_in_sync(&self.sb.hub, &self.agent)?;
        self.sb.hub.assert_applied_once(FEED)?;
        self.sb.assert_no_rejections()?;
        Ok(rows)
    }

    fn agent_link(&self) -> Result<Json> {
        Ok(self.agent.status()?["hub"].clone())
    }

    /// Waits until the agent's link is `connected` (or, with `up` false,
    /// anything else); returns its `hub` status.
    fn wait_link(&self, up: bool, timeout: Duration) -> Result<Json> {
        let what = if up { "connected" } else { "disconnected" };
        wait_for(&format!("the agent to be {what}"), timeout, || {
            let hub = self.agent_link()?;
            Ok(((hub["link"] == "connected") == up).then_some(hub))
        })
    }
}

/// The console's overview, through its JSON API with the local token.
fn overview(hub: &HubProcess) -> Result<Json> {
    Ok(serde_json::from_str(&hub.admin_get("/api/v1/overview")?)?)
}

/// The feed's state in the overview (`on_time`, `disconnected`, ...).
fn feed_state(overview: &Json) -> Option<&str> {
    overview["departments"]
        .as_array()?
        .iter()
        .flat_map(|d| d["resources"].as_array().into_iter().flatten())
        .find(|r| r["feed"] == FEED)?["state"]
        .as_str()
}

/// The hub's entry for the department's one agent.
fn hub_agent(hub: &HubProcess) -> Result<Json> {
    Ok(hub.status()?["departments"][0]["agents"][0].clone())
}

fn outbox_batches(agent: &AgentProcess) -> Result<u64> {
    agent.status()?["outbox"]["batches"]
        .as_u64()
        .ok_or_else(|| anyhow!("no outbox figure"))
}

#[test]
fn partition_of_tens_of_seconds_agent_buffers_and_resumes() -> Result<()> {
    let (net, conn) = Relayed::start(31)?;
    let writer = Writer::start(conn, 32, 10);
    let before = outbox_batches(&net.agent)?;
    net.proxy.set_faults(Faults::PARTITION);
    let cut = Instant::now();

    // Both sides notice once the QUIC idle timeout passes; the agent
    // keeps capturing into its outbox meanwhile.
    let down = net.wait_link(false, Duration::from_secs(90))?;
    assert!(
        down["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "the agent says why it is disconnected: {down}"
    );
    let console = wait_for(
        "the console to show the agent offline",
        Duration::from_secs(90),
        || {
            let o = overview(&net.sb.hub)?;
            let offline = o["agents_online"] == 0 && o["agents_offline"] == 1;
            Ok((offline && feed_state(&o) == Some("disconnected")).then_some(o))
        },
    )?;
    assert_eq!(hub_agent(&net.sb.hub)?["connected"], false, "{console}");
    let noticed = cut.elapsed();
    // Stay cut for at least 25 s in all.
    std::thread::sleep(Duration::from_secs(25).saturating_sub(cut.elapsed()));
    let buffered = outbox_batches(&net.agent)?;
    assert!(
        buffered > before,
        "the outbox grows while partitioned: {before} -> {buffered} batches"
    );
    let text = net.agent.status_text()?;
    let line = text.lines().find(|l| l.starts_with("hub ")).unwrap_or("");
    assert!(
        line.contains("disconnected") || line.contains("connecting"),
        "`status` shows the link down: {text}"
    );
    let dropped = net.proxy.counters().partitioned;
    assert!(dropped > 0, "{:?}", net.proxy.counters());
    let partitioned_for = cut.elapsed();

    net.proxy.set_faults(Faults::NONE);
    let healed = Instant::now();
    let up = net.wait_link(true, Duration::from_secs(60))?;
    let reconnected = healed.elapsed();
    wait_for(
        "the console to show the agent online",
        Duration::from_secs(60),
        || {
            let o = overview(&net.sb.hub)?;
            Ok((o["agents_online"] == 1 && feed_state(&o) != Some("disconnected")).then_some(()))
        },
    )?;
    let written = writer.finish()?;
    let rows = net.converged(Duration::from_secs(180))?;
    eprintln!(
        "partition: cut for {partitioned_for:?} (both sides showed it after {noticed:?}), \
         {dropped} datagrams dropped, outbox {before} -> {buffered} batches; \
         reconnected {reconnected:?} and converged {:?} after healing; \
         {written} changes written, {rows} rows equal; agent link {up}",
        healed.elapsed()
    );
    Ok(())
}

#[test]
fn loss_reordering_and_duplication_converge() -> Result<()> {
    let (net, conn) = Relayed::start(41)?;
    net.proxy.set_faults(Faults {
        partition: false,
        loss: 0.10,
        reorder: 0.10,
        duplicate: 0.05,
    });
    let started = Instant::now();
    let writer = Writer::start(conn, 42, 25);
    // About 3000 changes at 250 a second.
    std::thread::sleep(Duration::from_secs(12));
    let written = writer.finish()?;
    assert!(written >= 2000, "{written} changes written");
    let rows = net.converged(Duration::from_secs(180))?;
    let c = net.proxy.counters();
    assert!(c.lost > 0 && c.reordered > 0 && c.duplicated > 0, "{c:?}");
    eprintln!(
        "loss 10%, reorder 10%, duplicate 5%: {written} changes, {rows} rows equal after {:?}; {c:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn nat_rebinding_mid_stream_migrates_the_connection() -> Result<()> {
    let (net, conn) = Relayed::start(51)?;
    let link = net.agent_link()?;
    let seen = hub_agent(&net.sb.hub)?;
    let old = net.proxy.hub_facing_addr()?;
    assert_eq!(seen["remote"], old.to_string(), "{seen}");
    let writer = Writer::start(conn, 52, 20);
    std::thread::sleep(Duration::from_secs(2));
    let moved = net.proxy.rebind()?;
    let rebound = Instant::now();
    // The hub follows the agent to its new address on the same connection.
    let migrated = wait_for(
        "the hub to see the agent's new address",
        Duration::from_secs(60),
        || {
            let a = hub_agent(&net.sb.hub)?;
            Ok((a["remote"] == moved.to_string()).then_some(a))
        },
    )?;
    let followed = rebound.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let written = writer.finish()?;
    let stopped = Instant::now();
    let rows = net.converged(Duration::from_secs(180))?;
    let drained = stopped.elapsed();
    assert_eq!(
        migrated["connected_since"], seen["connected_since"],
        "the same connection: {seen} then {migrated}"
    );
    let after = net.agent_link()?;
    assert_eq!(
        after["since"], link["since"],
        "no reconnect: {link} then {after}"
    );
    assert_eq!(net.proxy.counters().rebinds, 1);
    eprintln!(
        "NAT rebinding {old} -> {moved}: the hub showed the new address after {followed:?}; \
         drained {drained:?} after the last write; {written} changes, {rows} rows equal"
    );
    Ok(())
}

#[test]
fn hub_moved_to_another_port_agent_follows_the_relay() -> Result<()> {
    let (mut net, conn) = Relayed::start(61)?;
    let writer = Writer::start(conn, 62, 20);
    std::thread::sleep(Duration::from_secs(2));
    let old = net.sb.hub.addr;
    net.sb.hub.stop()?;
    net.wait_link(false, Duration::from_secs(60))?;
    let moved = net.sb.hub.move_port()?;
    net.proxy.retarget(moved);
    let forwarded = net.proxy.counters().forwarded;
    let restarted = Instant::now();
    net.sb.hub.start()?;
    assert_eq!(net.sb.hub.status()?["listen"], moved.to_string());
    net.wait_link(true, Duration::from_secs(60))?;
    let reconnected = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let written = writer.finish()?;
    let rows = net.converged(Duration::from_secs(180))?;
    let c = net.proxy.counters();
    assert!(c.retargets == 1 && c.forwarded > forwarded, "{c:?}");
    eprintln!(
        "hub moved {old} -> {moved}: reconnected {reconnected:?} after the restart; \
         {written} changes, {rows} rows equal"
    );
    Ok(())
}

/// The same faults between a county hub and its city (级联): the county's
/// upstream link goes through the relay. A partition of 25 s, then loss,
/// reordering and duplication, while the department keeps writing. The
/// county keeps its forwarding queue and both hubs say the link is down;
/// afterwards the city's copy equals the source, every batch applied once.
#[test]
fn faults_between_county_and_city_hubs_lose_and_repeat_nothing() -> Result<()> {
    let Nodes(mut sb, [mut county], [mut agent]) = Topology::new()
        .hub(HubSpec::child("county", "330902").share(
            "share_types = [\"unconditional\", \"conditional\"]\nundeclared = \"forward\"\n",
        ))
        .agent(
            AgentSpec::household("ga", "GA")
                .outbox("batch_max_changes = 20")
                .at("county"),
        )
        .build()?;
    let proxy = FaultProxy::start(sb.hub.addr, 71)?;
    county.set_upstream_address(proxy.addr())?;
    sb.hub.start()?;
    county.start()?;
    agent.start()?;
    let conn = agent.database()?;
    let writer = Writer::start(conn, 72, 10);
    wait_for("the city to get the feed", Duration::from_secs(60), || {
        Ok((sb.hub.feed_seq(FEED)? > 5).then_some(()))
    })?;

    proxy.set_faults(Faults::PARTITION);
    let cut = Instant::now();
    let down = wait_for(
        "both hubs to show the link down",
        Duration::from_secs(90),
        || {
            let up = county.status()?["upstream"].clone();
            let child = sb.hub.status()?["children"][0].clone();
            Ok((up["link"] != "connected" && child["connected"] == false).then_some(up))
        },
    )?;
    assert!(
        down["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "the county says why: {down}"
    );
    let noticed = cut.elapsed();
    std::thread::sleep(Duration::from_secs(25).saturating_sub(cut.elapsed()));
    // The county goes on taking the department's batches and queues them.
    let county_head = county.feed_seq(FEED)?;
    let city_head = sb.hub.feed_seq(FEED)?;
    assert!(
        county_head > city_head,
        "the county queued what the city lacks: county #{county_head}, city #{city_head}"
    );
    let partitioned_for = cut.elapsed();

    proxy.set_faults(Faults {
        partition: false,
        loss: 0.10,
        reorder: 0.10,
        duplicate: 0.05,
    });
    let healed = Instant::now();
    wait_for("the county to reconnect", Duration::from_secs(60), || {
        Ok((county.status()?["upstream"]["link"] == "connected").then_some(()))
    })?;
    let reconnected = healed.elapsed();
    std::thread::sleep(Duration::from_secs(8));
    let written = writer.finish()?;
    let status = agent.wait_drained(Duration::from_secs(120))?;
    let head = status["resources"][0]["head_seq"].as_u64().unwrap_or(0);
    wait_for("the city to catch up", Duration::from_secs(180), || {
        Ok((sb.hub.feed_seq(FEED)? >= head).then_some(()))
    })?;
    let caught_up = healed.elapsed();
    let mut rows = 0;
    for hub in [&county, &sb.hub] {
        rows = assert_in_sync(hub, &agent)?;
        hub.assert_applied_once(FEED)?;
    }
    county.assert_nothing_refused()?;
    sb.hub.assert_nothing_refused()?;
    // A NAT rebinding of the county: the city follows it on the same
    // connection (the county reports every 2 s, so packets flow).
    proxy.set_faults(Faults::NONE);
    let child = sb.hub.status()?["children"][0].clone();
    let moved = proxy.rebind()?;
    let migrated = wait_for(
        "the city to see the county's new address",
        Duration::from_secs(60),
        || {
            let c = sb.hub.status()?["children"][0].clone();
            Ok((c["remote"] == moved.to_string()).then_some(c))
        },
    )?;
    assert_eq!(
        migrated["connected_since"], child["connected_since"],
        "the same connection: {child} then {migrated}"
    );
    let c = proxy.counters();
    assert!(c.partitioned > 0 && c.lost > 0 && c.rebinds == 1, "{c:?}");
    eprintln!(
        "county-city: cut for {partitioned_for:?} (both hubs showed it after {noticed:?}), \
         county #{county_head} vs city #{city_head} while cut; reconnected {reconnected:?} after \
         healing into 10% loss; city caught up {caught_up:?} after healing; {written} changes, \
         {rows} rows equal; {c:?}"
    );
    Ok(())
}
