//! `shuyuan-hub`: the command line of the hub.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use shuyuan_hub::config::Config;
use shuyuan_hub::export::{self, Format};
use shuyuan_hub::status::{self, HubStatus, LiveFacts, render_audit};
use shuyuan_hub::store::redb::RedbBackend;
use shuyuan_hub::store::{AuditEntry, Backend, Store, StoreError};
use shuyuan_hub::{ControlRequest, Hub, enrollment};
use shuyuan_protocol::NodeKey;
use shuyuan_protocol::control::{self, ControlError};
use shuyuan_protocol::service::{shutdown_signal, write_template_if_missing};

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
    /// Allow an agent's key to connect and write the feeds of one department.
    Enroll {
        /// The department code (部门代码) the key may write for.
        #[arg(long)]
        department: String,
        /// The department's name (部门名称).
        #[arg(long)]
        name: String,
        /// The agent's public key, as printed by `shuyuan-agent init`.
        key: String,
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
    /// Show the audit log (rejections, refused keys, enrollments), newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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
        Command::Run => {
            let hub = Hub::bind(config()?).await?;
            wait_for_signal().await?;
            hub.shutdown().await;
            Ok(())
        }
        Command::Enroll {
            department,
            name,
            key,
        } => {
            let config = config()?;
            let request = ControlRequest::Enroll {
                department: department.clone(),
                name: name.clone(),
                key: key.clone(),
            };
            let mut out = Vec::new();
            let new = match control::call(&config.control_socket(), &request, &mut out).await {
                Ok(()) => {
                    let v: serde_json::Value = serde_json::from_slice(&out)?;
                    v["new"].as_bool().unwrap_or(false)
                }
                Err(ControlError::NotRunning { .. }) => {
                    let (key, enrollment) =
                        enrollment(&department, &name, &key).map_err(|e| anyhow!(e))?;
                    let backend = open_offline(&config)?;
                    let (store, writer) = Store::start(backend)?;
                    let result = store.enroll(key, enrollment).await;
                    store.close().await;
                    tokio::task::spawn_blocking(move || writer.join()).await?;
                    result?
                }
                Err(e) => return Err(e.into()),
            };
            println!(
                "{} key {key} for department {department} ({name})",
                if new {
                    "enrolled"
                } else {
                    "already enrolled; name updated:"
                }
            );
            Ok(())
        }
        Command::Status { json } => {
            let config = config()?;
            let mut out = Vec::new();
            let status: HubStatus =
                match control::call(&config.control_socket(), &ControlRequest::Status, &mut out)
                    .await
                {
                    Ok(()) => serde_json::from_slice(&out).context("bad status from the hub")?,
                    Err(ControlError::NotRunning { .. }) => {
                        let backend = open_offline(&config)?;
                        let node = NodeKey::load(&config.key_file)
                            .map(|k| k.id().to_string())
                            .unwrap_or_else(|_| "(no key)".into());
                        status::collect(&*backend, &config.name, node, false, LiveFacts::default())?
                    }
                    Err(e) => return Err(e.into()),
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
                    let backend = open_offline(&config)?;
                    let feed = export::resolve(&*backend, &resource, department.as_deref())?;
                    export::export(&*backend, &feed, format, &mut *sink)?;
                }
                Err(e) => return Err(e.into()),
            }
            sink.flush()?;
            Ok(())
        }
        Command::Audit { limit, json } => {
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
                Err(ControlError::NotRunning { .. }) => open_offline(&config)?.audit(limit)?,
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

fn open_offline(config: &Config) -> Result<Arc<RedbBackend>> {
    match RedbBackend::open(&config.store_path()) {
        Ok(b) => Ok(Arc::new(b)),
        Err(StoreError::AlreadyOpen(p)) => {
            bail!("{p} is held by a running hub whose control socket does not answer")
        }
        Err(e) => Err(e.into()),
    }
}

fn init(config_path: &Path, key_only: bool) -> Result<()> {
    let wrote_config = write_template_if_missing(config_path, CONFIG_TEMPLATE)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::load(config_path)?;
    let (key, created) = NodeKey::load_or_create(&config.key_file)?;
    std::fs::create_dir_all(&config.data_dir)
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
