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
//! If the best pool is free the job starts there; otherwise it waits for it
//! and registers its work on that pool's predicted queue. A job's static
//! objectives (no wait) do not change while it waits, so they are computed
//! once, sorted, and a branch-and-bound walk stops as soon as no remaining
//! pool can beat the best found, even with zero wait.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Policy, QueueView, Restriction};
use crate::estimate::{self, OBJECTIVE_UNIT, Yardstick, objective, objective_of_wait};
use crate::job::JobId;
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::PoolId;

/// Pools kept per job, best static objective first. Beyond the best 64
/// placements, waiting for one of them always beats a much worse one.
pub const NETWORK_CANDIDATES_MAX: usize = 64;

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
    yardstick: Yardstick,
    candidates: Arc<[Candidate]>,
}

#[derive(Default)]
pub struct Network {
    // Looked up by id only, never iterated, so hash order cannot leak into decisions.
    plans: HashMap<JobId, JobPlan>,
    /// Per-pass predicted queued work per pool, in accelerator-seconds.
    queued_gpu_s: Vec<u64>,
    touched: Vec<PoolId>,
}

impl Network {
    fn plan(&mut self, pass: &Pass<'_>, job: JobId) -> (Yardstick, Arc<[Candidate]>) {
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
                .filter(|(_, p)| spec.accepts(p.accel) && p.count >= spec.gpus)
                .map(|(i, _)| estimate::estimate(topology, spec, PoolId(i as u32), reference_s))
                .filter(|e| spec.budget_fen.is_none_or(|b| e.total_cost_fen() <= b))
                .map(|e| Candidate {
                    pool: e.pool,
                    base: objective(spec, &yardstick, &e),
                    occupancy_s: e.occupancy_s(),
                    run_and_stage_s: e.completion_s(),
                })
                .collect();
            candidates.sort_by_key(|c| (c.base, c.pool));
            candidates.truncate(NETWORK_CANDIDATES_MAX);
            JobPlan {
                yardstick,
                candidates: candidates.into(),
            }
        });
        (plan.yardstick, plan.candidates.clone())
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

    fn queue_key(&self, job: &QueueView<'_>, _now_s: u64) -> QueueKey {
        (job.submit_s, 0)
    }

    fn forget(&mut self, job: JobId) {
        self.plans.remove(&job);
    }

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        let pools = pass.topology().pools.len();
        if self.queued_gpu_s.len() != pools {
            self.queued_gpu_s = vec![0; pools];
        }
        for pool in self.touched.drain(..) {
            self.queued_gpu_s[pool.0 as usize] = 0;
        }
        let now_s = pass.now_s();
        for job in pass.pending() {
            if !pass.anything_free() {
                break;
            }
            let (yardstick, candidates) = self.plan(pass, job);
            let Some(first) = candidates.first() else { continue };
            let spec = pass.spec(job);
            let gpus = spec.gpus;
            let deadline_s = spec.deadline_s;
            let demand = gpus as u64 * first.occupancy_s;
            if !pass.fits_somewhere_now(job) {
                // Blocked everywhere: it will wait for its best placement.
                self.queued_gpu_s[first.pool.0 as usize] += demand;
                self.touched.push(first.pool);
                continue;
            }
            // (objective, index into candidates, free now)
            let mut best: Option<(u64, usize, bool)> = None;
            for (i, c) in candidates.iter().enumerate() {
                if best.is_some_and(|(b, _, _)| c.base >= b) {
                    break;
                }
                let free_now = pass.free(c.pool) >= gpus;
                let running_wait_s = if free_now {
                    0
                } else {
                    match pass.earliest_start(c.pool, gpus) {
                        Some((at, _)) => at - now_s,
                        None => continue, // site down or pool too small right now
                    }
                };
                let wait_s = running_wait_s + self.queue_wait_s(pass, c.pool);
                let mut value = c.base + objective_of_wait(spec, &yardstick, wait_s);
                if deadline_s.is_some_and(|d| now_s + wait_s + c.run_and_stage_s > d) {
                    value += DEADLINE_MISS_PENALTY;
                }
                if best.is_none_or(|(b, _, _)| value < b) {
                    best = Some((value, i, free_now));
                }
            }
            match best {
                Some((_, i, true)) => {
                    pass.start(job, candidates[i].pool);
                }
                Some((_, i, false)) => {
                    let c = candidates[i];
                    self.queued_gpu_s[c.pool.0 as usize] += gpus as u64 * c.occupancy_s;
                    self.touched.push(c.pool);
                }
                None => {}
            }
        }
    }
}
