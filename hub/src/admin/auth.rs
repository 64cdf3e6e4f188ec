//! Who may use the admin server.
//!
//! Invariant: a request is served only when the console is open (loopback,
//! no password configured, a loopback `Host`) or it carries a live session
//! cookie, the local API token, a session token as bearer, or basic
//! credentials whose password matches the configured argon2 hash. A POST
//! made by a browser must come from the console's own origin.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::http::{HeaderMap, Method, header};

use crate::config::AdminConfig;

/// The session cookie's name.
pub const COOKIE: &str = "shuyuan_session";

/// How a request was let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Loopback console without a password.
    Open,
    /// A browser session (cookie).
    Session,
    /// A bearer token or basic credentials (scripts, Prometheus, the CLI).
    Credentials,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No or wrong credentials: log in.
    Unauthenticated,
    /// A foreign `Host` on an open console, or a cross-origin POST.
    Forbidden(String),
}

/// Sessions, the local token and the password check.
#[derive(Debug)]
pub struct Auth {
    password_hash: Option<String>,
    session_ttl: Duration,
    local_token: String,
    sessions: Mutex<BTreeMap<String, Instant>>,
    /// Basic credentials recently checked, so a scraper does not pay for
    /// argon2 on every request.
    basic_ok: Mutex<BTreeMap<String, Instant>>,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
}

impl Auth {
    /// Writes a fresh local API token (mode 0600) for commands on this
    /// machine.
    pub fn new(config: &AdminConfig, token_file: &Path) -> std::io::Result<Auth> {
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
            password_hash: config.password_hash.clone(),
            session_ttl: config.session,
            local_token,
            sessions: Mutex::new(BTreeMap::new()),
            basic_ok: Mutex::new(BTreeMap::new()),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
        })
    }

    /// Whether a login is needed at all.
    pub fn required(&self) -> bool {
        self.password_hash.is_some()
    }

    /// Decides on a request.
    pub async fn check(&self, method: &Method, headers: &HeaderMap) -> Result<Access, Refusal> {
        let access = self.access(headers).await?;
        if access != Access::Credentials && *method != Method::GET && *method != Method::HEAD {
            same_origin(headers)?;
        }
        Ok(access)
    }

    async fn access(&self, headers: &HeaderMap) -> Result<Access, Refusal> {
        if let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            if let Some(token) = value.strip_prefix("Bearer ") {
                let token = token.trim();
                if constant_eq(token, &self.local_token) || self.session_live(token) {
                    return Ok(Access::Credentials);
                }
                return Err(Refusal::Unauthenticated);
            }
            if let Some(b64) = value.strip_prefix("Basic ") {
                return if self.basic(b64.trim()).await {
                    Ok(Access::Credentials)
                } else {
                    Err(Refusal::Unauthenticated)
                };
            }
            return Err(Refusal::Unauthenticated);
        }
        if cookie(headers, COOKIE).is_some_and(|t| self.session_live(t)) {
            return Ok(Access::Session);
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

    /// Checks a password; on success opens a session and returns its token.
    pub async fn login(&self, password: &str) -> Option<String> {
        let ok = match &self.password_hash {
            Some(hash) => verify_password(hash.clone(), password.to_string()).await,
            // Open console: the local token is the password.
            None => constant_eq(password, &self.local_token),
        };
        if !ok {
            self.logins_failed.fetch_add(1, Ordering::Relaxed);
            // Slow down guessing.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return None;
        }
        self.logins_ok.fetch_add(1, Ordering::Relaxed);
        let token = random_token();
        let mut sessions = lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, until| *until > now);
        sessions.insert(token.clone(), now + self.session_ttl);
        Some(token)
    }

    /// Ends a session.
    pub fn logout(&self, headers: &HeaderMap) {
        if let Some(t) = cookie(headers, COOKIE) {
            lock(&self.sessions).remove(t);
        }
    }

    /// The `Set-Cookie` value for a new session.
    pub fn session_cookie(&self, token: &str) -> String {
        format!(
            "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            self.session_ttl.as_secs()
        )
    }

    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    fn session_live(&self, token: &str) -> bool {
        lock(&self.sessions)
            .get(token)
            .is_some_and(|until| *until > Instant::now())
    }

    async fn basic(&self, b64: &str) -> bool {
        let Some(hash) = &self.password_hash else {
            return false;
        };
        let now = Instant::now();
        if lock(&self.basic_ok).get(b64).is_some_and(|t| *t > now) {
            return true;
        }
        let Some(password) = data_encoding::BASE64
            .decode(b64.as_bytes())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()))
        else {
            return false;
        };
        if verify_password(hash.clone(), password).await {
            let mut cache = lock(&self.basic_ok);
            cache.retain(|_, t| *t > now);
            cache.insert(b64.to_string(), now + Duration::from_secs(300));
            true
        } else {
            self.logins_failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn verify_password(hash: String, password: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false)
}

