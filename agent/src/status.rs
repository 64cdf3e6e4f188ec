//! What `shuyuan-agent status` shows: the live state of the capture loop and
//! the uplink, or, when the agent is not running, what its outbox holds.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use shuyuan_protocol::message::VerifyOutcome;
use shuyuan_protocol::{FeedId, UnixMillis};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::outbox::{FeedState, Outbox, OutboxError, Totals, WriteFailure};
use shuyuan_protocol::catalog::EntryState;

/// The state of the link to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Connecting,
    Connected,
    Disconnected,
    AuthenticationFailed,
    /// The agent process is not running (status read from its files).
    NotRunning,
}

/// Everything `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub running: bool,
    pub software: String,
    pub department: String,
    pub node: String,
    pub hub: HubStatus,
    pub source: SourceStatus,
    pub outbox: OutboxStatus,
    pub resources: Vec<ResourceStatus>,
    /// How the hub's latest comparison of each resource with the source
    /// ended (一致性核验), as the hub reported it.
    #[serde(default)]
    pub verifications: Vec<VerifyOutcome>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubStatus {
    pub address: String,
    pub key: String,
    pub link: LinkState,
    pub since: Option<UnixMillis>,
    pub detail: Option<String>,
    pub rejections: u64,
    pub last_rejection: Option<String>,
    /// The last catalog sync problem, if the last exchange had one.
    pub catalog_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub describe: String,
    pub position: String,
    /// Captured changes waiting in the source to be sealed.
    pub backlog: u64,
    /// Capture is paused because the outbox is full.
    pub paused_outbox_full: bool,
    pub error: Option<String>,
    pub skipped_null_keys: u64,
    /// When the last successful capture step began reading the source: every
    /// change committed before it is sealed (or paused for a full outbox).
    pub last_read_at: Option<UnixMillis>,
    /// What `backlog` counts (changes, WAL bytes).
    #[serde(default)]
    pub backlog_unit: String,
    /// Something the operator must know (a lost replication slot).
    #[serde(default)]
    pub alarm: Option<String>,
    /// Initial loads and resyncs in progress.
    #[serde(default)]
    pub loads: Vec<crate::source::LoadReport>,
    /// The latest finished load of each resource (since the agent started).
    #[serde(default)]
    pub finished_loads: Vec<crate::source::LoadReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxStatus {
    pub batches: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
    /// Set while the outbox file cannot be written (a full disk): capture
    /// is paused and changes wait in the source.
    #[serde(default)]
    pub write_failure: Option<WriteFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub code: String,
    pub name: String,
    pub table: String,
    /// The update cycle in force (更新周期) and where it comes from
    /// (`catalog`, or `config` before the catalog has one).
    pub update_cycle: String,
    pub update_cycle_source: String,
    pub heartbeat_secs: u64,
    /// The catalog entry's state (draft, submitted, published, returned,
    /// withdrawn) and the reviewer's remarks, if any.
    pub catalog_state: Option<String>,
    pub catalog_remarks: Option<String>,
    pub schema_version: u32,
    /// Last sealed batch.
    pub head_seq: u64,
    /// Last batch the hub acknowledged.
    pub acked_seq: u64,
    pub last_change_at: Option<UnixMillis>,
    pub last_zero_update_at: Option<UnixMillis>,
    pub last_ack_at: Option<UnixMillis>,
    /// When the next zero-update (零更新) is due if nothing changes.
    pub next_zero_update_due: Option<UnixMillis>,
}

impl AgentStatus {
    /// The status before anything ran, from the config alone.
    pub fn initial(config: &Config, node: String, running: bool) -> Self {
        AgentStatus {
            running,
            software: shuyuan_protocol::SOFTWARE.to_string(),
            department: config.department.to_string(),
            node,
            hub: HubStatus {
                address: config.hub.address.clone(),
                key: config.hub.key.to_string(),
                link: if running {
                    LinkState::Connecting
                } else {
                    LinkState::NotRunning
                },
                since: None,
                detail: None,
                rejections: 0,
                last_rejection: None,
                catalog_error: None,
            },
            source: SourceStatus {
                describe: match &config.source {
                    crate::config::SourceConfig::Sqlite { path, .. } => {
                        format!("sqlite {}", path.display())
                    }
                    crate::config::SourceConfig::Postgres(pg) => {
                        format!("postgres {} slot {}", pg.dsn, pg.slot)
                    }
                },
                position: String::new(),
                backlog: 0,
                paused_outbox_full: false,
                error: None,
                skipped_null_keys: 0,
                last_read_at: None,
                backlog_unit: "changes".into(),
                alarm: None,
                loads: Vec::new(),
                finished_loads: Vec::new(),
            },
            outbox: OutboxStatus {
                batches: 0,
                bytes: 0,
                limit_bytes: config.outbox.max_bytes,
                write_failure: None,
            },
            resources: config
                .resources
                .iter()
                .map(|r| ResourceStatus {
                    code: r.code.to_string(),
                    name: r.name.clone(),
                    table: r.table.clone(),
                    update_cycle: r.update_cycle.to_string(),
                    update_cycle_source: "config".into(),
                    heartbeat_secs: r.heartbeat_under(r.update_cycle).as_secs(),
                    catalog_state: None,
                    catalog_remarks: None,
                    schema_version: 0,
                    head_seq: 0,
                    acked_seq: 0,
                    last_change_at: None,
                    last_zero_update_at: None,
                    last_ack_at: None,
                    next_zero_update_due: None,
                })
                .collect(),
            verifications: Vec::new(),
        }
    }

    /// Refreshes the per-resource figures from feed states.
    pub fn apply_feeds(
        &mut self,
        config: &Config,
        feeds: &[(FeedId, FeedState)],
        catalog: Option<&Catalog>,
    ) {
        for (r, (cfg, (_, state))) in self
            .resources
            .iter_mut()
            .zip(config.resources.iter().zip(feeds))
        {
            let found = catalog.and_then(|c| c.entry(cfg.code.as_str()));
            let entry = found.as_ref().map(|(e, _)| e);
            let cycle = entry.and_then(|e| e.update_cycle);
            r.update_cycle = cycle.unwrap_or(cfg.update_cycle).to_string();
            r.update_cycle_source = if cycle.is_some() { "catalog" } else { "config" }.to_string();
            let heartbeat = cfg.heartbeat_under(cycle.unwrap_or(cfg.update_cycle));
            r.heartbeat_secs = heartbeat.as_secs();
            if let Some((e, review)) = &found {
                let review = review.as_ref();
                r.catalog_state = Some(EntryState::of(e, review).english().to_string());
                r.catalog_remarks = review.map(|v| v.remarks.clone()).filter(|s| !s.is_empty());
            }
            r.schema_version = state.schema.as_ref().map_or(0, |s| s.version);
            r.head_seq = state.head.last_seq;
            r.acked_seq = state.acked;
            r.last_change_at = state.last_change_at;
            r.last_zero_update_at = state.last_zero_update_at;
            r.last_ack_at = state.last_ack_at;
            r.next_zero_update_due = state.last_batch_at.map(|t| t.saturating_add(heartbeat));
        }
    }

    pub fn apply_totals(&mut self, totals: Totals) {
        self.outbox.batches = totals.batches;
        self.outbox.bytes = totals.bytes;
    }

    /// Human-readable form.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let t = |x: Option<UnixMillis>| x.map_or_else(|| "-".to_string(), |x| x.to_string());
        let _ = writeln!(
            s,
            "shuyuan agent ({})  department {}  node {}",
            self.software, self.department, self.node
        );
        let link = match self.hub.link {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Disconnected => "disconnected",
            LinkState::AuthenticationFailed => "AUTHENTICATION FAILED",
            LinkState::NotRunning => "agent not running",
        };
        let _ = writeln!(
            s,
            "hub      {}  {}{}",
            self.hub.address,
            link,
            self.hub
                .since
                .map(|x| format!(" since {x}"))
                .unwrap_or_default()
        );
        if let Some(d) = &self.hub.detail {
            let _ = writeln!(s, "         {d}");
        }
        if let Some(e) = &self.hub.catalog_error {
            let _ = writeln!(s, "         catalog: {e}");
        }
        if self.hub.rejections > 0 {
            let _ = writeln!(
                s,
                "         {} batches rejected by the hub; last: {}",
                self.hub.rejections,
                self.hub.last_rejection.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            s,
            "source   {}  position {}  backlog {} {}",
            self.source.describe,
            self.source.position,
            self.source.backlog,
            self.source.backlog_unit
        );
        if let Some(a) = &self.source.alarm {
            let _ = writeln!(s, "         ALARM: {a}");
        }
        for l in &self.source.loads {
            let _ = writeln!(
                s,
                "         loading {}: {} of ~{} rows ({:.0}%), {}",
                l.resource,
                l.rows,
                l.total,
                if l.total == 0 {
                    0.0
                } else {
                    (l.rows as f64 / l.total as f64 * 100.0).min(100.0)
                },
                l.reason
            );
        }
        if self.source.paused_outbox_full {
            let _ = writeln!(
                s,
                "         CAPTURE PAUSED: the outbox is full; changes wait in the source until the hub acknowledges"
            );
        }
        if let Some(e) = &self.source.error {
            let _ = writeln!(s, "         error: {e}");
        }
        if self.source.skipped_null_keys > 0 {
            let _ = writeln!(
                s,
                "         {} changes skipped because a key column was NULL",
                self.source.skipped_null_keys
            );
        }
        let _ = writeln!(
            s,
            "outbox   {} batches, {} bytes of {} ({:.1}%)",
            self.outbox.batches,
            self.outbox.bytes,
            self.outbox.limit_bytes,
            100.0 * self.outbox.bytes as f64 / self.outbox.limit_bytes.max(1) as f64
        );
        if let Some(f) = &self.outbox.write_failure {
            let _ = writeln!(
                s,
                "         OUTBOX CANNOT WRITE since {}: {}; capture paused, source changes wait in the source ({} failed writes, file reopened {} times; retried at growing intervals, at least every {}s)",
                f.since,
                f.error,
                f.failed_writes,
                f.reopens,
                crate::outbox::REOPEN_INTERVAL.as_secs()
            );
        }
        let _ = writeln!(s, "resources");
        for r in &self.resources {
            let _ = writeln!(
                s,
                "  {}  {} (table {}), update cycle (更新周期) {} from the {}, schema v{}",
                r.code, r.name, r.table, r.update_cycle, r.update_cycle_source, r.schema_version
            );
            if let Some(state) = &r.catalog_state {
                let _ = writeln!(
                    s,
                    "      catalog entry (数据资源目录) {state}{}",
                    r.catalog_remarks
                        .as_ref()
                        .map(|m| format!("; reviewer's remarks: {m}"))
                        .unwrap_or_default()
                );
            }
            let _ = writeln!(
                s,
                "      sealed #{}  acked #{}  last ack {}",
                r.head_seq,
                r.acked_seq,
                t(r.last_ack_at)
            );
            let _ = writeln!(
                s,
                "      last change {}  last zero-update (零更新) {}",
                t(r.last_change_at),
                t(r.last_zero_update_at)
            );
            let _ = writeln!(
                s,
                "      next zero-update due {} (every {}s when quiet)",
                t(r.next_zero_update_due),
                r.heartbeat_secs
            );
            if let Some(v) = self
                .verifications
                .iter()
                .find(|v| v.feed.resource.as_str() == r.code)
            {
                let _ = writeln!(s, "      {}", render_outcome(v));
            }
        }
        s
    }
}

/// The live status, shared by the capture loop, the uplink and the control
/// socket.
#[derive(Debug, Clone)]
pub struct StatusBoard(Arc<Mutex<AgentStatus>>);

impl StatusBoard {
    pub fn new(status: AgentStatus) -> Self {
        StatusBoard(Arc::new(Mutex::new(status)))
    }

    /// Changes the status under the lock.
    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard);
    }

    pub fn snapshot(&self) -> AgentStatus {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn node_id(config: &Config) -> shuyuan_protocol::NodeId {
    shuyuan_service::keyfile::load(&config.key_file)
        .map(|k| k.id())
        .unwrap_or_else(|_| shuyuan_protocol::NodeKey::from_seed([0; 32]).id())
}

/// Status of an agent that is not running, read from its outbox.
pub fn offline(config: &Config, node: String) -> Result<AgentStatus, OutboxError> {
    let outbox = Outbox::open(&config.outbox_path())?;
    let mut status = AgentStatus::initial(config, node, false);
    let stored = outbox.feeds()?;
    let feeds: Vec<(FeedId, FeedState)> = config
        .resources
        .iter()
        .map(|r| {
            let f = FeedId::new(config.department.clone(), r.code.clone());
            let state = stored.get(&f).cloned().unwrap_or_default();
            (f, state)
        })
        .collect();
    let catalog = Catalog::open(config, node_id(config)).ok();
    status.apply_feeds(config, &feeds, catalog.as_ref());
    status.apply_totals(outbox.totals()?);
    status.source.position = outbox.position()?.unwrap_or_else(|| "-".into());
    Ok(status)
}

/// How the hub's comparison with the source ended, on one line.
pub fn render_outcome(v: &VerifyOutcome) -> String {
    format!(
        "last comparison with the source (一致性核验), run {}: {} at seq #{}; {} ranges compared, {} differed, {} rows rewritten, {} removed, {} bytes exchanged",
        v.run,
        match (v.refused, v.verified) {
            (true, _) => "NOT VERIFIABLE",
            (false, true) => "VERIFIED",
            (false, false) => "DIVERGED",
        },
        v.seq,
        v.ranges_compared,
        v.ranges_differing,
        v.rows_repaired,
        v.rows_removed,
        v.bytes_exchanged
    )
}
