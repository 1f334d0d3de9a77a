//! "Why is my job pending?" For one job, every site of the network: either
//! the named reason it was filtered out, or its score broken down into
//! predicted wait, data transfer over the routed path, run time at that
//! accelerator's speed, compute cost and carbon.
//!
//! Filters run in a fixed order, and the first that fails names the reason:
//! site down, then the policy's restriction (e.g. `local` keeps jobs in
//! their origin city), then accelerator type, then gang size, then budget.
//! Type comes before gang size so that "this site has no H100" is reported
//! rather than "its pool is too small".

use serde::Serialize;

use crate::estimate::{self, Estimate, Yardstick, objective};
use crate::job::{JobId, JobSpec};
use crate::policy::{Policy, Restriction, site_allowed};
use crate::state::State;
use crate::topology::{SiteId, Topology};

/// Why a site cannot take the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "filter")]
pub enum Filter {
    SiteDown,
    /// The policy only lets the job use its origin city's own sites.
    NotLocal {
        origin_city: String,
    },
    /// The site does not offer something the job requires (its container image).
    MissingRequirement,
    NoAcceptedType,
    GangTooLarge {
        gpus: u32,
        largest_pool: u32,
    },
    OverBudget {
        cost_fen: i64,
        budget_fen: i64,
    },
    /// Its pools are big enough, but not as much of them is usable now
    /// (nodes drained, down or reserved at the site).
    NotUsableNow {
        gpus: u32,
        usable: u32,
        registered: u32,
    },
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Filter::SiteDown => write!(f, "site is down"),
            Filter::NotLocal { origin_city } => write!(f, "policy keeps the job in its origin city {origin_city}"),
            Filter::MissingRequirement => write!(f, "site cannot run the job's container image"),
            Filter::NoAcceptedType => write!(f, "no accelerator of an accepted type"),
            Filter::GangTooLarge { gpus, largest_pool } => {
                write!(f, "wants {gpus} accelerators together, largest accepted pool has {largest_pool}")
            }
            Filter::OverBudget { cost_fen, budget_fen } => {
                write!(f, "would cost {cost_fen} fen, budget is {budget_fen} fen")
            }
            Filter::NotUsableNow { gpus, usable, registered } => write!(
                f,
                "wants {gpus} accelerators together, only {usable} of the accepted pool's {registered} are usable now (the rest drained, down or reserved)"
            ),
        }
    }
}

/// A site that could take the job, with its best pool's numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scored {
    pub accelerator: String,
    pub estimate: Estimate,
    /// Owner-weighted objective, lower is better ([`estimate::OBJECTIVE_UNIT`] = yardstick).
    pub objective: u64,
    /// 100 for the best site, proportionally less for worse ones.
    pub score: u8,
    pub can_start_now: bool,
    pub meets_deadline: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    Filtered(Filter),
    Scored(Scored),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteVerdict {
    pub site: String,
    pub site_id: SiteId,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Every site for one job: scored sites best first, then filtered ones by site order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub job: JobId,
    pub policy: String,
    pub yardstick: Yardstick,
    pub sites: Vec<SiteVerdict>,
}

impl Explanation {
    /// The best-scored site, if any site could take the job.
    pub fn best(&self) -> Option<(&SiteVerdict, &Scored)> {
        self.sites.iter().find_map(|s| match &s.verdict {
            Verdict::Scored(scored) => Some((s, scored)),
            Verdict::Filtered(_) => None,
        })
    }
}

pub(crate) fn explain(
    topology: &Topology,
    state: &State,
    policy: &dyn Policy,
    now_s: u64,
    job: &JobSpec,
    reference_s: u64,
) -> Explanation {
    let restriction = policy.restriction();
    let yardstick = Yardstick::for_job(topology, job, reference_s);
    let mut scored = Vec::new();
    let mut filtered = Vec::new();
    for (i, site) in topology.sites.iter().enumerate() {
        let site_id = SiteId(i as u32);
        match site_verdict(topology, state, restriction, now_s, job, reference_s, &yardstick, site_id) {
            Ok(s) => scored.push((site.key.clone(), site_id, s)),
            Err(f) => filtered.push(SiteVerdict { site: site.key.clone(), site_id, verdict: Verdict::Filtered(f) }),
        }
    }
    scored.sort_by_key(|(_, id, s)| (s.objective, *id));
    let best = scored.first().map(|(_, _, s)| s.objective.max(1));
    let mut sites: Vec<SiteVerdict> = scored
        .into_iter()
        .map(|(site, site_id, mut s)| {
            s.score = (best.unwrap_or(1) as u128 * 100 / s.objective.max(1) as u128).min(100) as u8;
            SiteVerdict { site, site_id, verdict: Verdict::Scored(s) }
        })
        .collect();
    sites.extend(filtered);
    Explanation { job: job.id, policy: policy.name().to_string(), yardstick, sites }
}

#[allow(clippy::too_many_arguments)]
fn site_verdict(
    topology: &Topology,
    state: &State,
    restriction: Restriction,
    now_s: u64,
    job: &JobSpec,
    reference_s: u64,
    yardstick: &Yardstick,
    site_id: SiteId,
) -> Result<Scored, Filter> {
    let site = topology.site(site_id);
    if !state.site_up[site_id.0 as usize] {
        return Err(Filter::SiteDown);
    }
    if !site_allowed(topology, restriction, job, site_id) {
        return Err(Filter::NotLocal { origin_city: topology.site(job.origin).city.clone() });
    }
    if !state.serves(site_id, job) {
        return Err(Filter::MissingRequirement);
    }
    let typed: Vec<_> = site.pools.iter().copied().filter(|&p| job.accepts(topology.pool(p).accel)).collect();
    if typed.is_empty() {
        return Err(Filter::NoAcceptedType);
    }
    let largest_pool = typed.iter().map(|&p| topology.pool(p).count).max().unwrap_or(0);
    if largest_pool < job.gpus {
        return Err(Filter::GangTooLarge { gpus: job.gpus, largest_pool });
    }
    let mut cheapest_over_budget = i64::MAX;
    let mut unusable: Option<Filter> = None;
    let mut best: Option<Scored> = None;
    for pool in typed.into_iter().filter(|&p| topology.pool(p).count >= job.gpus) {
        let mut e = estimate::estimate(topology, job, pool, reference_s);
        if let Some(budget) = job.budget_fen
            && e.total_cost_fen() > budget
        {
            cheapest_over_budget = cheapest_over_budget.min(e.total_cost_fen());
            continue;
        }
        let can_start_now = state.pools[pool.0 as usize].free >= job.gpus;
        e.wait_s = match state.earliest_start(now_s, pool, job.gpus) {
            Some((at, _)) => at - now_s,
            None => {
                let registered = topology.pool(pool).count;
                unusable.get_or_insert(Filter::NotUsableNow {
                    gpus: job.gpus,
                    usable: state.pools[pool.0 as usize].capacity,
                    registered,
                });
                continue;
            }
        };
        let value = objective(job, yardstick, &e);
        if best.as_ref().is_none_or(|b| value < b.objective) {
            best = Some(Scored {
                accelerator: topology.accelerator(e.accel).name.clone(),
                estimate: e,
                objective: value,
                score: 0,
                can_start_now,
                meets_deadline: job.deadline_s.is_none_or(|d| now_s + e.completion_s() <= d),
            });
        }
    }
    best.ok_or_else(|| match unusable {
        Some(f) if cheapest_over_budget == i64::MAX => f,
        _ => Filter::OverBudget { cost_fen: cheapest_over_budget, budget_fen: job.budget_fen.unwrap_or(0) },
    })
}
