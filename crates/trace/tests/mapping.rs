//! The seeded mapping of trace jobs onto the network.

use std::sync::Arc;

use proptest::prelude::*;
use suanwang_core::topology::SiteLevel;
use suanwang_trace::{Mapper, MappingConfig, TraceJob};

fn trace_job(gpus: u32, duration_s: u64) -> TraceJob {
    TraceJob { line: 2, submit_s: 0, duration_s, gpus, gpu_type: None, user: None, censored: false, requested_s: None }
}

fn mapper(seed: u64) -> Mapper {
    Mapper::new(Arc::new(suanwang_topology::load("shandong").unwrap()), MappingConfig::new(seed))
}

#[test]
fn the_same_seed_gives_the_same_jobs_and_another_seed_other_ones() {
    let (a, b, c) = (mapper(7), mapper(7), mapper(8));
    let jobs: Vec<_> = (0..200).map(|i| trace_job(1 + (i % 8) as u32, 600 + i)).collect();
    let map = |m: &Mapper| jobs.iter().enumerate().map(|(i, j)| m.map(i as u64, j)).collect::<Vec<_>>();
    assert_eq!(map(&a), map(&b));
    assert_ne!(map(&a), map(&c));
    assert_eq!(a.orgs(), b.orgs());
}

#[test]
fn trace_gpu_types_replace_the_profile() {
    let m = mapper(1);
    let t = m.topology().clone();
    let mut job = trace_job(1, 600);
    job.gpu_type = Some("V100M16|V100M32".into());
    let spec = m.map(0, &job);
    assert!(spec.accepted.contains(&t.accelerator_id("V100").unwrap()));
    job.gpu_type = Some("T4".into()); // not in the catalogue: the profile stays
    assert_eq!(m.map(0, &job).accepted, m.map(0, &trace_job(1, 600)).accepted);
}

#[test]
fn users_map_to_stable_organisations() {
    let m = mapper(3);
    let mut a = trace_job(1, 600);
    a.user = Some("alice".into());
    let ids: Vec<_> = (0..20).map(|i| m.map(i, &a).org).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
}

proptest! {
    #[test]
    fn every_gang_that_fits_a_local_pool_can_run_in_its_origin_city(seed in 0u64..1000, index in 0u64..100_000, gpus in 1u32..=64, duration in 1u64..1_000_000) {
        let m = mapper(seed);
        let t = m.topology().clone();
        let spec = m.map(index, &trace_job(gpus, duration));
        let origin = t.site(spec.origin);
        prop_assert!(matches!(origin.level, SiteLevel::Provincial | SiteLevel::City | SiteLevel::Edge));
        let local_fit = t.sites.iter()
            .filter(|s| s.city == origin.city && matches!(s.level, SiteLevel::Provincial | SiteLevel::City | SiteLevel::Edge))
            .flat_map(|s| s.pools.iter())
            .any(|&p| spec.accepts(t.pool(p).accel) && t.pool(p).count >= gpus);
        prop_assert!(local_fit, "job {index} of {gpus} gpus cannot run in {}", origin.city);
        prop_assert!(spec.estimate_s >= duration && spec.estimate_s <= 2 * duration);
        prop_assert_eq!(spec.oracle_s, Some(duration));
        prop_assert!(spec.weights.total() > 0 && spec.weights.time > 0 && spec.weights.cost > 0);
        prop_assert!(spec.datasets.len() <= 1);
        prop_assert!(spec.datasets.iter().all(|d| (1000..=2_000_000).contains(&d.size_mb)));
        prop_assert!(spec.validate(&t).is_ok());
    }
}
