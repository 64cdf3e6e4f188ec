//! Keys: a key file other users can read stops the service with the fix
//! named, and the services make their data directory, redb files and
//! control socket for their own user only; a revoked key is cut off at
//! once and refused from then on.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Result, ensure};
use shuyuan_protocol::rotation::{KeyRotation, ROTATION_BY_NEW_CONTEXT};
use shuyuan_protocol::{BatchHash, MessageV1, NodeKey, RejectReason, UnixMillis};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::peer::{self, FeedPeer, expect_ack};
use shuyuan_tests::{AgentSpec, Nodes, Topology, assert_in_sync, wait_for};

fn expose(path: &std::path::Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

#[test]
fn a_key_file_other_users_can_read_stops_agent_and_hub_with_the_fix() -> Result<()> {
    let Nodes(mut sb, [], [mut agent]) = Topology::new()
        .agent(AgentSpec::household("ga", "GA"))
        .build()?;
    let hub_key = sb.hub.dir.join("hub.key");
    expose(&hub_key)?;
    let err = format!("{:#}", sb.hub.start().expect_err("the hub started"));
    ensure!(
        err.contains(&hub_key.display().to_string())
            && err.contains("0644")
            && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&hub_key, std::fs::Permissions::from_mode(0o600))?;
    sb.hub.start()?;

    let agent_key = agent.dir.join("agent.key");
    expose(&agent_key)?;
    let err = format!("{:#}", agent.start().expect_err("the agent started"));
    ensure!(
        err.contains(&agent_key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
    Ok(())
}

#[test]
fn hub_and_agent_make_their_data_for_their_own_user_only() -> Result<()> {
    // Started with the test's umask (usually 022), not systemd's 0077.
    let Nodes(sb, [], [agent]) = Topology::new()
        .agent(AgentSpec::household("ga", "GA"))
        .start()?;
    agent.wait_drained(Duration::from_secs(60))?;
    let mode = |p: &std::path::Path| -> Result<String> {
        Ok(format!(
            "{:04o}",
            std::fs::symlink_metadata(p)?.permissions().mode() & 0o7777
        ))
    };
    for (data, expected) in [
        (sb.hub.dir.join("data"), ["hub.redb", "hub.sock"].as_slice()),
        (
            agent.dir.join("data"),
            ["outbox.redb", "agent.sock"].as_slice(),
        ),
    ] {
        ensure!(
            mode(&data)? == "0700",
            "{}: {}",
            data.display(),
            mode(&data)?
        );
        let mut private = Vec::new();
        for entry in std::fs::read_dir(&data)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".redb") || name.ends_with(".sock") {
                ensure!(
                    mode(&path)? == "0600",
                    "{}: {}",
                    path.display(),
                    mode(&path)?
                );
                private.push(name.into_owned());
            }
        }
        for name in expected {
            ensure!(private.iter().any(|p| p == name), "{name} in {private:?}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_cut_off_and_refused_from_then_on() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let stolen = NodeKey::generate()?;
    let key = stolen.id().to_string();
    sb.hub.enroll("MZ", "民政局", &key)?;
    let (mut conn, _) = FeedPeer::connect(&sb.hub, &stolen, "MZ", &["R1"]).await?;
    let first = peer::batch(&stolen, "MZ:R1", 1, BatchHash::GENESIS, "c1")?;
    expect_ack(conn.send(&first).await?, 1);

    let out = sb.hub.cli(&["revoke", &key, "--reason", "laptop stolen"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && text.contains("revoked"), "{text}");

    // The open connection is closed: the next batch is never applied.
    let second = peer::batch(&stolen, "MZ:R1", 2, first.hash(), "c2")?;
    match conn.send(&second).await {
        Ok(reply) => panic!("a revoked key's batch was answered: {reply:?}"),
        Err(e) => {
            let why = conn.conn.close_reason().map(|r| r.to_string());
            ensure!(
                why.as_deref().is_some_and(|w| w.contains("key revoked")),
                "closed for another reason ({why:?}): {e:#}"
            );
        }
    }
    let feed = sb.hub.feed_status("MZ:R1")?.expect("the feed");
    assert_eq!(feed["last_seq"], 1, "{feed}");

    // It can no longer connect, and the refusal says why.
    let err = match FeedPeer::connect(&sb.hub, &stolen, "MZ", &["R1"]).await {
        Ok(_) => panic!("a revoked key connected"),
        Err(e) => e.to_string(),
    };
    ensure!(err.contains("authentication failed"), "{err}");
    let audit = wait_for("the refusal audited", Duration::from_secs(10), || {
        let audit = sb.hub.audit()?;
        let refused = audit.iter().any(|a| {
            a["kind"] == "handshake_refused"
                && a["peer"] == key.as_str()
                && a["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("was revoked"))
        });
        Ok(refused.then_some(audit))
    })?;
    let revoked: Vec<_> = audit.iter().filter(|a| a["kind"] == "revoked").collect();
    assert_eq!(revoked.len(), 1, "{audit:?}");
    ensure!(
        revoked[0]["peer"] == key.as_str()
            && revoked[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("MZ") && d.contains("laptop stolen")),
        "{:?}",
        revoked[0]
    );

    // A revoked key is never enrolled again.
    let out = sb
        .hub
        .cli(&["enroll", "--department", "MZ", "--name", "民政局", &key])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("was revoked"),
        "{err}"
    );

    // Its data stays, and another department's key is unaffected.
    assert_eq!(sb.hub.export_jsonl("MZ:R1")?.len(), 1);
    let honest = NodeKey::generate()?;
    sb.hub.enroll("MZ", "民政局", &honest.id().to_string())?;
    let (mut conn, _) = FeedPeer::connect(&sb.hub, &honest, "MZ", &["R2"]).await?;
    expect_ack(
        conn.send(&peer::batch(&honest, "MZ:R2", 1, BatchHash::GENESIS, "d1")?)
            .await?,
        1,
    );
    // Even through an honest connection, the revoked key's batches are refused.
    let smuggled = peer::batch(&stolen, "MZ:R1", 2, first.hash(), "c2")?;
    let reply = conn.send(&smuggled).await?;
    match reply {
        MessageV1::Reject(r) => {
            assert_eq!(r.reason, RejectReason::UnknownSigner, "{r:?}");
            ensure!(r.detail.contains("was revoked"), "{r:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_running_agent_whose_key_is_revoked_stops_syncing_and_says_so() -> Result<()> {
    let Nodes(sb, [], [mut agent]) = Topology::new()
        .agent(AgentSpec::household("ga", "GA"))
        .start()?;
    let conn = agent.database()?;
    let mut rng = Rng::new(5);
    for _ in 0..20 {
        data::insert_household(&conn, &mut rng)?;
    }
    agent.wait_drained(Duration::from_secs(60))?;
    assert_in_sync(&sb.hub, &agent)?;

    let out = sb
        .hub
        .cli(&["revoke", &agent.key, "--reason", "server decommissioned"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = wait_for(
        "the agent to report its key refused",
        Duration::from_secs(60),
        || {
            let s = agent.status()?;
            Ok((s["hub"]["link"] == "authentication_failed").then_some(s))
        },
    )
    .map_err(|e| {
        let s = agent
            .status()
            .map(|s| s["hub"].to_string())
            .unwrap_or_default();
        e.context(format!("agent's link: {s}\nagent log:\n{}", agent.log()))
    })?;
    ensure!(
        status["hub"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&agent.key)),
        "{status}"
    );
    // What the department writes now stays in its outbox.
    for _ in 0..5 {
        data::insert_household(&conn, &mut rng)?;
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sb.hub.export_jsonl("GA:A01/0001")?.len(),
        20,
        "rows arrived from a revoked key"
    );
    agent.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_rotates_its_key_and_its_chain_continues() -> Result<()> {
    let Nodes(mut sb, [], [mut agent]) = Topology::new()
        .agent(AgentSpec::household("ga", "GA").outbox("batch_max_changes = 10"))
        .start()?;
    let conn = agent.database()?;
    let feed = "GA:A01/0001";
    let mut rng = Rng::new(8);
    for _ in 0..30 {
        data::insert_household(&conn, &mut rng)?;
    }
    agent.wait_drained(Duration::from_secs(60))?;
    let old_key = agent.key.clone();
    let old_copy = sb.dir.path().join("old.key");
    std::fs::copy(agent.dir.join("agent.key"), &old_copy)?;

    // With the hub down, batches sealed under the old key wait in the
    // outbox; after the rotation, new ones are sealed under the new key.
    sb.hub.stop()?;
    for _ in 0..30 {
        data::churn_one(&conn, "household", &mut rng)?;
    }
    let out = agent.rotate_key()?;
    ensure!(out.contains("next key") && out.contains(&old_key), "{out}");
    let new_key = out
        .split_whitespace()
        .nth(2)
        .map(str::to_string)
        .unwrap_or_default();
    ensure!(new_key.len() == 52 && new_key != old_key, "{out}");
    agent.stop()?;
    agent.start()?;
    for _ in 0..30 {
        data::churn_one(&conn, "household", &mut rng)?;
    }
    sb.hub.start()?;
    agent.wait_drained(Duration::from_secs(120))?;
    let status = wait_for("the agent on its new key", Duration::from_secs(30), || {
        let s = agent.status()?;
        Ok((s["node"] == new_key.as_str()).then_some(s))
    })?;
    assert_eq!(status["node"], new_key.as_str());
    assert_in_sync(&sb.hub, &agent)?;
    let f = sb.hub.assert_applied_once(feed)?;
    assert_eq!(f["signer"], new_key.as_str(), "{f}");

    // Reconnecting with the new key retires the old one.
    agent.key = new_key.clone();
    agent.stop()?;
    agent.start()?;
    data::insert_household(&conn, &mut rng)?;
    agent.wait_drained(Duration::from_secs(60))?;
    assert_in_sync(&sb.hub, &agent)?;
    let audit = wait_for("the old key retired", Duration::from_secs(20), || {
        let audit = sb.hub.audit()?;
        let retired = audit.iter().any(|a| {
            a["kind"] == "key_rotated"
                && a["detail"].as_str().is_some_and(|d| d.contains("retired"))
        });
        Ok(retired.then_some(audit))
    })?;
    ensure!(
        audit.iter().any(|a| a["kind"] == "key_rotated"
            && a["peer"] == old_key.as_str()
            && a["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&new_key) && d.contains("both keys"))),
        "{audit:?}"
    );
    let old = shuyuan_service::keyfile::load(&old_copy)?;
    let err = match FeedPeer::connect(&sb.hub, &old, "GA", &["A01/0001"]).await {
        Ok(_) => panic!("a retired key connected"),
        Err(e) => e.to_string(),
    };
    ensure!(err.contains("authentication failed"), "{err}");
    let out = sb.hub.cli(&["audit", "verify"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    agent.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_not_signed_by_the_enrolled_key_is_refused() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let enrolled = NodeKey::generate()?;
    sb.hub.enroll("GA", "公安局", &enrolled.id().to_string())?;
    let thief = NodeKey::generate()?;
    let (mut conn, _) = FeedPeer::connect(&sb.hub, &enrolled, "GA", &["R"]).await?;
    // A rotation of another enrolled department's key, sent by this one.
    let other = NodeKey::generate()?;
    sb.hub.enroll("MZ", "民政局", &other.id().to_string())?;
    let foreign = KeyRotation::sign(&other, &thief, "MZ".parse()?, UnixMillis::now())?;
    conn.say(MessageV1::KeyRotation(foreign)).await?;
    let reply = conn.next().await?;
    match reply {
        MessageV1::Reject(r) => ensure!(r.detail.contains("only its own"), "{r:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Its own key, but the new key's signature forged by the old one.
    let (mut conn, _) = FeedPeer::connect(&sb.hub, &enrolled, "GA", &["R"]).await?;
    let mut forged = KeyRotation::sign(&enrolled, &thief, "GA".parse()?, UnixMillis::now())?;
    forged.by_new = enrolled.sign(ROTATION_BY_NEW_CONTEXT, &forged.body);
    conn.say(MessageV1::KeyRotation(forged)).await?;
    match conn.next().await? {
        MessageV1::Reject(r) => assert_eq!(r.reason, RejectReason::BadSignature, "{r:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The thief's key was never enrolled.
    assert!(
        FeedPeer::connect(&sb.hub, &thief, "GA", &["R"])
            .await
            .is_err()
    );
    let audit = sb.hub.audit()?;
    let refused = audit
        .iter()
        .filter(|a| {
            a["kind"] == "connection_refused"
                && a["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("key rotation refused"))
        })
        .count();
    assert_eq!(refused, 2, "{audit:?}");
    Ok(())
}
