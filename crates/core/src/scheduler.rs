//! The scheduler state machine: events in, decisions out.
//!
//! [`Scheduler::apply`] takes one event (a job submitted, an attempt
//! finished or failed, a site down or up, a cancel, a timer tick) and
//! updates the state; [`Scheduler::schedule`] runs one pass of the policy
//! and returns what to start and what to stop. [`Scheduler::handle`] does
//! both. Drivers that receive several events at the same instant apply them
//! all, then schedule once.
//!
//! Attempts fence stale reports: every start gets a new attempt number, and
//! a finish or failure that names an older attempt is ignored, so exactly
//! one attempt of a job ever counts.

use std::sync::Arc;

use serde::Serialize;

use crate::estimate::{self, Estimate};
use crate::explain::{self, Explanation};
use crate::job::{Feature, InvalidJob, JobId, JobSpec};
use crate::policy::{self, Policy};
use crate::state::{LiveJob, QueueKey, RunInfo, State};
use crate::topology::{AccelId, PoolId, SiteId, Topology};

/// Something that happened, reported by the driver at time `now_s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Submit(JobSpec),
    /// The attempt ran to completion.
    Finished {
        job: JobId,
        attempt: u32,
    },
    /// The attempt failed by the job's own fault (a non-zero exit, its time
    /// limit, its memory limit). The job runs again only while it has
    /// retries left (`JobSpec::retries`).
    Failed {
        job: JobId,
        attempt: u32,
    },
    /// The attempt was lost to an infrastructure fault (its agent fell
    /// silent, the sandbox could not be made, the provider killed it). The
    /// job is queued again; after `max_lost` such losses it is given up.
    Lost {
        job: JobId,
        attempt: u32,
    },
    /// The owner withdraws the job, pending or running.
    Cancel {
        job: JobId,
    },
    SiteDown(SiteId),
    SiteUp(SiteId),
    /// What a site offers from now on (e.g. the container images it holds),
    /// replacing what it offered before. New attempts of jobs that require
    /// a feature start only where it is offered; running ones carry on.
    SiteFeatures {
        site: SiteId,
        features: Vec<Feature>,
    },
    /// How many of a pool's accelerators its site can use now (nodes
    /// drained, down or reserved excluded), capped at the registered count.
    /// Attempts already running on a pool that shrank carry on; nothing is
    /// free there until enough of them end.
    PoolCapacity {
        pool: PoolId,
        usable: u32,
    },
    /// An attempt its site never began (assigned, not yet taken by the
    /// agent, or refused by the site before it ran) goes back to the queue
    /// without counting as a loss.
    Withdraw {
        job: JobId,
        attempt: u32,
    },
    /// Time passes; due timers fire.
    Tick,
}

/// Start an attempt: hold `estimate.gpus` accelerators of `estimate.pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Start {
    pub job: JobId,
    pub attempt: u32,
    pub estimate: Estimate,
    /// Reference-speed work this attempt is expected to do.
    pub reference_s: u64,
}

/// Why a running attempt must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A higher-priority job needs the accelerators; the job goes back to the queue.
    Preempted,
    /// The owner cancelled the job.
    Cancelled,
}

/// Why an attempt ended and the job went back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequeueReason {
    /// The site went down under the attempt.
    SiteDown,
    /// The job failed and has retries left.
    Failed,
    /// The attempt was lost to an infrastructure fault.
    Lost,
    /// Its site withdrew it before it began.
    Withdrawn,
}

impl RequeueReason {
    /// In words, for events and the command line.
    pub fn describe(self) -> &'static str {
        match self {
            RequeueReason::SiteDown => "its site went down",
            RequeueReason::Failed => "it failed and has retries left",
            RequeueReason::Lost => "it was lost to an infrastructure fault",
            RequeueReason::Withdrawn => "its site could not begin it",
        }
    }
}

