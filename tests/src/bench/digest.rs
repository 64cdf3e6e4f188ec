//! `shuyuan-bench digest`: what proving the copy equal to the source costs.
//!
//! - the digest update per change, in process (row seed + LtHash lanes);
//! - a full recompute from a 1,000,000-row SQLite table, in process, and as
//!   a clean `shuyuan-hub verify` through the release binaries;
//! - localising and repairing k differing rows out of 1,000,000 (rows
//!   changed behind capture's back) with `shuyuan-hub verify`, against a
//!   full-table comparison of the same data (the hub's export and the
//!   source read side by side, the way the end-to-end tests compare).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use shuyuan_protocol::{Digest, RowSeed, Value};
use shuyuan_tests::{AgentSpec, HubProcess, ResourceSpec, assert_in_sync, source_rows};

const DDL: &str = "CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL)";
const DEPT: &str = "GA-330902";
const FEED: &str = "GA-330902:A01/0001";

#[derive(Debug, clap::Args)]
pub struct DigestArgs {
    /// Rows in the table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: i64,
    /// Differing rows to localise and repair, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
    pub differing: Vec<i64>,
}

fn row(i: i64) -> (Vec<Value>, Vec<Value>) {
    (
        vec![Value::Int(i)],
        vec![
            Value::Int(i),
            Value::Text(format!("person {i}")),
            Value::Real(i as f64 / 7.0),
        ],
    )
}

pub fn run(dir: &Path, args: &DigestArgs) -> Result<()> {
    println!("\n### Digest update per change (in process, one core)\n");
    let n = 1_000_000i64;
    let started = Instant::now();
    let mut seeds = Vec::with_capacity(1000);
    for i in 0..n {
        let (k, r) = row(i);
        let s = RowSeed::of(&k, &r);
        if seeds.len() < 1000 {
            seeds.push(s);
        }
    }
    let seed_cost = started.elapsed().as_secs_f64() / n as f64;
    let mut d = Digest::new();
    let started = Instant::now();
    for i in 0..n as usize {
        d.replace(&seeds[i % 1000], &seeds[(i + 1) % 1000]);
    }
    let update_cost = started.elapsed().as_secs_f64() / n as f64;
    println!("| step | per change |\n|---|---|");
    println!(
        "| row seed (postcard + blake3, 64 bytes) | {:.2} µs |",
        seed_cost * 1e6
    );
    println!(
        "| update = remove old + add new (2 × blake3 XOF 2 KiB + 1024-lane add) | {:.2} µs |",
        update_cost * 1e6
    );
    println!(
        "| whole update of one row (new seed + update) | {:.2} µs |",
        (seed_cost + update_cost) * 1e6
    );

    let rows = args.rows;
    std::fs::create_dir_all(dir)?;
    let db = dir.join("dept.db");
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(DDL)?;
    conn.execute_batch("BEGIN")?;
    {
        let mut insert = conn.prepare("INSERT INTO person VALUES (?1, ?2, ?3)")?;
        for i in 1..=rows {
            let (_, r) = row(i);
            let (Value::Text(name), Value::Real(score)) = (&r[1], &r[2]) else {
                bail!("row shape");
            };
            insert.execute(rusqlite::params![i, name, score])?;
        }
    }
    conn.execute_batch("COMMIT")?;

    println!("\n### Full recompute from the source ({rows} rows)\n");
    let started = Instant::now();
    let mut d = Digest::new();
    {
        let mut stmt = conn.prepare("SELECT id, name, score FROM person ORDER BY id")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let id: i64 = r.get(0)?;
            let values = vec![
                Value::Int(id),
                Value::Text(r.get(1)?),
                Value::Real(r.get(2)?),
            ];
            d.add(&RowSeed::of(&[Value::Int(id)], &values));
        }
    }
    let in_process = started.elapsed();
    println!("| how | time | rows/s |\n|---|---|---|");
    println!(
        "| read the table and digest every row, in process | {:.2} s | {:.0} |",
        in_process.as_secs_f64(),
        rows as f64 / in_process.as_secs_f64()
    );

    let mut hub = HubProcess::init(&dir.join("hub"))?;
    hub.start()?;
    let mut agent = AgentSpec::sqlite_file("agent", DEPT, &db)
        .resources(vec![ResourceSpec::new(
            "A01/0001",
            "person",
            &["id"],
            "daily",
        )])
        .outbox("batch_max_changes = 2000\n[verify]\nrows_per_second = 100000000")
        .department_name("bench")
        .create(dir, &hub)?;
    let started = Instant::now();
    agent.start()?;
    agent.wait_drained(std::time::Duration::from_secs(1800))?;
    let load = started.elapsed();
    eprintln!("initial sync of {rows} rows: {:.1} s", load.as_secs_f64());

    let clean = timed_verify(&hub)?;
    println!(
        "| `shuyuan-hub verify`, nothing differs ({} ranges; agent scan + hub compare, unthrottled) | {:.2} s | {:.0} |",
        clean.1["ranges_compared"],
        clean.0,
        rows as f64 / clean.0
    );

    println!("\n### Localise and repair k differing rows out of {rows}\n");
    println!(
        "| k | ranges compared | bytes exchanged | time | full-table comparison: bytes | time |\n|---|---|---|---|---|---|"
    );
    for &k in &args.differing {
        agent.stop()?;
        let before: i64 = conn.query_row(
            "SELECT coalesce(max(id), 0) FROM _shuyuan_changes",
            [],
            |r| r.get(0),
        )?;
        let step = rows / k;
        conn.execute_batch("BEGIN")?;
        for j in 0..k {
            conn.execute(
                "UPDATE person SET score = -score - 1 WHERE id = ?1",
                [1 + j * step + (j % step.max(1))],
            )?;
        }
        conn.execute("DELETE FROM _shuyuan_changes WHERE id > ?1", [before])?;
        conn.execute_batch("COMMIT")?;
        agent.start()?;
        let (secs, run) = timed_verify(&hub)?;
        if run["rows_repaired"].as_i64() != Some(k) || run["finished"]["verified"] != true {
            bail!("run did not repair {k} rows: {run:#}");
        }
        let bytes =
            run["bytes_received"].as_u64().unwrap_or(0) + run["bytes_sent"].as_u64().unwrap_or(0);
        // The full comparison: every row of the copy and of the source.
        let started = Instant::now();
        let export = hub.export_csv(FEED)?;
        let source = source_rows(&db, "person", &["id".to_string()])?;
        let copy = hub.export_jsonl(FEED)?;
        shuyuan_tests::assert_same_rows(&source, &copy)?;
        let full = started.elapsed();
        println!(
            "| {k} | {} | {bytes} ({:.3}% of the export) | {secs:.2} s | {} (CSV export) | {:.2} s |",
            run["ranges_compared"],
            bytes as f64 * 100.0 / export.len() as f64,
            export.len(),
            full.as_secs_f64()
        );
    }
    assert_in_sync(&hub, &agent)?;
    agent.stop()?;
    hub.stop()?;
    Ok(())
}

/// Runs `shuyuan-hub verify` and returns its time and the run record.
fn timed_verify(hub: &HubProcess) -> Result<(f64, Json)> {
    let started = Instant::now();
    let run = hub.verify(FEED).context("shuyuan-hub verify")?;
    Ok((started.elapsed().as_secs_f64(), run))
}
