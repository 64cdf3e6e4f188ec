//! One builder for the end-to-end tests' set-up. A [`Topology`] says which
//! hubs and agents a test needs (names, parents, departments, tables or a
//! PostgreSQL source, config); [`Topology::start`] creates them in a fresh
//! [`Sandbox`], enrolls every agent and child hub at its hub, installs
//! capture, and starts them, parents first. The test gets them back as
//! [`Nodes`] and names them with its own bindings:
//!
//! ```no_run
//! # use shuyuan_tests::{AgentSpec, Nodes, Topology};
//! # fn main() -> anyhow::Result<()> {
//! // The sandbox (with its hub), no other hubs, one agent.
//! let Nodes(mut sb, [], [mut agent]) = Topology::new()
//!     .agent(AgentSpec::household("ga", "GA").outbox("batch_max_changes = 20"))
//!     .start()?;
//! # Ok(()) }
//! ```
//!
//! [`Topology::build`] creates and enrolls the same without starting
//! anything, for a test that puts something in between (a relay, a key
//! file's mode) and then starts what it needs. An agent a test adds later
//! comes from the same [`AgentSpec`] through [`Sandbox::add_agent`].
//!
//! Nothing is left running: every process is killed when its handle drops,
//! agents before hubs, hubs before the sandbox's directory goes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::tmpfs::Tmpfs;
use crate::{AgentProcess, HubProcess, ResourceSpec, data, pg, pg_slot_name};

/// A temporary directory with a hub in it (initialised, not started), and
/// whatever a [`Topology`] mounts there.
#[derive(Debug)]
pub struct Sandbox {
    /// The sandbox's own hub, in `hub/`: the top of its topology.
    pub hub: HubProcess,
    /// Small filesystems ([`Topology::tmpfs`]), unmounted after the hub
    /// stopped and before the directory is removed (fields drop in order).
    mounts: Vec<Tmpfs>,
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A sandbox in a new temporary directory. Set `SHUYUAN_KEEP=1` to keep
    /// the directory (logs, databases) after the test.
    pub fn new() -> Result<Sandbox> {
        let mut dir = tempfile::Builder::new().prefix("shuyuan-e2e-").tempdir()?;
        if std::env::var_os("SHUYUAN_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        Sandbox::in_dir(dir)
    }

    /// A sandbox in `dir` (a benchmark keeps its own).
    pub fn in_dir(dir: tempfile::TempDir) -> Result<Sandbox> {
        let hub = HubProcess::init(&dir.path().join("hub"))?;
        Ok(Sandbox {
            hub,
            mounts: Vec::new(),
            dir,
        })
    }

    /// Fails if the hub refused any batch.
    pub fn assert_no_rejections(&self) -> Result<()> {
        let rejected: Vec<_> = self
            .hub
            .audit()?
            .into_iter()
            .filter(|a| a["kind"] == "batch_rejected")
            .collect();
        if !rejected.is_empty() {
            bail!("the hub refused batches: {rejected:?}");
        }
        Ok(())
    }

    /// A new SQLite department database `name` with the given tables.
    pub fn database(&self, name: &str, ddl: &[&str]) -> Result<(PathBuf, rusqlite::Connection)> {
        let path = self.dir.path().join(name);
        let conn = create_database(&path, ddl)?;
        Ok((path, conn))
    }

    /// A throwaway PostgreSQL server in `name/` of the sandbox, with the
    /// test settings ([`pg::DEFAULT_SETTINGS`]).
    pub fn postgres(&self, name: &str) -> Result<pg::PgInstance> {
        pg::PgInstance::start(&self.dir.path().join(name))
    }

    /// A PostgreSQL server in `pg/` with pgbench's tables at `scale`, the
    /// history (which has no key) shared by its whole row: the source of
    /// [`pg::pgbench_resources`].
    pub fn pgbench(&self, scale: u32) -> Result<pg::PgInstance> {
        let pg = self.postgres("pg")?;
        pg.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
        pg.sql("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")?;
        Ok(pg)
    }

    /// An agent made from `spec` at the sandbox's hub (enrolled and capture
    /// installed unless the spec says otherwise); not started.
    pub fn add_agent(&self, spec: AgentSpec<'_>) -> Result<AgentProcess> {
        if let Some(other) = &spec.hub {
            bail!(
                "agent {} is for hub {other}: declare it in the Topology",
                spec.name
            );
        }
        spec.create(self.dir.path(), &self.hub)
    }

    /// A hub made from `spec` in the sandbox: configured and, if it is a
    /// child of the sandbox's hub, enrolled there with its upstream set;
    /// not started.
    pub fn add_hub(&self, spec: &HubSpec) -> Result<HubProcess> {
        spec.create(self.dir.path(), |under| match under {
            None => Ok(&self.hub),
            Some(name) => bail!(
                "hub {} is under {name}: declare both in the Topology",
                spec.name
            ),
        })
    }

    /// The tmpfs mounted at `dir` (relative to the sandbox) by
    /// [`Topology::tmpfs`].
    pub fn tmpfs(&self, dir: &str) -> Result<&Tmpfs> {
        let path = self.dir.path().join(dir);
        self.mounts
            .iter()
            .find(|m| m.dir() == path)
            .with_context(|| format!("no tmpfs at {}", path.display()))
    }
}

/// Opens (creating) a SQLite database, creates `ddl`'s tables and sets the
/// busy timeout a department application would.
fn create_database(path: &Path, ddl: &[&str]) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    for d in ddl {
        conn.execute_batch(d)?;
    }
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// The hubs and agents of a test, described; [`Topology::start`] makes
/// them. The sandbox's own hub is always there (named "test hub").
#[derive(Debug)]
pub struct Topology<'a> {
    /// The sandbox's hub's name, `[hub]` lines, console password and
    /// further config sections.
    hub_name: Option<String>,
    hub_settings: Vec<String>,
    admin_settings: Vec<String>,
    admin_accounts: Vec<(String, String)>,
    hub_config: String,
    hubs: Vec<HubSpec>,
    agents: Vec<AgentSpec<'a>>,
    /// Directories of the sandbox on a tmpfs, and their sizes.
    mounts: Vec<(String, String)>,
}

