//! `shuyuan-hub`: the command line of the hub.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use shuyuan_hub::apply::audit::AuditEntry;
use shuyuan_hub::apply::audit::{self, ChainReport};
use shuyuan_hub::apply::keys::Revocation;
use shuyuan_hub::catalog::{CityEntry, Filter, Finding, FindingKind, HubCatalog, WaitingFor};
use shuyuan_hub::config::Config;
use shuyuan_hub::export::{self, Format};
use shuyuan_hub::status::{self, HubStatus, LiveFacts, render_audit};
use shuyuan_hub::store::redb::RedbEngine;
use shuyuan_hub::store::{Engine, StoreError};
use shuyuan_hub::writer::Store;
use shuyuan_hub::{ControlRequest, Hub, ReviewRequest, VerifyStarted, enrollment};
use shuyuan_protocol::NodeId;
use shuyuan_protocol::UnixMillis;
use shuyuan_protocol::catalog::form;
use shuyuan_service::config::write_template_if_missing;
use shuyuan_service::control::{self, ControlError};
use shuyuan_service::shutdown_signal;

/// The example configuration written by `init` when none exists.
const CONFIG_TEMPLATE: &str = include_str!("../../deploy/hub.toml");

#[derive(Debug, Parser)]
#[command(
    name = "shuyuan-hub",
    version,
    about = "shuyuan (数源) hub: verifies, applies and acknowledges departments' signed change feeds"
)]
struct Cli {
    /// The hub's configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "SHUYUAN_HUB_CONFIG",
        default_value = "/etc/shuyuan/hub.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the hub's key (and an example config if none exists) and print the public key agents must pin.
    Init {
        /// Print only the public key (for scripts).
        #[arg(long)]
        key_only: bool,
    },
    /// Run the hub until SIGTERM or Ctrl-C.
    Run,
    /// Make a named administrator's console account: reads the password (12 characters or more) from standard input and prints the line to put under `[admin.accounts]`.
    AdminPassword {
        /// The administrator's name, shown as the reviewer of what they review (for example zhang.wei).
        name: String,
    },
    /// Allow an agent's key to connect and write the feeds of one department, or (with --hub) a child hub's key to forward its departments' feeds (级联).
    Enroll {
        /// The department code (部门代码) the key may write for.
        #[arg(long, required_unless_present = "hub", conflicts_with = "hub")]
        department: Option<String>,
        /// Enroll a child hub (a district or county platform) by its platform code, for example its administrative division code.
        #[arg(long, value_name = "PLATFORM_CODE")]
        hub: Option<String>,
        /// The department's name (部门名称), or the child platform's.
        #[arg(long)]
        name: String,
        /// The public key, as printed by `shuyuan-agent init` or `shuyuan-hub init`.
        key: String,
    },
    /// Withdraw a key (吊销密钥): its open connections are closed, it can no longer connect, and
    /// batches it signed are refused; its data stays. A revoked key is never enrolled again.
    Revoke {
        /// The public key to revoke.
        key: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Show each department's agents and resources: last sequence, last change, last zero-update (零更新), connection, rejections.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the shared copy of one resource, in key order.
    Export {
        /// The resource code, or DEPARTMENT:RESOURCE.
        resource: String,
        /// The department, when several have a resource with this code.
        #[arg(long)]
        department: Option<String>,
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Show the audit log (rejections, refused keys, enrollments, reviews), newest first;
    /// `audit verify` proves it unaltered.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        check: Option<AuditCheck>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Prove the shared copy equals the source (一致性核验): compare it with the department's table range by range through the agent, repair the rows that differ, and show the result.
    Verify {
        /// The resource code, or DEPARTMENT:RESOURCE; every resource when left out.
        resource: Option<String>,
        /// Only this department's resources.
        #[arg(long)]
        department: Option<String>,
        /// Start the runs and return; `status` shows how they end.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the runs go on).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The city data resource catalog (数据资源目录): every department's entries, merged; review; deadlines.
    Catalog {
        #[command(subcommand)]
        action: CatalogAction,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCheck {
    /// Prove the audit log unaltered (审计日志完整性): check every entry against its hash
    /// chain link and name the first broken one; exits non-zero unless intact.
    Verify {
        /// A head printed by an earlier `audit verify`: also prove the log still contains it
        /// (catches a rewritten or cut tail).
        #[arg(long)]
        head: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CatalogAction {
    /// List entries, one per line.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one entry with its review and what it still lacks.
    Show {
        code: String,
        #[arg(long)]
        department: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Approve an entry (审核通过) or return it for changes (退回修改); the verdict syncs to the department.
    Review {
        code: String,
        #[arg(long)]
        department: Option<String>,
        /// Approve the entry.
        #[arg(long, conflicts_with = "return_", required_unless_present = "return_")]
        approve: bool,
        /// Return the entry to the department for changes (needs --remarks).
        #[arg(long = "return")]
        return_: bool,
        /// Who reviews (审核人).
        #[arg(long)]
        reviewer: String,
        /// Remarks (审核意见).
        #[arg(long, default_value = "")]
        remarks: String,
    },
    /// Write the merged city catalog as JSON or CSV (the national form's columns plus department, state and review).
    Export {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, value_enum, default_value = "json")]
        format: CatalogFormat,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Entries whose table changed and whose update is not yet published (pending or overdue by the working-day
    /// deadline), and published entries whose last review is more than a year old.
    Deadlines {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CatalogFormat {
    Json,
    Csv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(logs)
        .with_writer(std::io::stderr)
        .init();
    match tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = || Config::load(&cli.config);
    match cli.command {
        Command::Init { key_only } => init(&cli.config, key_only),
        Command::AdminPassword { name } => {
            shuyuan_hub::admin::accounts::check_name(&name)
                .map_err(|e| anyhow!("{name:?}: {e}"))?;
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.chars().count() < 12 {
                bail!("the console password must be at least 12 characters");
            }
            let hash =
                shuyuan_hub::admin::accounts::hash_password(password).map_err(|e| anyhow!(e))?;
            // A TOML line: a quoted key, since names may hold dots.
            println!("{} = \"{hash}\"", toml_key(&name));
            Ok(())
        }
        Command::Run => {
            let hub = Hub::bind(config()?).await?;
            wait_for_signal().await?;
            hub.shutdown().await;
            Ok(())
        }
        Command::Revoke { key, reason } => revoke(&config()?, key, reason).await,
        Command::Enroll {
            department,
            hub,
            name,
            key,
        } => {
            let config = config()?;
            let is_hub = hub.is_some();
            let department = hub.or(department).unwrap_or_default();
            let request = ControlRequest::Enroll {
                department: department.clone(),
                name: name.clone(),
                key: key.clone(),
                hub: is_hub,
            };
            let mut out = Vec::new();
            let new = match control::call(&config.control_socket(), &request, &mut out).await {
                Ok(()) => {
                    let v: serde_json::Value = serde_json::from_slice(&out)?;
                    v["new"].as_bool().unwrap_or(false)
                }
                Err(ControlError::NotRunning { .. }) => {
                    let (key, enrollment) =
                        enrollment(&department, &name, &key, is_hub).map_err(|e| anyhow!(e))?;
                    let engine = open_offline(&config)?;
                    let (store, writer) = Store::start(engine)?;
                    let result = store.enroll(key, enrollment).await;
                    store.close().await;
                    tokio::task::spawn_blocking(move || writer.join()).await?;
                    result?
                }
                Err(e) => return Err(e.into()),
            };
            println!(
                "{} {} {key} for {} {department} ({name})",
                if new {
                    "enrolled"
                } else {
                    "already enrolled; name updated:"
                },
                if is_hub { "child hub key" } else { "key" },
                if is_hub { "platform" } else { "department" }
            );
            Ok(())
        }
        Command::Status { json } => {
            let config = config()?;
            let status = match running_status(&config).await? {
                Some(status) => status,
                None => {
                    let engine = open_offline(&config)?;
                    let node = shuyuan_service::keyfile::load(&config.key_file)
                        .map(|k| k.id().to_string())
                        .unwrap_or_else(|_| "(no key)".into());
                    let key = shuyuan_service::keyfile::load(&config.key_file)
                        .map(|k| k.id())
                        .ok();
                    let city = match key {
                        Some(k) => shuyuan_hub::catalog::city_from_store(&*engine, &k)?,
                        None => Vec::new(),
                    };
                    let facts = LiveFacts::default().with_catalog(&city, config.freshness_grace);
                    engine.read(|t| status::collect(t, &config.name, node, false, facts))?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Export {
            resource,
            department,
            format,
            output,
        } => {
            let config = config()?;
            let mut sink: Box<dyn Write + Send> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            let request = ControlRequest::Export {
                resource: resource.clone(),
                department: department.clone(),
                format,
            };
            match control::call(&config.control_socket(), &request, &mut *sink).await {
                Ok(()) => {}
                Err(ControlError::NotRunning { .. }) => {
                    open_offline(&config)?.read(|t| {
                        let feed = export::resolve(t, &resource, department.as_deref())?;
                        export::export(t, &feed, format, &mut *sink)
                    })?;
                }
                Err(e) => return Err(e.into()),
            }
            sink.flush()?;
            Ok(())
        }
        Command::Catalog { action } => catalog(&config()?, action).await,
        Command::Verify {
            resource,
            department,
            no_wait,
            timeout,
            json,
        } => {
            verify(
                &config()?,
                resource,
                department,
                (!no_wait).then(|| std::time::Duration::from_secs(timeout)),
                json,
            )
            .await
        }
        Command::Audit {
            check: Some(AuditCheck::Verify { head, json }),
            ..
        } => audit_verify(&config()?, head, json).await,
        Command::Audit {
            check: None,
            limit,
            json,
        } => {
            let config = config()?;
            let mut out = Vec::new();
            let entries: Vec<AuditEntry> = match control::call(
                &config.control_socket(),
                &ControlRequest::Audit { limit },
                &mut out,
            )
            .await
            {
                Ok(()) => serde_json::from_slice(&out).context("bad audit log from the hub")?,
                Err(ControlError::NotRunning { .. }) => {
                    open_offline(&config)?.read(|t| audit::recent(t, limit))?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    println!("{}", render_audit(e));
                }
            }
            Ok(())
        }
    }
}

/// Revokes a key at the running hub (closing its connections), or in the
/// store file when the hub is stopped.
async fn revoke(config: &Config, key: String, reason: String) -> Result<()> {
    let request = ControlRequest::Revoke {
        key: key.clone(),
        reason: reason.clone(),
    };
    let mut out = Vec::new();
    let revocation: Revocation =
        match control::call(&config.control_socket(), &request, &mut out).await {
            Ok(()) => serde_json::from_slice(&out).context("bad answer from the hub")?,
            Err(ControlError::NotRunning { .. }) => {
                let id: NodeId = key.parse()?;
                let (store, writer) = Store::start(open_offline(config)?)?;
                let result = store.revoke(id, reason).await;
                store.close().await;
                tokio::task::spawn_blocking(move || writer.join()).await?;
                result?
            }
            Err(e) => return Err(e.into()),
        };
    let e = &revocation.enrollment;
    println!(
        "revoked {key} of {} {} ({}): it can no longer connect, and batches it signed are refused",
        if e.is_hub() { "platform" } else { "department" },
        e.department,
        e.name
    );
    Ok(())
}

/// Checks the audit log's hash chain at the running hub, or in the store
/// file when the hub is stopped; fails unless it is intact.
async fn audit_verify(config: &Config, head: Option<String>, json: bool) -> Result<()> {
    let mut out = Vec::new();
    let report: ChainReport = match control::call(
        &config.control_socket(),
        &ControlRequest::AuditVerify { head: head.clone() },
        &mut out,
    )
    .await
    {
        Ok(()) => serde_json::from_slice(&out).context("bad audit chain report from the hub")?,
        Err(ControlError::NotRunning { .. }) => {
            let head = head
                .as_deref()
                .map(audit::chain::parse_head)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            open_offline(config)?.read(|t| audit::verify(t, head))?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.render());
    }
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}

/// Starts verification runs at the running hub and waits for them to end.
async fn verify(
    config: &Config,
    resource: Option<String>,
    department: Option<String>,
    wait: Option<std::time::Duration>,
    json: bool,
) -> Result<()> {
    let socket = config.control_socket();
    let mut out = Vec::new();
    match control::call(
        &socket,
        &ControlRequest::Verify {
            resource,
            department,
        },
        &mut out,
    )
    .await
    {
        Ok(()) => {}
        Err(ControlError::NotRunning { .. }) => bail!(
            "the hub is not running; verification compares the copy with the source through the agents' connections, so start it with `shuyuan-hub run`"
        ),
        Err(e) => return Err(e.into()),
    }
    let started: Vec<VerifyStarted> =
        serde_json::from_slice(&out).context("bad answer from the hub")?;
    let mut failed = false;
    for s in &started {
        match &s.run {
            Ok(run) => eprintln!("{}: verification run {run} started", s.feed),
            Err(why) => {
                eprintln!("{}: {why}", s.feed);
                failed = true;
            }
        }
    }
    let Some(wait) = wait else {
        return if failed {
            bail!("not every resource could be verified")
        } else {
            Ok(())
        };
    };
    let deadline = std::time::Instant::now() + wait;
    let ended = loop {
        let mut out = Vec::new();
        control::call(&socket, &ControlRequest::Status, &mut out).await?;
        let status: HubStatus = serde_json::from_slice(&out).context("bad status from the hub")?;
        let resources: Vec<&status::ResourceEntry> = status
            .departments
            .iter()
            .flat_map(|d| &d.resources)
            .collect();
        let mut ended = Vec::new();
        let mut waiting = false;
        for s in &started {
            let Ok(run) = s.run else { continue };
            let last = resources
                .iter()
                .find(|r| r.feed == s.feed)
                .and_then(|r| r.verification.as_ref())
                .and_then(|v| v.last_run.as_ref())
                .filter(|r| r.id == run);
            match last {
                Some(r) => ended.push((s.feed.clone(), r.clone())),
                None => waiting = true,
            }
        }
        if !waiting {
            break ended;
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "still verifying after {} s (is the department's agent connected?); the runs go on, `shuyuan-hub status` shows how they end",
                wait.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    if json {
        let runs: Vec<serde_json::Value> = ended
            .iter()
            .map(|(feed, run)| serde_json::json!({ "feed": feed, "run": run }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&runs)?);
    }
    for (feed, run) in &ended {
        let end = run.finished.as_ref();
        let verified = end.is_some_and(|e| e.verified);
        failed |= !verified;
        if json {
            continue;
        }
        println!(
            "{feed}: {} at seq #{} — {}",
            match (verified, run.ranges_differing) {
                _ if end.is_some_and(|e| e.refused) => "NOT VERIFIABLE",
                (true, 0) => "VERIFIED",
                (true, _) => "REPAIRED and verified",
                (false, _) => "DIVERGED",
            },
            end.map_or(0, |e| e.seq),
            end.map_or("", |e| e.detail.as_str())
        );
        println!(
            "    {} ranges compared, {} differed; {} rows rewritten, {} removed; {} bytes exchanged; took {} ms",
            run.ranges_compared,
            run.ranges_differing,
            run.rows_repaired,
            run.rows_removed,
            run.bytes_received + run.bytes_sent,
            end.map_or(0, |e| e.at.0 - run.started_at.0)
        );
        if !run.keys.is_empty() {
            println!("    keys: {}", run.keys.join("; "));
        }
    }
    if failed {
        bail!("not every resource was verified");
    }
    Ok(())
}

/// Runs a catalog command through the running hub, or on the store when the
/// hub is not running.
async fn catalog(config: &Config, action: CatalogAction) -> Result<()> {
    let request = match &action {
        CatalogAction::List { filter, .. } | CatalogAction::Export { filter, .. } => {
            ControlRequest::CatalogList {
                filter: filter.clone(),
            }
        }
        CatalogAction::Show { .. } => ControlRequest::CatalogList {
            filter: Filter::default(),
        },
        CatalogAction::Review {
            code,
            department,
            approve,
            reviewer,
            remarks,
            ..
        } => ControlRequest::CatalogReview(ReviewRequest {
            department: department.clone(),
            code: code.clone(),
            approve: *approve,
            reviewer: reviewer.clone(),
            remarks: remarks.clone(),
        }),
        CatalogAction::Deadlines { .. } => ControlRequest::CatalogDeadlines,
    };
    let mut out = Vec::new();
    let answer: serde_json::Value =
        match control::call(&config.control_socket(), &request, &mut out).await {
            Ok(()) => serde_json::from_slice(&out)?,
            Err(ControlError::NotRunning { .. }) => offline_catalog(config, request).await?,
            Err(e) => return Err(e.into()),
        };
    match action {
        CatalogAction::List { json, .. } => {
            let list: Vec<CityEntry> = serde_json::from_value(answer)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for e in &list {
                    println!(
                        "{:<12} {:<16} {:<10} {:<10} {:<12} {:<10} {}",
                        e.department,
                        e.entry.code,
                        e.state.english(),
                        e.entry.resource_class.map_or("-", |c| c.english()),
                        e.entry.share_type.map_or("-", |t| t.english()),
                        e.entry
                            .update_cycle
                            .map_or_else(|| "-".to_string(), |c| c.to_string()),
                        e.entry.name
                    );
                }
                println!("{} entries", list.len());
            }
        }
        CatalogAction::Show {
            code,
            department,
            json,
        } => {
            let list: Vec<CityEntry> = serde_json::from_value(answer)?;
            let e = shuyuan_hub::catalog::pick(&list, &code, department.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(e)?);
            } else {
                println!(
                    "{}  {}  department {}  [{} {}]",
                    e.entry.code,
                    e.entry.name,
                    e.department,
                    e.state.english(),
                    e.state.chinese()
                );
                for (field, label) in shuyuan_protocol::catalog::FIELDS.iter().skip(1) {
                    let text = form::field_text(&e.entry, field);
                    if !text.is_empty() {
                        println!("  {label} ({field}): {text}");
                    }
                }
                if let Some(r) = &e.review {
                    println!(
                        "  review (审核): {} {} by {} at {} {}",
                        r.status.english(),
                        r.status.chinese(),
                        r.reviewer,
                        r.reviewed_at,
                        r.remarks
                    );
                }
                for p in &e.problems {
                    println!("  missing: {p}");
                }
            }
        }
        CatalogAction::Review { code, approve, .. } => {
            let review: shuyuan_protocol::catalog::Review = serde_json::from_value(answer)?;
            println!(
                "{code}: {} ({}) by {}; the department receives the verdict with its next catalog sync",
                if approve { "approved" } else { "returned" },
                review.status.chinese(),
                review.reviewer
            );
        }
        CatalogAction::Export { format, output, .. } => {
            let list: Vec<CityEntry> = serde_json::from_value(answer)?;
            let bytes = match format {
                CatalogFormat::Json => serde_json::to_vec_pretty(&list)?,
                CatalogFormat::Csv => {
                    let entries: Vec<_> = list.iter().map(|e| e.entry.clone()).collect();
                    let extra = [
                        (
                            "部门代码",
                            list.iter().map(|e| e.department.clone()).collect(),
                        ),
                        (
                            "目录状态",
                            list.iter().map(|e| e.state.chinese().to_string()).collect(),
                        ),
                        (
                            "审核意见",
                            list.iter()
                                .map(|e| {
                                    e.review
                                        .as_ref()
                                        .map(|r| r.remarks.clone())
                                        .unwrap_or_default()
                                })
                                .collect(),
                        ),
                        (
                            "发布日期",
                            list.iter()
                                .map(|e| match (&e.review, e.state) {
                                    (Some(r), shuyuan_protocol::catalog::EntryState::Published) => {
                                        r.reviewed_at.to_string()[..10].to_string()
                                    }
                                    _ => String::new(),
                                })
                                .collect(),
                        ),
                    ];
                    let mut bytes = Vec::new();
                    form::write_csv(&entries, &extra, &mut bytes)?;
                    bytes
                }
            };
            match output {
                Some(p) => std::fs::write(&p, bytes)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => std::io::stdout().write_all(&bytes)?,
            }
        }
        CatalogAction::Deadlines { json } => {
            let list: Vec<Finding> = serde_json::from_value(answer)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for f in &list {
                    let what = match f.kind {
                        FindingKind::PublicationPending => "update to publish",
                        FindingKind::PublicationOverdue => "OVERDUE update",
                        FindingKind::AnnualReviewDue => "yearly review due",
                    };
                    let who = match f.waiting_for {
                        Some(WaitingFor::Department) => "waiting for the department",
                        Some(WaitingFor::Platform) => "waiting for the platform's review",
                        None => "",
                    };
                    println!(
                        "{:<12} {:<16} {what}{}{}; {who}  ({})",
                        f.department,
                        f.code,
                        f.changed_at
                            .map(|t| format!("; table changed {t}"))
                            .unwrap_or_default(),
                        f.due.map(|t| format!("; due {t}")).unwrap_or_default(),
                        f.name
                    );
                }
                println!("{} findings", list.len());
            }
        }
    }
    Ok(())
}

async fn offline_catalog(config: &Config, request: ControlRequest) -> Result<serde_json::Value> {
    let engine = open_offline(config)?;
    let node = shuyuan_service::keyfile::load(&config.key_file)
        .context("the catalog is written under the hub's key")?
        .id();
    let city = shuyuan_hub::catalog::city_from_store(&*engine, &node)?;
    Ok(match request {
        ControlRequest::CatalogList { filter } => {
            filter.validate().map_err(|e| anyhow!(e))?;
            serde_json::to_value(
                city.into_iter()
                    .filter(|e| filter.matches(e))
                    .collect::<Vec<_>>(),
            )?
        }
        ControlRequest::CatalogReview(request) => {
            let (store, writer) = Store::start(engine)?;
            let catalog = HubCatalog::new(node, store.clone());
            let result = shuyuan_hub::review(
                &catalog,
                &store,
                &city,
                &request,
                shuyuan_hub::control::Vouched::Stated,
            )
            .await;
            store.close().await;
            tokio::task::spawn_blocking(move || writer.join()).await?;
            serde_json::to_value(result.map_err(|e| anyhow!(e))?)?
        }
        ControlRequest::CatalogDeadlines => serde_json::to_value(shuyuan_hub::catalog::findings(
            &city,
            UnixMillis::now(),
            config.publication_deadline_days,
            &config.calendar,
        ))?,
        other => bail!("{other:?} is not a catalog request"),
    })
}

/// The running hub's status, or `None` when it is not running. With the
/// admin console on, it comes from the JSON API (`/api/v1/status`, the data
/// the console shows), authorised by the token the hub wrote at start;
/// otherwise from the control socket.
async fn running_status(config: &Config) -> Result<Option<HubStatus>> {
    let Some(admin) = &config.admin else {
        let mut out = Vec::new();
        return match control::call(&config.control_socket(), &ControlRequest::Status, &mut out)
            .await
        {
            Ok(()) => Ok(Some(
                serde_json::from_slice(&out).context("bad status from the hub")?,
            )),
            Err(ControlError::NotRunning { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        };
    };
    let token_file = config.local_token_file();
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(anyhow!(
                "cannot read the hub's local API token {}: {e}",
                token_file.display()
            ));
        }
    };
    let mut addr = std::fs::read_to_string(config.admin_addr_file())
        .ok()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(admin.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/api/v1/status");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let response = match client.get(&url).bearer_auth(token.trim()).send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Ok(None),
        Err(e) => return Err(anyhow!("cannot ask the hub at {url}: {e}")),
    };
    if !response.status().is_success() {
        let code = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("the hub's admin API answered {code} for {url}: {body}");
    }
    Ok(Some(
        response
            .json()
            .await
            .with_context(|| format!("bad status from {url}"))?,
    ))
}

/// The store of a hub that is not running.
fn open_offline(config: &Config) -> Result<Arc<dyn Engine>> {
    match RedbEngine::open(&config.store_path()) {
        Ok(e) => Ok(Arc::new(e)),
        Err(StoreError::AlreadyOpen(p)) => {
            bail!(
                "{} is held by a running hub whose control socket does not answer",
                p.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

fn init(config_path: &Path, key_only: bool) -> Result<()> {
    let wrote_config = write_template_if_missing(config_path, CONFIG_TEMPLATE)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::load(config_path)?;
    let (key, created) = shuyuan_service::keyfile::load_or_create(&config.key_file)?;
    shuyuan_service::owner_only::create_dir(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    if key_only {
        println!("{}", key.id());
        return Ok(());
    }
    if wrote_config {
        println!("wrote an example config to {}", config_path.display());
    }
    println!(
        "{} key {}",
        if created { "created" } else { "existing" },
        config.key_file.display()
    );
    println!("hub public key (平台公钥): {}", key.id());
    println!("put it in every agent's config:");
    println!(
        "  [hub]\n  address = \"<this host>:{}\"\n  key = \"{}\"",
        config.listen.port(),
        key.id()
    );
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let which = shutdown_signal().await?;
    tracing::info!("{which} received, stopping");
    Ok(())
}

/// `name` as a quoted TOML key.
fn toml_key(name: &str) -> String {
    let mut out = String::from("\"");
    for c in name.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn template_is_a_valid_config() {
        Config::parse(Path::new("deploy/hub.toml"), CONFIG_TEMPLATE).unwrap();
    }
}
