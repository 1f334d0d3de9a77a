//! The server's state and its single writer.
//!
//! One thread owns the ledger connection (and with it every table of the
//! database file) and the scheduler core. HTTP handlers send it closures;
//! it runs all waiting closures in one SQLite transaction (group commit),
//! each inside its own atomic block so one failing request does not undo
//! another, then runs one scheduling pass and applies its decisions in the
//! same transaction, commits, and only then answers: an answer means the
//! change is on disk.
//!
//! Order within a request matters: every fallible database step comes
//! before the scheduler is told anything, because the scheduler's memory
//! cannot be rolled back with the transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{OptionalExtension, params};
use suanwang_api::{
    AttemptEnd, AttemptRef, Capabilities, FinishRequest, Job, JobEvent, JobRequest, JobState, Lease, LogAck,
    PoolReport, SiteReport,
};
use suanwang_core::job::{DatasetRef, Feature, JobId, JobSpec, OrgId, OrgKind, Weights};
use suanwang_core::scheduler::{Decision, Event, GiveUpReason, Scheduler, StopReason};
use suanwang_core::topology::{PoolId, SiteId, Topology};
use suanwang_ledger::ledger::Batch;
use suanwang_ledger::voucher::{self, Placement, Usage};
use suanwang_ledger::{Ledger, LedgerError};
use tokio::sync::{Notify, oneshot};

use crate::auth::{Principal, Role};
use crate::error::{Error, Result};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    role TEXT NOT NULL,
    org TEXT,
    site TEXT,
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    id TEXT,
    expires_at INTEGER,
    revoked_at INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS org_homes (org TEXT PRIMARY KEY, home TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    org TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    site TEXT,
    accel TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    submitted_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    exit_code INTEGER,
    billed_fen INTEGER,
    subsidy_fen INTEGER,
    secret_keys TEXT
);
-- Secret environment of jobs not yet finished; deleted when the job ends.
CREATE TABLE IF NOT EXISTS job_secrets (job INTEGER PRIMARY KEY, env TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_org ON jobs(org, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
-- One row per attempt: assigned -> leased -> running -> done | failed | lost | stopping -> stopped | refused.
-- `cause` says how it ended (succeeded, failed, time_limit, memory_limit,
-- cancelled, preempted, lost, site_down, infrastructure, refused).
-- `log_received` is the offset in the attempt's output stream up to which
-- the server has it; `log_stored` the bytes stored; `log_dropped` those
-- dropped over the quota.
CREATE TABLE IF NOT EXISTS attempts (
    job INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    site TEXT NOT NULL,
    pool INTEGER NOT NULL,
    state TEXT NOT NULL,
    lease_until INTEGER NOT NULL,
    started_at INTEGER,
    ended_at INTEGER,
    accel_seconds_est INTEGER NOT NULL,
    transfer_fen INTEGER NOT NULL,
    secret_hash BLOB,
    leased_at INTEGER,
    cause TEXT,
    exit_code INTEGER,
    wall_s INTEGER,
    log_received INTEGER NOT NULL DEFAULT 0,
    log_stored INTEGER NOT NULL DEFAULT 0,
    log_dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_site ON attempts(site, state);
CREATE INDEX IF NOT EXISTS attempts_state ON attempts(state);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, at INTEGER NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job, seq);
CREATE TABLE IF NOT EXISTS logs (seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, attempt INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_job ON logs(job, seq);
";

/// Columns added since the first release of the schema: a database made
/// by an older server gets them at the next start.
const MIGRATIONS: &[(&str, &str, &str)] = &[
    ("tokens", "id", "TEXT"),
    ("tokens", "expires_at", "INTEGER"),
    ("tokens", "revoked_at", "INTEGER"),
    ("jobs", "secret_keys", "TEXT"),
    ("attempts", "secret_hash", "BLOB"),
    ("attempts", "leased_at", "INTEGER"),
    ("attempts", "cause", "TEXT"),
    ("attempts", "exit_code", "INTEGER"),
    ("attempts", "wall_s", "INTEGER"),
    ("attempts", "log_received", "INTEGER NOT NULL DEFAULT 0"),
    ("attempts", "log_stored", "INTEGER NOT NULL DEFAULT 0"),
    ("attempts", "log_dropped", "INTEGER NOT NULL DEFAULT 0"),
];

/// Creates the tables and adds columns an older database lacks.
pub fn migrate(sql: &rusqlite::Connection) -> rusqlite::Result<()> {
    sql.execute_batch(SCHEMA)?;
    for (table, column, decl) in MIGRATIONS {
        let has: bool =
            sql.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?.exists([column])?;
        if !has {
            sql.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    // Tokens made before tokens had public ids get one from their hash.
    let unnamed: Vec<Vec<u8>> = {
        let mut stmt = sql.prepare("SELECT hash FROM tokens WHERE id IS NULL")?;
        stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    for hash in unnamed {
        sql.execute("UPDATE tokens SET id = ?2 WHERE hash = ?1", params![hash, crate::auth::public_id(&hash)])?;
    }
    Ok(())
}

/// Timings of leases and liveness, and the log quota.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// An attempt whose agent has not been heard of for this long is lost.
    pub lease_s: i64,
    /// Agents send heartbeats this often.
    pub heartbeat_s: u64,
    /// A site whose agent has not polled for this long is down. Never
    /// shorter than the lease: a site goes down (and its jobs move) only
    /// once its attempts' leases have expired, so that their agents have
    /// killed them first.
    pub site_timeout_s: i64,
    /// Most bytes of output kept per job (all its attempts together).
    pub log_quota_bytes: u64,
    /// Most bytes of output kept for all of one organisation's jobs.
    pub log_quota_per_org_bytes: u64,
    /// Most pending and running jobs one organisation may have.
    pub max_active_jobs_per_org: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease_s: 30,
            heartbeat_s: 5,
            site_timeout_s: 30,
            log_quota_bytes: 100 << 20,
            log_quota_per_org_bytes: 10 << 30,
            max_active_jobs_per_org: 100_000,
        }
    }
}

impl Timings {
    /// Refuses settings that would let two copies of a job run at once.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.lease_s < 2 {
            return Err(format!("--lease-s must be at least 2, got {}", self.lease_s));
        }
        if self.heartbeat_s == 0 || self.heartbeat_s as i64 * 2 > self.lease_s {
            return Err(format!(
                "--heartbeat-s must be between 1 and half the lease ({} s), got {}",
                self.lease_s / 2,
                self.heartbeat_s
            ));
        }
        if self.site_timeout_s < self.lease_s {
            return Err(format!(
                "--site-timeout-s ({}) must be at least --lease-s ({}): a site may go down only after its leases expired",
                self.site_timeout_s, self.lease_s
            ));
        }
        if self.log_quota_bytes < 4096 {
            return Err(format!("the log quota must be at least 4096 bytes, got {}", self.log_quota_bytes));
        }
        Ok(())
    }
}

/// The most bytes of an attempt's output kept after its quota is used up
/// (its last lines, usually where the error is).
pub const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// Largest chunk of output an agent may send in one request.
pub const LOG_CHUNK_BYTES: usize = 256 * 1024;

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Everything the writer thread owns besides the ledger.
pub struct State {
    pub topology: Arc<Topology>,
    pub scheduler: Scheduler,
    pub timings: Timings,
    /// When each site's agent was last heard from.
    site_seen: HashMap<SiteId, i64>,
    /// What each site's agent said it can run.
    site_caps: HashMap<SiteId, Capabilities>,
    /// What each site's agent last reported of its capacity and health.
    site_reports: HashMap<SiteId, ReportedSite>,

    last_now: i64,
    /// Work was assigned or an attempt must stop in this group: wake the
    /// agents' long polls.
    wake_agents: bool,
    /// Pending and running jobs per organisation, counted up at each
    /// submission and recounted from the database when it reaches the cap
    /// (ends are not counted down, so it never undercounts).
    active_jobs: HashMap<String, u64>,
    /// Bytes of output stored per organisation, read once from the
    /// database and counted up as chunks are stored.
    org_log_bytes: HashMap<String, u64>,
}

type Work = Box<dyn FnOnce(&mut State, &mut Batch<'_>) -> Box<dyn FnOnce(bool) + Send> + Send>;

/// The handle HTTP handlers use to reach the writer.
#[derive(Clone)]
pub struct World {
    sender: mpsc::Sender<Work>,
    /// Woken after every commit that assigned work, for agents' long polls.
    pub work_ready: Arc<Notify>,
}

impl World {
    /// Runs `f` on the writer thread in the next group commit and returns
    /// its result once committed.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, &mut Batch<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |state, batch| {
            let outcome = batch.atomic(|b| f(state, b));
            Box::new(move |committed| {
                let outcome = if committed { outcome } else { Err(Error::internal("commit failed")) };
                let _ = reply.send(outcome);
            })
        });
        self.sender.send(work).map_err(|_| Error::internal("writer stopped"))?;
        answer.await.map_err(|_| Error::internal("writer stopped"))?
    }
}

