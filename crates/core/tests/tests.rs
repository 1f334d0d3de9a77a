//! Integration tests of the scheduler core, one binary:
//!
//! - `support`: small topologies and jobs for the other modules;
//! - `invariants`: property tests over random topologies and event streams;
//! - `policies`: each policy's defining behaviour on hand-made scenarios;
//! - `explain`: every filter reason and the score breakdown;
//! - `lifecycle`: attempts, fencing, failures, cancels, site outages.

mod explain;
mod invariants;
mod lifecycle;
mod policies;
mod support;
