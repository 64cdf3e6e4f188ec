//! The console's server-rendered HTML: one function per page returning the
//! page's body (what goes inside `<main id="content">`), and [`layout`],
//! which wraps a body in the full document (header, navigation, language
//! switch, inline CSS and the small script that reloads the body when the
//! server announces an update). No external assets; every interpolated
//! value is escaped with [`esc`].

use std::collections::BTreeSet;

use shuyuan_protocol::catalog::{CatalogEntry, EntryState, ResourceClass, ShareType};
use shuyuan_protocol::{UnixMillis, UpdateCycle};

use crate::admin::i18n::{AUDIT_KINDS, Lang, Text};
use crate::admin::view::{
    AuditQuery, DepartmentView, FederationView, Overview, ResourceRow, ResourceState, ResourceView,
};
use crate::apply::audit::AuditEntry;
use crate::apply::verification::{Verdict, VerifyRecord, VerifyRun};
use crate::catalog::{CityEntry, Filter};
use crate::status::{ChildStatus, ResourceEntry, TreeRow};
use crate::upstream::{ForwardState, UpstreamStatus};

/// What every page needs to know about the request.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    pub lang: Lang,
    /// The request path, without the query.
    pub path: &'a str,
    /// The raw query string (may be empty).
    pub query: &'a str,
    pub hub_name: &'a str,
    pub logged_in: bool,
    /// The administrator logged in (None: open console, local token).
    pub account: Option<&'a str>,
    pub now: UnixMillis,
}

impl Page<'_> {
    fn t(&self, key: Text) -> &'static str {
        self.lang.t(key)
    }

    /// A label, escaped.
    fn l(&self, key: Text) -> String {
        esc(self.t(key))
    }
}

