//! The admin surface under attack (issue 16), against the real hub binary:
//! cross-site requests with any credential, a burst of password guesses,
//! failed-login limits, redirects after login, live streams after logout,
//! the security headers, strict `Host` names, the session cookie behind
//! TLS, what strangers see, and named administrators as reviewers. Each
//! test failed on the hub before the fixes.

use std::io::Read;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use serde_json::Value as Json;
use shuyuan_tests::{AgentSpec, Nodes, ResourceSpec, Sandbox, Topology, data, wait_for};

const ADMIN: &str = "zhang.wei";
const PASSWORD: &str = "correct horse battery staple";
const OTHER: &str = "li.na";
const OTHER_PASSWORD: &str = "another long passphrase";

/// A client that does not follow redirects, sending from `from` (any
/// 127.0.0.0/8 address is this machine; each is its own address to the
/// hub's login limits).
fn client_from(from: [u8; 4]) -> Result<Client> {
    Ok(Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .local_address(IpAddr::from(from))
        .build()?)
}

fn hub_with_admins() -> Result<Sandbox> {
    let Nodes(sb, [], []) = Topology::new()
        .admin_account(ADMIN, PASSWORD)
        .admin_account(OTHER, OTHER_PASSWORD)
        .start()?;
    Ok(sb)
}

fn metric(sb: &Sandbox, http: &Client, name: &str) -> Result<f64> {
    let text = http
        .get(format!("{}/metrics", sb.hub.admin_url()?))
        .bearer_auth(sb.hub.admin_token()?)
        .send()?
        .text()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .ok_or_else(|| anyhow!("no {name} in /metrics:\n{text}"))
}

/// Logs in through the form; the session cookie (`name=value`).
fn login_cookie(http: &Client, base: &str, user: &str, password: &str) -> Result<String> {
    let r = http
        .post(format!("{base}/login"))
        .form(&[("user", user), ("password", password), ("next", "/")])
        .send()?;
    ensure!(r.status() == StatusCode::SEE_OTHER, "login: {}", r.status());
    Ok(r.headers()["set-cookie"]
        .to_str()?
        .split(';')
        .next()
        .unwrap_or("")
        .to_string())
}

fn api_login(http: &Client, base: &str, user: &str, password: &str) -> Result<Response> {
    Ok(http
        .post(format!("{base}/api/v1/login"))
        .json(&serde_json::json!({"user": user, "password": password}))
        .send()?)
}

/// Finding 1: a page on another site cannot make a browser act on the
/// console with cached basic credentials (or any other), and the console
/// does not ask browsers for basic credentials.
#[test]
fn cross_site_requests_are_refused_whatever_the_credential() -> Result<()> {
    let sb = hub_with_admins()?;
    let base = sb.hub.admin_url()?;
    let http = client_from([127, 0, 0, 1])?;
    let evil = "http://evil.example";
    let basic = |r: reqwest::blocking::RequestBuilder| r.basic_auth(ADMIN, Some(PASSWORD));
    let r = basic(http.post(format!("{base}/catalog/review")))
        .header("origin", evil)
        .form(&[
            ("code", "A01/0001"),
            ("approve", "1"),
            ("reviewer", "attacker"),
            ("remarks", "by evil.example"),
        ])
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = basic(http.post(format!("{base}/logout")))
        .header("origin", evil)
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = basic(http.post(format!("{base}/api/v1/catalog/review")))
        .header("sec-fetch-site", "cross-site")
        .json(&serde_json::json!({"code": "A01/0001", "approve": true, "remarks": ""}))
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(sb.hub.admin_token()?)
        .header("origin", evil)
        .json(&serde_json::json!({"code": "A01/0001", "approve": true, "reviewer": "x", "remarks": ""}))
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Nor can another site log a browser in (login CSRF).
    let r = http
        .post(format!("{base}/login"))
        .header("origin", evil)
        .form(&[("user", ADMIN), ("password", PASSWORD), ("next", "/")])
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("set-cookie").is_none());
    // The same requests from the console's own origin go through.
    let origin = base.clone();
    let r = basic(http.post(format!("{base}/logout")))
        .header("origin", &origin)
        .send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    // 401s invite a bearer token, never basic credentials.
    for path in ["/metrics", "/events", "/api/v1/status"] {
        let r = http.get(format!("{base}{path}")).send()?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let challenge = r.headers()["www-authenticate"].to_str()?.to_string();
        assert!(challenge.starts_with("Bearer "), "{path}: {challenge}");
    }
    Ok(())
}

