//! `network`: suanwang's own placement over the whole network.
//!
//! Each job goes where its owner's weighted objective (time to completion,
//! money, carbon; see [`crate::estimate::objective`]) is lowest, counting
//! the predicted queue wait of every pool:
//!
//! - the wait until enough running attempts end (from their estimated ends),
//! - plus the work of earlier queued jobs that are waiting for the same pool
//!   in this pass, spread over its accelerators, so that jobs do not herd
//!   onto one attractive pool.
//!
//! The job starts on the best pool that is free now, unless a busy pool is
//! better and would finish it at least twice as soon (then it waits for it
//! and registers its work on that pool's predicted queue). The queue is
//! ordered smallest estimated accelerator-time first, with bounded aging. A job's static
//! objectives (no wait) do not change while it waits, so they are computed
//! once, sorted, and a branch-and-bound walk stops as soon as no remaining
//! pool can beat the best found, even with zero wait.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Policy, QueueView, Restriction, SCAN_BLOCKED_MAX};
use crate::estimate::{self, OBJECTIVE_UNIT, Yardstick, objective};
use crate::job::JobId;
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::PoolId;

/// Pools kept per job, best static objective first. Beyond the best 64
/// placements, waiting for one of them always beats a much worse one.
pub const NETWORK_CANDIDATES_MAX: usize = 64;

/// A busy pool is waited for only if its predicted completion is at least
/// this many times sooner than the best pool free now (measured on the ITP
/// traces: 1 waits too eagerly under backlog, 4 almost never waits).
const WAIT_SPEEDUP_MIN: u64 = 2;

/// Most a job's queue position is pushed back for its size.
pub const NETWORK_AGING_CAP_S: u64 = 7 * 86_400;

/// Added to the objective of a placement that would miss the job's deadline,
/// so any placement that meets it wins.
const DEADLINE_MISS_PENALTY: u64 = 1_000 * OBJECTIVE_UNIT;

#[derive(Debug, Clone, Copy)]
struct Candidate {
    pool: PoolId,
    /// Objective with no wait.
    base: u64,
    /// Estimated accelerator-holding time (staging plus run).
    occupancy_s: u64,
    run_and_stage_s: u64,
}

struct JobPlan {
    /// Objective added per second of wait, in 32.32 fixed point.
    wait_q32: u128,
    candidates: Arc<[Candidate]>,
}

#[derive(Default)]
pub struct Network {
    // Looked up by id only, never iterated, so hash order cannot leak into decisions.
    plans: HashMap<JobId, JobPlan>,
    /// Per-pass predicted queued work per pool, in accelerator-seconds.
    queued_gpu_s: Vec<u64>,
    touched: Vec<PoolId>,
    /// Each pool's free-accelerator curve: (estimated end of a running
    /// attempt, accelerators free once it ends), by end; rebuilt only when
    /// an attempt starts or ends on the pool, or its site comes back.
    curves: Vec<Vec<(u64, u32)>>,
    curve_valid: Vec<bool>,
    running_pool: HashMap<JobId, PoolId>,
    sites_up: Vec<crate::topology::SiteId>,
    /// Pass counter, and the pass before which each pool last gained free
    /// accelerators: a job that could not start stays blocked until one of
    /// its candidate pools gains some, so it need not be evaluated again.
    pass_number: u64,
    freed_before: Vec<u64>,
    /// Jobs that could not start: (pass, pool waited for, accelerator-seconds).
    blocked: HashMap<JobId, (u64, PoolId, u64)>,
}

impl Network {
    fn plan(&mut self, pass: &Pass<'_>, job: JobId) -> (u128, Arc<[Candidate]>) {
        let plan = self.plans.entry(job).or_insert_with(|| {
            let live = pass.live(job);
            let spec = &live.spec;
            let topology = pass.topology();
            let reference_s = live.remaining_estimate_s();
            let yardstick = Yardstick::for_job(topology, spec, reference_s);
            let mut candidates: Vec<Candidate> = topology
                .pools
                .iter()
                .enumerate()
                .filter(|(_, p)| spec.accepts(p.accel) && p.count >= spec.gpus && pass.serves(p.site, spec))
                .map(|(i, _)| estimate::estimate(topology, spec, PoolId(i as u32), reference_s))
                .filter(|e| spec.budget_fen.is_none_or(|b| e.total_cost_fen() <= b))
                .map(|e| Candidate {
                    pool: e.pool,
                    base: objective(spec, &yardstick, &e),
                    occupancy_s: e.occupancy_s(),
                    run_and_stage_s: e.completion_s(),
                })
                .collect();
            if candidates.len() > NETWORK_CANDIDATES_MAX {
                candidates.select_nth_unstable_by_key(NETWORK_CANDIDATES_MAX, |c| (c.base, c.pool));
                candidates.truncate(NETWORK_CANDIDATES_MAX);
            }
            candidates.sort_unstable_by_key(|c| (c.base, c.pool));
            let w = spec.weights;
            JobPlan {
                wait_q32: ((w.time as u128 * OBJECTIVE_UNIT as u128) << 32)
                    / (yardstick.time_s as u128 * w.total().max(1) as u128),
                candidates: candidates.into(),
            }
        });
        (plan.wait_q32, plan.candidates.clone())
    }