/// The console's stylesheet, served as `/console.css`.
pub const CSS: &str = r#"
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--accent:#0b5cad}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"PingFang SC","Microsoft YaHei","Noto Sans CJK SC",sans-serif;color:var(--fg);background:#fff}
header{display:flex;flex-wrap:wrap;gap:.6rem 1.2rem;align-items:center;padding:.6rem 1.2rem;background:#12355b;color:#fff}
header a{color:#fff;text-decoration:none}
header .hub{font-weight:600;font-size:1.1rem}
header nav a{padding:.2rem .6rem;border-radius:4px}
header nav a[aria-current]{background:rgba(255,255,255,.2)}
header .lang{margin-left:auto}
header .lang a[aria-current]{font-weight:600;text-decoration:underline}
header form{margin:0}
header button{background:transparent;color:#fff;border-color:rgba(255,255,255,.6)}
main{padding:1rem 1.2rem;max-width:1500px}
h1{font-size:1.4rem;margin:.2rem 0 .8rem}
h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
a{color:var(--accent)}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600;white-space:nowrap}
tbody tr:hover{background:#f0f6fc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.state{display:inline-block;padding:0 .55em;border-radius:9px;font-size:12px;line-height:18px;color:#fff;white-space:nowrap}
.state-diverged,.state-rejected{background:#cf222e}
.state-overdue{background:#c2610c}
.state-disconnected,.state-unknown{background:#6e7781}
.state-zero_updated{background:#0969da}
.state-on_time{background:#1a7f37}
.muted,.ago,.rule{color:var(--muted)}
.rule{font-size:12px;margin-top:.15rem}
.cards{display:flex;flex-wrap:wrap;gap:1rem}
.card{border:1px solid var(--line);border-radius:6px;padding:.6rem .9rem;min-width:240px}
.card h2{margin:0 0 .4rem;font-size:.95rem}
.big{font-size:1.5rem;font-weight:600}
ul.states{list-style:none;padding:0;margin:0;display:flex;flex-wrap:wrap;gap:.4rem .9rem}
.by-state{display:flex;flex-wrap:wrap;gap:.3rem .6rem}
svg.sparkline{display:block;color:var(--accent);background:var(--bg)}
figure{margin:0}
figcaption{font-size:12px;color:var(--muted)}
form.filters{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:flex-end;margin:.5rem 0 1rem}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:var(--muted)}
input,select,button{font:inherit;padding:.25rem .45rem;border:1px solid var(--line);border-radius:4px}
button{background:var(--accent);color:#fff;border-color:var(--accent);cursor:pointer}
button.return{background:#fff;color:#cf222e;border-color:#cf222e}
form.review{display:flex;flex-wrap:wrap;gap:.3rem;margin:.15rem 0}
.notice{padding:.5rem .8rem;background:#ddf4ff;border:1px solid #54aeff;border-radius:6px}
.error{padding:.5rem .8rem;background:#ffebe9;border:1px solid #ff8182;border-radius:6px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:.5rem 0 1rem}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0}
.scroll{overflow-x:auto}
.lagging{color:#c2610c;font-weight:600}
td.held{color:var(--muted)}
td.depth-1{padding-left:0.5rem}td.depth-2{padding-left:2.0rem}td.depth-3{padding-left:3.5rem}td.depth-4{padding-left:5.0rem}td.depth-5{padding-left:6.5rem}td.depth-6{padding-left:8.0rem}td.depth-7{padding-left:9.5rem}td.depth-8{padding-left:11.0rem}
"#;

/// The console's script, served as `/console.js`.
pub const SCRIPT: &str = "if (window.EventSource) { const es = new EventSource('/events'); es.addEventListener('update', () => { if (document.querySelector('main form :focus')) return; fetch(location.href, {headers: {'X-Shuyuan-Fragment': '1'}}).then(r => r.ok ? r.text() : null).then(t => { if (t !== null) document.getElementById('content').innerHTML = t; }); }); }";

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment: everything but `A-Z a-z 0-9 - _ . ~`.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn department_href(code: &str) -> String {
    format!("/departments/{}", path_segment(code))
}

fn resource_href(department: &str, resource: &str) -> String {
    format!(
        "/resources/{}/{}",
        path_segment(department),
        path_segment(resource)
    )
}

/// The current page in another language: the query's `lang` replaced, its
/// other parameters kept as they are.
fn lang_href(page: &Page, lang: Lang) -> String {
    // A path such as `//host` would leave the site.
    let path = if page.path.starts_with('/') && !page.path.starts_with("//") {
        page.path
    } else {
        "/"
    };
    let own = format!("lang={}", lang.code());
    let params: Vec<&str> = page
        .query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some("lang"))
        .chain([own.as_str()])
        .collect();
    format!("{path}?{}", params.join("&"))
}

/// A consistency verdict in the page's language (the store's technical
/// detail of a divergence stays as recorded).
fn verdict(page: &Page, v: &Verdict) -> String {
    let zh = page.lang == Lang::Zh;
    match v {
        Verdict::Verified { seq, at, by } => {
            let by = match (by.as_str(), zh) {
                ("checkpoint", true) => "检查点摘要比对",
                ("source comparison", true) => "与数源逐段比对",
                (other, _) => other,
            };
            if zh {
                format!(
                    "已核验一致：序号 #{seq}，{}（{}）",
                    time(page, *at),
                    esc(by)
                )
            } else {
                format!(
                    "verified at seq #{seq}, {} (by {})",
                    time(page, *at),
                    esc(by)
                )
            }
        }
        Verdict::Diverged {
            since_seq,
            rows,
            repairing,
            detail,
        } => {
            let head = match (zh, repairing) {
                (true, true) => format!("不一致：自序号 #{since_seq} 起 {rows} 行不同，正在修复"),
                (true, false) => format!("不一致：自序号 #{since_seq} 起 {rows} 行不同"),
                (false, true) => {
                    format!("diverged since seq #{since_seq}: {rows} rows, being repaired")
                }
                (false, false) => format!("diverged since seq #{since_seq}: {rows} rows"),
            };
            format!(
                "{}<br><span class=\"muted\" lang=\"en\">{}</span>",
                esc(&head),
                esc(detail)
            )
        }
        Verdict::Unverified => page.l(Text::Unverified),
    }
}

/// An instant: RFC 3339 UTC, and how long ago it was.
fn time(page: &Page, t: UnixMillis) -> String {
    let ago = page.lang.ago(page.now.0.saturating_sub(t.0) / 1000);
    let t = esc(&t.to_string());
    format!(
        "<time datetime=\"{t}\">{t}</time> <span class=\"ago\">({})</span>",
        esc(&ago)
    )
}

fn opt_time(page: &Page, t: Option<UnixMillis>) -> String {
    t.map_or_else(|| "-".to_string(), |t| time(page, t))
}

/// A resource state badge; `attrs` are extra attributes (trusted text).
fn badge_with(lang: Lang, s: ResourceState, attrs: &str) -> String {
    format!(
        "<span class=\"state state-{0}\" data-state=\"{0}\"{attrs}>{1}</span>",
        s.as_str(),
        esc(lang.state(s))
    )
}

fn badge(lang: Lang, s: ResourceState) -> String {
    badge_with(lang, s, "")
}

/// A long key or hash: its first `n` characters, the whole in the title.
fn short(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("<code title=\"{}\">{}…</code>", esc(s), esc(&s[..i])),
        None => format!("<code>{}</code>", esc(s)),
    }
}

fn yes_no(page: &Page, b: bool) -> String {
    page.l(if b { Text::Yes } else { Text::No })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| esc(&v.to_string()))
}

/// An update cycle in the page's language (custom periods as `30s`).
fn cycle_label(lang: Lang, c: UpdateCycle) -> String {
    match (lang, c) {
        (Lang::Zh, UpdateCycle::Every(_)) | (Lang::En, _) => c.to_string(),
        (Lang::Zh, _) => c.chinese().to_string(),
    }
}

/// An update cycle given as text (as in the status), in the page's language.
fn cycle_text(lang: Lang, c: &str) -> String {
    c.parse::<UpdateCycle>()
        .map_or_else(|_| c.to_string(), |c| cycle_label(lang, c))
}

/// The freshness rule of a resource, when it declares an update cycle.
fn freshness_rule(page: &Page, e: &ResourceEntry, grace_secs: u64) -> Option<String> {
    let cycle = esc(&cycle_text(page.lang, e.update_cycle.as_deref()?));
    let due = e.fresh_until.map(|t| time(page, t));
    Some(page.lang.freshness_rule(&cycle, grace_secs, due.as_deref()))
}

/// A table with translated column labels; `rows` is markup.
fn table(page: &Page, id: &str, headers: &[Text], rows: &str) -> String {
    let headers: Vec<&str> = headers.iter().map(|h| page.t(*h)).collect();
    table_of(id, &headers, rows)
}

/// A table whose column names are data (escaped here).
fn table_of(id: &str, headers: &[&str], rows: &str) -> String {
    let head: String = headers
        .iter()
        .map(|h| format!("<th>{}</th>", esc(h)))
        .collect();
    format!(
        "<div class=\"scroll\"><table id=\"{id}\"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    )
}

/// A definition list of already rendered values.
fn facts(items: &[(String, String)]) -> String {
    let inner: String = items
        .iter()
        .map(|(k, v)| format!("<dt>{k}</dt><dd>{v}</dd>"))
        .collect();
    format!("<dl class=\"facts\">{inner}</dl>")
}

/// The full document around a body.
pub fn layout(page: &Page, title: &str, body: &str) -> String {
    let lang = page.lang;
    let current = |href: &str| match href {
        "/" => {
            page.path == "/"
                || page.path.starts_with("/departments/")
                || page.path.starts_with("/resources/")
        }
        _ => page.path == href || page.path.starts_with(&format!("{href}/")),
    };
    let aria = |yes: bool| if yes { " aria-current=\"page\"" } else { "" };
    let nav: String = [
        ("/", Text::Overview),
        ("/audit", Text::Audit),
        ("/catalog", Text::Catalog),
        ("/federation", Text::Federation),
    ]
    .iter()
    .map(|(href, key)| {
        format!(
            "<a href=\"{href}\"{}>{}</a>",
            aria(current(href)),
            page.l(*key)
        )
    })
    .collect();
    let switch = format!(
        "<nav class=\"lang\" aria-label=\"{}\"><a id=\"lang-zh\" lang=\"zh-CN\" href=\"{}\"{}>中文</a> | <a id=\"lang-en\" lang=\"en\" href=\"{}\"{}>English</a></nav>",
        page.l(Text::Language),
        esc(&lang_href(page, Lang::Zh)),
        aria(lang == Lang::Zh),
        esc(&lang_href(page, Lang::En)),
        aria(lang == Lang::En),
    );
    let logout = if page.logged_in {
        format!(
            "<form method=\"post\" action=\"/logout\"><span id=\"account\">{}</span> <button id=\"logout\" type=\"submit\">{}</button></form>",
            esc(page.account.unwrap_or("")),
            page.l(Text::LogOut)
        )
    } else {
        String::new()
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"{html_lang}\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{title} · {hub}</title>\n<link rel=\"stylesheet\" href=\"/console.css\">\n</head>\n<body>\n<header><a class=\"hub\" href=\"/\">{hub}</a><nav>{nav}</nav>{switch}{logout}</header>\n<main id=\"content\">{body}</main>\n<script src=\"/console.js\"></script>\n</body>\n</html>\n",
        html_lang = lang.html_lang(),
        title = esc(title),
        hub = esc(page.hub_name),
    )
}

/// The overview: agents, resources by state, history, departments.
pub fn overview(page: &Page, o: &Overview) -> String {
    let lang = page.lang;
    let mut s = format!("<h1>{}</h1>", page.l(Text::Overview));
    let started = o
        .started_at
        .map(|t| format!(" · {} {}", page.l(Text::StartedAt), time(page, t)))
        .unwrap_or_default();
    s.push_str(&format!(
        "<p class=\"muted\">{} · {} {} · {} {}{started}</p>",
        esc(&o.hub),
        page.l(Text::HubKey),
        short(&o.node, 16),
        page.l(Text::Software),
        esc(&o.software),
    ));
    if let Some(since) = o.store.failing_since {
        s.push_str(&format!(
            "<p class=\"error\" id=\"store-failing\" role=\"alert\"><b>{}</b> ({} {}): {}<br>{}</p>",
            page.l(Text::StoreCannotWrite),
            page.l(Text::FailingSince),
            time(page, since),
            esc(o.store.error.as_deref().unwrap_or("?")),
            page.l(Text::StoreCannotWriteDetail),
        ));
    }
    if let Some(e) = &o.unreadable {
        s.push_str(&format!(
            "<p class=\"error\" id=\"store-unreadable\">{}: {}</p>",
            page.l(Text::StoreCannotRead),
            esc(e)
        ));
    }
    let states: String = o
        .states
        .iter()
        .map(|(st, n)| {
            format!(
                "<li class=\"state-count\" data-state=\"{0}\" data-count=\"{n}\">{1} <b id=\"count-{0}\">{n}</b></li>",
                st.as_str(),
                badge(lang, *st)
            )
        })
        .collect();
    let latest = o.history.last();
    let changes: Vec<f64> = o.history.iter().map(|h| h.changes_per_sec).collect();
    let backlog: Vec<f64> = o.history.iter().map(|h| h.backlog_batches as f64).collect();
    let no_history = || format!("<span class=\"muted\">{}</span>", page.l(Text::NoHistory));
    let changes_caption = latest.map_or_else(no_history, |h| {
        format!("{} {:.1}", page.l(Text::Latest), h.changes_per_sec)
    });
    let backlog_caption = latest.map_or_else(no_history, |h| {
        format!(
            "{} {} {} · {} {} {}",
            page.l(Text::Latest),
            h.backlog_batches,
            page.l(Text::Batches),
            page.l(Text::MaxLag),
            h.max_lag_secs,
            page.l(Text::Seconds),
        )
    });
    s.push_str(&format!(
        "<div class=\"cards\">\
         <section class=\"card\"><h2>{agents}</h2><span class=\"big\" id=\"agents-online\">{on}</span> {online} · <span class=\"big\" id=\"agents-offline\">{off}</span> {offline}</section>\
         <section class=\"card\"><h2>{by_state}</h2><ul class=\"states\" id=\"states\">{states}</ul></section>\
         <section class=\"card\"><h2>{changes_label}</h2><figure id=\"spark-changes\">{changes_svg}<figcaption>{changes_caption}</figcaption></figure></section>\
         <section class=\"card\"><h2>{backlog_label}</h2><figure id=\"spark-backlog\">{backlog_svg}<figcaption>{backlog_caption}</figcaption></figure></section>\
         </div>",
        agents = page.l(Text::Agents),
        on = o.agents_online,
        online = page.l(Text::Online),
        off = o.agents_offline,
        offline = page.l(Text::Offline),
        by_state = page.l(Text::ResourcesByState),
        changes_label = page.l(Text::ChangesPerSecond),
        changes_svg = sparkline(&changes, 240, 40),
        backlog_label = page.l(Text::Backlog),
        backlog_svg = sparkline(&backlog, 240, 40),
    ));
    s.push_str(&format!("<h2>{}</h2>", page.l(Text::Departments)));
    if o.departments.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoDepartments)
        ));
        return s;
    }
    let rows: String = o
        .departments
        .iter()
        .map(|d| {
            let by_state: String = ResourceState::ALL
                .iter()
                .filter_map(|st| {
                    let n = d.resources.iter().filter(|r| r.state == *st).count();
                    (n > 0).then(|| format!("<span>{} {n}</span>", badge(lang, *st)))
                })
                .collect();
            format!(
                "<tr class=\"department\" data-department=\"{code}\"><td><a href=\"{href}\">{code}</a></td><td>{name}</td><td class=\"num\">{on}/{total}</td><td class=\"num\">{n}</td><td>{worst}</td><td><div class=\"by-state\">{by_state}</div></td></tr>",
                code = esc(&d.code),
                href = esc(&department_href(&d.code)),
                name = esc(&d.name),
                on = d.agents_online,
                total = d.agents.len(),
                n = d.resources.len(),
                worst = d.worst().map_or_else(|| "-".to_string(), |w| badge(lang, w)),
            )
        })
        .collect();
    s.push_str(&table(
        page,
        "departments",
        &[
            Text::Code,
            Text::Name,
            Text::Agents,
            Text::ResourceCount,
            Text::WorstState,
            Text::ResourcesByState,
        ],
        &rows,
    ));
    s
}

/// A department: its agents and its resources.
pub fn department(page: &Page, d: &DepartmentView) -> String {
    let mut s = format!(
        "<h1>{} <code>{}</code> {}</h1><p><a href=\"/\">← {}</a></p>",
        page.l(Text::Department),
        esc(&d.code),
        esc(&d.name),
        page.l(Text::BackToOverview),
    );
    s.push_str(&format!("<h2>{}</h2>", page.l(Text::Agents)));
    if d.agents.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoAgents)
        ));
    } else {
        let rows: String = d
            .agents
            .iter()
            .map(|a| {
                let outbox = match &a.report {
                    Some(r) => format!(
                        "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td>",
                        r.outbox_batches,
                        r.outbox_bytes,
                        r.outbox_limit_bytes,
                        yes_no(page, r.capture_paused)
                    ),
                    None => "<td>-</td><td>-</td><td>-</td><td>-</td>".to_string(),
                };
                format!(
                    "<tr class=\"agent\" data-connected=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{outbox}</tr>",
                    a.connected,
                    short(&a.key, 16),
                    esc(&a.name),
                    yes_no(page, a.connected),
                    opt_time(page, a.connected_since),
                    opt(a.remote.as_deref()),
                    opt(a.software.as_deref()),
                )
            })
            .collect();
        s.push_str(&table(
            page,
            "agents",
            &[
                Text::AgentKey,
                Text::Name,
                Text::Connected,
                Text::Since,
                Text::Remote,
                Text::Software,
                Text::OutboxBatches,
                Text::OutboxBytes,
                Text::OutboxLimit,
                Text::CapturePaused,
            ],
            &rows,
        ));
    }
    s.push_str(&format!("<h2>{}</h2>", page.l(Text::Resources)));
    if d.resources.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoResources)
        ));
        return s;
    }
    let rows: String = d
        .resources
        .iter()
        .map(|r| resource_row(page, r, d.grace_secs))
        .collect();
    s.push_str(&table(
        page,
        "resources",
        &[
            Text::Resource,
            Text::Table,
            Text::State,
            Text::UpdateCycle,
            Text::LastChange,
            Text::LastZeroUpdate,
            Text::Lag,
            Text::Rows,
            Text::LastSeq,
            Text::Rejected,
            Text::Verification,
        ],
        &rows,
    ));
    s
}

