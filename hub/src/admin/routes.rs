//! The admin server's routes: console pages, the JSON API (documented in
//! `hub/openapi.yaml`), `/metrics` and `/events`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json};
use serde::{Deserialize, Serialize};
use shuyuan_protocol::{FeedId, UnixMillis};

use super::AdminState;
use super::auth::{Access, LoginRefused, Refusal};
use super::headers;
use super::i18n::Lang;
use super::limits::Limited;
use super::metrics::{self, ProcessFacts};
use super::pages::{self, Page};
use super::view::{
    AuditQuery, BatchSummary, DepartmentView, FederationView, Overview, ResourceRow, ResourceView,
    RowSample,
};
use crate::apply::audit::AuditEntry;
use crate::catalog::{CityEntry, Filter};
use crate::status::HubStatus;
use crate::{ReviewRequest, Shared};

/// The OpenAPI description of the JSON API.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

/// Batches and rows the resource page shows.
const RECENT_BATCHES: usize = 20;
const SAMPLE_ROWS: usize = 20;

type S = State<Arc<AdminState>>;

pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(overview_page))
        .route("/departments/{code}", get(department_page))
        .route("/resources/{department}/{*resource}", get(resource_page))
        .route("/audit", get(audit_page))
        .route("/catalog", get(catalog_page))
        .route("/catalog/review", post(review_form))
        .route("/federation", get(federation_page))
        .route("/logout", post(logout))
        .route("/events", get(events))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/status", get(api_status))
        .route("/api/v1/overview", get(api_overview))
        .route("/api/v1/departments/{code}", get(api_department))
        .route(
            "/api/v1/resources/{department}/{*resource}",
            get(api_resource),
        )
        .route("/api/v1/audit", get(api_audit))
        .route("/api/v1/catalog", get(api_catalog))
        .route("/api/v1/catalog/review", post(api_review))
        .route("/api/v1/federation", get(api_federation))
        .layer(middleware::from_fn_with_state(state.clone(), authorise))
        // Reachable without a login.
        .route("/login", get(login_page).post(login_form))
        .route("/api/v1/login", post(api_login))
        .route("/api/openapi.yaml", get(openapi))
        .route("/console.css", get(console_css))
        .route("/console.js", get(console_js))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        // Every request, logins included.
        .layer(middleware::from_fn(origin))
        .layer(middleware::from_fn(headers::secure))
        .with_state(state)
}

/// The address a request came from (unspecified when the server was not
/// started with connection info, as in unit tests).
fn peer(req: &Request) -> std::net::IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

/// Refuses a state-changing request from another site, whatever its
/// credential ([`super::auth::same_origin`]).
async fn origin(req: Request, next: Next) -> Response {
    match super::auth::same_origin(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refused(&req, refusal),
    }
}

fn is_machine_path(path: &str) -> bool {
    path.starts_with("/api/") || path == "/metrics" || path == "/events"
}

async fn authorise(State(s): S, mut req: Request, next: Next) -> Response {
    match s.auth.check(req.headers(), peer(&req)).await {
        Ok(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        Err(refusal) => refused(&req, refusal),
    }
}

/// The answer to a refused request.
fn refused(req: &Request, refusal: Refusal) -> Response {
    match refusal {
        Refusal::Unauthenticated => {
            let path = req.uri().path();
            if is_machine_path(path) {
                // Bearer, not Basic: a browser must not be invited to
                // cache credentials that every page could then send.
                let mut r = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "log in: a session, a bearer token or an administrator's basic credentials are required",
                )
                .into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"shuyuan hub\""),
                );
                r
            } else {
                let next = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                Redirect::to(&format!("/login?next={}", percent(&next))).into_response()
            }
        }
        Refusal::Forbidden(why) => {
            tracing::warn!(path = %req.uri().path(), %why, "admin request refused");
            ApiError::new(StatusCode::FORBIDDEN, why).into_response()
        }
        Refusal::Limited(l) => ApiError::limited(l).into_response(),
        Refusal::Busy => ApiError::busy().into_response(),
    }
}

