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
use suanwang_api::{FinishRequest, Job, JobEvent, JobRequest, JobState, Lease};
use suanwang_core::job::{DatasetRef, JobId, JobSpec, OrgId, OrgKind, Weights};
use suanwang_core::scheduler::{Decision, Event, Scheduler, StopReason};
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
    created_at INTEGER NOT NULL
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
    subsidy_fen INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_org ON jobs(org, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
-- One row per attempt: assigned -> leased -> running -> done | failed | lost | stopped | refused.
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
    PRIMARY KEY (job, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_site ON attempts(site, state);
CREATE INDEX IF NOT EXISTS attempts_state ON attempts(state);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, at INTEGER NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job, seq);
CREATE TABLE IF NOT EXISTS logs (seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, attempt INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_job ON logs(job, seq);
";

/// Timings of leases and liveness.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// An attempt whose agent has not been heard of for this long is lost.
    pub lease_s: i64,
    /// Agents send heartbeats this often.
    pub heartbeat_s: u64,
    /// A site whose agent has not polled for this long is down.
    pub site_timeout_s: i64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings { lease_s: 30, heartbeat_s: 5, site_timeout_s: 20 }
    }
}

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
    last_now: i64,
    /// New work was assigned to some site in this group: wake the agents.
    assigned: bool,
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
    voucher::init(&mut ledger, now)?;
    ledger.write(now, |b| {
        b.sql().execute_batch(SCHEMA)?;
        Ok(())
    })?;
    let policy = suanwang_core::policy::by_name(policy)
        .map_err(|e| LedgerError::Corrupt { path: "policy".into(), problem: e.to_string() })?;
    let scheduler = Scheduler::new(topology.clone(), policy).with_invariant_checks(cfg!(debug_assertions));
    let mut state = State { topology, scheduler, timings, site_seen: HashMap::new(), last_now: now, assigned: false };
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
                if std::mem::take(&mut state.assigned) {
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
    event(b, job, state.as_str(), reason.unwrap_or(""))
}

/// The ledger's name for one attempt's bill: each attempt is held apart, so
/// only the attempt that completes is settled and billed.
pub fn billing_key(job: u64, attempt: u32) -> String {
    format!("job-{job}-{attempt}")
}