/// The lag: batches waiting at the agent and seconds since the last update.
fn lag(page: &Page, r: &ResourceRow) -> String {
    let parts: Vec<String> = [
        r.lag
            .batches
            .map(|n| format!("{n} {}", page.l(Text::Batches))),
        r.lag
            .seconds
            .map(|n| format!("{n} {}", page.l(Text::Seconds))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(" · ")
    }
}

fn rejection_title(e: &ResourceEntry) -> String {
    e.last_rejection
        .as_ref()
        .map(|j| format!("#{} {}: {}", j.seq, j.reason.name(), j.detail))
        .unwrap_or_default()
}

fn resource_row(page: &Page, r: &ResourceRow, grace_secs: u64) -> String {
    let e = &r.entry;
    let rule = freshness_rule(page, e, grace_secs)
        .map(|rule| format!("<div class=\"rule\">{rule}</div>"))
        .unwrap_or_default();
    let cycle = e.update_cycle.as_deref().map_or_else(
        || format!("<span class=\"muted\">{}</span>", page.l(Text::NotDeclared)),
        |c| esc(&cycle_text(page.lang, c)),
    );
    format!(
        "<tr class=\"resource\" data-feed=\"{feed}\" data-state=\"{state}\"><td><a href=\"{href}\">{code}</a></td><td>{table}</td><td>{badge}{rule}</td><td>{cycle}</td><td>{change}</td><td>{zero}</td><td>{lag}</td><td class=\"num\">{rows}</td><td class=\"num\">{seq}</td><td class=\"num\" title=\"{rejection}\">{rejected}</td><td>{verdict}</td></tr>",
        feed = esc(&e.feed),
        state = r.state.as_str(),
        href = esc(&resource_href(&r.department, &e.resource)),
        code = esc(&e.resource),
        table = opt(e.table.as_deref()),
        badge = badge(page.lang, r.state),
        change = opt_time(page, e.last_change_at),
        zero = opt_time(page, e.last_zero_update.as_ref().map(|z| z.received_at)),
        lag = lag(page, r),
        rows = e.rows,
        seq = e.last_seq,
        rejection = esc(&rejection_title(e)),
        rejected = e.rejected,
        verdict = verdict(page, &e.verdict),
    )
}

/// One resource: state, catalog entry, verification, batches, sample.
pub fn resource(page: &Page, r: &ResourceView) -> String {
    let lang = page.lang;
    let row = &r.row;
    let e = &row.entry;
    let mut s = format!(
        "<h1>{} <code>{}</code></h1><p>{} <a href=\"{}\">{} {}</a> · {} <code>{}</code></p>",
        page.l(Text::Resource),
        esc(&e.resource),
        page.l(Text::Department),
        esc(&department_href(&row.department)),
        esc(&row.department),
        esc(&r.department_name),
        page.l(Text::Feed),
        esc(&e.feed),
    );
    s.push_str(&format!(
        "<p>{}: {}</p>",
        page.l(Text::State),
        badge_with(lang, row.state, " id=\"resource-state\"")
    ));
    let rule = freshness_rule(page, e, r.grace_secs).unwrap_or_else(|| {
        format!(
            "{}: {}",
            page.l(Text::UpdateCycle),
            page.l(Text::NotDeclared)
        )
    });
    s.push_str(&format!(
        "<p class=\"rule\" id=\"freshness-rule\">{}: {rule}</p>",
        page.l(Text::FreshnessRule)
    ));
    let resync = e.resync.as_ref().map(|x| {
        let status = match &x.finished {
            None => format!(
                "{}, {} {}",
                page.l(Text::Running),
                x.rows_written,
                page.l(Text::Rows)
            ),
            Some(f) => format!(
                "{} {} · {} {} · {} {}",
                page.l(Text::Finished),
                time(page, f.at),
                f.rows_sent,
                page.l(Text::Rows),
                page.l(Text::RowsRemoved),
                f.rows_removed
            ),
        };
        (
            page.l(Text::Resync),
            format!(
                "#{} {} ({}) · {status}",
                x.started_seq,
                time(page, x.started_at),
                esc(&x.reason)
            ),
        )
    });
    let mut items = vec![
        (page.l(Text::Table), opt(e.table.as_deref())),
        (
            page.l(Text::UpdateCycle),
            e.update_cycle
                .as_deref()
                .map_or_else(|| page.l(Text::NotDeclared), |c| esc(&cycle_text(lang, c))),
        ),
        (page.l(Text::LastSeq), e.last_seq.to_string()),
        (page.l(Text::Rows), e.rows.to_string()),
        (page.l(Text::BatchesApplied), e.batches_applied.to_string()),
        (page.l(Text::ChangesApplied), e.changes_applied.to_string()),
        (
            page.l(Text::LastBatch),
            opt_time(page, e.last_batch_received_at),
        ),
        (page.l(Text::LastChange), opt_time(page, e.last_change_at)),
        (
            page.l(Text::LastZeroUpdate),
            e.last_zero_update.as_ref().map_or_else(
                || "-".to_string(),
                |z| format!("#{} {}", z.seq, time(page, z.received_at)),
            ),
        ),
        (page.l(Text::Lag), lag(page, row)),
        (page.l(Text::Connected), yes_no(page, e.connected)),
        (
            page.l(Text::Signer),
            e.signer
                .as_deref()
                .map_or_else(|| "-".to_string(), |k| short(k, 16)),
        ),
        (page.l(Text::Rejected), e.rejected.to_string()),
    ];
    if e.last_rejection.is_some() {
        items.push((page.l(Text::LastRejection), esc(&rejection_title(e))));
    }
    items.extend(resync);
    s.push_str(&facts(&items));

    s.push_str(&format!("<h2>{}</h2>", page.l(Text::Catalog)));
    s.push_str(&match &r.catalog {
        Some(c) => catalog_entry(page, c),
        None => format!(
            "<p class=\"muted\" id=\"not-catalogued\">{}</p>",
            page.l(Text::NotCatalogued)
        ),
    });

    s.push_str(&format!("<h2>{}</h2>", page.l(Text::Verification)));
    s.push_str(&verification(page, e));

    s.push_str(&format!("<h2>{}</h2>", page.l(Text::RecentBatches)));
    if r.batches.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoBatches)
        ));
    } else {
        let rows: String = r
            .batches
            .iter()
            .map(|b| {
                format!(
                    "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    b.seq,
                    time(page, b.sealed_at),
                    short(&b.signer, 16),
                    b.changes,
                    yes_no(page, b.zero_update),
                    b.other_entries,
                    b.bytes,
                    short(&b.hash, 16),
                )
            })
            .collect();
        s.push_str(&table(
            page,
            "batches",
            &[
                Text::Seq,
                Text::SealedAt,
                Text::Signer,
                Text::Changes,
                Text::ZeroUpdate,
                Text::OtherEntries,
                Text::Bytes,
                Text::Hash,
            ],
            &rows,
        ));
    }

    s.push_str(&format!("<h2>{}</h2>", page.l(Text::SampleRows)));
    if r.sample.columns.is_empty() && r.sample.rows.is_empty() {
        s.push_str(&format!("<p class=\"muted\">{}</p>", page.l(Text::NoRows)));
    } else {
        let columns: Vec<&str> = r.sample.columns.iter().map(String::as_str).collect();
        let rows: String = r
            .sample
            .rows
            .iter()
            .map(|row| {
                let cells: String = row.iter().map(|v| format!("<td>{}</td>", esc(v))).collect();
                format!("<tr>{cells}</tr>")
            })
            .collect();
        s.push_str(&table_of("sample", &columns, &rows));
    }
    s
}