impl Default for Topology<'_> {
    fn default() -> Self {
        Topology::new()
    }
}

impl<'a> Topology<'a> {
    /// The sandbox's hub alone.
    pub fn new() -> Self {
        Topology {
            hub_name: None,
            hub_settings: Vec::new(),
            admin_settings: Vec::new(),
            admin_accounts: Vec::new(),
            hub_config: String::new(),
            hubs: Vec::new(),
            agents: Vec::new(),
            mounts: Vec::new(),
        }
    }

    /// Names the sandbox's hub (`[hub] name`).
    pub fn hub_name(mut self, name: &str) -> Self {
        self.hub_name = Some(name.into());
        self
    }

    /// Appends sections to the sandbox's hub's config (for example
    /// `[freshness]`).
    pub fn hub_config(mut self, text: &str) -> Self {
        self.hub_config.push_str(text);
        self
    }

    /// Adds a `key = value` line to the sandbox's hub's `[hub]` section.
    pub fn hub_setting(mut self, line: &str) -> Self {
        self.hub_settings.push(line.into());
        self
    }

    /// Adds a `key = value` line to the sandbox's hub's `[admin]` section.
    pub fn admin_setting(mut self, line: &str) -> Self {
        self.admin_settings.push(line.into());
        self
    }

    /// Gives the sandbox's hub's console a named administrator
    /// ([`HubProcess::set_admin`]).
    pub fn admin_account(mut self, name: &str, password: &str) -> Self {
        self.admin_accounts.push((name.into(), password.into()));
        self
    }

    /// Another hub; one with a parent must come after it.
    pub fn hub(mut self, hub: HubSpec) -> Self {
        self.hubs.push(hub);
        self
    }

    pub fn agent(mut self, agent: AgentSpec<'a>) -> Self {
        self.agents.push(agent);
        self
    }