/// The job of a [`billing_key`].
pub fn job_of_billing_key(key: &str) -> Option<u64> {
    key.strip_prefix("job-")?.split('-').next()?.parse().ok()
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

    /// The job a request describes, checked against the topology.
    pub fn spec(&self, b: &Batch<'_>, id: u64, org: &str, req: &JobRequest) -> Result<JobSpec> {
        let t = &self.topology;
        if req.gpus == 0 || req.gpus > 100_000 {
            return Err(Error::invalid("gpus", format!("must be between 1 and 100000, got {}", req.gpus)));
        }
        if req.estimate_s == 0 || req.estimate_s > suanwang_core::job::MAX_ESTIMATE_S {
            return Err(Error::invalid(
                "estimate_s",
                format!("must be between 1 and {}, got {}", suanwang_core::job::MAX_ESTIMATE_S, req.estimate_s),
            ));
        }
        if req.accelerators.is_empty() {
            return Err(Error::invalid("accelerators", "must name at least one accelerator type"));
        }
        let mut accepted = Vec::new();
        for name in &req.accelerators {
            let a = t
                .accelerator_id(name)
                .ok_or_else(|| Error::invalid("accelerators", format!("unknown accelerator type '{name}'")))?;
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
        if req.budget_fen.is_some_and(|b| b < 0) {
            return Err(Error::invalid("budget_fen", "must not be negative"));
        }
        if req.command.is_empty() && req.image.is_none() {
            return Err(Error::invalid("command", "a job needs a command (or an image)"));
        }
        let mut spec = JobSpec::new(JobId(id), OrgId(org_index as u32), org_kind, origin, req.gpus, req.estimate_s);
        spec.accepted = accepted;
        spec.datasets = datasets;
        spec.weights = weights;
        spec.budget_fen = req.budget_fen;
        spec.deadline_s = req.deadline_s.map(|d| Self::core_now(b) + d);
        spec.validate(t).map_err(|e| Error::invalid(e.field, e.problem))?;
        Ok(spec)
    }

    /// Stores a new job and gives it to the scheduler.
    pub fn submit(&mut self, b: &mut Batch<'_>, org: &str, req: JobRequest) -> Result<Job> {
        let now = b.now();
        let text = serde_json::to_string(&req).map_err(Error::internal)?;
        b.sql()
            .prepare_cached("INSERT INTO jobs (org, request, state, submitted_at) VALUES (?1, ?2, 'pending', ?3)")?
            .execute(params![org, text, now])?;
        let id = b.sql().last_insert_rowid() as u64;
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

    /// Cancels a job, pending or running, and releases its hold.
    pub fn cancel(&mut self, b: &mut Batch<'_>, id: u64) -> Result<Job> {
        let job = load_job(b.sql(), id)?.ok_or_else(|| Error::not_found("job", id))?;
        if job.state.is_terminal() {
            return Err(Error::conflict("already_finished", format!("job {id} is already {}", job.state.as_str())));
        }
        if let Some((attempt, _)) = self.scheduler.running_attempt(JobId(id)) {
            voucher::release_in(b, &billing_key(id, attempt))?;
            b.sql().execute(
                "UPDATE attempts SET state = 'stopping' WHERE job = ?1 AND attempt = ?2",
                params![id as i64, attempt],
            )?;
        }
        set_state(b, id, JobState::Cancelled, Some("cancelled by its owner"))?;
        let decisions =
            self.scheduler.apply(Self::core_now(b), Event::Cancel { job: JobId(id) }).map_err(Error::internal)?;
        self.apply(b, decisions)?;
        load_job(b.sql(), id)?.ok_or_else(|| Error::internal("job vanished"))
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
                    b.sql().execute(
                        "UPDATE attempts SET state = 'stopping' WHERE job = ?1 AND attempt = ?2 AND state IN ('assigned', 'leased', 'running')",
                        params![job.0 as i64, attempt],
                    )?;
                    if reason == StopReason::Preempted {
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
                    event(b, job.0, "requeued", &format!("attempt {attempt}: {reason:?}"))?;
                }
                Decision::Reject { job, reason } => set_state(b, job.0, JobState::Rejected, Some(&reason.to_string()))?,
                Decision::GiveUp { job, attempts } => {
                    set_state(b, job.0, JobState::Failed, Some(&format!("failed {attempts} times")))?
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
                "INSERT INTO attempts (job, attempt, site, pool, state, lease_until, accel_seconds_est, transfer_fen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                job as i64,
                start.attempt,
                site.key,
                e.pool.0,
                if held.is_ok() { "assigned" } else { "refused" },
                b.now() + self.timings.lease_s,
                accel_seconds,
                e.transfer_cost_fen
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
                self.assigned = true;
                Ok(Vec::new())
            }
            Err(refusal) => {
                let reason = format!("billing refused: [{}] {refusal}", refusal.code());
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

    /// Gives the oldest assigned attempt of the site to its agent.
    pub fn lease(&mut self, b: &mut Batch<'_>, site: SiteId) -> Result<Option<Lease>> {
        self.seen(b, site)?;
        let key = self.topology.site(site).key.clone();
        let next: Option<(i64, u32)> = b
            .sql()
            .prepare_cached("SELECT job, attempt FROM attempts WHERE site = ?1 AND state = 'assigned' ORDER BY job, attempt LIMIT 1")?
            .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((job, attempt)) = next else { return Ok(None) };
        b.sql().execute(
            "UPDATE attempts SET state = 'leased', lease_until = ?3 WHERE job = ?1 AND attempt = ?2",
            params![job, attempt, b.now() + self.timings.lease_s],
        )?;
        let j = load_job(b.sql(), job as u64)?.ok_or_else(|| Error::internal("attempt of unknown job"))?;
        event(b, job as u64, "leased", &format!("attempt {attempt} by the agent of {key}"))?;
        let r = &j.request;
        Ok(Some(Lease {
            job: job as u64,
            attempt,
            command: r.command.clone(),
            env: r.env.clone(),
            image: r.image.clone(),
            gpus: r.gpus,
            accelerator: j.accelerator.clone().unwrap_or_default(),
            time_limit_s: r.time_limit_s.unwrap_or(r.estimate_s.saturating_mul(2).saturating_add(60)),
            heartbeat_s: self.timings.heartbeat_s,
        }))
    }

    /// The attempt, if it is the current one of the job and at this site.
    fn current(&self, b: &Batch<'_>, site: SiteId, job: u64, attempt: u32) -> Result<String> {
        let row: Option<(String, String)> = b
            .sql()
            .prepare_cached("SELECT site, state FROM attempts WHERE job = ?1 AND attempt = ?2")?
            .query_row(params![job as i64, attempt], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((at, state)) = row else { return Err(Error::not_found("attempt", format!("{job}/{attempt}"))) };
        if at != self.topology.site(site).key {
            return Err(Error::forbidden(format!("attempt {job}/{attempt} belongs to another site")));
        }
        Ok(state)
    }

    pub fn started(&mut self, b: &mut Batch<'_>, site: SiteId, job: u64, attempt: u32) -> Result<bool> {
        self.seen(b, site)?;
        let state = self.current(b, site, job, attempt)?;
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
    pub fn heartbeat(&mut self, b: &mut Batch<'_>, site: SiteId, job: u64, attempt: u32) -> Result<bool> {
        self.seen(b, site)?;
        let state = self.current(b, site, job, attempt)?;
        if !matches!(state.as_str(), "leased" | "running") {
            return Ok(true);
        }
        b.sql().execute(
            "UPDATE attempts SET lease_until = ?3 WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt, b.now() + self.timings.lease_s],
        )?;
        Ok(false)
    }

    pub fn logs(&mut self, b: &mut Batch<'_>, site: SiteId, job: u64, attempt: u32, data: &[u8]) -> Result<()> {
        self.current(b, site, job, attempt)?;
        b.sql()
            .prepare_cached("INSERT INTO logs (job, attempt, data) VALUES (?1, ?2, ?3)")?
            .execute(params![job as i64, attempt, data])?;
        Ok(())
    }

    /// The agent's report that an attempt ended. Only the current attempt
    /// counts; a late report from a dead attempt is refused (409).
    pub fn finished(
        &mut self,
        b: &mut Batch<'_>,
        site: SiteId,
        job: u64,
        attempt: u32,
        report: &FinishRequest,
    ) -> Result<()> {
        self.seen(b, site)?;
        let state = self.current(b, site, job, attempt)?;
        let current = self.scheduler.running_attempt(JobId(job)).is_some_and(|(a, _)| a == attempt);
        if !current || !matches!(state.as_str(), "leased" | "running") {
            b.sql().execute(
                "UPDATE attempts SET state = CASE WHEN state = 'stopping' THEN 'stopped' ELSE state END, ended_at = COALESCE(ended_at, ?3) WHERE job = ?1 AND attempt = ?2",
                params![job as i64, attempt, b.now()],
            )?;
            return Err(Error::conflict("stale_attempt", format!("attempt {attempt} of job {job} no longer counts")));
        }
        let ok = report.exit_code == 0 && report.killed.is_none();
        b.sql().execute(
            "UPDATE attempts SET state = ?3, ended_at = ?4 WHERE job = ?1 AND attempt = ?2",
            params![job as i64, attempt, if ok { "done" } else { "failed" }, b.now()],
        )?;
        b.sql().execute("UPDATE jobs SET exit_code = ?2 WHERE id = ?1", params![job as i64, report.exit_code])?;
        let key = billing_key(job, attempt);
        let core_now = Self::core_now(b);
        if ok {
            let (gpus, transfer_fen): (i64, i64) = {
                let j = load_job(b.sql(), job)?.ok_or_else(|| Error::internal("unknown job"))?;
                let transfer: i64 = b.sql().query_row(
                    "SELECT transfer_fen FROM attempts WHERE job = ?1 AND attempt = ?2",
                    params![job as i64, attempt],
                    |r| r.get(0),
                )?;
                (j.request.gpus as i64, transfer)
            };
            let usage = Usage { accel_seconds: gpus * report.wall_s.max(1) as i64, transfer_fen };
            let settled = voucher::settle_in(b, &key, &usage)?;
            b.sql().execute(
                "UPDATE jobs SET billed_fen = ?2, subsidy_fen = ?3 WHERE id = ?1",
                params![job as i64, settled.bill.org_total_fen, settled.bill.subsidy_fen],
            )?;
            set_state(b, job, JobState::Succeeded, None)?;
            let decisions = self
                .scheduler
                .apply(core_now, Event::Finished { job: JobId(job), attempt })
                .map_err(Error::internal)?;
            self.apply(b, decisions)
        } else {
            voucher::release_in(b, &key)?;
            let why = report.killed.clone().unwrap_or_else(|| format!("exit code {}", report.exit_code));
            event(b, job, "attempt_failed", &format!("attempt {attempt}: {why}"))?;
            if report.killed.as_deref() == Some("time limit") {
                set_state(b, job, JobState::Failed, Some("killed at its time limit"))?;
                let decisions =
                    self.scheduler.apply(core_now, Event::Cancel { job: JobId(job) }).map_err(Error::internal)?;
                return self.apply(b, decisions);
            }
            let decisions =
                self.scheduler.apply(core_now, Event::Failed { job: JobId(job), attempt }).map_err(Error::internal)?;
            let gave_up = decisions.iter().any(|d| matches!(d, Decision::GiveUp { .. }));
            self.apply(b, decisions)?;
            if gave_up {
                set_state(b, job, JobState::Failed, Some(&format!("attempt {attempt}: {why}")))?;
            }
            Ok(())
        }
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
            b.sql().execute(
                "UPDATE attempts SET state = ?3, ended_at = ?4 WHERE job = ?1 AND attempt = ?2",
                params![job, attempt, if state == "stopping" { "stopped" } else { "lost" }, now],
            )?;
            if state == "stopping" {
                continue;
            }
            event(b, job as u64, "lease_lost", &format!("attempt {attempt}: no word from its agent"))?;
            if self.scheduler.running_attempt(JobId(job as u64)).is_some_and(|(a, _)| a == attempt) {
                voucher::release_in(b, &billing_key(job as u64, attempt))?;
                let decisions = self
                    .scheduler
                    .apply(core_now, Event::Failed { job: JobId(job as u64), attempt })
                    .map_err(Error::internal)?;
                let gave_up = decisions.iter().any(|d| matches!(d, Decision::GiveUp { .. }));
                self.apply(b, decisions)?;
                if gave_up {
                    set_state(b, job as u64, JobState::Failed, Some("lost too many times"))?;
                }
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
            let decisions = self.scheduler.apply(core_now, Event::SiteDown(site)).map_err(Error::internal)?;
            for d in &decisions {
                if let Decision::Requeue { job, attempt, .. } = d {
                    b.sql().execute(
                        "UPDATE attempts SET state = 'lost', ended_at = ?3 WHERE job = ?1 AND attempt = ?2",
                        params![job.0 as i64, attempt, now],
                    )?;
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
    /// with nothing running start down until their agent polls.
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
            let spec = self.spec(b, id as u64, &org, &req)?;
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
            let spec = self.spec(b, id as u64, &org, &req)?;
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

    /// Jobs visible to a principal, newest first.
    pub fn list(
        &self,
        b: &Batch<'_>,
        who: &Principal,
        org: Option<&str>,
        state: Option<JobState>,
        limit: u32,
    ) -> Result<Vec<Job>> {
        let org = match &who.role {
            Role::Consumer { org } => Some(org.clone()),
            _ => org.map(str::to_string),
        };
        let mut stmt = b.sql().prepare_cached(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR org = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY id DESC LIMIT ?3",
        )?;
        let jobs = stmt
            .query_map(params![org, state.map(|s| s.as_str()), limit], read_job)?
            .collect::<std::result::Result<_, _>>()?;
        Ok(jobs)
    }

    pub fn events(&self, b: &Batch<'_>, job: u64) -> Result<Vec<JobEvent>> {
        let mut stmt = b.sql().prepare_cached("SELECT at, kind, detail FROM events WHERE job = ?1 ORDER BY seq")?;
        let events = stmt
            .query_map([job as i64], |r| Ok(JobEvent { at: r.get(0)?, kind: r.get(1)?, detail: r.get(2)? }))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(events)
    }

    /// Free accelerators per pool, and whether each site is up.
    pub fn capacity(&self) -> (Vec<bool>, BTreeMap<u32, u32>) {
        let up = (0..self.topology.sites.len() as u32).map(|s| self.scheduler.site_up(SiteId(s))).collect();
        let free = (0..self.topology.pools.len() as u32).map(|p| (p, self.scheduler.free(PoolId(p)))).collect();
        (up, free)
    }
}
