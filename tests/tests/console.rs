//! The hub's admin server against the real binaries: every API endpoint,
//! authorisation refusals, metrics, webhook alerts, and the console in a
//! real headless Chromium driven over WebDriver.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::Value as Json;
use shuyuan_tests::{
    AgentProcess, AgentSpec, HubSpec, Nodes, ResourceSpec, Sandbox, Topology, data, wait_for,
};

const PASSWORD: &str = "correct horse battery staple";
/// The administrator, named as the reviewer of what they review.
const ADMIN: &str = "王审核";
const HOUSEHOLD: &str = "101001/00001";
const LICENCE: &str = "102001/00001";

fn household() -> Vec<ResourceSpec> {
    vec![ResourceSpec::new(
        HOUSEHOLD,
        "household",
        &["id_number"],
        "daily",
    )]
}

fn licences() -> Vec<ResourceSpec> {
    vec![ResourceSpec::new(
        LICENCE,
        "business_licence",
        &["credit_code"],
        "daily",
    )]
}

fn client() -> Result<Client> {
    Ok(Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A department with a household table of `rows` rows, its agent running
/// and synced, and its catalog declaring `cycle`.
fn department(
    sb: &Sandbox,
    name: &str,
    code: &str,
    spec: Vec<ResourceSpec>,
    ddl: &str,
    rows: usize,
    cycle: &str,
) -> Result<AgentProcess> {
    let mut agent = sb.add_agent(AgentSpec::sqlite(name, code, &[ddl]).resources(spec))?;
    let conn = agent.database()?;
    let mut rng = data::Rng::new(7);
    for _ in 0..rows {
        if ddl == data::HOUSEHOLD_DDL {
            data::insert_household(&conn, &mut rng)?;
        } else {
            data::insert_licence(&conn, &mut rng)?;
        }
    }
    agent.start()?;
    let resource = agent.resources[0].code.clone();
    agent.catalog(&["set", &resource, "update_cycle", cycle])?;
    let feed = format!("{code}:{resource}");
    wait_for("the rows at the hub", Duration::from_secs(30), || {
        Ok(sb
            .hub
            .feed_status(&feed)?
            .filter(|f| f["rows"].as_u64() == Some(rows as u64) && f["update_cycle"] == cycle))
    })?;
    Ok(agent)
}

#[test]
fn the_api_answers_every_endpoint_and_refuses_without_a_login() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().admin_account(ADMIN, PASSWORD).start()?;
    let ga = department(
        &sb,
        "ga",
        "GA",
        household(),
        data::HOUSEHOLD_DDL,
        30,
        "daily",
    )?;
    let base = sb.hub.admin_url()?;
    let http = client()?;
    let get = |path: &str| http.get(format!("{base}{path}"));

    // Refusals: nothing, a wrong bearer, wrong basic credentials.
    for path in [
        "/api/v1/status",
        "/api/v1/overview",
        "/api/v1/departments/GA",
        "/api/v1/resources/GA/101001%2F00001",
        "/api/v1/audit",
        "/api/v1/catalog",
        "/metrics",
        "/events",
    ] {
        let r = get(path).send()?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        // Bearer: a browser is not invited to cache basic credentials.
        assert!(
            r.headers()["www-authenticate"]
                .to_str()?
                .starts_with("Bearer"),
            "{path}"
        );
        let body: Json = r.json()?;
        assert!(body["error"].as_str().is_some_and(|e| e.contains("log in")));
        let r = get(path).bearer_auth("not-a-token").send()?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // Wrong basic credentials (once: failed logins from one address are
    // limited, see admin.rs).
    let r = get("/metrics").basic_auth(ADMIN, Some("wrong")).send()?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .json(&serde_json::json!({"code": HOUSEHOLD, "approve": true, "reviewer": "x", "remarks": ""}))
        .send()?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Pages send the browser to the login form.
    let r = get("/departments/GA?lang=en").send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()["location"],
        "/login?next=/departments/GA%3Flang%3Den"
    );
    // Wrong and right passwords.
    let r = http
        .post(format!("{base}/api/v1/login"))
        .json(&serde_json::json!({"user": ADMIN, "password": "guess"}))
        .send()?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http
        .post(format!("{base}/api/v1/login"))
        .json(&serde_json::json!({"user": ADMIN, "password": PASSWORD}))
        .send()?;
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<Json>()?["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token"))?
        .to_string();
    let api = |path: &str| -> Result<Json> {
        let r = get(path).bearer_auth(&token).send()?;
        let status = r.status();
        let body = r.text()?;
        if status != StatusCode::OK {
            bail!("{path}: {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    };

    // The status is what the CLI prints (the CLI reads this endpoint).
    let status = api("/api/v1/status")?;
    let cli = sb.hub.status()?;
    assert_eq!(status["running"], true);
    assert_eq!(status["node"], sb.hub.key);
    assert_eq!(cli["node"], status["node"]);
    assert_eq!(cli["departments"][0]["code"], "GA");
    assert_eq!(
        cli["departments"][0]["resources"][0]["rows"],
        status["departments"][0]["resources"][0]["rows"]
    );

    let overview = api("/api/v1/overview")?;
    assert_eq!(overview["agents_online"], 1);
    assert_eq!(overview["agents_offline"], 0);
    assert_eq!(overview["states"].as_array().map(Vec::len), Some(7));
    let counted: u64 = overview["states"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p[1].as_u64())
        .sum();
    assert_eq!(counted, 1);

    let dept = api("/api/v1/departments/GA")?;
    assert_eq!(dept["agents_online"], 1);
    let res = &dept["resources"][0];
    assert_eq!(res["feed"], format!("GA:{HOUSEHOLD}"));
    assert!(
        ["on_time", "zero_updated"].contains(&res["state"].as_str().unwrap_or("")),
        "{res}"
    );
    assert_eq!(res["rows"], 30);
    let r = get("/api/v1/departments/NOPE").bearer_auth(&token).send()?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The resource: catalog entry, recent batches signed by the agent, a
    // sample of the source's rows. The code's `/` works encoded or not.
    let resource = api("/api/v1/resources/GA/101001%2F00001")?;
    let plain = api("/api/v1/resources/GA/101001/00001")?;
    assert_eq!(resource["row"]["feed"], plain["row"]["feed"]);
    assert_eq!(resource["catalog"]["entry"]["code"], HOUSEHOLD);
    let batches = resource["batches"].as_array().context("batches")?;
    assert!(!batches.is_empty());
    assert!(batches.iter().all(|b| b["signer"] == ga.key));
    let seqs: Vec<u64> = batches.iter().filter_map(|b| b["seq"].as_u64()).collect();
    assert_eq!(seqs[0], resource["row"]["last_seq"].as_u64().unwrap_or(0));
    assert!(seqs.windows(2).all(|w| w[0] == w[1] + 1), "{seqs:?}");
    let exported = sb.hub.export_jsonl(&format!("GA:{HOUSEHOLD}"))?;
    let sample = &resource["sample"];
    assert_eq!(sample["rows"].as_array().map(Vec::len), Some(20));
    let columns: Vec<&str> = sample["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(columns.contains(&"id_number"));
    let id_col = columns.iter().position(|c| *c == "id_number").unwrap_or(0);
    for (row, source) in sample["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(&exported)
    {
        assert_eq!(row[id_col], source["id_number"]);
    }
    let r = get("/api/v1/resources/GA/999999%2F00009")
        .bearer_auth(&token)
        .send()?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Audit, filtered.
    let audit = api("/api/v1/audit?kind=enrolled")?;
    let entries = audit["entries"].as_array().context("entries")?;
    assert_eq!(entries.len(), 1, "{audit}");
    assert!(
        entries[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("GA"))
    );
    assert!(audit["total"].as_u64() >= Some(1));
    let none = api("/api/v1/audit?kind=batch_rejected")?;
    assert_eq!(none["entries"].as_array().map(Vec::len), Some(0));

    // Catalog and review.
    ga.submit_entry(HOUSEHOLD)?;
    wait_for("the submitted entry", Duration::from_secs(15), || {
        let list = api("/api/v1/catalog?state=submitted")?;
        Ok((list.as_array().map(Vec::len) == Some(1)).then_some(()))
    })?;
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"code": HOUSEHOLD, "approve": false, "reviewer": "王审核", "remarks": ""}))
        .send()?;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "returning needs remarks"
    );
    // Consoles listening for live updates hear of the review.
    let mut events = get("/events").bearer_auth(&token).send()?;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"code": HOUSEHOLD, "approve": true, "reviewer": "王审核", "remarks": ""}))
        .send()?;
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = String::new();
    let mut buf = [0u8; 1024];
    while !stream.contains("event: update\n") {
        let n = events.read(&mut buf)?;
        assert!(n > 0, "the event stream ended: {stream}");
        stream.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(events);
    assert_eq!(r.json::<Json>()?["reviewer"], "王审核");
    // The audit entry is written by the store's writer after the answer.
    let reviewed = wait_for("the review audited", Duration::from_secs(10), || {
        let a = api("/api/v1/audit?kind=catalog_reviewed")?;
        Ok((a["entries"].as_array().map(Vec::len) == Some(1)).then_some(a))
    })?;
    assert!(
        reviewed["entries"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("approved") && d.contains("王审核")),
        "{reviewed}"
    );
    // Empty fields, as forms send them, match all; bad parameters get a
    // JSON error.
    let all = api("/api/v1/catalog?department=&class=&share_type=&cycle=&state=")?;
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    let r = get("/api/v1/audit?kind=enroled")
        .bearer_auth(&token)
        .send()?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.json::<Json>()?["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"enroled\" is not an audit kind: use one of")),
    );
    let r = get("/api/v1/audit?limit=many").bearer_auth(&token).send()?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.json::<Json>()?["error"]
            .as_str()
            .is_some_and(|e| e.contains("limit"))
    );
    let r = http
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(&token)
        .body("code=x")
        .send()?;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(r.json::<Json>()?["error"].is_string());
    let r = get("/api/v1/catalog?share_type=sometimes")
        .bearer_auth(&token)
        .send()?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Metrics, with basic credentials as Prometheus sends them.
    let r = get("/metrics").basic_auth(ADMIN, Some(PASSWORD)).send()?;
    assert_eq!(r.status(), StatusCode::OK);
    let metrics = r.text()?;
    let series = metric_values(&metrics);
    let labels = format!("{{department=\"GA\",resource=\"{HOUSEHOLD}\"}}");
    let last_seq = api("/api/v1/departments/GA")?["resources"][0]["last_seq"]
        .as_u64()
        .unwrap_or(0);
    assert!(series[&format!("shuyuan_feed_last_seq{labels}")] >= last_seq as f64);
    assert_eq!(series[&format!("shuyuan_feed_rows{labels}")], 30.0);
    assert_eq!(series["shuyuan_agents_connected"], 1.0);
    assert_eq!(series[&format!("shuyuan_feed_overdue{labels}")], 0.0);
    assert!(series.contains_key(&format!(
        "shuyuan_agent_outbox_batches{{department=\"GA\",agent=\"{}\"}}",
        ga.key
    )));
    assert!(series[&format!("shuyuan_feed_changes_applied_total{labels}")] >= 30.0);
    assert!(series["shuyuan_admin_logins_total{result=\"failed\"}"] >= 1.0);

    // Browsers must post from the console itself.
    let cookie = {
        let r = http
            .post(format!("{base}/login"))
            .form(&[("user", ADMIN), ("password", PASSWORD), ("next", "/")])
            .send()?;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        r.headers()["set-cookie"]
            .to_str()?
            .split(';')
            .next()
            .unwrap_or("")
            .to_string()
    };
    let r = http
        .post(format!("{base}/catalog/review"))
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .form(&[("code", HOUSEHOLD), ("approve", "1"), ("reviewer", "x")])
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = get("/departments/GA").header("cookie", &cookie).send()?;
    assert_eq!(r.status(), StatusCode::OK);
    let page = r.text()?;
    assert!(
        page.contains(&format!("data-feed=\"GA:{HOUSEHOLD}\"")),
        "{page}"
    );
    // Logged out, the cookie no longer works.
    let r = http
        .post(format!("{base}/logout"))
        .header("cookie", &cookie)
        .send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = get("/departments/GA").header("cookie", &cookie).send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    // The OpenAPI document is public and lists every endpoint used here.
    let spec = get("/api/openapi.yaml").send()?.text()?;
    for path in [
        "/api/v1/login",
        "/api/v1/status",
        "/api/v1/overview",
        "/api/v1/departments/{code}",
        "/api/v1/resources/{department}/{resource}",
        "/api/v1/audit",
        "/api/v1/catalog",
        "/api/v1/catalog/review",
        "/metrics",
        "/events",
    ] {
        assert!(
            spec.contains(&format!("\n  {path}:\n")),
            "{path} undocumented"
        );
    }
    assert_eq!(get("/healthz").send()?.status(), StatusCode::OK);
    Ok(())
}