    /// Mounts a tmpfs of `size` (`8m`) at `dir` of the sandbox (`hub/data`
    /// is the hub's store, `NAME/data` an agent's outbox) before anything
    /// is created there: a disk that can fill up.
    pub fn tmpfs(mut self, dir: &str, size: &str) -> Self {
        self.mounts.push((dir.into(), size.into()));
        self
    }

    /// Creates everything in a new sandbox: hubs configured, child hubs
    /// enrolled at their parents, agents enrolled at their hubs with capture
    /// installed. Nothing is started.
    pub fn build<const H: usize, const A: usize>(self) -> Result<Nodes<H, A>> {
        self.build_in(Sandbox::new()?)
    }

    /// [`Topology::build`] in a sandbox the test already made (holding a
    /// PostgreSQL source, say).
    pub fn build_in<const H: usize, const A: usize>(self, mut sb: Sandbox) -> Result<Nodes<H, A>> {
        for (dir, size) in &self.mounts {
            sb.mounts
                .push(Tmpfs::mount(&sb.dir.path().join(dir), size)?);
        }
        if let Some(name) = &self.hub_name {
            sb.hub.rename(name)?;
        }
        for line in &self.hub_settings {
            sb.hub.add_setting(line)?;
        }
        for (name, password) in &self.admin_accounts {
            sb.hub.set_admin(name, password)?;
        }
        for line in &self.admin_settings {
            sb.hub.add_setting_to("admin", line)?;
        }
        if !self.hub_config.is_empty() {
            sb.hub.append_config(&self.hub_config)?;
        }
        let mut hubs: Vec<HubProcess> = Vec::new();
        for spec in &self.hubs {
            let hub = spec.create(sb.dir.path(), |under| match under {
                None => Ok(&sb.hub),
                Some(name) => find_hub(&self.hubs, &hubs, name),
            })?;
            hubs.push(hub);
        }
        let mut agents = Vec::new();
        for spec in self.agents {
            let hub = match &spec.hub {
                None => &sb.hub,
                Some(name) => find_hub(&self.hubs, &hubs, name)?,
            };
            agents.push(spec.create(sb.dir.path(), hub)?);
        }
        let hubs = exactly(hubs, "hubs besides the sandbox's")?;
        let agents = exactly(agents, "agents")?;
        Ok(Nodes(sb, hubs, agents))
    }

    /// [`Topology::build`], then starts the sandbox's hub, the other hubs
    /// in the order declared (parents first, so that children connect at
    /// once) and the agents.
    pub fn start<const H: usize, const A: usize>(self) -> Result<Nodes<H, A>> {
        self.start_in(Sandbox::new()?)
    }

    /// [`Topology::start`] in a sandbox the test already made.
    pub fn start_in<const H: usize, const A: usize>(self, sb: Sandbox) -> Result<Nodes<H, A>> {
        let Nodes(mut sb, mut hubs, mut agents) = self.build_in(sb)?;
        sb.hub.start()?;
        for hub in &mut hubs {
            hub.start()?;
        }
        for agent in &mut agents {
            agent.start()?;
        }
        Ok(Nodes(sb, hubs, agents))
    }
}

/// The hub named `name` among those made so far (`made[i]` is `specs[i]`).
fn find_hub<'h>(specs: &[HubSpec], made: &'h [HubProcess], name: &str) -> Result<&'h HubProcess> {
    specs
        .iter()
        .zip(made)
        .find(|(s, _)| s.name == name)
        .map(|(_, h)| h)
        .with_context(|| format!("no hub {name} declared before its use"))
}

/// `items` as an array of the length the test's pattern names.
fn exactly<T, const N: usize>(items: Vec<T>, what: &str) -> Result<[T; N]> {
    let n = items.len();
    items
        .try_into()
        .map_err(|_| anyhow!("the topology has {n} {what}, the test names {N}"))
}