/// Why a job can never run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    #[error(
        "cannot fit anywhere: wants {gpus} accelerators of an accepted type, the largest allowed pool has {largest}"
    )]
    CannotFitAnywhere { gpus: u32, largest: u32 },
    #[error("over budget everywhere: cheapest allowed placement costs {cheapest_fen} fen, budget is {budget_fen} fen")]
    OverBudget { cheapest_fen: i64, budget_fen: i64 },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Decision {
    Start(Start),
    Stop {
        job: JobId,
        attempt: u32,
        reason: StopReason,
    },
    /// The attempt is over (its site went down or it failed); the job is queued again.
    Requeue {
        job: JobId,
        attempt: u32,
        reason: RequeueReason,
    },
    Reject {
        job: JobId,
        #[serde(flatten)]
        reason: Rejection,
    },
    /// The job failed (by its own fault with no retries left, or lost to
    /// faults too often) after `attempts` attempts and will not run again.
    GiveUp {
        job: JobId,
        attempts: u32,
        reason: GiveUpReason,
    },
}

/// Why the scheduler gave a job up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GiveUpReason {
    /// It failed by its own fault and has no retries left.
    Failed,
    /// It was lost to infrastructure faults `max_lost` times.
    LostTooOften,
}

/// Operating errors of the core: the driver sent something impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("time went backwards: event at {now_s} s after {last_s} s")]
    TimeWentBackwards { now_s: u64, last_s: u64 },
    #[error("job {0} already exists")]
    DuplicateJob(u64),
    #[error(transparent)]
    InvalidJob(#[from] InvalidJob),
    #[error("unknown site id {0}")]
    UnknownSite(u32),
    #[error("unknown pool id {0}")]
    UnknownPool(u32),
}

/// A broken internal invariant: always a bug in the core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated: {0}")]
pub struct InvariantViolation(pub String);

/// Counters a driver may report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub passes: u64,
    pub starts: u64,
    pub preemptions: u64,
    pub stale_reports: u64,
}

/// Attempts a job may lose to infrastructure faults before the scheduler
/// gives up on it (a bound, so a job that crashes every agent that runs it
/// cannot circulate forever).
pub const DEFAULT_MAX_LOST: u32 = 5;

/// An attempt running past its estimated end is expected to run on at least this long.
pub const OVERRUN_MIN_EXTENSION_S: u64 = 60;

pub struct Scheduler {
    topology: Arc<Topology>,
    policy: Box<dyn Policy>,
    state: State,
    now_s: u64,
    max_lost: u32,
    check_invariants: bool,
    counters: Counters,
}

impl Scheduler {
    pub fn new(topology: Arc<Topology>, policy: Box<dyn Policy>) -> Scheduler {
        let state = State::new(&topology);
        Scheduler {
            topology,
            policy,
            state,
            now_s: 0,
            max_lost: DEFAULT_MAX_LOST,
            // Debug builds (and so every test) check all invariants after every step.
            check_invariants: cfg!(debug_assertions),
            counters: Counters::default(),
        }
    }

    /// Sets how many attempts a job may lose to infrastructure faults.
    pub fn with_max_lost(mut self, attempts: u32) -> Scheduler {
        self.max_lost = attempts.max(1);
        self
    }

    /// Turns the after-every-step invariant check on or off.
    pub fn with_invariant_checks(mut self, on: bool) -> Scheduler {
        self.check_invariants = on;
        self
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn now_s(&self) -> u64 {
        self.now_s
    }

    pub fn pending_count(&self) -> usize {
        self.state.pending.len()
    }

    pub fn running_count(&self) -> usize {
        self.state.jobs.len() - self.state.pending.len()
    }

    /// Free accelerators in a pool right now.
    pub fn free(&self, pool: PoolId) -> u32 {
        self.state.pools[pool.0 as usize].free
    }

    pub fn site_up(&self, site: SiteId) -> bool {
        self.state.site_up[site.0 as usize]
    }

    /// Does the site offer everything the job requires (as last told by
    /// [`Event::SiteFeatures`])?
    pub fn serves(&self, site: SiteId, job: &JobSpec) -> bool {
        self.state.serves(site, job)
    }

    /// Pending job ids in queue order.
    pub fn pending(&self) -> Vec<JobId> {
        self.state.pending.iter().map(|&(_, id)| id).collect()
    }

    /// The running attempt of a job: (attempt, pool), if it is running.
    pub fn running_attempt(&self, job: JobId) -> Option<(u32, PoolId)> {
        self.state.jobs.get(&job)?.run.map(|r| (r.attempt, r.pool))
    }

    /// When the driver should send a [`Event::Tick`] next, if ever.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.state.timers.first().map(|&(at, _)| at)
    }

