//! The scheduler's mutable state: live jobs (pending or running), the free
//! accelerators of every pool, the pending queue in policy order, and timers.
//!
//! Jobs that have left the scheduler (finished, failed for good, cancelled,
//! rejected) are forgotten: their history belongs to the driver (the
//! simulator's metrics, the server's database), which keeps the core's
//! memory bounded by the live set.

use std::collections::{BTreeMap, BTreeSet};

use crate::job::{JobId, JobSpec, OrgId};
use crate::topology::{PoolId, Topology};

/// Position in the pending queue: lower runs first; ties go to the lower job id.
pub type QueueKey = (u64, u64);

/// A started attempt of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunInfo {
    pub attempt: u32,
    pub pool: PoolId,
    pub started_s: u64,
    /// When the job starts computing: after its data is staged.
    pub compute_from_s: u64,
    /// Estimated end of the attempt (what the scheduler plans with).
    pub est_end_s: u64,
    pub speed_milli: u32,
}

/// A job the scheduler still owns.
#[derive(Debug, Clone)]
pub(crate) struct LiveJob {
    pub spec: JobSpec,
    pub submit_s: u64,
    /// When the job last entered the pending queue.
    pub enqueued_s: u64,
    pub attempts: u32,
    /// Attempts that failed by the job's own fault (counted against `spec.retries`).
    /// (u16, with `lost`: the two fit where padding was, so the hot
    /// `LiveJob` does not grow.)
    pub failures: u16,
    /// Attempts lost to infrastructure faults (lost lease, site down).
    pub lost: u16,
    /// GPU-seconds of compute received in earlier (preempted) attempts.
    pub attained_gpu_s: u64,
    /// Reference-speed seconds of work done in earlier (preempted) attempts.
    pub done_ref_s: u64,
    pub key: QueueKey,
    pub run: Option<RunInfo>,
    /// Due time of this job's entry in [`State::timers`], if any.
    pub timer_s: Option<u64>,
}

impl LiveJob {
    /// Estimated reference-speed work still to do (never below one second).
    pub fn remaining_estimate_s(&self) -> u64 {
        self.spec.estimate_s.saturating_sub(self.done_ref_s).max(1)
    }

    /// True remaining work, for the oracle policy; the estimate when unknown.
    pub fn remaining_oracle_s(&self) -> u64 {
        self.spec.oracle_s.unwrap_or(self.spec.estimate_s).saturating_sub(self.done_ref_s).max(1)
    }

    /// GPU-seconds attained so far, counting the running attempt up to `now_s`.
    pub fn attained_at(&self, now_s: u64) -> u64 {
        let running = match self.run {
            Some(run) => now_s.saturating_sub(run.compute_from_s) * self.spec.gpus as u64,
            None => 0,
        };
        self.attained_gpu_s + running
    }
}

/// One pool's allocation state.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolState {
    /// Accelerators the site says it can use now (drained or down nodes
    /// excluded), at most the registered count; kept while the site is down.
    pub usable: u32,
    /// Accelerators usable now: `usable`, or 0 while the site is down.
    pub capacity: u32,
    /// Accelerators held by running attempts. May exceed `capacity` after
    /// the pool shrank under them: they carry on, and nothing is free
    /// until enough of them end.
    pub held: u32,
    /// `capacity - held`, never below zero.
    pub free: u32,
    /// Running attempts on this pool by estimated end.
    pub running: BTreeSet<(u64, JobId)>,
}

#[derive(Debug, Clone)]
pub(crate) struct State {
    pub jobs: BTreeMap<JobId, LiveJob>,
    pub pending: BTreeSet<(QueueKey, JobId)>,
    pub pools: Vec<PoolState>,
    pub site_up: Vec<bool>,
    /// What each site offers beyond accelerators (sorted, each once).
    pub site_features: Vec<Vec<crate::job::Feature>>,
    /// Most free accelerators in any single pool, per accelerator type.
    pub max_free: Vec<u32>,
    /// Policy timers (e.g. LAS demotions) by due time.
    pub timers: BTreeSet<(u64, JobId)>,
    /// Accelerators currently held by each organisation.
    pub org_running_gpus: BTreeMap<OrgId, u64>,
    /// Jobs whose timers fired since the last pass.
    pub fired: Vec<JobId>,
    /// No running attempt's estimated end is earlier (a lower bound, kept
    /// by starts and refreshed by the overrun repair).
    pub overrun_check_s: u64,
}

