//! `fifo` and `local`: first-come first-served with EASY backfilling.
//!
//! Jobs are taken in submission order and placed first-fit, nearest site
//! first. A job that cannot start gets a reservation on the pool where it
//! could start earliest (its "shadow time", from the estimated ends of the
//! running attempts). A later job may start on a reserved pool only if it is
//! estimated to end before the shadow time, or uses only accelerators the
//! reserved job will not need. EASY keeps one reservation for the queue
//! head; on a network of many independent pools that would let a head job
//! blocked in one city throttle every other city, so here each pool holds at
//! most one reservation, the first blocked job that wanted it.
//!
//! Like Slurm's backfill (`bf_max_job_test`), a pass stops after
//! [`SCAN_BLOCKED_MAX`] jobs that could not start.
//!
//! `local` is today's practice: every city runs its own queue on its own
//! sites. It keeps one queue per city and, in each pass, revisits only the
//! cities where something changed (a job arrived or an attempt ended);
//! nothing else can start anywhere else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::{Policy, QueueView, Restriction, nearest_pools, within_budget};
use crate::job::{JobId, JobSpec};
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::{PoolId, SiteId};

/// Jobs that could not start after which a pass gives up (Slurm's default
/// `bf_max_job_test` is 500 too).
pub const SCAN_BLOCKED_MAX: usize = 500;

pub struct Easy {
    name: &'static str,
    restriction: Restriction,
    /// Each queued job's admissible pools, nearest first (fixed while it waits).
    candidates: HashMap<JobId, Arc<[PoolId]>>,
    /// `local` only: the per-city queues.
    cities: Option<CityQueues>,
}

#[derive(Default)]
struct CityQueues {
    by_city: BTreeMap<String, BTreeSet<(QueueKey, JobId)>>,
    queued: HashMap<JobId, (String, QueueKey)>,
    /// Enqueued since the last pass: (job, origin site, key).
    arrivals: Vec<(JobId, SiteId, QueueKey)>,
    running_pool: HashMap<JobId, PoolId>,
    ended_pools: Vec<PoolId>,
    sites_up: Vec<SiteId>,
    /// An attempt this policy did not start ended (adopted after a restart).
    all_dirty: bool,
}

impl Easy {
    pub fn fifo() -> Easy {
        Easy { name: "fifo", restriction: Restriction::Anywhere, candidates: HashMap::new(), cities: None }
    }

    pub fn local() -> Easy {
        Easy {
            name: "local",
            restriction: Restriction::OriginCity,
            candidates: HashMap::new(),
            cities: Some(CityQueues::default()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Reservation {
    shadow_s: u64,
    /// Accelerators free at the shadow time beyond what the reserved job needs.
    extra: u32,
}

impl Policy for Easy {
    fn name(&self) -> &'static str {
        self.name
    }

    fn restriction(&self) -> Restriction {
        self.restriction
    }

    fn queue_key(&self, job: &QueueView<'_>, _now_s: u64) -> QueueKey {
        (job.submit_s, 0)
    }

    fn enqueued(&mut self, job: &JobSpec, key: QueueKey) {
        if let Some(cities) = &mut self.cities {
            cities.arrivals.push((job.id, job.origin, key));
        }
    }

    fn forget(&mut self, job: JobId) {
        self.candidates.remove(&job);
        if let Some(cities) = &mut self.cities {
            if let Some((city, key)) = cities.queued.remove(&job) {
                cities.by_city.get_mut(&city).expect("queued city").remove(&(key, job));
            } else {
                cities.arrivals.retain(|(j, _, _)| *j != job);
            }
        }
    }

    fn site_up(&mut self, site: SiteId) {
        if let Some(cities) = &mut self.cities {
            cities.sites_up.push(site);
        }
    }

    fn requirements_changed(&mut self) {
        self.candidates.clear();
        if let Some(cities) = &mut self.cities {
            cities.all_dirty = true;
        }
    }

    fn attempt_ended(&mut self, job: JobId) {
        if let Some(cities) = &mut self.cities {
            match cities.running_pool.remove(&job) {
                Some(pool) => cities.ended_pools.push(pool),
                None => cities.all_dirty = true,
            }
        }
    }

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        let Some(mut cities) = self.cities.take() else {
            let pending = pass.pending();
            self.easy_pass(pass, &pending);
            return;
        };
        let topology = pass.topology();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        for (job, origin, key) in cities.arrivals.drain(..) {
            let city = topology.site(origin).city.clone();
            cities.by_city.entry(city.clone()).or_default().insert((key, job));
            cities.queued.insert(job, (city.clone(), key));
            dirty.insert(city);
        }
        for pool in cities.ended_pools.drain(..) {
            dirty.insert(topology.site(topology.pool(pool).site).city.clone());
        }
        for site in cities.sites_up.drain(..) {
            dirty.insert(topology.site(site).city.clone());
        }
        if std::mem::take(&mut cities.all_dirty) {
            dirty.extend(cities.by_city.keys().cloned());
        }
        for city in dirty {
            let queue: Vec<JobId> =
                cities.by_city.get(&city).map_or_else(Vec::new, |q| q.iter().map(|&(_, j)| j).collect());
            for (job, pool) in self.easy_pass(pass, &queue) {
                cities.running_pool.insert(job, pool);
            }
        }
        self.cities = Some(cities);
    }
}

impl Easy {
    /// One EASY pass over `queue`; returns the jobs started and where.
    fn easy_pass(&mut self, pass: &mut Pass<'_>, queue: &[JobId]) -> Vec<(JobId, PoolId)> {
        let mut reservations: BTreeMap<PoolId, Reservation> = BTreeMap::new();
        let mut started = Vec::new();
        let mut blocked = 0;
        for &job in queue {
            if !pass.anything_free() || blocked >= SCAN_BLOCKED_MAX {
                break;
            }
            let candidates = self
                .candidates
                .entry(job)
                .or_insert_with(|| nearest_pools(pass, self.restriction, pass.spec(job)).into())
                .clone();
            if pass.fits_somewhere_now(job)
                && let Some(pool) = try_start(pass, job, &candidates, &mut reservations)
            {
                started.push((job, pool));
                continue;
            }
            blocked += 1;
            let gpus = pass.spec(job).gpus;
            let earliest = candidates
                .iter()
                .filter(|pool| !reservations.contains_key(pool))
                .filter_map(|&pool| pass.earliest_start(pool, gpus).map(|(at, free)| (at, pool, free)))
                .min_by_key(|&(at, pool, _)| (at, pool));
            if let Some((shadow_s, pool, free)) = earliest {
                reservations.insert(pool, Reservation { shadow_s, extra: free - gpus });
            }
        }
        started
    }
}

/// Starts the job on the first candidate pool (nearest first) that has room
/// and where starting does not delay that pool's reservation.
fn try_start(
    pass: &mut Pass<'_>,
    job: JobId,
    candidates: &[PoolId],
    reservations: &mut BTreeMap<PoolId, Reservation>,
) -> Option<PoolId> {
    let now_s = pass.now_s();
    let spec = pass.spec(job);
    let gpus = spec.gpus;
    let remaining = pass.live(job).remaining_estimate_s();
    for &pool in candidates {
        if pass.free(pool) < gpus || !within_budget(pass.topology(), spec, pool, remaining) {
            continue;
        }
        match reservations.get_mut(&pool) {
            None => {}
            Some(r) if now_s + pass.estimate(job, pool).occupancy_s() <= r.shadow_s => {}
            Some(r) if gpus <= r.extra => r.extra -= gpus,
            Some(_) => continue,
        }
        pass.start(job, pool);
        return Some(pool);
    }
    None
}