/// A catalog entry's metadata (信息资源目录), its state and review.
fn catalog_entry(page: &Page, c: &CityEntry) -> String {
    let lang = page.lang;
    let en = &c.entry;
    let pick = |zh: &'static str, english: &'static str| esc(lang.pick(zh, english));
    let text = |v: &str| {
        if v.trim().is_empty() {
            "-".to_string()
        } else {
            esc(v)
        }
    };
    let provider = match (en.provider.trim(), en.provider_code.trim()) {
        (p, "") => text(p),
        (p, code) => format!("{} (<code>{}</code>)", text(p), esc(code)),
    };
    let methods: Vec<&str> = en
        .share_methods
        .iter()
        .map(|m| lang.pick(m.chinese(), m.english()))
        .collect();
    let mut items = vec![
        (page.l(Text::Name), text(&en.name)),
        (page.l(Text::Summary), text(&en.summary)),
        (page.l(Text::Provider), provider),
        (
            page.l(Text::ResourceClass),
            en.resource_class
                .map_or_else(|| "-".to_string(), |v| pick(v.chinese(), v.english())),
        ),
        (
            page.l(Text::Format),
            en.format
                .map_or_else(|| "-".to_string(), |v| pick(v.chinese(), v.english())),
        ),
        (page.l(Text::ShareType), share_type(lang, en)),
    ];
    if !en.share_conditions.trim().is_empty() {
        items.push((page.l(Text::ShareConditions), esc(&en.share_conditions)));
    }
    if !en.legal_basis.trim().is_empty() {
        items.push((page.l(Text::LegalBasis), esc(&en.legal_basis)));
    }
    items.push((page.l(Text::ShareMethods), text(&methods.join(", "))));
    items.push((
        page.l(Text::OpenType),
        en.open_type
            .map_or_else(|| "-".to_string(), |v| pick(v.chinese(), v.english())),
    ));
    if !en.open_conditions.trim().is_empty() {
        items.push((page.l(Text::OpenConditions), esc(&en.open_conditions)));
    }
    items.push((page.l(Text::UpdateCycle), entry_cycle(lang, en)));
    items.push((page.l(Text::EntryState), entry_state(lang, c.state)));
    items.push((page.l(Text::Review), review(page, c)));
    if !c.problems.is_empty() {
        let list: String = c
            .problems
            .iter()
            .map(|p| format!("<li>{}</li>", esc(&p.to_string())))
            .collect();
        items.push((page.l(Text::Problems), format!("<ul>{list}</ul>")));
    }
    let mut s = facts(&items);
    if !en.data_items.is_empty() {
        let rows: String = en
            .data_items
            .iter()
            .map(|i| {
                format!(
                    "<tr><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&i.name),
                    esc(&i.data_type),
                    opt(i.length),
                    esc(&i.description),
                    yes_no(page, i.sensitive),
                )
            })
            .collect();
        s.push_str(&format!("<h3>{}</h3>", page.l(Text::DataItems)));
        s.push_str(&table(
            page,
            "data-items",
            &[
                Text::Name,
                Text::DataType,
                Text::Length,
                Text::Description,
                Text::Sensitive,
            ],
            &rows,
        ));
    }
    s
}

fn share_type(lang: Lang, e: &CatalogEntry) -> String {
    e.share_type.map_or_else(
        || "-".to_string(),
        |v| esc(lang.pick(v.chinese(), v.english())),
    )
}

fn entry_cycle(lang: Lang, e: &CatalogEntry) -> String {
    e.update_cycle
        .map_or_else(|| "-".to_string(), |c| esc(&cycle_label(lang, c)))
}

fn entry_state(lang: Lang, s: EntryState) -> String {
    format!(
        "<span class=\"entry-state\" data-entry-state=\"{}\">{}</span>",
        s.english(),
        esc(lang.pick(s.chinese(), s.english()))
    )
}

/// The platform's review of an entry: status, reviewer, remarks, when.
fn review(page: &Page, c: &CityEntry) -> String {
    match &c.review {
        Some(r) => format!(
            "{} · {} {} · {} {} · {}",
            esc(page.lang.pick(r.status.chinese(), r.status.english())),
            page.l(Text::Reviewer),
            esc(&r.reviewer),
            page.l(Text::Remarks),
            if r.remarks.is_empty() {
                "-".to_string()
            } else {
                esc(&r.remarks)
            },
            time(page, r.reviewed_at),
        ),
        None => format!("<span class=\"muted\">{}</span>", page.l(Text::NotReviewed)),
    }
}

/// The verdict and the key figures of the checkpoint and the runs.
fn verification(page: &Page, e: &ResourceEntry) -> String {
    let mut s = format!(
        "<p id=\"verdict\"><span class=\"muted\">{}:</span> {}</p>",
        page.l(Text::Verdict),
        verdict(page, &e.verdict)
    );
    let Some(VerifyRecord {
        checkpoint,
        run,
        last_run,
        ..
    }) = &e.verification
    else {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoVerification)
        ));
        return s;
    };
    if let Some(c) = checkpoint {
        let result = if c.matched() {
            page.l(Text::Matched)
        } else {
            format!(
                "{} #{}",
                page.l(Text::DifferingSince),
                opt(c.differing_since)
            )
        };
        s.push_str(&format!(
            "<p id=\"checkpoint\">{} #{} {}: {result}</p>",
            page.l(Text::Checkpoint),
            c.seq,
            time(page, c.at)
        ));
    }
    if let Some(run) = run {
        s.push_str(&format!("<h3>{}</h3>", page.l(Text::RunInProgress)));
        s.push_str(&run_facts(page, run, "verify-run"));
    }
    if let Some(run) = last_run {
        s.push_str(&format!("<h3>{}</h3>", page.l(Text::LastRun)));
        s.push_str(&run_facts(page, run, "verify-last-run"));
    }
    s
}

fn run_facts(page: &Page, run: &VerifyRun, id: &str) -> String {
    let mut items = vec![
        (
            page.l(Text::Run),
            format!(
                "#{} · {} · {}",
                run.id,
                esc(page.lang.run_origin(run.origin)),
                time(page, run.started_at)
            ),
        ),
        (page.l(Text::Reason), esc(&run.reason)),
        (page.l(Text::StartedSeq), run.started_seq.to_string()),
        (
            page.l(Text::RangesCompared),
            run.ranges_compared.to_string(),
        ),
        (
            page.l(Text::RangesDiffering),
            run.ranges_differing.to_string(),
        ),
        (page.l(Text::RangesPending), run.pending.len().to_string()),
        (page.l(Text::Unresolved), run.unresolved.to_string()),
        (page.l(Text::RowsRepaired), run.rows_repaired.to_string()),
        (page.l(Text::RowsRemoved), run.rows_removed.to_string()),
        (
            page.l(Text::BytesExchanged),
            format!("{} / {}", run.bytes_received, run.bytes_sent),
        ),
    ];
    if !run.keys.is_empty() {
        let keys: Vec<String> = run.keys.iter().map(|k| esc(k)).collect();
        items.push((page.l(Text::Keys), keys.join(", ")));
    }
    if let Some(end) = &run.finished {
        let outcome = if end.refused {
            page.l(Text::ComparisonRefused)
        } else if end.verified {
            page.l(Text::Verified)
        } else {
            page.l(Text::NotVerified)
        };
        items.push((
            page.l(Text::Outcome),
            format!(
                "{outcome} · #{} · {} · <span lang=\"en\">{}</span>",
                end.seq,
                time(page, end.at),
                esc(&end.detail)
            ),
        ));
    }
    format!("<div id=\"{id}\">{}</div>", facts(&items))
}

