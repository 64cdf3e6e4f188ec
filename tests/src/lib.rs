//! Harness for shuyuan's end-to-end tests, demo and benchmark: builds and
//! starts the real `shuyuan-hub` and `shuyuan-agent` binaries on loopback,
//! each in its own temporary directory, with real SQLite department
//! databases or throwaway PostgreSQL servers ([`pg`]), and reads back what
//! the hub holds. A test says which hubs and agents it needs with one
//! builder, [`Topology`] ([`harness`]); this module holds the process
//! handles it returns ([`HubProcess`], [`AgentProcess`]) and the
//! comparisons of a hub's copy with its source.
//!
//! Processes are killed when their handle drops, so a failing test leaves
//! nothing running.

pub mod data;
pub mod faultproxy;
pub mod harness;
pub mod peer;
pub mod pg;
pub mod tmpfs;

pub use harness::{AgentSpec, HubSpec, Nodes, Sandbox, Topology};

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value as Json;

/// Where the binaries are, built once per test process.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SHUYUAN_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
            // Running under `cargo test`: make sure the service binaries
            // match the source (a no-op when they are fresh).
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let release = dir.ends_with("release");
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--workspace", "--bins", "--quiet"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(
                status.success(),
                "cargo build of the service binaries failed"
            );
        }
        for b in ["shuyuan-hub", "shuyuan-agent"] {
            assert!(
                dir.join(b).exists(),
                "{} is missing; build with `cargo build --workspace --bins`",
                dir.join(b).display()
            );
        }
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("addr").port()
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout`
/// naming `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {:?} waiting for {what}{}",
                timeout,
                last_err
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command to completion, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A child process that is killed when dropped.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, config: &Path, log: &Path, env: &[(String, String)]) -> Result<Proc> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin)
            // Its own process group: a Ctrl-C in the terminal reaches only
            // the harness, which then stops services in order.
            .process_group(0)
            .args(["--config"])
            .arg(config)
            .arg("run")
            .env(
                "RUST_LOG",
                std::env::var("SHUYUAN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    fn signal(&mut self, sig: Signal) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        kill(pid, sig)?;
        let start = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "process did not stop within 20s after {sig:?}; log {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// Starts `BIN --config CONFIG run`, logging to `log`, and waits until its
/// `status` (read with `status`) says it runs.
fn start_service(
    what: &str,
    bin_name: &str,
    config: &Path,
    log: &Path,
    env: &[(String, String)],
    status: impl Fn() -> Result<Json>,
) -> Result<Proc> {
    let mut proc = Proc::spawn(&bin(bin_name), config, log, env)?;
    wait_for(
        &format!("the {what} to answer status"),
        Duration::from_secs(30),
        || {
            if !proc.running() {
                bail!(
                    "the {what} exited; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            Ok(status().ok().filter(|s| s["running"] == true))
        },
    )?;
    Ok(proc)
}

/// Signals a started process (SIGTERM to stop, SIGKILL to kill) and waits;
/// nothing to do if it was not started.
fn end_service(proc: &mut Option<Proc>, sig: Signal) -> Result<()> {
    match proc.take() {
        Some(mut p) => p.signal(sig),
        None => Ok(()),
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A hub process with its own directory.
#[derive(Debug)]
pub struct HubProcess {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub key: String,
    pub addr: SocketAddr,
    proc: Option<Proc>,
}

impl HubProcess {
    /// Writes a config (listening on a free loopback port) and creates the key.
    pub fn init(dir: &Path) -> Result<HubProcess> {
        std::fs::create_dir_all(dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse()?;
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "[hub]\nname = \"test hub\"\nlisten = \"{addr}\"\nkey_file = \"hub.key\"\ndata_dir = \"data\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
            ),
        )?;
        let key = run(Command::new(bin("shuyuan-hub"))
            .arg("--config")
            .arg(&config)
            .args(["init", "--key-only"]))?
        .trim()
        .to_string();
        Ok(HubProcess {
            dir: dir.to_owned(),
            config,
            key,
            addr,
            proc: None,
        })
    }

    /// Starts `shuyuan-hub run` and waits until it answers `status`.
    pub fn start(&mut self) -> Result<()> {
        let log = self.dir.join("hub.log");
        self.proc = Some(start_service(
            "hub",
            "shuyuan-hub",
            &self.config,
            &log,
            &[],
            || self.status(),
        )?);
        Ok(())
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<()> {
        end_service(&mut self.proc, Signal::SIGTERM)
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) -> Result<()> {
        end_service(&mut self.proc, Signal::SIGKILL)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(bin("shuyuan-hub"));
        c.arg("--config").arg(&self.config).env("RUST_LOG", "warn");
        c
    }

    /// The admin console's base URL (`http://127.0.0.1:PORT`), as the
    /// running hub wrote it.
    pub fn admin_url(&self) -> Result<String> {
        let addr = std::fs::read_to_string(self.dir.join("data").join("admin.addr"))?;
        Ok(format!("http://{}", addr.trim()))
    }

    /// `GET PATH` on the running hub's console with its local token: the
    /// body, or an error naming the status.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let r = reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.admin_url()?))
            .bearer_auth(self.admin_token()?)
            .send()?;
        let status = r.status();
        let body = r.text()?;
        if !status.is_success() {
            bail!("{path}: {status}: {body}");
        }
        Ok(body)
    }

    /// The local API token the running hub wrote.
    pub fn admin_token(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.dir.join("data").join("admin.token"))?
                .trim()
                .to_string(),
        )
    }

    /// Adds the administrator `name` with `password` to `[admin.accounts]`,
    /// with the line `shuyuan-hub admin-password NAME` prints.
    pub fn set_admin(&self, name: &str, password: &str) -> Result<()> {
        let mut child = self
            .cmd()
            .args(["admin-password", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(format!("{password}\n").as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "admin-password failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8(out.stdout)?.trim().to_string();
        let config = std::fs::read_to_string(&self.config)?.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\naccounts.{line}\n"),
        );
        std::fs::write(&self.config, config)?;
        Ok(())
    }

    /// Listens on another free loopback port from the next start, with the
    /// same key and store: the hub moved. Returns the new address.
    pub fn move_port(&mut self) -> Result<SocketAddr> {
        let moved: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse()?;
        let text = std::fs::read_to_string(&self.config)?.replace(
            &format!("listen = \"{}\"", self.addr),
            &format!("listen = \"{moved}\""),
        );
        std::fs::write(&self.config, text)?;
        self.addr = moved;
        Ok(moved)
    }

    /// Sets the hub's display name (`[hub] name`).
    pub fn rename(&self, name: &str) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?
            .replace("name = \"test hub\"", &format!("name = \"{name}\""));
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// Makes `parent` this hub's parent: appends an `[upstream]` section
    /// with `extra` lines (share policy) to the config. Takes effect at the
    /// next start.
    pub fn set_upstream(&self, parent: &HubProcess, extra: &str) -> Result<()> {
        self.append_config(&format!(
            "[upstream]\naddress = \"{}\"\nkey = \"{}\"\n{extra}",
            parent.addr, parent.key
        ))
    }

    /// Reaches its parent at `address` instead (a relay such as
    /// [`faultproxy::FaultProxy`]); takes effect at the next start.
    pub fn set_upstream_address(&self, address: SocketAddr) -> Result<()> {
        rewrite_address(&self.config, "upstream", address)
    }

    /// Appends `text` (whole sections) to the config.
    pub fn append_config(&self, text: &str) -> Result<()> {
        let config = std::fs::read_to_string(&self.config)?;
        std::fs::write(&self.config, config + text)?;
        Ok(())
    }

    /// Adds a `key = value` line to the `[hub]` section.
    pub fn add_setting(&self, line: &str) -> Result<()> {
        self.add_setting_to("hub", line)
    }

    /// Adds a `key = value` line to the config's `[section]`.
    pub fn add_setting_to(&self, section: &str, line: &str) -> Result<()> {
        let header = format!("[{section}]\n");
        let config = std::fs::read_to_string(&self.config)?.replacen(
            &header,
            &format!("{header}{line}\n"),
            1,
        );
        std::fs::write(&self.config, config)?;
        Ok(())
    }

    /// Enrolls a child hub (`enroll --hub CODE`).
    pub fn enroll_hub(&self, code: &str, name: &str, key: &str) -> Result<String> {
        run(self
            .cmd()
            .args(["enroll", "--hub", code, "--name", name, key]))
    }

    /// The last applied sequence number of `feed` (0 before its first).
    pub fn feed_seq(&self, feed: &str) -> Result<u64> {
        Ok(self
            .feed_status(feed)?
            .and_then(|f| f["last_seq"].as_u64())
            .unwrap_or(0))
    }

    /// Fails if the hub refused any batch or connection.
    pub fn assert_nothing_refused(&self) -> Result<()> {
        let refused: Vec<Json> = self
            .audit()?
            .into_iter()
            .filter(|a| a["kind"] == "batch_rejected" || a["kind"] == "connection_refused")
            .collect();
        if !refused.is_empty() {
            bail!("{} refused: {refused:?}", self.dir.display());
        }
        Ok(())
    }

    /// Fails unless every batch of `feed` was applied exactly once and none
    /// was refused: sequence numbers are gap-free by construction, and a
    /// replayed or duplicated batch is refused and counted, never applied.
    /// Returns the feed's status.
    pub fn assert_applied_once(&self, feed: &str) -> Result<Json> {
        let f = self
            .feed_status(feed)?
            .with_context(|| format!("no feed {feed} at the hub"))?;
        assert_eq!(f["batches_applied"], f["last_seq"], "{feed}: {f}");
        assert_eq!(f["rejected"], 0, "{feed}: {f}");
        Ok(f)
    }

    /// The status text (`status` without `--json`).
    pub fn status_text(&self) -> Result<String> {
        run(self.cmd().arg("status"))
    }

    /// Runs `shuyuan-hub ARGS` and returns how it ended, failure included.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(self.cmd().args(args).output()?)
    }

    pub fn enroll(&self, department: &str, name: &str, key: &str) -> Result<String> {
        run(self
            .cmd()
            .args(["enroll", "--department", department, "--name", name, key]))
    }

    pub fn status(&self) -> Result<Json> {
        Ok(serde_json::from_str(&run(self
            .cmd()
            .args(["status", "--json"]))?)?)
    }

    /// Runs `shuyuan-hub catalog ARGS`.
    pub fn catalog(&self, args: &[&str]) -> Result<String> {
        run(self.cmd().arg("catalog").args(args))
    }

    /// The city catalog as JSON (`catalog list --json`).
    pub fn catalog_list(&self) -> Result<Vec<Json>> {
        Ok(serde_json::from_str(&self.catalog(&["list", "--json"])?)?)
    }

    pub fn audit(&self) -> Result<Vec<Json>> {
        Ok(serde_json::from_str(&run(self
            .cmd()
            .args(["audit", "--json", "--limit", "1000"]))?)?)
    }

    /// The shared copy of a resource as parsed JSON lines, in key order.
    pub fn export_jsonl(&self, feed: &str) -> Result<Vec<Json>> {
        let out = run(self.cmd().args(["export", feed, "--format", "jsonl"]))?;
        out.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    pub fn export_csv(&self, feed: &str) -> Result<String> {
        run(self.cmd().args(["export", feed, "--format", "csv"]))
    }

    /// `shuyuan-hub verify FEED --json`: compares the copy with the source
    /// through the agent and waits for the end; the run records.
    pub fn verify(&self, feed: &str) -> Result<Json> {
        let out = run(self
            .cmd()
            .args(["verify", feed, "--json", "--timeout", "300"]))?;
        let runs: Vec<Json> = serde_json::from_str(&out)?;
        runs.into_iter()
            .find(|r| r["feed"] == feed)
            .map(|r| r["run"].clone())
            .context("verify printed no run for the feed")
    }

    /// `shuyuan-hub verify FEED --no-wait`: starts a comparison and returns
    /// the run's id without waiting for its end.
    pub fn start_verify(&self, feed: &str) -> Result<u64> {
        let out = self
            .cmd()
            .args(["verify", feed, "--no-wait"])
            .output()
            .context("cannot run shuyuan-hub verify")?;
        let text = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("shuyuan-hub verify {feed} failed: {text}");
        }
        text.split("verification run ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("no run id in {text:?}"))
    }

    /// The verification run with this id, once the hub finished it.
    pub fn finished_run(&self, feed: &str, run: u64) -> Result<Option<Json>> {
        Ok(self
            .feed_status(feed)?
            .map(|r| r["verification"]["last_run"].clone())
            .filter(|r| r["id"].as_u64() == Some(run) && !r["finished"].is_null()))
    }

    /// The status entry of one feed (`DEPT:RES`), if the hub has it.
    pub fn feed_status(&self, feed: &str) -> Result<Option<Json>> {
        let status = self.status()?;
        for d in status["departments"].as_array().into_iter().flatten() {
            for r in d["resources"].as_array().into_iter().flatten() {
                if r["feed"] == feed {
                    return Ok(Some(r.clone()));
                }
            }
        }
        Ok(None)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.proc
            .as_ref()
            .and_then(|p| p.child.as_ref())
            .map(Child::id)
    }
}

/// One shared table of an agent.
#[derive(Debug, Clone)]
pub struct ResourceSpec {
    pub code: String,
    pub table: String,
    pub key: Vec<String>,
    pub cycle: String,
    pub heartbeat: Option<String>,
}

impl ResourceSpec {
    /// The household register ([`data::HOUSEHOLD_DDL`]) shared in real
    /// time as resource `A01/0001`: what most tests sync.
    pub fn household() -> Self {
        ResourceSpec::new("A01/0001", "household", &["id_number"], "realtime")
    }

    /// The land parcels ([`data::PARCEL_DDL`]) as resource `B02/0007`,
    /// updated every `cycle`.
    pub fn land_parcel(cycle: &str) -> Self {
        ResourceSpec::new("B02/0007", "land_parcel", &["district", "parcel_no"], cycle)
    }

    pub fn new(code: &str, table: &str, key: &[&str], cycle: &str) -> Self {
        ResourceSpec {
            code: code.into(),
            table: table.into(),
            key: key.iter().map(|s| s.to_string()).collect(),
            cycle: cycle.into(),
            heartbeat: None,
        }
    }

    /// Sends a zero-update after this long without changes (shorter than
    /// the cycle).
    pub fn heartbeat(mut self, every: &str) -> Self {
        self.heartbeat = Some(every.into());
        self
    }
}

/// An agent process next to a SQLite database or a PostgreSQL server.
#[derive(Debug)]
pub struct AgentProcess {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub key: String,
    pub department: String,
    /// The SQLite database (empty for a PostgreSQL source).
    pub db: PathBuf,
    /// The PostgreSQL connection string (`None` for a SQLite source).
    pub dsn: Option<String>,
    /// The tables it shares.
    pub resources: Vec<ResourceSpec>,
    /// Extra environment for `run` (for example a faked clock).
    pub env: Vec<(String, String)>,
    proc: Option<Proc>,
}

/// The replication slot and publication name an agent test uses for a
/// department: `shuyuan_` and the code in lower case, each character other
/// than an ASCII letter or digit replaced by `_`.
pub fn pg_slot_name(department: &str) -> String {
    let tail: String = department
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("shuyuan_{tail}")
}

/// Rewrites the `address` right after `[SECTION]` in a config file.
fn rewrite_address(config: &Path, section: &str, address: SocketAddr) -> Result<()> {
    let text = std::fs::read_to_string(config)?;
    let start = format!("[{section}]\naddress = \"");
    let (head, rest) = text
        .split_once(&start)
        .with_context(|| format!("no [{section}] address in {}", config.display()))?;
    let (_, tail) = rest
        .split_once('"')
        .with_context(|| format!("unterminated [{section}] address in {}", config.display()))?;
    std::fs::write(config, format!("{head}{start}{address}\"{tail}"))?;
    Ok(())
}

impl AgentProcess {
    /// Writes `dir/agent.toml` from `config` and creates the agent's key
    /// ([`AgentSpec::create`] says what goes in).
    pub(crate) fn create(
        dir: &Path,
        department: &str,
        config: &str,
        db: PathBuf,
        dsn: Option<String>,
        resources: Vec<ResourceSpec>,
    ) -> Result<AgentProcess> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("agent.toml");
        std::fs::write(&path, config)?;
        let key = run(Command::new(bin("shuyuan-agent"))
            .arg("--config")
            .arg(&path)
            .args(["init", "--key-only"]))?
        .trim()
        .to_string();
        Ok(AgentProcess {
            dir: dir.to_owned(),
            config: path,
            key,
            department: department.into(),
            db,
            dsn,
            resources,
            env: Vec::new(),
            proc: None,
        })
    }

    /// A new connection to the department's SQLite database, as a
    /// department application opens it (10 s busy timeout).
    pub fn database(&self) -> Result<rusqlite::Connection> {
        if self.dsn.is_some() {
            bail!("the agent in {} reads PostgreSQL", self.dir.display());
        }
        let conn = rusqlite::Connection::open(&self.db)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
    }

    /// Runs `shuyuan-agent ARGS` and returns how it ended, failure included.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(self.cmd().args(args).output()?)
    }

    /// The status text (`status` without `--json`), as an operator reads it.
    pub fn status_text(&self) -> Result<String> {
        run(self.cmd().arg("status"))
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(bin("shuyuan-agent"));
        c.arg("--config").arg(&self.config).env("RUST_LOG", "warn");
        c
    }

    /// Points the agent at `address` instead of its hub (a relay such as
    /// [`faultproxy::FaultProxy`]); takes effect at the next start.
    pub fn set_hub_address(&self, address: SocketAddr) -> Result<()> {
        rewrite_address(&self.config, "hub", address)
    }

    /// `shuyuan-agent rotate-key`: creates the next key, announced at the
    /// agent's next start.
    pub fn rotate_key(&self) -> Result<String> {
        run(self.cmd().arg("rotate-key"))
    }

    /// Runs `shuyuan-agent catalog ARGS`.
    pub fn catalog(&self, args: &[&str]) -> Result<String> {
        run(self.cmd().arg("catalog").args(args))
    }

    /// Fills in what the catalog entry `code` needs and submits it for
    /// review.
    pub fn submit_entry(&self, code: &str) -> Result<()> {
        for (field, value) in [
            ("resource_class", "基础信息资源"),
            ("summary", "辖区登记信息"),
            ("provider", "定海区"),
            ("share_type", "有条件共享"),
            ("share_conditions", "用于身份核验"),
            ("共享依据", "《政务数据共享条例》"),
            ("share_methods", "比对验证"),
            ("open_type", "不予开放"),
            ("status", "submitted"),
        ] {
            self.catalog(&["set", code, field, value])?;
        }
        Ok(())
    }

    /// The department's catalog as JSON (`catalog show --json`).
    pub fn catalog_view(&self) -> Result<Json> {
        Ok(serde_json::from_str(&self.catalog(&["show", "--json"])?)?)
    }

    pub fn install_triggers(&self) -> Result<String> {
        run(self.cmd().args(["triggers", "install"]))
    }

    /// `shuyuan-agent pg setup`: creates the publication and the
    /// replication slot of a PostgreSQL source.
    pub fn pg_setup(&self) -> Result<String> {
        run(self.cmd().args(["pg", "setup"]))
    }

    /// `shuyuan-agent resync RESOURCE --no-wait`: asks the running agent to
    /// re-read a resource from scratch.
    pub fn resync(&self, resource: &str) -> Result<String> {
        run(self.cmd().args(["resync", resource, "--no-wait"]))
    }

    /// `shuyuan-agent verify RESOURCE --no-wait`: starts a comparison of
    /// the source table with the hub's copy; returns the run's id.
    pub fn verify(&self, resource: &str) -> Result<u64> {
        let out = run(self.cmd().args(["verify", resource, "--no-wait"]))?;
        out.split("(run ")
            .nth(1)
            .and_then(|r| r.trim_end().trim_end_matches(')').parse().ok())
            .with_context(|| format!("no run id in {out:?}"))
    }

    /// Starts `shuyuan-agent run` and waits until it answers `status`.
    pub fn start(&mut self) -> Result<()> {
        let log = self.dir.join("agent.log");
        self.proc = Some(start_service(
            "agent",
            "shuyuan-agent",
            &self.config,
            &log,
            &self.env,
            || self.status(),
        )?);
        Ok(())
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<()> {
        end_service(&mut self.proc, Signal::SIGTERM)
    }

    /// Waits until the agent captured `pg`'s log up to its current position
    /// and the hub acknowledged everything ([`pg_captured_to`]).
    pub fn wait_pg_caught_up(&self, pg: &pg::PgInstance, timeout: Duration) -> Result<()> {
        let target = pg.current_lsn()?;
        wait_for("the agent and the hub to catch up", timeout, || {
            Ok(pg_captured_to(&self.status()?, target).then_some(()))
        })
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) -> Result<()> {
        end_service(&mut self.proc, Signal::SIGKILL)
    }

    pub fn status(&self) -> Result<Json> {
        Ok(serde_json::from_str(&run(self
            .cmd()
            .args(["status", "--json"]))?)?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits until a capture step that began after this call has found
    /// nothing waiting in the source, and every sealed batch is acknowledged;
    /// returns the status.
    pub fn wait_drained(&self, timeout: Duration) -> Result<Json> {
        let asked = now_millis();
        wait_for("the agent to drain its outbox", timeout, || {
            self.drained_since(asked)
        })
    }

    /// The status if a capture step that began after `asked` (Unix
    /// milliseconds) has found nothing waiting in the source and every
    /// sealed batch is acknowledged; `None` if not yet. One poll of
    /// [`AgentProcess::wait_drained`].
    pub fn drained_since(&self, asked: i64) -> Result<Option<Json>> {
        let s = self.status()?;
        let drained = s["source"]["last_read_at"]
            .as_i64()
            .is_some_and(|t| t > asked)
            && s["outbox"]["batches"] == 0
            && s["source"]["backlog"] == 0
            && s["resources"].as_array().is_some_and(|rs| {
                rs.iter()
                    .all(|r| r["head_seq"] == r["acked_seq"] && r["head_seq"].as_u64() > Some(0))
            });
        Ok(drained.then_some(s))
    }
}

/// Begins an IMMEDIATE transaction, as a department application should for
/// writes: a deferred one that reads first cannot upgrade to a write while
/// another connection (such as the agent releasing sent changes) has
/// written meanwhile, and SQLite then answers SQLITE_BUSY at once.
pub fn immediate(conn: &rusqlite::Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
}

/// Milliseconds since the Unix epoch, as the services report times.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reads a SQLite table in key order and renders each row the way the hub's
/// JSON-lines export must: columns by name, SQLite storage classes as JSON
/// null, numbers and strings, blobs as `{"hex": ...}`. Written independently
/// of the hub's code so that the comparison means something.
pub fn source_rows(db: &Path, table: &str, key: &[String]) -> Result<Vec<Json>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let order = key
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY {order}"))?;
    let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    let rows = stmt.query_map([], |row| {
        let mut obj = serde_json::Map::new();
        for (i, name) in names.iter().enumerate() {
            let v = match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Json::Null,
                rusqlite::types::ValueRef::Integer(x) => Json::from(x),
                rusqlite::types::ValueRef::Real(x) => Json::from(x),
                rusqlite::types::ValueRef::Text(t) => Json::from(String::from_utf8_lossy(t).into_owned()),
                rusqlite::types::ValueRef::Blob(b) => {
                    serde_json::json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() })
                }
            };
            obj.insert(name.clone(), v);
        }
        Ok(Json::Object(obj))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Fails with the first differing row if the hub's copy differs from the source.
pub fn assert_same_rows(source: &[Json], hub: &[Json]) -> Result<()> {
    for (i, (s, h)) in source.iter().zip(hub).enumerate() {
        if s != h {
            bail!("row {i} differs:\n source: {s}\n hub:    {h}");
        }
    }
    if source.len() != hub.len() {
        bail!(
            "the source has {} rows, the hub {}; first extra: {}",
            source.len(),
            hub.len(),
            source
                .get(hub.len())
                .or_else(|| hub.get(source.len()))
                .map(ToString::to_string)
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Whether an agent's status shows a PostgreSQL source read up to `lsn`, no
/// initial load or resync running, and every sealed batch acknowledged by
/// the hub (after its durable commit).
pub fn pg_captured_to(status: &Json, lsn: u64) -> bool {
    status["source"]["position"]
        .as_str()
        .and_then(pg::parse_lsn)
        .is_some_and(|at| at >= lsn)
        && status["source"]["loads"]
            .as_array()
            .is_some_and(|l| l.is_empty())
        && status["outbox"]["batches"] == 0
        && status["resources"].as_array().is_some_and(|rs| {
            rs.iter()
                .all(|r| r["head_seq"] == r["acked_seq"] && r["head_seq"].as_u64() > Some(0))
        })
}

/// Compares every resource of a PostgreSQL `agent` between its source and
/// the hub, as CSV ([`pg::PgInstance::table_csv`] against `export --format
/// csv`) in key order: the resource's key columns, else the table's primary
/// key, else every column (a table without a key is keyed by its whole row).
pub fn assert_pg_in_sync(
    hub: &HubProcess,
    agent: &AgentProcess,
    pg: &pg::PgInstance,
) -> Result<usize> {
    let mut total = 0;
    for r in &agent.resources {
        let order = pg.key_order(&r.table, &r.key)?;
        let source = pg.table_csv(&r.table, &order)?;
        let copy = hub.export_csv(&format!("{}:{}", agent.department, r.code))?;
        pg::assert_same_csv(&source, &copy).with_context(|| {
            format!(
                "resource {} (table {})\n{}",
                r.code,
                r.table,
                sync_diagnostics(hub, agent)
            )
        })?;
        total += pg::csv_records(&source).len().saturating_sub(1);
    }
    Ok(total)
}

/// What the hub's audit log and the agent's warnings say, for a failed
/// comparison: which re-reads, comparisons, repairs and refusals happened.
fn sync_diagnostics(hub: &HubProcess, agent: &AgentProcess) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    match hub.audit() {
        Ok(entries) => {
            for e in entries {
                *kinds
                    .entry(e["kind"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
            }
        }
        Err(e) => {
            kinds.insert(format!("(audit unreadable: {e})"), 1);
        }
    }
    let log = agent.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    format!(
        "hub audit entries by kind: {kinds:?}\nagent warnings and errors ({}), the last ones:\n{}",
        warnings.len(),
        warnings[warnings.len().saturating_sub(10)..].join("\n")
    )
}

/// Compares every resource of `agent` between its database and the hub.
pub fn assert_in_sync(hub: &HubProcess, agent: &AgentProcess) -> Result<usize> {
    let mut total = 0;
    for r in &agent.resources {
        let source = source_rows(&agent.db, &r.table, &r.key)?;
        let copy = hub.export_jsonl(&format!("{}:{}", agent.department, r.code))?;
        assert_same_rows(&source, &copy)
            .with_context(|| format!("resource {} (table {})", r.code, r.table))?;
        total += source.len();
    }
    Ok(total)
}