impl PoolState {
    /// Sets what the pool can use now and recomputes what is free.
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity;
        self.free = capacity.saturating_sub(self.held);
    }

    /// Holds `gpus` for a starting attempt (the caller checked they are free).
    pub fn hold(&mut self, gpus: u32) {
        self.held += gpus;
        self.free = self.capacity.saturating_sub(self.held);
    }
}

impl State {
    pub fn new(topology: &Topology) -> State {
        let pools = topology
            .pools
            .iter()
            .map(|p| PoolState { usable: p.count, capacity: p.count, held: 0, free: p.count, running: BTreeSet::new() })
            .collect();
        let mut state = State {
            jobs: BTreeMap::new(),
            pending: BTreeSet::new(),
            pools,
            site_up: vec![true; topology.sites.len()],
            site_features: vec![Vec::new(); topology.sites.len()],
            max_free: vec![0; topology.accelerators.len()],
            timers: BTreeSet::new(),
            org_running_gpus: BTreeMap::new(),
            fired: Vec::new(),
            overrun_check_s: u64::MAX,
        };
        for accel in 0..topology.accelerators.len() {
            state.refresh_max_free(topology, crate::topology::AccelId(accel as u16));
        }
        state
    }

    /// Does the site offer everything the job requires?
    pub fn serves(&self, site: crate::topology::SiteId, job: &crate::job::JobSpec) -> bool {
        job.requires.is_empty() || {
            let offered = &self.site_features[site.0 as usize];
            job.requires.iter().all(|f| offered.binary_search(f).is_ok())
        }
    }

    pub fn refresh_max_free(&mut self, topology: &Topology, accel: crate::topology::AccelId) {
        self.max_free[accel.0 as usize] = topology
            .pools
            .iter()
            .zip(&self.pools)
            .filter(|(p, _)| p.accel == accel)
            .map(|(_, s)| s.free)
            .max()
            .unwrap_or(0);
    }

    /// Estimated earliest time `gpus` accelerators are free on `pool`,
    /// counting only running attempts, and how many are free then.
    pub fn earliest_start(&self, now_s: u64, pool: PoolId, gpus: u32) -> Option<(u64, u32)> {
        let state = &self.pools[pool.0 as usize];
        if state.capacity < gpus {
            return None;
        }
        if state.free >= gpus {
            return Some((now_s, state.free));
        }
        let mut held = state.held;
        for &(end, id) in &state.running {
            held -= self.jobs[&id].spec.gpus;
            let free = state.capacity.saturating_sub(held);
            if free >= gpus {
                return Some((end.max(now_s), free));
            }
        }
        None
    }

    pub fn enqueue(&mut self, id: JobId, key: QueueKey, now_s: u64) {
        let job = self.jobs.get_mut(&id).expect("enqueue of unknown job");
        job.key = key;
        job.enqueued_s = now_s;
        job.run = None;
        self.pending.insert((key, id));
    }

    /// Takes a running attempt off its pool and returns it.
    pub fn release(&mut self, topology: &Topology, id: JobId) -> RunInfo {
        let job = self.jobs.get_mut(&id).expect("release of unknown job");
        let run = job.run.take().expect("release of a job that is not running");
        let gpus = job.spec.gpus;
        let org = job.spec.org;
        let pool = &mut self.pools[run.pool.0 as usize];
        let removed = pool.running.remove(&(run.est_end_s, id));
        assert!(removed, "running job {id:?} missing from its pool");
        pool.held -= gpus;
        pool.free = pool.capacity.saturating_sub(pool.held);
        let held = self.org_running_gpus.get_mut(&org).expect("org without running gpus");
        *held -= gpus as u64;
        if *held == 0 {
            self.org_running_gpus.remove(&org);
        }
        if let Some(at) = job.timer_s.take() {
            self.timers.remove(&(at, id));
        }
        self.refresh_max_free(topology, topology.pool(run.pool).accel);
        run
    }
}
