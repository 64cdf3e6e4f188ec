//! Who may use the admin server.
//!
//! Invariant: a request is served only when the console is open (loopback,
//! no administrators configured, a strictly parsed loopback `Host`) or it
//! carries a live session (cookie or bearer), the local API token, or basic
//! credentials of a named administrator. Every state-changing request,
//! whatever its credential and including the logins, must come from the
//! console's own origin ([`same_origin`]). Password checks are bounded
//! ([`super::accounts`]) and limited per address and globally
//! ([`super::limits`]); session tokens are looked up by their hash, so no
//! comparison runs on a secret.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, header};
use tokio::sync::watch;

use super::accounts::{Accounts, Check};
use super::limits::{Limited, LoginLimits};
use crate::config::AdminConfig;

/// The session cookie's name on plain HTTP.
pub const COOKIE: &str = "shuyuan_session";
/// The session cookie's name when the console is served over HTTPS: the
/// `__Host-` prefix makes browsers refuse it unless `Secure`, host-only
/// and for `/`.
pub const SECURE_COOKIE: &str = "__Host-shuyuan_session";

/// A session's identity: the hash of its token (the token itself is kept
/// only by its holder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionId([u8; 32]);

impl SessionId {
    fn of(token: &str) -> SessionId {
        SessionId(*blake3::hash(token.as_bytes()).as_bytes())
    }
}

/// How a request was let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Loopback console without administrators.
    Open,
    /// The local API token (commands on the hub's machine).
    Local,
    /// A session opened by a login (a browser's cookie, or a bearer token
    /// from the API login).
    Session {
        account: String,
        id: SessionId,
        cookie: bool,
    },
    /// Basic credentials of a named administrator (scrapers).
    Basic { account: String },
}

impl Access {
    /// The administrator this request is proven to come from.
    pub fn account(&self) -> Option<&str> {
        match self {
            Access::Session { account, .. } | Access::Basic { account } => Some(account),
            Access::Open | Access::Local => None,
        }
    }

    /// A browser session (the console shows "log out").
    pub fn browser(&self) -> bool {
        matches!(self, Access::Session { cookie: true, .. })
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No or wrong credentials: log in.
    Unauthenticated,
    /// A foreign `Host` on an open console, or a cross-origin request.
    Forbidden(String),
    /// Too many failed logins: not checked.
    Limited(Limited),
    /// Too many password checks running: try again in a moment.
    Busy,
}

/// Why a login did not open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginRefused {
    Wrong,
    Limited(Limited),
    Busy,
}

/// Writes a line to the audit log (the hub's store; a list in tests).
pub type Auditor = Arc<dyn Fn(String) + Send + Sync>;

#[derive(Debug)]
struct Session {
    account: String,
    until: Instant,
}

/// Sessions, the local token, the accounts and the login limits.
pub struct Auth {
    accounts: Accounts,
    pub limits: LoginLimits,
    session_ttl: Duration,
    secure_cookie: bool,
    local_token: SessionId,
    sessions: Mutex<BTreeMap<SessionId, Session>>,
    /// Basic credentials recently checked (by their hash), so a scraper
    /// does not pay for argon2 on every request.
    basic_ok: Mutex<BTreeMap<SessionId, (String, Instant)>>,
    /// Bumped when a session ends, so live-update streams can stop.
    ended: watch::Sender<u64>,
    audit: Auditor,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    /// Password checks refused because [`super::accounts::CONCURRENT_CHECKS`]
    /// were running.
    pub checks_busy: AtomicU64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("accounts", &self.accounts)
            .field("session_ttl", &self.session_ttl)
            .field("secure_cookie", &self.secure_cookie)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Writes a fresh local API token (mode 0600) for commands on this
    /// machine.
    pub fn new(config: &AdminConfig, token_file: &Path, audit: Auditor) -> std::io::Result<Auth> {
        let local_token = random_token();
        let _ = std::fs::remove_file(token_file);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(token_file)?;
        f.write_all(local_token.as_bytes())?;
        f.sync_all()?;
        Ok(Auth {
            accounts: Accounts::new(config.accounts.clone()),
            limits: LoginLimits::new(
                config.login_failures_per_address,
                config.login_failures_per_minute,
            ),
            session_ttl: config.session,
            secure_cookie: config.secure_cookie,
            local_token: SessionId::of(&local_token),
            sessions: Mutex::new(BTreeMap::new()),
            basic_ok: Mutex::new(BTreeMap::new()),
            ended: watch::Sender::new(0),
            audit,
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            checks_busy: AtomicU64::new(0),
        })
    }

