//! `shuyuan-bench federation`: what a level of federation (级联) costs.
//!
//! - *Latency*: one department under a chain of three hubs (district ->
//!   city -> province). Each sample is one household row inserted in its own
//!   transaction at the source; the clock starts just before the commit and
//!   stops, per level, when that hub's status shows the batch holding it.
//!   Each hub is polled over its admin JSON API on a keep-alive HTTP
//!   connection (well under a millisecond a request here), not with a
//!   `shuyuan-hub status --json` process per poll (10-20 ms). The hubs' own
//!   stamps of the write transaction that applied the batch are reported
//!   next to what polling saw: polling is late by up to one round, the stamp
//!   is early by the commit (an fsync).
//! - *Throughput*: two departments with a backlog of household rows each,
//!   synced (a) straight into one hub, (b) into a middle hub that forwards
//!   to a top hub while the rows arrive, and (c) out of the middle hub's
//!   store to a top hub, the middle restarted with its agents stopped: the
//!   forwarding alone. Each run ends with the receiving hub's export
//!   compared row by row with the sources; the three are repeated `--runs`
//!   times and the median reported.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{
    AgentProcess, AgentSpec, HubProcess, HubSpec, Nodes, ResourceSpec, Sandbox, Topology,
    assert_in_sync, assert_same_rows, immediate, now_millis, source_rows,
};

use super::percentile;

#[derive(Debug, clap::Args)]
pub struct FederationArgs {
    /// Latency samples (single-row changes at the source).
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Rows for the throughput runs, split between two departments.
    #[arg(long, default_value_t = 200_000)]
    rows: usize,
    /// Repetitions of the throughput runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The household resource every department shares.
const RESOURCE: &str = "A01/0001";
/// Forward resources whose catalog entry declares no share type.
const FORWARD: &str = "undeclared = \"forward\"\n";
/// The outbox of the throughput runs: the sync benchmark's settings, at the
/// default (and fastest measured) batch size.
const OUTBOX: &str = "batch_max_changes = 1000\nbatch_max_size = \"15 MiB\"\nmax_size = \"1 GiB\"";
/// Pause between latency samples, plus up to [`JITTER_MS`] so that the
/// changes do not keep one phase against the agent's 50 ms poll.
const PAUSE: Duration = Duration::from_millis(200);
const JITTER_MS: u64 = 50;
/// Sleep between polling rounds while waiting for a latency sample.
const LATENCY_POLL: Duration = Duration::from_millis(1);
/// Polling interval while waiting for a throughput run's end (the end time
/// comes from the hubs' stamps, not from the poll).
const THROUGHPUT_POLL: Duration = Duration::from_millis(10);

pub fn run(dir: &Path, args: &FederationArgs) -> Result<()> {
    if args.samples == 0 || args.rows < 2 || args.runs == 0 {
        bail!("--samples and --runs must be at least 1, --rows at least 2");
    }
    latency(dir, args.samples)?;
    throughput(dir, args.rows, args.runs)
}

fn resources() -> [ResourceSpec; 1] {
    [ResourceSpec::new(
        RESOURCE,
        "household",
        &["id_number"],
        "realtime",
    )]
}

/// A sandbox inside the bench directory, kept if the run fails (remove it
/// with [`done`]; `SHUYUAN_KEEP=1` keeps it anyway, logs and databases).
fn sandbox(dir: &Path, name: &str) -> Result<Sandbox> {
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("federation-{name}-"))
        .tempdir_in(dir)?;
    tmp.disable_cleanup(true);
    Sandbox::in_dir(tmp)
}

/// Removes a sandbox whose run succeeded (its processes stopped).
fn done(sb: Sandbox) -> Result<()> {
    let path = sb.dir.path().to_path_buf();
    drop(sb);
    if std::env::var_os("SHUYUAN_KEEP").is_some() {
        eprintln!("keeping {}", path.display());
    } else {
        std::fs::remove_dir_all(path)?;
    }
    Ok(())
}