    /// Applies an event and runs a scheduling pass.
    pub fn handle(&mut self, now_s: u64, event: Event) -> Result<Vec<Decision>, CoreError> {
        let mut decisions = self.apply(now_s, event)?;
        decisions.extend(self.schedule(now_s)?);
        Ok(decisions)
    }

    fn advance(&mut self, now_s: u64) -> Result<(), CoreError> {
        if now_s < self.now_s {
            return Err(CoreError::TimeWentBackwards { now_s, last_s: self.now_s });
        }
        self.now_s = now_s;
        Ok(())
    }

    /// Applies one event without scheduling. Returns the decisions the event
    /// itself forces (rejections, requeues, stops).
    pub fn apply(&mut self, now_s: u64, event: Event) -> Result<Vec<Decision>, CoreError> {
        self.advance(now_s)?;
        let mut out = Vec::new();
        let own_fault = matches!(event, Event::Failed { .. });
        match event {
            Event::Submit(spec) => self.submit(spec, &mut out)?,
            Event::Finished { job, attempt } => {
                if self.is_current_attempt(job, attempt) {
                    self.release(job);
                    self.forget(job);
                } else {
                    self.counters.stale_reports += 1;
                }
            }
            Event::Failed { job, attempt } | Event::Lost { job, attempt } => {
                if self.is_current_attempt(job, attempt) {
                    self.end_attempt(job);
                    let live = self.state.jobs.get_mut(&job).expect("live job");
                    let (retry, reason, give_up) = if own_fault {
                        live.failures = live.failures.saturating_add(1);
                        (u32::from(live.failures) <= live.spec.retries, RequeueReason::Failed, GiveUpReason::Failed)
                    } else {
                        live.lost = live.lost.saturating_add(1);
                        (u32::from(live.lost) < self.max_lost, RequeueReason::Lost, GiveUpReason::LostTooOften)
                    };
                    let attempts = live.attempts;
                    if retry {
                        self.requeue(job);
                        out.push(Decision::Requeue { job, attempt, reason });
                    } else {
                        self.forget(job);
                        out.push(Decision::GiveUp { job, attempts, reason: give_up });
                    }
                } else {
                    self.counters.stale_reports += 1;
                }
            }
            Event::Cancel { job } => {
                if let Some(live) = self.state.jobs.get(&job) {
                    if let Some(run) = live.run {
                        self.release(job);
                        out.push(Decision::Stop { job, attempt: run.attempt, reason: StopReason::Cancelled });
                    } else {
                        let key = live.key;
                        self.state.pending.remove(&(key, job));
                    }
                    self.forget(job);
                }
            }
            Event::Withdraw { job, attempt } => {
                if self.is_current_attempt(job, attempt) {
                    // Never began: no work done, no loss counted, and the
                    // attempt number stays used (reports of it are stale).
                    self.release(job);
                    self.requeue(job);
                    out.push(Decision::Requeue { job, attempt, reason: RequeueReason::Withdrawn });
                } else {
                    self.counters.stale_reports += 1;
                }
            }
            Event::PoolCapacity { pool, usable } => {
                let spec = self.topology.pools.get(pool.0 as usize).ok_or(CoreError::UnknownPool(pool.0))?;
                let usable = usable.min(spec.count);
                let (site, accel) = (spec.site, spec.accel);
                let state = &mut self.state.pools[pool.0 as usize];
                if state.usable != usable {
                    let grew = usable > state.usable;
                    state.usable = usable;
                    if self.state.site_up[site.0 as usize] {
                        state.set_capacity(usable);
                        self.state.refresh_max_free(&self.topology, accel);
                        if grew {
                            // Room appeared: the policy looks at the site again.
                            self.policy.site_up(site);
                        }
                    }
                }
            }
            Event::SiteDown(site) => self.site_down(site, &mut out)?,
            Event::SiteUp(site) => self.site_up_event(site)?,
            Event::SiteFeatures { site, mut features } => {
                let index = site.0 as usize;
                if index >= self.topology.sites.len() {
                    return Err(CoreError::UnknownSite(site.0));
                }
                features.sort_unstable();
                features.dedup();
                if self.state.site_features[index] != features {
                    self.state.site_features[index] = features;
                    self.policy.requirements_changed();
                }
            }
            Event::Tick => {
                while let Some(&(at, job)) = self.state.timers.first() {
                    if at > now_s {
                        break;
                    }
                    self.state.timers.pop_first();
                    if let Some(live) = self.state.jobs.get_mut(&job) {
                        live.timer_s = None;
                        self.state.fired.push(job);
                    }
                }
            }
        }
        self.after_step();
        Ok(out)
    }