    /// Whether a login is needed at all.
    pub fn required(&self) -> bool {
        self.accounts.any()
    }

    /// The session cookie's name.
    pub fn cookie_name(&self) -> &'static str {
        if self.secure_cookie {
            SECURE_COOKIE
        } else {
            COOKIE
        }
    }

    /// Decides who a request comes from (the origin is checked for every
    /// request by [`same_origin`], before this).
    pub async fn check(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Access, Refusal> {
        if let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            if let Some(token) = value.strip_prefix("Bearer ") {
                let id = SessionId::of(token.trim());
                if id == self.local_token {
                    return Ok(Access::Local);
                }
                return match self.session(id) {
                    Some(account) => Ok(Access::Session {
                        account,
                        id,
                        cookie: false,
                    }),
                    None => Err(Refusal::Unauthenticated),
                };
            }
            if let Some(b64) = value.strip_prefix("Basic ") {
                return self.basic(b64.trim(), peer).await;
            }
            return Err(Refusal::Unauthenticated);
        }
        if let Some(token) = cookie(headers, self.cookie_name()) {
            let id = SessionId::of(token);
            if let Some(account) = self.session(id) {
                return Ok(Access::Session {
                    account,
                    id,
                    cookie: true,
                });
            }
        }
        if self.required() {
            return Err(Refusal::Unauthenticated);
        }
        // Open console: only for names that mean this machine, so a web
        // page elsewhere cannot rebind its own name to 127.0.0.1.
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if is_loopback_host(host) {
            Ok(Access::Open)
        } else {
            Err(Refusal::Forbidden(format!(
                "host {host:?} is not this machine's loopback name"
            )))
        }
    }

    /// Checks a named administrator's password; on success opens a session
    /// and returns its token.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<String, LoginRefused> {
        let account = self.password(user, password, peer).await?;
        tracing::info!(%account, %peer, "administrator logged in");
        let token = random_token();
        let mut sessions = lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, s| s.until > now);
        sessions.insert(
            SessionId::of(&token),
            Session {
                account,
                until: now + self.session_ttl,
            },
        );
        Ok(token)
    }

    /// One password check under the limits.
    async fn password(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<String, LoginRefused> {
        self.limits.admit(peer).map_err(LoginRefused::Limited)?;
        match self.accounts.check(user, password).await {
            Check::Account(account) => {
                self.limits.succeeded(peer);
                self.logins_ok.fetch_add(1, Ordering::Relaxed);
                Ok(account)
            }
            Check::Busy => {
                self.checks_busy.fetch_add(1, Ordering::Relaxed);
                Err(LoginRefused::Busy)
            }
            Check::Wrong => {
                self.logins_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "admin login refused: wrong name or password");
                if let Some(text) = self.limits.failed(peer) {
                    tracing::warn!(%text, "admin login limit reached");
                    (self.audit)(text);
                }
                Err(LoginRefused::Wrong)
            }
        }
    }

    /// Ends the session of a request, if it has one.
    pub fn logout(&self, access: &Access) {
        if let Access::Session { id, .. } = access {
            lock(&self.sessions).remove(id);
            self.ended.send_modify(|n| *n += 1);
        }
    }

    /// Changes when any session ends (for streams tied to one).
    pub fn session_ends(&self) -> watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// When a session ends, or None if it has.
    pub fn session_until(&self, id: SessionId) -> Option<Instant> {
        lock(&self.sessions)
            .get(&id)
            .map(|s| s.until)
            .filter(|until| *until > Instant::now())
    }

    /// The `Set-Cookie` value for a new session.
    pub fn session_cookie(&self, token: &str) -> String {
        format!(
            "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.cookie_name(),
            self.session_ttl.as_secs(),
            if self.secure_cookie { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that removes the session cookie.
    pub fn expired_cookie(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            self.cookie_name(),
            if self.secure_cookie { "; Secure" } else { "" }
        )
    }

    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// The account of a live session.
    fn session(&self, id: SessionId) -> Option<String> {
        lock(&self.sessions)
            .get(&id)
            .filter(|s| s.until > Instant::now())
            .map(|s| s.account.clone())
    }

    async fn basic(&self, b64: &str, peer: IpAddr) -> Result<Access, Refusal> {
        if !self.required() {
            return Err(Refusal::Unauthenticated);
        }
        let id = SessionId::of(b64);
        let now = Instant::now();
        if let Some((account, _)) = lock(&self.basic_ok).get(&id).filter(|(_, t)| *t > now) {
            return Ok(Access::Basic {
                account: account.clone(),
            });
        }
        let Some((user, password)) = data_encoding::BASE64
            .decode(b64.as_bytes())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| {
                s.split_once(':')
                    .map(|(u, p)| (u.to_string(), p.to_string()))
            })
        else {
            return Err(Refusal::Unauthenticated);
        };
        match self.password(&user, &password, peer).await {
            Ok(account) => {
                let mut cache = lock(&self.basic_ok);
                cache.retain(|_, (_, t)| *t > now);
                cache.insert(id, (account.clone(), now + Duration::from_secs(300)));
                Ok(Access::Basic { account })
            }
            Err(LoginRefused::Wrong) => Err(Refusal::Unauthenticated),
            Err(LoginRefused::Limited(l)) => Err(Refusal::Limited(l)),
            Err(LoginRefused::Busy) => Err(Refusal::Busy),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not recoverable for a server.
    if let Err(e) = getrandom::fill(&mut bytes) {
        panic!("no OS randomness: {e}");
    }
    data_encoding::HEXLOWER.encode(&bytes)
}

/// A cookie's value.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a `Host` header names this machine: `localhost`, a loopback
/// IPv4 address or `[::1]`, each with an optional numeric port and nothing
/// else.
fn is_loopback_host(host: &str) -> bool {
    let (loopback, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) => (
                ip.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback()),
                port,
            ),
            None => return false,
        },
        None => {
            let (name, port) = match host.find(':') {
                Some(i) => host.split_at(i),
                None => (host, ""),
            };
            let loopback = name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback());
            (loopback, port)
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    loopback && port_ok
}

