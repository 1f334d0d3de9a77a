//! What a simulation run measured: per-policy summaries (the JSON and
//! table columns), the sorted job completion times for the CDF, and busy
//! accelerators over time by site level.
//!
//! Definitions:
//! - JCT (job completion time) is completion minus submission; wait is the
//!   first start minus submission.
//! - Makespan runs from the first submission to the last completion.
//! - Utilisation is accelerator-seconds held (staging included) over
//!   accelerators times makespan.
//! - Compute cost bills compute time only; staging is billed as transfer.
//! - Jain's fairness index is taken over organisations' mean slowdown
//!   (JCT over the job's true run time at reference speed): 1 when every
//!   organisation is slowed down equally.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use suanwang_core::job::{JobId, JobSpec, OrgId};
use suanwang_core::scheduler::Start;
use suanwang_core::topology::{PoolId, SiteLevel, Topology};

use crate::engine::{compute_bill, level_index};

/// One policy's row of results. Field names are the JSON keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySummary {
    pub policy: String,
    pub jobs_completed: u64,
    pub jobs_rejected: u64,
    pub mean_jct_s: f64,
    pub p50_jct_s: u64,
    pub p95_jct_s: u64,
    pub p99_jct_s: u64,
    pub mean_wait_s: f64,
    pub makespan_s: u64,
    pub utilization: f64,
    pub compute_cost_fen: i64,
    pub transfer_cost_fen: i64,
    pub transfer_gb: f64,
    pub carbon_kg: f64,
    pub jain_fairness: f64,
    pub preemptions: u64,
    pub wall_ms: u64,
    /// The estimates the scheduler planned with, and how good they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimates: Option<crate::estimator::EstimateAccuracy>,
}

impl PolicySummary {
    pub fn total_cost_fen(&self) -> i64 {
        self.compute_cost_fen + self.transfer_cost_fen
    }
}

/// Busy fraction per site level over equal time buckets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UtilisationSeries {
    pub bucket_s: u64,
    /// `(level, busy fraction per bucket)` for levels that have capacity.
    pub levels: Vec<(SiteLevel, Vec<f64>)>,
}

#[derive(Debug, Clone)]
pub struct PolicyResult {
    pub summary: PolicySummary,
    /// Completion times of completed jobs, ascending.
    pub jcts_s: Vec<u64>,
    pub series: Option<UtilisationSeries>,
    /// Each job's estimate, by its index in the workload.
    pub estimates_s: Vec<u64>,
}

struct JobRecord {
    submit_s: u64,
    org: OrgId,
    gpus: u32,
    oracle_s: u64,
    first_start_s: Option<u64>,
}

/// Accumulates a run's measurements as the simulator reports them.
pub(crate) struct Recorder {
    topology: Arc<Topology>,
    live: HashMap<JobId, JobRecord>,
    jcts_s: Vec<u64>,
    wait_total_s: u128,
    org_slowdown: BTreeMap<OrgId, (f64, u64)>,
    compute_cost_fen: i64,
    transfer_cost_fen: i64,
    transfer_mb: u64,
    carbon_g: u64,
    busy_gpu_s: u128,
    first_submit_s: Option<u64>,
    last_completion_s: u64,
    rejected: u64,
    preemptions: u64,
    intervals: Option<Vec<(u8, u64, u64, u32)>>,
}

impl Recorder {
    pub fn new(topology: &Arc<Topology>, jobs: usize, keep_series: bool) -> Recorder {
        Recorder {
            topology: topology.clone(),
            live: HashMap::new(),
            jcts_s: Vec::with_capacity(jobs),
            wait_total_s: 0,
            org_slowdown: BTreeMap::new(),
            compute_cost_fen: 0,
            transfer_cost_fen: 0,
            transfer_mb: 0,
            carbon_g: 0,
            busy_gpu_s: 0,
            first_submit_s: None,
            last_completion_s: 0,
            rejected: 0,
            preemptions: 0,
            intervals: keep_series.then(Vec::new),
        }
    }

    pub fn submitted(&mut self, spec: &JobSpec, now_s: u64) {
        self.first_submit_s.get_or_insert(now_s);
        self.live.insert(
            spec.id,
            JobRecord {
                submit_s: now_s,
                org: spec.org,
                gpus: spec.gpus,
                oracle_s: spec.oracle_s.unwrap_or(spec.estimate_s).max(1),
                first_start_s: None,
            },
        );
    }

    pub fn rejected(&mut self, job: JobId) {
        if self.live.remove(&job).is_some() {
            self.rejected += 1;
        }
    }

    pub fn preempted(&mut self) {
        self.preemptions += 1;
    }

    pub fn started(&mut self, start: &Start, now_s: u64) {
        let record = self.live.get_mut(&start.job).expect("start of unknown job");
        record.first_start_s.get_or_insert(now_s);
        // Every attempt stages its data again.
        self.transfer_cost_fen += start.estimate.transfer_cost_fen;
        self.transfer_mb += start.estimate.transfer_mb;
    }

