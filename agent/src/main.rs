//! `shuyuan-agent`: the command line of the department agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use shuyuan_agent::catalog::{Catalog, CatalogView};
use shuyuan_agent::config::{Config, SourceConfig};
use shuyuan_agent::source::pg::setup as pg_setup;
use shuyuan_agent::source::sqlite::{InstallOutcome, install_triggers, uninstall_triggers};
use shuyuan_agent::status::{self, AgentStatus};
use shuyuan_agent::{Agent, ControlRequest};
use shuyuan_protocol::UnixMillis;
use shuyuan_protocol::catalog::CatalogEntry;
use shuyuan_protocol::catalog::form;
use shuyuan_service::config::write_template_if_missing;
use shuyuan_service::control::{self, ControlError};
use shuyuan_service::shutdown_signal;

/// The example configuration written by `init` when none exists.
const CONFIG_TEMPLATE: &str = include_str!("../../deploy/agent.toml");

#[derive(Debug, Parser)]
#[command(
    name = "shuyuan-agent",
    version,
    about = "shuyuan (数源) department agent: captures a department database's changes and pushes signed feeds to the hub"
)]
struct Cli {
    /// The agent's configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "SHUYUAN_AGENT_CONFIG",
        default_value = "/etc/shuyuan/agent.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the agent's key (and an example config if none exists), and print the public key to enroll at the hub.
    Init {
        /// Print only the public key (for scripts).
        #[arg(long)]
        key_only: bool,
    },
    /// Run the agent: capture, seal, buffer and push changes until SIGTERM or Ctrl-C.
    Run,
    /// Replace the agent's key (密钥轮换): create the next key and announce it signed by the
    /// current one; the agent announces it when it (re)starts and switches once the hub confirms.
    RotateKey,
    /// Show the live state: hub link, outbox depth, last ack, next zero-update (零更新) per resource.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Install or remove the capture triggers in the department's SQLite database.
    Triggers {
        #[command(subcommand)]
        action: TriggerAction,
    },
    /// PostgreSQL capture set-up: the publication and the logical replication slot.
    Pg {
        #[command(subcommand)]
        action: PgAction,
    },
    /// Re-read one resource from the source while capture goes on (PostgreSQL; no locks are taken), with a progress bar.
    Resync {
        /// The resource code, as in the config.
        resource: String,
        /// Return once the agent has started the re-read.
        #[arg(long)]
        no_wait: bool,
    },
    /// Compare one resource's table with the hub's copy (一致性核验): a throttled scan of the source, range by range; the hub localises and repairs any difference. Waits for the hub's verdict.
    Verify {
        /// The resource code, as in the config.
        resource: String,
        /// Return once the scan has started.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the comparison goes on).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The department's data resource catalog (数据资源目录): show, edit, import and export entries.
    Catalog {
        #[command(subcommand)]
        action: CatalogAction,
    },
}

#[derive(Debug, Subcommand)]
enum CatalogAction {
    /// Show every entry with its state, the platform's review, and what is missing before it can be submitted.
    Show {
        /// Only this entry.
        code: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set one field of an entry (a new code creates an entry). FIELD is an English key or the form's Chinese header,
    /// e.g. summary, share_type (共享类型), status (submitted to submit for review).
    Set {
        code: String,
        field: String,
        value: String,
    },
    /// Import a filled-in form (.csv with the Chinese headers, or .toml); nothing is imported unless every row is valid.
    Import { file: PathBuf },
    /// Export the catalog as the fill-in form.
    Export {
        #[arg(long, value_enum, default_value = "csv")]
        format: FormFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormFormat {
    Csv,
    Toml,
}

#[derive(Debug, Subcommand)]
enum PgAction {
    /// Create the publication of the configured tables and the replication slot (idempotent).
    Setup {
        /// Print the SQL for a DBA instead of running it (with a least-privilege role).
        #[arg(long)]
        print_sql: bool,
    },
    /// Drop the slot and the publication (the server then stops keeping WAL for the agent).
    Drop,
}

#[derive(Debug, Subcommand)]
enum TriggerAction {
    /// Create the change table and triggers for every configured resource, and queue the rows already there (idempotent).
    Install,
    /// Remove the triggers (and the change table once no table is captured).
    Uninstall {
        /// Drop captured changes that were not yet sealed into the outbox.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(logs)
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { key_only } => init(&cli.config, key_only),
        Command::RotateKey => {
            let config = Config::load(&cli.config)?;
            let body = shuyuan_agent::rotation::begin(&config)?;
            println!(
                "next key {} created to replace {} (密钥轮换); restart the agent to announce it: \
                 it signs new batches with the next key from then on and switches to it once the hub confirms",
                body.new, body.old
            );
            Ok(())
        }
        Command::Run => {
            let config = Config::load(&cli.config)?;
            tokio::runtime::Runtime::new()?.block_on(serve(config))
        }
        Command::Status { json } => {
            let config = Config::load(&cli.config)?;
            let status = tokio::runtime::Runtime::new()?.block_on(live_status(&config))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Catalog { action } => {
            let config = Config::load(&cli.config)?;
            tokio::runtime::Runtime::new()?.block_on(catalog(&config, action))
        }
        Command::Pg { action } => {
            let config = Config::load(&cli.config)?;
            let rt = tokio::runtime::Runtime::new()?;
            let done = match action {
                PgAction::Setup { print_sql: true } => {
                    print!("{}", pg_setup::setup_sql(&config)?);
                    return Ok(());
                }
                PgAction::Setup { print_sql: false } => rt.block_on(pg_setup::setup(&config))?,
                PgAction::Drop => rt.block_on(pg_setup::drop(&config))?,
            };
            for line in done {
                println!("{line}");
            }
            Ok(())
        }
        Command::Verify {
            resource,
            no_wait,
            timeout,
        } => {
            let config = Config::load(&cli.config)?;
            tokio::runtime::Runtime::new()?.block_on(verify(
                &config,
                &resource,
                (!no_wait).then(|| std::time::Duration::from_secs(timeout)),
            ))
        }
        Command::Resync { resource, no_wait } => {
            let config = Config::load(&cli.config)?;
            tokio::runtime::Runtime::new()?.block_on(resync(&config, &resource, no_wait))
        }
        Command::Triggers { action } => {
            let config = Config::load(&cli.config)?;
            let SourceConfig::Sqlite {
                path, busy_timeout, ..
            } = &config.source
            else {
                bail!(
                    "{}: triggers are for SQLite sources; PostgreSQL is captured from the log (see `shuyuan-agent pg setup`)",
                    cli.config.display()
                );
            };
            match action {
                TriggerAction::Install => {
                    let report = install_triggers(path, *busy_timeout, &config.resources)?;
                    println!("{}: journal mode {}", path.display(), report.journal_mode);
                    for t in report.tables {
                        let (code, table) = (t.resource, t.table);
                        match t.outcome {
                            InstallOutcome::Installed { existing_rows } => println!(
                                "{code} (table {table}): triggers installed; {existing_rows} existing rows queued for the hub"
                            ),
                            InstallOutcome::Reinstalled { existing_rows } => println!(
                                "{code} (table {table}): triggers replaced for the new key; {existing_rows} rows queued again"
                            ),
                            InstallOutcome::AlreadyInstalled => {
                                println!("{code} (table {table}): triggers already installed")
                            }
                        }
                    }
                }
                TriggerAction::Uninstall { force } => {
                    for table in uninstall_triggers(path, *busy_timeout, &config.resources, force)?
                    {
                        println!("table {table}: capture triggers removed");
                    }
                }
            }
            Ok(())
        }
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
        println!(
            "wrote an example config to {}; edit it (department, hub address and key, source, resources)",
            config_path.display()
        );
    }
    println!(
        "{} key {}",
        if created { "created" } else { "existing" },
        config.key_file.display()
    );
    println!("agent public key (节点公钥): {}", key.id());
    println!("ask the hub administrator to enroll it:");
    println!(
        "  shuyuan-hub enroll --department {} --name \"<department name>\" {}",
        config.department,
        key.id()
    );
    Ok(())
}

async fn serve(config: Config) -> Result<()> {
    let agent = Agent::start(config).await?;
    wait_for_signal().await?;
    agent.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let which = shutdown_signal().await?;
    tracing::info!("{which} received, stopping");
    Ok(())
}

/// Runs a catalog command through the running agent, or on the catalog file
/// when the agent is not running.
async fn catalog(config: &Config, action: CatalogAction) -> Result<()> {
    let request = match &action {
        CatalogAction::Show { .. } | CatalogAction::Export { .. } => ControlRequest::CatalogShow,
        CatalogAction::Set { code, field, value } => ControlRequest::CatalogSet {
            code: code.clone(),
            field: field.clone(),
            value: value.clone(),
        },
        CatalogAction::Import { file } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let entries = if file.extension().is_some_and(|e| e == "toml") {
                form::read_toml(&String::from_utf8_lossy(&bytes))
            } else {
                form::read_csv(&bytes)
            }
            .with_context(|| format!("{}", file.display()))?;
            ControlRequest::CatalogImport { entries }
        }
    };
    let mut out = Vec::new();
    let answer: serde_json::Value =
        match control::call(&config.control_socket(), &request, &mut out).await {
            Ok(()) => serde_json::from_slice(&out)?,
            Err(ControlError::NotRunning { .. }) => offline_catalog(config, request)?,
            Err(e) => return Err(e.into()),
        };
    match action {
        CatalogAction::Show { code, json } => {
            let mut view: CatalogView = serde_json::from_value(answer)?;
            if let Some(code) = &code {
                view.entries.retain(|v| &v.entry.code == code);
                if view.entries.is_empty() {
                    bail!("no catalog entry {code}");
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", view.render());
            }
        }
        CatalogAction::Set { code, field, .. } => {
            let entry: CatalogEntry = serde_json::from_value(answer)?;
            println!(
                "{code}: {field} set; status {}",
                entry.status.map_or("draft", |s| s.english())
            );
        }
        CatalogAction::Import { file } => {
            println!(
                "{}: {} entries imported",
                file.display(),
                answer["imported"]
            );
        }
        CatalogAction::Export { format, output } => {
            let view: CatalogView = serde_json::from_value(answer)?;
            let entries: Vec<CatalogEntry> = view.entries.into_iter().map(|v| v.entry).collect();
            let mut bytes = Vec::new();
            match format {
                FormFormat::Csv => form::write_csv(&entries, &[], &mut bytes)?,
                FormFormat::Toml => {
                    bytes = form::write_toml(&entries)
                        .map_err(|e| anyhow::anyhow!(e))?
                        .into_bytes()
                }
            }
            match output {
                Some(p) => std::fs::write(&p, bytes)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => std::io::Write::write_all(&mut std::io::stdout(), &bytes)?,
            }
        }
    }
    Ok(())
}

fn offline_catalog(config: &Config, request: ControlRequest) -> Result<serde_json::Value> {
    let key = shuyuan_service::keyfile::load(&config.key_file)
        .context("the catalog is written under the agent's key")?;
    let catalog = Catalog::open(config, key.id())?;
    Ok(match request {
        ControlRequest::CatalogSet { code, field, value } => {
            serde_json::to_value(catalog.set(&code, &field, &value, UnixMillis::now())?)?
        }
        ControlRequest::CatalogImport { entries } => {
            serde_json::json!({ "imported": catalog.import(entries, UnixMillis::now())? })
        }
        _ => serde_json::to_value(CatalogView::of(&catalog))?,
    })
}

/// Asks the running agent to re-read a resource and shows its progress.
async fn resync(config: &Config, resource: &str, no_wait: bool) -> Result<()> {
    let asked = UnixMillis::now();
    let mut out = Vec::new();
    let request = ControlRequest::Resync {
        resource: resource.to_string(),
    };
    match control::call(&config.control_socket(), &request, &mut out).await {
        Ok(()) => {}
        Err(ControlError::NotRunning { .. }) => bail!(
            "the agent is not running; start it first (`shuyuan-agent run` or the service): the re-read runs inside it, next to live capture"
        ),
        Err(e) => return Err(e.into()),
    }
    println!("re-read of {resource} requested");
    if no_wait {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(resource.to_string());
    loop {
        let status = live_status(config).await?;
        if let Some(done) = status
            .source
            .finished_loads
            .iter()
            .find(|l| l.resource == resource && l.started_at >= asked)
        {
            bar.finish_and_clear();
            println!("{resource}: re-read finished, {} rows sent", done.rows);
            return Ok(());
        }
        if let Some(l) = status.source.loads.iter().find(|l| l.resource == resource) {
            bar.set_length(l.total.max(l.rows));
            bar.set_position(l.rows);
        }
        if let Some(e) = &status.source.error {
            bar.set_message(format!("{resource} (capture error: {e})"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Starts a comparison of one resource with the hub and waits for the
/// hub's verdict.
async fn verify(config: &Config, resource: &str, wait: Option<std::time::Duration>) -> Result<()> {
    let mut out = Vec::new();
    let request = ControlRequest::Verify {
        resource: resource.to_string(),
    };
    match control::call(&config.control_socket(), &request, &mut out).await {
        Ok(()) => {}
        Err(ControlError::NotRunning { .. }) => bail!(
            "the agent is not running; start it first (`shuyuan-agent run` or the service): the comparison reads the source next to live capture and is judged by the hub"
        ),
        Err(e) => return Err(e.into()),
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&out).context("bad answer from the agent")?;
    let run = answer["run"]
        .as_u64()
        .context("the agent did not name the run")?;
    println!("comparison of {resource} with the hub started (run {run})");
    let Some(wait) = wait else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let status = live_status(config).await?;
        if let Some(v) = status
            .verifications
            .iter()
            .find(|v| v.run == run && v.feed.resource.as_str() == resource)
        {
            println!("{}", status::render_outcome(v));
            if !v.detail.is_empty() {
                println!("{}", v.detail);
            }
            if v.verified {
                return Ok(());
            }
            if v.refused {
                bail!("{resource} cannot be compared with the hub's copy");
            }
            bail!("the hub's copy of {resource} still differs from the source");
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "no verdict from the hub after {} s (is it connected?); the comparison goes on, `shuyuan-agent status` shows the verdict when it comes",
                wait.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn live_status(config: &Config) -> Result<AgentStatus> {
    let mut out = Vec::new();
    match control::call(&config.control_socket(), &ControlRequest::Status, &mut out).await {
        Ok(()) => Ok(serde_json::from_slice(&out).context("bad status from the agent")?),
        Err(ControlError::NotRunning { .. }) => {
            let node = shuyuan_service::keyfile::load(&config.key_file)
                .map(|k| k.id().to_string())
                .unwrap_or_else(|_| "(no key)".into());
            match status::offline(config, node) {
                Ok(s) => Ok(s),
                Err(shuyuan_agent::outbox::OutboxError::AlreadyOpen(p)) => {
                    bail!(
                        "{} is held by a running agent whose control socket does not answer",
                        p.display()
                    )
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
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
        Config::parse(Path::new("deploy/agent.toml"), CONFIG_TEMPLATE).unwrap();
    }
}
