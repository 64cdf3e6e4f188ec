//! Throwaway PostgreSQL servers for the end-to-end tests and the benchmark:
//! one `initdb` per instance in its own directory, a free port on
//! 127.0.0.1, trust authentication, `wal_level=logical`. The server binaries
//! are found at run time in `/usr/lib/postgresql/<version>/bin` (the newest
//! version); the machine's own PostgreSQL, if any, is never used.
//!
//! PostgreSQL refuses to run as root. When the harness runs as root, the
//! instance directory is given to the `postgres` user and `initdb`,
//! `pg_ctl` and `pgbench` run through `runuser -u postgres --`.
//!
//! The server is stopped (`pg_ctl -m immediate stop`) when the handle drops,
//! so a failing test leaves nothing running.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{ResourceSpec, run};

/// Where the Debian packages put the server binaries, one directory per
/// major version.
const PG_ROOT: &str = "/usr/lib/postgresql";

/// The server settings every instance gets (`-c NAME=VALUE`), before the
/// caller's. `fsync=off` makes tests fast; a benchmark passes
/// `("fsync", "on")`.
pub const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_replication_slots", "10"),
    ("max_wal_senders", "10"),
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("shared_buffers", "128MB"),
    ("max_wal_size", "1GB"),
];

/// How often a start is tried on another port when the chosen one was
/// taken between choosing it and binding it.
const START_ATTEMPTS: usize = 5;

/// The newest `/usr/lib/postgresql/<version>/bin` that holds a server.
pub fn bin_dir() -> Result<PathBuf> {
    let missing = || {
        format!(
            "PostgreSQL server binaries not found in {PG_ROOT}/<version>/bin; \
             run `.ci/run`, which installs the Debian `postgresql` package \
             (or `apt-get install postgresql`)"
        )
    };
    let entries = std::fs::read_dir(PG_ROOT).with_context(missing)?;
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // "15", or "9.6" for old versions.
        let Ok(version) = name
            .split('.')
            .map(str::parse::<u32>)
            .collect::<Result<Vec<u32>, _>>()
        else {
            continue;
        };
        let bin = entry.path().join("bin");
        if !bin.join("postgres").exists() || !bin.join("initdb").exists() {
            continue;
        }
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, bin)| bin).with_context(missing)
}

/// The server's version line, such as `postgres (PostgreSQL) 15.20 (Debian
/// 15.20-0+deb12u1)`.
pub fn version() -> Result<String> {
    Ok(
        run(Command::new(bin_dir()?.join("postgres")).arg("--version"))?
            .trim()
            .to_string(),
    )
}

/// Whether the harness runs as root, so that the server must run as the
/// `postgres` user.
fn as_postgres() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind a TCP port")?;
    Ok(l.local_addr()?.port())
}

/// `'text'` for `sh`, which `pg_ctl` hands the server's options to.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `"name"` as a PostgreSQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'` as a PostgreSQL string literal (standard_conforming_strings).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Connects to `dsn` and drives the connection on the current tokio
/// runtime.
pub async fn connect(dsn: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {dsn}"))?;
    tokio::spawn(async move {
        // Ends with an error when the server goes away; the client's next
        // call reports it.
        let _ = connection.await;
    });
    Ok(client)
}

/// A PostgreSQL server in its own directory: `data/` (the cluster),
/// `sock/` (its Unix socket), `postgresql.log`.
#[derive(Debug)]
pub struct PgInstance {
    /// The instance's own directory (given to `postgres` when running as
    /// root).
    pub dir: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    /// The server log (`pg_ctl -l`).
    pub log: PathBuf,
    pub port: u16,
    bin: PathBuf,
    settings: Vec<(String, String)>,
    as_postgres: bool,
    running: bool,
}

impl PgInstance {
    /// `initdb` and start a server in `dir` (created; it should be the
    /// instance's own directory) with [`DEFAULT_SETTINGS`].
    pub fn start(dir: &Path) -> Result<PgInstance> {
        PgInstance::start_with(dir, &[])
    }

