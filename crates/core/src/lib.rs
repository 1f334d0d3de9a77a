//! # suanwang-core
//!
//! The deterministic heart of suanwang: the domain model (accelerators,
//! sites, links, jobs), routing over the backbone, per-site estimates of
//! time, cost and carbon, and the scheduler state machine with its
//! pluggable policies.
//!
//! **Architecture invariant:** this crate does no I/O, reads no wall clock,
//! spawns no threads and uses no unseeded randomness. Time arrives as an
//! argument (`now_s`) with every event; the same events give the same
//! decisions, bit for bit. The server, the simulator and the tests each feed
//! it events and act on its decisions.
//!
//! ```
//! use suanwang_core::topology::{TopologySpec, AcceleratorSpec, SiteSpec, PoolSpec, SiteLevel};
//! use suanwang_core::job::{JobSpec, JobId, OrgId, OrgKind, Weights};
//! use suanwang_core::scheduler::{Scheduler, Event, Decision};
//! use suanwang_core::policy;
//!
//! let spec = TopologySpec {
//!     name: "tiny".into(),
//!     note: String::new(),
//!     accelerators: vec![AcceleratorSpec::new("A100", 1.0, 80, 400, false)],
//!     sites: vec![SiteSpec::new("jinan", "Jinan", SiteLevel::Provincial, vec![PoolSpec::new("A100", 8, 900)])],
//!     links: vec![],
//! };
//! let topology = std::sync::Arc::new(spec.build().unwrap());
//! let mut scheduler = Scheduler::new(topology.clone(), policy::by_name("network").unwrap());
//! let mut job = JobSpec::new(JobId(1), OrgId(0), OrgKind::University, topology.site_id("jinan").unwrap(), 4, 3600);
//! job.accepted = vec![topology.accelerator_id("A100").unwrap()];
//! let decisions = scheduler.handle(0, Event::Submit(job)).unwrap();
//! assert!(matches!(decisions[0], Decision::Start(_)));
//! ```

pub mod estimate;
pub mod explain;
pub mod job;
pub mod policy;
pub mod scheduler;
pub mod seeded;
pub mod topology;

mod state;

pub use estimate::Estimate;
pub use job::{JobId, JobSpec};
pub use scheduler::{Decision, Event, Scheduler};
pub use topology::Topology;