#[test]
fn an_open_console_serves_this_machine_only() -> Result<()> {
    let Nodes(mut sb, [], []) = Topology::new().start()?;
    let base = sb.hub.admin_url()?;
    let http = client()?;
    let r = http.get(format!("{base}/api/v1/status")).send()?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Json>()?["running"], true);
    // A page elsewhere that rebinds its own name to 127.0.0.1.
    let r = http
        .get(format!("{base}/api/v1/status"))
        .header("host", "evil.example")
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A form another site posts.
    let r = http
        .post(format!("{base}/catalog/review"))
        .header("origin", "http://evil.example")
        .form(&[("code", HOUSEHOLD), ("approve", "1"), ("reviewer", "x")])
        .send()?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // No login page without a password.
    let r = http.get(format!("{base}/login")).send()?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    // A console beyond loopback without a password does not start.
    let config = std::fs::read_to_string(&sb.hub.config)?;
    sb.hub.stop()?;
    std::fs::write(
        &sb.hub.config,
        config.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"0.0.0.0:0\"",
        ),
    )?;
    let out = std::process::Command::new(shuyuan_tests::bin("shuyuan-hub"))
        .arg("--config")
        .arg(&sb.hub.config)
        .arg("run")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hub.toml: admin.accounts: the console listens on 0.0.0.0:0"),
        "{err}"
    );
    Ok(())
}

