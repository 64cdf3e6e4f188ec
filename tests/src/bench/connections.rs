//! `./bench.sh connections`: the hub's memory with many agent connections
//! held at once. Enrolls one key per department, then holds that many QUIC
//! connections to the real hub binary, each of which sends a few signed
//! batches (every one acknowledged), and reads the hub's resident memory
//! (`VmRSS`) and its peak (`VmHWM`) from `/proc` with none and with all of
//! them connected.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use shuyuan_protocol::NodeKey;
use shuyuan_tests::HubProcess;
use shuyuan_tests::peer::{connect_departments, enroll_departments, memory_kib};

#[derive(Debug, clap::Args)]
pub struct ConnectionsArgs {
    /// Agent connections held at once (one enrolled key each).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Batches each connection sends before it idles.
    #[arg(long, default_value_t = 5)]
    batches: u64,
    /// Handshakes in flight at once (below the hub's bound of a quarter of
    /// `max_connections`).
    #[arg(long, default_value_t = 32)]
    at_once: usize,
}

pub fn run(dir: &Path, args: &ConnectionsArgs) -> Result<()> {
    let mut hub = HubProcess::init(&dir.join("connections-hub"))?;
    hub.start()?;
    let pid = hub.pid().context("hub pid")?;
    let keys: Vec<NodeKey> = (0..args.agents)
        .map(|_| NodeKey::generate())
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    enroll_departments(&hub, "D", &keys)?;
    let enrolled = start.elapsed();
    let (idle, idle_peak) = memory_kib(pid)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let peers = rt.block_on(connect_departments(
        &hub,
        "D",
        &keys,
        args.batches,
        args.at_once,
    ))?;
    let connected = start.elapsed();
    ensure!(peers.len() == args.agents);
    let (rss, peak) = memory_kib(pid)?;
    rt.block_on(async move { drop(peers) });
    hub.stop()?;

    println!(
        "\n### Hub memory with {} agent connections ({} batches each)\n",
        args.agents, args.batches
    );
    println!(
        "Set-up: {} keys enrolled in {:.1} s; {} connections opened ({} handshakes at a time) and {} batches acknowledged in {:.1} s.\n",
        args.agents,
        enrolled.as_secs_f64(),
        args.agents,
        args.at_once,
        args.agents as u64 * args.batches,
        connected.as_secs_f64()
    );
    println!("| connections | hub RSS | hub peak RSS (VmHWM) | RSS per connection |");
    println!("|---|---|---|---|");
    println!(
        "| 0 | {:.1} MiB | {:.1} MiB | |",
        idle as f64 / 1024.0,
        idle_peak as f64 / 1024.0
    );
    println!(
        "| {} | {:.1} MiB | {:.1} MiB | {:.0} KiB |",
        args.agents,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        rss.saturating_sub(idle) as f64 / args.agents as f64
    );
    Ok(())
}