    /// Runs one pass of the policy at `now_s`. First repairs the plan: an
    /// attempt still running past its estimated end (its estimate was too
    /// short) is not killed; it is expected to run on for as long again as
    /// it has computed (at least a minute), as a scheduler that learns from
    /// an overrun would.
    pub fn schedule(&mut self, now_s: u64) -> Result<Vec<Decision>, CoreError> {
        self.advance(now_s)?;
        self.repair_overruns(now_s);
        let mut out = Vec::new();
        if !self.state.pending.is_empty() || !self.state.fired.is_empty() {
            self.counters.passes += 1;
            let mut pass = Pass {
                now_s,
                topology: &self.topology,
                state: &mut self.state,
                out: &mut out,
                left_pending: Vec::new(),
            };
            self.policy.schedule(&mut pass);
            let left = std::mem::take(&mut pass.left_pending);
            self.state.fired.clear();
            for job in left {
                self.policy.forget(job);
            }
            for d in &out {
                match d {
                    Decision::Start(_) => self.counters.starts += 1,
                    Decision::Stop { .. } => self.counters.preemptions += 1,
                    _ => {}
                }
            }
        }
        self.after_step();
        Ok(out)
    }

    fn repair_overruns(&mut self, now_s: u64) {
        // A lower bound of every running attempt's estimated end: nothing
        // can have overrun before it (most passes stop here).
        if now_s <= self.state.overrun_check_s {
            return;
        }
        for p in 0..self.state.pools.len() {
            while let Some(&(end, job)) = self.state.pools[p].running.first() {
                if end >= now_s {
                    break;
                }
                let live = self.state.jobs.get_mut(&job).expect("running job");
                let run = live.run.as_mut().expect("running job has a run");
                let computed = now_s.saturating_sub(run.compute_from_s);
                run.est_end_s = now_s + computed.max(OVERRUN_MIN_EXTENSION_S);
                let new_end = run.est_end_s;
                let pool = &mut self.state.pools[p];
                pool.running.remove(&(end, job));
                pool.running.insert((new_end, job));
                // Its plans (a pool's free-over-time curve) are stale.
                self.policy.site_up(self.topology.pools[p].site);
            }
        }
        self.state.overrun_check_s = self
            .state
            .pools
            .iter()
            .filter_map(|pool| pool.running.first().map(|&(end, _)| end))
            .min()
            .unwrap_or(u64::MAX);
    }

    /// Takes back a job that was running when the driver last stopped (a
    /// server restart): it is running `attempt` on `pool` since `started_s`,
    /// with `done_ref_s` of reference work done in earlier attempts.
    pub fn adopt(
        &mut self,
        now_s: u64,
        spec: JobSpec,
        attempt: u32,
        pool: PoolId,
        started_s: u64,
    ) -> Result<(), CoreError> {
        self.advance(now_s)?;
        spec.validate(&self.topology)?;
        if self.state.jobs.contains_key(&spec.id) {
            return Err(CoreError::DuplicateJob(spec.id.0));
        }
        let pool_spec = self.topology.pools.get(pool.0 as usize).ok_or(CoreError::UnknownSite(u32::MAX))?;
        let state = &self.state.pools[pool.0 as usize];
        if !spec.accepts(pool_spec.accel) || state.free < spec.gpus || attempt == 0 {
            return Err(CoreError::InvalidJob(InvalidJob {
                job: spec.id.0,
                field: "pool",
                problem: format!("cannot adopt attempt {attempt} on pool {}: wrong type or no room", pool.0),
            }));
        }
        let estimate = estimate::estimate(&self.topology, &spec, pool, spec.estimate_s);
        let run = RunInfo {
            attempt,
            pool,
            started_s,
            compute_from_s: started_s + estimate.transfer_s,
            est_end_s: started_s + estimate.occupancy_s(),
            speed_milli: pool_spec.speed_milli,
        };
        let (id, gpus, org) = (spec.id, spec.gpus, spec.org);
        let mut live = LiveJob {
            spec,
            submit_s: started_s,
            enqueued_s: started_s,
            attempts: attempt,
            failures: 0,
            lost: 0,
            attained_gpu_s: 0,
            done_ref_s: 0,
            key: (0, 0),
            run: Some(run),
            timer_s: None,
        };
        live.key = self.policy.key_for(&live, now_s);
        self.state.jobs.insert(id, live);
        let state = &mut self.state.pools[pool.0 as usize];
        state.hold(gpus);
        state.running.insert((run.est_end_s, id));
        self.state.overrun_check_s = self.state.overrun_check_s.min(run.est_end_s);
        *self.state.org_running_gpus.entry(org).or_insert(0) += gpus as u64;
        self.state.refresh_max_free(&self.topology, pool_spec.accel);
        self.after_step();
        Ok(())
    }

