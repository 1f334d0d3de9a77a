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
            .find(token)
            .map(Auth)
            .ok_or_else(|| Error::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown token"))
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
        lease,
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
        api::HeartbeatResponse,
        api::FinishRequest,
        api::Site,
        api::SitePool,
        api::OrgRequest,
        api::TokenRequest,
        api::TokenResponse,
        api::Balances,
        api::VoucherBalance,
        api::Bill,
        api::BillLine
    ))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/v1/health", get(|| async { Json(serde_json::json!({"ok": true})) }))
        .route("/v1/orgs", post(create_org))
        .route("/v1/tokens", post(create_token))
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
        .route("/v1/agent/attempts/{job}/{attempt}/start", post(attempt_start))
        .route("/v1/agent/attempts/{job}/{attempt}/heartbeat", post(attempt_heartbeat))
        .route("/v1/agent/attempts/{job}/{attempt}/logs", post(attempt_logs))
        .route("/v1/agent/attempts/{job}/{attempt}/finish", post(attempt_finish))
        .fallback(|| async { Error::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
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
        (Role::Operator, None) => Err(Error::invalid("org", "an operator must name the organisation")),
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

/// A job the principal may see; others' jobs are "not found", not "forbidden",
/// so ids do not leak.
async fn visible_job(state: &AppState, who: &Principal, id: u64) -> Result<api::Job> {
    let job = state.world.call(move |_, b| load_job(b.sql(), id)).await?.ok_or_else(|| Error::not_found("job", id))?;
    if !who.may_act_for(&job.org) {
        return Err(Error::not_found("job", id));
    }
    Ok(job)
}

#[utoipa::path(post, path = "/v1/jobs", request_body = api::JobRequest, responses((status = 201, body = api::Job), (status = 400, body = api::ApiError)))]
async fn submit(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::JobRequest>,
) -> Result<Response> {
    let org = acting_org(&who, req.org.as_deref())?;
    let job = state.world.call(move |s, b| s.submit(b, &org, req)).await?;
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

#[utoipa::path(post, path = "/v1/quote", request_body = api::JobRequest, responses((status = 200, body = api::Quote)))]
async fn quote(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::JobRequest>,
) -> Result<Json<api::Quote>> {
    let org = acting_org(&who, req.org.as_deref())?;
    let quote = state
        .world
        .call(move |s, b| {
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
            Ok(api::Quote {
                explanation: serde_json::to_value(&explanation).map_err(Error::internal)?,
                bill,
                best_site: best.map(|(site, _)| site),
            })
        })
        .await?;
    Ok(Json(quote))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    /// An operator may list one organisation's jobs.
    org: Option<String>,
}

#[utoipa::path(get, path = "/v1/jobs", params(("state" = Option<String>, Query), ("limit" = Option<u32>, Query), ("org" = Option<String>, Query)), responses((status = 200, body = api::JobList)))]
async fn list_jobs(
    State(state): State<AppState>,
    Auth(who): Auth,
    query: std::result::Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<api::JobList>> {
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    let job_state = match q.state.as_deref() {
        None => None,
        Some(s) => {
            Some(api::JobState::parse(s).ok_or_else(|| Error::invalid("state", format!("unknown state '{s}'")))?)
        }
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(Error::invalid("limit", format!("must be between 1 and 10000, got {limit}")));
    }
    if q.org.is_some() && !matches!(who.role, Role::Operator) {
        return Err(Error::invalid("org", "only an operator may filter by organisation"));
    }
    let jobs = state.world.call(move |s, b| s.list(b, &who, q.org.as_deref(), job_state, limit)).await?;
    Ok(Json(api::JobList { jobs }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", responses((status = 200, body = api::Job), (status = 404, body = api::ApiError)))]
async fn get_job(State(state): State<AppState>, Auth(who): Auth, Path(id): Path<String>) -> Result<Json<api::Job>> {
    let id = parse_id("id", &id)?;
    Ok(Json(visible_job(&state, &who, id).await?))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", responses((status = 200, body = api::Job)))]
async fn cancel_job(State(state): State<AppState>, Auth(who): Auth, Path(id): Path<String>) -> Result<Json<api::Job>> {
    let id = parse_id("id", &id)?;
    visible_job(&state, &who, id).await?;
    Ok(Json(state.world.call(move |s, b| s.cancel(b, id)).await?))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", responses((status = 200, body = [api::JobEvent])))]
async fn job_events(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Vec<api::JobEvent>>> {
    let id = parse_id("id", &id)?;
    visible_job(&state, &who, id).await?;
    Ok(Json(state.world.call(move |s, b| s.events(b, id)).await?))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/why", responses((status = 200, body = Object)))]
async fn job_why(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let id = parse_id("id", &id)?;
    let job = visible_job(&state, &who, id).await?;
    let explanation = state.world.call(move |s, _| Ok(s.scheduler.explain_job(JobId(id)))).await?;
    match explanation {
        Some(e) => Ok(Json(serde_json::to_value(e).map_err(Error::internal)?)),
        None => Err(Error::conflict("not_queued", format!("job {id} is {}, not waiting", job.state.as_str()))),
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

/// Log chunks: (sequence number, bytes).
type LogChunks = Vec<(i64, Vec<u8>)>;

/// Log chunks after `after`, and whether the job is finished.
fn read_logs(db: &std::path::Path, job: u64, after: i64) -> Result<(LogChunks, bool)> {
    let conn = reader(db)?;
    let mut stmt = conn.prepare("SELECT seq, data FROM logs WHERE job = ?1 AND seq > ?2 ORDER BY seq")?;
    let chunks = stmt
        .query_map(params![job as i64, after], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let state: Option<String> =
        conn.query_row("SELECT state FROM jobs WHERE id = ?1", [job as i64], |r| r.get(0)).optional()?;
    let done = state.as_deref().and_then(api::JobState::parse).is_none_or(|s| s.is_terminal());
    Ok((chunks, done))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("follow" = Option<bool>, Query)), responses((status = 200, description = "the job's output, streamed while it runs when follow=true")))]
async fn job_logs(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    query: std::result::Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let id = parse_id("id", &id)?;
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    visible_job(&state, &who, id).await?;
    let db = state.db.clone();
    if !q.follow {
        let (chunks, _) =
            tokio::task::spawn_blocking(move || read_logs(&db, id, 0)).await.map_err(Error::internal)??;
        let bytes: Vec<u8> = chunks.into_iter().flat_map(|(_, d)| d).collect();
        return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut after = 0;
        loop {
            let db2 = db.clone();
            let Ok(Ok((chunks, done))) = tokio::task::spawn_blocking(move || read_logs(&db2, id, after)).await else {
                break;
            };
            for (seq, data) in chunks {
                after = seq;
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    return;
                }
            }
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

#[utoipa::path(get, path = "/v1/sites", responses((status = 200, body = [api::Site])))]
async fn sites(State(state): State<AppState>, Auth(_who): Auth) -> Result<Json<Vec<api::Site>>> {
    let t = state.topology.clone();
    let (up, free) = state.world.call(|s, _| Ok(s.capacity())).await?;
    Ok(Json(
        t.sites
            .iter()
            .enumerate()
            .map(|(i, site)| api::Site {
                id: site.key.clone(),
                name: site.name.clone(),
                city: site.city.clone(),
                level: site.level.to_string(),
                up: up[i],
                pools: site
                    .pools
                    .iter()
                    .map(|&p| {
                        let pool = t.pool(p);
                        api::SitePool {
                            accelerator: t.accelerator(pool.accel).name.clone(),
                            count: pool.count,
                            free: free[&p.0],
                            price_fen_per_hour: pool.price_fen_per_hour,
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

#[utoipa::path(get, path = "/v1/vouchers", params(("org" = Option<String>, Query)), responses((status = 200, body = api::Balances)))]
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

#[utoipa::path(get, path = "/v1/bill", params(("org" = Option<String>, Query)), responses((status = 200, body = api::Bill)))]
async fn bill(
    State(state): State<AppState>,
    Auth(who): Auth,
    query: std::result::Result<Query<OrgQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<api::Bill>> {
    let Query(q) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    let org = acting_org(&who, q.org.as_deref())?;
    let db = state.db.clone();
    let bill = tokio::task::spawn_blocking(move || -> Result<api::Bill> {
        let st = audit::statement_of(&reader(&db)?, audit::Party::Org(&org), i64::MIN, i64::MAX)?;
        let jobs = st
            .lines
            .iter()
            .map(|l| api::BillLine {
                job: crate::world::job_of_billing_key(&l.job).unwrap_or(0),
                site: l.site.clone(),
                accelerator: l.accel.clone(),
                accel_seconds: l.accel_seconds,
                compute_fen: l.compute_fen,
                subsidy_fen: l.voucher_fen,
                org_fen: l.org_fen + l.transfer_fen,
            })
            .collect();
        let t = &st.total;
        Ok(api::Bill {
            org: org.clone(),
            jobs,
            compute_fen: t.compute_fen,
            subsidy_fen: t.voucher_fen,
            org_fen: t.org_fen + t.transfer_fen,
        })
    })
    .await
    .map_err(Error::internal)??;
    Ok(Json(bill))
}

#[utoipa::path(post, path = "/v1/orgs", request_body = api::OrgRequest, responses((status = 201)))]
async fn create_org(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::OrgRequest>,
) -> Result<Response> {
    who.require_operator()?;
    let kind: OrgKind =
        req.kind.parse().map_err(|e: suanwang_ledger::Refusal| Error::invalid("kind", e.to_string()))?;
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

#[utoipa::path(post, path = "/v1/tokens", request_body = api::TokenRequest, responses((status = 201, body = api::TokenResponse)))]
async fn create_token(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::TokenRequest>,
) -> Result<Response> {
    who.require_operator()?;
    let role = match (req.role.as_str(), req.org, req.site) {
        ("operator", None, None) => Role::Operator,
        ("provider", None, Some(site)) => {
            if state.topology.site_id(&site).is_none() {
                return Err(Error::invalid("site", format!("unknown site '{site}'")));
            }
            Role::Provider { site }
        }
        ("consumer", Some(org), None) => Role::Consumer { org },
        ("operator" | "provider" | "consumer", _, _) => {
            return Err(Error::invalid(
                "role",
                "operator takes no org or site; provider needs site; consumer needs org",
            ));
        }
        (other, _, _) => {
            return Err(Error::invalid("role", format!("unknown role '{other}' (operator, provider, consumer)")));
        }
    };
    let label = req.label.clone();
    let r = role.clone();
    let (token, h) = state
        .world
        .call(move |_, b| {
            if let Role::Consumer { org } = &r {
                b.sql()
                    .query_row("SELECT 1 FROM orgs WHERE id = ?1", [org], |_| Ok(()))
                    .optional()?
                    .ok_or_else(|| Error::not_found("organisation", org))?;
            }
            auth::create(b.sql(), &r, &label, b.now())
        })
        .await?;
    state.tokens.insert(h, Principal { role: role.clone(), label: req.label });
    Ok((StatusCode::CREATED, Json(api::TokenResponse { token, role: role.name().into() })).into_response())
}

#[utoipa::path(post, path = "/v1/agent/lease", request_body = api::LeaseRequest, responses((status = 200, body = api::LeaseResponse)))]
async fn lease(
    State(state): State<AppState>,
    Auth(who): Auth,
    ApiJson(req): ApiJson<api::LeaseRequest>,
) -> Result<Json<api::LeaseResponse>> {
    let site = provider_site(&who, &state.topology)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(req.wait_s.min(60));
    loop {
        let notified = state.world.work_ready.notified();
        let lease = state.world.call(move |s, b| s.lease(b, site)).await?;
        if lease.is_some() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(api::LeaseResponse { lease }));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/start", responses((status = 200)))]
async fn attempt_start(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path((job, attempt)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>> {
    let job = parse_id("job", &job)?;
    let attempt = u32::try_from(parse_id("attempt", &attempt)?).map_err(|_| Error::invalid("attempt", "too large"))?;
    let site = provider_site(&who, &state.topology)?;
    let ok = state.world.call(move |s, b| s.started(b, site, job, attempt)).await?;
    Ok(Json(serde_json::json!({"ok": ok})))
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/heartbeat", responses((status = 200, body = api::HeartbeatResponse)))]
async fn attempt_heartbeat(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path((job, attempt)): Path<(String, String)>,
) -> Result<Json<api::HeartbeatResponse>> {
    let job = parse_id("job", &job)?;
    let attempt = u32::try_from(parse_id("attempt", &attempt)?).map_err(|_| Error::invalid("attempt", "too large"))?;
    let site = provider_site(&who, &state.topology)?;
    let stop = state.world.call(move |s, b| s.heartbeat(b, site, job, attempt)).await?;
    Ok(Json(api::HeartbeatResponse { stop }))
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/logs", request_body(content = String, content_type = "application/octet-stream"), responses((status = 200)))]
async fn attempt_logs(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path((job, attempt)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<serde_json::Value>> {
    let job = parse_id("job", &job)?;
    let attempt = u32::try_from(parse_id("attempt", &attempt)?).map_err(|_| Error::invalid("attempt", "too large"))?;
    let site = provider_site(&who, &state.topology)?;
    state.world.call(move |s, b| s.logs(b, site, job, attempt, &body)).await?;
    Ok(Json(serde_json::json!({"ok": true})))
}

#[utoipa::path(post, path = "/v1/agent/attempts/{job}/{attempt}/finish", request_body = api::FinishRequest, responses((status = 200), (status = 409, body = api::ApiError)))]
async fn attempt_finish(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path((job, attempt)): Path<(String, String)>,
    ApiJson(report): ApiJson<api::FinishRequest>,
) -> Result<Json<serde_json::Value>> {
    let job = parse_id("job", &job)?;
    let attempt = u32::try_from(parse_id("attempt", &attempt)?).map_err(|_| Error::invalid("attempt", "too large"))?;
    let site = provider_site(&who, &state.topology)?;
    state.world.call(move |s, b| s.finished(b, site, job, attempt, &report)).await?;
    Ok(Json(serde_json::json!({"ok": true})))
}
