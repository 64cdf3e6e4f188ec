//! `shuyuan-bench`: end-to-end rows per second from the SQLite change table
//! to durable hub commit, with the real release binaries on loopback, and
//! the cost of signing and verifying a batch (`feeds`); and the time,
//! bytes, disk and memory of syncing a city catalog (`catalog`).
//!
//! Against PostgreSQL's native logical replication on the same pgbench
//! workload (`pg`, run only when asked): source TPS without replication,
//! with native replication and with shuyuan; replication lag during the
//! load; catch-up time after it; initial sync time.
//!
//! What proving the copy equal to the source costs (`digest`): the digest
//! update per change, a full recompute, and localising and repairing k of
//! 1,000,000 rows against a full-table comparison.
//!
//! The admin console, API and metrics scrape with 200 departments and
//! 2,000 feeds in the store (`console`).
//!
//! Federation (`federation`): the latency from a change at the source to
//! each level of a district -> city -> province chain of hubs, and rows per
//! second through a middle hub against straight into one.
//!
//! Memory (`connections`): the hub's resident memory with 1,000 agent
//! connections held at once, against none.
//!
//! Run with `./bench.sh` (builds release binaries first; `./bench.sh feeds`,
//! `./bench.sh catalog`, `./bench.sh pg`, `./bench.sh digest`,
//! `./bench.sh console`, `./bench.sh federation` or `./bench.sh connections` runs one
//! part). Prints Markdown tables for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, SignedBatch};
use shuyuan_protocol::catalog::doc::CatalogDoc;
use shuyuan_protocol::catalog::{
    CatalogEntry, DataItem, Lifecycle, OpenType, ResourceClass, ResourceFormat, ShareMethod,
    ShareType,
};
use shuyuan_protocol::encoding::encode;
use shuyuan_protocol::{
    Column, NodeKey, Op, RowChange, TableSchema, UnixMillis, UpdateCycle, Value,
};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::peer::CatalogPeer;
use shuyuan_tests::pg::{self, PgInstance};
use shuyuan_tests::{
    AgentSpec, HubProcess, ResourceSpec, assert_in_sync, assert_pg_in_sync, immediate, now_millis,
    pg_captured_to, wait_for,
};

#[derive(Debug, Parser)]
#[command(
    name = "shuyuan-bench",
    about = "Measure shuyuan's sync throughput, signing cost and catalog sync"
)]
struct Cli {
    /// Working directory (recreated).
    #[arg(long, default_value = "target/bench", global = true)]
    dir: PathBuf,
    /// What to measure (both when omitted, with their defaults).
    #[command(subcommand)]
    what: Option<What>,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Feed throughput, signing cost and the triggers' cost.
    Feeds(Args),
    /// A city catalog: first sync, one edited field, disk and memory.
    Catalog(CatalogArgs),
    /// PostgreSQL: shuyuan against native logical replication under the
    /// same pgbench load (not part of the default run: needs PostgreSQL).
    Pg(PgArgs),
    /// Consistency proofs: digest cost per change, a full recompute, and
    /// localising k differing rows against a full-table comparison.
    Digest(digest::DigestArgs),
    /// The admin console, JSON API and metrics scrape with 200 departments and 2,000 feeds in the store
    Console(console::ConsoleArgs),
    /// Federation: latency from a source change to the top hub through one,
    /// two and three levels; throughput through a middle hub.
    Federation(federation::FederationArgs),
    /// The hub's memory with 1,000 agent connections held at once.
    Connections(connections::ConnectionsArgs),
}

#[path = "../bench/connections.rs"]
mod connections;
#[path = "../bench/console.rs"]
mod console;
#[path = "../bench/digest.rs"]
mod digest;
#[path = "../bench/federation.rs"]
mod federation;