    /// Seconds until `gpus` accelerators are free on `pool` by the estimated
    /// ends of its running attempts; `None` if the pool is down or too small.
    fn running_wait_s(&mut self, pass: &Pass<'_>, pool: PoolId, gpus: u32) -> Option<u64> {
        let i = pool.0 as usize;
        if pass.capacity(pool) < gpus {
            return None;
        }
        if !self.curve_valid[i] {
            let mut released = 0;
            let curve = &mut self.curves[i];
            curve.clear();
            curve.extend(pass.running_on(pool).map(|(end, _, g)| {
                released += g;
                (end, pass.free_after_releasing(pool, released))
            }));
            self.curve_valid[i] = true;
        }
        let curve = &self.curves[i];
        let at = curve.partition_point(|&(_, free)| free < gpus);
        curve.get(at).map(|&(end, _)| end.saturating_sub(pass.now_s()))
    }

    fn queue_wait_s(&self, pass: &Pass<'_>, pool: PoolId) -> u64 {
        let queued = self.queued_gpu_s[pool.0 as usize];
        if queued == 0 {
            return 0;
        }
        queued.div_ceil(pass.capacity(pool).max(1) as u64)
    }
}

impl Policy for Network {
    fn name(&self) -> &'static str {
        "network"
    }

    fn restriction(&self) -> Restriction {
        Restriction::Anywhere
    }

    /// Smallest estimated accelerator-time first, aged by arrival: a job
    /// is queued as if it had arrived its estimated accelerator-seconds
    /// later, capped at [`NETWORK_AGING_CAP_S`], so short jobs overtake long
    /// ones but no job is passed over by jobs arriving more than seven days
    /// after it.
    fn queue_key(&self, job: &QueueView<'_>, _now_s: u64) -> QueueKey {
        let work_s = job.spec.estimate_s.saturating_mul(job.spec.gpus as u64);
        (job.submit_s + work_s.min(NETWORK_AGING_CAP_S), 0)
    }

    fn forget(&mut self, job: JobId) {
        self.plans.remove(&job);
        self.blocked.remove(&job);
    }

    fn attempt_ended(&mut self, job: JobId) {
        match self.running_pool.remove(&job) {
            Some(pool) if (pool.0 as usize) < self.curve_valid.len() => {
                self.curve_valid[pool.0 as usize] = false;
                self.freed_before[pool.0 as usize] = self.pass_number + 1;
            }
            // Not started by this policy (adopted after a restart): forget every cache.
            _ => {
                self.curve_valid.iter_mut().for_each(|v| *v = false);
                self.freed_before.iter_mut().for_each(|f| *f = self.pass_number + 1);
            }
        }
    }

    fn site_up(&mut self, site: crate::topology::SiteId) {
        self.sites_up.push(site);
    }

    fn requirements_changed(&mut self) {
        self.plans.clear();
        self.blocked.clear();
    }

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        let pools = pass.topology().pools.len();
        if self.queued_gpu_s.len() != pools {
            self.queued_gpu_s = vec![0; pools];
        }
        for pool in self.touched.drain(..) {
            self.queued_gpu_s[pool.0 as usize] = 0;
        }
        if self.curves.len() != pools {
            self.curves = vec![Vec::new(); pools];
            self.curve_valid = vec![false; pools];
        }
        if self.freed_before.len() != pools {
            self.freed_before = vec![0; pools];
        }
        self.pass_number += 1;
        for site in self.sites_up.drain(..) {
            for &pool in &pass.topology().site(site).pools {
                self.curve_valid[pool.0 as usize] = false;
                self.freed_before[pool.0 as usize] = self.pass_number;
            }
        }
        let mut blocked = 0;
        let now_s = pass.now_s();
        for job in pass.pending() {
            if !pass.anything_free() || blocked >= SCAN_BLOCKED_MAX {
                break;
            }
            let (wait_q32, candidates) = self.plan(pass, job);
            let Some(first) = candidates.first() else { continue };
            if let Some(&(since, pool, demand)) = self.blocked.get(&job)
                && candidates.iter().all(|c| self.freed_before[c.pool.0 as usize] <= since)
            {
                // Nothing it could use has freed up: still blocked, still waiting.
                self.queued_gpu_s[pool.0 as usize] += demand;
                self.touched.push(pool);
                blocked += 1;
                continue;
            }
            let spec = pass.spec(job);
            let gpus = spec.gpus;
            let deadline_s = spec.deadline_s;
            let demand = gpus as u64 * first.occupancy_s;
            if !pass.fits_somewhere_now(job) {
                // Blocked everywhere: it will wait for its best placement.
                self.queued_gpu_s[first.pool.0 as usize] += demand;
                self.touched.push(first.pool);
                self.blocked.insert(job, (self.pass_number, first.pool, demand));
                blocked += 1;
                continue;
            }
            let value_of = |c: &Candidate, wait_s: u64| {
                let mut value = c.base + ((wait_s as u128 * wait_q32) >> 32) as u64;
                if deadline_s.is_some_and(|d| now_s + wait_s + c.run_and_stage_s > d) {
                    value += DEADLINE_MISS_PENALTY;
                }
                value
            };
            // The best pool free now: candidates are sorted by their
            // objective without wait, so stop once none can do better.
            let mut best_free: Option<(u64, usize)> = None;
            for (i, c) in candidates.iter().enumerate() {
                if best_free.is_some_and(|(b, _)| c.base >= b) {
                    break;
                }
                if pass.free(c.pool) >= gpus {
                    let value = value_of(c, self.queue_wait_s(pass, c.pool));
                    if best_free.is_none_or(|(b, _)| value < b) {
                        best_free = Some((value, i));
                    }
                }
            }
            // A busy pool that is better still, and would finish the job at
            // least twice as soon. Waiting merely to save money, or for a
            // small gain that rests on estimates, leaves accelerators idle
            // while a queue builds, which costs everyone time.
            let free_completion_s =
                best_free.map(|(_, i)| candidates[i].run_and_stage_s + self.queue_wait_s(pass, candidates[i].pool));
            let mut best_busy: Option<(u64, usize)> = None;
            for (i, c) in candidates.iter().enumerate() {
                let bound = best_busy.or(best_free).map(|(b, _)| b);
                if bound.is_some_and(|b| c.base >= b) {
                    break;
                }
                if pass.free(c.pool) >= gpus
                    || free_completion_s.is_some_and(|f| c.run_and_stage_s * WAIT_SPEEDUP_MIN >= f)
                {
                    continue;
                }
                let Some(running_wait_s) = self.running_wait_s(pass, c.pool, gpus) else {
                    continue; // site down or pool too small right now
                };
                let wait_s = running_wait_s + self.queue_wait_s(pass, c.pool);
                if free_completion_s.is_some_and(|f| (wait_s + c.run_and_stage_s) * WAIT_SPEEDUP_MIN >= f) {
                    continue;
                }
                let value = value_of(c, wait_s);
                if bound.is_none_or(|b| value < b) {
                    best_busy = Some((value, i));
                }
            }
            let choice = match (best_busy, best_free) {
                (Some((_, i)), _) => (i, false),
                (None, Some((_, i))) => (i, true),
                (None, None) => {
                    self.blocked.insert(job, (self.pass_number, first.pool, demand));
                    blocked += 1;
                    continue;
                }
            };
            match choice {
                (i, true) => {
                    let pool = candidates[i].pool;
                    pass.start(job, pool);
                    self.running_pool.insert(job, pool);
                    self.curve_valid[pool.0 as usize] = false;
                }
                (i, false) => {
                    blocked += 1;
                    let c = candidates[i];
                    let demand = gpus as u64 * c.occupancy_s;
                    self.queued_gpu_s[c.pool.0 as usize] += demand;
                    self.touched.push(c.pool);
                    self.blocked.insert(job, (self.pass_number, c.pool, demand));
                }
            }
        }
    }
}