    pub fn attempt_ended(&mut self, job: JobId, pool: PoolId, started_s: u64, compute_from_s: u64, now_s: u64) {
        let gpus = self.live[&job].gpus;
        self.busy_gpu_s += gpus as u128 * now_s.saturating_sub(started_s) as u128;
        let (cost, carbon) = compute_bill(&self.topology, pool, gpus, now_s.saturating_sub(compute_from_s));
        self.compute_cost_fen += cost;
        self.carbon_g += carbon;
        if let Some(intervals) = &mut self.intervals {
            let level = self.topology.site(self.topology.pool(pool).site).level;
            intervals.push((level_index(level) as u8, started_s, now_s, gpus));
        }
    }

    pub fn completed(&mut self, job: JobId, now_s: u64) {
        let record = self.live.remove(&job).expect("completion of unknown job");
        let jct = now_s - record.submit_s;
        self.jcts_s.push(jct);
        self.wait_total_s += (record.first_start_s.expect("completed without start") - record.submit_s) as u128;
        let entry = self.org_slowdown.entry(record.org).or_insert((0.0, 0));
        entry.0 += jct as f64 / record.oracle_s as f64;
        entry.1 += 1;
        self.last_completion_s = self.last_completion_s.max(now_s);
    }

    pub fn finish(mut self, policy: &str, preemptions: u64, wall_ms: u64) -> PolicyResult {
        debug_assert_eq!(preemptions, self.preemptions);
        self.jcts_s.sort_unstable();
        let n = self.jcts_s.len();
        let percentile = |p: usize| -> u64 {
            if n == 0 {
                return 0;
            }
            // Nearest rank.
            let rank = (p * n).div_ceil(100).max(1);
            self.jcts_s[rank - 1]
        };
        let mean = |total: u128| if n == 0 { 0.0 } else { total as f64 / n as f64 };
        let first = self.first_submit_s.unwrap_or(0);
        let makespan_s = self.last_completion_s.saturating_sub(first);
        let capacity = self.topology.total_accelerators() as f64;
        let utilization = if makespan_s == 0 { 0.0 } else { self.busy_gpu_s as f64 / (capacity * makespan_s as f64) };
        let slowdowns: Vec<f64> = self.org_slowdown.values().map(|(sum, count)| sum / *count as f64).collect();
        let jain_fairness = jain(&slowdowns);
        let series = self.intervals.take().map(|intervals| series(&self.topology, &intervals, first, makespan_s));
        PolicyResult {
            summary: PolicySummary {
                policy: policy.to_string(),
                jobs_completed: n as u64,
                jobs_rejected: self.rejected,
                mean_jct_s: mean(self.jcts_s.iter().map(|&j| j as u128).sum()),
                p50_jct_s: percentile(50),
                p95_jct_s: percentile(95),
                p99_jct_s: percentile(99),
                mean_wait_s: mean(self.wait_total_s),
                makespan_s,
                utilization,
                compute_cost_fen: self.compute_cost_fen,
                transfer_cost_fen: self.transfer_cost_fen,
                transfer_gb: self.transfer_mb as f64 / 1000.0,
                carbon_kg: self.carbon_g as f64 / 1000.0,
                jain_fairness,
                preemptions,
                wall_ms,
                estimates: None,
            },
            jcts_s: self.jcts_s,
            series,
            estimates_s: Vec::new(),
        }
    }
}

/// Jain's fairness index of `values`: (sum x)^2 / (n * sum x^2).
pub fn jain(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().sum();
    let squares: f64 = values.iter().map(|x| x * x).sum();
    if values.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (values.len() as f64 * squares)
}

const SERIES_BUCKETS: u64 = 200;

fn series(topology: &Topology, intervals: &[(u8, u64, u64, u32)], first_s: u64, makespan_s: u64) -> UtilisationSeries {
    let bucket_s = makespan_s.div_ceil(SERIES_BUCKETS).max(1);
    let buckets = makespan_s.div_ceil(bucket_s).max(1) as usize;
    let mut busy = vec![vec![0u128; buckets]; SiteLevel::ALL.len()];
    for &(level, start, end, gpus) in intervals {
        let (start, end) = (start - first_s, end - first_s);
        let mut t = start;
        while t < end {
            let b = (t / bucket_s) as usize;
            let bucket_end = (b as u64 + 1) * bucket_s;
            let until = end.min(bucket_end);
            if b < buckets {
                busy[level as usize][b] += gpus as u128 * (until - t) as u128;
            }
            t = until;
        }
    }
    let mut capacity = [0u64; 5];
    for pool in &topology.pools {
        capacity[level_index(topology.site(pool.site).level)] += pool.count as u64;
    }
    let levels = SiteLevel::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| capacity[*i] > 0)
        .map(|(i, &level)| {
            let denominator = (capacity[i] * bucket_s) as f64;
            (level, busy[i].iter().map(|&b| b as f64 / denominator).collect())
        })
        .collect();
    UtilisationSeries { bucket_s, levels }
}

#[cfg(test)]
mod tests {
    use super::jain;

    #[test]
    fn jain_index_is_one_for_equal_shares_and_one_over_n_for_a_monopoly() {
        assert_eq!(jain(&[2.0, 2.0, 2.0]), 1.0);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    }
}
