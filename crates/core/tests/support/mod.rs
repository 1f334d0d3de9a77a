//! Builders for small networks and jobs.

use std::sync::Arc;

use suanwang_core::job::{DatasetRef, JobId, JobSpec, OrgId, OrgKind};
use suanwang_core::policy;
use suanwang_core::scheduler::{Decision, Scheduler, Start};
use suanwang_core::topology::{AcceleratorSpec, LinkSpec, PoolSpec, SiteLevel, SiteSpec, Topology, TopologySpec};

/// Three sites: `jinan` (city, 8 A100 at 900 fen/h, 8 V100 at 300),
/// `qingdao` (city, 16 H100 at 2,300), and `hub` (far hub, 32 A100 at 500).
pub fn three_sites() -> Arc<Topology> {
    let spec = TopologySpec {
        name: "three".into(),
        note: String::new(),
        accelerators: vec![
            AcceleratorSpec::new("A100", 1.0, 80, 400, false),
            AcceleratorSpec::new("V100", 0.4, 32, 300, false),
            AcceleratorSpec::new("H100", 3.17, 80, 700, false),
        ],
        sites: vec![
            SiteSpec::new(
                "jinan",
                "Jinan",
                SiteLevel::City,
                vec![PoolSpec::new("A100", 8, 900), PoolSpec::new("V100", 8, 300)],
            ),
            SiteSpec::new("qingdao", "Qingdao", SiteLevel::City, vec![PoolSpec::new("H100", 16, 2300)]),
            SiteSpec::new("hub", "Qingyang", SiteLevel::Hub, vec![PoolSpec::new("A100", 32, 500)]),
        ],
        links: vec![LinkSpec::new("jinan", "qingdao", 100.0, 4.0, 2), LinkSpec::new("jinan", "hub", 10.0, 20.0, 8)],
    };
    Arc::new(spec.build().expect("valid test topology"))
}

pub fn scheduler(topology: &Arc<Topology>, policy_name: &str) -> Scheduler {
    Scheduler::new(topology.clone(), policy::by_name(policy_name).expect("known policy")).with_invariant_checks(true)
}

/// A job from Jinan accepting the given types.
pub fn job(topology: &Topology, id: u64, gpus: u32, estimate_s: u64, types: &[&str]) -> JobSpec {
    let mut spec = JobSpec::new(
        JobId(id),
        OrgId((id % 3) as u32),
        OrgKind::Enterprise,
        topology.site_id("jinan").unwrap(),
        gpus,
        estimate_s,
    );
    spec.accepted = types.iter().map(|t| topology.accelerator_id(t).expect("known type")).collect();
    spec.oracle_s = Some(estimate_s);
    spec
}

pub fn with_dataset(mut spec: JobSpec, topology: &Topology, home: &str, size_mb: u64) -> JobSpec {
    spec.datasets.push(DatasetRef { size_mb, home: topology.site_id(home).unwrap() });
    spec
}

pub fn starts(decisions: &[Decision]) -> Vec<Start> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Start(s) => Some(*s),
            _ => None,
        })
        .collect()
}

/// The site key a start went to.
pub fn site_of(topology: &Topology, start: &Start) -> String {
    topology.site(start.estimate.site).key.clone()
}