/// A JSON error: `{"error": "..."}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds, for 429 and 503.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Too many failed logins.
    fn limited(l: Limited) -> Self {
        let secs = l.retry_after.as_secs().max(1);
        ApiError {
            retry_after: Some(secs),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many failed logins ({} limit): try again in {secs} s",
                    l.scope.as_str()
                ),
            )
        }
    }

    /// Too many password checks at once.
    fn busy() -> Self {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many password checks at once: try again in a moment",
            )
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }

    fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, what)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(r.status(), r.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::new(r.status(), r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// What every page needs from its request.
#[derive(Debug)]
struct Ctx {
    lang: Lang,
    /// The language was picked in the query: remember it.
    chosen: bool,
    path: String,
    query: String,
    /// How the request was let in; None before a login (the login page,
    /// pages not found), which then show nothing of this hub.
    access: Option<Access>,
    /// The live-update script asks for the page body only.
    fragment: bool,
}

impl<St: Send + Sync> FromRequestParts<St> for Ctx {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &St) -> Result<Self, Infallible> {
        let query = parts.uri.query().unwrap_or("").to_string();
        let from_query = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "lang")
            .and_then(|(_, v)| Lang::from_code(v));
        let from_cookie = super::auth::cookie(&parts.headers, "lang").and_then(Lang::from_code);
        let lang = from_query.or(from_cookie).unwrap_or_else(|| {
            Lang::from_accept_language(
                parts
                    .headers
                    .get(header::ACCEPT_LANGUAGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            )
        });
        Ok(Ctx {
            lang,
            chosen: from_query.is_some(),
            path: parts.uri.path().to_string(),
            query,
            access: parts.extensions.get::<Access>().cloned(),
            fragment: parts.headers.contains_key("x-shuyuan-fragment"),
        })
    }
}

impl Ctx {
    fn page<'a>(&'a self, s: &'a AdminState) -> Page<'a> {
        Page {
            lang: self.lang,
            path: &self.path,
            query: &self.query,
            hub_name: match self.access {
                Some(_) => &s.shared.config.name,
                None => "shuyuan",
            },
            logged_in: self.access.as_ref().is_some_and(Access::browser),
            account: self.access.as_ref().and_then(Access::account),
            now: UnixMillis::now(),
        }
    }

    /// The page, whole or as a fragment, remembering a chosen language.
    fn render(&self, s: &AdminState, status: StatusCode, title: &str, body: String) -> Response {
        let html = if self.fragment {
            body
        } else {
            pages::layout(&self.page(s), title, &body)
        };
        let mut r = (status, Html(html)).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.chosen
            && let Ok(v) = HeaderValue::from_str(&format!(
                "lang={}; Path=/; Max-Age=31536000; SameSite=Lax",
                self.lang.code()
            ))
        {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    fn error(&self, s: &AdminState, e: ApiError) -> Response {
        let body = pages::message(&self.page(s), e.status.as_str(), &e.message);
        self.render(s, e.status, e.status.as_str(), body)
    }
}

// ---- the data, shared by pages and API ----

async fn status(shared: &Shared) -> Result<HubStatus, ApiError> {
    crate::control::live_status(shared)
        .await
        .map_err(ApiError::internal)
}

async fn overview(s: &AdminState) -> Result<Overview, ApiError> {
    let status = status(&s.shared).await?;
    Ok(overview_of(s, &status))
}

fn overview_of(s: &AdminState, status: &HubStatus) -> Overview {
    Overview::of(
        status,
        s.shared.config.freshness_grace,
        UnixMillis::now(),
        s.monitor.history(),
    )
}

async fn federation(s: &AdminState) -> Result<FederationView, ApiError> {
    Ok(FederationView::of(&status(&s.shared).await?))
}

async fn department(s: &AdminState, code: &str) -> Result<DepartmentView, ApiError> {
    let status = status(&s.shared).await?;
    status
        .departments
        .iter()
        .find(|d| d.code == code)
        .map(|d| DepartmentView::of(d, s.shared.config.freshness_grace, UnixMillis::now()))
        .ok_or_else(|| ApiError::not_found(format!("no department {code} at this hub")))
}

async fn resource(
    s: &AdminState,
    department: &str,
    resource: &str,
) -> Result<ResourceView, ApiError> {
    let d = self::department(s, department).await?;
    let Some(row): Option<ResourceRow> = d
        .resources
        .iter()
        .find(|r| r.entry.resource == resource)
        .cloned()
    else {
        return Err(ApiError::not_found(format!(
            "no resource {resource} of {department} at this hub"
        )));
    };
    let catalog: Option<CityEntry> = s
        .shared
        .catalog
        .city()
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .find(|e| e.department == department && e.entry.code == resource);
    let feed: FeedId = row
        .entry
        .feed
        .parse()
        .map_err(|e: shuyuan_protocol::feed::CodeError| ApiError::internal(e))?;
    let store = s.shared.store.clone();
    let (batches, sample) = tokio::task::spawn_blocking(move || {
        store.read(|t| {
            let batches = t
                .recent_batches(&feed, RECENT_BATCHES)?
                .iter()
                .map(batch_summary)
                .collect::<Vec<_>>();
            let (columns, rows) = crate::export::sample(t, &feed, SAMPLE_ROWS)?;
            Ok::<_, crate::store::StoreError>((batches, RowSample { columns, rows }))
        })
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(ResourceView {
        department_name: d.name.clone(),
        row,
        catalog,
        batches,
        sample,
        grace_secs: d.grace_secs,
    })
}

fn batch_summary(b: &shuyuan_protocol::SignedBatch) -> BatchSummary {
    use shuyuan_protocol::batch::Entry;
    let hash = data_encoding::HEXLOWER.encode(&b.hash().0);
    let mut summary = BatchSummary {
        seq: 0,
        signer: b.signer.to_string(),
        sealed_at: UnixMillis(0),
        changes: 0,
        zero_update: false,
        other_entries: 0,
        bytes: b.body.len() as u64,
        hash,
    };
    // Stored batches were verified before they were applied.
    if let Ok(body) = b.open() {
        summary.seq = body.seq;
        summary.sealed_at = body.created_at;
        for e in &body.entries {
            match e {
                Entry::Change(_) => summary.changes += 1,
                Entry::ZeroUpdate(_) => summary.zero_update = true,
                _ => summary.other_entries += 1,
            }
        }
    }
    summary
}

/// The audit page's entries and the log's size.
async fn audit(s: &AdminState, q: &AuditQuery) -> Result<(Vec<AuditEntry>, u64), ApiError> {
    q.validate()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let store = s.shared.store.clone();
    let q = q.clone();
    tokio::task::spawn_blocking(move || {
        store.read(|t| {
            let limit = q.limit();
            let mut out = Vec::new();
            crate::apply::audit::scan(t, &mut |e| {
                if q.matches(&e) {
                    out.push(e);
                }
                out.len() < limit
            })?;
            Ok((out, t.audit_count()?))
        })
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e: crate::store::StoreError| ApiError::internal(e))
}

/// A filter as forms send it: empty fields match all.
fn filled(mut f: Filter) -> Filter {
    for field in [
        &mut f.department,
        &mut f.class,
        &mut f.share_type,
        &mut f.cycle,
        &mut f.state,
    ] {
        if field.as_deref().is_some_and(|v| v.trim().is_empty()) {
            *field = None;
        }
    }
    f
}

async fn catalog(s: &AdminState, filter: &Filter) -> Result<Vec<CityEntry>, ApiError> {
    crate::control::city(&s.shared, &filled(filter.clone()))
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

// ---- pages ----

async fn overview_page(State(s): S, ctx: Ctx) -> Response {
    match overview(&s).await {
        Ok(o) => {
            let body = pages::overview(&ctx.page(&s), &o);
            ctx.render(&s, StatusCode::OK, &s.shared.config.name, body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

async fn department_page(State(s): S, ctx: Ctx, Path(code): Path<String>) -> Response {
    match department(&s, &code).await {
        Ok(d) => {
            let body = pages::department(&ctx.page(&s), &d);
            ctx.render(&s, StatusCode::OK, &format!("{} {}", d.code, d.name), body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

async fn resource_page(
    State(s): S,
    ctx: Ctx,
    Path((dept, res)): Path<(String, String)>,
) -> Response {
    match resource(&s, &dept, &res).await {
        Ok(r) => {
            let body = pages::resource(&ctx.page(&s), &r);
            ctx.render(&s, StatusCode::OK, &r.row.entry.feed, body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

async fn audit_page(
    State(s): S,
    ctx: Ctx,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return ctx.error(&s, e.into()),
    };
    match audit(&s, &q).await {
        Ok((entries, total)) => {
            let body = pages::audit(&ctx.page(&s), &entries, total, &q);
            ctx.render(&s, StatusCode::OK, "audit", body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

async fn federation_page(State(s): S, ctx: Ctx) -> Response {
    match federation(&s).await {
        Ok(f) => {
            let body = pages::federation(&ctx.page(&s), &f);
            let title = ctx.lang.t(super::i18n::Text::Federation);
            ctx.render(&s, StatusCode::OK, title, body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

async fn catalog_page(
    State(s): S,
    ctx: Ctx,
    filter: Result<Query<Filter>, QueryRejection>,
) -> Response {
    let filter = match filter {
        Ok(Query(f)) => f,
        Err(e) => return ctx.error(&s, e.into()),
    };
    match catalog(&s, &filter).await {
        Ok(list) => {
            let body = pages::catalog(&ctx.page(&s), &list, &filter, None);
            ctx.render(&s, StatusCode::OK, "catalog", body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

/// The review form on the catalog page.
#[derive(Debug, Deserialize)]
struct ReviewForm {
    department: Option<String>,
    code: String,
    approve: String,
    /// Only on an open console: a logged-in administrator is the reviewer.
    #[serde(default)]
    reviewer: String,
    #[serde(default)]
    remarks: String,
}

async fn review_form(
    State(s): S,
    ctx: Ctx,
    Extension(access): Extension<Access>,
    Form(form): Form<ReviewForm>,
) -> Response {
    let request = ReviewRequest {
        department: form.department.filter(|d| !d.is_empty()),
        code: form.code,
        approve: form.approve == "1",
        reviewer: form.reviewer,
        remarks: form.remarks,
    };
    let (status, notice) = match review(&s, &access, request.clone()).await {
        Ok(_) => (
            StatusCode::OK,
            format!(
                "{} {}: {}",
                request.code,
                request.department.as_deref().unwrap_or(""),
                match (ctx.lang, request.approve) {
                    (Lang::Zh, true) => "审核通过",
                    (Lang::Zh, false) => "退回修改",
                    (Lang::En, true) => "approved",
                    (Lang::En, false) => "returned for changes",
                }
            ),
        ),
        Err(e) => (e.status, e.message),
    };
    let filter = Filter::default();
    match catalog(&s, &filter).await {
        Ok(list) => {
            let body = pages::catalog(&ctx.page(&s), &list, &filter, Some(&notice));
            ctx.render(&s, status, "catalog", body)
        }
        Err(e) => ctx.error(&s, e),
    }
}

/// Records a review; the reviewer is the logged-in administrator, or on an
/// open console or with the local token the name the request states (and
/// the audit log says it was not verified).
async fn review(
    s: &AdminState,
    access: &Access,
    mut request: ReviewRequest,
) -> Result<shuyuan_protocol::catalog::Review, ApiError> {
    let vouched = match access.account() {
        Some(account) => {
            let stated = request.reviewer.trim();
            if !stated.is_empty() && stated != account {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the reviewer is the administrator logged in ({account}), not {stated:?}: leave reviewer out"
                    ),
                ));
            }
            request.reviewer = account.to_string();
            crate::control::Vouched::Login
        }
        None => crate::control::Vouched::Stated,
    };
    let all = s.shared.catalog.city().await.map_err(ApiError::internal)?;
    crate::control::review(&s.shared.catalog, &s.shared.store, &all, &request, vouched)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only plain paths of this console are followed after a login: one `/`,
/// then visible ASCII without `\\` (no control characters, which browsers
/// strip, so `/\t/evil.example` cannot become `//evil.example`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n[1..].starts_with(['/', '\\'])
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

async fn login_page(State(s): S, ctx: Ctx, Query(q): Query<LoginQuery>) -> Response {
    if !s.auth.required() {
        return Redirect::to(&safe_next(q.next.as_deref())).into_response();
    }
    let body = pages::login(&ctx.page(&s), None, &safe_next(q.next.as_deref()));
    ctx.render(&s, StatusCode::OK, "login", body)
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    next: Option<String>,
}

async fn login_form(
    State(s): S,
    ctx: Ctx,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    if !s.auth.required() {
        return Redirect::to(&next).into_response();
    }
    match s.auth.login(&form.user, &form.password, peer.ip()).await {
        Ok(token) => {
            let mut r = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&s.auth.session_cookie(&token)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(refused) => {
            let e = login_refused(refused);
            let error = match (ctx.lang, e.status) {
                (Lang::Zh, StatusCode::UNAUTHORIZED) => "账号或密码错误".to_string(),
                (Lang::En, StatusCode::UNAUTHORIZED) => "Wrong name or password".to_string(),
                (Lang::Zh, StatusCode::TOO_MANY_REQUESTS) => format!(
                    "登录失败次数过多，请 {} 秒后再试",
                    e.retry_after.unwrap_or(1)
                ),
                (Lang::Zh, _) => "正在核对的登录过多，请稍后再试".to_string(),
                (Lang::En, _) => e.message.clone(),
            };
            let body = pages::login(&ctx.page(&s), Some(&error), &next);
            let mut r = ctx.render(&s, e.status, "login", body);
            if let Some(secs) = e.retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            r
        }
    }
}

/// The answer to a refused login.
fn login_refused(refused: LoginRefused) -> ApiError {
    match refused {
        LoginRefused::Wrong => ApiError::new(StatusCode::UNAUTHORIZED, "wrong name or password"),
        LoginRefused::Limited(l) => ApiError::limited(l),
        LoginRefused::Busy => ApiError::busy(),
    }
}

async fn logout(State(s): S, Extension(access): Extension<Access>) -> Response {
    s.auth.logout(&access);
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&s.auth.expired_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn not_found(State(s): S, ctx: Ctx) -> Response {
    if is_machine_path(&ctx.path) {
        return ApiError::not_found(format!("no such endpoint: {}", ctx.path)).into_response();
    }
    ctx.error(&s, ApiError::not_found(format!("no page {}", ctx.path)))
}

/// Tells the console's script when what it shows changed, until the hub
/// stops or the session that opened the stream ends (logout or expiry).
async fn events(
    State(s): S,
    Extension(access): Extension<Access>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let session = match access {
        Access::Session { id, .. } => Some(id),
        _ => None,
    };
    let state = (s.monitor.subscribe(), s.auth.session_ends(), s);
    let stream = futures_util::stream::unfold(state, move |(mut rx, mut ends, s)| async move {
        loop {
            let until = match session {
                Some(id) => Some(s.auth.session_until(id)?),
                None => None,
            };
            let expiry = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = rx.changed() => {
                    changed.ok()?;
                    let v = *rx.borrow_and_update();
                    let event = Event::default().event("update").data(v.to_string());
                    return Some((Ok(event), (rx, ends, s)));
                }
                // A session ended: this stream's? (checked at the loop's top)
                ended = ends.changed() => ended.ok()?,
                () = expiry => return None,
                () = s.cancel.cancelled() => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics_text(State(s): S) -> Result<Response, ApiError> {
    let status = status(&s.shared).await?;
    let o = overview_of(&s, &status);
    let counts = s.shared.store.audit_counts();
    let text = metrics::render(
        &o,
        &FederationView::of(&status),
        &ProcessFacts {
            audit_counts: &counts,
            handshakes_refused: s.shared.peers.refused(),
            deliveries: &s.shared.alerts.counts,
            logins: metrics::Logins::of(&s.auth),
        },
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

// ---- JSON API ----

async fn api_status(State(s): S) -> Result<Json<HubStatus>, ApiError> {
    Ok(Json(status(&s.shared).await?))
}

async fn api_overview(State(s): S) -> Result<Json<Overview>, ApiError> {
    Ok(Json(overview(&s).await?))
}

async fn api_department(
    State(s): S,
    code: Result<Path<String>, PathRejection>,
) -> Result<Json<DepartmentView>, ApiError> {
    let Path(code) = code?;
    Ok(Json(department(&s, &code).await?))
}

async fn api_resource(
    State(s): S,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<ResourceView>, ApiError> {
    let Path((dept, res)) = path?;
    Ok(Json(resource(&s, &dept, &res).await?))
}

/// A page of the audit log.
#[derive(Debug, Serialize)]
struct AuditPage {
    /// Entries in the whole log.
    total: u64,
    entries: Vec<AuditEntry>,
}

async fn api_audit(
    State(s): S,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = q?;
    let (entries, total) = audit(&s, &q).await?;
    Ok(Json(AuditPage { total, entries }))
}

async fn api_federation(State(s): S) -> Result<Json<FederationView>, ApiError> {
    Ok(Json(federation(&s).await?))
}

async fn api_catalog(
    State(s): S,
    filter: Result<Query<Filter>, QueryRejection>,
) -> Result<Json<Vec<CityEntry>>, ApiError> {
    let Query(filter) = filter?;
    Ok(Json(catalog(&s, &filter).await?))
}

async fn api_review(
    State(s): S,
    Extension(access): Extension<Access>,
    request: Result<Json<ReviewRequest>, JsonRejection>,
) -> Result<Json<shuyuan_protocol::catalog::Review>, ApiError> {
    let Json(request) = request?;
    Ok(Json(review(&s, &access, request).await?))
}

#[derive(Debug, Deserialize)]
struct ApiLogin {
    user: String,
    password: String,
}

#[derive(Debug, Serialize)]
struct ApiSession {
    token: String,
    expires_in_secs: u64,
}

async fn api_login(
    State(s): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    login: Result<Json<ApiLogin>, JsonRejection>,
) -> Result<Json<ApiSession>, ApiError> {
    let Json(login) = login?;
    if !s.auth.required() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "this console has no password (loopback only): no login is needed",
        ));
    }
    match s.auth.login(&login.user, &login.password, peer.ip()).await {
        Ok(token) => Ok(Json(ApiSession {
            token,
            expires_in_secs: s.auth.session_ttl().as_secs(),
        })),
        Err(refused) => Err(login_refused(refused)),
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}

async fn console_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", pages::CSS)
}

async fn console_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", pages::SCRIPT)
}

/// One of the console's own files (what the CSP lets pages load).
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// Percent-encodes a query value.
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::view::ResourceState;

    #[test]
    fn only_local_paths_follow_a_login() {
        assert_eq!(
            safe_next(Some("/audit?kind=enrolled")),
            "/audit?kind=enrolled"
        );
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(None), "/");
        // Browsers strip tabs and newlines: "/\t/evil" would be "//evil".
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example")), "/");
        assert_eq!(safe_next(Some("/ /evil.example")), "/");
        assert_eq!(safe_next(Some("/\u{7f}/evil.example")), "/");
        assert_eq!(safe_next(Some("/审核")), "/");
    }

    #[test]
    fn the_api_documents_every_audit_kind() {
        let line = OPENAPI
            .lines()
            .find(|l| l.contains("{name: kind, in: query"))
            .unwrap();
        for kind in crate::admin::i18n::AUDIT_KINDS {
            let name = kind.name();
            assert!(line.contains(&name), "{name} undocumented");
        }
    }

    /// The text of one schema under `components/schemas`.
    fn schema(name: &str) -> &'static str {
        let start = OPENAPI
            .find(&format!("\n    {name}:\n"))
            .unwrap_or_else(|| panic!("no schema {name}"))
            + 1;
        let rest = &OPENAPI[start..];
        let end = rest
            .match_indices("\n    ")
            .find(|(i, _)| rest[i + 5..].starts_with(|c: char| c != ' '))
            .map_or(rest.len(), |(i, _)| i);
        &rest[..end]
    }

    #[test]
    fn the_api_documents_the_federation_view() {
        assert!(OPENAPI.contains("\n  /api/v1/federation:\n"));
        let view = FederationView::of(&crate::admin::view::example::status());
        let json = serde_json::to_value(&view).unwrap();
        let fields = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let child = &json["children"][0];
        for (name, value) in [
            ("FederationView", &json),
            ("UpstreamStatus", &json["upstream"]),
            ("ForwardState", &json["upstream"]["feeds"][0]),
            ("ChildStatus", child),
            ("HubReport", &child["tree"]),
            ("HubReport", &child["tree"]["feeds"][0]),
            ("TreeRow", &json["tree"][0]),
        ] {
            let text = schema(name);
            for field in fields(value) {
                assert!(
                    text.contains(&format!("\n        {field}:"))
                        || text.contains(&format!("\n              {field}:")),
                    "{name}.{field} undocumented:\n{text}"
                );
            }
        }
        assert_eq!(fields(&json), ["children", "tree", "upstream"]);
        for link in ["connecting", "connected", "disconnected", "refused"] {
            assert!(schema("UpstreamStatus").contains(link), "{link}");
        }
        let status = schema("HubStatus");
        assert!(status.contains("\n        upstream:") && status.contains("\n        children:"));
    }

    #[test]
    fn states_are_named_as_the_api_documents_them() {
        for s in ResourceState::ALL {
            assert!(
                OPENAPI.contains(s.as_str()),
                "{s} missing from openapi.yaml"
            );
        }
    }
}