/// What a [`Topology`] made: `Nodes(sandbox, hubs, agents)`, the sandbox
/// with its hub, then the other hubs and the agents in the order declared,
/// as arrays the test destructures into its own names:
/// `let Nodes(sb, [city], [ga, mz]) = ...`. Bound in that order, the agents
/// drop (are killed) first and the sandbox last.
#[derive(Debug)]
pub struct Nodes<const H: usize, const A: usize>(
    pub Sandbox,
    pub [HubProcess; H],
    pub [AgentProcess; A],
);

/// A hub of a [`Topology`] other than the sandbox's: in `NAME/` of the
/// sandbox, named `NAME` in its config.
#[derive(Debug, Clone)]
pub struct HubSpec {
    name: String,
    /// The platform code its parent enrolls it under; `None` for a hub on
    /// its own.
    code: Option<String>,
    /// The parent, by name; `None` for the sandbox's hub.
    under: Option<String>,
    enrolled_as: Option<String>,
    share: String,
}

impl HubSpec {
    /// A hub on its own.
    pub fn new(name: &str) -> Self {
        HubSpec {
            name: name.into(),
            code: None,
            under: None,
            enrolled_as: None,
            share: String::new(),
        }
    }

    /// A child hub: enrolled at the sandbox's hub as platform `code`, which
    /// is its upstream.
    pub fn child(name: &str, code: &str) -> Self {
        HubSpec {
            code: Some(code.into()),
            ..HubSpec::new(name)
        }
    }

    /// A child of the topology's hub `parent` instead (declared before it).
    pub fn under(mut self, parent: &str) -> Self {
        self.under = Some(parent.into());
        self
    }

    /// The name its parent enrolls it under (its own name otherwise).
    pub fn enrolled_as(mut self, name: &str) -> Self {
        self.enrolled_as = Some(name.into());
        self
    }

    /// The lines of its `[upstream]` section after the address and key:
    /// what it forwards (share types, undeclared resources).
    pub fn share(mut self, policy: &str) -> Self {
        self.share = policy.into();
        self
    }

    /// Makes the hub in `root/NAME`; a child is enrolled at its parent
    /// (`parent` finds it by name, `None` for the sandbox's hub) and
    /// forwards to it. Not started.
    fn create<'h>(
        &self,
        root: &Path,
        parent: impl FnOnce(Option<&str>) -> Result<&'h HubProcess>,
    ) -> Result<HubProcess> {
        let hub = HubProcess::init(&root.join(&self.name))?;
        hub.rename(&self.name)?;
        match &self.code {
            Some(code) => {
                let parent = parent(self.under.as_deref())?;
                let name = self.enrolled_as.as_ref().unwrap_or(&self.name);
                parent.enroll_hub(code, name, &hub.key)?;
                hub.set_upstream(parent, &self.share)?;
            }
            None if self.under.is_some()
                || self.enrolled_as.is_some()
                || !self.share.is_empty() =>
            {
                bail!(
                    "hub {} has a parent's settings but is no child (HubSpec::child)",
                    self.name
                )
            }
            None => {}
        }
        Ok(hub)
    }
}

/// An agent of a [`Topology`] (or of [`Sandbox::add_agent`]): in `NAME/`
/// of the sandbox, for one department, reading a SQLite database or a
/// PostgreSQL server. By default it reports to the sandbox's hub, which
/// enrolls it as "NAME department", and its capture is installed.
#[derive(Debug)]
pub struct AgentSpec<'a> {
    name: String,
    department: String,
    department_name: Option<String>,
    source: SourceSpec,
    /// Rows written into its new database before capture is installed.
    seed: Option<Seed<'a>>,
    resources: Vec<ResourceSpec>,
    outbox: String,
    /// The hub it reports to, by name; `None` for the sandbox's hub.
    hub: Option<String>,
    /// A key it pins instead of its hub's.
    pinned: Option<String>,
    env: Vec<(String, String)>,
    catalog: Vec<[String; 3]>,
    enroll: bool,
    capture: bool,
}

