//! Bad peers: forged, gapped, replayed and foreign batches are refused with
//! their reason and audited while an honest agent keeps syncing; keys that
//! are not enrolled are refused at the handshake. A flood of refused
//! handshakes fills the audit log only up to a cap, and a key is named as
//! refused only once its holder proved it holds it.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value as Json;
use shuyuan_protocol::batch::BatchHash;
use shuyuan_protocol::{NodeId, NodeKey, RejectReason};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::peer::{self, FeedPeer, batch, expect_ack, expect_reject};
use shuyuan_tests::{AgentProcess, AgentSpec, Nodes, Sandbox, Topology, assert_in_sync, wait_for};

/// Handshake refusals the hub audits one by one per minute, all keys
/// together (`peers::REFUSAL_ENTRIES`).
const REFUSAL_ENTRIES: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_and_audited_while_an_honest_agent_syncs() -> Result<()> {
    let Nodes(sb, [], [agent]) = Topology::new()
        .agent(AgentSpec::household("ga", "GA").outbox("batch_max_changes = 50"))
        .start()?;
    let conn = agent.database()?;
    // The honest department keeps writing throughout.
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut rng = Rng::new(21);
        for _ in 0..60 {
            for _ in 0..40 {
                data::churn_one(&conn, "household", &mut rng)?;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });

    let key = NodeKey::generate()?;
    sb.hub
        .enroll("MZ", "民政局 civil affairs", &key.id().to_string())?;
    let (mut peer, welcome) = FeedPeer::connect(&sb.hub, &key, "MZ", &["M01/0001"]).await?;
    assert_eq!(welcome.feeds[0].cursor.last_seq, 0);
    let feed = "MZ:M01/0001";
    let b1 = batch(&key, feed, 1, BatchHash::GENESIS, "J330902-2026-000001")?;
    expect_ack(peer.send(&b1).await?, 1);

    let b2 = batch(&key, feed, 2, b1.hash(), "J330902-2026-000002")?;
    let mut flipped = b2.clone();
    let last = flipped.body.len() - 1;
    flipped.body[last] ^= 0x01;
    expect_reject(peer.send(&flipped).await?, RejectReason::BadSignature, 2);
    expect_reject(peer.send(&b1).await?, RejectReason::Replay, 2);
    let b4 = batch(&key, feed, 4, b2.hash(), "J330902-2026-000004")?;
    expect_reject(peer.send(&b4).await?, RejectReason::Gap, 2);
    // A foreign department's feed, correctly signed by this key.
    let foreign = batch(&key, "GA:A01/0001", 1, BatchHash::GENESIS, "x")?;
    expect_reject(peer.send(&foreign).await?, RejectReason::WrongDepartment, 1);
    // The honest batch 2 is still welcome.
    expect_ack(peer.send(&b2).await?, 2);
    peer.conn.close(0u32.into(), b"done");

    writer.join().map_err(|_| anyhow!("writer panicked"))??;
    agent.wait_drained(Duration::from_secs(120))?;
    assert_in_sync(&sb.hub, &agent)?;

    let audit = sb.hub.audit()?;
    let refused: Vec<(u64, String)> = audit
        .iter()
        .filter(|a| a["kind"] == "batch_rejected")
        .map(|a| {
            (
                a["reason"].as_u64().unwrap_or(0),
                a["peer"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let me = key.id().to_string();
    let mut reasons: Vec<u64> = refused
        .iter()
        .filter(|(_, p)| *p == me)
        .map(|(r, _)| *r)
        .collect();
    reasons.sort_unstable();
    let mut expected = vec![
        RejectReason::BadSignature.code(),
        RejectReason::Replay.code(),
        RejectReason::Gap.code(),
        RejectReason::WrongDepartment.code(),
    ];
    expected.sort_unstable();
    assert_eq!(
        reasons.iter().map(|r| *r as u16).collect::<Vec<_>>(),
        expected,
        "{audit:?}"
    );
    assert_eq!(
        refused.len(),
        4,
        "only the bad peer was refused: {refused:?}"
    );

    let mz = sb.hub.feed_status(feed)?.expect("peer feed");
    assert_eq!(mz["rejected"], 3, "{mz}");
    assert_eq!(mz["last_seq"], 2);
    assert_eq!(mz["rows"], 2);
    let ga = sb.hub.feed_status("GA:A01/0001")?.expect("honest feed");
    assert_eq!(
        ga["rejected"], 0,
        "a foreign key must not touch another department's counters: {ga}"
    );
    Ok(())
}

/// Waits until the agent's status reports an authentication failure, and
/// returns what it tells the operator.
fn auth_failure(agent: &AgentProcess) -> Result<String> {
    let status = wait_for(
        "the agent to report an authentication failure",
        Duration::from_secs(30),
        || {
            let s = agent.status()?;
            Ok((s["hub"]["link"] == "authentication_failed").then_some(s))
        },
    )?;
    Ok(status["hub"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_keys_are_refused_at_the_handshake() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let stranger = NodeKey::generate()?;
    let err = match FeedPeer::connect(&sb.hub, &stranger, "XX", &["R"]).await {
        Ok(_) => panic!("an unenrolled key got through"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("authentication failed"), "{err}");
    let text = stranger.id().to_string();
    wait_for(
        "the hub to log the refused key",
        Duration::from_secs(10),
        || Ok(sb.hub.log().contains(&text).then_some(())),
    )?;
    let audit = wait_for(
        "the refusal in the audit log",
        Duration::from_secs(10),
        || {
            let audit = sb.hub.audit()?;
            Ok(audit
                .iter()
                .any(|a| a["kind"] == "handshake_refused" && a["peer"] == text.as_str())
                .then_some(audit))
        },
    )?;
    assert!(!audit.iter().any(|a| a["kind"] == "enrolled"));

    // The real agent explains the refusal and connects once enrolled.
    let mut agent = sb.add_agent(AgentSpec::household("ga", "GA").unenrolled())?;
    agent.start()?;
    let detail = auth_failure(&agent)?;
    assert!(
        detail.contains("refused this agent's key")
            && detail.contains("shuyuan-hub enroll --department GA")
            && detail.contains(&agent.key),
        "{detail}"
    );
    data::insert_household(&agent.database()?, &mut Rng::new(3))?;
    sb.hub.enroll("GA", "公安局", &agent.key)?;
    agent.wait_drained(Duration::from_secs(60))?;
    assert_in_sync(&sb.hub, &agent)?;

    // An agent pinning the wrong hub key refuses the hub.
    let impostor = NodeKey::generate()?.id().to_string();
    let mut misled = sb.add_agent(
        AgentSpec::household("misled", "GA")
            .pinning(&impostor)
            .unenrolled(),
    )?;
    misled.start()?;
    let detail = auth_failure(&misled)?;
    assert!(
        detail.contains("is not the configured hub") && detail.contains(&sb.hub.key),
        "{detail}"
    );
    misled.stop()?;
    agent.stop()?;
    Ok(())
}

/// A handshake the hub must refuse: the error the client sees.
async fn refused(attempt: Result<(FeedPeer, shuyuan_protocol::message::Welcome)>) -> Result<()> {
    match attempt {
        Ok(_) => Err(anyhow!("the hub admitted the handshake")),
        Err(e) => {
            let e = e.to_string();
            ensure!(e.contains("authentication failed"), "{e}");
            Ok(())
        }
    }
}

/// One sample of the hub's `/metrics`.
async fn metric(sb: &Sandbox, series: &str) -> Result<f64> {
    let text = reqwest::get(format!("{}/metrics", sb.hub.admin_url()?))
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {series} in {text}"))
}

/// The hub's handshake refusals in its audit log, once every audit entry
/// queued before this call is written: enrolling goes through the same
/// queue, so the `enrolled` entry of `marker` comes after them.
fn handshake_refusals(sb: &Sandbox, marker: &str) -> Result<Vec<Json>> {
    sb.hub.enroll("ZZ", "marker", marker)?;
    let audit = sb.hub.audit()?;
    ensure!(
        audit
            .iter()
            .any(|a| a["kind"] == "enrolled" && a["peer"] == marker),
        "{audit:?}"
    );
    Ok(audit
        .into_iter()
        .filter(|a| a["kind"] == "handshake_refused")
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_is_audited_up_to_a_cap_and_counted_in_full() -> Result<()> {
    const FRESH_KEYS: usize = 20;
    const UNREADABLE: usize = 4;
    let Nodes(sb, [], []) = Topology::new().start()?;
    let hub_key: NodeId = sb.hub.key.parse()?;
    for _ in 0..FRESH_KEYS {
        let key = NodeKey::generate()?;
        refused(FeedPeer::connect(&sb.hub, &key, "XX", &["R"]).await).await?;
    }
    for _ in 0..UNREADABLE {
        let cert = peer::certificate_without_ed25519()?;
        let client = peer::presenting(cert, &NodeKey::generate()?, hub_key)?;
        refused(FeedPeer::connect_with(&sb.hub, client, "XX", &["R"]).await).await?;
    }
    // Every refusal is counted ...
    let counted = metric(&sb, "shuyuan_handshakes_refused_total").await?;
    assert_eq!(counted, (FRESH_KEYS + UNREADABLE) as f64);
    // ... but at most the cap is audited one by one; the rest is summed
    // into one entry a minute (after the minute, so maybe not yet).
    let marker = NodeKey::generate()?.id().to_string();
    let refusals = handshake_refusals(&sb, &marker)?;
    let (sums, single): (Vec<&Json>, Vec<&Json>) = refusals.iter().partition(|a| {
        a["detail"]
            .as_str()
            .is_some_and(|d| d.contains("beyond the"))
    });
    assert!(
        (1..=REFUSAL_ENTRIES).contains(&single.len()) && sums.len() <= 1,
        "{} refused handshakes made {} audit entries: {refusals:#?}",
        FRESH_KEYS + UNREADABLE,
        refusals.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_named_as_refused_only_once_its_holder_proved_it() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let hub_key: NodeId = sb.hub.key.parse()?;
    // Three departments' keys: enrolled, revoked, and enrolled elsewhere.
    // The impostor has only their public halves.
    let [enrolled, revoked, elsewhere] = [(); 3].map(|()| NodeKey::generate());
    let (enrolled, revoked, elsewhere) = (enrolled?, revoked?, elsewhere?);
    sb.hub.enroll("MZ", "民政局", &enrolled.id().to_string())?;
    sb.hub.enroll("CZ", "财政局", &revoked.id().to_string())?;
    let out = sb
        .hub
        .cli(&["revoke", &revoked.id().to_string(), "--reason", "replaced"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let impostor = NodeKey::generate()?;
    let victims = [&enrolled, &revoked, &elsewhere];
    for victim in victims {
        let cert = peer::certificate_of(&victim.id(), &impostor)?;
        let client = peer::presenting(cert, &impostor, hub_key)?;
        refused(FeedPeer::connect_with(&sb.hub, client, "MZ", &["R"]).await).await?;
    }
    let marker = NodeKey::generate()?.id().to_string();
    let refusals = handshake_refusals(&sb, &marker)?;
    for victim in victims {
        let key = victim.id().to_string();
        assert!(
            !refusals.iter().any(|a| a["peer"] == key.as_str()
                || a["detail"].as_str().is_some_and(|d| d.contains(&key))),
            "a refusal in {key}'s name: {refusals:#?}"
        );
        assert!(
            !sb.hub
                .log()
                .lines()
                .any(|l| l.contains("refused") && l.contains(&key)),
            "the hub logged a refusal in {key}'s name:\n{}",
            sb.hub.log()
        );
    }
    assert!(
        refusals.iter().any(|a| a["peer"].is_null()
            && a["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("unproven key"))),
        "{refusals:#?}"
    );
    // The refusals are counted all the same.
    let counted = metric(&sb, "shuyuan_handshakes_refused_total").await?;
    assert_eq!(counted, victims.len() as f64);
    // The holder of the enrolled key is not affected.
    let (mut conn, _) = FeedPeer::connect(&sb.hub, &enrolled, "MZ", &["R"]).await?;
    expect_ack(
        conn.send(&batch(&enrolled, "MZ:R", 1, BatchHash::GENESIS, "m1")?)
            .await?,
        1,
    );
    Ok(())
}
