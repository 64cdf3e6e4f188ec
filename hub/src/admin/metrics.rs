//! The hub's Prometheus metrics: every name is declared here, rendered in
//! the text exposition format from the same status the console shows.
//!
//! Per-feed values come from the store (they survive restarts); counters
//! marked "since start" come from the running process.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use shuyuan_protocol::UnixMillis;

use super::view::{FederationView, Overview, ResourceState};
use super::webhook::Deliveries;
use crate::apply::audit::AuditCounts;

/// The process facts beyond the status.
#[derive(Debug)]
pub struct ProcessFacts<'a> {
    pub audit_counts: &'a AuditCounts,
    pub handshakes_refused: u64,
    pub deliveries: &'a Deliveries,
    pub logins: Logins,
}

/// Console logins and their limits.
#[derive(Debug, Default)]
pub struct Logins {
    pub ok: u64,
    pub failed: u64,
    /// Password checks refused by the per-address and global limits.
    pub limited_address: u64,
    pub limited_global: u64,
    /// Password checks refused because too many were running.
    pub busy: u64,
    /// The limits.
    pub per_address: usize,
    pub global: usize,
}

impl Logins {
    pub fn of(auth: &super::auth::Auth) -> Logins {
        use super::limits::Scope;
        Logins {
            ok: auth.logins_ok.load(Ordering::Relaxed),
            failed: auth.logins_failed.load(Ordering::Relaxed),
            limited_address: auth.limits.refused(Scope::Address),
            limited_global: auth.limits.refused(Scope::Global),
            busy: auth.checks_busy.load(Ordering::Relaxed),
            per_address: auth.limits.per_address,
            global: auth.limits.global,
        }
    }
}

struct Family<'o> {
    out: &'o mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric.
