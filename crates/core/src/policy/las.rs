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

use super::{Policy, QueueView, Restriction, first_fit, nearest_pools};
use crate::job::JobId;
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::PoolId;

/// Queue thresholds in GPU-seconds: under 2 GPU-hours is queue 0, under 20
/// GPU-hours queue 1, the rest queue 2.
pub const LAS_THRESHOLDS_GPU_S: [u64; 2] = [7_200, 72_000];

fn level(attained_gpu_s: u64) -> u64 {
    LAS_THRESHOLDS_GPU_S.iter().filter(|&&t| attained_gpu_s >= t).count() as u64
}

#[derive(Default)]
pub struct Las;

impl Las {
    /// Sets the job's timer at its next threshold crossing, if any.
    fn arm(pass: &mut Pass<'_>, job: JobId) {
        let live = pass.live(job);
        let Some(run) = live.run else { return };
        let from_s = pass.now_s().max(run.compute_from_s);
        let attained = live.attained_at(from_s);
        let level = level(attained) as usize;
        if let Some(&threshold) = LAS_THRESHOLDS_GPU_S.get(level) {
            let gpus = live.spec.gpus as u64;
            let at = from_s + (threshold - attained).div_ceil(gpus);
            pass.set_timer(job, at);
        }
    }

    /// The pool where the job can start by preempting the fewest
    /// accelerators of lower-priority jobs, and those victims.
    fn victims_for(pass: &Pass<'_>, job: JobId, job_level: u64) -> Option<(PoolId, Vec<JobId>)> {
        let spec = pass.spec(job);
        let now_s = pass.now_s();
        let mut best: Option<(u32, PoolId, Vec<JobId>)> = None;
        for pool in nearest_pools(pass.topology(), Restriction::Anywhere, spec) {
            if pass.capacity(pool) < spec.gpus {
                continue;
            }
            let mut candidates: Vec<(u64, u64, JobId, u32)> = pass
                .running_on(pool)
                .filter_map(|(_, victim, gpus)| {
                    let attained = pass.live(victim).attained_at(now_s);
                    let victim_level = level(attained);
                    (victim_level > job_level).then_some((victim_level, attained, victim, gpus))
                })
                .collect();
            // Lowest priority first: highest queue, then most attained.
            candidates.sort_by(|a, b| (b.0, b.1, b.2).cmp(&(a.0, a.1, a.2)));
            let mut free = pass.free(pool);
            let mut taken = 0;
            let mut victims = Vec::new();
            for (_, _, victim, gpus) in candidates {
                if free >= spec.gpus {
                    break;
                }
                free += gpus;
                taken += gpus;
                victims.push(victim);
            }
            if free >= spec.gpus && best.as_ref().is_none_or(|b| taken < b.0) {
                best = Some((taken, pool, victims));
            }
        }
        best.map(|(_, pool, victims)| (pool, victims))
    }
}

impl Policy for Las {
    fn name(&self) -> &'static str {
        "las"
    }

    fn queue_key(&self, job: &QueueView<'_>, now_s: u64) -> QueueKey {
        (level(job.attained_gpu_s), now_s)
    }

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        for job in pass.fired_timers().to_vec() {
            Las::arm(pass, job);
        }
        let lowest_priority = LAS_THRESHOLDS_GPU_S.len() as u64;
        for job in pass.pending() {
            if !pass.is_pending(job) {
                continue;
            }
            if pass.fits_somewhere_now(job)
                && let Some(pool) = first_fit(pass, Restriction::Anywhere, job)
            {
                pass.start(job, pool);
                Las::arm(pass, job);
                continue;
            }
            let job_level = pass.live(job).key.0;
            if job_level >= lowest_priority {
                continue;
            }
            if let Some((pool, victims)) = Las::victims_for(pass, job, job_level) {
                let now_s = pass.now_s();
                for victim in victims {
                    let key = (level(pass.live(victim).attained_at(now_s)), now_s);
                    pass.preempt(victim, key);
                }
                pass.start(job, pool);
                Las::arm(pass, job);
            }
        }
    }
}