#[derive(Debug, clap::Args)]
struct PgArgs {
    /// pgbench scale factor (100,000 accounts each).
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Seconds of pgbench load per mode.
    #[arg(long, default_value_t = 30)]
    seconds: u32,
    /// pgbench clients.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Which replication to measure.
    #[arg(long, value_enum, default_value_t = PgMode::All)]
    mode: PgMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PgMode {
    /// No replication: the source alone.
    #[value(name = "none")]
    Alone,
    /// PostgreSQL's publication -> subscription into a second instance.
    Native,
    /// A shuyuan agent reading a logical replication slot, and a hub.
    Shuyuan,
    /// The three, one after the other.
    All,
}

#[derive(Debug, clap::Args)]
struct CatalogArgs {
    /// Departments (one agent and one catalog document each).
    #[arg(long, default_value_t = 100)]
    departments: usize,
    /// Entries per department.
    #[arg(long, default_value_t = 100)]
    entries: usize,
}

#[derive(Debug, clap::Args)]
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.dir.exists() {
        std::fs::remove_dir_all(&cli.dir)?;
    }
    std::fs::create_dir_all(&cli.dir)?;
    let dir = std::fs::canonicalize(&cli.dir)?;
    println!("{}", machine());
    match cli.what {
        Some(What::Feeds(args)) => feeds(&dir, &args),
        Some(What::Catalog(args)) => catalog(&dir, &args),
        Some(What::Pg(args)) => postgres(&dir, &args),
        Some(What::Digest(args)) => digest::run(&dir, &args),
        Some(What::Console(args)) => console::run(&dir, &args),
        Some(What::Federation(args)) => federation::run(&dir, &args),
        Some(What::Connections(args)) => connections::run(&dir, &args),
        None => {
            feeds(
                &dir,
                &Args {
                    changes: 100_000,
                    batch: vec![100, 1000, 5000],
                    runs: 3,
                },
            )?;
            catalog(
                &dir,
                &CatalogArgs {
                    departments: 100,
                    entries: 100,
                },
            )
        }
    }
}

