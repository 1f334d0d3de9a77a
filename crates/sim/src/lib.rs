//! # suanwang-sim
//!
//! Trace-driven discrete-event simulation of a suanwang network: the same
//! scheduler core as the server, on a virtual clock, fed with real
//! cluster traces mapped onto a topology. Compares policies on completion
//! time, cost, carbon, utilisation and fairness, and writes an HTML report.

pub mod engine;
pub mod estimator;
pub mod metrics;
pub mod report;
pub mod workload;

pub use engine::{RunOptions, SimError, run};
pub use estimator::{EstimateAccuracy, Estimates};
pub use metrics::{PolicyResult, PolicySummary};
pub use workload::{Scaled, Workload, WorkloadError, read_trace, scale};