    /// Every site, filtered with a reason or scored, for a job that may or
    /// may not have been submitted. Reserves nothing.
    pub fn explain(&self, now_s: u64, job: &JobSpec) -> Explanation {
        explain::explain(&self.topology, &self.state, self.policy.as_ref(), now_s, job, job.estimate_s)
    }

    /// Why a live job is where it is (the per-site reasons for a pending job).
    pub fn explain_job(&self, job: JobId) -> Option<Explanation> {
        let live = self.state.jobs.get(&job)?;
        Some(explain::explain(
            &self.topology,
            &self.state,
            self.policy.as_ref(),
            self.now_s,
            &live.spec,
            live.remaining_estimate_s(),
        ))
    }

    fn is_current_attempt(&self, job: JobId, attempt: u32) -> bool {
        matches!(self.state.jobs.get(&job), Some(LiveJob { run: Some(run), .. }) if run.attempt == attempt)
    }

    fn submit(&mut self, spec: JobSpec, out: &mut Vec<Decision>) -> Result<(), CoreError> {
        spec.validate(&self.topology)?;
        if self.state.jobs.contains_key(&spec.id) {
            return Err(CoreError::DuplicateJob(spec.id.0));
        }
        if let Some(reason) = policy::never_fits(&self.topology, self.policy.as_ref(), &spec) {
            out.push(Decision::Reject { job: spec.id, reason });
            return Ok(());
        }
        let id = spec.id;
        let live = LiveJob {
            spec,
            submit_s: self.now_s,
            enqueued_s: self.now_s,
            attempts: 0,
            failures: 0,
            lost: 0,
            attained_gpu_s: 0,
            done_ref_s: 0,
            key: (0, 0),
            run: None,
            timer_s: None,
        };
        let key = self.policy.key_for(&live, self.now_s);
        self.state.jobs.insert(id, live);
        self.state.enqueue(id, key, self.now_s);
        self.policy.enqueued(&self.state.jobs[&id].spec, key);
        Ok(())
    }

    /// Frees the accelerators of the job's running attempt and tells the policy.
    fn release(&mut self, job: JobId) -> RunInfo {
        let run = self.state.release(&self.topology, job);
        self.policy.attempt_ended(job);
        run
    }

    /// Ends the running attempt of `job`, crediting the work it did.
    fn end_attempt(&mut self, job: JobId) -> RunInfo {
        let run = self.release(job);
        let now_s = self.now_s;
        let live = self.state.jobs.get_mut(&job).expect("live job");
        credit_work(live, &run, now_s);
        run
    }

    fn requeue(&mut self, job: JobId) {
        let live = &self.state.jobs[&job];
        let key = self.policy.key_for(live, self.now_s);
        self.state.enqueue(job, key, self.now_s);
        self.policy.enqueued(&self.state.jobs[&job].spec, key);
    }

    fn forget(&mut self, job: JobId) {
        self.state.jobs.remove(&job);
        self.policy.forget(job);
    }

    fn site_down(&mut self, site: SiteId, out: &mut Vec<Decision>) -> Result<(), CoreError> {
        let index = site.0 as usize;
        if index >= self.topology.sites.len() {
            return Err(CoreError::UnknownSite(site.0));
        }
        if !self.state.site_up[index] {
            return Ok(());
        }
        let topology = self.topology.clone();
        for &pool in &topology.site(site).pools {
            let running: Vec<JobId> = self.state.pools[pool.0 as usize].running.iter().map(|&(_, id)| id).collect();
            for job in running {
                let run = self.end_attempt(job);
                self.requeue(job);
                out.push(Decision::Requeue { job, attempt: run.attempt, reason: RequeueReason::SiteDown });
            }
            self.state.pools[pool.0 as usize].set_capacity(0);
            self.state.refresh_max_free(&topology, topology.pool(pool).accel);
        }
        self.state.site_up[index] = false;
        Ok(())
    }