fn feeds(dir: &std::path::Path, args: &Args) -> Result<()> {
    let dir = dir.to_path_buf();

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
        AgentSpec::sqlite_file("insert-agent", "GA", &db)
            .resources(vec![ResourceSpec::household()])
            .unenrolled()
            .create(dir, &hub)?;
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
    let mut agent = AgentSpec::sqlite_file("agent", "GA", &db)
        .resources(vec![ResourceSpec::household()])
        .outbox(&format!(
            "batch_max_changes = {batch}\nbatch_max_size = \"15 MiB\"\nmax_size = \"1 GiB\""
        ))
        .department_name("bench")
        .create(dir, &hub)?;
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
    assert_in_sync(&hub, &agent)?;
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

/// A complete catalog entry of department `d`, number `i`.
fn catalog_entry(d: usize, i: usize, rng: &mut Rng) -> CatalogEntry {
    CatalogEntry {
        code: format!("3{:02}{:03}/{:05}", d % 100, i % 1000, i + 1),
        resource_class: Some(ResourceClass::Department),
        name: format!("部门{d:03}业务数据{i:03}"),
        summary: format!("第{d}个部门的第{i}项业务数据资源，包含办理事项、申请人和办理结果等信息"),
        provider: format!("部门{d:03}"),
        provider_code: format!("D{d:03}"),
        format: Some(ResourceFormat::Table),
        data_items: (0..8)
            .map(|c| DataItem {
                name: format!("field_{c}"),
                data_type: "VARCHAR".into(),
                length: Some(64),
                description: data::chinese_name(rng),
                sensitive: c == 0,
            })
            .collect(),
        share_type: Some(ShareType::Conditional),
        share_conditions: "用于政务服务办理".into(),
        legal_basis: "《政务信息资源共享管理暂行办法》".into(),
        share_methods: vec![ShareMethod::Query, ShareMethod::Verification],
        open_type: Some(OpenType::NotOpen),
        update_cycle: Some(UpdateCycle::Daily),
        status: Some(Lifecycle::Submitted),
        submitted_at: Some(UnixMillis::now()),
        ..CatalogEntry::default()
    }
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn catalog(dir: &std::path::Path, args: &CatalogArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(catalog_async(dir, args))
}

async fn catalog_async(dir: &std::path::Path, args: &CatalogArgs) -> Result<()> {
    let (n, per) = (args.departments, args.entries);
    let mut hub = HubProcess::init(&dir.join("catalog-hub"))?;
    let keys: Vec<NodeKey> = (0..n)
        .map(|_| NodeKey::generate())
        .collect::<Result<_, _>>()?;
    for (d, k) in keys.iter().enumerate() {
        hub.enroll(
            &format!("D{d:03}"),
            &format!("部门{d:03}"),
            &k.id().to_string(),
        )?;
    }
    hub.start()?;
    let pid = hub.pid().unwrap_or(0);
    let rss_before = rss_kib(pid);
    let mut rng = Rng::new(7);
    let mut docs = Vec::new();
    let mut doc_bytes = Vec::new();
    for (d, k) in keys.iter().enumerate() {
        let mut doc = CatalogDoc::new(&format!("D{d:03}").parse()?, &k.id())?;
        for i in 0..per {
            doc.put_entry(&catalog_entry(d, i, &mut rng))?;
        }
        doc_bytes.push(doc.save().len());
        docs.push(doc);
    }
    // Long enough that a busy hub still answers within it; it ends each
    // conversation but is not counted (times run to the last message).
    let quiet = Duration::from_secs(3);

    // First sync: every department at once.
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (d, (k, mut doc)) in keys.iter().cloned().zip(docs).enumerate() {
        let (addr, hub_key) = (hub.addr, hub.key.clone());
        tasks.spawn(async move {
            let dept = format!("D{d:03}");
            let mut peer = CatalogPeer::connect(addr, &hub_key, &k, &dept).await?;
            let talk = peer.converse(&mut doc, &dept, quiet).await?;
            anyhow::Ok((d, peer, doc, talk))
        });
    }
    let mut finished = Vec::new();
    while let Some(r) = tasks.join_next().await {
        finished.push(r??);
    }
    finished.sort_by_key(|f| f.0);
    let first_end = finished
        .iter()
        .filter_map(|f| f.3.last_activity)
        .max()
        .unwrap_or(start);
    let first_secs = first_end.duration_since(start).as_secs_f64();
    let (sent, received): (usize, usize) = finished.iter().fold((0, 0), |a, f| {
        (a.0 + f.3.bytes_sent, a.1 + f.3.bytes_received)
    });
    let messages: usize = finished
        .iter()
        .map(|f| f.3.messages_sent + f.3.messages_received)
        .sum();
    if let Some(r) = finished.iter().find_map(|f| f.3.refusal.as_ref()) {
        bail!("the hub refused a catalog: {}", r.detail);
    }
    let all = wait_for("every entry at the hub", Duration::from_secs(120), || {
        let list = hub.catalog_list()?;
        Ok((list.len() == n * per).then_some(list))
    })?;
    let rss_after = rss_kib(pid);

    // One edited field in one department, on the open connection.
    let (_, peer, doc, _) = &mut finished[0];
    let mut e = doc
        .entry(&catalog_entry(0, 0, &mut rng).code)
        .expect("entry");
    e.summary.push_str("（已更新）");
    doc.put_entry(&e)?;
    let start = Instant::now();
    let talk = peer.converse(doc, "D000", quiet).await?;
    let edit_secs = talk
        .last_activity
        .map_or(0.0, |t| t.duration_since(start).as_secs_f64());
    let edited = wait_for("the edit at the hub", Duration::from_secs(10), || {
        let list = hub.catalog_list()?;
        Ok(list
            .iter()
            .any(|x| {
                x["entry"]["summary"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("（已更新）"))
            })
            .then_some(()))
    });
    edited?;
    let list_start = Instant::now();
    let listed = hub.catalog(&["list", "--json"])?;
    let list_secs = list_start.elapsed().as_secs_f64();
    let store = std::fs::metadata(hub.dir.join("data/hub.redb"))?.len();
    hub.stop()?;

    let mut sizes = doc_bytes.clone();
    sizes.sort_unstable();
    println!(
        "\n### Catalog: {n} departments x {per} entries ({} entries, 8 data items each)\n",
        all.len()
    );
    println!("| what | figure |\n|---|---|");
    println!(
        "| first sync, all departments at once (wall time to the last message) | {first_secs:.2} s |"
    );
    println!(
        "| first sync, sync-message bytes agent->hub / hub->agent | {:.1} MB / {:.1} KB ({messages} messages) |",
        sent as f64 / 1e6,
        received as f64 / 1e3
    );
    println!(
        "| one edited field: time / bytes agent->hub / hub->agent | {:.1} ms / {} B / {} B ({} messages) |",
        edit_secs * 1e3,
        talk.bytes_sent,
        talk.bytes_received,
        talk.messages_sent + talk.messages_received
    );
    println!(
        "| one department's document (automerge, saved) median / largest | {:.1} KB / {:.1} KB |",
        sizes[sizes.len() / 2] as f64 / 1e3,
        sizes.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!(
        "| hub store (hub.redb) after the sync | {:.1} MB |",
        store as f64 / 1e6
    );
    println!(
        "| hub resident memory before / after | {:.1} MB / {:.1} MB |",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "| `shuyuan-hub catalog list --json` of all entries (process start to end) | {:.2} s, {:.1} MB of JSON |",
        list_secs,
        listed.len() as f64 / 1e6
    );
    Ok(())
}

/// The server settings of every instance the `pg` benchmark starts: the
/// harness's defaults (wal_level=logical, synchronous_commit=on, 128 MB of
/// shared buffers, max_wal_size 1 GB) with durable commits.
const PG_BENCH_SETTINGS: &[(&str, &str)] = &[("fsync", "on")];

/// The pgbench tables, in the publication and as shuyuan resources.
const PGBENCH_TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// One probe row is inserted at the source this often during the load.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// One line of the PostgreSQL table.
#[derive(Debug, Default)]
struct PgFigures {
    what: String,
    tps: f64,
    /// Probe lags in seconds, sorted.
    lags: Vec<f64>,
    catch_up: Option<Duration>,
    initial_sync: Option<Duration>,
    /// How the replica was watched, for the notes under the table.
    notes: Vec<String>,
}

fn postgres(dir: &Path, args: &PgArgs) -> Result<()> {
    let version = pg::version()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let accounts = u64::from(args.scale) * 100_000;
    println!(
        "{version}; nproc {cores}; every instance on this machine with fsync=on, synchronous_commit=on, shared_buffers=128MB"
    );
    let modes = match args.mode {
        PgMode::All => vec![PgMode::Alone, PgMode::Native, PgMode::Shuyuan],
        m => vec![m],
    };
    if modes.contains(&PgMode::Shuyuan) {
        // Fails now, naming what to build, rather than after the other modes.
        shuyuan_tests::bin_dir();
    }
    let mut lines = Vec::new();
    for mode in modes {
        let d = dir.join(format!("pg-{mode:?}").to_lowercase());
        std::fs::create_dir_all(&d)?;
        let figures = match mode {
            PgMode::Alone => pg_alone(&d, args)?,
            PgMode::Native => pg_native(&d, args)?,
            PgMode::Shuyuan => pg_shuyuan(&d, args)?,
            PgMode::All => unreachable!("expanded above"),
        };
        lines.push(figures);
        // The instances are gone; free the disk before the next mode.
        std::fs::remove_dir_all(&d)?;
    }

    let j = args.clients.min(2);
    println!(
        "\n### PostgreSQL: native logical replication and shuyuan under `pgbench -T {} -c {} -j {j} -n` (scale {}, {accounts} accounts)\n",
        args.seconds, args.clients, args.scale
    );
    println!(
        "| replication | source TPS | lag p50 | lag p99 | catch-up after load | initial sync of {accounts} accounts |\n|---|---|---|---|---|---|"
    );
    let ms = |v: f64| format!("{:.0} ms", v * 1e3);
    let secs = |d: Option<Duration>| match d {
        None => "—".to_string(),
        Some(d) if d < Duration::from_secs(1) => format!("{} ms", d.as_millis()),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    };
    for f in &lines {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} |",
            f.what,
            f.tps,
            percentile(&f.lags, 0.50).map_or("—".into(), ms),
            percentile(&f.lags, 0.99).map_or("—".into(), ms),
            secs(f.catch_up),
            secs(f.initial_sync)
        );
    }
    println!();
    for f in &lines {
        for n in &f.notes {
            println!("- {}: {n}", f.what);
        }
    }
    Ok(())
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A source instance with the pgbench tables at `scale`, the history table
/// keyed by its whole row for replication, and the probe table.
fn pg_source(dir: &Path, args: &PgArgs) -> Result<PgInstance> {
    let source = PgInstance::start_with(&dir.join("source"), PG_BENCH_SETTINGS)?;
    eprintln!("pgbench -i -s {} on {}", args.scale, source.dsn());
    source.pgbench(&["-i", "-q", "-s", &args.scale.to_string()])?;
    // pgbench_history has no key: native replication needs REPLICA IDENTITY
    // FULL for updates and deletes (pgbench only inserts), shuyuan to key
    // the table by its whole row. Set for both, for parity.
    source.sql(
        "ALTER TABLE pgbench_history REPLICA IDENTITY FULL; \
         CREATE TABLE shuyuan_probe (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
    )?;
    Ok(source)
}

/// Starts the measured load on `source` (after a checkpoint, so that every
/// mode starts from the same state).
fn start_load(source: &PgInstance, args: &PgArgs) -> Result<Child> {
    source.sql("CHECKPOINT")?;
    eprintln!(
        "pgbench -T {} -c {} on {}",
        args.seconds,
        args.clients,
        source.dsn()
    );
    source.pgbench_spawn(&[
        "-T",
        &args.seconds.to_string(),
        "-c",
        &args.clients.to_string(),
        "-j",
        &args.clients.min(2).to_string(),
        "-n",
    ])
}

/// Waits for pgbench and returns its TPS ("tps = N (without initial
/// connection time)").
fn finish_load(load: Child) -> Result<f64> {
    let out = load.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tps_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tps = ")).collect();
    let line = tps_lines
        .iter()
        .find(|l| l.contains("without initial connection time") || l.contains("excluding"))
        .or(tps_lines.first())
        .ok_or_else(|| anyhow::anyhow!("no tps line in pgbench's output:\n{stdout}"))?;
    Ok(line
        .trim_start_matches("tps = ")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .parse()?)
}

fn pg_alone(dir: &Path, args: &PgArgs) -> Result<PgFigures> {
    let source = pg_source(dir, args)?;
    let tps = finish_load(start_load(&source, args)?)?;
    Ok(PgFigures {
        what: "none (the source alone)".into(),
        tps,
        ..PgFigures::default()
    })
}

/// A blocking tokio-postgres connection on its own single-threaded runtime
/// (cheaper and steadier than a psql process per query while polling).
struct Conn {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Conn {
    fn open(dsn: &str) -> Result<Conn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt.block_on(pg::connect(dsn))?;
        Ok(Conn { rt, client })
    }

    /// The first row of `sql`, every column a bigint.
    fn ints(&self, sql: &str) -> Result<Vec<i64>> {
        let row = self.rt.block_on(self.client.query_one(sql, &[]))?;
        (0..row.len())
            .map(|i| Ok(row.try_get::<_, i64>(i)?))
            .collect()
    }
}

/// What catch-up compares between the source and a native replica.
const STATE_SQL: &str = "SELECT (SELECT count(*) FROM pgbench_accounts), \
     (SELECT coalesce(sum(abalance), 0)::bigint FROM pgbench_accounts), \
     (SELECT count(*) FROM pgbench_history)";

fn pg_native(dir: &Path, args: &PgArgs) -> Result<PgFigures> {
    let source = pg_source(dir, args)?;
    let target = PgInstance::start_with(&dir.join("target"), PG_BENCH_SETTINGS)?;
    // Empty tables with their primary keys (pgbench's steps: drop, create
    // tables, primary keys): the apply worker finds updated rows by key.
    target.pgbench(&["-i", "-I", "dtp", "-s", &args.scale.to_string()])?;
    target.sql(
        "CREATE TABLE shuyuan_probe (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
    )?;
    source.sql(&format!(
        "CREATE PUBLICATION p FOR TABLE {}, shuyuan_probe",
        PGBENCH_TABLES.join(", ")
    ))?;
    let accounts = i64::from(args.scale) * 100_000;

    // Initial sync: from CREATE SUBSCRIPTION (which also creates the slot
    // at the source) until every table is ready and the accounts are there.
    eprintln!("native: initial sync");
    let replica = Conn::open(&target.dsn())?;
    let start = Instant::now();
    target.sql(&format!(
        "CREATE SUBSCRIPTION s CONNECTION {} PUBLICATION p",
        pg::quote_literal(&source.dsn())
    ))?;
    poll_until(
        "the subscription's initial sync",
        Duration::from_millis(50),
        || {
            let v = replica.ints(
                "SELECT (SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'), \
                    (SELECT count(*) FROM pgbench_accounts)",
            )?;
            Ok(v == [0, accounts])
        },
    )?;
    let initial_sync = start.elapsed();

    let watch_every = Duration::from_millis(10);
    let watcher = Conn::open(&target.dsn())?;
    let newest = || Ok(watcher.ints("SELECT coalesce(max(id), 0) FROM shuyuan_probe")?[0]);
    let origin = ProbeConn::open(&source.dsn())?;
    let (tps, probe, catch_up) = under_load(&source, args, watch_every, newest, |ended, probe| {
        // One apply worker applies the source's transactions in commit
        // order: once a probe row committed after the load is at the
        // subscriber, so is every pgbench transaction.
        let marker = probe.send_one(&origin)?;
        probe.wait_seen(marker)?;
        Ok(ended.elapsed())
    })?;
    // Not timed: the subscriber holds what the source holds.
    let (want, got) = (origin.conn.ints(STATE_SQL)?, replica.ints(STATE_SQL)?);
    if want != got {
        bail!(
            "after catch-up the subscriber's accounts (count, sum of balances) and history count {got:?} differ from the source's {want:?}"
        );
    }
    Ok(PgFigures {
        what: "native (publication -> subscription)".into(),
        tps,
        notes: vec![
            probe.describe("SELECT max(id) on the subscriber"),
            "catch-up runs from pgbench's end until a probe row committed after it is at the subscriber (one apply worker, commit order), then the accounts' count and sum of balances and the history's count are checked equal to the source's; initial sync runs from CREATE SUBSCRIPTION, slot creation included".into(),
        ],
        lags: probe.lags,
        catch_up: Some(catch_up),
        initial_sync: Some(initial_sync),
    })
}

fn pg_shuyuan(dir: &Path, args: &PgArgs) -> Result<PgFigures> {
    let source = pg_source(dir, args)?;
    let mut hub = HubProcess::init(&dir.join("hub"))?;
    let dept = "PGB";
    let code = |table: &str| format!("PG/{}", table.trim_start_matches("pgbench_"));
    let mut resources: Vec<ResourceSpec> = PGBENCH_TABLES
        .iter()
        .map(|t| ResourceSpec::new(&code(t), t, &[], "realtime"))
        .collect();
    resources.push(ResourceSpec::new(
        "PG/probe",
        "shuyuan_probe",
        &[],
        "realtime",
    ));
    let mut agent = AgentSpec::postgres("agent", dept, &source)
        .resources(resources)
        .outbox("batch_max_changes = 5000\nbatch_max_size = \"15 MiB\"\nmax_size = \"4 GiB\"")
        .configured_only()
        .create(dir, &hub)?;
    hub.enroll(dept, "pgbench", &agent.key)?;
    hub.start()?;
    let setup_start = Instant::now();
    agent.pg_setup()?;
    let setup = setup_start.elapsed();

    // Initial sync: from the agent's start until the hub holds every row of
    // the accounts, branches and tellers.
    eprintln!("shuyuan: initial sync");
    let scale = u64::from(args.scale);
    let want = [
        (code("pgbench_accounts"), scale * 100_000),
        (code("pgbench_branches"), scale),
        (code("pgbench_tellers"), scale * 10),
    ];
    // The hub is watched from a thread while the agent starts: the initial
    // load may be over before the agent's status answers.
    let start = Instant::now();
    let failed = AtomicBool::new(false);
    let (initial_sync, polls) = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let mut polls = 0u32;
            poll_until(
                "the hub to hold the pgbench tables",
                Duration::from_millis(50),
                || {
                    if failed.load(Ordering::SeqCst) {
                        bail!("the agent did not start");
                    }
                    polls += 1;
                    let rows = hub_rows(&hub, dept)?;
                    Ok(want
                        .iter()
                        .all(|(c, n)| rows.iter().any(|(r, m)| r == c && m == n)))
                },
            )?;
            anyhow::Ok((start.elapsed(), polls))
        });
        if let Err(e) = agent.start() {
            failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        watch
            .join()
            .map_err(|_| anyhow::anyhow!("the initial sync watcher panicked"))?
    })?;
    let status_poll = {
        let t = Instant::now();
        hub_rows(&hub, dept)?;
        t.elapsed()
    };
    // The load starts from a quiet agent (the initial load's end sent).
    agent.wait_drained(Duration::from_secs(600))?;

    let probe_feed = format!("{dept}:PG/probe");
    let newest = || {
        let rows = hub.export_jsonl(&probe_feed)?;
        Ok(rows
            .iter()
            .filter_map(|r| r["id"].as_i64())
            .max()
            .unwrap_or(0))
    };
    let mut catch_polls = 0u32;
    let (tps, probe, catch_up) = under_load(
        &source,
        args,
        Duration::from_millis(20),
        newest,
        |ended, _| {
            // Caught up: the agent has read the slot up to the WAL position
            // at the load's end, no initial load or resync runs, and the
            // hub acknowledged (after its durable commit) every batch
            // sealed. (The probe rows are another feed: they say nothing of
            // the pgbench tables' feeds.)
            let target = source.current_lsn()?;
            poll_until("the agent to catch up", Duration::from_millis(20), || {
                catch_polls += 1;
                Ok(pg_captured_to(&agent.status()?, target))
            })?;
            Ok(ended.elapsed())
        },
    )?;
    let agent_poll = {
        let t = Instant::now();
        agent.status()?;
        t.elapsed()
    };

    // Not timed: the hub's copy of every table equals the source's.
    eprintln!("shuyuan: comparing the hub's copies with the source");
    let compared = assert_pg_in_sync(&hub, &agent, &source)?;
    agent.stop()?;
    hub.stop()?;
    Ok(PgFigures {
        what: "shuyuan (agent -> hub)".into(),
        tps,
        notes: vec![
            probe.describe(&format!(
                "`shuyuan-hub export {probe_feed} --format jsonl` (a process per poll)"
            )),
            format!(
                "catch-up runs from pgbench's end until `shuyuan-agent status` (polled every 20 ms, {catch_polls} polls, one takes {:.0} ms) shows the slot read up to the WAL position at that end, no load running, and every batch acknowledged by the hub after its durable commit; initial sync runs from the agent's start, polling `shuyuan-hub status --json` every 50 ms (polls: {polls}, one takes {:.0} ms); `pg setup` (publication and slot) took {:.2} s before it, not counted; afterwards the hub's CSV export of all {} tables equals the source's COPY ({compared} rows)",
                agent_poll.as_secs_f64() * 1e3,
                status_poll.as_secs_f64() * 1e3,
                setup.as_secs_f64(),
                agent.resources.len()
            ),
        ],
        lags: probe.lags,
        catch_up: Some(catch_up),
        initial_sync: Some(initial_sync),
    })
}