/// The audit log with its filters.
pub fn audit(page: &Page, entries: &[AuditEntry], total: u64, q: &AuditQuery) -> String {
    let lang = page.lang;
    let current = q.kind.as_deref().unwrap_or("");
    let options: String = AUDIT_KINDS
        .iter()
        .map(|k| {
            let code = k.name();
            let selected = if code == current { " selected" } else { "" };
            format!(
                "<option value=\"{0}\"{selected}>{1} ({0})</option>",
                esc(&code),
                esc(lang.audit_kind(*k))
            )
        })
        .collect();
    let mut s = format!(
        "<h1>{title}</h1>\
         <form method=\"get\" action=\"/audit\" class=\"filters\" id=\"audit-filter\">\
         <label>{kind} <select name=\"kind\"><option value=\"\">{all}</option>{options}</select></label>\
         <label>{feed} <input type=\"text\" name=\"feed\" value=\"{feed_value}\" placeholder=\"DEPT:RES\"></label>\
         <label>{search} <input type=\"text\" name=\"q\" value=\"{q_value}\"></label>\
         <label>{limit} <input type=\"number\" name=\"limit\" min=\"1\" max=\"{max}\" value=\"{limit_value}\" placeholder=\"{default}\"></label>\
         <button type=\"submit\">{filter}</button></form>\
         <p id=\"audit-count\">{showing}</p>",
        title = page.l(Text::Audit),
        kind = page.l(Text::Kind),
        all = page.l(Text::AllKinds),
        feed = page.l(Text::Feed),
        feed_value = esc(q.feed.as_deref().unwrap_or("")),
        search = page.l(Text::Search),
        q_value = esc(q.q.as_deref().unwrap_or("")),
        limit = page.l(Text::Limit),
        max = AuditQuery::MAX_LIMIT,
        limit_value = q.limit.map(|l| l.to_string()).unwrap_or_default(),
        default = AuditQuery::DEFAULT_LIMIT,
        filter = page.l(Text::Filter),
        showing = esc(&lang.showing(entries.len(), total)),
    );
    if entries.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoEntries)
        ));
        return s;
    }
    let rows: String = entries
        .iter()
        .map(|a| {
            let code = esc(&a.kind.name());
            format!(
                "<tr class=\"audit\" data-kind=\"{code}\"><td class=\"num\">{}</td><td>{}</td><td>{} <code>{code}</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                a.id,
                time(page, a.at),
                esc(lang.audit_kind(a.kind)),
                a.peer.as_ref().map_or_else(|| "-".to_string(), |p| short(&p.to_string(), 16)),
                opt(a.feed.as_ref()),
                opt(a.seq),
                opt(a.reason.map(|r| r.name())),
                esc(&a.detail),
            )
        })
        .collect();
    s.push_str(&table(
        page,
        "audit",
        &[
            Text::Id,
            Text::Time,
            Text::Kind,
            Text::Peer,
            Text::Feed,
            Text::Seq,
            Text::Reason,
            Text::Detail,
        ],
        &rows,
    ));
    s
}

/// The federation (级联) page: the link to the parent hub, the child hubs
/// enrolled here, and the tree of feeds below with each level's lag; for a
/// hub with neither, how to set it up.
pub fn federation(page: &Page, f: &FederationView) -> String {
    let mut s = format!("<h1>{}</h1>", page.l(Text::Federation));
    if f.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\" id=\"federation-setup\">{}</p>",
            page.lang.federation_setup(
                "<code>[upstream]</code>",
                "<code>shuyuan-hub enroll --hub CODE --name NAME KEY</code>"
            )
        ));
        return s;
    }
    if let Some(u) = &f.upstream {
        s.push_str(&upstream(page, u, &f.here));
    }
    s.push_str(&format!("<h2>{}</h2>", page.l(Text::ChildHubs)));
    if f.children.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\" id=\"no-child-hubs\">{}</p>",
            page.l(Text::NoChildHubs)
        ));
        return s;
    }
    let rows: String = f.children.iter().map(|c| child_hub(page, c)).collect();
    s.push_str(&table(
        page,
        "child-hubs",
        &[
            Text::PlatformCode,
            Text::Name,
            Text::HubKey,
            Text::Connected,
            Text::Software,
            Text::DepartmentsBelow,
        ],
        &rows,
    ));
    s.push_str(&format!("<h2>{}</h2>", page.l(Text::FederationTree)));
    if f.tree.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\" id=\"no-tree\">{}</p>",
            page.l(Text::NoTreeReport)
        ));
        return s;
    }
    let rows: String = f.tree.iter().map(|r| tree_row(page, r, &f.here)).collect();
    s.push_str(&table(
        page,
        "federation-tree",
        &[
            Text::Hub,
            Text::Feed,
            Text::HeadThere,
            Text::HeadAbove,
            Text::Lag,
            Text::LastBatch,
        ],
        &rows,
    ));
    s
}

/// A feed (`DEPT:RES`): a link to its page when this hub holds it.
fn feed_link(feed: &str, here: &BTreeSet<String>) -> String {
    match feed.split_once(':') {
        Some((dept, res)) if here.contains(feed) => format!(
            "<a href=\"{}\">{}</a>",
            esc(&resource_href(dept, res)),
            esc(feed)
        ),
        _ => format!("<code>{}</code>", esc(feed)),
    }
}

/// The link to the parent hub and each feed's forwarding.
fn upstream(page: &Page, u: &UpstreamStatus, here: &BTreeSet<String>) -> String {
    let lang = page.lang;
    let class = match u.link.as_str() {
        "connected" => ResourceState::OnTime,
        "connecting" => ResourceState::Unknown,
        "refused" => ResourceState::Rejected,
        _ => ResourceState::Overdue,
    };
    let link = format!(
        "<span class=\"state state-{}\" id=\"upstream-link\" data-link=\"{}\">{}</span>{}",
        class.as_str(),
        esc(&u.link),
        esc(lang.link(&u.link).unwrap_or(u.link.as_str())),
        u.since
            .map(|t| format!(" · {} {}", page.l(Text::Since), time(page, t)))
            .unwrap_or_default()
    );
    let mut items = vec![
        (page.l(Text::ParentKey), short(&u.parent, 16)),
        (
            page.l(Text::Address),
            format!("<code>{}</code>", esc(&u.address)),
        ),
        (page.l(Text::Link), link),
    ];
    if let Some(d) = &u.detail {
        items.push((
            page.l(Text::LastError),
            format!("<span id=\"upstream-error\">{}</span>", esc(d)),
        ));
    }
    items.push((
        page.l(Text::ParentSoftware),
        opt(u.parent_software.as_deref()),
    ));
    items.push((
        page.l(Text::RefusedByParent),
        format!("<span id=\"upstream-rejections\">{}</span>", u.rejections),
    ));
    if let Some(r) = &u.last_rejection {
        items.push((page.l(Text::LastRejection), esc(r)));
    }
    if let Some(e) = &u.catalog_error {
        items.push((
            page.l(Text::CatalogError),
            format!("<span id=\"upstream-catalog-error\">{}</span>", esc(e)),
        ));
    }
    let mut s = format!(
        "<h2>{}</h2><div id=\"upstream\">{}</div>",
        page.l(Text::Upstream),
        facts(&items)
    );
    if u.feeds.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoResources)
        ));
        return s;
    }
    let rows: String = u.feeds.iter().map(|f| forward_row(page, f, here)).collect();
    s.push_str(&table(
        page,
        "upstream-feeds",
        &[
            Text::Feed,
            Text::HeadHere,
            Text::ParentHolds,
            Text::ForwardBacklog,
        ],
        &rows,
    ));
    s
}

/// One feed's forwarding: the parent's head and the backlog, or why it
/// stays here.
fn forward_row(page: &Page, f: &ForwardState, here: &BTreeSet<String>) -> String {
    let rest = match (&f.held, f.acked) {
        (Some(why), _) => format!(
            "<td class=\"held\" colspan=\"2\">{}</td>",
            page.lang.held(true, &esc(why))
        ),
        (None, Some(acked)) => {
            let backlog = f.head.saturating_sub(acked);
            format!(
                "<td class=\"num\">{acked}</td><td class=\"num{}\" data-backlog=\"{backlog}\">{backlog}</td>",
                if backlog > 0 { " lagging" } else { "" }
            )
        }
        (None, None) => "<td class=\"num\">?</td><td class=\"num\">?</td>".to_string(),
    };
    format!(
        "<tr class=\"forward\" data-feed=\"{}\" data-held=\"{}\"><td>{}</td><td class=\"num\">{}</td>{rest}</tr>",
        esc(&f.feed),
        f.held.is_some(),
        feed_link(&f.feed, here),
        f.head,
    )
}

