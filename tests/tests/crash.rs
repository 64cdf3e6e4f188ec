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
use shuyuan_tests::pg::{PgInstance, pgbench_resources};
use shuyuan_tests::{
    AgentProcess, AgentSpec, HubProcess, Nodes, ResourceSpec, Sandbox, Topology, assert_in_sync,
    assert_pg_in_sync, bin, wait_for,
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
    /// What the report calls the source.
    const SOURCE: &str;
    /// What the report calls the agent's catching up after the last write.
    const CAUGHT_UP: &str;
    /// Kills `victim` with SIGKILL, waits `down`, and starts it again.
    fn crash(&mut self, victim: Victim, down: Duration) -> Result<()>;
    /// The sandbox, whose hub the progress is read from.
    fn sandbox(&self) -> &Sandbox;
    /// Stops the department's writes.
    fn stop_writes(&mut self) -> Result<()>;
    /// Waits until the agent captured everything and the hub acknowledged it.
    fn wait_caught_up(&self, timeout: Duration) -> Result<()>;
    /// Compares the hub's copy with the source; the rows compared.
    fn assert_in_sync(&self) -> Result<usize>;
}

/// One crash test: the rig `start` makes (from the seed) crashed `min`
/// times (or `SHUYUAN_CRASH_CYCLES`), its writes stopped, and then the
/// hub's copy equal to the source, every batch applied once.
fn crash_test<R: Rig>(test: &str, min: usize, start: impl FnOnce(u64) -> Result<R>) -> Result<()> {
    let _serial = serial();
    let seed = seed(test)?;
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut rig = start(seed)?;
    let n = cycles(min);
    let killed = drive(&mut rig, &mut rng, n)?;
    rig.stop_writes()?;
    let stopped = Instant::now();
    rig.wait_caught_up(Duration::from_secs(180))?;
    let drained = stopped.elapsed();
    let rows = rig.assert_in_sync()?;
    applied_once(rig.sandbox())?;
    eprintln!(
        "seed {seed}: {n} crashes (agent {}, hub {}, {} {}), {rows} rows equal, \
         {} batches applied once; {} {drained:?} after the last write; {:?} in all",
        killed[0],
        killed[1],
        R::SOURCE,
        killed[2],
        applied(&rig.sandbox().hub)?,
        R::CAUGHT_UP,
        started.elapsed()
    );
    Ok(())
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
fn drive(rig: &mut impl Rig, rng: &mut Rng, n: usize) -> Result<[usize; 3]> {
    let mut killed = [0; 3];
    for cycle in 1..=n {
        std::thread::sleep(Duration::from_millis(200 + rng.below(2300)));
        let victim = *rng.pick(&VICTIMS);
        let down = Duration::from_millis(rng.below(1000));
        let before = applied(&rig.sandbox().hub)?;
        let at = Instant::now();
        rig.crash(victim, down)
            .with_context(|| format!("cycle {cycle}: crashing the {victim:?}"))?;
        wait_for(
            &format!("the stream to move again after cycle {cycle} ({victim:?})"),
            Duration::from_secs(120),
            || Ok((applied(&rig.sandbox().hub)? > before).then_some(())),
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
    writer: WriterProcess,
    incarnation: u64,
    seed: u64,
}

impl SqliteRig {
    /// A department writing to two tables (the crash writer, from `seed`),
    /// its agent and the hub, all running.
    fn start(seed: u64) -> Result<SqliteRig> {
        let Nodes(sb, [], [agent]) = Topology::new()
            .agent(
                AgentSpec::sqlite("ga", "GA", &[data::HOUSEHOLD_DDL, data::PARCEL_DDL])
                    .resources(vec![
                        ResourceSpec::household(),
                        ResourceSpec::land_parcel("realtime"),
                    ])
                    // Small batches keep many in flight when a crash lands.
                    .outbox("batch_max_changes = 20"),
            )
            .start()?;
        let writer = WriterProcess::spawn(&agent.db, seed, &sb.dir.path().join("writer.log"))?;
        Ok(SqliteRig {
            sb,
            agent,
            writer,
            incarnation: 0,
            seed,
        })
    }

    fn respawn_writer(&mut self) -> Result<()> {
        self.incarnation += 1;
        let log = self.sb.dir.path().join("writer.log");
        self.writer = WriterProcess::spawn(&self.agent.db, self.seed ^ self.incarnation, &log)?;
        Ok(())
    }
}

impl Rig for SqliteRig {
    const SOURCE: &str = "writer";
    const CAUGHT_UP: &str = "drained";

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

    fn sandbox(&self) -> &Sandbox {
        &self.sb
    }

    fn stop_writes(&mut self) -> Result<()> {
        self.writer.kill()
    }

    fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        self.agent.wait_drained(timeout).map(drop)
    }

    fn assert_in_sync(&self) -> Result<usize> {
        assert_in_sync(&self.sb.hub, &self.agent)
    }
}

#[test]
fn random_sigkills_of_agent_hub_and_sqlite_writer_lose_and_repeat_nothing() -> Result<()> {
    crash_test(
        "random_sigkills_of_agent_hub_and_sqlite_writer",
        20,
        SqliteRig::start,
    )
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

impl PgRig {
    /// A PostgreSQL source with pgbench writing, its agent (caught up with
    /// the initial load) and the hub, all running.
    fn start(_seed: u64) -> Result<PgRig> {
        let sb = Sandbox::new()?;
        let pg = sb.pgbench(1)?;
        let Nodes(sb, [], [agent]) = Topology::new()
            .agent(AgentSpec::postgres("agent", "PG-330902", &pg).resources(pgbench_resources()))
            .start_in(sb)?;
        agent.wait_pg_caught_up(&pg, Duration::from_secs(120))?;
        let bench = Pgbench::spawn(&pg)?;
        Ok(PgRig {
            sb,
            agent,
            pg,
            bench,
        })
    }
}

impl Rig for PgRig {
    const SOURCE: &str = "postgres";
    const CAUGHT_UP: &str = "caught up";

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

    fn sandbox(&self) -> &Sandbox {
        &self.sb
    }

    fn stop_writes(&mut self) -> Result<()> {
        self.bench.kill();
        Ok(())
    }

    fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        self.agent.wait_pg_caught_up(&self.pg, timeout)
    }

    fn assert_in_sync(&self) -> Result<usize> {
        assert_pg_in_sync(&self.sb.hub, &self.agent, &self.pg)
    }
}

#[test]
fn random_sigkills_of_agent_hub_and_postgresql_lose_and_repeat_nothing() -> Result<()> {
    crash_test(
        "random_sigkills_of_agent_hub_and_postgresql",
        8,
        PgRig::start,
    )
}
