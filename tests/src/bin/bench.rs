//! `shuyuan-bench`: end-to-end rows per second from the SQLite change table
//! to durable hub commit, with the real release binaries on loopback, and
//! the cost of signing and verifying a batch (`feeds`); and the time,
//! bytes, disk and memory of syncing a city catalog (`catalog`).
//!
//! Run with `./bench.sh` (builds release binaries first; `./bench.sh feeds`
//! or `./bench.sh catalog` runs one part). Prints Markdown tables for
//! BENCHMARKS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
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
use shuyuan_tests::{
    AgentProcess, HubProcess, ResourceSpec, assert_in_sync, immediate, now_millis, wait_for,
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
