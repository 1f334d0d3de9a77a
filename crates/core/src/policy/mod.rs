//! Queueing and placement policies, selectable by name.
//!
//! A policy sees the cluster through a [`Pass`] (a read view of the queue
//! and the pools, plus `start` and `preempt`) and decides one pass at a
//! time. Everything a policy must agree on with the rest of the core (which
//! sites a job may use at all, whether a job can ever fit) lives here, so
//! `explain` and the policies cannot disagree.
//!
//! | name | queue order | placement |
//! |---|---|---|
//! | `local` | submit time | origin city's own sites only, EASY backfill per pool |
//! | `fifo` | submit time | network-wide first fit (nearest first), EASY backfill per pool |
//! | `sjf` | true remaining run time (oracle) | first fit, greedy |
//! | `fair` | organisation's held accelerators, then submit time | first fit, greedy |
//! | `las` | attained-service queue, then queue entry | first fit; preempts lower queues |
//! | `cheapest` | submit time | cheapest placement free now |
//! | `network` | submit time plus estimated accelerator-time (capped) | least owner-weighted time, cost and carbon, with predicted waits |

mod easy;
mod greedy;
mod las;
mod network;

use crate::estimate;
use crate::job::{JobId, JobSpec};
use crate::scheduler::{Pass, Rejection};
use crate::state::{LiveJob, QueueKey};
use crate::topology::{PoolId, SiteId, SiteLevel, Topology};

pub use easy::SCAN_BLOCKED_MAX;
pub use las::LAS_THRESHOLDS_GPU_S;
pub use network::{NETWORK_AGING_CAP_S, NETWORK_CANDIDATES_MAX};

/// All policy names, in the order reports list them.
pub const NAMES: [&str; 7] = ["local", "fifo", "sjf", "fair", "las", "cheapest", "network"];

/// Which sites a policy lets a job use at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    Anywhere,
    /// Only the non-hub, non-cloud sites of the job's origin city.
    OriginCity,
}

/// What a job sees of itself when a policy orders the queue.
pub struct QueueView<'a> {
    pub spec: &'a JobSpec,
    pub submit_s: u64,
    /// GPU-seconds attained in earlier attempts.
    pub attained_gpu_s: u64,
    /// Reference-speed seconds of work still to do, by the oracle.
    pub remaining_oracle_s: u64,
}

pub trait Policy: Send {
    fn name(&self) -> &'static str;

    fn restriction(&self) -> Restriction {
        Restriction::Anywhere
    }

