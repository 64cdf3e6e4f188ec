//! The data resource catalog (数据资源目录) between a department's agent and
//! the hub: filling in and submitting entries, review, offline edits on both
//! sides, ownership, data items that follow the table, publication
//! deadlines, form import, and the catalog's update cycle in force.

use std::time::Duration;

use anyhow::{Result, anyhow};
use serde_json::Value as Json;
use shuyuan_protocol::catalog::doc::CatalogDoc;
use shuyuan_protocol::catalog::{CatalogEntry, Review, ReviewStatus};
use shuyuan_protocol::{NodeKey, RejectReason, UnixMillis};
use shuyuan_tests::data;
use shuyuan_tests::peer::CatalogPeer;
use shuyuan_tests::{AgentProcess, AgentSpec, Nodes, ResourceSpec, Sandbox, Topology, wait_for};

const CODE: &str = "101001/00001";

/// The department: its household register shared daily as `CODE`.
fn department() -> AgentSpec<'static> {
    AgentSpec::sqlite("ga", "GA", &[data::HOUSEHOLD_DDL]).resources(vec![ResourceSpec::new(
        CODE,
        "household",
        &["id_number"],
        "daily",
    )])
}

/// Fills in every field a submission needs, then submits.
fn complete_and_submit(agent: &AgentProcess) -> Result<()> {
    for (field, value) in [
        ("resource_class", "基础信息资源"),
        ("summary", "辖区常住人口户籍登记信息"),
        ("provider", "定海区公安分局"),
        ("share_type", "有条件共享"),
        ("share_conditions", "用于政务服务中的身份核验"),
        ("共享依据", "《中华人民共和国居民身份证法》"),
        ("share_methods", "比对验证;查询引用"),
        ("open_type", "不予开放"),
    ] {
        agent.catalog(&["set", CODE, field, value])?;
    }
    agent.catalog(&["set", CODE, "status", "submitted"])?;
    Ok(())
}

fn agent_entry(agent: &AgentProcess) -> Result<Json> {
    let view = agent.catalog_view()?;
    view["entries"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["entry"]["code"] == CODE).cloned())
        .ok_or_else(|| anyhow!("no entry {CODE} at the agent: {view}"))
}

fn hub_entry(sb: &Sandbox, department: &str) -> Result<Option<Json>> {
    Ok(sb
        .hub
        .catalog_list()?
        .into_iter()
        .find(|e| e["department"] == department && e["entry"]["code"] == CODE))
}

