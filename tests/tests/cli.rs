//! The command lines: help everywhere, and bad input that is named clearly.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use shuyuan_tests::data;
use shuyuan_tests::{AgentProcess, AgentSpec, ResourceSpec, Sandbox, bin};

/// What `ARGS` printed to stderr; they must fail.
fn fails(out: std::process::Output, args: &[&str]) -> String {
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An agent of department GA sharing the household register daily from
/// `db`, configured in `name/` (neither enrolled nor capture installed).
fn configured(sb: &Sandbox, name: &str, db: &Path, key: &str) -> Result<AgentProcess> {
    sb.add_agent(
        AgentSpec::sqlite_file(name, "GA", db)
            .resources(vec![ResourceSpec::new(
                "A01/0001",
                "household",
                &[key],
                "daily",
            )])
            .configured_only(),
    )
}

#[test]
fn every_command_has_help() {
    for (b, cmds) in [
        (
            "shuyuan-agent",
            vec![
                vec![],
                vec!["init"],
                vec!["run"],
                vec!["status"],
                vec!["triggers"],
                vec!["triggers", "install"],
                vec!["triggers", "uninstall"],
            ],
        ),
        (
            "shuyuan-hub",
            vec![
                vec![],
                vec!["init"],
                vec!["run"],
                vec!["enroll"],
                vec!["status"],
                vec!["export"],
                vec!["audit"],
            ],
        ),
    ] {
        for c in cmds {
            let out = Command::new(bin(b))
                .args(&c)
                .arg("--help")
                .output()
                .expect("run");
            assert!(out.status.success(), "{b} {c:?} --help");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("Usage:"), "{b} {c:?}: {text}");
        }
    }
}

#[test]
fn malformed_configs_name_file_key_and_reason() -> Result<()> {
    let sb = Sandbox::new()?;
    let (db, _c) = sb.database("dept.db", &[data::HOUSEHOLD_DDL])?;
    let agent = configured(&sb, "a", &db, "id_number")?;
    let text = std::fs::read_to_string(&agent.config)?;
    std::fs::write(
        &agent.config,
        text.replace("update_cycle = \"daily\"", "update_cycle = \"fortnightly\""),
    )?;
    let err = fails(agent.cli(&["status"])?, &["status"]);
    assert!(err.contains(&agent.config.display().to_string()), "{err}");
    assert!(
        err.contains("resource[0].update_cycle") && err.contains("fortnightly"),
        "{err}"
    );

    std::fs::write(&sb.hub.config, "[hub]\nlisten = \"everywhere\"\n")?;
    let err = fails(sb.hub.cli(&["status"])?, &["status"]);
    assert!(
        err.contains(&sb.hub.config.display().to_string())
            && err.contains("hub.listen")
            && err.contains("everywhere"),
        "{err}"
    );

    let missing = sb.dir.path().join("nowhere.toml");
    let err = fails(
        Command::new(bin("shuyuan-hub"))
            .arg("--config")
            .arg(&missing)
            .arg("run")
            .output()?,
        &["run"],
    );
    assert!(
        err.contains("nowhere.toml") && err.contains("cannot read"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_missing_or_unprepared_database_is_a_clear_error() -> Result<()> {
    let sb = Sandbox::new()?;
    let gone = sb.dir.path().join("gone.db");
    let agent = configured(&sb, "a", &gone, "id_number")?;
    let err = fails(agent.cli(&["run"])?, &["run"]);
    assert!(
        err.contains("cannot open SQLite database")
            && err.contains("gone.db")
            && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !gone.exists(),
        "the agent must not create the department's database"
    );

    let (db, _c) = sb.database("dept.db", &[data::HOUSEHOLD_DDL])?;
    let agent = configured(&sb, "b", &db, "id_number")?;
    let err = fails(agent.cli(&["run"])?, &["run"]);
    assert!(
        err.contains("triggers are not installed for table household")
            && err.contains("shuyuan-agent triggers install"),
        "{err}"
    );

    let agent = configured(&sb, "c", &db, "name")?;
    let err = fails(
        agent.cli(&["triggers", "install"])?,
        &["triggers", "install"],
    );
    assert!(
        err.contains("neither its primary key nor a unique index"),
        "{err}"
    );
    Ok(())
}
