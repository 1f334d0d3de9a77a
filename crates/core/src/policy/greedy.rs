//! Greedy list schedulers: walk the queue in the policy's order and start
//! every job that fits somewhere now, without reservations.
//!
//! - `sjf`: shortest true remaining run time first (an oracle: a reference
//!   point for what perfect knowledge buys, not a product policy);
//! - `fair`: the organisation holding the fewest accelerators goes first,
//!   so organisations share the network equally over time;
//! - `cheapest`: submission order, each job on the cheapest placement that
//!   is free now (compute plus transfer), like a cloud broker.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use super::{Policy, QueueView, Restriction, first_fit, nearest_pools};
use crate::job::{JobId, OrgId};
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::PoolId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sjf,
    Fair,
    Cheapest,
}

pub struct Greedy {
    kind: Kind,
}

impl Greedy {
    pub fn sjf() -> Greedy {
        Greedy { kind: Kind::Sjf }
    }

    pub fn fair() -> Greedy {
        Greedy { kind: Kind::Fair }
    }

    pub fn cheapest() -> Greedy {
        Greedy { kind: Kind::Cheapest }
    }
}

fn cheapest_free(pass: &Pass<'_>, job: JobId) -> Option<PoolId> {
    let spec = pass.spec(job);
    nearest_pools(pass, Restriction::Anywhere, spec)
        .into_iter()
        .filter(|&pool| pass.free(pool) >= spec.gpus)
        .map(|pool| (pass.estimate(job, pool), pool))
        .filter(|(e, _)| spec.budget_fen.is_none_or(|b| e.total_cost_fen() <= b))
        // min_by_key keeps the first minimum: the nearest among equals.
        .min_by_key(|(e, _)| e.total_cost_fen())
        .map(|(_, pool)| pool)
}

impl Policy for Greedy {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sjf => "sjf",
            Kind::Fair => "fair",
            Kind::Cheapest => "cheapest",
        }
    }

    fn queue_key(&self, job: &QueueView<'_>, _now_s: u64) -> QueueKey {
        match self.kind {
            Kind::Sjf => (job.remaining_oracle_s, job.submit_s),
            Kind::Fair | Kind::Cheapest => (job.submit_s, 0),
        }
    }

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        if self.kind == Kind::Fair {
            return schedule_fair(pass);
        }
        for job in pass.pending() {
            if !pass.anything_free() {
                break;
            }
            if !pass.fits_somewhere_now(job) {
                continue;
            }
            let pool = match self.kind {
                Kind::Cheapest => cheapest_free(pass, job),
                Kind::Sjf | Kind::Fair => first_fit(pass, Restriction::Anywhere, job),
            };
            if let Some(pool) = pool {
                pass.start(job, pool);
            }
        }
    }
}

/// Repeatedly serves the organisation holding the fewest accelerators (ties
/// to the lower id), starting its oldest job that fits.
fn schedule_fair(pass: &mut Pass<'_>) {
    let mut queues: BTreeMap<OrgId, VecDeque<JobId>> = BTreeMap::new();
    for job in pass.pending() {
        queues.entry(pass.spec(job).org).or_default().push_back(job);
    }
    let mut turn: BinaryHeap<Reverse<(u64, OrgId)>> =
        queues.keys().map(|&org| Reverse((pass.org_running_gpus(org), org))).collect();
    while let Some(Reverse((held, org))) = turn.pop() {
        if !pass.anything_free() {
            break;
        }
        let queue = queues.get_mut(&org).expect("queued org");
        // Free capacity only shrinks during a pass, so a job that does not
        // fit now will not fit later in this pass: drop it from the turn.
        while let Some(job) = queue.pop_front() {
            if !pass.fits_somewhere_now(job) {
                continue;
            }
            if let Some(pool) = first_fit(pass, Restriction::Anywhere, job) {
                let gpus = pass.spec(job).gpus as u64;
                pass.start(job, pool);
                if !queue.is_empty() {
                    turn.push(Reverse((held + gpus, org)));
                }
                break;
            }
        }
    }
}
