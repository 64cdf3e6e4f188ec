//! The agent's configuration: one TOML file, parsed into a raw form and then
//! validated into [`Config`] ("parse, don't validate").
//!
//! Invariant: every error names the file, the key and the reason; relative
//! paths are resolved against the directory of the config file, so a config
//! means the same thing whatever directory the service starts in.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shuyuan_protocol::cycle::parse_duration;
use shuyuan_protocol::frame::MAX_BATCH_BODY;
use shuyuan_protocol::{DepartmentCode, NodeId, ResourceCode, UpdateCycle};
use shuyuan_service::config::{config_dir, parse_toml, read_config};

/// The most key columns a resource may have (the change table's width).
pub const MAX_KEY_COLUMNS: usize = 8;

pub use shuyuan_service::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: RawAgent,
    hub: RawHub,
    source: RawSource,
    #[serde(default)]
    outbox: RawOutbox,
    #[serde(default)]
    verify: RawVerify,
    #[serde(default, rename = "resource")]
    resources: Vec<RawResource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    department: String,
    #[serde(default = "default_key_file")]
    key_file: PathBuf,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
}

fn default_key_file() -> PathBuf {
    PathBuf::from("agent.key")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("agent-data")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    rows_per_second: Option<u64>,
    every: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    address: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
enum RawSource {
    Sqlite {
        path: PathBuf,
        poll_interval: Option<String>,
        busy_timeout: Option<String>,
    },
    Postgres {
        dsn: String,
        password_file: Option<PathBuf>,
        slot: Option<String>,
        publication: Option<String>,
        poll_interval: Option<String>,
        chunk_size: Option<usize>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    max_size: Option<String>,
    batch_max_changes: Option<usize>,
    batch_max_size: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    code: String,
    name: Option<String>,
    table: String,
    #[serde(default)]
    key: Vec<String>,
    update_cycle: String,
    heartbeat: Option<String>,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    pub department: DepartmentCode,
    pub key_file: PathBuf,
    pub data_dir: PathBuf,
    pub hub: HubConfig,
    pub source: SourceConfig,
    pub outbox: OutboxConfig,
    pub verify: VerifyConfig,
    pub resources: Vec<ResourceConfig>,
}

/// Comparisons of the source with the hub's copy (一致性核验).
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Source rows a comparison reads per second at most.
    pub rows_per_second: u64,
    /// How often the agent compares every resource with the hub's copy on
    /// its own (`None`: only when asked).
    pub every: Option<Duration>,
}

/// Where the hub is and which key it must present.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `host:port` as written; resolved at every connection attempt.
    pub address: String,
    pub key: NodeId,
}

/// The department database.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    Sqlite {
        path: PathBuf,
        poll_interval: Duration,
        busy_timeout: Duration,
    },
    /// Log-based capture through a logical replication slot (pgoutput).
    Postgres(PgConfig),
}

/// A PostgreSQL source.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// libpq-style `key=value` connection string, without the password.
    pub dsn: String,
    /// A file holding the password (first line), kept out of the config.
    pub password: Option<String>,
    pub slot: String,
    pub publication: String,
    /// How long one read waits for the log when nothing arrives.
    pub poll_interval: Duration,
    /// Rows per chunk of an initial load or resync.
    pub chunk_size: usize,
}

impl SourceConfig {
    /// How long the capture loop waits between reads when idle.
    pub fn poll_interval(&self) -> Duration {
        match self {
            SourceConfig::Sqlite { poll_interval, .. } => *poll_interval,
            SourceConfig::Postgres(pg) => pg.poll_interval,
        }
    }
}

/// Outbox limits.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Capture pauses when the outbox holds this many bytes.
    pub max_bytes: u64,
    pub batch_max_changes: usize,
    pub batch_max_bytes: usize,
}

/// One shared resource (one table).
#[derive(Debug, Clone)]
pub struct ResourceConfig {
    pub code: ResourceCode,
    pub name: String,
    pub table: String,
    pub key: Vec<String>,
    /// The update cycle this file declares. It seeds the resource's catalog
    /// entry; once the entry exists, the catalog's cycle is the one in force.
    pub update_cycle: UpdateCycle,
    /// An explicit zero-update interval (`heartbeat`), if the file sets one.
    pub heartbeat: Option<Duration>,
}

impl ResourceConfig {
    /// How long the resource may stay quiet before a zero-update is sent,
    /// under `cycle`: the explicit `heartbeat` if shorter, else the cycle.
    pub fn heartbeat_under(&self, cycle: UpdateCycle) -> Duration {
        self.heartbeat
            .map_or(cycle.period(), |h| h.min(cycle.period()))
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(path, &read_config(path)?)
    }