/// A running hub's admin JSON API on one keep-alive HTTP connection.
struct Api {
    client: reqwest::blocking::Client,
    url: String,
    token: String,
    /// Requests made and their total time.
    requests: u64,
    spent: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("url", &self.url).finish()
    }
}

impl Api {
    fn new(hub: &HubProcess) -> Result<Api> {
        Ok(Api {
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            url: format!("{}/api/v1/status", hub.admin_url()?),
            token: hub.admin_token()?,
            requests: 0,
            spent: Duration::ZERO,
        })
    }

    /// `GET /api/v1/status`: every feed of the hub.
    fn status(&mut self) -> Result<Json> {
        let t = Instant::now();
        let r = self.client.get(&self.url).bearer_auth(&self.token).send()?;
        let status = r.status();
        let body = r.bytes()?;
        self.requests += 1;
        self.spent += t.elapsed();
        if !status.is_success() {
            bail!("{}: {status}: {}", self.url, String::from_utf8_lossy(&body));
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// The status entry of one feed, if the hub holds it.
    fn feed(&mut self, feed: &str) -> Result<Option<Json>> {
        let status = self.status()?;
        Ok(feed_entry(&status, feed).cloned())
    }

    /// Mean time of one request so far, in milliseconds.
    fn mean_ms(&self) -> f64 {
        self.spent.as_secs_f64() * 1e3 / self.requests.max(1) as f64
    }
}

fn feed_entry<'a>(status: &'a Json, feed: &str) -> Option<&'a Json> {
    status["departments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["resources"].as_array().into_iter().flatten())
        .find(|r| r["feed"] == feed)
}

/// Inserts one household row in its own transaction; returns the instant
/// and the Unix milliseconds taken just before the commit.
fn insert_one(conn: &rusqlite::Connection, rng: &mut Rng) -> Result<(Instant, i64)> {
    let tx = immediate(conn)?;
    // INSERT OR IGNORE skips a repeated ID: draw again.
    loop {
        data::insert_household(&tx, rng)?;
        if tx.changes() == 1 {
            break;
        }
    }
    let (at, wall) = (Instant::now(), now_millis());
    tx.commit()?;
    Ok((at, wall))
}

/// Fails if the hub refused a batch or a connection.
fn no_rejections(hub: &HubProcess, what: &str) -> Result<()> {
    hub.assert_nothing_refused()
        .with_context(|| format!("the {what}"))
}

/// One latency sample: per level, milliseconds from just before the commit
/// to the poll that saw the batch, and to the hub's stamp of it.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    seen: [f64; 3],
    stamp: [f64; 3],
    /// The source's own commit (SQLite, rollback journal).
    commit: f64,
}

