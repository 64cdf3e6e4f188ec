//! The admin API against its own OpenAPI document: Schemathesis (installed
//! by `tests/api-fuzz/setup.sh`, which `.ci/run` runs) reads the document
//! the real hub serves at `/api/openapi.yaml` and sends it generated
//! requests, valid and invalid, with the hub's local bearer token. Every
//! answer must be no server error, a documented status, of the documented
//! content type and headers, with a body the schema admits; and a request
//! without the token must be refused. The hub has a department with two
//! synced resources, one catalog entry approved and one awaiting review,
//! and audit entries, so the document's example values reach real data.
//!
//! Bounded and reproducible: a fixed seed, a fixed number of examples per
//! operation, one worker and no example database (the settings are in
//! `tests/api-fuzz/schemathesis.toml`); `SHUYUAN_API_FUZZ_SEED` and
//! `SHUYUAN_API_FUZZ_EXAMPLES` change the first two. A failure shows the
//! fuzzer's report, with a curl line for each failing request.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use shuyuan_tests::{AgentSpec, Nodes, ResourceSpec, Topology, data, wait_for};

const PASSWORD: &str = "correct horse battery staple";
/// The resource codes the document's examples name.
const HOUSEHOLD: &str = "101001/00001";
const LICENCE: &str = "102001/00001";
const ROWS: u64 = 25;

const DEFAULT_SEED: u64 = 20_160_916;
const DEFAULT_EXAMPLES: u32 = 40;
/// The fuzzer is killed, and the test fails, past this.
const DEADLINE: Duration = Duration::from_secs(300);

/// The venv `tests/api-fuzz/setup.sh` makes.
fn schemathesis() -> Result<PathBuf> {
    let venv = match std::env::var_os("SHUYUAN_API_FUZZ_VENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/api-fuzz-venv"),
    };
    let exe = venv.join("bin").join("schemathesis");
    if !exe.exists() {
        bail!(
            "Schemathesis is not installed at {}: run tests/api-fuzz/setup.sh \
             (.ci/run runs it when the venv is missing)",
            exe.display()
        );
    }
    Ok(exe)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

#[test]
fn the_admin_api_answers_as_its_document_says() -> Result<()> {
    let exe = schemathesis()?;
    let seed: u64 = env_or("SHUYUAN_API_FUZZ_SEED", DEFAULT_SEED)?;
    let examples: u32 = env_or("SHUYUAN_API_FUZZ_EXAMPLES", DEFAULT_EXAMPLES)?;

    let Nodes(sb, [], [ga]) = Topology::new()
        .admin_account("王审核", PASSWORD)
        // The fuzzer probes every operation with invalid basic credentials,
        // which the default limit (5 per address) would answer with 429
        // after the fifth; admin.rs tests the limits.
        .admin_setting("login_failures_per_address = 1000")
        .admin_setting("login_failures_per_minute = 1000")
        .agent(
            AgentSpec::sqlite("ga", "GA", &[data::HOUSEHOLD_DDL, data::LICENCE_DDL])
                .department_name("公安局")
                .resources(vec![
                    ResourceSpec::new(HOUSEHOLD, "household", &["id_number"], "daily"),
                    ResourceSpec::new(LICENCE, "business_licence", &["credit_code"], "daily"),
                ])
                .seed(|conn| {
                    let mut rng = data::Rng::new(9);
                    for _ in 0..ROWS {
                        data::insert_household(conn, &mut rng)?;
                        data::insert_licence(conn, &mut rng)?;
                    }
                    Ok(())
                }),
        )
        .start()?;
    for code in [HOUSEHOLD, LICENCE] {
        ga.catalog(&["set", code, "update_cycle", "daily"])?;
        ga.submit_entry(code)?;
    }
    wait_for(
        "the rows and entries at the hub",
        Duration::from_secs(30),
        || {
            for code in [HOUSEHOLD, LICENCE] {
                let synced = sb
                    .hub
                    .feed_status(&format!("GA:{code}"))?
                    .is_some_and(|f| f["rows"].as_u64() == Some(ROWS));
                if !synced {
                    return Ok(None);
                }
            }
            let submitted = sb
                .hub
                .catalog_list()?
                .iter()
                .filter(|e| e["state"] == "submitted")
                .count();
            Ok((submitted == 2).then_some(()))
        },
    )?;

    // One entry approved (a review to show, an audit entry), one left for
    // the fuzzer to review.
    let base = sb.hub.admin_url()?;
    let token = sb.hub.admin_token()?;
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/api/v1/catalog/review"))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "department": "GA", "code": HOUSEHOLD, "approve": true,
            "reviewer": "王审核", "remarks": "",
        }))
        .send()?;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text()?);
    wait_for("the review audited", Duration::from_secs(10), || {
        let audit = sb.hub.audit()?;
        Ok(audit
            .iter()
            .any(|a| a["kind"] == "catalog_reviewed")
            .then_some(()))
    })?;

    // What the fuzzer does not send: a path that is not UTF-8 once decoded
    // gets the documented JSON error too.
    for path in ["departments/%FF", "resources/GA/%FF"] {
        let r = reqwest::blocking::Client::new()
            .get(format!("{base}/api/v1/{path}"))
            .bearer_auth(&token)
            .send()?;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: serde_json::Value = r.json().with_context(|| format!("{path}: not JSON"))?;
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("api-fuzz/schemathesis.toml");
    let mut cmd = Command::new(&exe);
    cmd.current_dir(sb.dir.path())
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{base}/api/openapi.yaml"), "--url", &base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--seed", &seed.to_string()])
        .args(["--max-examples", &examples.to_string()])
        .arg("--no-color")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("running {cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting schemathesis")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    eprintln!(
        "schemathesis (seed {seed}, {examples} examples) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    match status {
        None => bail!("schemathesis ran past {DEADLINE:?}:\n{output}"),
        Some(s) if !s.success() => bail!(
            "schemathesis found failures (seed {seed}; rerun with SHUYUAN_API_FUZZ_SEED={seed}):\n{output}"
        ),
        Some(_) => {
            eprintln!("{output}");
            Ok(())
        }
    }
}