/// The hub process's resident memory, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// Finding 2: 64 concurrent wrong guesses (argon2, 19 MiB each) run at
/// most two at a time, the rest refused at once, and the memory is given
/// back.
#[test]
fn a_burst_of_password_guesses_is_bounded_and_memory_returns() -> Result<()> {
    let sb = hub_with_admins()?;
    let base = sb.hub.admin_url()?;
    let pid = sb.hub.pid().context("the hub's pid")?;
    let before = rss_kib(pid)?;
    let mut peak = before;
    let statuses = std::thread::scope(|scope| -> Result<Vec<StatusCode>> {
        let guesses: Vec<_> = (0..64u8)
            .map(|i| {
                let base = base.clone();
                scope.spawn(move || -> Result<StatusCode> {
                    // Each from its own address, so no address limit
                    // refuses them before the password check.
                    let http = client_from([127, 0, 1, i + 1])?;
                    Ok(http
                        .get(format!("{base}/api/v1/status"))
                        .basic_auth(ADMIN, Some(format!("guess {i}")))
                        .send()?
                        .status())
                })
            })
            .collect();
        while !guesses.iter().all(|g| g.is_finished()) {
            peak = peak.max(rss_kib(pid)?);
            std::thread::sleep(Duration::from_millis(5));
        }
        guesses
            .into_iter()
            .map(|g| g.join().map_err(|_| anyhow!("a guess panicked"))?)
            .collect()
    })?;
    let busy = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED || *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert!(busy > 0, "no guess was refused as busy: {statuses:?}");
    let after = rss_kib(pid)?;
    // Unbounded, the 64 checks held 64 × 19 MiB (1.2 GiB); two at a time
    // hold under 40 MiB, and give it back.
    assert!(
        peak < before + 64 * 1024,
        "resident memory rose from {before} KiB to {peak} KiB during the guesses"
    );
    assert!(
        after < before + 16 * 1024,
        "resident memory stayed at {after} KiB after the guesses (was {before} KiB)"
    );
    let http = client_from([127, 0, 0, 1])?;
    assert_eq!(
        metric(&sb, &http, "shuyuan_admin_logins_total{result=\"busy\"}")?,
        busy as f64
    );
    Ok(())
}

/// Finding 4: failed logins are limited per address and globally; the
/// limits are in the metrics and their start in the audit log.
#[test]
fn failed_logins_are_limited_per_address_and_globally() -> Result<()> {
    let sb = hub_with_admins()?;
    let base = sb.hub.admin_url()?;
    let guesser = client_from([127, 0, 0, 2])?;
    for _ in 0..5 {
        let r = api_login(&guesser, &base, ADMIN, "guess")?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    // The sixth try is not checked, even with the right password.
    let r = api_login(&guesser, &base, ADMIN, PASSWORD)?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"].to_str()?.parse()?;
    assert!((800..=900).contains(&retry), "retry after {retry} s");
    let r = guesser
        .get(format!("{base}/api/v1/status"))
        .basic_auth(ADMIN, Some(PASSWORD))
        .send()?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // The administrator elsewhere still logs in.
    let admin = client_from([127, 0, 0, 3])?;
    let r = api_login(&admin, &base, ADMIN, PASSWORD)?;
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<Json>()?["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token"))?
        .to_string();
    // 30 failures from many addresses within a minute close every check.
    for i in 0..25u8 {
        let r = api_login(&client_from([127, 0, 2, i + 1])?, &base, ADMIN, "guess")?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = api_login(&admin, &base, ADMIN, PASSWORD)?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.text()?.contains("global limit"));
    // A session opened before still works.
    let r = admin
        .get(format!("{base}/api/v1/status"))
        .bearer_auth(&token)
        .send()?;
    assert_eq!(r.status(), StatusCode::OK);
    let local = client_from([127, 0, 0, 1])?;
    assert_eq!(
        metric(
            &sb,
            &local,
            "shuyuan_admin_logins_total{result=\"limited_address\"}"
        )?,
        2.0
    );
    assert_eq!(
        metric(
            &sb,
            &local,
            "shuyuan_admin_logins_total{result=\"limited_global\"}"
        )?,
        1.0
    );
    assert_eq!(
        metric(
            &sb,
            &local,
            "shuyuan_admin_login_limit{scope=\"address\",window_seconds=\"900\"}"
        )?,
        5.0
    );
    assert_eq!(
        metric(
            &sb,
            &local,
            "shuyuan_admin_login_limit{scope=\"global\",window_seconds=\"60\"}"
        )?,
        30.0
    );
    let limited = wait_for("the limits audited", Duration::from_secs(10), || {
        let entries: Vec<String> = sb
            .hub
            .audit()?
            .into_iter()
            .filter(|e| e["kind"] == "login_limited")
            .filter_map(|e| e["detail"].as_str().map(str::to_string))
            .collect();
        Ok((entries.len() >= 2).then_some(entries))
    })?;
    assert_eq!(limited.len(), 2, "{limited:?}");
    assert!(
        limited.iter().any(|e| e.contains("127.0.0.2")),
        "{limited:?}"
    );
    assert!(
        limited.iter().any(|e| e.contains("global limit")),
        "{limited:?}"
    );
    Ok(())
}

