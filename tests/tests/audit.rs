//! The hub's audit log is hash-chained: `shuyuan-hub audit verify` proves
//! it intact, and after someone edits the store file names the first entry
//! that is no longer what the hub wrote.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use redb::{Database, ReadableTable, TableDefinition};
use shuyuan_protocol::NodeKey;
use shuyuan_tests::{HubProcess, Nodes, Topology};

const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_v1");
const CHAIN: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_chain_v1");

/// `audit verify` with `args`: whether it passed, and what it printed.
fn verify(hub: &HubProcess, args: &[&str]) -> Result<(bool, String)> {
    let out = hub.cli(&[&["audit", "verify"], args].concat())?;
    let text = String::from_utf8(out.stdout)? + &String::from_utf8(out.stderr)?;
    Ok((out.status.success(), text))
}

/// The head an intact log reports.
fn head(text: &str) -> Result<String> {
    Ok(text
        .trim()
        .rsplit("head ")
        .next()
        .context("no head printed")?
        .to_string())
}

fn store(hub: &HubProcess) -> std::path::PathBuf {
    hub.dir.join("data").join("hub.redb")
}

/// Changes the stored bytes of audit entry `id` in place: `from` becomes
/// `to` (same length, so the entry still decodes).
fn edit_entry(path: &Path, id: u64, from: &str, to: &str) -> Result<()> {
    let db = Database::open(path)?;
    let tx = db.begin_write()?;
    {
        let mut audit = tx.open_table(AUDIT)?;
        let mut bytes = audit.get(id)?.context("no such entry")?.value().to_vec();
        let at = bytes
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .with_context(|| format!("entry {id} does not contain {from:?}"))?;
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        audit.insert(id, bytes.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

/// Removes audit entry `id` and its link, as someone covering their tracks would.
fn remove_entry(path: &Path, id: u64) -> Result<()> {
    let db = Database::open(path)?;
    let tx = db.begin_write()?;
    {
        tx.open_table(AUDIT)?.remove(id)?.context("no such entry")?;
        tx.open_table(CHAIN)?.remove(id)?;
    }
    tx.commit()?;
    Ok(())
}

#[test]
fn audit_verify_names_the_first_entry_changed_behind_the_hub() -> Result<()> {
    let Nodes(mut sb, [], []) = Topology::new().start()?;
    // Six enrollments: six audit entries, named so they can be found.
    for i in 1..=6u8 {
        let key = NodeKey::from_seed([i; 32]).id().to_string();
        sb.hub
            .enroll(&format!("GA-{i}"), &format!("department {i}"), &key)?;
    }
    let (ok, text) = verify(&sb.hub, &[])?;
    ensure!(ok && text.contains("intact: 6 entries"), "{text}");
    let recorded = head(&text)?;
    assert_eq!(recorded.len(), 64, "{text}");
    sb.hub.stop()?;
    let path = store(&sb.hub);

    // Stopped, the store file is checked directly.
    let (ok, text) = verify(&sb.hub, &["--head", &recorded])?;
    ensure!(ok && text.contains(&recorded), "{text}");

    // One entry changed: named, and the ones before it vouched for.
    edit_entry(&path, 3, "department 3", "department 9")?;
    let (ok, text) = verify(&sb.hub, &[])?;
    ensure!(!ok, "an edited log passed: {text}");
    ensure!(
        text.contains("BROKEN at entry 3") && text.contains("changed"),
        "{text}"
    );
    ensure!(
        text.contains("the 2 entries before it are intact"),
        "{text}"
    );
    edit_entry(&path, 3, "department 9", "department 3")?;
    let (ok, text) = verify(&sb.hub, &["--head", &recorded])?;
    ensure!(ok, "restored, the log is the one written: {text}");

    // An entry removed together with its link: the gap is named.
    let (_, json) = verify(&sb.hub, &["--json"])?;
    let before: serde_json::Value = serde_json::from_str(&json)?;
    remove_entry(&path, 6)?;
    // The last entry gone with its link is only caught by a recorded head.
    let (ok, text) = verify(&sb.hub, &[])?;
    ensure!(ok && text.contains("5 entries"), "{text}");
    let (ok, text) = verify(&sb.hub, &["--head", &recorded])?;
    ensure!(!ok && text.contains("NOT the one recorded"), "{text}");
    remove_entry(&path, 4)?;
    let (ok, text) = verify(&sb.hub, &["--json"])?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(!ok, "{text}");
    assert_eq!(
        report["broken"],
        serde_json::json!([4, "missing"]),
        "{report}"
    );
    assert_eq!(report["intact"], 3, "{report}");
    assert_eq!(before["intact"], 6, "{before}");

    // The hub still starts and chains what it writes next onto the log
    // as it now is, so the break stays visible rather than being hidden.
    sb.hub.start()?;
    sb.hub.enroll(
        "GA-7",
        "department 7",
        &NodeKey::from_seed([7; 32]).id().to_string(),
    )?;
    let (ok, text) = verify(&sb.hub, &[])?;
    ensure!(!ok && text.contains("BROKEN at entry 4"), "{text}");
    Ok(())
}

#[test]
fn a_busy_hubs_audit_log_stays_intact() -> Result<()> {
    // Entries written by the hub itself across restarts (rejected
    // handshakes, enrollments) chain on from each other.
    let Nodes(mut sb, [], []) = Topology::new().start()?;
    for i in 1..=3u8 {
        let key = NodeKey::from_seed([i; 32]).id().to_string();
        sb.hub.enroll("GA", "public security", &key)?;
    }
    sb.hub.stop()?;
    sb.hub.start()?;
    for i in 4..=5u8 {
        let key = NodeKey::from_seed([i; 32]).id().to_string();
        sb.hub.enroll("GA", "public security", &key)?;
    }
    let entries = sb.hub.audit()?.len();
    let (ok, text) = verify(&sb.hub, &[])?;
    ensure!(
        ok && text.contains(&format!("intact: {entries} entries")),
        "{entries} entries in the log: {text}"
    );
    Ok(())
}