/// A state-changing request (any method but GET and HEAD) must come from
/// the console itself, whatever credential it carries: a browser names the
/// page that made it in `Origin` (or at least in `Sec-Fetch-Site`); a
/// script sends neither.
pub fn same_origin(method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
    if *method == Method::GET || *method == Method::HEAD {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        let origin_host = origin
            .split_once("://")
            .map_or(origin, |(_, rest)| rest)
            .trim_end_matches('/');
        if origin_host != host || host.is_empty() {
            return Err(Refusal::Forbidden(format!(
                "a request from {origin} to {host} is refused (cross-origin)"
            )));
        }
        return Ok(());
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("cross-site") | Some("same-site") => Err(Refusal::Forbidden(
            "a request from another site is refused".into(),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn auth(
        accounts: &[(&str, &str)],
        secure: bool,
    ) -> (Auth, Arc<Mutex<Vec<String>>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            accounts: accounts
                .iter()
                .map(|(n, p)| {
                    (
                        n.to_string(),
                        super::super::accounts::hash_password(p).unwrap(),
                    )
                })
                .collect(),
            session: Duration::from_secs(3600),
            secure_cookie: secure,
            login_failures_per_address: super::super::limits::ADDRESS_FAILURES,
            login_failures_per_minute: super::super::limits::GLOBAL_FAILURES,
        };
        let said = Arc::new(Mutex::new(Vec::new()));
        let to = said.clone();
        let audit: Auditor = Arc::new(move |t| to.lock().unwrap().push(t));
        (
            Auth::new(&config, &dir.path().join("t"), audit).unwrap(),
            said,
            dir,
        )
    }

    #[tokio::test]
    async fn open_console_only_for_loopback_hosts() {
        let (a, _, _d) = auth(&[], false);
        for host in [
            "127.0.0.1:7780",
            "localhost:7780",
            "LOCALHOST",
            "[::1]:7780",
            "[::1]",
            "127.0.0.2",
        ] {
            assert_eq!(
                a.check(&headers(&[("host", host)]), PEER).await,
                Ok(Access::Open),
                "{host}"
            );
        }
        for host in [
            "evil.example:7780",
            "[::1]evil.example",
            "[::1]:80evil",
            "localhost:27881@evil",
            "localhost.evil.example",
            "127.0.0.1:",
            "127.0.0.1:123456",
            "localhost:80:80",
            "[::2]:80",
            "",
        ] {
            assert!(
                matches!(
                    a.check(&headers(&[("host", host)]), PEER).await,
                    Err(Refusal::Forbidden(_))
                ),
                "{host:?} let in"
            );
        }
    }

    #[test]
    fn every_state_changing_request_must_be_same_origin_whatever_its_credential() {
        let post = Method::POST;
        let host = ("host", "127.0.0.1:7780");
        let evil = ("origin", "http://evil.example");
        for credential in [
            ("authorization", "Basic YWRtaW46eA=="),
            ("authorization", "Bearer abc"),
            ("cookie", "shuyuan_session=abc"),
        ] {
            assert!(matches!(
                same_origin(&post, &headers(&[host, evil, credential])),
                Err(Refusal::Forbidden(_))
            ));
            assert!(matches!(
                same_origin(
                    &post,
                    &headers(&[host, ("sec-fetch-site", "cross-site"), credential])
                ),
                Err(Refusal::Forbidden(_))
            ));
            assert_eq!(same_origin(&post, &headers(&[host, credential])), Ok(()));
        }
        assert!(matches!(
            same_origin(&post, &headers(&[host, ("origin", "null")])),
            Err(Refusal::Forbidden(_))
        ));
        assert_eq!(
            same_origin(
                &post,
                &headers(&[host, ("origin", "http://127.0.0.1:7780")])
            ),
            Ok(())
        );
        assert_eq!(same_origin(&Method::GET, &headers(&[host, evil])), Ok(()));
    }

    #[tokio::test]
    async fn named_accounts_sessions_and_tokens() {
        let (a, _, dir) = auth(
            &[("zhang.wei", "correct horse"), ("li.na", "battery staple")],
            false,
        );
        let host = ("host", "127.0.0.1:7780");
        assert_eq!(
            a.check(&headers(&[host]), PEER).await,
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            a.login("zhang.wei", "battery staple", PEER).await,
            Err(LoginRefused::Wrong)
        );
        assert_eq!(
            a.login("nobody", "correct horse", PEER).await,
            Err(LoginRefused::Wrong)
        );
        assert_eq!(a.logins_failed.load(Ordering::Relaxed), 2);
        let token = a.login("zhang.wei", "correct horse", PEER).await.unwrap();
        let cookie = format!("lang=en; {COOKIE}={token}");
        let access = a
            .check(&headers(&[host, ("cookie", &cookie)]), PEER)
            .await
            .unwrap();
        assert_eq!(access.account(), Some("zhang.wei"));
        assert!(access.browser());
        let bearer = format!("Bearer {token}");
        let by_bearer = a
            .check(&headers(&[host, ("authorization", &bearer)]), PEER)
            .await
            .unwrap();
        assert_eq!(by_bearer.account(), Some("zhang.wei"));
        assert!(!by_bearer.browser());
        let local = std::fs::read_to_string(dir.path().join("t")).unwrap();
        let bearer = format!("Bearer {local}");
        assert_eq!(
            a.check(&headers(&[host, ("authorization", &bearer)]), PEER)
                .await,
            Ok(Access::Local)
        );
        assert_eq!(
            a.check(&headers(&[host, ("authorization", "Bearer nope")]), PEER)
                .await,
            Err(Refusal::Unauthenticated)
        );
        let basic = format!(
            "Basic {}",
            data_encoding::BASE64.encode(b"li.na:battery staple")
        );
        assert_eq!(
            a.check(&headers(&[host, ("authorization", &basic)]), PEER)
                .await,
            Ok(Access::Basic {
                account: "li.na".into()
            })
        );
        // Another's password under one's own name does not pass.
        let basic = format!(
            "Basic {}",
            data_encoding::BASE64.encode(b"li.na:correct horse")
        );
        assert_eq!(
            a.check(&headers(&[host, ("authorization", &basic)]), PEER)
                .await,
            Err(Refusal::Unauthenticated)
        );
        let ends = a.session_ends();
        a.logout(&access);
        assert!(ends.has_changed().unwrap());
        assert_eq!(
            a.check(&headers(&[host, ("cookie", &cookie)]), PEER).await,
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            a.check(
                &headers(&[host, ("authorization", &format!("Bearer {token}"))]),
                PEER
            )
            .await,
            Err(Refusal::Unauthenticated)
        );
    }

    #[tokio::test]
    async fn failed_logins_are_limited_per_address_and_audited() {
        let (a, said, _d) = auth(&[("zhang.wei", "correct horse")], false);
        let guesser: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..super::super::limits::ADDRESS_FAILURES {
            assert_eq!(
                a.login("zhang.wei", "guess", guesser).await,
                Err(LoginRefused::Wrong)
            );
        }
        // Even the right password is not checked from that address now.
        assert!(matches!(
            a.login("zhang.wei", "correct horse", guesser).await,
            Err(LoginRefused::Limited(_))
        ));
        let basic = format!(
            "Basic {}",
            data_encoding::BASE64.encode(b"zhang.wei:correct horse")
        );
        assert!(matches!(
            a.check(&headers(&[("authorization", &basic)]), guesser)
                .await,
            Err(Refusal::Limited(_))
        ));
        // Another address still logs in.
        assert!(a.login("zhang.wei", "correct horse", PEER).await.is_ok());
        let said = said.lock().unwrap();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("192.0.2.1"), "{said:?}");
    }

    #[tokio::test]
    async fn a_secure_console_names_its_cookie_host_only() {
        let (a, _, _d) = auth(&[("zhang.wei", "correct horse")], true);
        let token = a.login("zhang.wei", "correct horse", PEER).await.unwrap();
        let set = a.session_cookie(&token);
        assert!(set.starts_with("__Host-shuyuan_session="), "{set}");
        assert!(set.contains("; Secure") && set.contains("Path=/") && !set.contains("Domain"));
        // The plain name is not read on a secure console.
        let plain = format!("{COOKIE}={token}");
        assert_eq!(
            a.check(&headers(&[("cookie", &plain)]), PEER).await,
            Err(Refusal::Unauthenticated)
        );
        let secure = format!("{SECURE_COOKIE}={token}");
        assert!(
            a.check(&headers(&[("cookie", &secure)]), PEER)
                .await
                .is_ok()
        );
    }
}
