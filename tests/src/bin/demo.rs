//! `shuyuan-demo`: a district hub and three department agents on this
//! machine, each next to its own SQLite database of made-up records, with
//! changes flowing and one resource left quiet so that zero-updates (零更新)
//! show; the district hub forwards the shared resources to a city hub
//! (级联), which verifies the departments' own signatures.
//!
//! Run it with `./demo.sh` from the repository root; stop it with Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{AgentSpec, HubProcess, ResourceSpec, assert_in_sync, bin_dir, immediate};

#[derive(Debug, Parser)]
#[command(
    name = "shuyuan-demo",
    about = "Run a hub and three department agents with live changes"
)]
struct Args {
    /// Working directory (recreated on every run).
    #[arg(long, default_value = "target/demo")]
    dir: PathBuf,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

struct Department {
    code: &'static str,
    name: &'static str,
    short: &'static str,
    resources: Vec<ResourceSpec>,
    busy: Vec<&'static str>,
    ddl: Vec<&'static str>,
}

fn departments() -> Vec<Department> {
    vec![
        Department {
            code: "GA-330902",
            name: "定海区公安分局 public security",
            short: "ga",
            resources: vec![ResourceSpec::new(
                "101001/00001",
                "household",
                &["id_number"],
                "realtime",
            )],
            busy: vec!["household"],
            ddl: vec![data::HOUSEHOLD_DDL],
        },
        Department {
            code: "SC-330902",
            name: "定海区市场监督管理局 market regulation",
            short: "sc",
            resources: vec![ResourceSpec::new(
                "102001/00003",
                "business_licence",
                &["credit_code"],
                "daily",
            )],
            busy: vec!["business_licence"],
            ddl: vec![data::LICENCE_DDL],
        },
        Department {
            code: "ZR-330902",
            name: "定海区自然资源和规划分局 natural resources",
            short: "zr",
            resources: vec![
                ResourceSpec::new(
                    "103001/00007",
                    "land_parcel",
                    &["district", "parcel_no"],
                    "daily",
                ),
                ResourceSpec::new(
                    "301015/00009",
                    "planning_permit",
                    &["permit_no"],
                    "irregular",
                )
                .heartbeat("10s"),
            ],
            busy: vec!["land_parcel"],
            ddl: vec![data::PARCEL_DDL, data::PERMIT_DDL],
        },
    ]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bins = bin_dir().to_path_buf();
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("cannot clear {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    println!("shuyuan demo in {}", dir.display());

    // The city platform, and the district platform that forwards to it.
    let mut city = HubProcess::init(&dir.join("city"))?;
    city.rename("舟山市公共数据平台 city platform")?;
    let mut hub = HubProcess::init(&dir.join("hub"))?;
    hub.rename("定海区公共数据平台 district platform")?;
    city.enroll_hub("330902", "定海区公共数据平台", &hub.key)?;
    hub.set_upstream(&city, "")?;
    city.start()?;
    hub.start()?;
    println!("hub listening on {} (key {})", hub.addr, hub.key);
    println!(
        "city hub listening on {} (key {}); the district hub forwards its shared resources there",
        city.addr, city.key
    );

    let mut rng = Rng::new(2026);
    let mut agents = Vec::new();
    let mut dbs = Vec::new();
    for d in departments() {
        let agent = AgentSpec::sqlite(d.short, d.code, &d.ddl)
            .resources(d.resources.clone())
            .department_name(d.name)
            .seed(|conn| fill(conn, &d, &mut rng))
            .create(&dir, &hub)?;
        println!(
            "department {} {}: {} resource(s), agent key {}",
            d.code,
            d.name,
            d.resources.len(),
            agent.key
        );
        dbs.push((agent.database()?, d));
        agents.push(agent);
    }
    for a in &mut agents {
        a.start()?;
    }
    // Each department fills in its catalog (数据资源目录) from a form and
    // submits it; the platform approves two departments' entries and leaves
    // the third waiting for review.
    for (a, (_, d)) in agents.iter().zip(&dbs) {
        shuyuan_tests::wait_for(
            "the agent to read its tables",
            Duration::from_secs(30),
            || {
                let s = a.status()?;
                let read = s["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().all(|r| r["schema_version"].as_u64() > Some(0)));
                Ok(read.then_some(()))
            },
        )?;
        let form = a.dir.join("catalog.csv");
        std::fs::write(&form, catalog_form(d))?;
        a.catalog(&["import", form.to_str().unwrap_or_default()])?;
    }
    wait_for_submissions(&hub, 4)?;
    for code in ["101001/00001", "102001/00003"] {
        hub.catalog(&[
            "review",
            code,
            "--approve",
            "--reviewer",
            "市大数据局 王审核",
        ])?;
    }
    println!(
        "catalogs: 4 entries submitted; 2 approved by the platform, 2 awaiting review (catalog list shows them)"
    );

    let hub_cmd = format!(
        "{} --config {}",
        bins.join("shuyuan-hub").display(),
        hub.config.display()
    );
    println!(
        "\nchanges are flowing; the planning permits (301015/00009) stay quiet and report a zero-update every 10 s."
    );
    println!(
        "open the console (管理控制台) in a browser on this machine: {}/ (metrics at /metrics)",
        hub.admin_url()?
    );
    println!("watch it from another terminal:");
    println!("  {hub_cmd} status");
    for a in &agents {
        println!(
            "  {} --config {} status",
            bins.join("shuyuan-agent").display(),
            a.config.display()
        );
    }
    println!(
        "  {} --config {} status      (the city hub: the district below it, the lag of each level)",
        bins.join("shuyuan-hub").display(),
        city.config.display()
    );
    println!("  {hub_cmd} export 101001/00001 --format csv | head");
    println!("  {hub_cmd} catalog list");
    println!("  {hub_cmd} catalog deadlines");
    println!("  {hub_cmd} audit");
    println!("press Ctrl-C to stop.\n");

    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut changes = 0u64;
    // SIGTERM (a service manager, `kill`) ends the demo like Ctrl-C, so the
    // hub and agents it started stop too.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (conn, d) in &dbs {
            let tx = immediate(conn)?;
            for t in &d.busy {
                for _ in 0..(1 + rng.below(8)) {
                    data::churn_one(&tx, t, &mut rng)?;
                    changes += 1;
                }
            }
            tx.commit()?;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            report(&hub, changes, started)?;
        }
        if args
            .seconds
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
    }

    println!("\nstopping: waiting for the agents to deliver the last changes...");
    let mut all_equal = true;
    for (a, (_, d)) in agents.iter_mut().zip(&dbs) {
        let status = a.wait_drained(Duration::from_secs(60))?;
        match assert_in_sync(&hub, a) {
            Ok(rows) => println!(
                "{} {}: the hub's copy equals the source ({rows} rows compared)",
                d.code, d.name
            ),
            Err(e) => {
                all_equal = false;
                println!("{} {}: DIFFERS: {e:#}", d.code, d.name);
            }
        }
        // The city holds what the district forwarded: every batch, verified
        // against the department's own signature.
        for r in status["resources"].as_array().into_iter().flatten() {
            let feed = format!("{}:{}", d.code, r["code"].as_str().unwrap_or_default());
            let head = r["head_seq"].as_u64().unwrap_or(0);
            shuyuan_tests::wait_for("the city hub to catch up", Duration::from_secs(60), || {
                let at = city
                    .feed_status(&feed)?
                    .and_then(|f| f["last_seq"].as_u64())
                    .unwrap_or(0);
                Ok((at >= head).then_some(()))
            })?;
        }
        match assert_in_sync(&city, a) {
            Ok(rows) => println!(
                "{} {}: the city hub's copy equals the source too ({rows} rows compared)",
                d.code, d.name
            ),
            Err(e) => {
                all_equal = false;
                println!("{} {}: DIFFERS at the city: {e:#}", d.code, d.name);
            }
        }
        a.stop()?;
    }
    hub.stop()?;
    city.stop()?;
    println!("stopped cleanly. files are in {}", dir.display());
    anyhow::ensure!(all_equal, "a shared copy differs from its source");
    Ok(())
}

/// The department's records before its agent is installed: 1,500 rows of
/// each busy table, and 20 planning permits.
fn fill(conn: &rusqlite::Connection, d: &Department, rng: &mut Rng) -> Result<()> {
    let tx = immediate(conn)?;
    for _ in 0..1500 {
        for t in &d.busy {
            match *t {
                "household" => drop(data::insert_household(&tx, rng)?),
                "business_licence" => drop(data::insert_licence(&tx, rng)?),
                _ => data::insert_parcel(&tx, rng)?,
            }
        }
    }
    if d.ddl.contains(&data::PERMIT_DDL) {
        for i in 1..=20 {
            tx.execute(
                "INSERT INTO planning_permit VALUES (?1, ?2, ?3)",
                rusqlite::params![
                    format!("建字第330902202600{i:03}号"),
                    format!("定海区安置房项目第{i}期"),
                    format!("2026-{:02}-15", 1 + i % 12)
                ],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The department's filled-in catalog form, with the Chinese headers.
fn catalog_form(d: &Department) -> String {
    let header = "信息资源代码,信息资源名称,信息资源分类,信息资源提供方,信息资源摘要,信息资源格式,信息项信息,共享类型,共享条件,共享依据,共享方式,开放属性,开放条件,更新周期,状态";
    let rows: Vec<&str> = match d.short {
        "ga" => vec![
            "101001/00001,常住人口户籍登记,基础信息资源,定海区公安分局,辖区常住人口的户籍登记信息,数据库表,id_number:TEXT:公民身份号码:敏感; name:TEXT:姓名:敏感; address:TEXT:户籍地址,有条件共享,仅用于政务服务中的身份核验和户籍信息查询,《中华人民共和国居民身份证法》《户口登记条例》,比对验证;查询引用,不予开放,,实时,已提交",
        ],
        "sc" => vec![
            "102001/00003,企业营业执照,基础信息资源,定海区市场监督管理局,辖区企业营业执照登记信息,数据库表,credit_code:TEXT:统一社会信用代码; name:TEXT:企业名称; legal_rep:TEXT:法定代表人,无条件共享,,,批量复制;查询引用,有条件开放,依申请公开,每日,已提交",
        ],
        _ => vec![
            "103001/00007,宗地信息,基础信息资源,定海区自然资源和规划分局,辖区宗地的位置、面积、用途和权利人,数据库表,district:TEXT:所在区县; parcel_no:INTEGER:宗地号; holder:TEXT:权利人:敏感,有条件共享,用于不动产登记和规划审批,《不动产登记暂行条例》,库表共享,不予开放,,每日,已提交",
            "301015/00009,建设工程规划许可,部门信息资源,定海区自然资源和规划分局,已核发的建设工程规划许可证,数据库表,permit_no:TEXT:许可证号,无条件共享,,,查询引用,无条件开放,,不定期,已提交",
        ],
    };
    format!("{header}\n{}\n", rows.join("\n"))
}

/// Waits until the hub holds `n` submitted entries.
fn wait_for_submissions(hub: &HubProcess, n: usize) -> Result<()> {
    shuyuan_tests::wait_for("the catalogs at the hub", Duration::from_secs(30), || {
        let list = hub.catalog_list()?;
        Ok((list.iter().filter(|e| e["state"] == "submitted").count() >= n).then_some(()))
    })
}

fn report(hub: &HubProcess, changes: u64, started: Instant) -> Result<()> {
    let status = hub.status()?;
    let mut parts = Vec::new();
    for d in status["departments"].as_array().into_iter().flatten() {
        for r in d["resources"].as_array().into_iter().flatten() {
            let zero = if r["last_zero_update"].is_null() {
                String::new()
            } else {
                format!(", zero-update #{}", r["last_zero_update"]["seq"])
            };
            parts.push(format!(
                "{} #{} {} rows{zero}",
                r["feed"].as_str().unwrap_or("?"),
                r["last_seq"],
                r["rows"]
            ));
        }
    }
    println!(
        "[{:>4}s] {changes} changes written; hub: {}",
        started.elapsed().as_secs(),
        parts.join("; ")
    );
    Ok(())
}