    fn site_up_event(&mut self, site: SiteId) -> Result<(), CoreError> {
        let index = site.0 as usize;
        if index >= self.topology.sites.len() {
            return Err(CoreError::UnknownSite(site.0));
        }
        if self.state.site_up[index] {
            return Ok(());
        }
        self.state.site_up[index] = true;
        self.policy.site_up(site);
        let topology = self.topology.clone();
        for &pool in &topology.site(site).pools {
            let state = &mut self.state.pools[pool.0 as usize];
            let usable = state.usable;
            state.set_capacity(usable);
            self.state.refresh_max_free(&topology, topology.pool(pool).accel);
        }
        Ok(())
    }

    fn after_step(&self) {
        if self.check_invariants
            && let Err(violation) = self.check_invariants()
        {
            panic!("{violation} (policy {}, t = {} s)", self.policy.name(), self.now_s);
        }
    }

    /// Checks every structural invariant of the state. Debug builds call it
    /// after every step; tests and the simulator's `--check` call it too.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |what: String| Err(InvariantViolation(what));
        let topology = &self.topology;
        let mut held = vec![0u64; topology.pools.len()];
        let mut running_per_pool = vec![0usize; topology.pools.len()];
        let mut org_held = std::collections::BTreeMap::new();
        let mut pending_seen = 0usize;
        for (&id, job) in &self.state.jobs {
            if job.spec.id != id {
                return fail(format!("job {id:?} stored under the wrong id"));
            }
            match job.run {
                None => {
                    if !self.state.pending.contains(&(job.key, id)) {
                        return fail(format!("pending job {id:?} missing from the queue"));
                    }
                    if job.timer_s.is_some() {
                        return fail(format!("pending job {id:?} has a timer"));
                    }
                    pending_seen += 1;
                }
                Some(run) => {
                    let pool = &self.state.pools[run.pool.0 as usize];
                    if !pool.running.contains(&(run.est_end_s, id)) {
                        return fail(format!("running job {id:?} missing from pool {:?}", run.pool));
                    }
                    if !job.spec.accepts(topology.pool(run.pool).accel) {
                        return fail(format!("job {id:?} runs on a type it does not accept"));
                    }
                    if !self.state.site_up[topology.pool(run.pool).site.0 as usize] {
                        return fail(format!("job {id:?} runs on a site that is down"));
                    }
                    if run.est_end_s < self.state.overrun_check_s {
                        return fail(format!("job {id:?} ends before the overrun bound"));
                    }
                    held[run.pool.0 as usize] += job.spec.gpus as u64;
                    running_per_pool[run.pool.0 as usize] += 1;
                    *org_held.entry(job.spec.org).or_insert(0u64) += job.spec.gpus as u64;
                }
            }
            if let Some(at) = job.timer_s
                && !self.state.timers.contains(&(at, id))
            {
                return fail(format!("job {id:?} timer missing from the timer set"));
            }
        }
        if pending_seen != self.state.pending.len() {
            return fail(format!(
                "queue holds {} entries but {} jobs are pending",
                self.state.pending.len(),
                pending_seen
            ));
        }
        for &(_, id) in &self.state.timers {
            if self.state.jobs.get(&id).is_none_or(|j| j.timer_s.is_none()) {
                return fail(format!("timer for job {id:?} that has none"));
            }
        }
        for (i, pool) in self.state.pools.iter().enumerate() {
            let spec = &topology.pools[i];
            let up = self.state.site_up[spec.site.0 as usize];
            if pool.usable > spec.count {
                return fail(format!("pool {i} usable {} over its registered {}", pool.usable, spec.count));
            }
            let expected_capacity = if up { pool.usable } else { 0 };
            if pool.capacity != expected_capacity {
                return fail(format!("pool {i} capacity {} expected {expected_capacity}", pool.capacity));
            }
            // No accelerator allocated twice; nothing free beyond capacity
            // (held may exceed a capacity that shrank under running work).
            if pool.held as u64 != held[i] {
                return fail(format!("pool {i}: {} held recorded, {} held by running jobs", pool.held, held[i]));
            }
            if pool.free as u64 != (pool.capacity as u64).saturating_sub(held[i]) {
                return fail(format!(
                    "pool {i}: {} free with {} held of capacity {}",
                    pool.free, held[i], pool.capacity
                ));
            }
            if running_per_pool[i] != pool.running.len() {
                return fail(format!(
                    "pool {i} lists {} running, {} run there",
                    pool.running.len(),
                    running_per_pool[i]
                ));
            }
        }
        for (accel, &max) in self.state.max_free.iter().enumerate() {
            let actual = topology
                .pools
                .iter()
                .zip(&self.state.pools)
                .filter(|(p, _)| p.accel == AccelId(accel as u16))
                .map(|(_, s)| s.free)
                .max()
                .unwrap_or(0);
            if actual != max {
                return fail(format!("max free of type {accel} is {max}, actually {actual}"));
            }
        }
        if org_held != self.state.org_running_gpus {
            return fail("per-organisation held accelerators out of date".into());
        }
        Ok(())
    }
}