pub fn render(o: &Overview, fed: &FederationView, p: &ProcessFacts<'_>) -> String {
    let mut out = String::with_capacity(256 + o.departments.len() * 4096);
    let mut f = Family { out: &mut out };
    f.header("shuyuan_hub_info", "gauge", "The hub's software and key.");
    f.sample(
        "shuyuan_hub_info",
        &[
            ("software", &o.software),
            ("node", &o.node),
            ("name", &o.hub),
        ],
        1,
    );
    f.header(
        "shuyuan_store_writable",
        "gauge",
        "1 while the hub's store can write; 0 while writes fail (a full disk): batches are then refused as unavailable, none acknowledged.",
    );
    f.sample("shuyuan_store_writable", &[], u8::from(o.store.writable()));
    f.header(
        "shuyuan_store_failed_writes_total",
        "counter",
        "Write groups refused because the store could not write, since start.",
    );
    f.sample(
        "shuyuan_store_failed_writes_total",
        &[],
        o.store.failed_writes,
    );
    f.header(
        "shuyuan_store_recoveries_total",
        "counter",
        "Times the store was reopened and wrote again after failing, since start.",
    );
    f.sample("shuyuan_store_recoveries_total", &[], o.store.recoveries);
    f.header(
        "shuyuan_agents_connected",
        "gauge",
        "Enrolled agents connected now.",
    );
    f.sample("shuyuan_agents_connected", &[], o.agents_online);
    f.header("shuyuan_agents_enrolled", "gauge", "Enrolled agent keys.");
    f.sample(
        "shuyuan_agents_enrolled",
        &[],
        o.agents_online + o.agents_offline,
    );
    f.header(
        "shuyuan_agent_connected",
        "gauge",
        "1 when the agent is connected.",
    );
    for d in &o.departments {
        for a in &d.agents {
            f.sample(
                "shuyuan_agent_connected",
                &[("department", &d.code), ("agent", &a.key)],
                u8::from(a.connected),
            );
        }
    }
    let reports: Vec<_> = o
        .departments
        .iter()
        .flat_map(|d| d.agents.iter().map(move |a| (d, a)))
        .filter_map(|(d, a)| a.report.as_ref().filter(|_| a.connected).map(|r| (d, a, r)))
        .collect();
    f.header(
        "shuyuan_agent_outbox_batches",
        "gauge",
        "Batches the agent reports waiting in its outbox (not yet acknowledged).",
    );
    for (d, a, r) in &reports {
        f.sample(
            "shuyuan_agent_outbox_batches",
            &[("department", &d.code), ("agent", &a.key)],
            r.outbox_batches,
        );
    }
    f.header(
        "shuyuan_agent_clock_skew_seconds",
        "gauge",
        "How far the agent's clock is ahead of the hub's (negative: behind), from its last report.",
    );
    for d in &o.departments {
        for a in d.agents.iter().filter(|a| a.connected) {
            if let Some(ms) = a.clock_skew_ms {
                f.sample(
                    "shuyuan_agent_clock_skew_seconds",
                    &[("department", &d.code), ("agent", &a.key)],
                    ms as f64 / 1000.0,
                );
            }
        }
    }
    f.header(
        "shuyuan_agent_outbox_bytes",
        "gauge",
        "Bytes the agent reports in its outbox.",
    );
    for (d, a, r) in &reports {
        f.sample(
            "shuyuan_agent_outbox_bytes",
            &[("department", &d.code), ("agent", &a.key)],
            r.outbox_bytes,
        );
    }
    f.header(
        "shuyuan_agent_capture_paused",
        "gauge",
        "1 when the agent paused capture because its outbox is full.",
    );
    for (d, a, r) in &reports {
        f.sample(
            "shuyuan_agent_capture_paused",
            &[("department", &d.code), ("agent", &a.key)],
            u8::from(r.capture_paused),
        );
    }

    let feeds: Vec<_> = o
        .departments
        .iter()
        .flat_map(|d| d.resources.iter().map(move |r| (d, r)))
        .collect();
    let labels = |d: &super::view::DepartmentView, r: &super::view::ResourceRow| {
        [
            ("department", d.code.clone()),
            ("resource", r.entry.resource.clone()),
        ]
    };
    macro_rules! per_feed {
        ($name:expr, $kind:expr, $help:expr, |$r:ident| $value:expr) => {
            f.header($name, $kind, $help);
            for (d, $r) in &feeds {
                let l = labels(d, $r);
                if let Some(v) = $value {
                    f.sample($name, &[(l[0].0, &l[0].1), (l[1].0, &l[1].1)], v);
                }
            }
        };
    }
    per_feed!(
        "shuyuan_feed_last_seq",
        "gauge",
        "The last applied sequence number.",
        |r| Some(r.entry.last_seq)
    );
    per_feed!(
        "shuyuan_feed_lag_seconds",
        "gauge",
        "Seconds since the last change or zero-update arrived.",
        |r| r.lag.seconds
    );
    per_feed!(
        "shuyuan_feed_last_change_age_seconds",
        "gauge",
        "Seconds since the agent sealed the last batch with row changes.",
        |r| r.entry.last_change_at.map(|t| age(o.now, t))
    );
    per_feed!(
        "shuyuan_feed_last_zero_update_age_seconds",
        "gauge",
        "Seconds since the last zero-update (零更新) arrived.",
        |r| r
            .entry
            .last_zero_update
            .as_ref()
            .map(|z| age(o.now, z.received_at))
    );
    per_feed!(
        "shuyuan_feed_lag_batches",
        "gauge",
        "Batches the department's agents report waiting, for connected feeds.",
        |r| r.lag.batches
    );
    per_feed!(
        "shuyuan_feed_fresh_until_timestamp_seconds",
        "gauge",
        "When the feed becomes overdue if nothing arrives (Unix seconds).",
        |r| r.entry.fresh_until.map(|t| t.0 / 1000)
    );
    per_feed!(
        "shuyuan_feed_batches_applied_total",
        "counter",
        "Batches applied.",
        |r| Some(r.entry.batches_applied)
    );
    per_feed!(
        "shuyuan_feed_changes_applied_total",
        "counter",
        "Row changes applied.",
        |r| Some(r.entry.changes_applied)
    );
    per_feed!(
        "shuyuan_feed_rows",
        "gauge",
        "Rows in the shared copy.",
        |r| Some(r.entry.rows)
    );
    per_feed!(
        "shuyuan_feed_rejected_total",
        "counter",
        "Batches refused.",
        |r| Some(r.entry.rejected)
    );
    per_feed!(
        "shuyuan_feed_connected",
        "gauge",
        "1 when an agent is connected for the feed.",
        |r| Some(u8::from(r.entry.connected))
    );
    per_feed!(
        "shuyuan_feed_overdue",
        "gauge",
        "1 when neither a change nor a zero-update arrived within the update cycle plus grace.",
        |r| Some(u8::from(r.entry.freshness == "overdue"))
    );
    per_feed!(
        "shuyuan_feed_diverged",
        "gauge",
        "1 when the copy was found to differ from the source.",
        |r| Some(u8::from(r.state == ResourceState::Diverged))
    );
    f.header(
        "shuyuan_feed_state",
        "gauge",
        "1 for the feed's state (the console's verdict).",
    );
    for (d, r) in &feeds {
        f.sample(
            "shuyuan_feed_state",
            &[
                ("department", &d.code),
                ("resource", &r.entry.resource),
                ("state", r.state.as_str()),
            ],
            1,
        );
    }
    f.header("shuyuan_feeds", "gauge", "Feeds by state.");
    for (state, n) in &o.states {
        f.sample("shuyuan_feeds", &[("state", state.as_str())], n);
    }
    federation(&mut f, fed);

    f.header(
        "shuyuan_rejections_total",
        "counter",
        "Refusals audited since start, by kind and reason.",
    );
    for ((kind, reason), n) in p.audit_counts {
        if reason.is_none()
            && !matches!(
                kind,
                crate::apply::audit::AuditKind::HandshakeRefused
                    | crate::apply::audit::AuditKind::ConnectionRefused
                    | crate::apply::audit::AuditKind::CatalogRejected
            )
        {
            continue;
        }
        let kind = kind.name();
        let reason = reason.map_or_else(|| "none".to_string(), |r| r.to_string());
        f.sample(
            "shuyuan_rejections_total",
            &[("kind", &kind), ("reason", &reason)],
            n,
        );
    }
    f.header(
        "shuyuan_audit_entries_total",
        "counter",
        "Audit entries written since start, by kind.",
    );
    let mut by_kind = std::collections::BTreeMap::new();
    for ((kind, _), n) in p.audit_counts {
        *by_kind.entry(*kind).or_insert(0u64) += n;
    }
    for (kind, n) in by_kind {
        let kind = kind.name();
        f.sample("shuyuan_audit_entries_total", &[("kind", &kind)], n);
    }
    f.header(
        "shuyuan_handshakes_refused_total",
        "counter",
        "QUIC handshakes refused since start (unknown keys).",
    );
    f.sample(
        "shuyuan_handshakes_refused_total",
        &[],
        p.handshakes_refused,
    );
    f.header(
        "shuyuan_connections_refused_total",
        "counter",
        "Feed connections refused or ended by the hub since start, by reason (limit, handshake_limit, unenrolled, handshake_failed, handshake_timeout, bad_frame, truncated, protocol).",
    );
    for (reason, n) in crate::ingest::connection_refusals() {
        f.sample(
            "shuyuan_connections_refused_total",
            &[("reason", reason)],
            n,
        );
    }
    f.header(
        "shuyuan_webhook_deliveries_total",
        "counter",
        "Alert deliveries since start, by result.",
    );
    for (result, n) in [
        ("delivered", &p.deliveries.delivered),
        ("retried", &p.deliveries.retried),
        ("given_up", &p.deliveries.given_up),
        ("dropped", &p.deliveries.dropped),
    ] {
        f.sample(
            "shuyuan_webhook_deliveries_total",
            &[("result", result)],
            n.load(Ordering::Relaxed),
        );
    }
    f.header(
        "shuyuan_admin_logins_total",
        "counter",
        "Console logins since start, by result.",
    );
    for (result, n) in [
        ("ok", p.logins.ok),
        ("failed", p.logins.failed),
        ("limited_address", p.logins.limited_address),
        ("limited_global", p.logins.limited_global),
        ("busy", p.logins.busy),
    ] {
        f.sample("shuyuan_admin_logins_total", &[("result", result)], n);
    }
    f.header(
        "shuyuan_admin_login_limit",
        "gauge",
        "Failed logins allowed within the window before password checks are refused, per address (an IPv6 /64) and from all addresses; and password checks run at once.",
    );
    use super::limits::{ADDRESS_WINDOW, GLOBAL_WINDOW};
    f.sample(
        "shuyuan_admin_login_limit",
        &[
            ("scope", "address"),
            ("window_seconds", &ADDRESS_WINDOW.as_secs().to_string()),
        ],
        p.logins.per_address,
    );
    f.sample(
        "shuyuan_admin_login_limit",
        &[
            ("scope", "global"),
            ("window_seconds", &GLOBAL_WINDOW.as_secs().to_string()),
        ],
        p.logins.global,
    );
    f.sample(
        "shuyuan_admin_login_limit",
        &[("scope", "concurrent_checks"), ("window_seconds", "0")],
        super::accounts::CONCURRENT_CHECKS,
    );
    out
}