/// `name{labels} value` lines of a Prometheus text exposition.
fn metric_values(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// One request the receiver got: its headers (the request line under
/// `:request`) and body.
type Delivery = (BTreeMap<String, String>, Vec<u8>);

/// A webhook receiver: answers the first delivery with 500 (to be
/// retried), every later one with 204, and keeps what it got.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/hooks/shuyuan", listener.local_addr()?);
        let got = Arc::new(Mutex::new(Vec::new()));
        let store = got.clone();
        std::thread::spawn(move || {
            let mut first = true;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let Ok(request) = read_request(&mut stream) else {
                    continue;
                };
                let answer = if first {
                    first = false;
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    store
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(request);
                    "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Ok(Receiver { url, got })
    }

    fn events(&self) -> Vec<Delivery> {
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn read_request(stream: &mut std::net::TcpStream) -> Result<(BTreeMap<String, String>, Vec<u8>)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut headers = BTreeMap::new();
    headers.insert(":request".to_string(), line.trim().to_string());
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok((headers, body))
}

#[test]
fn a_webhook_gets_the_overdue_and_disconnected_events() -> Result<()> {
    let receiver = Receiver::start()?;
    let Nodes(sb, [], []) = Topology::new()
        .hub_config(&format!(
            "[freshness]\ngrace = \"1s\"\n[alerts]\nwebhook = \"{}\"\nattempts = 3\nretry_after = \"200ms\"\n",
            receiver.url
        ))
        .start()?;
    let mut ga = department(&sb, "ga", "GA", household(), data::HOUSEHOLD_DDL, 5, "2s")?;
    let feed = format!("GA:{HOUSEHOLD}");
    ga.stop()?;
    let stopped_at = shuyuan_tests::now_millis();
    let newcomer = shuyuan_protocol::NodeKey::generate()?.id().to_string();
    sb.hub.enroll("MZ", "民政局", &newcomer)?;
    let waited = wait_for(
        "the disconnected, overdue and enrolled events",
        Duration::from_secs(20),
        || {
            let got = receiver.events();
            // Event kinds, and the agents they name.
            let kinds: Vec<String> = got
                .iter()
                .filter_map(|(_, b)| serde_json::from_slice::<Json>(b).ok())
                .flat_map(|j| [j["event"].clone(), j["agent"].clone()])
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let seen = |kind: &str| kinds.iter().any(|k| k == kind);
            Ok((seen("disconnected") && seen("overdue") && seen(&newcomer)).then_some(got))
        },
    );
    let events = waited.map_err(|e| {
        let got: Vec<String> = receiver
            .events()
            .iter()
            .map(|(h, _)| {
                format!(
                    "{} attempt {}",
                    h["x-shuyuan-event"], h["x-shuyuan-attempt"]
                )
            })
            .collect();
        e.context(format!(
            "received {got:?}; status {:?}; hub log:\n{}",
            sb.hub.feed_status(&feed).ok().flatten(),
            sb.hub.log()
        ))
    })?;
    let hub_key: shuyuan_protocol::NodeId = sb.hub.key.parse()?;
    let mut by_kind = BTreeMap::new();
    for (headers, body) in &events {
        // Every body is signed by the hub.
        assert_eq!(headers["x-shuyuan-hub"], sb.hub.key);
        assert_eq!(headers["content-type"], "application/json");
        let sig = data_encoding::BASE64.decode(headers["x-shuyuan-signature"].as_bytes())?;
        let sig = ed25519_dalek::Signature::from_slice(&sig)?;
        assert!(hub_key.verify(b"shuyuan webhook v1", body, &sig));
        assert!(!hub_key.verify(b"shuyuan webhook v1", b"{}", &sig));
        let json: Json = serde_json::from_slice(body)?;
        assert_eq!(headers["x-shuyuan-event"], json["event"]);
        assert!(headers[":request"].starts_with("POST /hooks/shuyuan "));
        by_kind.insert(
            json["event"].as_str().unwrap_or("").to_string(),
            (headers.clone(), json),
        );
    }
    // The first delivery was refused and retried.
    let first = &events[0].0;
    assert_eq!(first["x-shuyuan-attempt"], "2", "{first:?}");
    let (_, disconnected) = &by_kind["disconnected"];
    assert_eq!(disconnected["department"], "GA");
    assert_eq!(disconnected["department_name"], "ga department");
    assert_eq!(disconnected["agent"], ga.key);
    assert_eq!(disconnected["hub_key"], sb.hub.key);
    assert_eq!(disconnected["facts"]["resources"][0], HOUSEHOLD);
    assert!(disconnected["at_ms"].as_i64() >= Some(stopped_at - 1000));
    let enrolled = events
        .iter()
        .filter_map(|(_, b)| serde_json::from_slice::<Json>(b).ok())
        .find(|j| j["event"] == "enrolled" && j["agent"] == newcomer.as_str())
        .context("no enrolled event for the new key")?;
    assert_eq!(enrolled["department"], "MZ");
    assert_eq!(enrolled["department_name"], "民政局");
    let (_, overdue) = &by_kind["overdue"];
    assert_eq!(overdue["feed"], feed);
    assert_eq!(overdue["resource"], HOUSEHOLD);
    assert_eq!(overdue["state"], "overdue");
    assert_eq!(overdue["facts"]["update_cycle"], "2s");
    assert_eq!(overdue["facts"]["grace_secs"], 1);
    assert!(
        overdue["detail"]
            .as_str()
            .is_some_and(|d| d.contains("零更新") && d.contains("2s")),
        "{overdue}"
    );
    // Overdue only once the cycle plus grace passed.
    let status = sb.hub.feed_status(&feed)?.context("feed")?;
    let last = status["last_batch_received_at"].as_i64().unwrap_or(0);
    assert!(
        overdue["at_ms"].as_i64() > Some(last + 3000),
        "{overdue} {status}"
    );
    // One event per transition.
    std::thread::sleep(Duration::from_secs(3));
    let again = receiver.events();
    let count = |kind: &str| {
        again
            .iter()
            .filter(|(h, _)| h["x-shuyuan-event"] == kind)
            .count()
    };
    assert_eq!(count("overdue"), 1);
    assert_eq!(count("disconnected"), 1);
    // The metrics count the deliveries.
    let metrics = client()?
        .get(format!("{}/metrics", sb.hub.admin_url()?))
        .send()?
        .text()?;
    let series = metric_values(&metrics);
    assert!(series["shuyuan_webhook_deliveries_total{result=\"delivered\"}"] >= 2.0);
    assert_eq!(
        series["shuyuan_webhook_deliveries_total{result=\"retried\"}"],
        1.0
    );
    assert_eq!(
        series[&format!("shuyuan_feed_overdue{{department=\"GA\",resource=\"{HOUSEHOLD}\"}}")],
        1.0
    );
    Ok(())
}

mod browser {
    //! The console in Debian's Chromium, headless, over WebDriver.

    use super::*;
    use fantoccini::{ClientBuilder, Locator};

    struct Driver(std::process::Child);

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn chromedriver() -> Result<(Driver, String)> {
        for path in ["/usr/bin/chromedriver", "/usr/bin/chromium"] {
            if !std::path::Path::new(path).exists() {
                bail!(
                    "{path} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
                );
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let driver = Driver(child);
        let url = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(20), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        })?;
        Ok((driver, url))
    }

    /// A screenshot file under `target/` (kept as a CI artifact).
    fn screenshot_path(name: &str) -> std::path::PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let _ = std::fs::create_dir_all(&target);
        target.join(name)
    }

    #[test]
    fn an_administrator_finds_overdue_and_zero_updated_resources_in_chromium() -> Result<()> {
        let Nodes(sb, [], []) = Topology::new()
            .admin_account(ADMIN, PASSWORD)
            .hub_config("[freshness]\ngrace = \"1s\"\n")
            .start()?;
        // 公安 goes quiet and stops: overdue. 市场监管 keeps reporting
        // zero-updates every 2 s.
        let mut ga = department(&sb, "ga", "GA", household(), data::HOUSEHOLD_DDL, 5, "2s")?;
        let sc = department(&sb, "sc", "SC", licences(), data::LICENCE_DDL, 5, "2s")?;
        // 民政 submits its catalog entry for review (a national cycle).
        let mz = department(&sb, "mz", "MZ", licences(), data::LICENCE_DDL, 3, "daily")?;
        mz.submit_entry(LICENCE)?;
        ga.stop()?;
        wait_for(
            "GA overdue, SC zero-updated",
            Duration::from_secs(20),
            || {
                let ga = sb.hub.feed_status(&format!("GA:{HOUSEHOLD}"))?;
                let sc = sb.hub.feed_status(&format!("SC:{LICENCE}"))?;
                let submitted = sb
                    .hub
                    .catalog_list()?
                    .iter()
                    .any(|e| e["department"] == "MZ" && e["state"] == "submitted");
                Ok((ga.is_some_and(|f| f["freshness"] == "overdue")
                    && sc.is_some_and(|f| f["freshness"] == "zero_updated")
                    && submitted)
                    .then_some(()))
            },
        )?;
        let base = sb.hub.admin_url()?;
        let (_driver, webdriver) = chromedriver()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut caps = serde_json::Map::new();
            caps.insert(
                "goog:chromeOptions".into(),
                serde_json::json!({
                    "binary": "/usr/bin/chromium",
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1400,1000",
                             "--lang=zh-CN"],
                    "prefs": {"intl.accept_languages": "zh-CN,zh"}
                }),
            );
            let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&webdriver)
                .await
                .context("cannot start a Chromium session")?;
            let result = drive(&c, &base, &sc.key).await;
            if let Ok(png) = c.screenshot().await {
                let path = screenshot_path("console-screenshot.png");
                std::fs::write(&path, png)?;
                eprintln!("screenshot: {}", path.display());
            }
            c.close().await?;
            result
        })
    }

    // The console's live updates replace the page's content (`#content`)
    // whenever the hub's state changes, so an element found in one
    // WebDriver call can be gone ("stale") by the next. Each step below is
    // therefore one script that finds the element and acts on it at once.

    /// Runs `body` with `e` bound to the element `css` matches now; fails
    /// if none does.
    async fn on(c: &fantoccini::Client, css: &str, body: &str, args: Vec<Json>) -> Result<Json> {
        let script = format!(
            "const e = document.querySelector(arguments[0]); \
             if (!e) return {{missing: true}}; \
             const a = arguments; return {{value: (() => {{ {body} }})()}};"
        );
        let mut all = vec![Json::from(css)];
        all.extend(args);
        let out = c.execute(&script, all).await?;
        if out.get("missing").is_some() {
            bail!("no element matches {css}");
        }
        Ok(out.get("value").cloned().unwrap_or(Json::Null))
    }

    /// The element's rendered text (as WebDriver's Get Element Text).
    async fn text(c: &fantoccini::Client, css: &str) -> Result<String> {
        let v = on(c, css, "return e.innerText;", vec![]).await?;
        v.as_str().map(str::to_string).context("text is a string")
    }

    async fn attr(c: &fantoccini::Client, css: &str, name: &str) -> Result<Option<String>> {
        let v = on(
            c,
            css,
            "return e.getAttribute(a[1]);",
            vec![Json::from(name)],
        )
        .await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Clicks an element as the DOM does (`element.click()`).
    async fn click(c: &fantoccini::Client, css: &str) -> Result<()> {
        on(c, css, "e.click(); return true;", vec![]).await?;
        Ok(())
    }

    /// Fills one field of a form without submitting it.
    async fn fill(c: &fantoccini::Client, form: &str, field: &str, value: &str) -> Result<()> {
        on(
            c,
            form,
            "e.elements[a[1]].value = a[2]; return true;",
            vec![Json::from(field), Json::from(value)],
        )
        .await?;
        Ok(())
    }

    /// Fills one field of a form and clicks its button, in one step.
    async fn submit(c: &fantoccini::Client, form: &str, field: &str, value: &str) -> Result<()> {
        on(
            c,
            form,
            "e.elements[a[1]].value = a[2]; e.querySelector('button').click(); return true;",
            vec![Json::from(field), Json::from(value)],
        )
        .await?;
        Ok(())
    }

    /// Waits until an element matches `css`.
    async fn present(c: &fantoccini::Client, css: &str) -> Result<()> {
        c.wait().for_element(Locator::Css(css)).await?;
        Ok(())
    }

    async fn drive(c: &fantoccini::Client, base: &str, sc_key: &str) -> Result<()> {
        // Not logged in: the login form, in Chinese from the browser.
        c.goto(base).await?;
        assert!(c.current_url().await?.path().starts_with("/login"));
        assert_eq!(attr(c, "html", "lang").await?.as_deref(), Some("zh-CN"));
        // (ChromeDriver's synthetic key and mouse events do not reach the
        // page in this headless Chromium, so fields are filled in and
        // buttons and links clicked through the DOM: the page's own form
        // submission and navigation still run.)
        fill(c, "#login", "user", ADMIN).await?;
        submit(c, "#login", "password", "wrong password").await?;
        present(c, "#login-error").await?;
        let error = text(c, "#login-error").await?;
        assert!(error.contains("密码错误"), "{error}");
        fill(c, "#login", "user", ADMIN).await?;
        submit(c, "#login", "password", PASSWORD).await?;
        present(c, "#agents-online").await?;
        let online = text(c, "#agents-online").await?;
        assert_eq!(c.current_url().await?.path(), "/");
        std::fs::write(
            screenshot_path("console-overview.png"),
            c.screenshot().await?,
        )?;
        assert_eq!(online, "2");
        assert_eq!(text(c, "#agents-offline").await?, "1");

        // The overdue resource on its department's page.
        c.goto(&format!("{base}/departments/GA")).await?;
        let ga_row = format!("tr[data-feed=\"GA:{HOUSEHOLD}\"]");
        assert_eq!(
            attr(c, &ga_row, "data-state").await?.as_deref(),
            Some("overdue")
        );
        let row = text(c, &ga_row).await?;
        assert!(row.contains("逾期"), "{row}");
        assert!(row.contains("更新周期 2s + 宽限 1s"), "the rule: {row}");
        c.goto(&format!("{base}/departments/SC")).await?;
        let sc_row = format!("tr[data-feed=\"SC:{LICENCE}\"]");
        assert_eq!(
            attr(c, &sc_row, "data-state").await?.as_deref(),
            Some("zero_updated")
        );
        assert!(text(c, &sc_row).await?.contains("零更新"));

        // Switch to English; the choice sticks across pages.
        click(c, "#lang-en").await?;
        present(c, "html[lang=\"en\"]").await?;
        assert!(text(c, &sc_row).await?.contains("Zero-updated"));
        c.goto(&format!("{base}/departments/GA")).await?;
        assert!(text(c, &ga_row).await?.contains("Overdue"));

        // Review the submitted entry on the catalog page, after filtering
        // with the form's empty fields.
        c.goto(&format!("{base}/catalog")).await?;
        click(c, "#catalog-filter button").await?;
        let entry = format!("tr[data-department=\"MZ\"][data-code=\"{LICENCE}\"]");
        present(c, &format!("{entry}[data-entry-state=\"submitted\"]")).await?;
        // The reviewer is the administrator logged in: the form has no
        // field for it.
        assert!(
            on(
                c,
                &format!("{entry} form.review"),
                "return e.elements['reviewer'] === undefined;",
                vec![]
            )
            .await?
            .as_bool()
                == Some(true)
        );
        submit(c, &format!("{entry} form.review"), "remarks", "").await?;
        present(c, "#notice").await?;
        let notice = text(c, "#notice").await?;
        assert!(notice.contains("approved"), "{notice}");
        let approved = text(c, &format!("{entry}[data-entry-state=\"published\"]")).await?;
        assert!(approved.contains("王审核"), "{approved}");

        // Open the zero-updated resource's page from its department.
        c.goto(&format!("{base}/departments/SC")).await?;
        click(c, &format!("{sc_row} a[href^=\"/resources/\"]")).await?;
        present(c, "#resource-state").await?;
        assert!(c.current_url().await?.path().starts_with("/resources/SC/"));
        assert_eq!(
            attr(c, "#resource-state", "data-state").await?.as_deref(),
            Some("zero_updated")
        );
        let batches = text(c, "#batches").await?;
        // The newest batches, each signed by the department's agent.
        assert!(batches.contains(&sc_key[..12]), "{batches}");
        let sample = text(c, "#sample").await?;
        assert!(sample.contains("credit_code"), "{sample}");
        Ok(())
    }
}