/// An argon2id PHC string for `password` (what `admin.password_hash` holds).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not recoverable for a server.
    if let Err(e) = getrandom::fill(&mut bytes) {
        panic!("no OS randomness: {e}");
    }
    data_encoding::HEXLOWER.encode(&bytes)
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
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

/// Whether a `Host` header names this machine.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A browser's state-changing request must come from the console itself.
fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let origin_host = origin
            .split_once("://")
            .map_or(origin, |(_, rest)| rest)
            .trim_end_matches('/');
        if origin_host != host {
            return Err(Refusal::Forbidden(format!(
                "a form posted from {origin} to {host} is refused (cross-origin)"
            )));
        }
        return Ok(());
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("cross-site") | Some("same-site") => Err(Refusal::Forbidden(
            "a form posted from another site is refused".into(),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn auth(password: Option<&str>) -> (Auth, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            password_hash: password.map(|p| hash_password(p).unwrap()),
            session: Duration::from_secs(3600),
        };
        (Auth::new(&config, &dir.path().join("t")).unwrap(), dir)
    }

    #[tokio::test]
    async fn open_console_only_for_loopback_hosts_and_same_origin_posts() {
        let (a, _d) = auth(None);
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(
            a.check(&get, &headers(&[("host", "127.0.0.1:7780")])).await,
            Ok(Access::Open)
        );
        assert_eq!(
            a.check(&get, &headers(&[("host", "localhost:7780")])).await,
            Ok(Access::Open)
        );
        assert_eq!(
            a.check(&get, &headers(&[("host", "[::1]:7780")])).await,
            Ok(Access::Open)
        );
        assert!(matches!(
            a.check(&get, &headers(&[("host", "evil.example:7780")]))
                .await,
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            a.check(
                &post,
                &headers(&[
                    ("host", "127.0.0.1:7780"),
                    ("origin", "http://evil.example")
                ])
            )
            .await,
            Err(Refusal::Forbidden(_))
        ));
        assert_eq!(
            a.check(
                &post,
                &headers(&[
                    ("host", "127.0.0.1:7780"),
                    ("origin", "http://127.0.0.1:7780")
                ])
            )
            .await,
            Ok(Access::Open)
        );
    }

    #[tokio::test]
    async fn password_sessions_and_tokens() {
        let (a, dir) = auth(Some("correct horse"));
        let get = Method::GET;
        let host = ("host", "127.0.0.1:7780");
        assert_eq!(
            a.check(&get, &headers(&[host])).await,
            Err(Refusal::Unauthenticated)
        );
        assert!(a.login("wrong").await.is_none());
        assert_eq!(a.logins_failed.load(Ordering::Relaxed), 1);
        let token = a.login("correct horse").await.unwrap();
        let cookie = format!("lang=en; {COOKIE}={token}");
        assert_eq!(
            a.check(&get, &headers(&[host, ("cookie", &cookie)])).await,
            Ok(Access::Session)
        );
        let bearer = format!("Bearer {token}");
        assert_eq!(
            a.check(&get, &headers(&[host, ("authorization", &bearer)]))
                .await,
            Ok(Access::Credentials)
        );
        let local = std::fs::read_to_string(dir.path().join("t")).unwrap();
        let bearer = format!("Bearer {local}");
        assert_eq!(
            a.check(&get, &headers(&[host, ("authorization", &bearer)]))
                .await,
            Ok(Access::Credentials)
        );
        assert_eq!(
            a.check(&get, &headers(&[host, ("authorization", "Bearer nope")]))
                .await,
            Err(Refusal::Unauthenticated)
        );
        let basic = format!(
            "Basic {}",
            data_encoding::BASE64.encode(b"admin:correct horse")
        );
        assert_eq!(
            a.check(&get, &headers(&[host, ("authorization", &basic)]))
                .await,
            Ok(Access::Credentials)
        );
        let basic = format!("Basic {}", data_encoding::BASE64.encode(b"admin:nope"));
        assert_eq!(
            a.check(&get, &headers(&[host, ("authorization", &basic)]))
                .await,
            Err(Refusal::Unauthenticated)
        );
        a.logout(&headers(&[("cookie", &cookie)]));
        assert_eq!(
            a.check(&get, &headers(&[host, ("cookie", &cookie)])).await,
            Err(Refusal::Unauthenticated)
        );
    }
}
