//! The hub's configuration: one TOML file, parsed raw and validated.
//!
//! Invariant: every error names the file, the key and the reason; relative
//! paths are resolved against the directory of the config file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::Deserialize;
use shuyuan_protocol::catalog::ShareType;
use shuyuan_protocol::cycle::parse_duration;
use shuyuan_protocol::{FeedId, NodeId};
use shuyuan_service::config::{config_dir, parse_toml, read_config};

use crate::catalog::deadline::{Calendar, parse_offset};

pub use shuyuan_service::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hub: RawHub,
    #[serde(default)]
    catalog: RawCatalog,
    #[serde(default)]
    freshness: RawFreshness,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    alerts: RawAlerts,
    upstream: Option<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: String,
    key: String,
    share_types: Option<Vec<String>>,
    undeclared: Option<String>,
    #[serde(default)]
    exclude: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    /// No longer accepted: one shared password cannot say who reviewed.
    password_hash: Option<String>,
    session: Option<String>,
    secure_cookie: Option<bool>,
    login_failures_per_address: Option<usize>,
    login_failures_per_minute: Option<usize>,
    /// Administrator name -> argon2 PHC string.
    #[serde(default)]
    accounts: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    webhook: Option<String>,
    attempts: Option<u32>,
    retry_after: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    publication_deadline_days: Option<u32>,
    holidays: Option<PathBuf>,
    utc_offset: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFreshness {
    grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    name: Option<String>,
    #[serde(default = "default_key_file")]
    key_file: PathBuf,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_listen")]
    listen: String,
    max_connections: Option<usize>,
}

fn default_key_file() -> PathBuf {
    PathBuf::from("hub.key")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("hub-data")
}
fn default_listen() -> String {
    "0.0.0.0:7700".to_string()
}

/// A validated hub configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    /// The platform's display name.
    pub name: String,
    pub key_file: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Working days within which an updated catalog entry must be
    /// published after its table changed.
    pub publication_deadline_days: u32,
    /// Working days, holidays and make-up days, in the local time zone.
    pub calendar: Calendar,
    /// How late a change or zero-update may be, beyond the update cycle,
    /// before the resource is overdue.
    pub freshness_grace: Duration,
    /// The admin console, JSON API and metrics (`None`: switched off).
    pub admin: Option<AdminConfig>,
    /// Where state changes are posted.
    pub alerts: AlertsConfig,
    /// The parent hub this one forwards to (区县平台向上级联).
    pub upstream: Option<UpstreamConfig>,
}

/// The link to a parent hub.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The parent's `HOST:PORT`.
    pub address: String,
    /// The parent's key, pinned.
    pub key: NodeId,
    /// Resources whose catalog entry declares one of these share types
    /// (共享类型) are forwarded; the others' data stays here.
    pub share_types: Vec<ShareType>,
    /// Forward resources whose catalog entry declares no share type yet.
    pub forward_undeclared: bool,
    /// Feeds (`DEPARTMENT:RESOURCE`) never forwarded, whatever their entry says.
    pub exclude: Vec<FeedId>,
}

/// The admin HTTP server.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The named administrators and their passwords as argon2 PHC strings;
    /// when any is set, every request must log in. Required when `listen`
    /// is not a loopback address.
    pub accounts: BTreeMap<String, String>,
    /// How long a login lasts.
    pub session: Duration,
    /// The console is served over HTTPS (behind a TLS proxy): the session
    /// cookie is `__Host-` prefixed and `Secure`.
    pub secure_cookie: bool,
    /// Failed logins one address may make within 15 minutes, and all
    /// addresses within a minute, before password checks are refused.
    pub login_failures_per_address: usize,
    pub login_failures_per_minute: usize,
}