/// Finding 5: after a login only plain local paths are followed.
#[test]
fn a_login_redirects_only_to_plain_local_paths() -> Result<()> {
    let sb = hub_with_admins()?;
    let base = sb.hub.admin_url()?;
    let http = client_from([127, 0, 0, 1])?;
    for next in [
        "/\t/evil.example",
        "/\n/evil.example",
        "//evil.example",
        "/\\evil.example",
    ] {
        let r = http
            .post(format!("{base}/login"))
            .form(&[("user", ADMIN), ("password", PASSWORD), ("next", next)])
            .send()?;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(r.headers()["location"], "/", "{next:?}");
    }
    let r = http
        .post(format!("{base}/login"))
        .form(&[
            ("user", ADMIN),
            ("password", PASSWORD),
            ("next", "/audit?kind=enrolled"),
        ])
        .send()?;
    assert_eq!(r.headers()["location"], "/audit?kind=enrolled");
    // An open console redirects at once, without a click.
    let Nodes(open, [], []) = Topology::new().start()?;
    let r = http
        .get(format!(
            "{}/login?next=/%09/evil.example",
            open.hub.admin_url()?
        ))
        .send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/");
    Ok(())
}

/// Finding 6: a live-update stream ends when its session does.
#[test]
fn live_updates_end_with_their_session() -> Result<()> {
    let sb = hub_with_admins()?;
    let base = sb.hub.admin_url()?;
    let http = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()?;
    let cookie = login_cookie(&http, &base, ADMIN, PASSWORD)?;
    let mut events = http
        .get(format!("{base}/events"))
        .header("cookie", &cookie)
        .send()?;
    assert_eq!(events.status(), StatusCode::OK);
    let r = http
        .post(format!("{base}/logout"))
        .header("cookie", &cookie)
        .send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        // A stream that goes on times out here (keep-alives come every
        // 15 s, the client gives up after 20 s of nothing).
        let n = events
            .read(&mut buf)
            .context("the stream did not end after logout")?;
        if n == 0 {
            break;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // A bearer session's stream ends too.
    let token = api_login(&http, &base, ADMIN, PASSWORD)?.json::<Json>()?["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token"))?
        .to_string();
    let mut events = http
        .get(format!("{base}/events"))
        .bearer_auth(&token)
        .send()?;
    assert_eq!(events.status(), StatusCode::OK);
    let r = http
        .post(format!("{base}/logout"))
        .bearer_auth(&token)
        .send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let mut rest = Vec::new();
    events
        .read_to_end(&mut rest)
        .context("the bearer session's stream did not end after logout")?;
    Ok(())
}

/// Finding 7: every answer forbids framing and sniffing, and pages run
/// only the console's own script and stylesheet.
#[test]
fn every_answer_carries_the_security_headers() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let base = sb.hub.admin_url()?;
    let http = client_from([127, 0, 0, 1])?;
    for path in [
        "/",
        "/audit",
        "/login",
        "/api/v1/status",
        "/metrics",
        "/nope",
        "/console.js",
    ] {
        let r = http.get(format!("{base}{path}")).send()?;
        let h = r.headers();
        let csp = h
            .get("content-security-policy")
            .with_context(|| format!("{path}: no CSP"))?
            .to_str()?;
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
    }
    let page = http.get(format!("{base}/")).send()?.text()?;
    assert!(
        page.contains("<script src=\"/console.js\"></script>"),
        "{page}"
    );
    assert!(
        !page.contains("<style>") && !page.contains(" style=\""),
        "{page}"
    );
    let css = http.get(format!("{base}/console.css")).send()?;
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    Ok(())
}

/// Finding 8 (Host): an open console accepts only well-formed loopback
/// `Host` names.
#[test]
fn an_open_console_parses_host_strictly() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let base = sb.hub.admin_url()?;
    let http = client_from([127, 0, 0, 1])?;
    for host in [
        "[::1]evil.example",
        "localhost:27881@evil",
        "localhost.evil.example",
        "[::1]:80x",
    ] {
        let r = http
            .get(format!("{base}/api/v1/status"))
            .header("host", host)
            .send()?;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{host}");
    }
    let r = http
        .get(format!("{base}/api/v1/status"))
        .header("host", "localhost:7780")
        .send()?;
    assert_eq!(r.status(), StatusCode::OK);
    Ok(())
}