/// Most requests committed together.
const GROUP_MAX: usize = 1024;

/// Starts the writer thread: opens the database, restores the scheduler
/// from it, and serves requests until every handle is dropped.
pub fn start(
    mut ledger: Ledger,
    topology: Arc<Topology>,
    policy: &str,
    timings: Timings,
) -> std::result::Result<World, LedgerError> {
    let now = unix_now();
    // A finished job's secrets are deleted: overwritten in the file, too.
    // Old copies of their pages in the write-ahead log are overwritten as
    // the log restarts from its beginning after each checkpoint. (Cutting
    // the log back at each restart, `journal_size_limit`, would drop them
    // at once, but costs 15% of submissions per second.)
    ledger.connection().pragma_update(None, "secure_delete", "ON")?;
    voucher::init(&mut ledger, now)?;
    ledger.write(now, |b| {
        migrate(b.sql())?;
        Ok(())
    })?;
    let policy = suanwang_core::policy::by_name(policy)
        .map_err(|e| LedgerError::Corrupt { path: "policy".into(), problem: e.to_string() })?;
    let scheduler = Scheduler::new(topology.clone(), policy).with_invariant_checks(cfg!(debug_assertions));
    let mut state = State {
        topology,
        scheduler,
        timings,
        site_seen: HashMap::new(),
        site_caps: HashMap::new(),
        site_reports: HashMap::new(),
        last_now: now,
        wake_agents: false,
        active_jobs: HashMap::new(),
        org_log_bytes: HashMap::new(),
    };
    ledger.write(now, |b| {
        state.restore(b).map_err(|e| LedgerError::Corrupt { path: "jobs".into(), problem: e.body.message })
    })?;
    let (sender, receiver) = mpsc::channel::<Work>();
    let work_ready = Arc::new(Notify::new());
    let notify = work_ready.clone();
    std::thread::Builder::new()
        .name("suanwang-writer".into())
        .spawn(move || {
            while let Ok(first) = receiver.recv() {
                let mut group = vec![first];
                while group.len() < GROUP_MAX {
                    match receiver.try_recv() {
                        Ok(w) => group.push(w),
                        Err(_) => break,
                    }
                }
                let now = state.now();
                let mut finishers = Vec::with_capacity(group.len());
                let outcome = ledger.write(now, |b| {
                    for work in group.drain(..) {
                        finishers.push(work(&mut state, b));
                    }
                    state
                        .schedule(b)
                        .map_err(|e| LedgerError::Corrupt { path: "schedule".into(), problem: e.body.message })
                });
                let committed = outcome.is_ok();
                if let Err(e) = outcome {
                    // The scheduler's memory may now be ahead of the
                    // database: stop, and let a restart rebuild it.
                    eprintln!("suanwang server: commit failed, stopping: {e}");
                    for finish in finishers {
                        finish(false);
                    }
                    std::process::exit(70);
                }
                for finish in finishers {
                    finish(committed);
                }
                if std::mem::take(&mut state.wake_agents) {
                    notify.notify_waiters();
                }
            }
        })
        .expect("spawn writer");
    Ok(World { sender, work_ready })
}

fn event(b: &Batch<'_>, job: u64, kind: &str, detail: &str) -> Result<()> {
    b.sql().prepare_cached("INSERT INTO events (job, at, kind, detail) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
        job as i64,
        b.now(),
        kind,
        detail
    ])?;
    Ok(())
}

fn set_state(b: &Batch<'_>, job: u64, state: JobState, reason: Option<&str>) -> Result<()> {
    let finished = state.is_terminal().then_some(b.now());
    b.sql()
        .prepare_cached("UPDATE jobs SET state = ?2, reason = COALESCE(?3, reason), finished_at = COALESCE(?4, finished_at) WHERE id = ?1")?
        .execute(params![job as i64, state.as_str(), reason, finished])?;
    if state.is_terminal() {
        // A finished job's secrets are needed by no one any more.
        b.sql().prepare_cached("DELETE FROM job_secrets WHERE job = ?1")?.execute([job as i64])?;
    }
    event(b, job, state.as_str(), reason.unwrap_or(""))
}

/// Sets an attempt's final state and cause.
fn end_attempt_row(b: &Batch<'_>, job: u64, attempt: u32, state: &str, cause: &str) -> Result<()> {
    b.sql()
        .prepare_cached(
            "UPDATE attempts SET state = ?3, cause = COALESCE(cause, ?4), ended_at = COALESCE(ended_at, ?5) WHERE job = ?1 AND attempt = ?2",
        )?
        .execute(params![job as i64, attempt, state, cause, b.now()])?;
    Ok(())
}

/// The ledger's name for one attempt's bill: each attempt is held apart, so
/// only the attempt that completes is settled and billed.
pub fn billing_key(job: u64, attempt: u32) -> String {
    format!("job-{job}-{attempt}")
}

/// The job and attempt of a [`billing_key`].
pub fn attempt_of_billing_key(key: &str) -> Option<(u64, u32)> {
    let (job, attempt) = key.strip_prefix("job-")?.split_once('-')?;
    Some((job.parse().ok()?, attempt.parse().ok()?))
}

fn read_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let request: String = row.get("request")?;
    let state: String = row.get("state")?;
    Ok(Job {
        id: row.get::<_, i64>("id")? as u64,
        org: row.get("org")?,
        name: String::new(),
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        reason: row.get("reason")?,
        site: row.get("site")?,
        accelerator: row.get("accel")?,
        attempts: row.get::<_, i64>("attempts")? as u32,
        submitted_at: row.get("submitted_at")?,
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
        exit_code: row.get("exit_code")?,
        billed_fen: row.get("billed_fen")?,
        subsidy_fen: row.get("subsidy_fen")?,
        secret_keys: row
            .get::<_, Option<String>>("secret_keys")?
            .map(|text| serde_json::from_str(&text).unwrap_or_default())
            .unwrap_or_default(),
        request: serde_json::from_str(&request).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
    })
    .map(|mut j| {
        j.name = j.request.name.clone();
        j
    })
}

pub fn load_job(sql: &rusqlite::Connection, id: u64) -> Result<Option<Job>> {
    Ok(sql.prepare_cached("SELECT * FROM jobs WHERE id = ?1")?.query_row([id as i64], read_job).optional()?)
}

impl State {
    /// The time now, never going back.
    pub fn now(&mut self) -> i64 {
        self.last_now = self.last_now.max(unix_now());
        self.last_now
    }

    fn core_now(b: &Batch<'_>) -> u64 {
        b.now().max(0) as u64
    }

