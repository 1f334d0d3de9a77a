//! The seeded mapping of trace jobs onto a suanwang network.
//!
//! Public traces have no organisations, cities, accelerator types or
//! datasets, so the simulator invents them, deterministically from the seed
//! and the job's position in the trace (every draw is
//! `seeded::mix(seed, job, field)`, so the mapping of a job does not depend
//! on any other job):
//!
//! - **Organisations.** `organisations` of them (default 48): every second
//!   one an enterprise, the rest alternately universities and institutes.
//!   Organisation *i* is active in proportion to `1 / (i + 1)^0.8` (a Zipf
//!   law: a few heavy users, a long tail). Its home is one of the network's
//!   own sites (provincial, city or edge), drawn in proportion to capacity,
//!   and its home city is the origin city of all its jobs. If the trace has
//!   a user column, each user is one organisation (by a hash of the name).
//! - **Gang feasibility.** A job is given to the first organisation, from
//!   the drawn one on, whose home city has a pool big enough for its gang,
//!   so that the `local` baseline can run it. If none has, the drawn one
//!   keeps it (and `local` rejects it).
//! - **Accepted accelerator types.** Each organisation has a software
//!   profile: NVIDIA training parts (25%), any NVIDIA part (20%), NVIDIA or
//!   Ascend (25%), Ascend only (10%), anything (20%). If the home city has
//!   no pool of an accepted type big enough for the gang, the type of its
//!   largest pool is added (the job was ported to what its home has). A
//!   trace's own GPU type, when it names catalogue types (openb writes
//!   alternatives as `V100M16|V100M32`), replaces the profile.
//! - **Datasets.** Each organisation owns four datasets of 1 GB to 2 TB
//!   (log-uniform), 70% kept at its home site and 30% on a provincial site
//!   (the regional data-sharing platform). A job reads one of its
//!   organisation's datasets, or none (20%: synthetic data, RL).
//! - **Estimates.** The owner's estimate is the true duration times a
//!   factor uniform in [1, 2): users overestimate. Only `sjf` sees the truth.
//!   (The simulator may replace it: `suanwang_sim::Estimates`.)
//! - **Weights** (time, cost, carbon): enterprises (60, 30, 10), universities
//!   (30, 60, 10), institutes (40, 40, 20), each moved by up to ±10 per job.

use std::sync::Arc;

use serde::Serialize;
use suanwang_core::job::{DatasetRef, JobId, JobSpec, OrgId, OrgKind, Weights};
use suanwang_core::seeded::{below, mix, unit};
use suanwang_core::topology::{AccelId, PoolId, SiteId, SiteLevel, Topology};

use crate::formats::TraceJob;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingConfig {
    pub seed: u64,
    pub organisations: u32,
}

impl MappingConfig {
    pub fn new(seed: u64) -> MappingConfig {
        MappingConfig { seed, organisations: 48 }
    }
}

/// An invented organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub kind: OrgKind,
    pub home: SiteId,
    pub profile: &'static str,
    pub accepted: Vec<AccelId>,
    pub datasets: Vec<DatasetRef>,
    /// Relative activity (Zipf).
    pub activity: u64,
}

const PROFILES: [(&str, &[&str], u64); 5] = [
    ("nvidia-training", &["H100", "H800", "A100", "A800"], 25),
    ("nvidia-any", &["H100", "H800", "A100", "A800", "L40S", "H20", "V100"], 20),
    ("nvidia-or-ascend", &["H100", "H800", "A100", "A800", "Ascend910B"], 25),
    ("ascend", &["Ascend910B"], 10),
    ("any", &[], 20),
];

// Field numbers for `mix`, one per independent draw.
const F_ORG: u64 = 1;
const F_HOME: u64 = 2;
const F_PROFILE: u64 = 3;
const F_DATASET_SIZE: u64 = 4;
const F_DATASET_HOME: u64 = 5;
const F_JOB_DATASET: u64 = 6;
const F_ESTIMATE: u64 = 7;
const F_WEIGHTS: u64 = 8;
const F_USER: u64 = 9;

pub struct Mapper {
    topology: Arc<Topology>,
    seed: u64,
    orgs: Vec<Org>,
    activity_total: u64,
}

fn local_level(level: SiteLevel) -> bool {
    matches!(level, SiteLevel::Provincial | SiteLevel::City | SiteLevel::Edge)
}