/// Rows per resource of `department` at the hub.
fn hub_rows(hub: &HubProcess, department: &str) -> Result<Vec<(String, u64)>> {
    let status = hub.status()?;
    let prefix = format!("{department}:");
    Ok(status["departments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["resources"].as_array().into_iter().flatten())
        .filter_map(|r| {
            let code = r["feed"].as_str()?.strip_prefix(&prefix)?;
            Some((code.to_string(), r["rows"].as_u64()?))
        })
        .collect())
}

/// Calls `done` every `every` until it says yes (an error ends the wait),
/// for at most ten minutes.
fn poll_until(what: &str, every: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        let t = Instant::now();
        if done().with_context(|| format!("while waiting for {what}"))? {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("timed out after 10 min waiting for {what}");
        }
        std::thread::sleep(every.saturating_sub(t.elapsed()));
    }
}

/// What the probe saw.
#[derive(Debug)]
struct ProbeResult {
    /// Seconds from sending each probe row to seeing it, sorted, for the
    /// rows sent during the load.
    lags: Vec<f64>,
    every: Duration,
    polls: u64,
    poll_time: Duration,
}

impl ProbeResult {
    fn describe(&self, how: &str) -> String {
        format!(
            "lag: {} probe rows, one every {} ms at the source during the load (its own connection; timed from just before the INSERT), seen with {how} every {} ms ({} polls, mean {:.1} ms each); a lag includes up to one poll interval and one poll",
            self.lags.len(),
            PROBE_EVERY.as_millis(),
            self.every.as_millis(),
            self.polls,
            self.poll_time.as_secs_f64() * 1e3 / self.polls.max(1) as f64
        )
    }
}