#[test]
fn federation_page_shows_the_tree() -> Result<()> {
    let Nodes(sb, [county], [agent]) = Topology::new()
        .hub(HubSpec::child("county", "330902").share("undeclared = \"forward\"\n"))
        .agent(
            AgentSpec::sqlite("dept", "GA-1", &[data::HOUSEHOLD_DDL])
                .resources(household())
                .at("county"),
        )
        .start()?;
    let conn = agent.database()?;
    let mut rng = data::Rng::new(11);
    for _ in 0..5 {
        data::insert_household(&conn, &mut rng)?;
    }
    let feed = format!("GA-1:{HOUSEHOLD}");

    // The parent sees the county connected, and the feed at the county
    // with nothing the parent lacks.
    let view = wait_for(
        "the county connected and its feed level with the parent",
        Duration::from_secs(60),
        || {
            let v: Json = serde_json::from_str(&sb.hub.admin_get("/api/v1/federation")?)?;
            let connected = v["children"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["code"] == "330902" && c["connected"] == true)
            });
            let level = v["tree"].as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    // The county reports its feeds every two seconds, so
                    // its last report may trail what the parent already has.
                    r["feed"] == feed.as_str()
                        && r["depth"] == 1
                        && r["lag"] == 0
                        && r["seq"].as_u64() > Some(0)
                        && r["above"] == r["seq"]
                })
            });
            Ok((connected && level).then_some(v))
        },
    )
    .map_err(|e| {
        e.context(format!(
            "parent log:\n{}\ncounty log:\n{}",
            sb.hub.log(),
            county.log()
        ))
    })?;
    assert!(view["upstream"].is_null(), "{view}");
    let child = &view["children"][0];
    assert_eq!(child["key"], county.key.as_str());
    assert_eq!(child["name"], "county");
    assert_eq!(child["departments"][0], "GA-1");
    let row = view["tree"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["feed"] == feed.as_str()))
        .context("the feed's tree row")?;
    assert_eq!(row["hub"], "county");
    assert_eq!(row["hub_key"], county.key.as_str());
    assert_eq!(row["above"], row["seq"]);
    assert!(row["held"].is_null(), "{row}");

    // The page, in both languages.
    let html = sb.hub.admin_get("/federation?lang=en")?;
    for words in [
        "<h1>Federation</h1>",
        "<h2>Child hubs</h2>",
        "<code>330902</code>",
        ">county</span>",
        &format!("data-feed=\"{feed}\""),
        &format!(">{feed}</a>"),
        "data-lag=\"0\"",
    ] {
        assert!(html.contains(words), "{words:?} missing from:\n{html}");
    }
    let html = sb.hub.admin_get("/federation?lang=zh")?;
    assert!(
        html.contains("<h2>级联树</h2>") && html.contains(">county</span>"),
        "{html}"
    );

    // The county reports its link up.
    let metrics = county.admin_get("/metrics")?;
    assert!(
        metrics.lines().any(|l| l == "shuyuan_upstream_connected 1"),
        "{metrics}"
    );
    let series = metric_values(&metrics);
    assert_eq!(series.get("shuyuan_upstream_rejections_total"), Some(&0.0));
    let up: Json = serde_json::from_str(&county.admin_get("/api/v1/federation")?)?;
    assert_eq!(up["upstream"]["link"], "connected", "{up}");
    assert_eq!(up["upstream"]["parent"], sb.hub.key.as_str());
    assert_eq!(up["children"].as_array().map(Vec::len), Some(0));
    Ok(())
}