/// Finding 8 (what strangers see, the cookie behind TLS): pages before a
/// login do not name the hub; with `secure_cookie` the session cookie is
/// `__Host-` prefixed and `Secure`.
#[test]
fn strangers_learn_nothing_and_a_tls_console_sets_a_host_only_secure_cookie() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().admin_account(ADMIN, PASSWORD).start()?;
    let base = sb.hub.admin_url()?;
    let http = client_from([127, 0, 0, 1])?;
    for path in ["/nope", "/login", "/departments/GA"] {
        let body = http.get(format!("{base}{path}")).send()?.text()?;
        assert!(!body.contains("test hub"), "{path} names the hub: {body}");
    }
    let cookie = login_cookie(&http, &base, ADMIN, PASSWORD)?;
    assert!(cookie.starts_with("shuyuan_session="), "{cookie}");
    let body = http
        .get(format!("{base}/nope"))
        .header("cookie", &cookie)
        .send()?
        .text()?;
    assert!(
        !body.contains("test hub"),
        "the 404 page names the hub: {body}"
    );

    let mut sb = sb;
    sb.hub.stop()?;
    let config = std::fs::read_to_string(&sb.hub.config)?;
    std::fs::write(
        &sb.hub.config,
        config.replace("[admin]\n", "[admin]\nsecure_cookie = true\n"),
    )?;
    sb.hub.start()?;
    let base = sb.hub.admin_url()?;
    let r = http
        .post(format!("{base}/login"))
        .form(&[("user", ADMIN), ("password", PASSWORD), ("next", "/")])
        .send()?;
    let set = r.headers()["set-cookie"].to_str()?.to_string();
    assert!(set.starts_with("__Host-shuyuan_session="), "{set}");
    assert!(set.contains("; Secure") && set.contains("Path=/"), "{set}");
    assert!(!set.contains("Domain"), "{set}");
    Ok(())
}

/// Finding 8 (reviewers): each administrator logs in by name, and a
/// review is recorded under the name logged in, never one the request
/// states.
#[test]
fn named_administrators_review_under_their_own_names() -> Result<()> {
    let Nodes(sb, [], [agent]) = Topology::new()
        .admin_account(ADMIN, PASSWORD)
        .admin_account(OTHER, OTHER_PASSWORD)
        .agent(
            AgentSpec::sqlite("ga", "GA", &[data::HOUSEHOLD_DDL]).resources(vec![
                ResourceSpec::new("101001/00001", "household", &["id_number"], "daily"),
            ]),
        )
        .start()?;
    let code = agent.resources[0].code.clone();
    agent.submit_entry(&code)?;
    let base = sb.hub.admin_url()?;
    let http = client_from([127, 0, 0, 1])?;
    // One's password under another's name does not log in.
    assert_eq!(
        api_login(&http, &base, ADMIN, OTHER_PASSWORD)?.status(),
        StatusCode::UNAUTHORIZED
    );
    let token = api_login(&http, &base, OTHER, OTHER_PASSWORD)?.json::<Json>()?["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token"))?
        .to_string();
    wait_for("the submitted entry", Duration::from_secs(30), || {
        let list: Json = http
            .get(format!("{base}/api/v1/catalog?state=submitted"))
            .bearer_auth(&token)
            .send()?
            .json()?;
        Ok((list.as_array().map(Vec::len) == Some(1)).then_some(()))
    })?;
    // The form of a logged-in administrator asks for no reviewer; the
    // page names who is logged in.
    let cookie = login_cookie(&http, &base, ADMIN, PASSWORD)?;
    let page = http
        .get(format!("{base}/catalog"))
        .header("cookie", &cookie)
        .send()?
        .text()?;
    assert!(
        page.contains("form method=\"post\" action=\"/catalog/review\""),
        "{page}"
    );
    assert!(!page.contains("name=\"reviewer\""), "{page}");
    assert!(
        page.contains(&format!("<span id=\"account\">{ADMIN}</span>")),
        "{page}"
    );
    // Claiming to be someone else is refused.
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"code": code, "approve": true, "reviewer": ADMIN, "remarks": ""}))
        .send()?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"code": code, "approve": true, "remarks": ""}))
        .send()?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Json>()?["reviewer"], OTHER);
    let reviewed = wait_for("the review audited", Duration::from_secs(10), || {
        Ok(sb
            .hub
            .audit()?
            .into_iter()
            .find(|e| e["kind"] == "catalog_reviewed"))
    })?;
    let detail = reviewed["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(&format!("by {OTHER} (logged in)")),
        "{detail}"
    );
    Ok(())
}