    /// Like [`PgInstance::start`], with `settings` replacing or adding to
    /// [`DEFAULT_SETTINGS`] (for example `&[("fsync", "on")]`).
    pub fn start_with(dir: &Path, settings: &[(&str, &str)]) -> Result<PgInstance> {
        let bin = bin_dir()?;
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let mut merged: Vec<(String, String)> = DEFAULT_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in settings {
            match merged.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v.to_string(),
                None => merged.push((k.to_string(), v.to_string())),
            }
        }
        let mut pg = PgInstance {
            data: dir.join("data"),
            socket_dir: dir.join("sock"),
            log: dir.join("postgresql.log"),
            dir,
            port: 0,
            bin,
            settings: merged,
            as_postgres: as_postgres(),
            running: false,
        };
        std::fs::create_dir_all(&pg.data)?;
        std::fs::create_dir_all(&pg.socket_dir)?;
        if pg.as_postgres {
            reachable_by_others(&pg.dir)?;
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir))?;
        }
        // --no-sync: whether initdb's files reach the disk before the
        // server starts makes no difference to a throwaway cluster (the
        // server's own `fsync` setting governs what is measured).
        run(pg.tool("initdb").arg("-D").arg(&pg.data).args([
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]))
        .context("initdb failed")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            pg.port = free_tcp_port()?;
            match pg.start_server() {
                Ok(()) => return Ok(pg),
                Err(e) if attempt < START_ATTEMPTS && e.to_string().contains(PORT_TAKEN) => {
                    // Another process took the port between our choosing
                    // and the server's binding: choose another.
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A command for a server tool, as `postgres` when running as root.
    fn tool(&self, name: &str) -> Command {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(name));
            c
        } else {
            Command::new(self.bin.join(name))
        };
        // The tools look at their working directory, which the `postgres`
        // user may not be allowed to enter.
        c.current_dir(&self.dir);
        c
    }

    /// The `-o` options of `pg_ctl start`.
    fn server_options(&self) -> String {
        let mut o = format!(
            "-p {} -k {}",
            self.port,
            shell_quote(&self.socket_dir.to_string_lossy())
        );
        for (k, v) in &self.settings {
            o.push_str(&format!(" -c {}", shell_quote(&format!("{k}={v}"))));
        }
        o
    }

    fn start_server(&mut self) -> Result<()> {
        let log_before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let out = self
            .tool("pg_ctl")
            .args(["-w", "-t", "120", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(self.server_options())
            .arg("start")
            .output()
            .context("cannot run pg_ctl")?;
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        let log = std::fs::read(&self.log).unwrap_or_default();
        let this_start =
            String::from_utf8_lossy(log.get(usize::try_from(log_before)?..).unwrap_or(&[]))
                .into_owned();
        let taken = if this_start.contains("Address already in use") {
            PORT_TAKEN
        } else {
            ""
        };
        bail!(
            "PostgreSQL did not start on port {}{taken}: pg_ctl {}\nstdout: {}\nstderr: {}\nlog {}:\n{}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log.display(),
            this_start
        )
    }

    /// `host=127.0.0.1 port=PORT user=postgres dbname=postgres`
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// A client connected to the `postgres` database, its connection driven
    /// on the current tokio runtime.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        connect(&self.dsn()).await
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn psql(&self) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-U", "postgres", "-d", "postgres"])
        .env("PGCLIENTENCODING", "UTF8");
        c
    }

    /// Runs `sql` with `psql -c` (several statements run as one implicit
    /// transaction) and returns its unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> Result<String> {
        run(self.psql().arg("-c").arg(sql))
            .with_context(|| format!("psql on port {} (log {})", self.port, self.log.display()))
    }

    fn pgbench_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.tool("pgbench");
        c.args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", "postgres"])
            .args(args)
            .arg("postgres");
        c
    }

    /// Runs `pgbench ARGS` against the `postgres` database and returns its
    /// standard output (the report; progress goes to standard error).
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        run(&mut self.pgbench_cmd(args))
    }

    /// Starts `pgbench ARGS` in the background, with standard output and
    /// error piped (read them with `wait_with_output`). It runs in its own
    /// process group: when running as root, the child is `runuser`, so stop
    /// it early by signalling the group `-child.id()`, not only the child.
    pub fn pgbench_spawn(&self, args: &[&str]) -> Result<Child> {
        self.pgbench_cmd(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start pgbench")
    }

    /// The server's current WAL insert position (`pg_current_wal_lsn()`).
    pub fn current_lsn(&self) -> Result<u64> {
        let text = self.sql("SELECT pg_current_wal_lsn()")?;
        parse_lsn(&text).with_context(|| format!("not an LSN: {text}"))
    }

    /// The postmaster's process id (the first line of `postmaster.pid`).
    pub fn pid(&self) -> Result<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .context("no postmaster.pid: the server is not running")?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid has no process id")
    }

    /// `pg_ctl -m fast stop`: clients are disconnected, the server shuts
    /// down cleanly.
    pub fn stop(&mut self) -> Result<()> {
        run(self
            .tool("pg_ctl")
            .args(["-w", "-t", "120", "-m", "fast", "-D"])
            .arg(&self.data)
            .arg("stop"))
        .with_context(|| format!("pg_ctl stop failed; log {}", self.log.display()))?;
        self.running = false;
        Ok(())
    }

    /// SIGKILLs the postmaster, as a crash would, and waits until it and
    /// its children (which notice their parent's death) are gone. The next
    /// start runs crash recovery.
    pub fn kill(&mut self) -> Result<()> {
        let pid = self.pid()?;
        let children = children_of(pid);
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .with_context(|| format!("cannot SIGKILL the postmaster {pid}"))?;
        self.running = false;
        let start = Instant::now();
        while alive(pid) || children.iter().any(|c| alive(*c)) {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "PostgreSQL's processes ({pid} and children {children:?}) outlived the postmaster's SIGKILL by 30 s"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Nobody may reap the dead postmaster (a container's init may not),
        // and its zombie would make the next start think the old server
        // still runs: its lock files are stale, remove them.
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(self.data.join("postmaster.pid"));
            let _ =
                std::fs::remove_file(self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)));
        }
        Ok(())
    }

    /// Stops the server if it runs (fast) and starts it again on the same
    /// port.
    pub fn restart(&mut self) -> Result<()> {
        if self.running {
            self.stop()?;
        }
        self.start_server()
    }

    /// Whether the server was started and not stopped or killed since.
    pub fn running(&self) -> bool {
        self.running
    }

    /// The columns of `table` with the name of their type (the base type of
    /// a domain), in table order.
    pub fn columns(&self, table: &str) -> Result<Vec<(String, String)>> {
        // The names travel as hex so that no name can break the output.
        let out = self.sql(&format!(
            "SELECT encode(convert_to(a.attname, 'UTF8'), 'hex') || ' ' || \
                    (SELECT b.typname FROM pg_type b WHERE b.oid = \
                       CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            quote_literal(table)
        ))?;
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (hex, ty) = l.split_once(' ').context("unexpected column line")?;
                Ok((unhex(hex)?, ty.to_string()))
            })
            .collect()
    }

    /// An `ORDER BY` list giving the hub's row order of `table`: the `key`
    /// columns if any, else the primary key, else every column (a table
    /// without a key is keyed by its whole row); `NULLS FIRST` each, as the
    /// hub sorts NULL before any value.
    pub fn key_order(&self, table: &str, key: &[String]) -> Result<String> {
        let mut columns: Vec<String> = key.to_vec();
        if columns.is_empty() {
            let out = self.sql(&format!(
                "SELECT encode(convert_to(a.attname, 'UTF8'), 'hex') \
                 FROM pg_index i JOIN pg_attribute a \
                   ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = {}::regclass AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                quote_literal(table)
            ))?;
            columns = out
                .lines()
                .filter(|l| !l.is_empty())
                .map(unhex)
                .collect::<Result<_>>()?;
        }
        if columns.is_empty() {
            columns = self.columns(table)?.into_iter().map(|(n, _)| n).collect();
        }
        Ok(columns
            .iter()
            .map(|c| format!("{} NULLS FIRST", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// The rows of `table` (as written in SQL, e.g. `public."T"`), ordered
    /// by `order_by` (SQL), as CSV with a header, rendered by PostgreSQL's
    /// own `COPY ... TO STDOUT WITH (FORMAT csv, HEADER)` and not by
    /// shuyuan's code, for comparison with the hub's `export --format csv`
    /// ([`assert_same_csv`]).
    ///
    /// The hub follows COPY's CSV conventions (NULL is an empty unquoted
    /// field, the empty string `""`, the same quoting, bytea as `\x` hex),
    /// except in two value forms, which are brought to the hub's form here
    /// without losing anything, so the comparison stays exact:
    /// - booleans: COPY prints `t`/`f`, the hub `true`/`false`; the column is
    ///   selected as `col::text`, which PostgreSQL renders `true`/`false`
    ///   (NULL stays NULL).
    /// - `float8`/`float4`: COPY prints the shortest text that reads back as
    ///   the same number (`1e+300`, `1`, `-0`), the hub Rust's shortest form
    ///   of the f64 (`1e300`, `1.0`, `-0.0`). Each such field is read as an
    ///   f64 and written in the hub's form; `NaN`, `Infinity` and `-Infinity`
    ///   are the same in both. A `float4` travels as the f64 of its printed
    ///   text (`0.1`, not the f32's exact value 0.100000001490116...), which
    ///   loses nothing: that text read as an f32 gives the float4 back. A
    ///   copy holding any other number differs.
    ///
    /// The hub keeps rows in key order: NULL before any value, text
    /// bytewise (the instance's collation is C, so `ORDER BY` agrees),
    /// decimals as text. `order_by` must name the same order, e.g. the key
    /// columns, `NULLS FIRST` on nullable ones. Date and time values are
    /// PostgreSQL's text in the server's default `TimeZone`/`DateStyle`.
    /// COPY also quotes a value that is exactly `\.` in a one-column table;
    /// the hub does not.
    pub fn table_csv(&self, table: &str, order_by: &str) -> Result<String> {
        let columns = self.columns(table)?;
        if columns.is_empty() {
            bail!("table {table} has no columns");
        }
        let select = columns
            .iter()
            .map(|(name, ty)| {
                let q = quote_ident(name);
                if ty == "bool" {
                    format!("{q}::text AS {q}")
                } else {
                    q
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let csv = self.sql(&format!(
            "COPY (SELECT {select} FROM {table} ORDER BY {order_by}) TO STDOUT WITH (FORMAT csv, HEADER)"
        ))?;
        let floats: Vec<(usize, bool)> = columns
            .iter()
            .enumerate()
            .filter_map(|(i, (_, ty))| match ty.as_str() {
                "float8" => Some((i, false)),
                "float4" => Some((i, true)),
                _ => None,
            })
            .collect();
        if floats.is_empty() {
            return Ok(csv);
        }
        let mut out = String::with_capacity(csv.len());
        for (n, record) in csv_records(&csv).into_iter().enumerate() {
            let mut fields: Vec<String> = record.iter().map(|f| f.to_string()).collect();
            if n > 0 {
                for &(i, single) in &floats {
                    let field = fields
                        .get_mut(i)
                        .with_context(|| format!("CSV record {n} has too few fields"))?;
                    if !field.is_empty() {
                        *field = hub_real(field, single)?;
                    }
                }
            }
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        Ok(out)
    }
}

/// The pgbench tables as resources `ACCOUNTS`, `BRANCHES`, `TELLERS` and
/// `HISTORY`, each keyed by its primary key; the history has none and is
/// shared by its whole row (see [`crate::Sandbox::pgbench`]).
pub fn pgbench_resources() -> Vec<ResourceSpec> {
    ["accounts", "branches", "tellers", "history"]
        .iter()
        .map(|t| ResourceSpec::new(&t.to_uppercase(), &format!("pgbench_{t}"), &[], "realtime"))
        .collect()
}

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The text whose UTF-8 bytes `hex` spells.
fn unhex(hex: &str) -> Result<String> {
    let bytes = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(String::from_utf8(bytes)?)
}

/// Marks a start error as a port conflict (retried on another port).
const PORT_TAKEN: &str = " (port taken)";

/// The hub's text for a real that PostgreSQL printed as `text`.
fn hub_real(text: &str, single: bool) -> Result<String> {
    Ok(match text {
        "NaN" | "Infinity" | "-Infinity" => text.to_string(),
        // A real keeps the decimal text PostgreSQL printed (the shortest
        // text that reads back as the same float4), as a float8.
        _ if single => format!(
            "{:?}",
            text.parse::<f64>()
                .with_context(|| format!("not a float4: {text}"))?
        ),
        _ => format!(
            "{:?}",
            text.parse::<f64>()
                .with_context(|| format!("not a float8: {text}"))?
        ),
    })
}

/// Splits CSV text into records of fields exactly as written (quotes kept),
/// honouring quoted commas, quotes and line breaks.
pub fn csv_records(text: &str) -> Vec<Vec<&str>> {
    let bytes = text.as_bytes();
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                fields.push(&text[start..i]);
                start = i + 1;
            }
            b'\n' if !quoted => {
                fields.push(&text[start..i]);
                records.push(std::mem::take(&mut fields));
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < bytes.len() {
        fields.push(&text[start..]);
        records.push(fields);
    }
    records
}

/// Fails with the first differing line (numbered from 1; line 1 is the
/// header) and both row counts if the source's CSV ([`PgInstance::table_csv`])
/// and the hub's export differ.
pub fn assert_same_csv(source: &str, hub: &str) -> Result<()> {
    let rows = |csv: &str| csv_records(csv).len().saturating_sub(1);
    let counts = || {
        format!(
            "the source has {} rows, the hub {}",
            rows(source),
            rows(hub)
        )
    };
    let (source_lines, hub_lines): (Vec<&str>, Vec<&str>) =
        (source.lines().collect(), hub.lines().collect());
    // With equal line counts the lines pair up row for row: say how many
    // differ and show a few, which tells a copy that is behind (many rows,
    // the latest changes) from a few stale rows. Otherwise only the first
    // difference means anything.
    let lines = source_lines.len().max(hub_lines.len());
    let paired = source_lines.len() == hub_lines.len();
    let differing: Vec<usize> = (0..lines)
        .filter(|&i| source_lines.get(i) != hub_lines.get(i))
        .take(if paired { lines } else { 1 })
        .collect();
    if let Some(&first) = differing.first() {
        let shown: Vec<String> = differing
            .iter()
            .take(5)
            .map(|&i| {
                format!(
                    "line {}:\n source: {}\n hub:    {}",
                    i + 1,
                    source_lines.get(i).copied().unwrap_or("<end>"),
                    hub_lines.get(i).copied().unwrap_or("<end>")
                )
            })
            .collect();
        let many = match differing.len() {
            1 => "1 line differs".to_string(),
            n => format!("{n} lines differ"),
        };
        bail!(
            "{many}, the first at line {} ({}):\n{}",
            first + 1,
            counts(),
            shown.join("\n")
        );
    }
    // Lines agree; a final newline could still differ.
    if source != hub {
        bail!("the CSV texts differ only in their ending ({})", counts());
    }
    Ok(())
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// When running as root, the `postgres` user must be able to reach `dir`:
/// every directory above it must let others through (`o+x`). Temporary
/// directories (mode 0700 as created) under the system's temporary
/// directory are opened for traversal only (not listing); any other
/// closed directory is an error naming it.
fn reachable_by_others(dir: &Path) -> Result<()> {
    let tmp = std::fs::canonicalize(std::env::temp_dir())?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)?;
        let mode = meta.permissions().mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if ancestor.starts_with(&tmp) && ancestor != tmp {
            std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | 0o001))?;
        } else {
            bail!(
                "PostgreSQL runs as the `postgres` user, which cannot reach {} through {} \
                 (mode {:o}); use a directory under {} or allow others through (chmod o+x)",
                dir.display(),
                ancestor.display(),
                mode & 0o7777,
                tmp.display()
            );
        }
    }
    Ok(())
}

impl Drop for PgInstance {
    fn drop(&mut self) {
        if self.running || self.data.join("postmaster.pid").exists() {
            let _ = self
                .tool("pg_ctl")
                .args(["-w", "-t", "60", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_quoted_separators() {
        let csv = "a,b\n1,\"x,\"\"y\"\"\nz\"\n2,\n";
        let r = csv_records(csv);
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], vec!["1", "\"x,\"\"y\"\"\nz\""]);
        assert_eq!(r[2], vec!["2", ""]);
    }

    #[test]
    fn reals_in_the_hub_form() {
        assert_eq!(hub_real("1e+300", false).unwrap(), "1e300");
        assert_eq!(hub_real("1", false).unwrap(), "1.0");
        assert_eq!(hub_real("-0", false).unwrap(), "-0.0");
        assert_eq!(hub_real("0.1", true).unwrap(), "0.1");
        assert_eq!(hub_real("3.4028235e+38", true).unwrap(), "3.4028235e38");
        assert_eq!(hub_real("NaN", true).unwrap(), "NaN");
    }

    #[test]
    fn lsns() {
        assert_eq!(parse_lsn("16/B374D848\n"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn first_difference_is_named() {
        assert!(assert_same_csv("a\n1\n", "a\n1\n").is_ok());
        let e = assert_same_csv("a\n1\n2\n", "a\n1\n3\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = assert_same_csv("a\n1\n2\n", "a\n1\n").unwrap_err();
        assert!(
            e.to_string().contains("source has 2 rows, the hub 1"),
            "{e}"
        );
    }
}