    /// Validates config text as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = parse_toml(path, text)?;
        let base = config_dir(path);
        let err = |key: &str, reason: String| ConfigError::at(path, key, reason);
        let department = DepartmentCode::new(raw.agent.department)
            .map_err(|e| err("agent.department", e.to_string()))?;
        let key = raw
            .hub
            .key
            .parse::<NodeId>()
            .map_err(|e| err("hub.key", e.to_string()))?;
        if !shuyuan_service::config::is_host_port(&raw.hub.address) {
            return Err(err(
                "hub.address",
                format!("{:?} is not HOST:PORT", raw.hub.address),
            ));
        }
        let source = match raw.source {
            RawSource::Sqlite {
                path: db,
                poll_interval,
                busy_timeout,
            } => SourceConfig::Sqlite {
                path: base.join(db),
                poll_interval: duration(
                    &err,
                    "source.poll_interval",
                    poll_interval,
                    Duration::from_millis(200),
                )?,
                busy_timeout: duration(
                    &err,
                    "source.busy_timeout",
                    busy_timeout,
                    Duration::from_secs(5),
                )?,
            },
            RawSource::Postgres {
                dsn,
                password_file,
                slot,
                publication,
                poll_interval,
                chunk_size,
            } => {
                if let Err(e) = dsn.parse::<tokio_postgres::Config>() {
                    return Err(err("source.dsn", format!("not a connection string: {e}")));
                }
                if dsn.split_whitespace().any(|kv| kv.starts_with("password=")) {
                    return Err(err(
                        "source.dsn",
                        "holds a password; put it in a file named by source.password_file (mode 0600)".into(),
                    ));
                }
                let password = match password_file {
                    Some(f) => {
                        let f = base.join(f);
                        let text = std::fs::read_to_string(&f).map_err(|e| {
                            err(
                                "source.password_file",
                                format!("cannot read {}: {e}", f.display()),
                            )
                        })?;
                        Some(text.lines().next().unwrap_or("").to_string())
                    }
                    None => None,
                };
                let default_name = format!(
                    "shuyuan_{}",
                    department
                        .as_str()
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        })
                        .collect::<String>()
                );
                let name = |key: &str, v: Option<String>| -> Result<String, ConfigError> {
                    let v = v.unwrap_or_else(|| default_name.clone());
                    if is_identifier(&v) && v.chars().all(|c| !c.is_ascii_uppercase()) {
                        Ok(v)
                    } else {
                        Err(err(
                            key,
                            format!("{v:?} is not a lower-case identifier (a-z, 0-9, _)"),
                        ))
                    }
                };
                SourceConfig::Postgres(PgConfig {
                    dsn,
                    password,
                    slot: name("source.slot", slot)?,
                    publication: name("source.publication", publication)?,
                    poll_interval: duration(
                        &err,
                        "source.poll_interval",
                        poll_interval,
                        Duration::from_millis(50),
                    )?,
                    chunk_size: match chunk_size {
                        Some(n) if (1..=1_000_000).contains(&n) => n,
                        Some(_) => {
                            return Err(err(
                                "source.chunk_size",
                                "must be between 1 and 1000000 rows".into(),
                            ));
                        }
                        None => 5000,
                    },
                })
            }
        };
        let verify = VerifyConfig {
            rows_per_second: match raw.verify.rows_per_second {
                Some(n @ 1_000..=100_000_000) => n,
                Some(_) => {
                    return Err(err(
                        "verify.rows_per_second",
                        "must be between 1000 and 100000000".into(),
                    ));
                }
                None => 200_000,
            },
            every: match raw.verify.every.as_deref().map(str::trim) {
                Some("off") => None,
                other => Some(duration(
                    &err,
                    "verify.every",
                    other.map(String::from),
                    Duration::from_secs(24 * 3600),
                )?),
            },
        };
        let postgres = matches!(source, SourceConfig::Postgres(_));
        let outbox = OutboxConfig {
            max_bytes: match raw.outbox.max_size {
                Some(s) => parse_size(&s).ok_or_else(|| {
                    err(
                        "outbox.max_size",
                        format!("{s:?} is not a size such as \"256 MiB\""),
                    )
                })?,
                None => 256 * 1024 * 1024,
            },
            batch_max_changes: match raw.outbox.batch_max_changes {
                Some(0) => {
                    return Err(err("outbox.batch_max_changes", "must be at least 1".into()));
                }
                Some(n) => n,
                None => 1000,
            },
            batch_max_bytes: match raw.outbox.batch_max_size {
                Some(s) => {
                    let n = parse_size(&s).ok_or_else(|| {
                        err(
                            "outbox.batch_max_size",
                            format!("{s:?} is not a size such as \"1 MiB\""),
                        )
                    })?;
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    if !(1024..=MAX_BATCH_BODY).contains(&n) {
                        return Err(err(
                            "outbox.batch_max_size",
                            format!(
                                "must be between 1 KiB and {} bytes (the frame limit)",
                                MAX_BATCH_BODY
                            ),
                        ));
                    }
                    n
                }
                None => 1024 * 1024,
            },
        };
        if outbox.max_bytes < outbox.batch_max_bytes as u64 {
            return Err(err(
                "outbox.max_size",
                "must be at least outbox.batch_max_size".into(),
            ));
        }
        if raw.resources.is_empty() {
            return Err(err(
                "resource",
                "no [[resource]] is declared; the agent would have nothing to share".into(),
            ));
        }
        let mut resources = Vec::new();
        let mut codes = BTreeSet::new();
        let mut tables = BTreeSet::new();
        for (i, r) in raw.resources.into_iter().enumerate() {
            let at = |k: &str| format!("resource[{i}].{k}");
            let code = ResourceCode::new(r.code).map_err(|e| err(&at("code"), e.to_string()))?;
            if !codes.insert(code.clone()) {
                return Err(err(&at("code"), format!("{code} is declared twice")));
            }
            let table_ok = if postgres {
                // PostgreSQL tables may name their schema: `schema.table`.
                match r.table.split_once('.') {
                    Some((schema, table)) => is_identifier(schema) && is_identifier(table),
                    None => is_identifier(&r.table),
                }
            } else {
                is_identifier(&r.table)
            };
            if !table_ok {
                return Err(err(
                    &at("table"),
                    format!(
                        "{:?} is not a plain table name (letters, digits, _{})",
                        r.table,
                        if postgres {
                            "; optionally schema.table"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if !tables.insert(r.table.clone()) {
                return Err(err(
                    &at("table"),
                    format!("table {} is already shared by another resource", r.table),
                ));
            }
            // PostgreSQL may leave the key out: the table's primary key (or,
            // without one, its REPLICA IDENTITY FULL row) is used.
            if (r.key.is_empty() && !postgres) || r.key.len() > MAX_KEY_COLUMNS {
                return Err(err(
                    &at("key"),
                    format!("give 1 to {MAX_KEY_COLUMNS} key columns"),
                ));
            }
            if let Some(bad) = r.key.iter().find(|k| !is_identifier(k)) {
                return Err(err(
                    &at("key"),
                    format!("{bad:?} is not a plain column name"),
                ));
            }
            let update_cycle: UpdateCycle =
                r.update_cycle
                    .parse()
                    .map_err(|e: shuyuan_protocol::cycle::CycleError| {
                        err(&at("update_cycle"), e.to_string())
                    })?;
            let heartbeat = match r.heartbeat {
                Some(h) => match parse_duration(&h) {
                    Some(d) if !d.is_zero() && d <= update_cycle.period() => Some(d),
                    Some(_) => {
                        return Err(err(
                            &at("heartbeat"),
                            format!(
                                "must be positive and no longer than the update cycle ({})",
                                update_cycle
                            ),
                        ));
                    }
                    None => {
                        return Err(err(
                            &at("heartbeat"),
                            format!("{h:?} is not a duration such as \"30s\""),
                        ));
                    }
                },
                None => None,
            };
            resources.push(ResourceConfig {
                name: r.name.unwrap_or_else(|| r.table.clone()),
                code,
                table: r.table,
                key: r.key,
                update_cycle,
                heartbeat,
            });
        }
        Ok(Config {
            file: path.to_owned(),
            department,
            key_file: base.join(raw.agent.key_file),
            data_dir: base.join(raw.agent.data_dir),
            hub: HubConfig {
                address: raw.hub.address,
                key,
            },
            source,
            outbox,
            verify,
            resources,
        })
    }

    /// The outbox database file.
    pub fn outbox_path(&self) -> PathBuf {
        self.data_dir.join("outbox.redb")
    }

    /// The control socket `status` talks to.
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }
}

fn duration(
    err: &impl Fn(&str, String) -> ConfigError,
    key: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => match parse_duration(&v) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(err(
                key,
                format!("{v:?} is not a positive duration such as \"200ms\" or \"5s\""),
            )),
        },
    }
}