    /// Where a job entering (or re-entering) the queue at `now_s` goes.
    fn queue_key(&self, job: &QueueView<'_>, now_s: u64) -> QueueKey;

    /// One scheduling pass.
    fn schedule(&mut self, pass: &mut Pass<'_>);

    /// The job left the queue (started, cancelled, finished): drop any cache.
    fn forget(&mut self, _job: JobId) {}

    /// A job entered the queue under `key` (submitted or requeued by the
    /// core; not called for the policy's own preemptions).
    fn enqueued(&mut self, _job: &JobSpec, _key: QueueKey) {}

    /// A site came back up with all its accelerators free.
    fn site_up(&mut self, _site: SiteId) {}

    /// What some site offers changed ([`crate::scheduler::Event::SiteFeatures`]):
    /// drop every cached set of pools a job may use.
    fn requirements_changed(&mut self) {}

    /// A running attempt ended for a reason outside the policy (finished,
    /// failed, cancelled, site down). Not called for the policy's own preemptions.
    fn attempt_ended(&mut self, _job: JobId) {}
}

pub(crate) fn view(live: &LiveJob) -> QueueView<'_> {
    QueueView {
        spec: &live.spec,
        submit_s: live.submit_s,
        attained_gpu_s: live.attained_gpu_s,
        remaining_oracle_s: live.remaining_oracle_s(),
    }
}

impl dyn Policy {
    pub(crate) fn key_for(&self, live: &LiveJob, now_s: u64) -> QueueKey {
        self.queue_key(&view(live), now_s)
    }
}

/// Builds a policy by name.
pub fn by_name(name: &str) -> Result<Box<dyn Policy>, UnknownPolicy> {
    Ok(match name {
        "local" => Box::new(easy::Easy::local()),
        "fifo" => Box::new(easy::Easy::fifo()),
        "sjf" => Box::new(greedy::Greedy::sjf()),
        "fair" => Box::new(greedy::Greedy::fair()),
        "las" => Box::new(las::Las::default()),
        "cheapest" => Box::new(greedy::Greedy::cheapest()),
        "network" => Box::new(network::Network::default()),
        _ => return Err(UnknownPolicy(name.to_string())),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy '{0}' (known: local, fifo, sjf, fair, las, cheapest, network)")]
pub struct UnknownPolicy(pub String);

/// May a job of this origin use this site under the restriction?
pub fn site_allowed(topology: &Topology, restriction: Restriction, job: &JobSpec, site: SiteId) -> bool {
    match restriction {
        Restriction::Anywhere => true,
        Restriction::OriginCity => {
            let s = topology.site(site);
            s.city == topology.site(job.origin).city && !matches!(s.level, SiteLevel::Hub | SiteLevel::Cloud)
        }
    }
}

/// Pools the job may use while its sites offer what they offer now, by
/// type, gang size, restriction, requirements and budget.
fn admissible(pass: &Pass<'_>, restriction: Restriction, job: &JobSpec, pool: PoolId) -> bool {
    let topology = pass.topology();
    let p = topology.pool(pool);
    job.accepts(p.accel)
        && p.count >= job.gpus
        && site_allowed(topology, restriction, job, p.site)
        && pass.serves(p.site, job)
        && within_budget(topology, job, pool, job.estimate_s)
}

/// Is the estimated cost of `reference_s` of work on `pool` within the job's budget?
pub(crate) fn within_budget(topology: &Topology, job: &JobSpec, pool: PoolId, reference_s: u64) -> bool {
    match job.budget_fen {
        None => true,
        Some(budget) => estimate::estimate(topology, job, pool, reference_s).total_cost_fen() <= budget,
    }
}

/// Why a job can never run under this policy, checked at submission.
pub(crate) fn never_fits(topology: &Topology, policy: &dyn Policy, job: &JobSpec) -> Option<Rejection> {
    let restriction = policy.restriction();
    let fitting: Vec<PoolId> = (0..topology.pools.len() as u32)
        .map(PoolId)
        .filter(|&p| {
            let pool = topology.pool(p);
            job.accepts(pool.accel) && site_allowed(topology, restriction, job, pool.site)
        })
        .collect();
    let largest = fitting.iter().map(|&p| topology.pool(p).count).max().unwrap_or(0);
    if largest < job.gpus {
        return Some(Rejection::CannotFitAnywhere { gpus: job.gpus, largest });
    }
    if let Some(budget) = job.budget_fen {
        let cheapest = fitting
            .iter()
            .filter(|&&p| topology.pool(p).count >= job.gpus)
            .map(|&p| estimate::estimate(topology, job, p, job.estimate_s).total_cost_fen())
            .min()
            .unwrap_or(i64::MAX);
        if cheapest > budget {
            return Some(Rejection::OverBudget { cheapest_fen: cheapest, budget_fen: budget });
        }
    }
    None
}

/// The job's admissible pools, nearest site first (the origin's own site
/// first), then in pool order within a site: the first-fit order. Valid
/// until [`Policy::requirements_changed`].
pub(crate) fn nearest_pools(pass: &Pass<'_>, restriction: Restriction, job: &JobSpec) -> Vec<PoolId> {
    let topology = pass.topology();
    topology
        .sites_by_distance(job.origin)
        .iter()
        .flat_map(|&site| topology.site(site).pools.iter().copied())
        .filter(|&pool| admissible(pass, restriction, job, pool))
        .collect()
}

/// First pool in nearest-first order that can take the job right now.
pub(crate) fn first_fit(pass: &Pass<'_>, restriction: Restriction, job: JobId) -> Option<PoolId> {
    let spec = pass.spec(job);
    let topology = pass.topology();
    let remaining = pass.live(job).remaining_estimate_s();
    topology.sites_by_distance(spec.origin).iter().flat_map(|&site| topology.site(site).pools.iter().copied()).find(
        |&pool| {
            let p = topology.pool(pool);
            pass.free(pool) >= spec.gpus
                && spec.accepts(p.accel)
                && site_allowed(topology, restriction, spec, p.site)
                && pass.serves(p.site, spec)
                && within_budget(topology, spec, pool, remaining)
        },
    )
}