#[test]
fn entries_are_submitted_reviewed_and_edited_offline_on_both_sides() -> Result<()> {
    let Nodes(mut sb, [], [mut agent]) = Topology::new().agent(department()).start()?;

    // The agent drafted an entry whose data items are the table's columns.
    let draft = agent_entry(&agent)?;
    let items: Vec<&str> = draft["entry"]["data_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        items,
        [
            "id_number",
            "name",
            "gender",
            "birth_date",
            "address",
            "household_no",
            "photo",
            "updated_at"
        ]
    );
    assert_eq!(draft["state"], "draft");
    let err = agent
        .catalog(&["set", CODE, "status", "submitted"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be submitted") && err.contains("信息资源摘要 (summary): is required"),
        "{err}"
    );

    complete_and_submit(&agent)?;
    wait_for("the submission at the hub", Duration::from_secs(20), || {
        Ok(hub_entry(&sb, "GA")?.filter(|e| e["state"] == "submitted"))
    })?;
    let err = sb
        .hub
        .catalog(&["review", CODE, "--return", "--reviewer", "李审核"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs remarks"), "{err}");
    sb.hub
        .catalog(&["review", CODE, "--approve", "--reviewer", "李审核"])?;
    wait_for("the approval at the agent", Duration::from_secs(20), || {
        Ok(Some(agent_entry(&agent)?).filter(|e| e["state"] == "published"))
    })?;

    // Offline on both sides: the hub goes down, the department edits the
    // summary; then the agent stops and the department edits again without
    // it, while the platform reviews its (older) copy.
    sb.hub.stop()?;
    agent.catalog(&["set", CODE, "summary", "户籍登记信息（含迁入迁出）"])?;
    agent.stop()?;
    agent.catalog(&["set", CODE, "related", "101001/00002"])?;
    sb.hub.catalog(&[
        "review",
        CODE,
        "--return",
        "--reviewer",
        "王复核",
        "--remarks",
        "请补充开放条件说明",
    ])?;

    sb.hub.start()?;
    agent.start()?;
    let merged = wait_for("both sides to merge", Duration::from_secs(30), || {
        let a = agent_entry(&agent)?;
        let h = hub_entry(&sb, "GA")?.ok_or_else(|| anyhow!("no entry at the hub"))?;
        let same = a["entry"] == h["entry"] && a["review"] == h["review"];
        Ok(same.then_some(a))
    })?;
    assert_eq!(merged["entry"]["summary"], "户籍登记信息（含迁入迁出）");
    assert_eq!(
        merged["entry"]["related"],
        serde_json::json!(["101001/00002"])
    );
    assert_eq!(merged["review"]["remarks"], "请补充开放条件说明");
    assert_eq!(merged["review"]["reviewer"], "王复核");
    // The platform returned the entry after the department's last
    // resubmission, so it is back with the department.
    assert!(
        merged["review"]["reviewed_at"].as_i64() > merged["entry"]["submitted_at"].as_i64(),
        "{merged}"
    );
    assert_eq!(merged["state"], "returned", "{merged}");

    let audit = sb.hub.audit()?;
    assert_eq!(
        audit
            .iter()
            .filter(|a| a["kind"] == "catalog_reviewed")
            .count(),
        2
    );
    assert!(
        !audit.iter().any(|a| a["kind"] == "catalog_rejected"),
        "{audit:?}"
    );
    agent.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_fields_and_foreign_catalogs_are_refused_and_audited() -> Result<()> {
    let Nodes(sb, [], []) = Topology::new().start()?;
    let key = NodeKey::generate()?;
    sb.hub.enroll("MZ", "民政局", &key.id().to_string())?;
    let mut peer = CatalogPeer::connect(sb.hub.addr, &sb.hub.key, &key, "MZ").await?;

    // A department replica that approves its own entry.
    let mut rogue = CatalogDoc::new(&"MZ".parse()?, &key.id())?;
    let entry = CatalogEntry {
        code: CODE.into(),
        name: "婚姻登记".into(),
        provider_code: "MZ".into(),
        ..CatalogEntry::default()
    };
    rogue.put_entry(&entry)?;
    rogue.put_review(
        CODE,
        &Review {
            status: ReviewStatus::Approved,
            reviewer: "self".into(),
            remarks: String::new(),
            reviewed_at: UnixMillis::now(),
        },
    )?;
    let quiet = Duration::from_millis(700);
    let refusal = peer
        .converse(&mut rogue, "MZ", quiet)
        .await?
        .refusal
        .expect("the self-approval is refused");
    assert_eq!(refusal.reason, RejectReason::NotOwner);
    assert!(
        refusal
            .detail
            .contains("review fields belong to the platform"),
        "{}",
        refusal.detail
    );

    // Another department's catalog, on the same connection.
    let mut foreign = CatalogDoc::new(&"GA".parse()?, &key.id())?;
    foreign.put_entry(&CatalogEntry {
        code: CODE.into(),
        name: "x".into(),
        ..CatalogEntry::default()
    })?;
    peer.drain().await?;
    peer.reset();
    let refusal = peer
        .converse(&mut foreign, "GA", quiet)
        .await?
        .refusal
        .expect("the foreign catalog is refused");
    assert_eq!(refusal.reason, RejectReason::WrongDepartment);

    // An honest edit in the same session still lands.
    let mut honest = CatalogDoc::new(&"MZ".parse()?, &key.id())?;
    honest.put_entry(&entry)?;
    peer.drain().await?;
    peer.reset();
    let answer = peer.converse(&mut honest, "MZ", quiet).await?.refusal;
    assert!(answer.is_none(), "the honest edit is accepted: {answer:?}");
    let at_hub = wait_for(
        "the honest entry at the hub",
        Duration::from_secs(10),
        || hub_entry(&sb, "MZ"),
    )?;
    assert_eq!(at_hub["entry"]["name"], "婚姻登记");
    assert!(
        at_hub["review"].is_null(),
        "the self-approval was not applied: {at_hub}"
    );

    let audit = sb.hub.audit()?;
    let me = key.id().to_string();
    let rejected: Vec<&Json> = audit
        .iter()
        .filter(|a| a["kind"] == "catalog_rejected" && a["peer"] == me.as_str())
        .collect();
    assert_eq!(rejected.len(), 2, "{audit:?}");
    let reasons: Vec<u64> = rejected
        .iter()
        .filter_map(|a| a["reason"].as_u64())
        .collect();
    assert!(
        reasons.contains(&u64::from(RejectReason::NotOwner.code()))
            && reasons.contains(&u64::from(RejectReason::WrongDepartment.code())),
        "{reasons:?}"
    );
    Ok(())
}

#[test]
fn a_new_column_updates_the_data_items_and_starts_the_deadline_clock() -> Result<()> {
    let Nodes(sb, [], [mut agent]) = Topology::new().agent(department()).start()?;
    let conn = agent.database()?;
    complete_and_submit(&agent)?;
    wait_for("the submission at the hub", Duration::from_secs(20), || {
        Ok(hub_entry(&sb, "GA")?.filter(|e| e["state"] == "submitted"))
    })?;
    sb.hub
        .catalog(&["review", CODE, "--approve", "--reviewer", "李审核"])?;
    wait_for("the approval at the agent", Duration::from_secs(20), || {
        Ok(Some(agent_entry(&agent)?).filter(|e| e["state"] == "published"))
    })?;
    let none: Vec<Json> = serde_json::from_str(&sb.hub.catalog(&["deadlines", "--json"])?)?;
    assert!(none.is_empty(), "{none:?}");

    let before_change = shuyuan_tests::now_millis();
    conn.execute_batch("ALTER TABLE household ADD COLUMN email VARCHAR(64)")?;
    let changed = wait_for(
        "the new column in the agent's catalog",
        Duration::from_secs(20),
        || {
            let e = agent_entry(&agent)?;
            let has = e["entry"]["data_items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|x| x["name"] == "email" && x["length"] == 64));
            Ok(has.then_some(e))
        },
    )?;
    let at = changed["entry"]["resource_changed_at"]
        .as_i64()
        .expect("clock started");
    assert!(at >= before_change, "{changed}");
    assert_eq!(
        changed["state"], "draft",
        "the changed entry must be submitted again"
    );

    let findings = wait_for("the deadline at the hub", Duration::from_secs(20), || {
        let f: Vec<Json> = serde_json::from_str(&sb.hub.catalog(&["deadlines", "--json"])?)?;
        Ok((!f.is_empty()).then_some(f))
    })?;
    let f = &findings[0];
    assert_eq!(f["kind"], "publication_pending", "{f}");
    assert_eq!(f["waiting_for"], "department");
    assert_eq!(f["changed_at"].as_i64(), Some(at));
    let due = f["due"].as_i64().unwrap();
    // Two working days later, at the end of a local (UTC+8) day.
    assert!(
        due - at >= 2 * 86_400_000 && due - at <= 5 * 86_400_000,
        "{f}"
    );
    assert_eq!((due + 8 * 3_600_000) % 86_400_000, 0, "{f}");
    let text = sb.hub.catalog(&["deadlines"])?;
    assert!(
        text.contains("update to publish") && text.contains("waiting for the department"),
        "{text}"
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn a_form_with_a_bad_row_imports_nothing_and_a_good_one_imports_all() -> Result<()> {
    let Nodes(sb, [], [agent]) = Topology::new().agent(department()).build()?;
    // The agent is not running: the command edits the catalog file itself.
    let before = agent.catalog_view()?;
    let header = "信息资源代码,信息资源名称,信息资源分类,信息资源摘要,信息资源提供方,信息资源格式,共享类型,共享依据,共享方式,开放属性,更新周期";
    let good = "101001/00003,户籍迁移登记,基础信息资源,迁入迁出登记,定海区公安分局,电子文件,不予共享,《户口登记条例》,,不予开放,每月";
    let bad = "101001/00004,临时居住登记,基础信息资源,暂住登记,定海区公安分局,电子文件,随便共享,,传真,不予开放,每两天";
    let form = sb.dir.path().join("form.csv");
    std::fs::write(&form, format!("{header}\n{good}\n{bad}\n"))?;
    let out = agent.cli(&["catalog", "import", form.to_str().unwrap()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 2, column 共享类型") && err.contains("随便共享"),
        "{err}"
    );
    assert!(
        err.contains("row 2, column 共享方式") && err.contains("row 2, column 更新周期"),
        "{err}"
    );
    assert!(!err.contains("row 1"), "{err}");
    assert_eq!(agent.catalog_view()?, before, "nothing was imported");

    std::fs::write(&form, format!("{header}\n{good}\n"))?;
    let out = agent.catalog(&["import", form.to_str().unwrap()])?;
    assert!(out.contains("1 entries imported"), "{out}");
    let view = agent.catalog_view()?;
    let imported = view["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entry"]["code"] == "101001/00003")
        .expect("imported");
    assert_eq!(imported["entry"]["share_type"], "not-shared");
    assert!(
        imported["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["field"] == "data_items"),
        "only the data items remain: {imported}"
    );

    // TOML export and import round trip.
    let toml_path = sb.dir.path().join("catalog.toml");
    agent.catalog(&[
        "export",
        "--format",
        "toml",
        "-o",
        toml_path.to_str().unwrap(),
    ])?;
    let text = std::fs::read_to_string(&toml_path)?;
    assert!(
        text.contains("[[entry]]") && text.contains("code = \"101001/00003\""),
        "{text}"
    );
    agent.catalog(&["import", toml_path.to_str().unwrap()])?;
    let csv = agent.catalog(&["export", "--format", "csv"])?;
    assert!(
        csv.starts_with("信息资源代码,信息资源名称,信息资源分类"),
        "{csv}"
    );
    assert!(
        csv.contains("101001/00003,户籍迁移登记,基础信息资源"),
        "{csv}"
    );
    Ok(())
}

#[test]
fn the_catalogs_update_cycle_drives_zero_updates_and_freshness() -> Result<()> {
    let Nodes(sb, [], [mut agent]) = Topology::new()
        .hub_config("[freshness]\ngrace = \"1s\"\n")
        .agent(department())
        .start()?;
    // The config says daily; the department declares a 2-second cycle in
    // its catalog (a test cycle; national cycles are required only to
    // submit). The catalog's cycle is in force.
    agent.catalog(&["set", CODE, "update_cycle", "2s"])?;
    let status = wait_for(
        "the catalog's cycle in force",
        Duration::from_secs(10),
        || {
            let s = agent.status()?;
            let r = &s["resources"][0];
            Ok((r["update_cycle_source"] == "catalog" && r["update_cycle"] == "2s").then_some(s))
        },
    )?;
    assert_eq!(status["resources"][0]["heartbeat_secs"], 2);
    let feed = wait_for(
        "zero-updates every 2 s at the hub",
        Duration::from_secs(20),
        || {
            let f = sb.hub.feed_status("GA:101001/00001")?;
            Ok(f.filter(|f| f["last_zero_update"]["seq"].as_u64() >= Some(3)))
        },
    )?;
    assert_eq!(feed["update_cycle"], "2s");
    assert_eq!(feed["freshness"], "zero_updated", "{feed}");
    // Without its agent, the resource becomes overdue after 2 s + 1 s.
    agent.stop()?;
    let overdue = wait_for(
        "the resource to be overdue",
        Duration::from_secs(15),
        || {
            Ok(sb
                .hub
                .feed_status("GA:101001/00001")?
                .filter(|f| f["freshness"] == "overdue"))
        },
    )?;
    assert!(overdue["fresh_until"].as_i64() < Some(shuyuan_tests::now_millis()));
    Ok(())
}
