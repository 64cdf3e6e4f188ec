//! Crash faults: a seeded driver SIGKILLs the agent, the hub or the source
//! database at random moments while the department keeps writing, restarts
//! the victim, and waits for the stream to move again before the next
//! crash. Afterwards the hub's copy equals the source row by row, every
//! batch was applied exactly once (no duplicate, no gap) and nothing was
//! refused.
//!
//! The seed is printed at the start; replay a run with
//! `SHUYUAN_CRASH_SEED=N cargo test -p shuyuan-tests --test crash`.
//! `SHUYUAN_CRASH_CYCLES` raises the number of crashes (at least the
//! default is always run).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::pg::PgInstance;
use shuyuan_tests::{
    AgentProcess, HubProcess, ResourceSpec, Sandbox, assert_in_sync, assert_pg_in_sync, bin,
    wait_for,
};

/// The tests each run many processes; together on two cores they would
/// only slow each other down.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the driver kills in one cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Agent,
    Hub,
    Source,
}

const VICTIMS: [Victim; 3] = [Victim::Agent, Victim::Hub, Victim::Source];

/// The seed from `SHUYUAN_CRASH_SEED`, else from the clock; printed with
/// the command that replays it.
fn seed(test: &str) -> Result<u64> {
    let seed = match std::env::var("SHUYUAN_CRASH_SEED") {
        Ok(s) => s
            .parse()
            .with_context(|| format!("SHUYUAN_CRASH_SEED={s} is not a number"))?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    eprintln!(
        "crash driver seed {seed}; replay with: \
         SHUYUAN_CRASH_SEED={seed} cargo test -p shuyuan-tests --test crash {test}"
    );
    Ok(seed)
}

/// `min` crash cycles, or more if `SHUYUAN_CRASH_CYCLES` asks for more.
fn cycles(min: usize) -> usize {
    std::env::var("SHUYUAN_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .map_or(min, |c: usize| c.max(min))
}

/// A hub, an agent and a source with a writer, which the driver can crash.
trait Rig {
    /// Kills `victim` with SIGKILL, waits `down`, and starts it again.
    fn crash(&mut self, victim: Victim, down: Duration) -> Result<()>;
    /// The hub's host, to read progress from.
    fn hub(&self) -> &HubProcess;
}

/// Batches the hub applied, over every feed.
fn applied(hub: &HubProcess) -> Result<u64> {
    let status = hub.status()?;
    Ok(status["departments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["resources"].as_array().into_iter().flatten())
        .filter_map(|r| r["batches_applied"].as_u64())
        .sum())
}

/// Runs `n` cycles: after a random delay, a random victim is killed and
/// restarted, then the driver waits until the hub applied a batch it did
/// not have at the crash, so that every crash lands in a live stream.
/// Returns how often each victim was killed.
fn drive(rig: &mut dyn Rig, rng: &mut Rng, n: usize) -> Result<[usize; 3]> {
    let mut killed = [0; 3];
    for cycle in 1..=n {
        std::thread::sleep(Duration::from_millis(200 + rng.below(2300)));
        let victim = *rng.pick(&VICTIMS);
        let down = Duration::from_millis(rng.below(1000));
        let before = applied(rig.hub())?;
        let at = Instant::now();
        rig.crash(victim, down)
            .with_context(|| format!("cycle {cycle}: crashing the {victim:?}"))?;
        wait_for(
            &format!("the stream to move again after cycle {cycle} ({victim:?})"),
            Duration::from_secs(120),
            || Ok((applied(rig.hub())? > before).then_some(())),
        )?;
        eprintln!(
            "cycle {cycle}: killed the {victim:?} after {before} batches, down {down:?}, \
             moving again {:?} after the kill",
            at.elapsed()
        );
        killed[VICTIMS.iter().position(|v| *v == victim).unwrap_or(0)] += 1;
    }
    Ok(killed)
}

/// Every batch of every feed was applied exactly once: sequence numbers
/// are gap-free by construction, and a duplicate or replay would have been
/// refused and counted rather than applied.
fn applied_once(sb: &Sandbox) -> Result<()> {
    let status = sb.hub.status()?;
    for d in status["departments"].as_array().into_iter().flatten() {
        for f in d["resources"].as_array().into_iter().flatten() {
            assert_eq!(f["batches_applied"], f["last_seq"], "{f}");
            assert_eq!(f["rejected"], 0, "{f}");
        }
    }
    sb.assert_no_rejections()
}

/// The writer process (`shuyuan-crash-writer`); killed when dropped.
#[derive(Debug)]
struct WriterProcess {
    child: Child,
    log: PathBuf,
}

impl WriterProcess {
    fn spawn(db: &Path, seed: u64, log: &Path) -> Result<WriterProcess> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin("shuyuan-crash-writer"))
            .arg(db)
            .arg(seed.to_string())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("cannot start shuyuan-crash-writer")?;
        Ok(WriterProcess {
            child,
            log: log.to_owned(),
        })
    }

    /// SIGKILL, after checking that it did not stop by itself.
    fn kill(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the writer stopped by itself ({status}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for WriterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct SqliteRig {
    sb: Sandbox,
    agent: AgentProcess,
    db: PathBuf,
    writer: WriterProcess,
    incarnation: u64,
    seed: u64,
}

impl SqliteRig {
    fn respawn_writer(&mut self) -> Result<()> {
        self.incarnation += 1;
        let log = self.sb.dir.path().join("writer.log");
        self.writer = WriterProcess::spawn(&self.db, self.seed ^ self.incarnation, &log)?;
        Ok(())
    }
}

impl Rig for SqliteRig {
    fn crash(&mut self, victim: Victim, down: Duration) -> Result<()> {
        match victim {
            Victim::Agent => self.agent.kill()?,
            Victim::Hub => self.sb.hub.kill()?,
            Victim::Source => self.writer.kill()?,
        }
        std::thread::sleep(down);
        match victim {
            Victim::Agent => self.agent.start(),
            Victim::Hub => self.sb.hub.start(),
            Victim::Source => self.respawn_writer(),
        }
    }

    fn hub(&self) -> &HubProcess {
        &self.sb.hub
    }
}

#[test]
fn random_sigkills_of_agent_hub_and_sqlite_writer_lose_and_repeat_nothing() -> Result<()> {
    let _serial = serial();
    let seed = seed("random_sigkills_of_agent_hub_and_sqlite_writer")?;
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut sb = Sandbox::new()?;
    let (db, _) = sb.database("dept.db", &[data::HOUSEHOLD_DDL, data::PARCEL_DDL])?;
    let resources = vec![
        ResourceSpec::household(),
        ResourceSpec::new(
            "B02/0007",
            "land_parcel",
            &["district", "parcel_no"],
            "realtime",
        ),
    ];
    sb.hub.start()?;
    // Small batches keep many in flight when a crash lands.
    let mut agent = sb.agent("ga", "GA", &db, &resources, "batch_max_changes = 20")?;
    agent.start()?;
    let writer = WriterProcess::spawn(&db, seed, &sb.dir.path().join("writer.log"))?;
    let mut rig = SqliteRig {
        sb,
        agent,
        db,
        writer,
        incarnation: 0,
        seed,
    };
    let n = cycles(20);
    let killed = drive(&mut rig, &mut rng, n)?;
    rig.writer.kill()?;
    let stopped = Instant::now();
    rig.agent.wait_drained(Duration::from_secs(180))?;
    let drained = stopped.elapsed();
    let rows = assert_in_sync(&rig.sb.hub, &rig.agent, &resources)?;
    applied_once(&rig.sb)?;
    eprintln!(
        "seed {seed}: {n} crashes (agent {}, hub {}, writer {}), {rows} rows equal, \
         {} batches applied once; drained {drained:?} after the last write; {:?} in all",
        killed[0],
        killed[1],
        killed[2],
        applied(&rig.sb.hub)?,
        started.elapsed()
    );
    Ok(())
}

/// pgbench against a PostgreSQL source, restarted when the server was
/// killed under it; its process group is killed when dropped.
#[derive(Debug)]
struct Pgbench(Child);

impl Pgbench {
    fn spawn(pg: &PgInstance) -> Result<Pgbench> {
        // Rate-limited: the point is a steady stream, not a benchmark.
        Ok(Pgbench(pg.pgbench_spawn(&[
            "-T", "600", "-c", "2", "-j", "2", "-n", "-R", "100",
        ])?))
    }

    fn kill(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0.id()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        self.kill();
    }
}

struct PgRig {
    sb: Sandbox,
    agent: AgentProcess,
    pg: PgInstance,
    bench: Pgbench,
}

impl Rig for PgRig {
    fn crash(&mut self, victim: Victim, down: Duration) -> Result<()> {
        match victim {
            Victim::Agent => self.agent.kill()?,
            Victim::Hub => self.sb.hub.kill()?,
            Victim::Source => {
                self.pg.kill()?;
                // pgbench gives up when its server goes away.
                self.bench.kill();
            }
        }
        std::thread::sleep(down);
        match victim {
            Victim::Agent => self.agent.start(),
            Victim::Hub => self.sb.hub.start(),
            Victim::Source => {
                self.pg.restart()?;
                self.bench = Pgbench::spawn(&self.pg)?;
                Ok(())
            }
        }
    }

    fn hub(&self) -> &HubProcess {
        &self.sb.hub
    }
}

#[test]
fn random_sigkills_of_agent_hub_and_postgresql_lose_and_repeat_nothing() -> Result<()> {
    let _serial = serial();
    let seed = seed("random_sigkills_of_agent_hub_and_postgresql")?;
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut sb = Sandbox::new()?;
    sb.hub.start()?;
    let pg = sb.postgres("pg")?;
    pg.pgbench(&["-i", "-q", "-s", "1"])?;
    pg.sql("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")?;
    let resources: Vec<ResourceSpec> = ["accounts", "branches", "tellers", "history"]
        .iter()
        .map(|t| ResourceSpec::new(&t.to_uppercase(), &format!("pgbench_{t}"), &[], "realtime"))
        .collect();
    let mut agent = sb.pg_agent("agent", "PG-330902", &pg, &resources, "")?;
    agent.start()?;
    agent.wait_pg_caught_up(&pg, Duration::from_secs(120))?;
    let bench = Pgbench::spawn(&pg)?;
    let mut rig = PgRig {
        sb,
        agent,
        pg,
        bench,
    };
    let n = cycles(8);
    let killed = drive(&mut rig, &mut rng, n)?;
    rig.bench.kill();
    let stopped = Instant::now();
    rig.agent
        .wait_pg_caught_up(&rig.pg, Duration::from_secs(180))?;
    let drained = stopped.elapsed();
    let rows = assert_pg_in_sync(&rig.sb.hub, &rig.agent, &rig.pg, &resources)?;
    applied_once(&rig.sb)?;
    eprintln!(
        "seed {seed}: {n} crashes (agent {}, hub {}, postgres {}), {rows} rows equal, \
         {} batches applied once; caught up {drained:?} after the last write; {:?} in all",
        killed[0],
        killed[1],
        killed[2],
        applied(&rig.sb.hub)?,
        started.elapsed()
    );
    Ok(())
}
