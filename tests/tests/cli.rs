//! The command lines: help everywhere, and bad input that is named clearly.

use std::process::Command;

use anyhow::Result;
use shuyuan_tests::data;
use shuyuan_tests::{AgentProcess, ResourceSpec, Sandbox, bin};

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
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
    let resources = [ResourceSpec::new(
        "A01/0001",
        "household",
        &["id_number"],
        "daily",
    )];
    let agent = AgentProcess::init(&sb.dir.path().join("a"), &sb.hub, "GA", &db, &resources, "")?;
    let text = std::fs::read_to_string(&agent.config)?;
    std::fs::write(
        &agent.config,
        text.replace("update_cycle = \"daily\"", "update_cycle = \"fortnightly\""),
    )?;
    let err = fails(
        Command::new(bin("shuyuan-agent"))
            .arg("--config")
            .arg(&agent.config)
            .arg("status"),
    );
    assert!(err.contains(&agent.config.display().to_string()), "{err}");
    assert!(
        err.contains("resource[0].update_cycle") && err.contains("fortnightly"),
        "{err}"
    );

    std::fs::write(&sb.hub.config, "[hub]\nlisten = \"everywhere\"\n")?;
    let err = fails(
        Command::new(bin("shuyuan-hub"))
            .arg("--config")
            .arg(&sb.hub.config)
            .arg("status"),
    );
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
            .arg("run"),
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
    let resources = [ResourceSpec::new(
        "A01/0001",
        "household",
        &["id_number"],
        "daily",
    )];
    let gone = sb.dir.path().join("gone.db");
    let agent = AgentProcess::init(
        &sb.dir.path().join("a"),
        &sb.hub,
        "GA",
        &gone,
        &resources,
        "",
    )?;
    let err = fails(
        Command::new(bin("shuyuan-agent"))
            .arg("--config")
            .arg(&agent.config)
            .arg("run"),
    );
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
    let agent = AgentProcess::init(&sb.dir.path().join("b"), &sb.hub, "GA", &db, &resources, "")?;
    let err = fails(
        Command::new(bin("shuyuan-agent"))
            .arg("--config")
            .arg(&agent.config)
            .arg("run"),
    );
    assert!(
        err.contains("triggers are not installed for table household")
            && err.contains("shuyuan-agent triggers install"),
        "{err}"
    );

    let wrong_key = [ResourceSpec::new(
        "A01/0001",
        "household",
        &["name"],
        "daily",
    )];
    let agent = AgentProcess::init(&sb.dir.path().join("c"), &sb.hub, "GA", &db, &wrong_key, "")?;
    let err = fails(
        Command::new(bin("shuyuan-agent"))
            .arg("--config")
            .arg(&agent.config)
            .args(["triggers", "install"]),
    );
    assert!(
        err.contains("neither its primary key nor a unique index"),
        "{err}"
    );
    Ok(())
}
