//! The discrete-event simulator: replays a workload through the real
//! scheduler core on a virtual clock.
//!
//! The simulator plays the part of the server and the site agents: it
//! submits each trace job at its submission time, starts what the core says
//! to start, and reports each attempt's end when its true duration (which
//! the core never sees, except `sjf`) has passed at the speed of the
//! accelerator it got. Events at the same instant are applied together,
//! completions before submissions, then the core schedules once.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use suanwang_core::estimate::{carbon_g, compute_cost_fen, energy_wh, run_time_s};
use suanwang_core::job::JobId;
use suanwang_core::policy;
use suanwang_core::scheduler::{CoreError, Decision, Event, Scheduler};
use suanwang_core::topology::{PoolId, SPEED_MILLI_REFERENCE, SiteLevel, Topology};
use suanwang_trace::Mapper;

use crate::estimator::{Estimates, Estimator};
use crate::metrics::{PolicyResult, Recorder};
use crate::workload::Workload;

/// How one run is made.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Check every core invariant after every step (always on in debug builds).
    pub check_invariants: bool,
    /// Keep per-level busy intervals for the utilisation-over-time plot.
    pub keep_series: bool,
    /// The run-time estimates the scheduler plans with.
    pub estimates: Estimates,
    /// Keep every job's estimate in the result (for tests; 8 bytes a job).
    pub keep_estimates: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            check_invariants: cfg!(debug_assertions),
            keep_series: false,
            estimates: Estimates::default(),
            keep_estimates: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SimEvent {
    Finish { job: JobId, attempt: u32 },
    Wake,
}

