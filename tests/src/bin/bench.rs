//! `shuyuan-bench`: end-to-end rows per second from the SQLite change table
//! to durable hub commit, with the real release binaries on loopback, and
//! the cost of signing and verifying a batch.
//!
//! Run with `./bench.sh` (builds release binaries first). Prints Markdown
//! tables for BENCHMARKS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, SignedBatch};
use shuyuan_protocol::encoding::encode;
use shuyuan_protocol::{Column, NodeKey, Op, RowChange, TableSchema, UnixMillis, Value};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{
    AgentProcess, HubProcess, ResourceSpec, assert_in_sync, immediate, now_millis, wait_for,
};

#[derive(Debug, Parser)]
#[command(
    name = "shuyuan-bench",
    about = "Measure shuyuan's sync throughput and signing cost"
)]
struct Args {
    /// Changes per run.
    #[arg(long, default_value_t = 100_000)]
    changes: usize,
    /// Batch sizes (changes per signed batch) to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    batch: Vec<usize>,
    /// Repetitions of each end-to-end measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Working directory (recreated).
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    println!("{}", machine());

    println!(
        "\n### Cost on the department's own writes (SQLite, {} inserts in one transaction)\n",
        args.changes
    );
    println!("| table | time | per insert |\n|---|---|---|");
    for triggers in [false, true] {
        let (elapsed, _) = insert_cost(&dir, args.changes, triggers)?;
        println!(
            "| household {} | {:.0} ms | {:.2} µs |",
            if triggers {
                "with capture triggers"
            } else {
                "without triggers"
            },
            elapsed.as_secs_f64() * 1e3,
            elapsed.as_secs_f64() * 1e6 / args.changes as f64
        );
    }

