//! `las`: Tiresias-style preemptive least-attained-service with discretised
//! queues (Gu et al., NSDI '19).
//!
//! A job's attained service is GPU-seconds received so far (count times
//! time). Thresholds cut it into queues; queue 0 (least attained) runs
//! first, FIFO by queue entry within a queue. A running job that crosses a
//! threshold is demoted (a timer fires at the crossing); a pending job that
//! cannot fit preempts running jobs of strictly lower-priority queues on the
//! one pool where that costs the fewest accelerators. Preempted jobs keep
//! their attained service and the work done (checkpointed), and re-stage
//! their data when they start again.
//!
//! Discretised queues keep short jobs fast without the thrashing of
//! continuous LAS: jobs in the same queue never preempt each other.
//!
//! The policy keeps, per pool, the accelerators held by each queue, updated
//! on every start, end and demotion, so "could this job preempt its way in
//! here?" is a constant-time question. Like the other policies, a pass
//! stops after [`SCAN_BLOCKED_MAX`] jobs that could not start.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Policy, QueueView, Restriction, SCAN_BLOCKED_MAX, nearest_pools, within_budget};
use crate::job::JobId;
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::PoolId;

/// Queue thresholds in GPU-seconds: under 2 GPU-hours is queue 0, under 20
/// GPU-hours queue 1, the rest queue 2.
pub const LAS_THRESHOLDS_GPU_S: [u64; 2] = [7_200, 72_000];
const QUEUES: usize = LAS_THRESHOLDS_GPU_S.len() + 1;

fn level(attained_gpu_s: u64) -> usize {
    LAS_THRESHOLDS_GPU_S.iter().filter(|&&t| attained_gpu_s >= t).count()
}

#[derive(Debug, Clone, Copy)]
struct Running {
    pool: PoolId,
    level: usize,
    gpus: u32,
}

#[derive(Default)]
pub struct Las {
    candidates: HashMap<JobId, Arc<[PoolId]>>,
    running: HashMap<JobId, Running>,
    /// Accelerators held per pool by each queue.
    held: Vec<[u32; QUEUES]>,
}

impl Las {
    fn track_start(&mut self, pass: &mut Pass<'_>, job: JobId, pool: PoolId) {
        let live = pass.live(job);
        let r = Running { pool, level: level(live.attained_gpu_s), gpus: live.spec.gpus };
        self.held[pool.0 as usize][r.level] += r.gpus;
        self.running.insert(job, r);
        self.arm(pass, job);
    }

    fn untrack(&mut self, job: JobId) {
        if let Some(r) = self.running.remove(&job) {
            self.held[r.pool.0 as usize][r.level] -= r.gpus;
        }
    }

    /// Sets the job's timer at its next threshold crossing, if any.
    fn arm(&self, pass: &mut Pass<'_>, job: JobId) {
        let live = pass.live(job);
        let Some(run) = live.run else { return };
        let level = self.running[&job].level;
        let Some(&threshold) = LAS_THRESHOLDS_GPU_S.get(level) else { return };
        let from_s = pass.now_s().max(run.compute_from_s);
        let attained = live.attained_at(from_s);
        let gpus = live.spec.gpus as u64;
        pass.set_timer(job, from_s + threshold.saturating_sub(attained).div_ceil(gpus).max(1));
    }

    /// A timer fired: the job crossed into the next queue.
    fn demote(&mut self, pass: &mut Pass<'_>, job: JobId) {
        let Some(r) = self.running.get_mut(&job) else { return };
        let now_level = level(pass.live(job).attained_at(pass.now_s())).max(r.level);
        self.held[r.pool.0 as usize][r.level] -= r.gpus;
        r.level = now_level.min(QUEUES - 1);
        self.held[r.pool.0 as usize][r.level] += r.gpus;
        self.arm(pass, job);
    }

    /// Accelerators on `pool` held by queues of lower priority than `level`.
    fn preemptible(&self, pool: PoolId, level: usize) -> u32 {
        self.held[pool.0 as usize][level + 1..].iter().sum()
    }

