//! The HTTP/JSON API: routes, extractors, handlers and the OpenAPI document.
//!
//! Every error is `{code, message, field}` with a 4xx or 5xx status: the
//! JSON extractor maps axum's rejections (malformed JSON, wrong types,
//! unknown fields, bodies over 1 MiB) into that shape, and nothing is stored
//! when a request is refused. The router is built by [`router`], so tests
//! can call it without a socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{OpenFlags, OptionalExtension, params};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use suanwang_api as api;
use suanwang_core::job::JobId;
use suanwang_core::topology::{SiteId, Topology};
use suanwang_ledger::audit;
use suanwang_ledger::voucher::{self, OrgKind, Placement, Usage};
use utoipa::OpenApi;

use crate::auth::{self, Principal, Role, Tokens};
use crate::error::{Error, Result};
use crate::world::{World, load_job};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub world: World,
    pub tokens: Tokens,
    pub topology: Arc<Topology>,
    pub db: PathBuf,
    pub timings: crate::world::Timings,
}

/// JSON body whose rejections use our error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonDataError(e) => {
                    let detail = std::error::Error::source(&e).map_or_else(|| e.body_text(), |s| s.to_string());
                    let field = detail.split(':').next().filter(|p| !p.contains(' ')).unwrap_or("body").to_string();
                    Error::invalid(&field, detail)
                }
                JsonRejection::JsonSyntaxError(e) => Error::invalid(
                    "body",
                    format!(
                        "malformed JSON: {}",
                        std::error::Error::source(&e).map_or_else(|| e.body_text(), |s| s.to_string())
                    ),
                ),
                JsonRejection::MissingJsonContentType(_) => Error::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send Content-Type: application/json",
                ),
                JsonRejection::BytesRejection(_) => Error::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("body over {BODY_LIMIT} bytes"),
                ),
                other => Error::invalid("body", other.body_text()),
            }),
        }
    }
}

/// The caller, from `Authorization: Bearer TOKEN`.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let header =
            parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
                Error::new(StatusCode::UNAUTHORIZED, "unauthenticated", "send Authorization: Bearer TOKEN")
            })?;
        let token = header.strip_prefix("Bearer ").unwrap_or_default().trim();
        state
            .tokens
            .find(token, crate::world::unix_now())
            .map(Auth)
            .ok_or_else(|| Error::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown, expired or revoked token"))
    }
}

/// The secret of the attempt a report is about (`X-Attempt-Secret`).
pub struct AttemptSecret(pub String);

impl<S: Send + Sync> FromRequestParts<S> for AttemptSecret {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self> {
        Ok(AttemptSecret(
            parts.headers.get("x-attempt-secret").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
        ))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "suanwang",
        description = "The suanwang compute-network scheduler API. Money is integer fen; times are unix seconds."
    ),
    paths(
        submit,
        quote,
        list_jobs,
        get_job,
        cancel_job,
        job_events,
        job_why,
        job_logs,
        sites,
        vouchers,
        bill,
        create_org,
        create_token,
        list_tokens,
        revoke_token,
        lease,
        site_report,
        attempt_start,
        attempt_heartbeat,
        attempt_logs,
        attempt_finish
    ),
    components(schemas(
        api::ApiError,
        api::JobRequest,
        api::DatasetRequest,
        api::WeightsRequest,
        api::Job,
        api::JobList,
        api::JobState,
        api::JobEvent,
        api::Quote,
        api::Lease,
        api::LeaseRequest,
        api::LeaseResponse,
        api::AttemptRef,
        api::Capabilities,
        api::HeartbeatResponse,
        api::LogAck,
        api::AttemptEnd,
        api::FinishRequest,
        api::SiteReport,
        api::PoolReport,
        api::TokenInfo,
        api::OrgKind,
        api::Role,
        api::Site,
        api::SitePool,
        api::OrgRequest,
        api::TokenRequest,
        api::TokenResponse,
        api::Balances,
        api::VoucherBalance,
        api::Bill,
        api::BillLine
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Declares the bearer-token scheme every operation but `/v1/health` uses.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("sw_...").build()),
        );
    }
}

/// Reads every request body in full (up to [`BODY_LIMIT`]) before routing.
/// A request refused before its handler read the body (a bad token, a bad
/// path id) would otherwise leave the body unread and the server would close
/// the connection, breaking the next request a client sends on it. A body
/// over the limit is read on (up to [`DRAIN_LIMIT`]) and dropped, so the
/// client finishes sending and gets the 413 rather than a broken pipe.
async fn read_whole_body(request: Request, next: axum::middleware::Next) -> Response {
    use tokio_stream::StreamExt as _;
    let (parts, body) = request.into_parts();
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return Error::invalid("body", "the request body could not be read").into_response();
        };
        total += chunk.len();
        if total <= BODY_LIMIT {
            kept.extend_from_slice(&chunk);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > BODY_LIMIT {
        return Error::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("body over {BODY_LIMIT} bytes"))
            .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(kept))).await
}