/// A plain SQL identifier: letters, digits and `_`, not starting with a digit.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

/// Parses `1048576`, `512 KiB`, `256 MiB`, `1 GiB`, `10 MB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: &str = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjsx2ytdmrsxs";

    fn good() -> String {
        format!(
            r#"
[agent]
department = "GA-330902"
[hub]
address = "127.0.0.1:7700"
key = "{HUB}"
[source]
kind = "sqlite"
path = "dept.db"
[[resource]]
code = "A01/0001"
table = "household"
key = ["id_number"]
update_cycle = "daily"
"#
        )
    }

    fn hub_key() -> String {
        shuyuan_protocol::NodeKey::from_seed([1; 32])
            .id()
            .to_string()
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/shuyuan/agent.toml"),
            &text.replace(HUB, &hub_key()),
        )
    }

    #[test]
    fn good_config_resolves_paths() {
        let c = parse(&good()).unwrap();
        assert_eq!(c.key_file, PathBuf::from("/etc/shuyuan/agent.key"));
        match &c.source {
            SourceConfig::Sqlite {
                path,
                poll_interval,
                ..
            } => {
                assert_eq!(path, &PathBuf::from("/etc/shuyuan/dept.db"));
                assert_eq!(*poll_interval, Duration::from_millis(200));
            }
            other => panic!("not sqlite: {other:?}"),
        }
        assert_eq!(c.resources[0].heartbeat, None);
        assert_eq!(
            c.resources[0].heartbeat_under(UpdateCycle::Daily),
            Duration::from_secs(86_400)
        );
        assert_eq!(c.verify.rows_per_second, 200_000);
        assert_eq!(c.verify.every, Some(Duration::from_secs(86_400)));
        let off = parse(&(good() + "[verify]\nevery = \"off\"\n")).unwrap();
        assert_eq!(off.verify.every, None);
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases = [
            (
                good().replace("daily", "fortnightly"),
                "resource[0].update_cycle",
                "fortnightly",
            ),
            (
                good().replace("GA-330902", "GA 330902"),
                "agent.department",
                "not valid",
            ),
            (good().replace(HUB, "abc"), "hub.key", "52 base32"),
            (
                good().replace("127.0.0.1:7700", "nowhere"),
                "hub.address",
                "HOST:PORT",
            ),
            (
                good().replace("table = \"household\"", "table = \"house; drop\""),
                "resource[0].table",
                "plain table name",
            ),
            (
                good().replace("key = [\"id_number\"]", "key = []"),
                "resource[0].key",
                "key columns",
            ),
            (
                good() + "[outbox]\nmax_size = \"lots\"\n",
                "outbox.max_size",
                "not a size",
            ),
            (
                good() + "[verify]\nrows_per_second = 5\n",
                "verify.rows_per_second",
                "between 1000",
            ),
            (
                good() + "[verify]\nevery = \"sometimes\"\n",
                "verify.every",
                "positive duration",
            ),
            (
                good().replace("[agent]", "[agent]\ncolour = \"red\""),
                "line 3",
                "unknown field `colour`",
            ),
            (
                good().replace("kind = \"sqlite\"", "kind = \"oracle\""),
                "line",
                "oracle",
            ),
        ];
        for (text, key, reason) in cases {
            let e = parse(&text).unwrap_err();
            let shown = e.to_string();
            assert!(shown.starts_with("/etc/shuyuan/agent.toml: "), "{shown}");
            assert!(e.key.contains(key), "expected key {key} in {shown}");
            assert!(shown.contains(reason), "expected {reason:?} in {shown}");
        }
    }

    fn postgres(source: &str) -> String {
        good().replace(
            "kind = \"sqlite\"\npath = \"dept.db\"",
            &format!("kind = \"postgres\"\n{source}"),
        )
    }

    #[test]
    fn postgres_source() {
        let text = postgres("dsn = \"host=127.0.0.1 port=5433 user=agent dbname=dept\"")
            .replace("key = [\"id_number\"]", "")
            .replace("table = \"household\"", "table = \"civil.household\"");
        let c = parse(&text).unwrap();
        let SourceConfig::Postgres(pg) = &c.source else {
            panic!("not postgres: {:?}", c.source);
        };
        assert_eq!(pg.slot, "shuyuan_ga_330902");
        assert_eq!(pg.publication, "shuyuan_ga_330902");
        assert_eq!(pg.chunk_size, 5000);
        assert!(c.resources[0].key.is_empty(), "the primary key is used");
        assert_eq!(c.resources[0].table, "civil.household");

        for (source, key, reason) in [
            (
                "dsn = \"host=h password=secret\"",
                "source.dsn",
                "password_file",
            ),
            (
                "dsn = \"host='unterminated\"",
                "source.dsn",
                "connection string",
            ),
            (
                "dsn = \"host=h\"\nslot = \"Bad-Slot\"",
                "source.slot",
                "lower-case",
            ),
            (
                "dsn = \"host=h\"\nchunk_size = 0",
                "source.chunk_size",
                "between",
            ),
            (
                "dsn = \"host=h\"\npassword_file = \"/nonexistent/pw\"",
                "source.password_file",
                "cannot read",
            ),
        ] {
            let e = parse(&postgres(source)).unwrap_err();
            assert!(e.key.contains(key), "expected key {key} in {e}");
            assert!(e.to_string().contains(reason), "expected {reason:?} in {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256 MiB"), Some(256 << 20));
        assert_eq!(parse_size("10MB"), Some(10_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("5 TiB"), None);
    }
}