    /// The job a request describes, checked against the topology. The
    /// request's own limits are checked at the door (`validate`).
    pub fn spec(&self, b: &Batch<'_>, id: u64, org: &str, req: &JobRequest) -> Result<JobSpec> {
        // The request's own limits were checked at the door
        // (`validate::job_request`); the core checks the spec again below.
        let t = &self.topology;
        let mut accepted = Vec::new();
        for name in &req.accelerators {
            let a = t.accelerator_id(name).ok_or_else(|| {
                Error::invalid(
                    "accelerators",
                    format!(
                        "unknown accelerator type '{}' (known: {})",
                        name.chars().take(64).filter(|c| !c.is_control()).collect::<String>(),
                        t.accelerators.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            if !accepted.contains(&a) {
                accepted.push(a);
            }
        }
        accepted.sort();
        let (kind, org_index): (String, i64) = b
            .sql()
            .query_row("SELECT kind, rowid FROM orgs WHERE id = ?1", [org], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .ok_or_else(|| Error::not_found("organisation", org))?;
        let org_kind = match kind.as_str() {
            "university" => OrgKind::University,
            "institute" => OrgKind::Institute,
            _ => OrgKind::Enterprise,
        };
        let origin = match &req.origin {
            Some(site) => t.site_id(site).ok_or_else(|| Error::invalid("origin", format!("unknown site '{site}'")))?,
            None => {
                let home: Option<String> =
                    b.sql().query_row("SELECT home FROM org_homes WHERE org = ?1", [org], |r| r.get(0)).optional()?;
                home.and_then(|h| t.site_id(&h)).unwrap_or(SiteId(0))
            }
        };
        let mut datasets = Vec::new();
        for d in &req.datasets {
            let home =
                t.site_id(&d.site).ok_or_else(|| Error::invalid("datasets", format!("unknown site '{}'", d.site)))?;
            if !(d.size_gb.is_finite() && d.size_gb >= 0.0 && d.size_gb <= 1_000_000.0) {
                return Err(Error::invalid(
                    "datasets",
                    format!("size_gb must be between 0 and 1000000, got {}", d.size_gb),
                ));
            }
            datasets.push(DatasetRef { size_mb: (d.size_gb * 1000.0).round() as u64, home });
        }
        let weights = match req.weights {
            Some(w) => Weights { time: w.time, cost: w.cost, carbon: w.carbon },
            None => match org_kind {
                OrgKind::Enterprise => Weights { time: 60, cost: 30, carbon: 10 },
                OrgKind::University => Weights { time: 30, cost: 60, carbon: 10 },
                OrgKind::Institute => Weights { time: 40, cost: 40, carbon: 20 },
            },
        };
        let mut spec = JobSpec::new(JobId(id), OrgId(org_index as u32), org_kind, origin, req.gpus, req.estimate_s);
        spec.accepted = accepted;
        spec.datasets = datasets;
        spec.weights = weights;
        spec.budget_fen = req.budget_fen;
        spec.retries = req.retries;
        spec.deadline_s = req.deadline_s.map(|d| Self::core_now(b) + d);
        if let Some(image) = &req.image {
            spec.requires = vec![Self::feature(&format!("image:{image}"))];
        }
        spec.validate(t).map_err(|e| {
            let field = if e.field == "accepted" { "accelerators" } else { e.field };
            Error::invalid(field, e.problem)
        })?;
        Ok(spec)
    }

    /// Has the organisation any wallet money, voucher or compute card left?
    fn can_pay_something(&self, b: &Batch<'_>, org: &str) -> bool {
        let positive = |account| b.account(account).is_some_and(|a| a.available() > 0);
        if positive(voucher::wallet(org)) {
            return true;
        }
        let programmes: Vec<String> = b
            .sql()
            .prepare_cached("SELECT id FROM programmes")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_default();
        programmes.iter().any(|p| positive(voucher::voucher(p, org)))
            || self.topology.accelerators.iter().any(|a| positive(voucher::card(org, &a.name)))
    }

    /// Refuses a job no site can run now for want of a capability.
    pub fn check_capabilities(&self, req: &JobRequest) -> Result<()> {
        let Some(image) = &req.image else { return Ok(()) };
        let containers: Vec<&Capabilities> = self.site_caps.values().filter(|c| c.containers).collect();
        if containers.is_empty() {
            return Err(Error::invalid(
                "image",
                "no site of this network can run container images now (no agent reports the capability); give a command instead",
            ));
        }
        if !containers.iter().any(|c| c.images.iter().any(|i| i == image)) {
            let mut known: Vec<&str> = containers.iter().flat_map(|c| c.images.iter().map(String::as_str)).collect();
            known.sort_unstable();
            known.dedup();
            let more = known.len().saturating_sub(20);
            known.truncate(20);
            let held = match known.is_empty() {
                true => "no site holds any image now".to_string(),
                false => format!(
                    "images at sites now: {}{}",
                    known.join(", "),
                    if more > 0 { format!(" and {more} more") } else { String::new() }
                ),
            };
            return Err(Error::invalid(
                "image",
                format!("no site has the image '{image}' (sites run only images they hold, none is pulled); {held}"),
            ));
        }
        Ok(())
    }

    /// The scheduler's id for a site feature (`image:NAME`): 64 bits of its
    /// SHA-256, so no table of names grows with what agents or tenants send
    /// (two names sharing an id would take 2^32 distinct names to expect).
    fn feature(name: &str) -> Feature {
        let digest = crate::auth::hash(name);
        Feature(u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")))
    }

    /// Tells the scheduler what a site's agent says it can run, when that changed.
    fn update_capabilities(&mut self, b: &Batch<'_>, site: SiteId, caps: &Capabilities) -> Result<()> {
        if self.site_caps.get(&site) == Some(caps) {
            return Ok(());
        }
        let features = match caps.containers {
            true => caps.images.iter().map(|i| Self::feature(&format!("image:{i}"))).collect(),
            false => Vec::new(),
        };
        self.site_caps.insert(site, caps.clone());
        self.scheduler.apply(Self::core_now(b), Event::SiteFeatures { site, features }).map_err(Error::internal)?;
        Ok(())
    }

    /// Stores a new job and gives it to the scheduler. The secret
    /// environment is kept apart from the request, which is shown to people.
    pub fn submit(&mut self, b: &mut Batch<'_>, org: &str, mut req: JobRequest) -> Result<Job> {
        self.check_capabilities(&req)?;
        // A tenant that cannot pay for anything stores nothing.
        if !self.can_pay_something(b, org) {
            return Err(Error::new(
                axum::http::StatusCode::PAYMENT_REQUIRED,
                "insufficient_funds",
                format!("organisation {org} has no money, voucher or compute card to pay with; nothing was stored"),
            ));
        }
        let cap = self.timings.max_active_jobs_per_org;
        let counted = *self.active_jobs.get(org).unwrap_or(&cap);
        if counted >= cap {
            let exact: i64 = b.sql().query_row(
                "SELECT COUNT(*) FROM jobs WHERE org = ?1 AND state IN ('pending', 'running')",
                [org],
                |r| r.get(0),
            )?;
            self.active_jobs.insert(org.to_string(), exact as u64);
            if exact as u64 >= cap {
                return Err(Error::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "too_many_jobs",
                    format!("organisation {org} has {exact} pending or running jobs, the most allowed is {cap}"),
                ));
            }
        }
        *self.active_jobs.entry(org.to_string()).or_insert(0) += 1;
        let now = b.now();
        let secrets = std::mem::take(&mut req.secret_env);
        let text = serde_json::to_string(&req).map_err(Error::internal)?;
        let secret_keys = (!secrets.is_empty())
            .then(|| serde_json::to_string(&secrets.keys().collect::<Vec<_>>()))
            .transpose()
            .map_err(Error::internal)?;
        b.sql()
            .prepare_cached(
                "INSERT INTO jobs (org, request, state, submitted_at, secret_keys) VALUES (?1, ?2, 'pending', ?3, ?4)",
            )?
            .execute(params![org, text, now, secret_keys])?;
        let id = b.sql().last_insert_rowid() as u64;
        if !secrets.is_empty() {
            b.sql().execute(
                "INSERT INTO job_secrets (job, env) VALUES (?1, ?2)",
                params![id as i64, serde_json::to_string(&secrets).map_err(Error::internal)?],
            )?;
        }
        let spec = self.spec(b, id, org, &req)?;
        event(b, id, "submitted", "")?;
        // Last: the scheduler cannot be rolled back.
        let decisions = self
            .scheduler
            .apply(Self::core_now(b), Event::Submit(spec))
            .map_err(|e| Error::invalid("job", e.to_string()))?;
        self.apply(b, decisions)?;
        load_job(b.sql(), id)?.ok_or_else(|| Error::internal("job vanished"))
    }

    /// Cancels a job, pending or running. A running attempt is billed for
    /// the time it ran (the owner chose to stop it), then killed.
    pub fn cancel(&mut self, b: &mut Batch<'_>, id: u64) -> Result<Job> {
        let job = load_job(b.sql(), id)?.ok_or_else(|| Error::not_found("job", id))?;
        if job.state.is_terminal() {
            return Err(Error::conflict(
                "already_finished",
                format!("job {id} has already ended ({})", job.state.as_str()),
            ));
        }
        if let Some((attempt, _)) = self.scheduler.running_attempt(JobId(id)) {
            let started: Option<i64> = b.sql().query_row(
                "SELECT started_at FROM attempts WHERE job = ?1 AND attempt = ?2",
                params![id as i64, attempt],
                |r| r.get(0),
            )?;
            match started {
                Some(started) => {
                    let wall_s = (b.now() - started).max(1) as u64;
                    self.bill_attempt(b, id, attempt, job.request.gpus, wall_s)?;
                }
                None => voucher::release_in(b, &billing_key(id, attempt))?,
            }
            b.sql().execute(
                "UPDATE attempts SET state = 'stopping', cause = 'cancelled' WHERE job = ?1 AND attempt = ?2",
                params![id as i64, attempt],
            )?;
            self.wake_agents = true;
        }
        set_state(b, id, JobState::Cancelled, Some("cancelled by its owner"))?;
        let decisions =
            self.scheduler.apply(Self::core_now(b), Event::Cancel { job: JobId(id) }).map_err(Error::internal)?;
        self.apply(b, decisions)?;
        load_job(b.sql(), id)?.ok_or_else(|| Error::internal("job vanished"))
    }

    /// Settles an attempt's hold with its usage and adds the bill to the job's.
    fn bill_attempt(&mut self, b: &mut Batch<'_>, job: u64, attempt: u32, gpus: u32, wall_s: u64) -> Result<()> {
        let transfer_fen: i64 = b.sql().query_row(
            "SELECT transfer_fen FROM attempts WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt],
            |r| r.get(0),
        )?;
        let usage = Usage { accel_seconds: gpus as i64 * wall_s.max(1) as i64, transfer_fen };
        let settled = voucher::settle_in(b, &billing_key(job, attempt), &usage)?;
        b.sql().execute(
            "UPDATE jobs SET billed_fen = COALESCE(billed_fen, 0) + ?2, subsidy_fen = COALESCE(subsidy_fen, 0) + ?3 WHERE id = ?1",
            params![job as i64, settled.bill.org_total_fen, settled.bill.subsidy_fen],
        )?;
        Ok(())
    }

    /// One scheduling pass, decisions applied.
    pub fn schedule(&mut self, b: &mut Batch<'_>) -> Result<()> {
        let decisions = self.scheduler.schedule(Self::core_now(b)).map_err(Error::internal)?;
        self.apply(b, decisions)
    }

    fn apply(&mut self, b: &mut Batch<'_>, decisions: Vec<Decision>) -> Result<()> {
        let mut queue = std::collections::VecDeque::from(decisions);
        while let Some(d) = queue.pop_front() {
            match d {
                Decision::Start(start) => {
                    let more = self.on_start(b, &start)?;
                    queue.extend(more);
                }
                Decision::Stop { job, attempt, reason } => {
                    let cause = match reason {
                        StopReason::Preempted => "preempted",
                        StopReason::Cancelled => "cancelled",
                    };
                    b.sql().execute(
                        "UPDATE attempts SET state = 'stopping', cause = COALESCE(cause, ?3) WHERE job = ?1 AND attempt = ?2 AND state IN ('assigned', 'leased', 'running')",
                        params![job.0 as i64, attempt, cause],
                    )?;
                    self.wake_agents = true;
                    if reason == StopReason::Preempted {
                        // The platform's choice: never billed.
                        voucher::release_in(b, &billing_key(job.0, attempt))?;
                        set_state(b, job.0, JobState::Pending, Some("preempted"))?;
                    }
                }
                Decision::Requeue { job, attempt, reason } => {
                    let _ = voucher::release_in(b, &billing_key(job.0, attempt));
                    b.sql().execute(
                        "UPDATE jobs SET state = 'pending', site = NULL, accel = NULL WHERE id = ?1",
                        params![job.0 as i64],
                    )?;
                    event(
                        b,
                        job.0,
                        "requeued",
                        &format!("attempt {attempt} ended: {}; queued again", reason.describe()),
                    )?;
                }
                Decision::Reject { job, reason } => set_state(b, job.0, JobState::Rejected, Some(&reason.to_string()))?,
                Decision::GiveUp { job, attempts, reason } => {
                    let why = match reason {
                        GiveUpReason::Failed => {
                            let last: Option<(Option<String>, Option<i32>)> = b
                                .sql()
                                .query_row(
                                    "SELECT cause, exit_code FROM attempts WHERE job = ?1 ORDER BY attempt DESC LIMIT 1",
                                    [job.0 as i64],
                                    |r| Ok((r.get(0)?, r.get(1)?)),
                                )
                                .optional()?;
                            let how = match last {
                                Some((Some(cause), code)) => describe_cause(&cause, code),
                                _ => "failed".into(),
                            };
                            let asked = load_job(b.sql(), job.0)?.map_or(0, |j| j.request.retries);
                            if asked > 0 {
                                format!("attempt {attempts} {how}; no retries left (it asked for {asked})")
                            } else {
                                format!("attempt {attempts} {how}")
                            }
                        }
                        GiveUpReason::LostTooOften => {
                            format!("lost to infrastructure faults too often ({attempts} attempts)")
                        }
                    };
                    set_state(b, job.0, JobState::Failed, Some(&why))?
                }
            }
        }
        Ok(())
    }

    /// A start decision: record the attempt and hold its bill. If the bill
    /// cannot be held the job fails and the scheduler forgets it.
    fn on_start(&mut self, b: &mut Batch<'_>, start: &suanwang_core::scheduler::Start) -> Result<Vec<Decision>> {
        let t = self.topology.clone();
        let job = start.job.0;
        let e = &start.estimate;
        let site = t.site(e.site);
        let accel = t.accelerator(e.accel);
        let pool = t.pool(e.pool);
        let org: String = b.sql().query_row("SELECT org FROM jobs WHERE id = ?1", [job as i64], |r| r.get(0))?;
        let placement = Placement {
            site: site.key.clone(),
            provider: site.provider.clone(),
            accel: accel.name.clone(),
            domestic: accel.domestic,
            price_fen_per_hour: pool.price_fen_per_hour,
        };
        let accel_seconds = e.run_s as i64 * e.gpus as i64;
        let usage = Usage { accel_seconds, transfer_fen: e.transfer_cost_fen };
        let held = voucher::hold_in(b, &billing_key(job, start.attempt), &org, &placement, &usage, 30 * 86_400);
        b.sql()
            .prepare_cached(
                "INSERT INTO attempts (job, attempt, site, pool, state, lease_until, accel_seconds_est, transfer_fen, cause) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                job as i64,
                start.attempt,
                site.key,
                e.pool.0,
                if held.is_ok() { "assigned" } else { "refused" },
                b.now() + self.timings.lease_s,
                accel_seconds,
                e.transfer_cost_fen,
                if held.is_ok() { None } else { Some("refused") }
            ])?;
        match held {
            Ok(_) => {
                b.sql().execute(
                    "UPDATE jobs SET state = 'running', site = ?2, accel = ?3, attempts = ?4 WHERE id = ?1",
                    params![job as i64, site.key, accel.name, start.attempt],
                )?;
                event(
                    b,
                    job,
                    "placed",
                    &format!("attempt {} on {} ({} x {})", start.attempt, site.key, e.gpus, accel.name),
                )?;
                self.wake_agents = true;
                Ok(Vec::new())
            }
            Err(refusal) => {
                let reason = match &refusal {
                    LedgerError::Refused(suanwang_ledger::Refusal::InsufficientFunds { .. }) => format!(
                        "the organisation cannot pay: its wallet and vouchers hold less than the {} fen this attempt needs held",
                        voucher::bill(b, &org, &placement, &usage).map(|bill| bill.org_total_fen).unwrap_or(0)
                    ),
                    other => format!("billing refused: {other}"),
                };
                set_state(b, job, JobState::Failed, Some(&reason))?;
                self.scheduler.apply(Self::core_now(b), Event::Cancel { job: start.job }).map_err(Error::internal)
            }
        }
    }

    /// Records that a site's agent is alive; a site that was down comes up.
    pub fn seen(&mut self, b: &mut Batch<'_>, site: SiteId) -> Result<()> {
        self.site_seen.insert(site, b.now());
        if !self.scheduler.site_up(site) {
            let decisions = self.scheduler.apply(Self::core_now(b), Event::SiteUp(site)).map_err(Error::internal)?;
            self.apply(b, decisions)?;
        }
        Ok(())
    }

    /// The attempts among `running` (those an agent says it runs) that must
    /// be killed: not current any more, or not this site's at all.
    pub fn stops(&self, b: &Batch<'_>, site: SiteId, running: &[AttemptRef]) -> Result<Vec<AttemptRef>> {
        let key = &self.topology.site(site).key;
        let mut stop = Vec::new();
        for r in running {
            let row: Option<(String, String)> = b
                .sql()
                .prepare_cached("SELECT site, state FROM attempts WHERE job = ?1 AND attempt = ?2")?
                .query_row(params![r.job as i64, r.attempt], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let keep = row.is_some_and(|(at, state)| &at == key && matches!(state.as_str(), "leased" | "running"));
            if !keep {
                stop.push(*r);
            }
        }
        Ok(stop)
    }

    /// Gives up to `max` of the site's assigned attempts, oldest first, to
    /// its agent, each with a fresh secret for that attempt alone.
    pub fn lease(&mut self, b: &mut Batch<'_>, site: SiteId, caps: &Capabilities, max: u32) -> Result<Vec<Lease>> {
        self.seen(b, site)?;
        self.update_capabilities(b, site, caps)?;
        let mut leases = Vec::new();
        while (leases.len() as u32) < max.max(1) {
            match self.lease_one(b, site)? {
                Some(lease) => leases.push(lease),
                None => break,
            }
        }
        Ok(leases)
    }

    fn lease_one(&mut self, b: &mut Batch<'_>, site: SiteId) -> Result<Option<Lease>> {
        let key = self.topology.site(site).key.clone();
        let next: Option<(i64, u32)> = b
            .sql()
            .prepare_cached("SELECT job, attempt FROM attempts WHERE site = ?1 AND state = 'assigned' ORDER BY job, attempt LIMIT 1")?
            .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((job, attempt)) = next else { return Ok(None) };
        let secret = crate::auth::new_token().map_err(Error::internal)?;
        b.sql().execute(
            "UPDATE attempts SET state = 'leased', lease_until = ?3, leased_at = ?4, secret_hash = ?5 WHERE job = ?1 AND attempt = ?2",
            params![job, attempt, b.now() + self.timings.lease_s, b.now(), crate::auth::hash(&secret).to_vec()],
        )?;
        let j = load_job(b.sql(), job as u64)?.ok_or_else(|| Error::internal("attempt of unknown job"))?;
        let logged: i64 =
            b.sql()
                .query_row("SELECT COALESCE(SUM(log_stored), 0) FROM attempts WHERE job = ?1", [job], |r| r.get(0))?;
        let secret_env: BTreeMap<String, String> = b
            .sql()
            .query_row("SELECT env FROM job_secrets WHERE job = ?1", [job], |r| r.get::<_, String>(0))
            .optional()?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(Error::internal)?
            .unwrap_or_default();
        event(b, job as u64, "leased", &format!("attempt {attempt} taken by the agent of {key}"))?;
        let r = &j.request;
        Ok(Some(Lease {
            job: job as u64,
            attempt,
            secret,
            command: r.command.clone(),
            env: r.env.clone(),
            secret_env,
            image: r.image.clone(),
            gpus: r.gpus,
            accelerator: j.accelerator.clone().unwrap_or_default(),
            time_limit_s: r.time_limit_s.unwrap_or(r.estimate_s.saturating_mul(2).saturating_add(60)),
            memory_mb: r.memory_mb,
            cpus: r.cpus,
            heartbeat_s: self.timings.heartbeat_s,
            lease_s: self.timings.lease_s as u64,
            log_quota_bytes: self.timings.log_quota_bytes.saturating_sub(logged.max(0) as u64),
        }))
    }

    /// A site's agent reports its backend, health and capacity. Each pool
    /// is planned on with what is usable now; a site with a problem offers
    /// nothing, and the attempts assigned to it that its agent has not
    /// taken are withdrawn and placed again (running ones carry on until
    /// their agent reports them or their leases expire).
    pub fn report(&mut self, b: &mut Batch<'_>, site: SiteId, report: &SiteReport) -> Result<()> {
        let t = self.topology.clone();
        let spec = t.site(site);
        let mut usable = BTreeMap::new();
        let mut pools = BTreeMap::new();
        for (i, p) in report.pools.iter().enumerate() {
            let Some(&pool) = spec.pools.iter().find(|&&pool| t.accelerator(t.pool(pool).accel).name == p.accelerator)
            else {
                let known: Vec<&str> =
                    spec.pools.iter().map(|&pool| t.accelerator(t.pool(pool).accel).name.as_str()).collect();
                return Err(Error::invalid(
                    &format!("pools[{i}].accelerator"),
                    format!("site {} has no pool of '{}' (it has: {})", spec.key, p.accelerator, known.join(", ")),
                ));
            };
            if p.usable > p.total {
                return Err(Error::invalid(
                    &format!("pools[{i}].usable"),
                    format!("{} usable of {} in all", p.usable, p.total),
                ));
            }
            if pools.insert(pool, p.clone()).is_some() {
                return Err(Error::invalid(&format!("pools[{i}].accelerator"), format!("'{}' twice", p.accelerator)));
            }
            usable.insert(pool, p.usable);
        }
        self.seen(b, site)?;
        let healthy = report.problem.is_none();
        let core_now = Self::core_now(b);
        // A report without pools (a local agent's) says nothing of capacity.
        for &pool in spec.pools.iter().filter(|_| !healthy || !report.pools.is_empty()) {
            let n = if healthy { usable.get(&pool).copied().unwrap_or(0) } else { 0 };
            let decisions =
                self.scheduler.apply(core_now, Event::PoolCapacity { pool, usable: n }).map_err(Error::internal)?;
            self.apply(b, decisions)?;
        }
        let was_healthy = self.site_reports.get(&site).is_none_or(|r| r.problem.is_none());
        if !healthy {
            let assigned: Vec<(i64, u32)> = {
                let mut stmt = b.sql().prepare_cached(
                    "SELECT job, attempt FROM attempts WHERE site = ?1 AND state = 'assigned' ORDER BY job, attempt",
                )?;
                stmt.query_map([&spec.key], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<std::result::Result<_, _>>()?
            };
            for (job, attempt) in assigned {
                end_attempt_row(b, job as u64, attempt, "withdrawn", "withdrawn")?;
                voucher::release_in(b, &billing_key(job as u64, attempt))?;
                let decisions = self
                    .scheduler
                    .apply(core_now, Event::Withdraw { job: JobId(job as u64), attempt })
                    .map_err(Error::internal)?;
                self.apply(b, decisions)?;
            }
        }
        if healthy != was_healthy {
            // Work may move to or from the site: let the agents know.
            self.wake_agents = true;
        }
        let problem = report.problem.as_ref().map(|p| p.chars().filter(|c| !c.is_control()).take(1000).collect());
        self.site_reports.insert(
            site,
            ReportedSite { backend: report.backend.clone(), problem, at: b.now(), pools: pools.into_iter().collect() },
        );
        Ok(())
    }

    /// The state of an attempt reported on by `site`'s agent holding
    /// `secret`: another site's attempt, or a wrong or missing secret, is
    /// refused (403) — a provider token alone cannot touch an attempt.
    fn current(&self, b: &Batch<'_>, site: SiteId, job: u64, attempt: u32, secret: &str) -> Result<String> {
        let row: Option<(String, String, Option<Vec<u8>>)> = b
            .sql()
            .prepare_cached("SELECT site, state, secret_hash FROM attempts WHERE job = ?1 AND attempt = ?2")?
            .query_row(params![job as i64, attempt], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((at, state, hash)) = row else { return Err(Error::not_found("attempt", format!("{job}/{attempt}"))) };
        if at != self.topology.site(site).key {
            return Err(Error::forbidden(format!("attempt {job}/{attempt} belongs to another site")));
        }
        let presented = crate::auth::hash(secret);
        if hash.is_none_or(|h| !crate::auth::constant_time_eq(&h, &presented)) {
            return Err(Error::forbidden(format!(
                "attempt {job}/{attempt}: missing or wrong attempt secret (header X-Attempt-Secret)"
            )));
        }
        Ok(state)
    }

    pub fn started(&mut self, b: &mut Batch<'_>, site: SiteId, job: u64, attempt: u32, secret: &str) -> Result<bool> {
        let state = self.current(b, site, job, attempt, secret)?;
        self.seen(b, site)?;
        if state != "leased" {
            return Ok(state == "running");
        }
        b.sql().execute(
            "UPDATE attempts SET state = 'running', started_at = ?3, lease_until = ?4 WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt, b.now(), b.now() + self.timings.lease_s],
        )?;
        b.sql().execute(
            "UPDATE jobs SET started_at = COALESCE(started_at, ?2) WHERE id = ?1",
            params![job as i64, b.now()],
        )?;
        event(b, job, "started", &format!("attempt {attempt}"))?;
        Ok(true)
    }

    /// Extends the lease; answers whether the agent must stop the attempt.
    pub fn heartbeat(&mut self, b: &mut Batch<'_>, site: SiteId, job: u64, attempt: u32, secret: &str) -> Result<bool> {
        let state = self.current(b, site, job, attempt, secret)?;
        self.seen(b, site)?;
        if !matches!(state.as_str(), "leased" | "running") {
            return Ok(true);
        }
        b.sql().execute(
            "UPDATE attempts SET lease_until = ?3 WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt, b.now() + self.timings.lease_s],
        )?;
        Ok(false)
    }

    /// A chunk of an attempt's output, starting at `offset` of its stream.
    /// Chunks already received are acknowledged and ignored (the agent
    /// retries after a lost answer); past the quota only the final tail is
    /// kept, after a marker that says how much was dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn logs(
        &mut self,
        b: &mut Batch<'_>,
        site: SiteId,
        job: u64,
        attempt: u32,
        secret: &str,
        offset: u64,
        tail: bool,
        data: &[u8],
    ) -> Result<LogAck> {
        let state = self.current(b, site, job, attempt, secret)?;
        // Output of an attempt the network gave up (lost, withdrawn, or
        // ended) is not the job's any more: another attempt may be writing
        // its log now. A cancelled one ('stopping') may still ship its last lines.
        if !matches!(state.as_str(), "leased" | "running" | "stopping") {
            return Err(Error::conflict(
                "stale_attempt",
                format!("attempt {attempt} of job {job} no longer counts ({state}): its output is not kept"),
            ));
        }
        if data.len() > LOG_CHUNK_BYTES {
            return Err(Error::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("a log chunk may hold at most {LOG_CHUNK_BYTES} bytes, got {}", data.len()),
            ));
        }
        // The quota is the job's: what earlier attempts stored counts too.
        let (received, stored, dropped): (i64, i64, i64) = b.sql().query_row(
            "SELECT log_received, (SELECT COALESCE(SUM(log_stored), 0) FROM attempts WHERE job = ?1), log_dropped
             FROM attempts WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (received, stored, dropped) = (received as u64, stored as u64, dropped as u64);
        // The job's quota, and what is left of its organisation's.
        let org: String = b.sql().query_row("SELECT org FROM jobs WHERE id = ?1", [job as i64], |r| r.get(0))?;
        let org_stored = match self.org_log_bytes.get(&org) {
            Some(&n) => n,
            None => {
                let n: i64 = b.sql().query_row(
                    "SELECT COALESCE(SUM(a.log_stored), 0) FROM attempts a JOIN jobs j ON j.id = a.job WHERE j.org = ?1",
                    [&org],
                    |r| r.get(0),
                )?;
                self.org_log_bytes.insert(org.clone(), n.max(0) as u64);
                n.max(0) as u64
            }
        };
        let org_room = self.timings.log_quota_per_org_bytes.saturating_sub(org_stored);
        let quota = self.timings.log_quota_bytes.min(stored.saturating_add(org_room));
        let which = if quota < self.timings.log_quota_bytes {
            format!("its organisation's log quota of {} bytes", self.timings.log_quota_per_org_bytes)
        } else {
            format!("the job's log quota of {quota} bytes")
        };
        let end = offset.saturating_add(data.len() as u64);
        if end <= received {
            return Ok(LogAck { received, over_quota: stored >= quota });
        }
        let insert = |bytes: &[u8]| -> Result<()> {
            b.sql()
                .prepare_cached("INSERT INTO logs (job, attempt, data) VALUES (?1, ?2, ?3)")?
                .execute(params![job as i64, attempt, bytes])?;
            Ok(())
        };
        if tail {
            // The last part of the output after the quota ran out: whatever
            // lies between what was received and this tail was dropped.
            if offset < received || data.len() as u64 > LOG_TAIL_BYTES {
                return Err(Error::invalid(
                    "offset",
                    format!("a tail must start at or after {received} and hold at most {LOG_TAIL_BYTES} bytes"),
                ));
            }
            let lost = dropped + (offset - received);
            if lost > 0 {
                insert(format!("\n[truncated: {lost} bytes dropped]\n").as_bytes())?;
                event(
                    b,
                    job,
                    "log_truncated",
                    &format!(
                        "attempt {attempt}: output over {which}; {lost} bytes dropped, the last {} bytes kept",
                        data.len()
                    ),
                )?;
            }
            insert(data)?;
            b.sql().execute(
                "UPDATE attempts SET log_received = ?3, log_stored = log_stored + ?4, log_dropped = ?5 WHERE job = ?1 AND attempt = ?2",
                params![job as i64, attempt, end as i64, data.len() as i64, lost as i64],
            )?;
            *self.org_log_bytes.entry(org).or_insert(0) += data.len() as u64;
            return Ok(LogAck { received: end, over_quota: true });
        }
        if offset > received {
            return Err(Error::conflict(
                "log_gap",
                format!("attempt {job}/{attempt}: the server has {received} bytes of output; send from there"),
            ));
        }
        let fresh = &data[(received - offset) as usize..];
        let room = quota.saturating_sub(stored) as usize;
        let kept = &fresh[..fresh.len().min(room)];
        let lost = (fresh.len() - kept.len()) as u64;
        if !kept.is_empty() {
            insert(kept)?;
            *self.org_log_bytes.entry(org).or_insert(0) += kept.len() as u64;
        }
        b.sql().execute(
            "UPDATE attempts SET log_received = ?3, log_stored = log_stored + ?4, log_dropped = log_dropped + ?5 WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt, end as i64, kept.len() as i64, lost as i64],
        )?;
        Ok(LogAck { received: end, over_quota: stored + kept.len() as u64 >= quota })
    }

    /// The agent's report that an attempt ended. Only the current attempt
    /// counts; a late report from a dead attempt is refused (409).
    ///
    /// What the job did is billed: a success, a failure by its own fault
    /// (exit code, time limit, memory limit). What the site did is not: an
    /// infrastructure fault releases the hold and the job is queued again.
    pub fn finished(
        &mut self,
        b: &mut Batch<'_>,
        site: SiteId,
        job: u64,
        attempt: u32,
        secret: &str,
        report: &FinishRequest,
    ) -> Result<()> {
        let state = self.current(b, site, job, attempt, secret)?;
        self.seen(b, site)?;
        let current = self.scheduler.running_attempt(JobId(job)).is_some_and(|(a, _)| a == attempt);
        if !current || !matches!(state.as_str(), "leased" | "running") {
            b.sql().execute(
                "UPDATE attempts SET state = CASE WHEN state = 'stopping' THEN 'stopped' ELSE state END, ended_at = COALESCE(ended_at, ?3) WHERE job = ?1 AND attempt = ?2",
                params![job as i64, attempt, b.now()],
            )?;
            return Err(Error::conflict("stale_attempt", format!("attempt {attempt} of job {job} no longer counts")));
        }
        if report.end == AttemptEnd::Stopped {
            return Err(Error::invalid("end", "the server did not ask to stop this attempt"));
        }
        // The usage billed is what the agent measured, but never more than
        // the server saw pass since it handed out the lease.
        let leased_at: Option<i64> = b.sql().query_row(
            "SELECT leased_at FROM attempts WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt],
            |r| r.get(0),
        )?;
        let seen_s = (b.now() - leased_at.unwrap_or(b.now())).max(0) as u64 + 1;
        let wall_s = report.wall_s.clamp(1, seen_s);
        let cause = match report.end {
            AttemptEnd::Unfit => "unfit",
            AttemptEnd::Exited if report.exit_code == 0 => "succeeded",
            AttemptEnd::Exited => "failed",
            AttemptEnd::TimeLimit => "time_limit",
            AttemptEnd::MemoryLimit => "memory_limit",
            AttemptEnd::Stopped => unreachable!("refused above"),
            AttemptEnd::Infrastructure => "infrastructure",
        };
        b.sql().execute(
            "UPDATE attempts SET state = ?3, cause = ?4, exit_code = ?5, wall_s = ?6, ended_at = ?7 WHERE job = ?1 AND attempt = ?2",
            params![
                job as i64,
                attempt,
                if cause == "succeeded" { "done" } else { "failed" },
                cause,
                report.exit_code,
                wall_s as i64,
                b.now()
            ],
        )?;
        // What the site's cluster manager allocated, never more than asked.
        let asked: u32 = load_job(b.sql(), job)?.ok_or_else(|| Error::internal("unknown job"))?.request.gpus;
        let gpus = report.gpus.map_or(asked, |g| g.min(asked));
        let core_now = Self::core_now(b);
        let mut detail = format!("attempt {attempt} {}", describe_cause(cause, Some(report.exit_code)));
        if let Some(message) = &report.message {
            // The agent's words go into events people read: no control characters.
            let clean: String = message.chars().filter(|c| !c.is_control()).take(1000).collect();
            detail.push_str(&format!(": {clean}"));
        }
        if report.end.is_job_fault() {
            b.sql().execute("UPDATE jobs SET exit_code = ?2 WHERE id = ?1", params![job as i64, report.exit_code])?;
            self.bill_attempt(b, job, attempt, gpus, wall_s)?;
        } else {
            voucher::release_in(b, &billing_key(job, attempt))?;
        }
        if cause == "succeeded" {
            set_state(b, job, JobState::Succeeded, None)?;
            let decisions = self
                .scheduler
                .apply(core_now, Event::Finished { job: JobId(job), attempt })
                .map_err(Error::internal)?;
            return self.apply(b, decisions);
        }
        event(b, job, "attempt_failed", &detail)?;
        let event = if report.end.is_job_fault() || report.end == AttemptEnd::Unfit {
            Event::Failed { job: JobId(job), attempt }
        } else {
            Event::Lost { job: JobId(job), attempt }
        };
        let decisions = self.scheduler.apply(core_now, event).map_err(Error::internal)?;
        self.apply(b, decisions)
    }

    /// Periodic work: lost leases, silent sites, due timers.
    pub fn tick(&mut self, b: &mut Batch<'_>) -> Result<()> {
        let now = b.now();
        let core_now = Self::core_now(b);
        let expired: Vec<(i64, u32, String)> = {
            let mut stmt = b.sql().prepare_cached(
                "SELECT job, attempt, state FROM attempts WHERE state IN ('assigned', 'leased', 'running', 'stopping') AND lease_until < ?1 ORDER BY job, attempt",
            )?;
            stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<std::result::Result<_, _>>()?
        };
        for (job, attempt, state) in expired {
            if state == "stopping" {
                end_attempt_row(b, job as u64, attempt, "stopped", "cancelled")?;
                continue;
            }
            end_attempt_row(b, job as u64, attempt, "lost", "lost")?;
            event(b, job as u64, "lease_lost", &format!("attempt {attempt}: no word from its agent"))?;
            if self.scheduler.running_attempt(JobId(job as u64)).is_some_and(|(a, _)| a == attempt) {
                voucher::release_in(b, &billing_key(job as u64, attempt))?;
                let decisions = self
                    .scheduler
                    .apply(core_now, Event::Lost { job: JobId(job as u64), attempt })
                    .map_err(Error::internal)?;
                self.apply(b, decisions)?;
            }
        }
        let silent: Vec<SiteId> = (0..self.topology.sites.len() as u32)
            .map(SiteId)
            .filter(|&s| {
                self.scheduler.site_up(s)
                    && self.site_seen.get(&s).is_none_or(|&t| now - t > self.timings.site_timeout_s)
            })
            .collect();
        for site in silent {
            self.site_caps.remove(&site);
            let decisions = self.scheduler.apply(core_now, Event::SiteDown(site)).map_err(Error::internal)?;
            for d in &decisions {
                if let Decision::Requeue { job, attempt, .. } = d {
                    end_attempt_row(b, job.0, *attempt, "lost", "site_down")?;
                }
            }
            self.apply(b, decisions)?;
        }
        if self.scheduler.next_wakeup().is_some_and(|at| at <= core_now) {
            let decisions = self.scheduler.apply(core_now, Event::Tick).map_err(Error::internal)?;
            self.apply(b, decisions)?;
        }
        Ok(())
    }

    /// Rebuilds the scheduler from the database after a (re)start: pending
    /// jobs are queued again; attempts that were running are adopted, their
    /// sites given a grace period to hear from their agents again. Sites
    /// with nothing running start down until their agent polls. Retries
    /// already used are subtracted from each job's allowance.
    fn restore(&mut self, b: &mut Batch<'_>) -> Result<()> {
        let now = b.now();
        let core_now = Self::core_now(b);
        let mut active_sites = Vec::new();
        let running: Vec<(i64, String, String, u32, u32)> = {
            let mut stmt = b.sql().prepare(
                "SELECT j.id, j.org, j.request, a.attempt, a.pool FROM jobs j JOIN attempts a ON a.job = j.id
                 WHERE a.state IN ('assigned', 'leased', 'running') ORDER BY j.id",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                .collect::<std::result::Result<_, _>>()?
        };
        for (id, org, request, attempt, pool) in running {
            let req: JobRequest = serde_json::from_str(&request).map_err(Error::internal)?;
            let mut spec = self.spec(b, id as u64, &org, &req)?;
            spec.retries = spec.retries.saturating_sub(own_failures(b, id)?);
            let started: i64 = b.sql().query_row(
                "SELECT COALESCE(started_at, ?3) FROM attempts WHERE job = ?1 AND attempt = ?2",
                params![id, attempt, now],
                |r| r.get(0),
            )?;
            self.scheduler
                .adopt(core_now, spec, attempt, PoolId(pool), started.max(0) as u64)
                .map_err(Error::internal)?;
            // The agent gets a full lease to report again.
            b.sql().execute(
                "UPDATE attempts SET lease_until = ?3 WHERE job = ?1 AND attempt = ?2",
                params![id, attempt, now + self.timings.lease_s],
            )?;
            active_sites.push(self.topology.pool(PoolId(pool)).site);
        }
        let pending: Vec<(i64, String, String)> = {
            let mut stmt = b.sql().prepare("SELECT id, org, request FROM jobs WHERE state = 'pending' ORDER BY id")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<std::result::Result<_, _>>()?
        };
        for (id, org, request) in pending {
            let req: JobRequest = serde_json::from_str(&request).map_err(Error::internal)?;
            let mut spec = self.spec(b, id as u64, &org, &req)?;
            spec.retries = spec.retries.saturating_sub(own_failures(b, id)?);
            let decisions = self.scheduler.apply(core_now, Event::Submit(spec)).map_err(Error::internal)?;
            self.apply(b, decisions)?;
        }
        for s in 0..self.topology.sites.len() as u32 {
            let site = SiteId(s);
            if active_sites.contains(&site) {
                self.site_seen.insert(site, now);
            } else {
                self.scheduler.apply(core_now, Event::SiteDown(site)).map_err(Error::internal)?;
            }
        }
        Ok(())
    }

    /// Free accelerators per pool, whether each site is up, what its agent
    /// can run and when it was last heard from.
    pub fn capacity(&self) -> SiteStatus {
        let sites = self.topology.sites.len() as u32;
        SiteStatus {
            up: (0..sites).map(|s| self.scheduler.site_up(SiteId(s))).collect(),
            caps: (0..sites).map(|s| self.site_caps.get(&SiteId(s)).cloned().unwrap_or_default()).collect(),
            seen: (0..sites).map(|s| self.site_seen.get(&SiteId(s)).copied()).collect(),
            free: (0..self.topology.pools.len() as u32).map(|p| (p, self.scheduler.free(PoolId(p)))).collect(),
            reports: (0..sites).map(|s| self.site_reports.get(&SiteId(s)).cloned()).collect(),
        }
    }
}

/// Most bytes of stored requests one page of a job list carries: a page of
/// big requests ends early (and says where the next one starts).
pub const LIST_PAGE_BYTES: usize = 4 << 20;

/// Jobs visible to a principal, newest first: a consumer's own; a
/// provider's, those with an attempt at its site; an operator's, all (or one
/// organisation's). Returns the page, how many match in all, and the id to
/// pass as `before` for the next page if there is one. Runs on any
/// connection (a read-only one: listings never hold up the writer).
pub fn list(
    sql: &rusqlite::Connection,
    who: &Principal,
    org: Option<&str>,
    state: Option<JobState>,
    limit: u32,
    before: Option<u64>,
) -> Result<(Vec<Job>, u64, Option<u64>)> {
    let (org, site) = match &who.role {
        Role::Consumer { org } => (Some(org.clone()), None),
        Role::Provider { site } => (None, Some(site.clone())),
        Role::Operator => (org.map(str::to_string), None),
    };
    let filter = "(?1 IS NULL OR org = ?1) AND (?2 IS NULL OR state = ?2)
         AND (?3 IS NULL OR id IN (SELECT job FROM attempts WHERE site = ?3))";
    let mut stmt = sql.prepare_cached(&format!(
        "SELECT * FROM jobs WHERE {filter} AND (?5 IS NULL OR id < ?5) ORDER BY id DESC LIMIT ?4"
    ))?;
    let mut rows = stmt.query(params![org, state.map(|s| s.as_str()), site, limit + 1, before.map(|b| b as i64)])?;
    let mut jobs: Vec<Job> = Vec::new();
    let mut bytes = 0usize;
    let mut next = None;
    while let Some(row) = rows.next()? {
        if jobs.len() as u32 == limit || (bytes >= LIST_PAGE_BYTES && !jobs.is_empty()) {
            next = jobs.last().map(|j| j.id);
            break;
        }
        bytes += row.get_ref("request")?.as_str().map_or(0, str::len);
        jobs.push(read_job(row)?);
    }
    let total: i64 = sql
        .prepare_cached(&format!("SELECT COUNT(*) FROM jobs WHERE {filter}"))?
        .query_row(params![org, state.map(|s| s.as_str()), site], |r| r.get(0))?;
    Ok((jobs, total as u64, next))
}

/// Has the job ever had an attempt at this site? (What a provider may see.)
pub fn ran_at(sql: &rusqlite::Connection, job: u64, site: &str) -> Result<bool> {
    Ok(sql
        .prepare_cached("SELECT 1 FROM attempts WHERE job = ?1 AND site = ?2 LIMIT 1")?
        .exists(params![job as i64, site])?)
}

/// A job's events in order.
pub fn events(sql: &rusqlite::Connection, job: u64) -> Result<Vec<JobEvent>> {
    let mut stmt = sql.prepare_cached("SELECT at, kind, detail FROM events WHERE job = ?1 ORDER BY seq")?;
    let events = stmt
        .query_map([job as i64], |r| Ok(JobEvent { at: r.get(0)?, kind: r.get(1)?, detail: r.get(2)? }))?
        .collect::<std::result::Result<_, _>>()?;
    Ok(events)
}

/// The live state of every site, by site index.
pub struct SiteStatus {
    pub up: Vec<bool>,
    pub caps: Vec<Capabilities>,
    pub seen: Vec<Option<i64>>,
    pub free: BTreeMap<u32, u32>,
    pub reports: Vec<Option<ReportedSite>>,
}

/// What a site's agent last reported.
#[derive(Debug, Clone)]
pub struct ReportedSite {
    pub backend: String,
    pub problem: Option<String>,
    pub at: i64,
    pub pools: BTreeMap<PoolId, PoolReport>,
}

/// Attempts of a job that failed by its own fault.
fn own_failures(b: &Batch<'_>, job: i64) -> Result<u32> {
    let n: i64 = b.sql().query_row(
        "SELECT COUNT(*) FROM attempts WHERE job = ?1 AND cause IN ('failed', 'time_limit', 'memory_limit')",
        [job],
        |r| r.get(0),
    )?;
    Ok(n as u32)
}

/// An attempt's end in words.
pub fn describe_cause(cause: &str, exit_code: Option<i32>) -> String {
    match cause {
        "succeeded" => "succeeded".into(),
        "failed" => match exit_code {
            // 128 + N is how a death by signal N is reported (N < 32);
            // above that, a plain exit code.
            Some(code) if (129..160).contains(&code) => format!("was killed by signal {}", code - 128),
            Some(code) => format!("exited with code {code}"),
            None => "failed".into(),
        },
        "time_limit" => "was killed at its time limit".into(),
        "memory_limit" => "was killed for going over its memory limit".into(),
        "cancelled" => "was cancelled by its owner".into(),
        "preempted" => "was preempted".into(),
        "lost" => "was lost (no word from its agent)".into(),
        "site_down" => "was lost (its site went down)".into(),
        "infrastructure" => "could not run because of a site fault (not billed)".into(),
        "refused" => "was refused by billing".into(),
        "unfit" => "was refused by the site's cluster as more than its nodes can give (not billed)".into(),
        "withdrawn" => "was withdrawn before it began (its site could not take it)".into(),
        other => other.to_string(),
    }
}