/// A child hub: code, name, key, connection and the departments below.
fn child_hub(page: &Page, c: &ChildStatus) -> String {
    let mut connected = yes_no(page, c.connected);
    if let Some(t) = c.connected_since {
        connected.push_str(&format!(" · {}", time(page, t)));
    }
    if let Some(r) = &c.remote {
        connected.push_str(&format!(" · <code>{}</code>", esc(r)));
    }
    let departments = if c.departments.is_empty() {
        "-".to_string()
    } else {
        c.departments
            .iter()
            .map(|d| format!("<a href=\"{}\">{}</a>", esc(&department_href(d)), esc(d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "<tr class=\"child-hub\" data-code=\"{code}\" data-connected=\"{}\"><td><code>{code}</code></td><td>{}</td><td>{}</td><td>{connected}</td><td>{}</td><td>{departments}</td></tr>",
        c.connected,
        esc(&c.name),
        short(&c.key, 16),
        opt(c.software.as_deref()),
        code = esc(&c.code),
    )
}

/// One feed at one hub of the tree, indented by its depth.
fn tree_row(page: &Page, r: &TreeRow, here: &BTreeSet<String>) -> String {
    let lag = match (&r.held, r.lag) {
        (Some(why), _) => format!(
            "<td class=\"held\">{}</td>",
            page.lang.held(false, &esc(why))
        ),
        (None, Some(lag)) => format!(
            "<td class=\"num{}\" data-lag=\"{lag}\">{lag}</td>",
            if lag > 0 { " lagging" } else { "" }
        ),
        (None, None) => "<td class=\"num\">-</td>".to_string(),
    };
    // Indented by a class (the CSP allows no inline style); deeper than
    // the stylesheet's last level shows at that level.
    let indent = r.depth.clamp(1, 8);
    format!(
        "<tr class=\"tree-row\" data-depth=\"{depth}\" data-feed=\"{feed}\"><td class=\"depth-{indent}\">{mark}<span title=\"{key}\">{hub}</span></td><td>{link}</td><td class=\"num\">{seq}</td><td class=\"num\">{above}</td>{lag}<td>{received}</td></tr>",
        depth = r.depth,
        feed = esc(&r.feed),
        mark = if r.depth > 1 { "└ " } else { "" },
        key = esc(&r.hub_key),
        hub = esc(&r.hub),
        link = feed_link(&r.feed, here),
        seq = r.seq,
        above = opt(r.above),
        received = opt_time(page, r.received_at),
    )
}

/// A `<select>` of fixed choices; `current` is the chosen value's English
/// name, if any.
fn select(
    name: &str,
    label: &str,
    any: &str,
    choices: &[(&str, &str)],
    current: Option<&str>,
) -> String {
    let options: String = choices
        .iter()
        .map(|(value, text)| {
            let selected = if current == Some(*value) {
                " selected"
            } else {
                ""
            };
            format!(
                "<option value=\"{}\"{selected}>{}</option>",
                esc(value),
                esc(text)
            )
        })
        .collect();
    format!(
        "<label>{} <select name=\"{name}\"><option value=\"\">{}</option>{options}</select></label>",
        esc(label),
        esc(any)
    )
}

/// The city catalog with filters and, for entries awaiting review, the
/// review forms.
pub fn catalog(
    page: &Page,
    entries: &[CityEntry],
    filter: &Filter,
    notice: Option<&str>,
) -> String {
    let lang = page.lang;
    let any = page.t(Text::Any);
    let classes: Vec<(&str, &str)> = ResourceClass::ALL
        .iter()
        .map(|c| (c.english(), lang.pick(c.chinese(), c.english())))
        .collect();
    let shares: Vec<(&str, &str)> = ShareType::ALL
        .iter()
        .map(|t| (t.english(), lang.pick(t.chinese(), t.english())))
        .collect();
    let states: Vec<(&str, &str)> = [
        EntryState::Draft,
        EntryState::Submitted,
        EntryState::Published,
        EntryState::Returned,
        EntryState::Withdrawn,
    ]
    .iter()
    .map(|s| (s.english(), lang.pick(s.chinese(), s.english())))
    .collect();
    let cycles: String = [
        UpdateCycle::Realtime,
        UpdateCycle::Daily,
        UpdateCycle::Weekly,
        UpdateCycle::Monthly,
        UpdateCycle::Quarterly,
        UpdateCycle::HalfYearly,
        UpdateCycle::Yearly,
        UpdateCycle::Irregular,
    ]
    .iter()
    .map(|c| {
        format!(
            "<option value=\"{}\">{}</option>",
            esc(&c.to_string()),
            esc(c.chinese())
        )
    })
    .collect();
    let class_now = filter
        .class
        .as_deref()
        .and_then(|c| c.parse::<ResourceClass>().ok())
        .map(ResourceClass::english);
    let share_now = filter
        .share_type
        .as_deref()
        .and_then(|t| t.parse::<ShareType>().ok())
        .map(ShareType::english);
    let mut s = format!(
        "<h1>{title}</h1>\
         <form method=\"get\" action=\"/catalog\" class=\"filters\" id=\"catalog-filter\">\
         <label>{department} <input type=\"text\" name=\"department\" value=\"{department_value}\"></label>\
         {class}{share}\
         <label>{cycle} <input type=\"text\" name=\"cycle\" list=\"cycles\" value=\"{cycle_value}\"></label><datalist id=\"cycles\">{cycles}</datalist>\
         {state}<button type=\"submit\">{filter_label}</button></form>",
        title = page.l(Text::Catalog),
        department = page.l(Text::Department),
        department_value = esc(filter.department.as_deref().unwrap_or("")),
        class = select(
            "class",
            page.t(Text::ResourceClass),
            any,
            &classes,
            class_now
        ),
        share = select(
            "share_type",
            page.t(Text::ShareType),
            any,
            &shares,
            share_now
        ),
        cycle = page.l(Text::UpdateCycle),
        cycle_value = esc(filter.cycle.as_deref().unwrap_or("")),
        state = select(
            "state",
            page.t(Text::EntryState),
            any,
            &states,
            filter.state.as_deref()
        ),
        filter_label = page.l(Text::Filter),
    );
    if let Some(n) = notice {
        s.push_str(&format!("<p class=\"notice\" id=\"notice\">{}</p>", esc(n)));
    }
    if entries.is_empty() {
        s.push_str(&format!(
            "<p class=\"muted\">{}</p>",
            page.l(Text::NoEntries)
        ));
        return s;
    }
    let rows: String = entries
        .iter()
        .map(|c| {
            let problems: Vec<String> = c.problems.iter().map(ToString::to_string).collect();
            let actions = if c.state == EntryState::Submitted {
                review_forms(page, c)
            } else {
                String::new()
            };
            format!(
                "<tr class=\"entry\" data-department=\"{dept}\" data-code=\"{code}\" data-entry-state=\"{state_code}\"><td>{dept}</td><td><code>{code}</code></td><td>{name}</td><td>{cycle}</td><td>{share}</td><td>{state}</td><td>{review}</td><td class=\"num problems\" title=\"{titles}\">{n}</td><td>{actions}</td></tr>",
                dept = esc(&c.department),
                code = esc(&c.entry.code),
                state_code = c.state.english(),
                name = esc(&c.entry.name),
                cycle = entry_cycle(lang, &c.entry),
                share = share_type(lang, &c.entry),
                state = entry_state(lang, c.state),
                review = review(page, c),
                titles = esc(&problems.join("\n")),
                n = problems.len(),
            )
        })
        .collect();
    s.push_str(&table(
        page,
        "catalog",
        &[
            Text::Department,
            Text::Code,
            Text::Name,
            Text::UpdateCycle,
            Text::ShareType,
            Text::EntryState,
            Text::Review,
            Text::Problems,
            Text::Actions,
        ],
        &rows,
    ));
    s
}

/// Approve (审核通过) and return (退回修改) forms for one entry.
fn review_forms(page: &Page, c: &CityEntry) -> String {
    let form = |approve: bool| {
        let (value, class, button, remarks, required) = if approve {
            ("1", "approve", Text::Approve, Text::Remarks, "")
        } else {
            (
                "0",
                "return",
                Text::Return,
                Text::RemarksRequired,
                " required",
            )
        };
        format!(
            "<form method=\"post\" action=\"/catalog/review\" class=\"review\">\
             <input type=\"hidden\" name=\"department\" value=\"{dept}\">\
             <input type=\"hidden\" name=\"code\" value=\"{code}\">\
             <input type=\"hidden\" name=\"approve\" value=\"{value}\">\
             {reviewer}\
             <input type=\"text\" name=\"remarks\"{required} placeholder=\"{remarks}\" aria-label=\"{remarks}\">\
             <button type=\"submit\" class=\"{class}\">{button}</button></form>",
            dept = esc(&c.department),
            code = esc(&c.entry.code),
            // A logged-in administrator is the reviewer; only an open
            // console asks for a name.
            reviewer = match page.account {
                Some(_) => String::new(),
                None => format!(
                    "<input type=\"text\" name=\"reviewer\" required placeholder=\"{r}\" aria-label=\"{r}\">",
                    r = page.l(Text::ReviewerRequired)
                ),
            },
            remarks = page.l(remarks),
            button = page.l(button),
        )
    };
    format!("{}{}", form(true), form(false))
}

/// The login form; `next` is where to go after logging in.
pub fn login(page: &Page, error: Option<&str>, next: &str) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<h1>{title}</h1>{error}\
         <form method=\"post\" action=\"/login\" id=\"login\">\
         <input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <p><label for=\"user\">{user}</label> \
         <input type=\"text\" name=\"user\" id=\"user\" required autofocus autocomplete=\"username\"></p>\
         <p><label for=\"password\">{password}</label> \
         <input type=\"password\" name=\"password\" id=\"password\" required autocomplete=\"current-password\"></p>\
         <p><button type=\"submit\" id=\"login-submit\">{title}</button></p></form>",
        title = page.l(Text::Login),
        next = esc(next),
        user = page.l(Text::Account),
        password = page.l(Text::Password),
    )
}

/// A page with a title and one message (not found, errors, confirmations).
pub fn message(page: &Page, title: &str, text: &str) -> String {
    format!(
        "<h1>{}</h1><p class=\"message\" id=\"message\">{}</p><p><a href=\"/\">← {}</a></p>",
        esc(title),
        esc(text),
        page.l(Text::BackToOverview)
    )
}

/// An inline SVG line of `values`, scaled so the largest touches the top;
/// empty, all-zero (and non-finite or negative) values lie flat at the
/// bottom.
pub fn sparkline(values: &[f64], width: u32, height: u32) -> String {
    let (w, h) = (f64::from(width), f64::from(height));
    let clean: Vec<f64> = values
        .iter()
        .map(|v| if v.is_finite() { v.max(0.0) } else { 0.0 })
        .collect();
    let max = clean.iter().copied().fold(0.0, f64::max);
    let base = h - 1.0;
    let span = (h - 2.0).max(0.0);
    let y = |v: f64| {
        if max > 0.0 {
            base - v / max * span
        } else {
            base
        }
    };
    let points: Vec<String> = match clean.as_slice() {
        [] => vec![format!("0,{base:.1}"), format!("{w:.1},{base:.1}")],
        [v] => vec![format!("0,{:.1}", y(*v)), format!("{w:.1},{:.1}", y(*v))],
        vs => {
            let step = w / (vs.len() - 1) as f64;
            vs.iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, y(*v)))
                .collect()
        }
    };
    format!(
        "<svg class=\"sparkline\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" preserveAspectRatio=\"none\" aria-hidden=\"true\"><polyline fill=\"none\" stroke=\"currentColor\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        points.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::view::Lag;
    use crate::apply::verification::Verdict;
    use crate::writer::StoreHealth;

    const NOW: UnixMillis = UnixMillis(1_800_000_000_000);

    fn page(lang: Lang) -> Page<'static> {
        Page {
            lang,
            path: "/departments/D1",
            query: "",
            hub_name: "市共享平台",
            logged_in: true,
            account: Some("zhang.wei"),
            now: NOW,
        }
    }

    fn entry(resource: &str, freshness: &str) -> ResourceEntry {
        ResourceEntry {
            resource: resource.to_string(),
            feed: format!("D1:{resource}"),
            table: Some("people".to_string()),
            schema_version: 1,
            connected: true,
            update_cycle: Some("2s".to_string()),
            freshness: freshness.to_string(),
            fresh_until: Some(UnixMillis(NOW.0 - 4_000)),
            last_seq: 7,
            rows: 12,
            batches_applied: 7,
            changes_applied: 30,
            last_batch_received_at: Some(UnixMillis(NOW.0 - 7_000)),
            last_change_at: Some(UnixMillis(NOW.0 - 7_000)),
            last_zero_update: None,
            rejected: 0,
            last_rejection: None,
            signer: None,
            resync: None,
            verdict: Verdict::Unverified,
            verification: None,
        }
    }

    fn department_view(name: &str) -> DepartmentView {
        let e = entry("101001/00003", "overdue");
        DepartmentView {
            code: "D1".to_string(),
            name: name.to_string(),
            agents_online: 0,
            agents: Vec::new(),
            resources: vec![ResourceRow {
                department: "D1".to_string(),
                state: ResourceState::of(&e),
                lag: Lag::default(),
                entry: e,
            }],
            grace_secs: 1,
        }
    }

    #[test]
    fn values_are_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let html = department(
            &page(Lang::En),
            &department_view("<script>alert(1)</script>"),
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        let doc = layout(&page(Lang::En), "<b>", "");
        assert!(doc.contains("<title>&lt;b&gt; · 市共享平台</title>"));
    }

    #[test]
    fn language_switch_keeps_other_parameters() {
        let p = Page {
            path: "/audit",
            query: "kind=batch_rejected&lang=en&q=a%20b",
            ..page(Lang::En)
        };
        assert_eq!(
            lang_href(&p, Lang::Zh),
            "/audit?kind=batch_rejected&q=a%20b&lang=zh"
        );
        let doc = layout(&p, "Audit", "");
        assert!(doc.contains(
            "<a id=\"lang-zh\" lang=\"zh-CN\" href=\"/audit?kind=batch_rejected&amp;q=a%20b&amp;lang=zh\""
        ));
        assert!(doc.contains("id=\"lang-en\""));
        assert!(doc.contains("<html lang=\"en\">"));
        assert!(doc.contains("<button id=\"logout\""));
        let bare = Page {
            query: "",
            logged_in: false,
            ..p
        };
        assert_eq!(lang_href(&bare, Lang::En), "/audit?lang=en");
        assert!(!layout(&bare, "Audit", "").contains("id=\"logout\""));
        let outside = Page {
            path: "//evil.example",
            ..bare
        };
        assert_eq!(lang_href(&outside, Lang::En), "/?lang=en");
    }

    #[test]
    fn sparklines_never_hold_nan() {
        for values in [
            vec![],
            vec![0.0],
            vec![0.0, 0.0, 0.0],
            vec![1.0, 3.0, 2.0],
            vec![f64::NAN, f64::INFINITY, -1.0, 2.0],
        ] {
            let svg = sparkline(&values, 120, 30);
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
        }
        let flat = sparkline(&[0.0, 0.0], 100, 20);
        assert!(flat.contains("points=\"0.0,19.0 100.0,19.0\""), "{flat}");
        let peak = sparkline(&[0.0, 4.0], 100, 20);
        assert!(peak.contains("points=\"0.0,19.0 100.0,1.0\""), "{peak}");
    }

    #[test]
    fn overdue_resources_are_marked_and_translated() {
        let d = department_view("民政局");
        let zh = department(&page(Lang::Zh), &d);
        assert!(zh.contains("data-state=\"overdue\""), "{zh}");
        assert!(zh.contains(
            "<span class=\"state state-overdue\" data-state=\"overdue\">逾期未更新</span>"
        ));
        assert!(zh.contains("更新周期 2s + 宽限 1s 内须有变更或零更新；截止 "));
        assert!(zh.contains("href=\"/resources/D1/101001%2F00003\""));
        let en = department(&page(Lang::En), &d);
        assert!(en.contains(">Overdue</span>"));
        assert!(en.contains("a change or zero-update is due within cycle 2s + grace 1s; due by "));
    }

    #[test]
    fn pages_carry_their_ids() {
        use crate::admin::view::{BatchSummary, RowSample, Sample};
        use shuyuan_protocol::catalog::{Lifecycle, Review, ReviewStatus};

        let p = page(Lang::Zh);
        let d = department_view("民政局");
        let o = Overview {
            hub: "hub".to_string(),
            node: "abcdefghijklmnopqrstuvwxyz".to_string(),
            software: "shuyuan 0.1".to_string(),
            started_at: Some(UnixMillis(NOW.0 - 60_000)),
            now: NOW,
            agents_online: 2,
            agents_offline: 1,
            states: ResourceState::ALL.iter().map(|s| (*s, 0)).collect(),
            departments: vec![d.clone()],
            history: vec![Sample {
                at: NOW,
                changes_per_sec: 2.5,
                backlog_batches: 3,
                max_lag_secs: 4,
            }],
            grace_secs: 1,
            store: StoreHealth::default(),
            unreadable: None,
        };
        let html = overview(&p, &o);
        assert!(!html.contains("store-failing"), "{html}");
        let failing = Overview {
            store: StoreHealth {
                failing_since: Some(NOW),
                error: Some("No space left on device (os error 28)".into()),
                failed_writes: 3,
                recoveries: 0,
            },
            ..o.clone()
        };
        let banner = overview(&p, &failing);
        assert!(
            banner.contains("id=\"store-failing\"")
                && banner.contains("存储无法写入")
                && banner.contains("No space left on device"),
            "{banner}"
        );
        for id in [
            "id=\"agents-online\">2<",
            "id=\"agents-offline\">1<",
            "<svg",
        ] {
            assert!(html.contains(id), "{id}: {html}");
        }
        assert!(html.contains("href=\"/departments/D1\""));

        let entry = CityEntry {
            department: "D1".to_string(),
            entry: CatalogEntry {
                code: "101001/00003".to_string(),
                name: "人口".to_string(),
                status: Some(Lifecycle::Submitted),
                update_cycle: Some(UpdateCycle::Daily),
                ..CatalogEntry::default()
            },
            review: None,
            state: EntryState::Submitted,
            problems: Vec::new(),
        };
        let r = ResourceView {
            department_name: "民政局".to_string(),
            row: d.resources[0].clone(),
            catalog: Some(entry.clone()),
            batches: vec![BatchSummary {
                seq: 7,
                signer: "k".repeat(52),
                sealed_at: NOW,
                changes: 3,
                zero_update: false,
                other_entries: 0,
                bytes: 400,
                hash: "ab".repeat(32),
            }],
            sample: RowSample {
                columns: vec!["id".to_string(), "<name>".to_string()],
                rows: vec![vec!["1".to_string(), "张三".to_string()]],
            },
            grace_secs: 1,
        };
        let html = resource(&p, &r);
        assert!(
            html.contains("data-state=\"overdue\" id=\"resource-state\""),
            "{html}"
        );
        assert!(html.contains("<table id=\"batches\">") && html.contains("<table id=\"sample\">"));
        assert!(html.contains("<th>&lt;name&gt;</th>") && html.contains("每日"));
        let bare = ResourceView { catalog: None, ..r };
        assert!(resource(&p, &bare).contains("id=\"not-catalogued\""));

        let html = catalog(
            &p,
            std::slice::from_ref(&entry),
            &Filter::default(),
            Some("已审核"),
        );
        assert!(html.contains("<p class=\"notice\" id=\"notice\">已审核</p>"));
        assert_eq!(
            html.matches("action=\"/catalog/review\"").count(),
            2,
            "{html}"
        );
        assert!(html.contains("name=\"approve\" value=\"0\"") && html.contains("退回修改"));
        let published = CityEntry {
            state: EntryState::Published,
            review: Some(Review {
                status: ReviewStatus::Approved,
                reviewer: "王".to_string(),
                remarks: String::new(),
                reviewed_at: NOW,
            }),
            ..entry
        };
        let html = catalog(&p, &[published], &Filter::default(), None);
        assert!(!html.contains("/catalog/review") && html.contains("审核通过"));

        let mut e = AuditEntry::new(crate::apply::audit::AuditKind::BatchRejected, "bad <sig>");
        e.at = NOW;
        let q = AuditQuery {
            kind: Some("batch_rejected".to_string()),
            ..AuditQuery::default()
        };
        let html = audit(&p, &[e], 9, &q);
        assert!(
            html.contains("<option value=\"batch_rejected\" selected>"),
            "{html}"
        );
        assert!(html.contains("显示 1 条，共 9 条") && html.contains("bad &lt;sig&gt;"));

        let html = login(&p, Some("密码错误"), "/audit?kind=x");
        assert!(html.contains("<p class=\"error\" id=\"login-error\">密码错误</p>"));
        assert!(html.contains("name=\"next\" value=\"/audit?kind=x\""));
        assert!(html.contains("id=\"password\"") && html.contains("id=\"login-submit\""));
        assert!(!login(&p, None, "/").contains("login-error"));
    }

    #[test]
    fn verdicts_are_translated() {
        let verified = Verdict::Verified {
            seq: 21,
            at: UnixMillis(1_700_000_000_000),
            by: "source comparison".into(),
        };
        let zh = verdict(&page(Lang::Zh), &verified);
        assert!(
            zh.contains("已核验一致：序号 #21") && zh.contains("与数源逐段比对"),
            "{zh}"
        );
        let en = verdict(&page(Lang::En), &verified);
        assert!(en.starts_with("verified at seq #21, <time"), "{en}");
        let diverged = Verdict::Diverged {
            since_seq: 5,
            rows: 3,
            repairing: true,
            detail: "2 differing ranges so far; <1> still being compared".into(),
        };
        let zh = verdict(&page(Lang::Zh), &diverged);
        assert!(zh.contains("自序号 #5 起 3 行不同，正在修复"), "{zh}");
        assert!(zh.contains("&lt;1&gt;"), "{zh}");
        assert_eq!(verdict(&page(Lang::En), &Verdict::Unverified), "unverified");
    }

    #[test]
    fn the_federation_page_shows_the_link_the_children_and_the_tree() {
        use crate::admin::view::example;

        let f = FederationView::of(&example::status());
        let zh_page = Page {
            path: "/federation",
            ..page(Lang::Zh)
        };
        let en_page = Page {
            lang: Lang::En,
            ..zh_page
        };
        let zh = federation(&zh_page, &f);
        for words in [
            "<h1>级联</h1>",
            "<h2>上级平台</h2>",
            "<h2>下级平台</h2>",
            "<h2>级联树</h2>",
            "上级平台密钥",
            "已连接",
            "上级已确认序号",
            "待转发批次",
            "下辖部门",
            "留存本级：excluded by upstream.exclude",
            "留存该级：not shared (不予共享)",
            "普陀区",
        ] {
            assert!(zh.contains(words), "{words}: {zh}");
        }
        let en = federation(&en_page, &f);
        for words in [
            "<h1>Federation</h1>",
            "<h2>Upstream</h2>",
            "<h2>Child hubs</h2>",
            "<h2>Tree</h2>",
            "<th>Parent holds</th>",
            "<th>Head one level up</th>",
            "data-link=\"connected\">connected</span>",
            "<code>10.0.0.1:7700</code>",
            "id=\"upstream-rejections\">2<",
            "id=\"upstream-catalog-error\">catalog of D1 refused<",
            "held here: excluded by upstream.exclude",
            "held there: not shared (不予共享)",
            "<code>330902</code>",
            "<code>10.0.0.2:51000</code>",
        ] {
            assert!(en.contains(words), "{words}: {en}");
        }
        // The parent holds #5 of the 7 here; the county holds #9 (two
        // ahead of this hub), the town #10 (one ahead of the county).
        assert!(
            en.contains(
                "<td class=\"num\">5</td><td class=\"num lagging\" data-backlog=\"2\">2</td>"
            ),
            "{en}"
        );
        assert!(
            en.contains("class=\"num lagging\" data-lag=\"2\">2<"),
            "{en}"
        );
        assert!(
            en.contains("class=\"num lagging\" data-lag=\"1\">1<"),
            "{en}"
        );
        assert_eq!(en.matches("data-depth=\"2\"").count(), 2, "{en}");
        assert!(en.contains(&format!("title=\"{}\">乡镇平台</span>", example::key(3))));
        assert!(en.contains(&format!("<code title=\"{}\">", example::key(2))));
        // Links only to the feeds this hub holds.
        assert!(en.contains("<a href=\"/resources/D1/101001%2F00003\">D1:101001/00003</a>"));
        assert!(!en.contains("/resources/D1/101001%2F00009"));
        assert!(en.contains("<code>D1:101001/00009</code>"));
        // A hostile hub name and rejection stay text.
        assert!(!en.contains("<script>") && !zh.contains("<script>"), "{en}");
        assert!(en.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(en.contains("#6 bad signature &lt;forged&gt;"));
        // The navigation leads here.
        let doc = layout(&zh_page, "级联", &zh);
        assert!(doc.contains("<a href=\"/federation\" aria-current=\"page\">级联</a>"));
        let doc = layout(&en_page, "Federation", &en);
        assert!(doc.contains("<a href=\"/federation\" aria-current=\"page\">Federation</a>"));

        // A hub neither above nor below another: how to set it up.
        let alone = FederationView::default();
        let en = federation(&en_page, &alone);
        assert!(en.contains("id=\"federation-setup\""), "{en}");
        assert!(en.contains("<code>[upstream]</code>"));
        assert!(en.contains("<code>shuyuan-hub enroll --hub CODE --name NAME KEY</code>"));
        assert!(!en.contains("child-hubs"));
        let zh = federation(&zh_page, &alone);
        assert!(zh.contains("本平台尚未级联") && zh.contains("<code>[upstream]</code>"));
        // Only a parent: no child hub yet.
        let up_only = FederationView {
            children: Vec::new(),
            tree: Vec::new(),
            ..f
        };
        let en = federation(&en_page, &up_only);
        assert!(en.contains("id=\"no-child-hubs\"") && en.contains("upstream-feeds"));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("101001/00003"), "101001%2F00003");
        assert_eq!(path_segment("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(path_segment("部 ?"), "%E9%83%A8%20%3F");
    }
}