impl Mapper {
    pub fn new(topology: Arc<Topology>, config: MappingConfig) -> Mapper {
        let seed = config.seed;
        let homes: Vec<(SiteId, u64)> = topology
            .sites
            .iter()
            .enumerate()
            .filter(|(_, s)| local_level(s.level))
            .map(|(i, s)| (SiteId(i as u32), s.pools.iter().map(|&p| topology.pool(p).count as u64).sum()))
            .collect();
        // A network of only hubs and clouds still needs homes somewhere.
        let homes =
            if homes.is_empty() { (0..topology.sites.len() as u32).map(|i| (SiteId(i), 1)).collect() } else { homes };
        let provincial: Vec<SiteId> = topology
            .sites
            .iter()
            .enumerate()
            .filter(|(_, s)| s.level == SiteLevel::Provincial)
            .map(|(i, _)| SiteId(i as u32))
            .collect();
        let count = config.organisations.max(1);
        let activity = |i: u32| (1e6 / ((i + 1) as f64).powf(0.8)) as u64;
        let assigned_homes = assign_homes(&homes, (0..count).map(activity).collect(), seed);
        let orgs = (0..count)
            .map(|i| {
                let i64_ = i as u64;
                let kind = match i % 4 {
                    0 | 2 => OrgKind::Enterprise,
                    1 => OrgKind::University,
                    _ => OrgKind::Institute,
                };
                let home = assigned_homes[i as usize];
                let profile = weighted(
                    &PROFILES.iter().enumerate().map(|(k, p)| (k, p.2)).collect::<Vec<_>>(),
                    mix(seed, i64_, F_PROFILE),
                );
                let (profile_name, types, _) = PROFILES[profile];
                let mut accepted: Vec<AccelId> = if types.is_empty() {
                    (0..topology.accelerators.len() as u16).map(AccelId).collect()
                } else {
                    types.iter().filter_map(|t| topology.accelerator_id(t)).collect()
                };
                if accepted.is_empty() {
                    accepted = (0..topology.accelerators.len() as u16).map(AccelId).collect();
                }
                accepted.sort();
                let datasets = (0..4u64)
                    .map(|d| {
                        // 1 GB .. 2 TB, log-uniform.
                        let size_mb = (1000.0 * 2000f64.powf(unit(mix(seed, i64_ * 4 + d, F_DATASET_SIZE)))) as u64;
                        let shared = unit(mix(seed, i64_ * 4 + d, F_DATASET_HOME)) < 0.3 && !provincial.is_empty();
                        let home = if shared {
                            provincial[below(mix(seed, i64_ * 4 + d, F_DATASET_HOME ^ 0xff), provincial.len() as u64)
                                as usize]
                        } else {
                            home
                        };
                        DatasetRef { size_mb, home }
                    })
                    .collect();
                Org {
                    id: OrgId(i),
                    name: format!("{}-{i:02}", kind.as_str()),
                    kind,
                    home,
                    profile: profile_name,
                    accepted,
                    datasets,
                    activity: activity(i),
                }
            })
            .collect::<Vec<_>>();
        let activity_total = orgs.iter().map(|o| o.activity).sum();
        Mapper { topology, seed, orgs, activity_total }
    }

    pub fn orgs(&self) -> &[Org] {
        &self.orgs
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// Pools of the origin city's own sites (what `local` may use).
    fn local_pools(&self, home: SiteId) -> impl Iterator<Item = PoolId> + '_ {
        let city = &self.topology.site(home).city;
        self.topology
            .sites
            .iter()
            .filter(move |s| &s.city == city && local_level(s.level))
            .flat_map(|s| s.pools.iter().copied())
    }

    fn largest_local(&self, home: SiteId, accepted: Option<&[AccelId]>) -> Option<(u32, AccelId)> {
        self.local_pools(home)
            .map(|p| self.topology.pool(p))
            .filter(|p| accepted.is_none_or(|a| a.contains(&p.accel)))
            .map(|p| (p.count, p.accel))
            .max_by_key(|&(count, accel)| (count, std::cmp::Reverse(accel)))
    }