/// Probe rows sent so far, and when; what the replica has shown.
#[derive(Debug, Default)]
struct Probe {
    /// The send instant of probe id `i + 1`. Held across the INSERT, so
    /// that ids commit in order.
    sent: Mutex<Vec<Instant>>,
    /// The highest probe id seen at the replica.
    seen: AtomicI64,
    /// The load is over: the sender stops.
    stop: AtomicBool,
    /// Catch-up is measured: the watcher stops once every sent row arrived.
    finish: AtomicBool,
    /// Something failed: stop at once.
    abort: AtomicBool,
}

/// Sets `abort` unless disarmed, so that no probe thread outlives a failure.
struct AbortOnDrop<'a>(&'a Probe, bool);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if self.1 {
            for flag in [&self.0.stop, &self.0.finish, &self.0.abort] {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// A connection to the source with the probe INSERT prepared.
struct ProbeConn {
    conn: Conn,
    insert: tokio_postgres::Statement,
}

impl ProbeConn {
    fn open(dsn: &str) -> Result<ProbeConn> {
        let conn = Conn::open(dsn)?;
        let insert = conn.rt.block_on(
            conn.client
                .prepare("INSERT INTO shuyuan_probe (id) VALUES ($1)"),
        )?;
        Ok(ProbeConn { conn, insert })
    }
}

impl Probe {
    fn sent(&self) -> Result<std::sync::MutexGuard<'_, Vec<Instant>>> {
        self.sent
            .lock()
            .map_err(|_| anyhow::anyhow!("a probe thread panicked"))
    }

    /// Inserts the next probe row (autocommit); returns its id.
    fn send_one(&self, source: &ProbeConn) -> Result<i64> {
        let mut sent = self.sent()?;
        sent.push(Instant::now());
        let id = i64::try_from(sent.len())?;
        source
            .conn
            .rt
            .block_on(source.conn.client.execute(&source.insert, &[&id]))?;
        Ok(id)
    }

    /// Inserts probe rows into the source every [`PROBE_EVERY`] until told
    /// to stop.
    fn send(&self, dsn: &str) -> Result<()> {
        let source = ProbeConn::open(dsn)?;
        let mut next = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            self.send_one(&source)?;
            next += PROBE_EVERY;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }

    /// Waits until the replica has shown probe row `id`.
    fn wait_seen(&self, id: i64) -> Result<()> {
        poll_until(
            "a probe row at the replica",
            Duration::from_millis(1),
            || {
                if self.abort.load(Ordering::SeqCst) {
                    bail!("aborted");
                }
                Ok(self.seen.load(Ordering::SeqCst) >= id)
            },
        )
    }

    /// Polls `newest` (the highest probe id at the replica) every `every`
    /// until told to finish and every sent row arrived; returns each sent
    /// row's send and arrival instants, and the polls' count and time.
    #[allow(clippy::type_complexity)]
    fn watch(
        &self,
        every: Duration,
        mut newest: impl FnMut() -> Result<i64>,
    ) -> Result<(Vec<(Instant, Instant)>, u64, Duration)> {
        let mut arrived: Vec<Instant> = Vec::new();
        let (mut polls, mut poll_time) = (0u64, Duration::ZERO);
        let mut finishing: Option<Instant> = None;
        let mut last_err = None;
        loop {
            if self.abort.load(Ordering::SeqCst) {
                bail!("aborted");
            }
            let t = Instant::now();
            let seen = newest();
            let now = Instant::now();
            polls += 1;
            poll_time += now - t;
            match seen {
                Ok(n) => {
                    while i64::try_from(arrived.len())? < n {
                        arrived.push(now);
                    }
                    self.seen.fetch_max(n, Ordering::SeqCst);
                }
                // The replica may not have the probe table yet.
                Err(e) => last_err = Some(e),
            }
            if self.finish.load(Ordering::SeqCst) {
                let sent = self.sent()?.len();
                if arrived.len() >= sent {
                    break;
                }
                if finishing.get_or_insert(now).elapsed() > Duration::from_secs(600) {
                    bail!(
                        "{} of {sent} probe rows arrived{}",
                        arrived.len(),
                        last_err
                            .map(|e| format!(" (last error: {e:#})"))
                            .unwrap_or_default()
                    );
                }
            }
            std::thread::sleep(every.saturating_sub(t.elapsed()));
        }
        let pairs = self.sent()?.iter().copied().zip(arrived).collect();
        Ok((pairs, polls, poll_time))
    }
}

/// Runs the load on `source` with the probe sending to it and watching the
/// replica through `newest`; when pgbench ends, runs `catch_up` with the
/// instant it ended and the probe. Returns the TPS, the probe's findings and
/// what `catch_up` returned.
fn under_load<C>(
    source: &PgInstance,
    args: &PgArgs,
    watch_every: Duration,
    newest: impl FnMut() -> Result<i64> + Send,
    catch_up: impl FnOnce(Instant, &Probe) -> Result<C>,
) -> Result<(f64, ProbeResult, C)> {
    let probe = Probe::default();
    let dsn = source.dsn();
    std::thread::scope(|s| {
        let mut guard = AbortOnDrop(&probe, true);
        let sender = s.spawn(|| probe.send(&dsn));
        let watcher = s.spawn(|| probe.watch(watch_every, newest));
        let load = start_load(source, args)?;
        let tps = finish_load(load)?;
        let ended = Instant::now();
        probe.stop.store(true, Ordering::SeqCst);
        eprintln!("load over ({tps:.0} TPS): catching up");
        let caught_up = catch_up(ended, &probe)?;
        probe.finish.store(true, Ordering::SeqCst);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the probe sender panicked"))??;
        let (pairs, polls, poll_time) = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the probe watcher panicked"))??;
        guard.1 = false;
        let mut lags: Vec<f64> = pairs
            .iter()
            .filter(|(sent, _)| *sent < ended)
            .map(|(sent, seen)| seen.saturating_duration_since(*sent).as_secs_f64())
            .collect();
        lags.sort_by(f64::total_cmp);
        let seen = ProbeResult {
            lags,
            every: watch_every,
            polls,
            poll_time,
        };
        Ok((tps, seen, caught_up))
    })
}