/// The link to the parent hub, the child hubs and the tree below (级联).
fn federation(f: &mut Family<'_>, fed: &FederationView) {
    f.header(
        "shuyuan_upstream_connected",
        "gauge",
        "1 when the link to the parent hub is up (only with [upstream] configured).",
    );
    if let Some(u) = &fed.upstream {
        f.sample(
            "shuyuan_upstream_connected",
            &[],
            u8::from(u.link == "connected"),
        );
    }
    f.header(
        "shuyuan_upstream_backlog_batches",
        "gauge",
        "Batches of a forwarded feed stored here that the parent hub has not acknowledged.",
    );
    for s in fed.upstream.iter().flat_map(|u| &u.feeds) {
        if let (None, Some(acked)) = (&s.held, s.acked) {
            f.sample(
                "shuyuan_upstream_backlog_batches",
                &[("feed", &s.feed)],
                s.head.saturating_sub(acked),
            );
        }
    }
    f.header(
        "shuyuan_upstream_rejections_total",
        "counter",
        "Batches the parent hub refused since start.",
    );
    if let Some(u) = &fed.upstream {
        f.sample("shuyuan_upstream_rejections_total", &[], u.rejections);
    }
    f.header(
        "shuyuan_child_hub_connected",
        "gauge",
        "1 when the enrolled child hub (by key and platform code) is connected.",
    );
    for c in &fed.children {
        f.sample(
            "shuyuan_child_hub_connected",
            &[("hub", &c.key), ("code", &c.code)],
            u8::from(c.connected),
        );
    }
    f.header(
        "shuyuan_federation_lag_batches",
        "gauge",
        "Batches of a feed held at a hub below (by key, at depth 1 for a child) that the level above it lacks.",
    );
    for r in &fed.tree {
        if let Some(lag) = r.lag {
            let hub = if r.hub_key.is_empty() {
                &r.hub
            } else {
                &r.hub_key
            };
            f.sample(
                "shuyuan_federation_lag_batches",
                &[
                    ("hub", hub),
                    ("feed", &r.feed),
                    ("depth", &r.depth.to_string()),
                ],
                lag,
            );
        }
    }
}