/// Where an agent's changes come from.
#[derive(Debug)]
enum SourceSpec {
    /// A new database `NAME.db` next to the agent's directory, with these
    /// tables.
    NewSqlite(Vec<String>),
    /// A SQLite database the test made (or, to see the error, did not).
    Sqlite(PathBuf),
    /// A PostgreSQL server, by connection string.
    Postgres(String),
}

/// Writes the rows a database holds before capture is installed.
type SeedFn<'a> = Box<dyn FnOnce(&rusqlite::Connection) -> Result<()> + 'a>;

struct Seed<'a>(SeedFn<'a>);

impl fmt::Debug for Seed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed(..)")
    }
}

impl<'a> AgentSpec<'a> {
    fn with_source(name: &str, department: &str, source: SourceSpec) -> Self {
        AgentSpec {
            name: name.into(),
            department: department.into(),
            department_name: None,
            source,
            seed: None,
            resources: Vec::new(),
            outbox: String::new(),
            hub: None,
            pinned: None,
            env: Vec::new(),
            catalog: Vec::new(),
            enroll: true,
            capture: true,
        }
    }

    /// An agent next to a new SQLite database `NAME.db` with these tables;
    /// give it [`AgentSpec::resources`].
    pub fn sqlite(name: &str, department: &str, ddl: &[&str]) -> Self {
        AgentSpec::with_source(
            name,
            department,
            SourceSpec::NewSqlite(ddl.iter().map(|d| d.to_string()).collect()),
        )
    }

    /// The usual department: a household register ([`data::HOUSEHOLD_DDL`])
    /// shared as [`ResourceSpec::household`].
    pub fn household(name: &str, department: &str) -> Self {
        AgentSpec::sqlite(name, department, &[data::HOUSEHOLD_DDL])
            .resources(vec![ResourceSpec::household()])
    }

    /// An agent next to the SQLite database at `db`, which the test made
    /// (or left missing).
    pub fn sqlite_file(name: &str, department: &str, db: &Path) -> Self {
        AgentSpec::with_source(name, department, SourceSpec::Sqlite(db.to_owned()))
    }

    /// An agent of a PostgreSQL source: replication slot and publication
    /// named by [`pg_slot_name`], created (`pg setup`) with its capture.
    pub fn postgres(name: &str, department: &str, pg: &pg::PgInstance) -> Self {
        AgentSpec::with_source(name, department, SourceSpec::Postgres(pg.dsn()))
    }

    /// The tables it shares (replacing any before).
    pub fn resources(mut self, resources: Vec<ResourceSpec>) -> Self {
        self.resources = resources;
        self
    }

    /// Settings for its `[outbox]` section (and sections after it, such as
    /// `[verify]`).
    pub fn outbox(mut self, settings: &str) -> Self {
        self.outbox = settings.into();
        self
    }

    /// Writes rows into its new database ([`AgentSpec::sqlite`]) before
    /// capture is installed (they reach the hub through the initial read).
    pub fn seed(mut self, f: impl FnOnce(&rusqlite::Connection) -> Result<()> + 'a) -> Self {
        self.seed = Some(Seed(Box::new(f)));
        self
    }

    /// Reports to the topology's hub `hub` instead of the sandbox's.
    pub fn at(mut self, hub: &str) -> Self {
        self.hub = Some(hub.into());
        self
    }

    /// The department's name at the hub (default "NAME department").
    pub fn department_name(mut self, name: &str) -> Self {
        self.department_name = Some(name.into());
        self
    }

    /// Pins `key` as its hub's key: an agent misled about its hub.
    pub fn pinning(mut self, key: &str) -> Self {
        self.pinned = Some(key.into());
        self
    }

    /// Extra environment for `shuyuan-agent run` (a faked clock, say).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets a field of its catalog entry `code` before it starts
    /// (`shuyuan-agent catalog set CODE FIELD VALUE`).
    pub fn catalog_set(mut self, code: &str, field: &str, value: &str) -> Self {
        self.catalog.push([code.into(), field.into(), value.into()]);
        self
    }

    /// Not enrolled at its hub (its capture is still installed).
    pub fn unenrolled(mut self) -> Self {
        self.enroll = false;
        self
    }