fn latency(dir: &Path, samples: usize) -> Result<()> {
    let resources = resources();
    // Parents first: each child connects at once rather than after a
    // reconnect delay.
    let Nodes(mut sb, [mut city, mut district], [mut agent]) = Topology::new()
        .hub_name("province")
        .hub(HubSpec::child("city", "330000").share(FORWARD))
        .hub(
            HubSpec::child("district", "330902")
                .under("city")
                .share(FORWARD),
        )
        .agent(
            AgentSpec::sqlite("dept", "GA-330902", &[data::HOUSEHOLD_DDL])
                .resources(resources.to_vec())
                .at("district"),
        )
        .start_in(sandbox(dir, "latency")?)?;
    let (db, conn) = (agent.db.clone(), agent.database()?);
    let feed = format!("GA-330902:{RESOURCE}");
    let mut apis = [Api::new(&district)?, Api::new(&city)?, Api::new(&sb.hub)?];

    // Warm-up, not counted: the schema, the feed's first batches, the
    // registrations and announcements up the chain.
    let mut rng = Rng::new(42);
    for _ in 0..3 {
        insert_one(&conn, &mut rng)?;
        std::thread::sleep(PAUSE);
    }
    let start = Instant::now();
    let mut head = loop {
        let mut seqs = [0u64; 3];
        for (s, api) in seqs.iter_mut().zip(&mut apis) {
            *s = api
                .feed(&feed)?
                .and_then(|f| f["last_seq"].as_u64())
                .unwrap_or(0);
        }
        if seqs[0] > 0 && seqs.iter().all(|s| *s == seqs[0]) {
            let rows = apis[2].feed(&feed)?.and_then(|f| f["rows"].as_u64());
            if rows == Some(3) {
                break seqs[0];
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the warm-up rows did not reach every level: heads {seqs:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for api in &mut apis {
        api.requests = 0;
        api.spent = Duration::ZERO;
    }

    eprintln!("federation latency: {samples} samples");
    let mut all = Vec::with_capacity(samples);
    let mut rounds = 0u64;
    for i in 0..samples {
        std::thread::sleep(PAUSE + Duration::from_millis(rng.below(JITTER_MS)));
        let (t0, wall0) = insert_one(&conn, &mut rng)?;
        let mut sample = Sample {
            commit: t0.elapsed().as_secs_f64() * 1e3,
            ..Sample::default()
        };
        let mut got: [Option<u64>; 3] = [None; 3];
        while got.iter().any(Option::is_none) {
            rounds += 1;
            for (level, api) in apis.iter_mut().enumerate() {
                if got[level].is_some() {
                    continue;
                }
                let f = api.feed(&feed)?;
                let seen = t0.elapsed();
                let Some(f) = f else { continue };
                let seq = f["last_seq"].as_u64().unwrap_or(0);
                if seq > head {
                    got[level] = Some(seq);
                    sample.seen[level] = seen.as_secs_f64() * 1e3;
                    let stamp = f["last_batch_received_at"]
                        .as_i64()
                        .context("no last_batch_received_at")?;
                    sample.stamp[level] = (stamp - wall0) as f64;
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("sample {i}: after 60 s the levels hold {got:?} (head was {head})");
            }
            std::thread::sleep(LATENCY_POLL);
        }
        // One row, one batch, the same batch at every level.
        if got.iter().any(|s| *s != Some(head + 1)) {
            bail!(
                "sample {i}: expected batch {} at every level, got {got:?}",
                head + 1
            );
        }
        head += 1;
        all.push(sample);
    }

    // Not timed: the agent sealed nothing else, and the top holds what the
    // source holds.
    let status = agent.wait_drained(Duration::from_secs(60))?;
    let agent_head = status["resources"][0]["head_seq"].as_u64();
    if agent_head != Some(head) {
        bail!("the agent's head is {agent_head:?}, the levels' {head}");
    }
    let source = source_rows(&db, "household", &resources[0].key)?;
    assert_same_rows(&source, &sb.hub.export_jsonl(&feed)?).context("the province's copy")?;
    for (hub, what) in [
        (&district, "district"),
        (&city, "city"),
        (&sb.hub, "province"),
    ] {
        no_rejections(hub, what)?;
    }
    let poll_ms: Vec<f64> = apis.iter().map(Api::mean_ms).collect();
    agent.stop()?;
    for hub in [&mut district, &mut city, &mut sb.hub] {
        hub.stop()?;
    }
    done(sb)?;

    println!(
        "\n### Federation latency: one row committed at the source -> visible at each level ({samples} samples)\n"
    );
    println!(
        "| level (top of the chain) | path | seen by polling p50 | p95 | max | hub's stamp min | p50 | p95 | max |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let paths = [
        ("one: district (L1)", "agent -> district"),
        ("two: city (L2)", "agent -> district -> city"),
        (
            "three: province (L3)",
            "agent -> district -> city -> province",
        ),
    ];
    let ms = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.1} ms"));
    let sorted = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    for (level, (name, path)) in paths.iter().enumerate() {
        let seen = sorted(&|s| s.seen[level]);
        let stamp = sorted(&|s| s.stamp[level]);
        println!(
            "| {name} | {path} | {} | {} | {} | {} | {} | {} | {} |",
            ms(percentile(&seen, 0.5)),
            ms(percentile(&seen, 0.95)),
            ms(seen.last().copied()),
            ms(stamp.first().copied()),
            ms(percentile(&stamp, 0.5)),
            ms(percentile(&stamp, 0.95)),
            ms(stamp.last().copied()),
        );
    }
    println!("\nWhat each hop adds (per sample, difference of the hubs' stamps):\n");
    println!("| hop | min | p50 | p95 | max |\n|---|---:|---:|---:|---:|");
    let hops = [
        (
            "source commit -> district (agent poll, seal, QUIC, verify)",
            sorted(&|s| s.stamp[0]),
        ),
        ("district -> city", sorted(&|s| s.stamp[1] - s.stamp[0])),
        ("city -> province", sorted(&|s| s.stamp[2] - s.stamp[1])),
    ];
    for (name, v) in hops {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(v.first().copied()),
            ms(percentile(&v, 0.5)),
            ms(percentile(&v, 0.95)),
            ms(v.last().copied())
        );
    }
    let commits = sorted(&|s| s.commit);
    println!(
        "\nThe agent polls its SQLite change table every 50 ms (the harness's `poll_interval`), so a change waits 0-50 ms (25 ms on average) before it is read: that wait is the floor of every level. The clock starts before the source's own commit (SQLite, rollback journal: p50 {} ms, max {} ms of each figure). Samples are {} ms apart plus 0-{JITTER_MS} ms of jitter. Polling: `GET /api/v1/status` on each level not yet reached, then a {} ms sleep ({rounds} rounds; one request took {:.2} / {:.2} / {:.2} ms on average at the district / city / province), so a seen figure is late by up to one round. A hub's stamp is taken when the write transaction applying the batch begins, before its commit (fsync); stamps are whole milliseconds. After the samples the agent's head equalled every level's ({head} batches) and the province's export equalled the source ({} rows); no hub refused anything.",
        ms(percentile(&commits, 0.5)).trim_end_matches(" ms"),
        ms(commits.last().copied()).trim_end_matches(" ms"),
        PAUSE.as_millis(),
        LATENCY_POLL.as_millis(),
        poll_ms[0],
        poll_ms[1],
        poll_ms[2],
        source.len()
    );
    Ok(())
}

/// Two departments under the sandbox's hub, their capture triggers
/// installed, with `rows` household rows between them waiting in the change
/// tables. Returns the agents (not started) and each one's row count.
fn departments(sb: &Sandbox, rows: usize) -> Result<Vec<(AgentProcess, u64)>> {
    let mut out = Vec::new();
    for (i, code) in ["GA-330902", "MZ-330902"].into_iter().enumerate() {
        let agent = sb.add_agent(
            AgentSpec::sqlite(&format!("dept{i}"), code, &[data::HOUSEHOLD_DDL])
                .resources(resources().to_vec())
                .outbox(OUTBOX),
        )?;
        let conn = agent.database()?;
        let want = rows / 2 + if i == 0 { rows % 2 } else { 0 };
        let mut rng = Rng::new(1000 + i as u64);
        let mut done = 0;
        while done < want {
            let tx = immediate(&conn)?;
            let end = (done + 10_000).min(want);
            while done < end {
                data::insert_household(&tx, &mut rng)?;
                done += usize::try_from(tx.changes()).unwrap_or(0);
            }
            tx.commit()?;
        }
        let count: i64 = conn.query_row("SELECT count(*) FROM household", [], |r| r.get(0))?;
        out.push((agent, u64::try_from(count)?));
    }
    Ok(out)
}

/// Starts every agent at once (one thread each).
fn start_all(agents: &mut [(AgentProcess, u64)]) -> Result<()> {
    std::thread::scope(|s| {
        let started: Vec<_> = agents
            .iter_mut()
            .map(|(a, _)| s.spawn(move || a.start()))
            .collect();
        for t in started {
            t.join()
                .map_err(|_| anyhow::anyhow!("an agent start panicked"))??;
        }
        Ok(())
    })
}

/// The newest stamp among the departments' feeds at a hub, once the hub
/// holds every row of each; `None` before.
fn all_there(api: &mut Api, agents: &[(AgentProcess, u64)]) -> Result<Option<i64>> {
    let status = api.status()?;
    let mut newest = 0;
    for (agent, rows) in agents {
        let feed = format!("{}:{RESOURCE}", agent.department);
        let Some(f) = feed_entry(&status, &feed) else {
            return Ok(None);
        };
        if f["rows"].as_u64() != Some(*rows) {
            return Ok(None);
        }
        newest = newest.max(f["last_batch_received_at"].as_i64().unwrap_or(0));
    }
    Ok(Some(newest))
}

/// Polls the hubs until each holds every row; returns, per hub, the
/// seconds from `t0` (Unix milliseconds) to its stamp of the last batch.
fn clock(apis: &mut [Api], agents: &[(AgentProcess, u64)], t0: i64) -> Result<Vec<f64>> {
    let mut ends: Vec<Option<f64>> = vec![None; apis.len()];
    let start = Instant::now();
    while ends.iter().any(Option::is_none) {
        for (end, api) in ends.iter_mut().zip(apis.iter_mut()) {
            if end.is_none() {
                *end = all_there(api, agents)?.map(|t| (t - t0) as f64 / 1e3);
            }
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("after 10 min the hubs hold every row: {ends:?}");
        }
        std::thread::sleep(THROUGHPUT_POLL);
    }
    Ok(ends.into_iter().flatten().collect())
}

/// Compares each department's source with `hub`'s copy, row by row.
fn compare(hub: &HubProcess, agents: &[(AgentProcess, u64)]) -> Result<usize> {
    let mut total = 0;
    for (agent, _) in agents {
        total += assert_in_sync(hub, agent)
            .with_context(|| format!("{} at {}", agent.department, hub.dir.display()))?;
    }
    Ok(total)
}

/// One repetition of the throughput runs: seconds for each, the rows in
/// the sources and the rows compared at the receiving hubs.
#[derive(Debug, Clone, Copy)]
struct Times {
    direct: f64,
    middle: f64,
    through: f64,
    backlog: f64,
    rows: u64,
    compared: usize,
}

fn throughput_once(dir: &Path, rows: usize, run: usize) -> Result<Times> {
    // (a) Straight into one hub; then (c) that hub, restarted as a middle
    // hub with its agents stopped, forwards its store to a new top.
    eprintln!("federation throughput, run {run}: direct");
    let mut sb = sandbox(dir, &format!("direct{run}"))?;
    sb.hub.rename("middle")?;
    let mut agents = departments(&sb, rows)?;
    let total: u64 = agents.iter().map(|(_, n)| n).sum();
    sb.hub.start()?;
    let mut apis = [Api::new(&sb.hub)?];
    let t0 = now_millis();
    start_all(&mut agents)?;
    let direct = clock(&mut apis, &agents, t0)?[0];
    for (a, _) in &mut agents {
        a.wait_drained(Duration::from_secs(120))?;
        a.stop()?;
    }
    let mut compared = compare(&sb.hub, &agents)?;
    no_rejections(&sb.hub, "hub")?;
    sb.hub.stop()?;

    eprintln!("federation throughput, run {run}: forwarding a stored backlog");
    let mut top = sb.add_hub(&HubSpec::new("top"))?;
    top.enroll_hub("330900", "middle", &sb.hub.key)?;
    sb.hub.set_upstream(&top, FORWARD)?;
    top.start()?;
    let mut apis = [Api::new(&top)?];
    let t0 = now_millis();
    sb.hub.start()?;
    let backlog = clock(&mut apis, &agents, t0)?[0];
    compared += compare(&top, &agents)?;
    no_rejections(&top, "top hub")?;
    let upstream = sb.hub.status()?["upstream"].clone();
    if upstream["rejections"] != 0 {
        bail!("the top refused batches of the middle: {upstream}");
    }
    sb.hub.stop()?;
    top.stop()?;
    drop(agents);
    done(sb)?;

    // (b) Through a middle hub while the rows arrive.
    eprintln!("federation throughput, run {run}: through a middle hub, live");
    let mut sb = sandbox(dir, &format!("middle{run}"))?;
    sb.hub.rename("middle")?;
    let mut top = sb.add_hub(&HubSpec::new("top"))?;
    top.enroll_hub("330900", "middle", &sb.hub.key)?;
    sb.hub.set_upstream(&top, FORWARD)?;
    let mut agents = departments(&sb, rows)?;
    if agents.iter().map(|(_, n)| n).sum::<u64>() != total {
        bail!("the runs' sources differ in size");
    }
    top.start()?;
    sb.hub.start()?;
    let mut apis = [Api::new(&sb.hub)?, Api::new(&top)?];
    let t0 = now_millis();
    start_all(&mut agents)?;
    let ends = clock(&mut apis, &agents, t0)?;
    let (middle, through) = (ends[0], ends[1]);
    for (a, _) in &mut agents {
        a.wait_drained(Duration::from_secs(120))?;
    }
    compared += compare(&top, &agents)?;
    no_rejections(&sb.hub, "middle hub")?;
    no_rejections(&top, "top hub")?;
    for (a, _) in &mut agents {
        a.stop()?;
    }
    sb.hub.stop()?;
    top.stop()?;
    drop(agents);
    done(sb)?;
    Ok(Times {
        direct,
        middle,
        through,
        backlog,
        rows: total,
        compared,
    })
}

fn throughput(dir: &Path, rows: usize, runs: usize) -> Result<()> {
    let mut all = Vec::with_capacity(runs);
    for run in 0..runs {
        all.push(throughput_once(dir, rows, run)?);
    }
    let total = all[0].rows;
    let compared: usize = all.iter().map(|t| t.compared).sum();
    let n = total as f64;
    println!(
        "\n### Federation throughput: {total} household rows from two departments (batches of 1,000 changes; {runs} runs)\n"
    );
    println!(
        "| run | arrives at | run times (s) | median time | median rows/s |\n|---|---|---|---:|---:|"
    );
    let line = |run: &str, at: &str, f: &dyn Fn(&Times) -> f64| {
        let times: Vec<f64> = all.iter().map(f).collect();
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        println!(
            "| {run} | {at} | {} | {median:.2} s | {:.0} |",
            times
                .iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            n / median
        );
    };
    line("direct: 2 agents -> hub (no parent)", "the hub", &|t| {
        t.direct
    });
    line(
        "through a middle hub, live: 2 agents -> middle -> top",
        "the middle hub",
        &|t| t.middle,
    );
    line(
        "through a middle hub, live: 2 agents -> middle -> top",
        "the top hub",
        &|t| t.through,
    );
    line(
        "forwarding a stored backlog: middle (restarted, agents stopped) -> top",
        "the top hub",
        &|t| t.backlog,
    );
    println!(
        "\nThe rows wait in the departments' change tables (capture triggers installed) before each run. Direct and live runs: the clock starts just before both agents are spawned (at once, one thread each), so it includes their start-up and first handshake; the backlog run: just before the middle hub is spawned, the top already running. It stops at the receiving hub's stamp of the write transaction that applied the last batch of the two feeds (polled over the admin API every {} ms until the hub holds every row). After every run each receiving hub's export equalled the sources row by row ({compared} rows compared in all), and no hub refused a batch.",
        THROUGHPUT_POLL.as_millis()
    );
    Ok(())
}
