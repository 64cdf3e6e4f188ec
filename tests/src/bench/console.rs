//! The admin console and API under a city's load: `departments` departments
//! with `feeds` feeds each, written by hand-driven agents over QUIC into the
//! real release hub, half of them still connected; then each page, API
//! endpoint and the Prometheus scrape requested in turn over HTTP, with
//! the median, 95th percentile and largest response times.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, SignedBatch};
use shuyuan_protocol::{Column, MessageV1, NodeKey, Op, RowChange, TableSchema, UnixMillis, Value};
use shuyuan_tests::HubProcess;
use shuyuan_tests::peer::FeedPeer;

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    #[arg(long, default_value_t = 200)]
    departments: usize,
    /// Feeds per department.
    #[arg(long, default_value_t = 10)]
    feeds: usize,
    /// Requests per endpoint.
    #[arg(long, default_value_t = 30)]
    requests: usize,
}

fn schema() -> TableSchema {
    TableSchema {
        version: 1,
        table: "records".into(),
        columns: vec![
            Column {
                name: "id".into(),
                sql_type: "INTEGER".into(),
                nullable: false,
            },
            Column {
                name: "name".into(),
                sql_type: "TEXT".into(),
                nullable: true,
            },
        ],
        key: vec![0],
    }
}

/// The first batch of a feed: its schema and `rows` inserts.
fn first_batch(key: &NodeKey, feed: &str, rows: i64) -> Result<SignedBatch> {
    let mut entries = vec![Entry::Schema(schema())];
    for i in 0..rows {
        entries.push(Entry::Change(RowChange {
            op: Op::Insert,
            key: vec![Value::Int(i)],
            row: Some(vec![Value::Int(i), Value::Text(format!("记录 {i}"))]),
            schema_version: 1,
        }));
    }
    let body = BatchBody {
        feed: feed.parse()?,
        seq: 1,
        prev: BatchHash::GENESIS,
        created_at: UnixMillis::now(),
        entries,
    };
    Ok(SignedBatch::seal(key, &body)?)
}

pub fn run(dir: &std::path::Path, args: &ConsoleArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(dir, args))
}

async fn run_async(dir: &std::path::Path, args: &ConsoleArgs) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir.join("console-hub"));
    let mut hub = HubProcess::init(&dir.join("console-hub"))?;
    let keys: Vec<NodeKey> = (0..args.departments)
        .map(|_| NodeKey::generate())
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    for (d, k) in keys.iter().enumerate() {
        hub.enroll(
            &format!("D{d:03}"),
            &format!("部门{d:03}"),
            &k.id().to_string(),
        )?;
    }
    let enrolled = start.elapsed();
    hub.start()?;
    let mut connected = Vec::new();
    let start = Instant::now();
    for (d, k) in keys.iter().enumerate() {
        let dept = format!("D{d:03}");
        let resources: Vec<String> = (0..args.feeds).map(|f| format!("R{f:02}/0001")).collect();
        let names: Vec<&str> = resources.iter().map(String::as_str).collect();
        let (mut peer, _) = FeedPeer::connect(&hub, k, &dept, &names).await?;
        for r in &resources {
            let batch = first_batch(k, &format!("{dept}:{r}"), 20)?;
            match peer.send(&batch).await? {
                MessageV1::Ack(_) => {}
                other => bail!("{dept}:{r}: expected an ack, got {other:?}"),
            }
        }
        // Half the departments stay online.
        if d % 2 == 0 {
            connected.push(peer);
        } else {
            peer.conn.close(0u32.into(), b"done");
        }
    }
    let loaded = start.elapsed();
    let base = hub.admin_url()?;
    let token = hub.admin_token()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    // Let the hub see the closed connections.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let overview: serde_json::Value = client
        .get(format!("{base}/api/v1/overview"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let feeds: usize = overview["departments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["resources"].as_array().map_or(0, Vec::len))
        .sum();
    if feeds != args.departments * args.feeds {
        bail!(
            "the hub shows {feeds} feeds, expected {}",
            args.departments * args.feeds
        );
    }
    println!(
        "\n### Console and API: {} departments, {feeds} feeds ({} agents online)\n",
        args.departments, overview["agents_online"]
    );
    println!(
        "Set-up: {} enrollments in {:.1} s, {feeds} feeds loaded (one batch of 20 rows each) in {:.1} s.\n",
        args.departments,
        enrolled.as_secs_f64(),
        loaded.as_secs_f64()
    );
    println!("| request | bytes | median | p95 | max |");
    println!("|---|---:|---:|---:|---:|");
    let mid = format!("D{:03}", args.departments / 2);
    let endpoints = [
        (
            "GET /api/v1/status (what `status` reads)",
            "/api/v1/status".to_string(),
            false,
        ),
        (
            "GET /api/v1/overview",
            "/api/v1/overview".to_string(),
            false,
        ),
        (
            "GET /api/v1/departments/{code}",
            format!("/api/v1/departments/{mid}"),
            false,
        ),
        (
            "GET /api/v1/resources/{dept}/{res}",
            format!("/api/v1/resources/{mid}/R05%2F0001"),
            false,
        ),
        ("GET /api/v1/audit", "/api/v1/audit".to_string(), false),
        ("GET / (overview page)", "/".to_string(), true),
        (
            "GET /departments/{code} (page)",
            format!("/departments/{mid}"),
            true,
        ),
        (
            "GET /resources/{dept}/{res} (page)",
            format!("/resources/{mid}/R05%2F0001"),
            true,
        ),
        ("GET /audit (page)", "/audit".to_string(), true),
        (
            "GET /metrics (Prometheus scrape)",
            "/metrics".to_string(),
            false,
        ),
    ];
    for (name, path, _page) in endpoints {
        let mut times = Vec::with_capacity(args.requests);
        let mut bytes = 0;
        for _ in 0..args.requests {
            let t = Instant::now();
            let r = client
                .get(format!("{base}{path}"))
                .bearer_auth(&token)
                .send()
                .await?;
            let status = r.status();
            let body = r.bytes().await?;
            times.push(t.elapsed());
            if !status.is_success() {
                bail!("{path}: {status}");
            }
            bytes = body.len();
        }
        times.sort();
        let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "| {name} | {} | {} | {} | {} |",
            bytes,
            ms(pick(0.5)),
            ms(pick(0.95)),
            ms(times[times.len() - 1])
        );
    }
    let scrape = client
        .get(format!("{base}/metrics"))
        .bearer_auth(&token)
        .send()
        .await?
        .text()
        .await?;
    let series = scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    // The CLI, end to end (process start, HTTP, JSON, rendering).
    let mut cli = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        hub.status().context("status")?;
        cli.push(t.elapsed());
    }
    cli.sort();
    println!(
        "| `shuyuan-hub status --json` (whole command) | | {} | | {} |",
        ms(cli[2]),
        ms(cli[4])
    );
    println!("\nThe Prometheus scrape holds {series} series.");
    let pid = hub.pid().unwrap_or(0);
    let cpu = process_cpu(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = process_cpu(pid)
        .zip(cpu)
        .map(|(b, a)| (b - a) / 10.0 * 100.0);
    if let Some(p) = idle {
        println!(
            "\nThe hub's CPU while idle with this store (the 1 s state watch behind alerts, sparklines and live updates, plus {} connections): {p:.1} % of one core over 10 s.",
            connected.len()
        );
    }
    for p in connected {
        p.conn.close(0u32.into(), b"done");
    }
    hub.stop()?;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// User plus system CPU seconds of a process so far.
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