/// How much of a too-large body is read and dropped before the connection
/// is given up.
pub const DRAIN_LIMIT: usize = 16 << 20;

/// The OpenAPI document, with this server's network in it: the accepted
/// accelerator types are an enum of the types its sites have.
async fn openapi(State(state): State<AppState>) -> Result<Json<serde_json::Value>> {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).map_err(Error::internal)?;
    let names: Vec<&str> = state.topology.accelerators.iter().map(|a| a.name.as_str()).collect();
    let job = &mut doc["components"]["schemas"]["JobRequest"]["properties"];
    job["accelerators"]["items"]["enum"] = serde_json::json!(names);
    // Bounds utoipa's attributes cannot express.
    job["accelerators"]["uniqueItems"] = serde_json::json!(true);
    job["env"]["maxProperties"] = serde_json::json!(crate::validate::MAX_ENV_ENTRIES);
    job["secret_env"]["maxProperties"] = serde_json::json!(crate::validate::MAX_ENV_ENTRIES);
    Ok(Json(doc))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/health", get(|| async { Json(serde_json::json!({"ok": true})) }))
        .route("/v1/orgs", post(create_org))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/quote", post(quote))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/why", get(job_why))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/sites", get(sites))
        .route("/v1/vouchers", get(vouchers))
        .route("/v1/bill", get(bill))
        .route("/v1/agent/lease", post(lease))
        .route("/v1/agent/report", post(site_report))
        .route("/v1/agent/attempts/{job}/{attempt}/start", post(attempt_start))
        .route("/v1/agent/attempts/{job}/{attempt}/heartbeat", post(attempt_heartbeat))
        .route("/v1/agent/attempts/{job}/{attempt}/logs", post(attempt_logs))
        .route("/v1/agent/attempts/{job}/{attempt}/finish", post(attempt_finish))
        .fallback(|| async { Error::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn(read_whole_body))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn parse_id(field: &str, text: &str) -> Result<u64> {
    text.parse::<u64>().map_err(|_| Error::invalid(field, format!("'{text}' is not a number")))
}

/// The organisation a principal acts for: consumers for their own; an
/// operator must name one.
fn acting_org(who: &Principal, named: Option<&str>) -> Result<String> {
    match (&who.role, named) {
        (Role::Consumer { org }, None) => Ok(org.clone()),
        (Role::Consumer { org }, Some(n)) if n == org => Ok(org.clone()),
        (Role::Consumer { .. }, Some(_)) => Err(Error::forbidden("a consumer acts only for its own organisation")),
        (Role::Operator, Some(n)) => Ok(n.to_string()),
        (Role::Operator, None) => Err(Error::invalid(
            "org",
            "an operator must name the organisation (org in the body or query; --org ORG on the command line)",
        )),
        (Role::Provider { .. }, _) => Err(Error::forbidden("a provider token is for its site's agent")),
    }
}

fn provider_site(who: &Principal, topology: &Topology) -> Result<SiteId> {
    match &who.role {
        Role::Provider { site } => {
            topology.site_id(site).ok_or_else(|| Error::internal(format!("token for unknown site {site}")))
        }
        _ => Err(Error::forbidden("only a site's provider token may do this")),
    }
}

/// What a provider may see of a job that ran at its site: what it needs to
/// run and account for it, without the job's environment.
fn redact_for_provider(mut job: api::Job) -> api::Job {
    job.request.env.clear();
    job.request.secret_env.clear();
    job
}

/// Runs a read on its own read-only connection, off the writer thread:
/// reads never hold up commits (nor the heartbeats that keep leases alive).
async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
) -> Result<T> {
    let db = state.db.clone();
    tokio::task::spawn_blocking(move || f(&reader(&db)?)).await.map_err(Error::internal)?
}

/// A job the principal may see; others' jobs are "not found", not "forbidden",
/// so ids do not leak. A provider sees the jobs that had an attempt at its
/// site, redacted.
async fn visible_job(state: &AppState, who: &Principal, id: u64) -> Result<api::Job> {
    let site = match &who.role {
        Role::Provider { site } => Some(site.clone()),
        _ => None,
    };
    let (job, ran_here) = read(state, move |sql| {
        let job = load_job(sql, id)?;
        let ran_here = match &site {
            Some(site) => crate::world::ran_at(sql, id, site)?,
            None => false,
        };
        Ok((job, ran_here))
    })
    .await?;
    let job = job.ok_or_else(|| Error::not_found("job", id))?;
    match &who.role {
        Role::Provider { .. } if ran_here => Ok(redact_for_provider(job)),
        _ if who.may_act_for(&job.org) => Ok(job),
        _ => Err(Error::not_found("job", id)),
    }
}

