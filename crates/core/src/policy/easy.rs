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

use std::collections::BTreeMap;

use super::{Policy, QueueView, Restriction, first_fit, nearest_pools};
use crate::scheduler::Pass;
use crate::state::QueueKey;
use crate::topology::PoolId;

pub struct Easy {
    name: &'static str,
    restriction: Restriction,
}

impl Easy {
    pub fn fifo() -> Easy {
        Easy {
            name: "fifo",
            restriction: Restriction::Anywhere,
        }
    }

    pub fn local() -> Easy {
        Easy {
            name: "local",
            restriction: Restriction::OriginCity,
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

    fn schedule(&mut self, pass: &mut Pass<'_>) {
        let mut reservations: BTreeMap<PoolId, Reservation> = BTreeMap::new();
        let topology = pass.topology();
        for job in pass.pending() {
            if !pass.anything_free() {
                // Nothing can start; reservations only matter for starts.
                break;
            }
            let gpus = pass.spec(job).gpus;
            if pass.fits_somewhere_now(job) {
                let started = match first_fit(pass, self.restriction, job) {
                    Some(pool) if !reservations.contains_key(&pool) => {
                        pass.start(job, pool);
                        true
                    }
                    // The first fit is reserved (or there is none): look for a
                    // pool the job can backfill without delaying a reservation.
                    _ => self.backfill(pass, job, &mut reservations),
                };
                if started {
                    continue;
                }
            }
            if reservations.len() >= topology.pools.len() {
                continue;
            }
            let spec = pass.spec(job);
            let earliest = nearest_pools(topology, self.restriction, spec)
                .into_iter()
                .filter(|pool| !reservations.contains_key(pool))
                .filter_map(|pool| pass.earliest_start(pool, gpus).map(|(at, free)| (at, pool, free)))
                .min_by_key(|&(at, pool, _)| (at, pool));
            if let Some((shadow_s, pool, free)) = earliest {
                reservations.insert(
                    pool,
                    Reservation {
                        shadow_s,
                        extra: free - gpus,
                    },
                );
            }
        }
    }
}

impl Easy {
    fn backfill(&self, pass: &mut Pass<'_>, job: crate::job::JobId, reservations: &mut BTreeMap<PoolId, Reservation>) -> bool {
        let now_s = pass.now_s();
        let spec = pass.spec(job);
        let gpus = spec.gpus;
        let remaining = pass.live(job).remaining_estimate_s();
        let free_now: Vec<PoolId> = nearest_pools(pass.topology(), self.restriction, spec)
            .into_iter()
            .filter(|&pool| pass.free(pool) >= gpus && super::within_budget(pass.topology(), spec, pool, remaining))
            .collect();
        for pool in free_now {
            match reservations.get_mut(&pool) {
                None => {}
                Some(r) if now_s + pass.estimate(job, pool).occupancy_s() <= r.shadow_s => {}
                Some(r) if gpus <= r.extra => r.extra -= gpus,
                Some(_) => continue,
            }
            pass.start(job, pool);
            return true;
        }
        false
    }
}