    /// The job the `index`-th trace job becomes.
    pub fn map(&self, index: u64, job: &TraceJob) -> JobSpec {
        let seed = self.seed;
        let n = self.orgs.len();
        let drawn = match &job.user {
            Some(user) => below(mix(seed, fnv1a(user), F_USER), n as u64) as usize,
            None => {
                let mut pick = below(mix(seed, index, F_ORG), self.activity_total);
                self.orgs
                    .iter()
                    .position(|o| {
                        if pick < o.activity {
                            true
                        } else {
                            pick -= o.activity;
                            false
                        }
                    })
                    .unwrap_or(0)
            }
        };
        let org = (0..n)
            .map(|k| &self.orgs[(drawn + k) % n])
            .find(|o| self.largest_local(o.home, None).is_some_and(|(count, _)| count >= job.gpus))
            .unwrap_or(&self.orgs[drawn]);

        let mut accepted: Vec<AccelId> = job
            .gpu_type
            .as_deref()
            .map(|types| types.split('|').filter_map(|t| self.catalogue_type(t)).collect())
            .unwrap_or_default();
        accepted.sort();
        accepted.dedup();
        if accepted.is_empty() {
            accepted = org.accepted.clone();
        }
        let local_fits = self.largest_local(org.home, Some(&accepted)).is_some_and(|(c, _)| c >= job.gpus);
        if !local_fits
            && let Some((count, accel)) = self.largest_local(org.home, None)
            && count >= job.gpus
            && !accepted.contains(&accel)
        {
            accepted.push(accel);
            accepted.sort();
        }

        let dataset_draw = mix(seed, index, F_JOB_DATASET);
        let datasets = if unit(dataset_draw) < 0.2 {
            Vec::new()
        } else {
            vec![org.datasets[below(dataset_draw, org.datasets.len() as u64) as usize]]
        };
        let estimate_s = self.noisy_estimate(index, job.duration_s, 1.0, 2.0);
        let base = match org.kind {
            OrgKind::Enterprise => [60, 30, 10],
            OrgKind::University => [30, 60, 10],
            OrgKind::Institute => [40, 40, 20],
        };
        let jitter = mix(seed, index, F_WEIGHTS);
        let moved = |w: u32, shift: u32| (w + ((jitter >> shift) % 21) as u32).saturating_sub(10).max(1);
        let mut spec = JobSpec::new(JobId(index), org.id, org.kind, org.home, job.gpus, estimate_s);
        spec.accepted = accepted;
        spec.oracle_s = Some(job.duration_s.max(1));
        spec.datasets = datasets;
        spec.weights = Weights { time: moved(base[0], 0), cost: moved(base[1], 8), carbon: moved(base[2], 16) };
        spec
    }

    /// The `index`-th job's true duration times a seeded factor uniform in
    /// `[lo, hi)`: never below the truth when `lo >= 1`, never below a second.
    pub fn noisy_estimate(&self, index: u64, duration_s: u64, lo: f64, hi: f64) -> u64 {
        let factor = lo + (hi - lo) * unit(mix(self.seed, index, F_ESTIMATE));
        let estimate = (duration_s as f64 * factor).ceil() as u64;
        if lo >= 1.0 { estimate.max(duration_s).max(1) } else { estimate.max(1) }
    }

    /// A trace GPU type that names a catalogue type (ignoring case, and
    /// memory suffixes such as openb's `V100M32`).
    fn catalogue_type(&self, name: &str) -> Option<AccelId> {
        let name = name.trim().to_ascii_lowercase();
        self.topology
            .accelerators
            .iter()
            .position(|a| {
                let a = a.name.to_ascii_lowercase();
                name == a || (name.starts_with(&a) && name[a.len()..].starts_with('m'))
            })
            .map(|i| AccelId(i as u16))
    }
}

/// Gives each organisation a home so that every site's share of the total
/// activity follows its share of capacity: organisations are placed in
/// order of activity, each on the site furthest below its fair share (ties
/// broken by a seeded draw). Regional demand then matches regional supply,
/// which keeps the `local` baseline honest: it loses by fragmentation, not
/// by an arbitrary imbalance.
fn assign_homes(homes: &[(SiteId, u64)], activity: Vec<u64>, seed: u64) -> Vec<SiteId> {
    let capacity: u128 = homes.iter().map(|(_, c)| *c as u128).sum::<u128>().max(1);
    let mut assigned = vec![0u128; homes.len()];
    let mut placed: u128 = 0;
    activity
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            placed += a as u128;
            let best = (0..homes.len())
                .max_by_key(|&k| {
                    let fair = homes[k].1 as u128 * placed / capacity;
                    let deficit = fair as i128 - assigned[k] as i128;
                    (deficit, mix(seed, i as u64, F_HOME ^ (k as u64) << 8))
                })
                .expect("at least one home");
            assigned[best] += a as u128;
            homes[best].0
        })
        .collect()
}

fn weighted<T: Copy>(items: &[(T, u64)], hash: u64) -> T {
    let total: u64 = items.iter().map(|(_, w)| *w).sum::<u64>().max(1);
    let mut pick = below(hash, total);
    for &(item, w) in items {
        if pick < w {
            return item;
        }
        pick -= w;
    }
    items[items.len() - 1].0
}

/// FNV-1a, a fixed and portable hash of user names (std's hasher is seeded per process).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