/// An explanation as JSON, each filtered site with its reason in words.
fn explanation_json(e: &suanwang_core::explain::Explanation) -> Result<serde_json::Value> {
    let mut value = serde_json::to_value(e).map_err(Error::internal)?;
    if let Some(sites) = value["sites"].as_array_mut() {
        for (json, verdict) in sites.iter_mut().zip(&e.sites) {
            if let suanwang_core::explain::Verdict::Filtered(filter) = &verdict.verdict {
                json["reason"] = serde_json::Value::String(filter.to_string());
            }
        }
    }
    Ok(value)
}

/// A job the principal may act on (cancel): its owner or an operator.
async fn owned_job(state: &AppState, who: &Principal, id: u64) -> Result<api::Job> {
    let job = read(state, move |sql| load_job(sql, id)).await?.ok_or_else(|| Error::not_found("job", id))?;
    if !who.may_act_for(&job.org) {
        return Err(Error::not_found("job", id));
    }
    Ok(job)
}

#[utoipa::path(post, path = "/v1/jobs", request_body = api::JobRequest, responses((status = 201, body = api::Job), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 402, body = api::ApiError, description = "the organisation has nothing to pay with"), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError), (status = 429, body = api::ApiError, description = "too many pending or running jobs")), security(("bearer" = [])))]
async fn submit(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::JobRequest>,
) -> Result<Response> {
    let org = acting_org(&who, req.org.as_deref())?;
    crate::validate::job_request(&req)?;
    let job = state.world.call(move |s, b| s.submit(b, &org, req)).await?;
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

#[utoipa::path(post, path = "/v1/quote", request_body = api::JobRequest, responses((status = 200, body = api::Quote), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError)), security(("bearer" = [])))]
async fn quote(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::JobRequest>,
) -> Result<Json<api::Quote>> {
    let org = acting_org(&who, req.org.as_deref())?;
    crate::validate::job_request(&req)?;
    let quote = state
        .world
        .call(move |s, b| {
            s.check_capabilities(&req)?;
            let spec = s.spec(b, u64::MAX, &org, &req)?;
            let now = b.now().max(0) as u64;
            let explanation = s.scheduler.explain(now, &spec);
            let best = explanation.best().map(|(site, scored)| (site.site.clone(), scored.clone()));
            let bill = match &best {
                Some((site_key, scored)) => {
                    let t = &s.topology;
                    let site = t.site(t.site_id(site_key).expect("explained site"));
                    let accel = t.accelerator(scored.estimate.accel);
                    let placement = Placement {
                        site: site.key.clone(),
                        provider: site.provider.clone(),
                        accel: accel.name.clone(),
                        domestic: accel.domestic,
                        price_fen_per_hour: t.pool(scored.estimate.pool).price_fen_per_hour,
                    };
                    let usage = Usage {
                        accel_seconds: scored.estimate.run_s as i64 * spec.gpus as i64,
                        transfer_fen: scored.estimate.transfer_cost_fen,
                    };
                    Some(serde_json::to_value(voucher::bill(b, &org, &placement, &usage)?).map_err(Error::internal)?)
                }
                None => None,
            };
            let mut explanation = explanation_json(&explanation)?;
            // A quote is for no job yet.
            if let Some(o) = explanation.as_object_mut() {
                o.remove("job");
            }
            Ok(api::Quote { explanation, bill, best_site: best.map(|(site, _)| site) })
        })
        .await?;
    Ok(Json(quote))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    /// Only jobs with a smaller id (the next page).
    before: Option<u64>,
    /// An operator may list one organisation's jobs.
    org: Option<String>,
}

#[utoipa::path(get, path = "/v1/jobs", params(("state" = Option<api::JobState>, Query), ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000), ("before" = Option<u64>, Query, description = "only jobs with a smaller id: the next page"), ("org" = Option<String>, Query, description = "operators only")), responses((status = 200, body = api::JobList), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError)), security(("bearer" = [])))]
async fn list_jobs(
    State(state): State<AppState>,
    Auth(who): Auth,
    query: std::result::Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<api::JobList>> {
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    let job_state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(api::JobState::parse(s).ok_or_else(|| {
            Error::invalid(
                "state",
                format!("unknown state '{s}' (states: pending, running, succeeded, failed, cancelled, rejected)"),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    // Bounded: a page holds at most 1,000 requests of up to 1 MiB each.
    if limit == 0 || limit > 1000 {
        return Err(Error::invalid("limit", format!("must be between 1 and 1000, got {limit}")));
    }
    if q.org.is_some() && !matches!(who.role, Role::Operator) {
        return Err(Error::invalid("org", "only an operator may filter by organisation"));
    }
    let provider = matches!(who.role, Role::Provider { .. });
    let (jobs, total, next_before) =
        read(&state, move |sql| crate::world::list(sql, &who, q.org.as_deref(), job_state, limit, q.before)).await?;
    let jobs = if provider { jobs.into_iter().map(redact_for_provider).collect() } else { jobs };
    Ok(Json(api::JobList { jobs, total, next_before }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = u64, Path)), responses((status = 200, body = api::Job), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn get_job(State(state): State<AppState>, Auth(who): Auth, Path(id): Path<String>) -> Result<Json<api::Job>> {
    let id = parse_id("id", &id)?;
    Ok(Json(visible_job(&state, &who, id).await?))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = u64, Path)), responses((status = 200, body = api::Job), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 404, body = api::ApiError), (status = 409, body = api::ApiError)), security(("bearer" = [])))]
async fn cancel_job(State(state): State<AppState>, Auth(who): Auth, Path(id): Path<String>) -> Result<Json<api::Job>> {
    let id = parse_id("id", &id)?;
    owned_job(&state, &who, id).await?;
    Ok(Json(state.world.call(move |s, b| s.cancel(b, id)).await?))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = u64, Path)), responses((status = 200, body = [api::JobEvent]), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn job_events(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Vec<api::JobEvent>>> {
    let id = parse_id("id", &id)?;
    visible_job(&state, &who, id).await?;
    Ok(Json(read(&state, move |sql| crate::world::events(sql, id)).await?))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/why", params(("id" = u64, Path)), responses((status = 200, body = Object), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 404, body = api::ApiError), (status = 409, body = api::ApiError)), security(("bearer" = [])))]
async fn job_why(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let id = parse_id("id", &id)?;
    let job = visible_job(&state, &who, id).await?;
    let explanation = state.world.call(move |s, _| Ok(s.scheduler.explain_job(JobId(id)))).await?;
    match explanation {
        Some(e) => Ok(Json(explanation_json(&e)?)),
        None => Err(Error::conflict(
            "not_queued",
            format!("job {id} is not waiting: it is {} (`why` explains jobs that wait)", job.state.as_str()),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

fn reader(db: &std::path::Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(Error::internal)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(Error::internal)?;
    Ok(conn)
}

/// Log chunks: (sequence number, attempt, site, bytes).
type LogChunks = Vec<(i64, u32, String, Vec<u8>)>;

/// Log chunks after `after` (of one site's attempts only, if `site`), and
/// whether the job is finished.
/// Chunks read per query: a page holds at most 64 x 256 KiB, so a reader's
/// memory stays bounded however long the log is.
const LOG_PAGE: i64 = 64;

fn read_logs(db: &std::path::Path, job: u64, after: i64, site: Option<&str>) -> Result<(LogChunks, bool)> {
    let conn = reader(db)?;
    // Whether the job is finished is read first: chunks stored before it
    // finished are then all in the answer, so a follower misses nothing.
    let state: Option<String> =
        conn.query_row("SELECT state FROM jobs WHERE id = ?1", [job as i64], |r| r.get(0)).optional()?;
    let done = state.as_deref().and_then(api::JobState::parse).is_none_or(|s| s.is_terminal());
    let mut stmt = conn.prepare(
        "SELECT l.seq, l.attempt, a.site, l.data FROM logs l JOIN attempts a ON a.job = l.job AND a.attempt = l.attempt
         WHERE l.job = ?1 AND l.seq > ?2 AND (?3 IS NULL OR a.site = ?3) ORDER BY l.seq LIMIT ?4",
    )?;
    let chunks = stmt
        .query_map(params![job as i64, after, site, LOG_PAGE], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((chunks, done))
}

/// Turns chunks into the bytes a reader sees: each attempt's output starts
/// with a marker line naming the attempt and its site.
struct LogRenderer {
    attempt: Option<u32>,
    at_line_start: bool,
}

impl LogRenderer {
    fn new() -> LogRenderer {
        LogRenderer { attempt: None, at_line_start: true }
    }

    fn render(&mut self, attempt: u32, site: &str, data: &[u8], out: &mut Vec<u8>) {
        if self.attempt != Some(attempt) {
            if !self.at_line_start {
                out.push(b'\n');
            }
            out.extend_from_slice(format!("=== attempt {attempt} at {site} ===\n").as_bytes());
            self.attempt = Some(attempt);
        }
        out.extend_from_slice(data);
        if let Some(&last) = data.last() {
            self.at_line_start = last == b'\n';
        }
    }
}

#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("id" = u64, Path), ("follow" = Option<bool>, Query)), responses((status = 200, description = "the job's output, each attempt's after a marker line; streamed while it runs when follow=true", content_type = "text/plain"), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn job_logs(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    query: std::result::Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let id = parse_id("id", &id)?;
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    visible_job(&state, &who, id).await?;
    // A provider reads only the output of the attempts its own site ran.
    let site = match &who.role {
        Role::Provider { site } => Some(site.clone()),
        _ => None,
    };
    let db = state.db.clone();
    // Streamed page by page, followed or not: never the whole log in memory.
    let follow = q.follow;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut after = 0;
        let mut renderer = LogRenderer::new();
        loop {
            let db2 = db.clone();
            let site2 = site.clone();
            let Ok(Ok((chunks, done))) =
                tokio::task::spawn_blocking(move || read_logs(&db2, id, after, site2.as_deref())).await
            else {
                break;
            };
            let full_page = chunks.len() as i64 == LOG_PAGE;
            for (seq, attempt, site, data) in chunks {
                after = seq;
                let mut bytes = Vec::with_capacity(data.len() + 64);
                renderer.render(attempt, &site, &data, &mut bytes);
                if tx.send(Ok(Bytes::from(bytes))).await.is_err() {
                    return;
                }
            }
            if full_page {
                continue;
            }
            if done || !follow {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

#[utoipa::path(get, path = "/v1/sites", responses((status = 200, body = [api::Site]), (status = 401, body = api::ApiError)), security(("bearer" = [])))]
async fn sites(State(state): State<AppState>, Auth(_who): Auth) -> Result<Json<Vec<api::Site>>> {
    let t = state.topology.clone();
    let status = state.world.call(|s, _| Ok(s.capacity())).await?;
    Ok(Json(
        t.sites
            .iter()
            .enumerate()
            .map(|(i, site)| api::Site {
                id: site.key.clone(),
                name: site.name.clone(),
                city: site.city.clone(),
                level: site.level.to_string(),
                up: status.up[i],
                capabilities: status.caps[i].clone(),
                last_seen: status.seen[i],
                backend: status.reports[i].as_ref().map(|r| r.backend.clone()),
                problem: status.reports[i].as_ref().and_then(|r| r.problem.clone()),
                reported_at: status.reports[i].as_ref().map(|r| r.at),
                pools: site
                    .pools
                    .iter()
                    .map(|&p| {
                        let pool = t.pool(p);
                        let reported =
                            status.reports[i].as_ref().filter(|r| !r.pools.is_empty()).map(|r| r.pools.get(&p));
                        api::SitePool {
                            accelerator: t.accelerator(pool.accel).name.clone(),
                            count: pool.count,
                            usable: match (reported, status.reports[i].as_ref().and_then(|r| r.problem.as_ref())) {
                                // A site with a problem offers nothing now.
                                (_, Some(_)) => 0,
                                (None, None) => pool.count,
                                (Some(r), None) => r.map_or(0, |r| r.usable.min(pool.count)),
                            },
                            free: status.free[&p.0],
                            price_fen_per_hour: pool.price_fen_per_hour,
                            drained: reported.flatten().map_or(0, |r| r.drained),
                            down: reported.flatten().map_or(0, |r| r.down),
                            reserved: reported.flatten().map_or(0, |r| r.reserved),
                        }
                    })
                    .collect(),
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgQuery {
    org: Option<String>,
}

#[utoipa::path(get, path = "/v1/vouchers", params(("org" = Option<String>, Query, description = "an operator names the organisation")), responses((status = 200, body = api::Balances), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn vouchers(
    State(state): State<AppState>,
    Auth(who): Auth,
    query: std::result::Result<Query<OrgQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<api::Balances>> {
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    let org = acting_org(&who, q.org.as_deref())?;
    let balances = state
        .world
        .call(move |_, b| {
            let wallet =
                b.account(voucher::wallet(&org)).cloned().ok_or_else(|| Error::not_found("organisation", &org))?;
            let programmes: Vec<String> = {
                let mut stmt = b.sql().prepare("SELECT id FROM programmes ORDER BY id")?;
                stmt.query_map([], |r| r.get(0))?.collect::<std::result::Result<_, _>>()?
            };
            let vouchers = programmes
                .into_iter()
                .filter_map(|p| {
                    b.account(voucher::voucher(&p, &org)).map(|a| api::VoucherBalance {
                        programme: p.clone(),
                        available_fen: a.available(),
                        held_fen: a.debits_pending,
                    })
                })
                .collect();
            Ok(api::Balances {
                org: org.clone(),
                wallet_fen: wallet.available(),
                wallet_held_fen: wallet.debits_pending,
                vouchers,
            })
        })
        .await?;
    Ok(Json(balances))
}

#[utoipa::path(get, path = "/v1/bill", params(("org" = Option<String>, Query, description = "an operator names the organisation")), responses((status = 200, body = api::Bill), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError)), security(("bearer" = [])))]
async fn bill(
    State(state): State<AppState>,
    Auth(who): Auth,
    query: std::result::Result<Query<OrgQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<api::Bill>> {
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    let org = acting_org(&who, q.org.as_deref())?;
    let bill = read(&state, move |conn| {
        let st = audit::statement_of(conn, audit::Party::Org(&org), i64::MIN, i64::MAX)?;
        let mut cause_of = conn.prepare("SELECT cause, exit_code FROM attempts WHERE job = ?1 AND attempt = ?2")?;
        let mut lines = Vec::new();
        // What a card paid is the part of compute neither the voucher nor
        // the organisation did.
        let t = &st.total;
        let mut total = api::Bill {
            org: org.clone(),
            lines: Vec::new(),
            compute_fen: t.compute_fen,
            card_fen: t.compute_fen - t.voucher_fen - t.org_fen,
            subsidy_fen: t.voucher_fen,
            transfer_fen: t.transfer_fen,
            org_fen: t.org_fen + t.transfer_fen,
        };
        for l in &st.lines {
            let (job, attempt) = crate::world::attempt_of_billing_key(&l.job).unwrap_or((0, 0));
            let cause: Option<(Option<String>, Option<i32>)> =
                cause_of.query_row(params![job as i64, attempt], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            let cause = match cause {
                Some((Some(c), code)) => match c.as_str() {
                    "failed" => format!("failed (exit code {})", code.unwrap_or(-1)),
                    "time_limit" => "time limit".into(),
                    "memory_limit" => "memory limit".into(),
                    other => other.to_string(),
                },
                _ => "settled".into(),
            };
            lines.push(api::BillLine {
                job,
                attempt,
                cause,
                site: l.site.clone(),
                accelerator: l.accel.clone(),
                settled_at: l.settled_at,
                accel_seconds: l.accel_seconds,
                compute_fen: l.compute_fen,
                card_fen: l.compute_fen - l.voucher_fen - l.org_fen,
                subsidy_fen: l.voucher_fen,
                transfer_fen: l.transfer_fen,
                org_fen: l.org_fen + l.transfer_fen,
            });
        }
        // Attempts that ended by no fault of the job: listed, never billed.
        let mut unbilled = conn.prepare(
            "SELECT a.job, a.attempt, a.cause, a.site, COALESCE(j.accel, ''), COALESCE(a.ended_at, 0) FROM attempts a JOIN jobs j ON j.id = a.job
             WHERE j.org = ?1 AND a.cause IN ('lost', 'site_down', 'infrastructure', 'preempted', 'refused', 'unfit', 'withdrawn') ORDER BY a.ended_at, a.job, a.attempt",
        )?;
        let rows = unbilled.query_map([&org], |r| {
            Ok(api::BillLine {
                job: r.get::<_, i64>(0)? as u64,
                attempt: r.get(1)?,
                cause: format!("{} (not billed)", r.get::<_, String>(2)?.replace('_', " ")),
                site: r.get(3)?,
                accelerator: r.get(4)?,
                settled_at: r.get(5)?,
                accel_seconds: 0,
                compute_fen: 0,
                card_fen: 0,
                subsidy_fen: 0,
                transfer_fen: 0,
                org_fen: 0,
            })
        })?;
        for line in rows {
            lines.push(line?);
        }
        lines.sort_by_key(|l| (l.job, l.attempt));
        total.lines = lines;
        Ok(total)
    })
    .await?;
    Ok(Json(bill))
}

#[utoipa::path(post, path = "/v1/orgs", request_body = api::OrgRequest, responses((status = 201, body = Object), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 409, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError)), security(("bearer" = [])))]
async fn create_org(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::OrgRequest>,
) -> Result<Response> {
    who.require_operator()?;
    crate::validate::identifier("id", &req.id)?;
    crate::validate::display_name("name", &req.name)?;
    let kind: OrgKind =
        req.kind.as_str().parse().map_err(|e: suanwang_ledger::Refusal| Error::invalid("kind", e.to_string()))?;
    if let Some(home) = &req.home
        && state.topology.site_id(home).is_none()
    {
        return Err(Error::invalid("home", format!("unknown site '{home}'")));
    }
    state
        .world
        .call(move |_, b| {
            voucher::add_org_in(b, &req.id, kind, &req.name)?;
            if let Some(home) = &req.home {
                b.sql()
                    .execute("INSERT OR REPLACE INTO org_homes (org, home) VALUES (?1, ?2)", params![req.id, home])?;
            }
            Ok(())
        })
        .await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"ok": true}))).into_response())
}

#[utoipa::path(post, path = "/v1/tokens", request_body = api::TokenRequest, responses((status = 201, body = api::TokenResponse), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError)), security(("bearer" = [])))]
async fn create_token(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::TokenRequest>,
) -> Result<Response> {
    who.require_operator()?;
    let role = match (req.role, req.org, req.site) {
        (api::Role::Operator, None, None) => Role::Operator,
        (api::Role::Provider, None, Some(site)) => {
            if state.topology.site_id(&site).is_none() {
                return Err(Error::invalid("site", format!("unknown site '{site}'")));
            }
            Role::Provider { site }
        }
        (api::Role::Consumer, Some(org), None) => {
            crate::validate::identifier("org", &org)?;
            Role::Consumer { org }
        }
        _ => {
            return Err(Error::invalid(
                "role",
                "operator takes no org or site; provider needs site; consumer needs org",
            ));
        }
    };
    let label = req.label.clone();
    let r = role.clone();
    let expires_in_s = req.expires_in_s;
    let (token, id) = state
        .world
        .call(move |_, b| {
            if let Role::Consumer { org } = &r {
                b.sql()
                    .query_row("SELECT 1 FROM orgs WHERE id = ?1", [org], |_| Ok(()))
                    .optional()?
                    .ok_or_else(|| Error::not_found("organisation", org))?;
            }
            auth::create(b.sql(), &r, &label, b.now(), expires_in_s)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(api::TokenResponse { token, id, role: role.api() })).into_response())
}

#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = [api::TokenInfo]), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError)), security(("bearer" = [])))]
async fn list_tokens(State(state): State<AppState>, Auth(who): Auth) -> Result<Json<Vec<api::TokenInfo>>> {
    who.require_operator()?;
    Ok(Json(state.world.call(|_, b| auth::list(b.sql())).await?))
}

#[utoipa::path(post, path = "/v1/tokens/{id}/revoke", params(("id" = String, Path, description = "the token's public id")), responses((status = 200, body = api::TokenInfo), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn revoke_token(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<api::TokenInfo>> {
    who.require_operator()?;
    let key = id.clone();
    let info = state.world.call(move |_, b| auth::revoke(b.sql(), &key, b.now())).await?;
    state.tokens.forget(&id);
    Ok(Json(info))
}

#[utoipa::path(post, path = "/v1/agent/lease", request_body = api::LeaseRequest, responses((status = 200, body = api::LeaseResponse), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError)), security(("bearer" = [])))]
async fn lease(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::LeaseRequest>,
) -> Result<Json<api::LeaseResponse>> {
    let site = provider_site(&who, &state.topology)?;
    if req.running.len() > 100_000 {
        return Err(Error::invalid("running", "at most 100000 attempts"));
    }
    if req.wait_s > 60 {
        return Err(Error::invalid("wait_s", format!("must be at most 60, got {}", req.wait_s)));
    }
    if !(1..=64).contains(&req.max) {
        return Err(Error::invalid("max", format!("must be between 1 and 64, got {}", req.max)));
    }
    let max = req.max;
    // Never longer than half the site timeout: the poll is how an idle
    // site's agent says it is alive.
    let wait_s = req.wait_s.min((state.timings.site_timeout_s.max(2) / 2) as u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_s);
    let running = Arc::new(req.running);
    crate::validate::capabilities(&req.capabilities)?;
    let caps = Arc::new(req.capabilities);
    loop {
        let notified = state.world.work_ready.notified();
        let r = running.clone();
        let c = caps.clone();
        let (mut leases, stop) = state
            .world
            .call(move |s, b| {
                let stop = s.stops(b, site, &r)?;
                Ok((s.lease(b, site, &c, max)?, stop))
            })
            .await?;
        if !leases.is_empty() || !stop.is_empty() || tokio::time::Instant::now() >= deadline {
            let lease = if max == 1 { leases.pop() } else { None };
            return Ok(Json(api::LeaseResponse { lease, leases, stop }));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

#[utoipa::path(post, path = "/v1/agent/report", request_body = api::SiteReport, responses((status = 200, body = Object), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError)), security(("bearer" = [])))]
async fn site_report(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(report): ApiJson<api::SiteReport>,
) -> Result<Json<serde_json::Value>> {
    let site = provider_site(&who, &state.topology)?;
    let bound = &state.topology.site(site).key;
    if let Some(named) = report.site.as_deref().filter(|named| *named != bound) {
        return Err(Error::forbidden(format!("this token is bound to site {bound}, not {named}")));
    }
    crate::validate::site_report(&report)?;
    state.world.call(move |s, b| s.report(b, site, &report)).await?;
    Ok(Json(serde_json::json!({"ok": true})))
}

fn attempt_path(job: &str, attempt: &str) -> Result<(u64, u32)> {
    let job = parse_id("job", job)?;
    let attempt = u32::try_from(parse_id("attempt", attempt)?).map_err(|_| Error::invalid("attempt", "too large"))?;
    Ok((job, attempt))
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/start", params(("job" = u64, Path), ("attempt" = u32, Path), ("X-Attempt-Secret" = String, Header, description = "the secret of the attempt's lease")), responses((status = 200, body = Object), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn attempt_start(
    State(state): State<AppState>,
    Auth(who): Auth,
    AttemptSecret(secret): AttemptSecret,
    Path((job, attempt)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>> {
    let (job, attempt) = attempt_path(&job, &attempt)?;
    let site = provider_site(&who, &state.topology)?;
    let ok = state.world.call(move |s, b| s.started(b, site, job, attempt, &secret)).await?;
    Ok(Json(serde_json::json!({"ok": ok})))
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/heartbeat", params(("job" = u64, Path), ("attempt" = u32, Path), ("X-Attempt-Secret" = String, Header, description = "the secret of the attempt's lease")), responses((status = 200, body = api::HeartbeatResponse), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError)), security(("bearer" = [])))]
async fn attempt_heartbeat(
    State(state): State<AppState>,
    Auth(who): Auth,
    AttemptSecret(secret): AttemptSecret,
    Path((job, attempt)): Path<(String, String)>,
) -> Result<Json<api::HeartbeatResponse>> {
    let (job, attempt) = attempt_path(&job, &attempt)?;
    let site = provider_site(&who, &state.topology)?;
    let stop = state.world.call(move |s, b| s.heartbeat(b, site, job, attempt, &secret)).await?;
    Ok(Json(api::HeartbeatResponse { stop }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogChunkQuery {
    /// Where the chunk starts in the attempt's output stream.
    offset: u64,
    /// The chunk is the final tail sent after the quota ran out.
    #[serde(default)]
    tail: bool,
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/logs", params(("job" = u64, Path), ("attempt" = u32, Path), ("offset" = u64, Query, description = "where the chunk starts in the attempt's output"), ("tail" = Option<bool>, Query, description = "the final tail after the quota ran out"), ("X-Attempt-Secret" = String, Header, description = "the secret of the attempt's lease")), request_body(content = String, content_type = "application/octet-stream", description = "at most 262144 bytes"), responses((status = 200, body = api::LogAck), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError), (status = 409, body = api::ApiError), (status = 413, body = api::ApiError)), security(("bearer" = [])))]
async fn attempt_logs(
    State(state): State<AppState>,
    Auth(who): Auth,
    AttemptSecret(secret): AttemptSecret,
    Path((job, attempt)): Path<(String, String)>,
    query: std::result::Result<Query<LogChunkQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Json<api::LogAck>> {
    let (job, attempt) = attempt_path(&job, &attempt)?;
    let Query(q) = query.map_err(|e| Error::invalid("offset", e.body_text()))?;
    let site = provider_site(&who, &state.topology)?;
    let ack = state.world.call(move |s, b| s.logs(b, site, job, attempt, &secret, q.offset, q.tail, &body)).await?;
    Ok(Json(ack))
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/finish", params(("job" = u64, Path), ("attempt" = u32, Path), ("X-Attempt-Secret" = String, Header, description = "the secret of the attempt's lease")), request_body = api::FinishRequest, responses((status = 200, body = Object), (status = 400, body = api::ApiError), (status = 401, body = api::ApiError), (status = 403, body = api::ApiError), (status = 404, body = api::ApiError), (status = 409, body = api::ApiError), (status = 413, body = api::ApiError), (status = 415, body = api::ApiError)), security(("bearer" = [])))]
async fn attempt_finish(
    State(state): State<AppState>,
    Auth(who): Auth,
    AttemptSecret(secret): AttemptSecret,
    Path((job, attempt)): Path<(String, String)>,
    ApiJson(report): ApiJson<api::FinishRequest>,
) -> Result<Json<serde_json::Value>> {
    let (job, attempt) = attempt_path(&job, &attempt)?;
    let site = provider_site(&who, &state.topology)?;
    state.world.call(move |s, b| s.finished(b, site, job, attempt, &secret, &report)).await?;
    Ok(Json(serde_json::json!({"ok": true})))
}