fn credit_work(live: &mut LiveJob, run: &RunInfo, now_s: u64) {
    let computed_s = now_s.saturating_sub(run.compute_from_s);
    live.attained_gpu_s += computed_s * live.spec.gpus as u64;
    live.done_ref_s += computed_s * run.speed_milli as u64 / crate::topology::SPEED_MILLI_REFERENCE as u64;
}

/// One scheduling pass: the policy's window onto the state. Policies read
/// the queue and the pools through it and act only through
/// [`Pass::start`] and [`Pass::preempt`], which keep the state consistent.
pub struct Pass<'a> {
    now_s: u64,
    topology: &'a Topology,
    state: &'a mut State,
    out: &'a mut Vec<Decision>,
    left_pending: Vec<JobId>,
}

impl<'a> Pass<'a> {
    pub fn now_s(&self) -> u64 {
        self.now_s
    }

    pub fn topology(&self) -> &'a Topology {
        self.topology
    }

    /// Pending jobs in queue order (a snapshot).
    pub fn pending(&self) -> Vec<JobId> {
        self.state.pending.iter().map(|&(_, id)| id).collect()
    }

    pub fn pending_len(&self) -> usize {
        self.state.pending.len()
    }

    pub fn spec(&self, job: JobId) -> &JobSpec {
        &self.state.jobs[&job].spec
    }

    pub(crate) fn live(&self, job: JobId) -> &LiveJob {
        &self.state.jobs[&job]
    }

    pub fn is_pending(&self, job: JobId) -> bool {
        self.state.jobs.get(&job).is_some_and(|j| j.run.is_none())
    }

    pub fn free(&self, pool: PoolId) -> u32 {
        self.state.pools[pool.0 as usize].free
    }

    pub fn capacity(&self, pool: PoolId) -> u32 {
        self.state.pools[pool.0 as usize].capacity
    }

    /// What would be free on `pool` once running attempts holding
    /// `released` accelerators end (less than `free + released` when the
    /// pool shrank under its running work).
    pub fn free_after_releasing(&self, pool: PoolId, released: u32) -> u32 {
        let state = &self.state.pools[pool.0 as usize];
        state.capacity.saturating_sub(state.held.saturating_sub(released))
    }

    pub fn site_up(&self, site: SiteId) -> bool {
        self.state.site_up[site.0 as usize]
    }

    /// Does the site offer everything the job requires?
    pub fn serves(&self, site: SiteId, job: &JobSpec) -> bool {
        self.state.serves(site, job)
    }

    /// Accelerators held by an organisation's running jobs.
    pub fn org_running_gpus(&self, org: crate::job::OrgId) -> u64 {
        self.state.org_running_gpus.get(&org).copied().unwrap_or(0)
    }

    /// Could the job start somewhere right now, ignoring policy restrictions?
    /// O(accepted types): the cheap test that lets a pass skip blocked jobs.
    pub fn fits_somewhere_now(&self, job: JobId) -> bool {
        let spec = self.spec(job);
        spec.accepted.iter().any(|a| self.state.max_free[a.0 as usize] >= spec.gpus)
    }

    /// Is there any free accelerator left anywhere?
    pub fn anything_free(&self) -> bool {
        self.state.max_free.iter().any(|&f| f > 0)
    }

    /// Running attempts on a pool, earliest estimated end first: (est end, job, gpus).
    pub fn running_on(&self, pool: PoolId) -> impl Iterator<Item = (u64, JobId, u32)> + '_ {
        self.state.pools[pool.0 as usize].running.iter().map(|&(end, id)| (end, id, self.state.jobs[&id].spec.gpus))
    }

    /// Estimated earliest time `gpus` accelerators are free on `pool`,
    /// counting only running attempts, and how many are free then; `None`
    /// if the pool is too small or down.
    pub fn earliest_start(&self, pool: PoolId, gpus: u32) -> Option<(u64, u32)> {
        self.state.earliest_start(self.now_s, pool, gpus)
    }

    /// Jobs whose timers fired since the last pass.
    pub fn fired_timers(&self) -> &[JobId] {
        &self.state.fired
    }

    /// The estimate of the job's remaining work on `pool`, without wait.
    pub fn estimate(&self, job: JobId, pool: PoolId) -> Estimate {
        let live = self.live(job);
        estimate::estimate(self.topology, &live.spec, pool, live.remaining_estimate_s())
    }

    /// Starts the job on `pool`. The caller has checked that the pool has
    /// enough free accelerators of an accepted type; starting otherwise is a
    /// programmer error and panics.
    pub fn start(&mut self, job: JobId, pool: PoolId) -> Estimate {
        let topology = self.topology;
        let pool_spec = topology.pool(pool);
        assert!(
            self.state.serves(pool_spec.site, &self.state.jobs[&job].spec),
            "start of {job:?} at a site lacking what it requires"
        );
        let live = self.state.jobs.get_mut(&job).expect("start of unknown job");
        assert!(live.run.is_none(), "start of a running job {job:?}");
        assert!(live.spec.accepts(pool_spec.accel), "start of {job:?} on a type it does not accept");
        let reference_s = live.remaining_estimate_s();
        let estimate = estimate::estimate(topology, &live.spec, pool, reference_s);
        let gpus = live.spec.gpus;
        let org = live.spec.org;
        live.attempts += 1;
        let run = RunInfo {
            attempt: live.attempts,
            pool,
            started_s: self.now_s,
            compute_from_s: self.now_s + estimate.transfer_s,
            est_end_s: self.now_s + estimate.occupancy_s(),
            speed_milli: pool_spec.speed_milli,
        };
        live.run = Some(run);
        let key = live.key;
        let removed = self.state.pending.remove(&(key, job));
        assert!(removed, "started job {job:?} was not pending");
        let state = &mut self.state.pools[pool.0 as usize];
        assert!(state.free >= gpus, "pool {pool:?} over-allocated by {job:?}");
        state.hold(gpus);
        state.running.insert((run.est_end_s, job));
        self.state.overrun_check_s = self.state.overrun_check_s.min(run.est_end_s);
        *self.state.org_running_gpus.entry(org).or_insert(0) += gpus as u64;
        self.state.refresh_max_free(topology, pool_spec.accel);
        self.left_pending.push(job);
        self.out.push(Decision::Start(Start { job, attempt: run.attempt, estimate, reference_s }));
        estimate
    }

    /// Stops a running job and puts it back in the queue under `key`,
    /// crediting the work it did.
    pub fn preempt(&mut self, job: JobId, key: QueueKey) {
        let run = self.state.release(self.topology, job);
        let now_s = self.now_s;
        let live = self.state.jobs.get_mut(&job).expect("preempt of unknown job");
        credit_work(live, &run, now_s);
        self.state.enqueue(job, key, now_s);
        self.out.push(Decision::Stop { job, attempt: run.attempt, reason: StopReason::Preempted });
    }

    /// Asks for a tick at `at_s` on behalf of a running job (e.g. when it
    /// crosses a priority threshold). Cleared when the attempt ends.
    pub fn set_timer(&mut self, job: JobId, at_s: u64) {
        let live = self.state.jobs.get_mut(&job).expect("timer for unknown job");
        if let Some(old) = live.timer_s.replace(at_s) {
            self.state.timers.remove(&(old, job));
        }
        self.state.timers.insert((at_s, job));
    }
}