    /// The pool where the job can start by preempting the fewest
    /// accelerators of lower-priority jobs, and those victims.
    fn victims_for(
        &self,
        pass: &Pass<'_>,
        job: JobId,
        candidates: &[PoolId],
        job_level: usize,
    ) -> Option<(PoolId, Vec<JobId>)> {
        let gpus = pass.spec(job).gpus;
        let best_pool = candidates
            .iter()
            .copied()
            .filter(|&pool| pass.free_after_releasing(pool, self.preemptible(pool, job_level)) >= gpus)
            // Fewest accelerators to take; the nearest pool among equals.
            .min_by_key(|&pool| gpus.saturating_sub(pass.free(pool)))?;
        let mut victims: Vec<(usize, u64, JobId, u32)> = pass
            .running_on(best_pool)
            .filter_map(|(_, victim, g)| {
                let r = self.running[&victim];
                (r.level > job_level).then(|| (r.level, pass.live(victim).attained_at(pass.now_s()), victim, g))
            })
            .collect();
        // Lowest priority first: highest queue, then most attained.
        victims.sort_by_key(|&(level, attained, job, _)| std::cmp::Reverse((level, attained, job)));
        let mut released = 0;
        let mut chosen = Vec::new();
        for (_, _, victim, g) in victims {
            if pass.free_after_releasing(best_pool, released) >= gpus {
                break;
            }
            released += g;
            chosen.push(victim);
        }
        let free = pass.free_after_releasing(best_pool, released);
        debug_assert!(free >= gpus, "preemptible count out of step with running jobs");
        Some((best_pool, chosen))
    }
}

impl Policy for Las {
    fn name(&self) -> &'static str {
        "las"
    }

    fn queue_key(&self, job: &QueueView<'_>, now_s: u64) -> QueueKey {
        (level(job.attained_gpu_s) as u64, now_s)
    }

    fn forget(&mut self, job: JobId) {
        self.candidates.remove(&job);
    }

    fn requirements_changed(&mut self) {
        self.candidates.clear();
    }

    fn attempt_ended(&mut self, job: JobId) {
        self.untrack(job);
    }

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        let pools = pass.topology().pools.len();
        if self.held.len() != pools {
            self.held = vec![[0; QUEUES]; pools];
        }
        for job in pass.fired_timers().to_vec() {
            self.demote(pass, job);
        }
        // Per queue, the most accelerators a job of that queue could get on
        // one pool by preempting. Within a pass, starts and preemptions
        // never raise it (both move accelerators between "free" and "held
        // by a lower queue" or use them up), so it bounds every search.
        let reachable: Vec<u32> = (0..QUEUES)
            .map(|level| {
                (0..pools as u32).map(PoolId).map(|p| pass.free(p) + self.preemptible(p, level)).max().unwrap_or(0)
            })
            .collect();
        let mut blocked = 0;
        for job in pass.pending() {
            if blocked >= SCAN_BLOCKED_MAX {
                break;
            }
            if !pass.is_pending(job) {
                continue;
            }
            let candidates = self
                .candidates
                .entry(job)
                .or_insert_with(|| nearest_pools(pass, Restriction::Anywhere, pass.spec(job)).into())
                .clone();
            let spec = pass.spec(job);
            let gpus = spec.gpus;
            if pass.fits_somewhere_now(job) {
                let remaining = pass.live(job).remaining_estimate_s();
                let fit = candidates
                    .iter()
                    .copied()
                    .find(|&pool| pass.free(pool) >= gpus && within_budget(pass.topology(), spec, pool, remaining));
                if let Some(pool) = fit {
                    pass.start(job, pool);
                    self.track_start(pass, job, pool);
                    continue;
                }
            }
            let job_level = pass.live(job).key.0 as usize;
            if job_level + 1 >= QUEUES || gpus > reachable[job_level] {
                blocked += 1;
                continue;
            }
            if let Some((pool, victims)) = self.victims_for(pass, job, &candidates, job_level) {
                let now_s = pass.now_s();
                for victim in victims {
                    let key = (level(pass.live(victim).attained_at(now_s)) as u64, now_s);
                    self.untrack(victim);
                    pass.preempt(victim, key);
                }
                pass.start(job, pool);
                self.track_start(pass, job, pool);
            } else {
                blocked += 1;
            }
        }
    }
}