    println!(
        "\n### End to end: SQLite change table -> signed batches -> QUIC -> durable hub commit\n"
    );
    println!(
        "| mode | batch size | changes | run times (s) | median rows/s |\n|---|---|---|---|---|"
    );
    for &batch in &args.batch {
        for mode in [Mode::Backlog, Mode::Live] {
            let mut times = Vec::new();
            for run in 0..args.runs {
                times.push(end_to_end(
                    &dir.join(format!("{batch}-{mode:?}-{run}")),
                    args.changes,
                    batch,
                    mode,
                )?);
            }
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            println!(
                "| {} | {batch} | {} | {} | {:.0} |",
                mode.describe(),
                args.changes,
                times
                    .iter()
                    .map(|t| format!("{t:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                args.changes as f64 / median
            );
        }
    }

    println!("\n### Signing and verifying one batch (household rows, in process)\n");
    println!(
        "| changes per batch | body bytes | encode+sign | verify_strict+decode+validate | per change (sign / verify) |\n|---|---|---|---|---|"
    );
    for &batch in &args.batch {
        let (bytes, seal, open) = crypto(batch)?;
        println!(
            "| {batch} | {bytes} | {:.1} µs | {:.1} µs | {:.2} / {:.2} µs |",
            seal * 1e6,
            open * 1e6,
            seal * 1e6 / batch as f64,
            open * 1e6 / batch as f64
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The changes wait in the change table; the agent starts and drains them.
    Backlog,
    /// The agent runs; the department commits the changes in one transaction.
    Live,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Mode::Backlog => "backlog: agent starts with N changes waiting",
            Mode::Live => "live: N changes committed while the agent runs",
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!(
        "machine: {cpu}, {cores} cores, {mem} GiB RAM; release build; loopback QUIC; redb and SQLite on the same disk"
    )
}

fn insert_cost(dir: &std::path::Path, n: usize, triggers: bool) -> Result<(Duration, PathBuf)> {
    let db = dir.join(format!("insert-{triggers}.db"));
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(data::HOUSEHOLD_DDL)?;
    conn.execute_batch("PRAGMA journal_mode = WAL")?;
    if triggers {
        let hub = HubProcess::init(&dir.join(format!("insert-hub-{triggers}")))?;
        let r = [ResourceSpec::new(
            "A01/0001",
            "household",
            &["id_number"],
            "realtime",
        )];
        let agent = AgentProcess::init(&dir.join("insert-agent"), &hub, "GA", &db, &r, "")?;
        agent.install_triggers()?;
    }
    let mut rng = Rng::new(1);
    let start = Instant::now();
    let tx = immediate(&conn)?;
    for _ in 0..n {
        data::insert_household(&tx, &mut rng)?;
    }
    tx.commit()?;
    Ok((start.elapsed(), db))
}

/// Returns the seconds from start (agent start, or the commit) to the hub's
/// durable commit of the last batch.
fn end_to_end(dir: &std::path::Path, n: usize, batch: usize, mode: Mode) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let mut hub = HubProcess::init(&dir.join("hub"))?;
    let db = dir.join("dept.db");
    let conn = rusqlite::Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch(data::HOUSEHOLD_DDL)?;
    let resources = [ResourceSpec::new(
        "A01/0001",
        "household",
        &["id_number"],
        "realtime",
    )];
    let mut agent = AgentProcess::init(
        &dir.join("agent"),
        &hub,
        "GA",
        &db,
        &resources,
        &format!("batch_max_changes = {batch}\nbatch_max_size = \"15 MiB\"\nmax_size = \"1 GiB\""),
    )?;
    hub.enroll("GA", "bench", &agent.key)?;
    agent.install_triggers()?;
    hub.start()?;
    let mut rng = Rng::new(batch as u64);
    let insert = |conn: &rusqlite::Connection, rng: &mut Rng| -> Result<()> {
        let tx = immediate(conn)?;
        let mut done = 0;
        while done < n {
            // INSERT OR IGNORE skips the rare repeated ID; count real inserts.
            data::insert_household(&tx, rng)?;
            done += usize::try_from(tx.changes()).unwrap_or(0);
        }
        tx.commit()?;
        Ok(())
    };
    let t0 = match mode {
        Mode::Backlog => {
            insert(&conn, &mut rng)?;
            let t0 = now_millis();
            agent.start()?;
            t0
        }
        Mode::Live => {
            agent.start()?;
            agent.wait_drained(Duration::from_secs(60))?;
            insert(&conn, &mut rng)?;
            now_millis()
        }
    };
    let done = wait_for(
        "the hub to hold every row",
        Duration::from_secs(600),
        || {
            let f = hub.feed_status("GA:A01/0001")?;
            Ok(f.filter(|f| f["rows"].as_u64() == Some(n as u64)))
        },
    )?;
    let t1 = done["last_batch_received_at"].as_i64().unwrap_or(0);
    agent.wait_drained(Duration::from_secs(60))?;
    assert_in_sync(&hub, &agent, &resources)?;
    if done["rejected"] != 0 {
        bail!("the hub rejected batches: {done}");
    }
    agent.stop()?;
    hub.stop()?;
    std::fs::remove_dir_all(dir)?;
    Ok((t1 - t0) as f64 / 1e3)
}

/// Seconds to encode+sign and to verify+decode+validate one batch.
fn crypto(batch: usize) -> Result<(usize, f64, f64)> {
    let key = NodeKey::from_seed([9; 32]);
    let mut rng = Rng::new(3);
    let schema = TableSchema {
        version: 1,
        table: "household".into(),
        columns: [
            "id_number",
            "name",
            "gender",
            "birth_date",
            "address",
            "household_no",
            "photo",
            "updated_at",
        ]
        .iter()
        .map(|c| Column {
            name: c.to_string(),
            sql_type: "TEXT".into(),
            nullable: true,
        })
        .collect(),
        key: vec![0],
    };
    let entries: Vec<Entry> = std::iter::once(Entry::Schema(schema))
        .chain((0..batch).map(|_| {
            let id = data::id_number(&mut rng);
            Entry::Change(RowChange {
                op: Op::Insert,
                key: vec![Value::Text(id.clone())],
                row: Some(vec![
                    Value::Text(id),
                    Value::Text(data::chinese_name(&mut rng)),
                    Value::Text("女".into()),
                    Value::Text("1988-03-14".into()),
                    Value::Text("舟山市定海区解放路88号".into()),
                    Value::Text("000123456".into()),
                    Value::Null,
                    Value::Text("2026-11-21 08:00:00".into()),
                ]),
                schema_version: 1,
            })
        }))
        .collect();
    let body = BatchBody {
        feed: "GA:A01/0001".parse()?,
        seq: 1,
        prev: BatchHash::GENESIS,
        created_at: UnixMillis(0),
        entries,
    };
    let iterations = (200_000 / batch).clamp(20, 2000);
    let start = Instant::now();
    let mut signed = None;
    for _ in 0..iterations {
        signed = Some(SignedBatch::seal(&key, &body)?);
    }
    let seal = start.elapsed().as_secs_f64() / iterations as f64;
    let signed = signed.expect("sealed");
    let start = Instant::now();
    for _ in 0..iterations {
        let opened = signed.open()?;
        std::hint::black_box(opened);
    }
    let open = start.elapsed().as_secs_f64() / iterations as f64;
    Ok((encode(&signed)?.len(), seal, open))
}