    /// Its config and key only: not enrolled, no capture installed.
    pub fn configured_only(mut self) -> Self {
        self.enroll = false;
        self.capture = false;
        self
    }

    /// Makes the agent in `root/NAME` (its new database in `root/NAME.db`),
    /// reporting to `hub`: config written, key created, then as the spec
    /// says enrolled, capture installed and catalog fields set. Not
    /// started.
    pub fn create(self, root: &Path, hub: &HubProcess) -> Result<AgentProcess> {
        let (db, dsn) = match self.source {
            SourceSpec::NewSqlite(ddl) => {
                let db = root.join(format!("{}.db", self.name));
                let ddl: Vec<&str> = ddl.iter().map(String::as_str).collect();
                let conn = create_database(&db, &ddl)?;
                if let Some(Seed(seed)) = self.seed {
                    seed(&conn).with_context(|| format!("seeding {}", db.display()))?;
                }
                (db, None)
            }
            _ if self.seed.is_some() => {
                bail!(
                    "agent {}: only a new database (AgentSpec::sqlite) is seeded",
                    self.name
                )
            }
            SourceSpec::Sqlite(db) => (db, None),
            SourceSpec::Postgres(dsn) => (PathBuf::new(), Some(dsn)),
        };
        let text = agent_config(
            &self.department,
            &hub.addr.to_string(),
            self.pinned.as_deref().unwrap_or(&hub.key),
            &db,
            dsn.as_deref(),
            &self.resources,
            &self.outbox,
        );
        let mut agent = AgentProcess::create(
            &root.join(&self.name),
            &self.department,
            &text,
            db,
            dsn,
            self.resources,
        )?;
        agent.env = self.env;
        if self.enroll {
            let name = self
                .department_name
                .unwrap_or_else(|| format!("{} department", self.name));
            hub.enroll(&self.department, &name, &agent.key)?;
        }
        if self.capture {
            if agent.dsn.is_some() {
                agent.pg_setup()?;
            } else {
                agent.install_triggers()?;
            }
        }
        for [code, field, value] in &self.catalog {
            agent.catalog(&["set", code, field, value])?;
        }
        Ok(agent)
    }
}

/// An agent's `agent.toml`. A SQLite source is polled every 50 ms. A
/// PostgreSQL source (`dsn`) uses the slot and publication named by
/// [`pg_slot_name`], is polled every 20 ms and loads in chunks of 5000
/// rows; its resources without key columns use the table's primary key.
fn agent_config(
    department: &str,
    hub_addr: &str,
    hub_key: &str,
    db: &Path,
    dsn: Option<&str>,
    resources: &[ResourceSpec],
    outbox: &str,
) -> String {
    let source = match dsn {
        None => format!(
            "[source]\nkind = \"sqlite\"\npath = \"{}\"\npoll_interval = \"50ms\"\n",
            db.display()
        ),
        Some(dsn) => {
            let slot = pg_slot_name(department);
            format!(
                "[source]\nkind = \"postgres\"\ndsn = \"{dsn}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\
                 poll_interval = \"20ms\"\nchunk_size = 5000\n"
            )
        }
    };
    let mut text = format!(
        "[agent]\ndepartment = \"{department}\"\nkey_file = \"agent.key\"\ndata_dir = \"data\"\n\
         [hub]\naddress = \"{hub_addr}\"\nkey = \"{hub_key}\"\n\
         {source}[outbox]\n{outbox}\n"
    );
    for r in resources {
        text.push_str(&format!(
            "[[resource]]\ncode = \"{}\"\ntable = \"{}\"\n",
            r.code, r.table
        ));
        if dsn.is_none() || !r.key.is_empty() {
            text.push_str(&format!(
                "key = [{}]\n",
                r.key
                    .iter()
                    .map(|k| format!("\"{k}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        text.push_str(&format!("update_cycle = \"{}\"\n", r.cycle));
        if let Some(h) = &r.heartbeat {
            text.push_str(&format!("heartbeat = \"{h}\"\n"));
        }
    }
    text
}