/// The simulator's view of a started attempt.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    attempt: u32,
    pool: PoolId,
    started_s: u64,
    compute_from_s: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Policy(#[from] policy::UnknownPolicy),
    #[error("scheduler refused an event: {0}")]
    Core(#[from] CoreError),
}

/// Replays `workload` under `policy_name`. `progress` is called with the
/// number of jobs submitted so far, every few thousand jobs.
pub fn run(
    topology: &Arc<Topology>,
    workload: &Workload,
    mapper: &Mapper,
    policy_name: &str,
    options: &RunOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<PolicyResult, SimError> {
    let wall = Instant::now();
    let policy = policy::by_name(policy_name)?;
    let mut scheduler = Scheduler::new(topology.clone(), policy).with_invariant_checks(options.check_invariants);
    let mut recorder = Recorder::new(topology, workload.jobs.len(), options.keep_series);
    let mut events: BinaryHeap<Reverse<(u64, SimEvent)>> = BinaryHeap::new();
    let mut wakes: BTreeSet<u64> = BTreeSet::new();
    // True reference-speed work left per live job, and its running attempt.
    let mut remaining_s: HashMap<JobId, u64> = HashMap::new();
    let mut running: HashMap<JobId, Attempt> = HashMap::new();
    // Who each live job belongs to, for the estimator's history.
    let mut class: HashMap<JobId, (suanwang_core::job::OrgId, u32, u64)> = HashMap::new();
    let mut estimator = Estimator::with_capacity(options.estimates, workload.jobs.len());
    let mut estimates_s = Vec::with_capacity(if options.keep_estimates { workload.jobs.len() } else { 0 });
    let jobs = &workload.jobs;
    let mut next = 0usize;

    loop {
        let next_arrival = jobs.get(next).map(|j| j.submit_s);
        let next_event = events.peek().map(|Reverse((t, _))| *t);
        let now = match (next_arrival, next_event) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(e)) => e,
            (Some(a), Some(e)) => a.min(e),
        };
        while let Some(&Reverse((t, event))) = events.peek() {
            if t != now {
                break;
            }
            events.pop();
            match event {
                SimEvent::Finish { job, attempt } => {
                    let Some(a) = running.get(&job).copied() else { continue };
                    if a.attempt != attempt {
                        continue;
                    }
                    running.remove(&job);
                    remaining_s.remove(&job);
                    if let Some((org, gpus, duration_s)) = class.remove(&job) {
                        estimator.observe(org, gpus, duration_s);
                    }
                    recorder.attempt_ended(job, a.pool, a.started_s, a.compute_from_s, now);
                    recorder.completed(job, now);
                    scheduler.apply(now, Event::Finished { job, attempt })?;
                }
                SimEvent::Wake => {
                    wakes.remove(&now);
                    scheduler.apply(now, Event::Tick)?;
                }
            }
        }
        while next < jobs.len() && jobs[next].submit_s == now {
            let mut spec = mapper.map(next as u64, &jobs[next]);
            let true_s = jobs[next].duration_s.max(1);
            spec.estimate_s = estimator.estimate(
                spec.org,
                spec.gpus,
                true_s,
                jobs[next].requested_s.map(|r| u64::from(r.get())),
                |lo, hi| mapper.noisy_estimate(next as u64, jobs[next].duration_s, lo, hi),
            );
            if options.keep_estimates {
                estimates_s.push(spec.estimate_s);
            }
            // Only the history estimator learns from completions.
            if matches!(options.estimates, Estimates::History | Estimates::User) {
                class.insert(spec.id, (spec.org, spec.gpus, true_s));
            }
            let id = spec.id;
            recorder.submitted(&spec, now);
            remaining_s.insert(id, jobs[next].duration_s.max(1));
            next += 1;
            for decision in scheduler.apply(now, Event::Submit(spec))? {
                if let Decision::Reject { job, .. } = decision {
                    remaining_s.remove(&job);
                    class.remove(&job);
                    recorder.rejected(job);
                }
            }
            if next.is_multiple_of(4096) {
                progress(next as u64);
            }
        }
        for decision in scheduler.schedule(now)? {
            match decision {
                Decision::Start(start) => {
                    let pool = topology.pool(start.estimate.pool);
                    let true_run_s = run_time_s(remaining_s[&start.job], pool.speed_milli);
                    let compute_from_s = now + start.estimate.transfer_s;
                    running.insert(
                        start.job,
                        Attempt { attempt: start.attempt, pool: start.estimate.pool, started_s: now, compute_from_s },
                    );
                    recorder.started(&start, now);
                    events.push(Reverse((
                        compute_from_s + true_run_s,
                        SimEvent::Finish { job: start.job, attempt: start.attempt },
                    )));
                }
                Decision::Stop { job, .. } => {
                    // Preempted: credit the work done, as the core does.
                    let a = running.remove(&job).expect("stop of a job not running");
                    let speed = topology.pool(a.pool).speed_milli as u64;
                    let done = now.saturating_sub(a.compute_from_s) * speed / SPEED_MILLI_REFERENCE as u64;
                    let left = remaining_s.get_mut(&job).expect("remaining work");
                    *left = left.saturating_sub(done).max(1);
                    recorder.attempt_ended(job, a.pool, a.started_s, a.compute_from_s, now);
                    recorder.preempted();
                }
                Decision::Requeue { job, .. } | Decision::GiveUp { job, .. } => {
                    // The simulator injects no failures or site outages yet,
                    // so the core has no reason to send these.
                    unreachable!("unexpected requeue of {job:?} in a fault-free run")
                }
                Decision::Reject { job, .. } => recorder.rejected(job),
            }
        }
        if let Some(at) = scheduler.next_wakeup()
            && at > now
            && wakes.insert(at)
        {
            events.push(Reverse((at, SimEvent::Wake)));
        }
    }
    progress(jobs.len() as u64);
    let counters = scheduler.counters();
    let mut result = recorder.finish(policy_name, counters.preemptions, wall.elapsed().as_millis() as u64);
    result.summary.estimates = Some(estimator.accuracy());
    result.estimates_s = estimates_s;
    Ok(result)
}

/// Compute cost, energy and carbon of `compute_s` seconds on a pool.
pub(crate) fn compute_bill(topology: &Topology, pool: PoolId, gpus: u32, compute_s: u64) -> (i64, u64) {
    let p = topology.pool(pool);
    let site = topology.site(p.site);
    let accel = topology.accelerator(p.accel);
    let energy = energy_wh(gpus, accel.power_w, compute_s, site.pue_milli);
    (compute_cost_fen(gpus, compute_s, p.price_fen_per_hour), carbon_g(energy, site.green_bp))
}

/// Position of a level in [`SiteLevel::ALL`].
pub(crate) fn level_index(level: SiteLevel) -> usize {
    SiteLevel::ALL.iter().position(|&l| l == level).expect("known level")
}