/// Alerts on state changes.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// An `http://` or `https://` URL that receives each event as JSON.
    pub webhook: Option<String>,
    /// Deliveries tried per event before it is given up (and logged).
    pub attempts: u32,
    /// The wait before the first retry; it doubles with each retry.
    pub retry_after: Duration,
    /// How long one delivery may take.
    pub timeout: Duration,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(path, &read_config(path)?)
    }

    /// Validates config text as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = parse_toml(path, text)?;
        let err = |key: &str, reason: String| ConfigError::at(path, key, reason);
        let base = config_dir(path);
        let listen: SocketAddr = raw.hub.listen.parse().map_err(|_| {
            err(
                "hub.listen",
                format!(
                    "{:?} is not IP:PORT (for example \"0.0.0.0:7700\")",
                    raw.hub.listen
                ),
            )
        })?;
        let max_connections = match raw.hub.max_connections {
            Some(0) => return Err(err("hub.max_connections", "must be at least 1".into())),
            Some(n) => n,
            None => 1024,
        };
        let publication_deadline_days = match raw.catalog.publication_deadline_days {
            None => 2,
            Some(d @ 1..=30) => d,
            Some(_) => {
                return Err(err(
                    "catalog.publication_deadline_days",
                    "must be 1 to 30 working days (the regulations set 1 to 15)".into(),
                ));
            }
        };
        let offset = match &raw.catalog.utc_offset {
            None => 480,
            Some(o) => parse_offset(o).ok_or_else(|| {
                err(
                    "catalog.utc_offset",
                    format!("{o:?} is not an offset such as \"+08:00\""),
                )
            })?,
        };
        let calendar = match &raw.catalog.holidays {
            None => Calendar::weekdays(offset),
            Some(p) => Calendar::load(&base.join(p), offset)?,
        };
        let freshness_grace = match &raw.freshness.grace {
            None => Duration::from_secs(300),
            Some(g) => parse_duration(g).ok_or_else(|| {
                err(
                    "freshness.grace",
                    format!("{g:?} is not a duration such as \"5min\""),
                )
            })?,
        };
        let duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(v) => parse_duration(v)
                .ok_or_else(|| err(key, format!("{v:?} is not a duration such as \"5s\""))),
        };
        let admin = match raw.admin.listen.as_deref() {
            Some("off") => None,
            listen => {
                let text = listen.unwrap_or("127.0.0.1:7780");
                let listen: SocketAddr = text.parse().map_err(|_| {
                    err(
                        "admin.listen",
                        format!(
                            "{text:?} is not IP:PORT (for example \"127.0.0.1:7780\") or \"off\""
                        ),
                    )
                })?;
                if raw.admin.password_hash.is_some() {
                    return Err(err(
                        "admin.password_hash",
                        "one shared console password is no longer accepted, since it cannot say who reviewed an entry: name each administrator under [admin.accounts] (NAME = \"HASH\", a line made by `shuyuan-hub admin-password NAME`)".into(),
                    ));
                }
                let mut accounts = BTreeMap::new();
                for (name, hash) in &raw.admin.accounts {
                    let key = format!("admin.accounts.{name}");
                    if let Err(why) = crate::admin::accounts::check_name(name) {
                        return Err(err(&key, why));
                    }
                    argon2::PasswordHash::new(hash).map_err(|e| {
                        err(
                            &key,
                            format!("not an argon2 hash ({e}); make one with `shuyuan-hub admin-password {name}`"),
                        )
                    })?;
                    accounts.insert(name.clone(), hash.clone());
                }
                if accounts.is_empty() && !listen.ip().is_loopback() {
                    return Err(err(
                        "admin.accounts",
                        format!(
                            "the console listens on {listen}, beyond loopback: name at least one administrator (make a line with `shuyuan-hub admin-password NAME`)"
                        ),
                    ));
                }
                let session = duration(
                    "admin.session",
                    &raw.admin.session,
                    Duration::from_secs(12 * 3600),
                )?;
                if session < Duration::from_secs(60) {
                    return Err(err("admin.session", "must be at least 1min".into()));
                }
                let limit = |key: &str, value: Option<usize>, default: usize| match value {
                    None => Ok(default),
                    Some(n @ 1..=100_000) => Ok(n),
                    Some(_) => Err(err(key, "must be 1 to 100000".into())),
                };
                Some(AdminConfig {
                    listen,
                    accounts,
                    session,
                    secure_cookie: raw.admin.secure_cookie.unwrap_or(false),
                    login_failures_per_address: limit(
                        "admin.login_failures_per_address",
                        raw.admin.login_failures_per_address,
                        crate::admin::limits::ADDRESS_FAILURES,
                    )?,
                    login_failures_per_minute: limit(
                        "admin.login_failures_per_minute",
                        raw.admin.login_failures_per_minute,
                        crate::admin::limits::GLOBAL_FAILURES,
                    )?,
                })
            }
        };
        if let Some(url) = &raw.alerts.webhook {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && reqwest::Url::parse(url).is_ok_and(|u| u.host_str().is_some());
            if !ok {
                return Err(err(
                    "alerts.webhook",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        let alerts = AlertsConfig {
            webhook: raw.alerts.webhook.clone(),
            attempts: match raw.alerts.attempts {
                None => 5,
                Some(n @ 1..=100) => n,
                Some(_) => return Err(err("alerts.attempts", "must be 1 to 100".into())),
            },
            retry_after: duration(
                "alerts.retry_after",
                &raw.alerts.retry_after,
                Duration::from_secs(2),
            )?,
            timeout: duration(
                "alerts.timeout",
                &raw.alerts.timeout,
                Duration::from_secs(10),
            )?,
        };
        let upstream = match &raw.upstream {
            None => None,
            Some(u) => Some(upstream(u, &err)?),
        };
        Ok(Config {
            file: path.to_owned(),
            name: raw.hub.name.unwrap_or_else(|| "shuyuan hub".to_string()),
            key_file: base.join(raw.hub.key_file),
            data_dir: base.join(raw.hub.data_dir),
            listen,
            max_connections,
            publication_deadline_days,
            calendar,
            freshness_grace,
            admin,
            alerts,
            upstream,
        })
    }

    /// The hub's database.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("hub.redb")
    }

    /// The token the hub writes at start (mode 0600) for local commands that
    /// use the admin API, such as `status`.
    pub fn local_token_file(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// Where the hub writes the admin console's bound address at start
    /// (useful with port 0).
    pub fn admin_addr_file(&self) -> PathBuf {
        self.data_dir.join("admin.addr")
    }

    /// The control socket used by `status`, `enroll`, `export` and `audit`.
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("hub.sock")
    }
}

fn upstream(
    u: &RawUpstream,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<UpstreamConfig, ConfigError> {
    if !shuyuan_service::config::is_host_port(&u.address) {
        return Err(err(
            "upstream.address",
            format!(
                "{:?} is not HOST:PORT (the parent hub's address)",
                u.address
            ),
        ));
    }
    let key: NodeId = u
        .key
        .parse()
        .map_err(|e: shuyuan_protocol::identity::IdentityError| {
            err("upstream.key", format!("{e} (the parent hub's key)"))
        })?;
    let share_types = match &u.share_types {
        None => vec![ShareType::Unconditional, ShareType::Conditional],
        Some(list) => list
            .iter()
            .map(|t| t.parse::<ShareType>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err("upstream.share_types", e.to_string()))?,
    };
    if share_types.contains(&ShareType::NotShared) {
        return Err(err(
            "upstream.share_types",
            "not-shared (不予共享) data never leaves the platform; list unconditional and/or conditional".into(),
        ));
    }
    let forward_undeclared = match u.undeclared.as_deref() {
        None | Some("hold") => false,
        Some("forward") => true,
        Some(other) => {
            return Err(err(
                "upstream.undeclared",
                format!("{other:?} is not \"hold\" or \"forward\""),
            ));
        }
    };
    let exclude = u
        .exclude
        .iter()
        .map(|f| {
            f.parse::<FeedId>().map_err(|e| {
                err(
                    "upstream.exclude",
                    format!("{f:?} is not DEPARTMENT:RESOURCE: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(UpstreamConfig {
        address: u.address.clone(),
        key,
        share_types,
        forward_undeclared,
        exclude,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::parse(Path::new("/srv/hub.toml"), "[hub]\n").unwrap();
        assert_eq!(c.key_file, PathBuf::from("/srv/hub.key"));
        assert_eq!(c.listen.port(), 7700);
        let e = Config::parse(
            Path::new("/srv/hub.toml"),
            "[hub]\nlisten = \"everywhere\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "hub.listen");
        assert!(
            e.to_string().starts_with("/srv/hub.toml: hub.listen: "),
            "{e}"
        );
        assert_eq!(c.publication_deadline_days, 2);
        let e = Config::parse(
            Path::new("/srv/hub.toml"),
            "[hub]\n[catalog]\npublication_deadline_days = 40\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "catalog.publication_deadline_days");
        let e = Config::parse(
            Path::new("/srv/hub.toml"),
            "[hub]\n[catalog]\nholidays = \"missing.toml\"\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/srv/missing.toml: (file): cannot read"),
            "{e}"
        );
        let e = Config::parse(Path::new("/srv/hub.toml"), "[hub]\nport = 1\n").unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("unknown field `port`"),
            "{e}"
        );
        let e = Config::parse(Path::new("/srv/hub.toml"), "").unwrap_err();
        assert!(e.to_string().contains("missing field `hub`"), "{e}");
    }

    #[test]
    fn admin_accounts() {
        let path = Path::new("/srv/hub.toml");
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$ZmFrZWZha2VmYWtlZmFrZWZha2VmYWtlZmFrZWZha2U";
        let c = Config::parse(
            path,
            &format!(
                "[hub]\n[admin]\nlisten = \"0.0.0.0:7780\"\nsecure_cookie = true\n[admin.accounts]\n\"zhang.wei\" = \"{hash}\"\n\"王伟\" = \"{hash}\"\n"
            ),
        )
        .unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(admin.accounts.len(), 2);
        assert!(admin.accounts.contains_key("zhang.wei") && admin.accounts.contains_key("王伟"));
        assert!(admin.secure_cookie);
        for (text, key, words) in [
            (
                format!("[admin]\npassword_hash = \"{hash}\"\n"),
                "admin.password_hash",
                "[admin.accounts]",
            ),
            (
                "[admin.accounts]\nzhang = \"plain\"\n".to_string(),
                "admin.accounts.zhang",
                "not an argon2 hash",
            ),
            (
                format!("[admin.accounts]\n\"a:b\" = \"{hash}\"\n"),
                "admin.accounts.a:b",
                "':'",
            ),
            (
                "[admin]\nlisten = \"0.0.0.0:7780\"\n".to_string(),
                "admin.accounts",
                "beyond loopback",
            ),
            (
                "[admin]\nlogin_failures_per_address = 0\n".to_string(),
                "admin.login_failures_per_address",
                "1 to 100000",
            ),
        ] {
            let e = Config::parse(path, &format!("[hub]\n{text}")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.to_string().contains(words), "{e}");
        }
    }

    #[test]
    fn upstream_section() {
        let parent = shuyuan_protocol::NodeKey::from_seed([9; 32]).id();
        let c = Config::parse(
            Path::new("/srv/hub.toml"),
            &format!("[hub]\n[upstream]\naddress = \"city.example:7700\"\nkey = \"{parent}\"\n"),
        )
        .unwrap();
        let u = c.upstream.unwrap();
        assert_eq!(u.key, parent);
        assert_eq!(
            u.share_types,
            vec![ShareType::Unconditional, ShareType::Conditional]
        );
        assert!(!u.forward_undeclared);
        for (extra, key, words) in [
            ("address = \"nowhere\"\n", "upstream.address", "HOST:PORT"),
            (
                "share_types = [\"不予共享\"]\n",
                "upstream.share_types",
                "never leaves",
            ),
            (
                "share_types = [\"sometimes\"]\n",
                "upstream.share_types",
                "sometimes",
            ),
            ("undeclared = \"maybe\"\n", "upstream.undeclared", "hold"),
            (
                "exclude = [\"nofeed\"]\n",
                "upstream.exclude",
                "DEPARTMENT:RESOURCE",
            ),
        ] {
            let text = format!(
                "[hub]\n[upstream]\naddress = \"city.example:7700\"\nkey = \"{parent}\"\n{extra}"
            )
            .replacen(
                "address = \"city.example:7700\"\n",
                "",
                usize::from(extra.starts_with("address")),
            );
            let e = Config::parse(Path::new("/srv/hub.toml"), &text).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
            assert!(e.to_string().contains(words), "{e}");
        }
        let e = Config::parse(
            Path::new("/srv/hub.toml"),
            "[hub]\n[upstream]\naddress = \"city.example:7700\"\nkey = \"abc\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "upstream.key");
    }
}