fn age(now: UnixMillis, t: UnixMillis) -> u64 {
    (now.0.saturating_sub(t.0).max(0) / 1000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::StoreHealth;

    /// The metrics of a hub with nothing enrolled and nothing counted.
    fn empty_render() -> String {
        render_with_store(StoreHealth::default())
    }

    /// [`empty_render`] with the store in `store`'s state.
    fn render_with_store(store: StoreHealth) -> String {
        let o = Overview {
            hub: "h".into(),
            node: "n".into(),
            software: "s".into(),
            started_at: None,
            now: UnixMillis(0),
            agents_online: 0,
            agents_offline: 0,
            states: Vec::new(),
            departments: Vec::new(),
            history: Vec::new(),
            grace_secs: 0,
            store,
            unreadable: None,
        };
        render(
            &o,
            &FederationView::default(),
            &ProcessFacts {
                audit_counts: &AuditCounts::new(),
                handshakes_refused: 0,
                deliveries: &Deliveries::default(),
                logins: Logins::default(),
            },
        )
    }

    #[test]
    fn the_example_alert_rules_use_declared_metrics() {
        let text = empty_render();
        let rules = include_str!("../../../deploy/prometheus/shuyuan-alerts.yml");
        let mut names: Vec<&str> = rules
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("shuyuan_"))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 6, "{names:?}");
        for name in names {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} is used by the alert rules but not exported"
            );
        }
        assert!(text.contains("name=\"h\""));
    }

    #[test]
    fn store_health_is_exported() {
        let text = empty_render();
        assert!(
            text.lines().any(|l| l == "shuyuan_store_writable 1"),
            "{text}"
        );
        let text = render_with_store(StoreHealth {
            failing_since: Some(UnixMillis(5)),
            error: Some("No space left on device (os error 28)".into()),
            failed_writes: 7,
            recoveries: 2,
        });
        for line in [
            "shuyuan_store_writable 0",
            "shuyuan_store_failed_writes_total 7",
            "shuyuan_store_recoveries_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn federation_metrics() {
        use crate::admin::view::example;

        let status = example::status();
        let o = Overview::of(
            &status,
            std::time::Duration::from_secs(1),
            example::NOW,
            Vec::new(),
        );
        let fed = FederationView::of(&status);
        let counts = AuditCounts::new();
        let deliveries = Deliveries::default();
        let facts = ProcessFacts {
            audit_counts: &counts,
            handshakes_refused: 0,
            deliveries: &deliveries,
            logins: Logins::default(),
        };
        let text = render(&o, &fed, &facts);
        let (county, town, other) = (example::key(2), example::key(3), example::key(4));
        for line in [
            "# TYPE shuyuan_upstream_connected gauge".to_string(),
            "shuyuan_upstream_connected 1".to_string(),
            format!(
                "shuyuan_upstream_backlog_batches{{feed=\"{}\"}} 2",
                example::FEED
            ),
            "# TYPE shuyuan_upstream_rejections_total counter".to_string(),
            "shuyuan_upstream_rejections_total 2".to_string(),
            format!("shuyuan_child_hub_connected{{hub=\"{county}\",code=\"330902\"}} 1"),
            format!("shuyuan_child_hub_connected{{hub=\"{other}\",code=\"330903\"}} 0"),
            format!(
                "shuyuan_federation_lag_batches{{hub=\"{county}\",feed=\"{}\",depth=\"1\"}} 2",
                example::FEED
            ),
            format!(
                "shuyuan_federation_lag_batches{{hub=\"{town}\",feed=\"{}\",depth=\"2\"}} 1",
                example::FEED
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Held feeds have neither a backlog nor a lag.
        assert!(!text.contains("D1:101001/00008"), "{text}");
        assert!(
            !text.contains(&format!("feed=\"{}\"", example::SECRET)),
            "{text}"
        );

        // Without [upstream] the link's series are absent, their
        // declarations not.
        let alone = FederationView::default();
        let text = render(&o, &alone, &facts);
        assert!(text.contains("# TYPE shuyuan_upstream_connected gauge"));
        assert!(!text.lines().any(|l| l.starts_with("shuyuan_upstream_")));
        assert!(!text.lines().any(|l| l.starts_with("shuyuan_child_hub_")));
    }

    #[test]
    fn every_connection_refusal_reason_is_exported() {
        let text = empty_render();
        assert!(text.contains("# TYPE shuyuan_connections_refused_total counter"));
        for r in crate::ingest::Refusal::ALL {
            let series = format!(
                "shuyuan_connections_refused_total{{reason=\"{}\"}} ",
                r.label()
            );
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
