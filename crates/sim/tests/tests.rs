//! Simulator tests, one binary: golden results on a real trace excerpt,
//! determinism, conservation of jobs under every policy and seed, load
//! scaling, and the HTML report.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use suanwang_core::policy::NAMES;
use suanwang_sim::report::{ReportHeader, html};
use suanwang_sim::{Estimates, PolicyResult, RunOptions, Scaled, read_trace, run, scale};
use suanwang_trace::{Format, Mapper, MappingConfig};

fn excerpt() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/itp-cluster06-400.csv").to_string_lossy().to_string()
}

fn scaled(load: Option<f64>) -> Scaled {
    let workload = read_trace(&excerpt(), Some(&Format::Itp)).unwrap();
    let spec = suanwang_topology::load_spec("shandong").unwrap();
    scale(&spec, &workload, load, Path::new("shandong")).unwrap()
}

fn run_all(scaled: &Scaled, seed: u64, keep_series: bool) -> Vec<PolicyResult> {
    let mapper = Mapper::new(scaled.topology.clone(), MappingConfig::new(seed));
    let options = RunOptions { check_invariants: true, keep_series, ..RunOptions::default() };
    NAMES
        .iter()
        .map(|name| run(&scaled.topology, &scaled.workload, &mapper, name, &options, &mut |_| {}).unwrap())
        .collect()
}

fn table(results: &[PolicyResult]) -> String {
    let mut out = String::from(
        "policy     done rej  meanJCT    p50    p95    p99  meanwait  makespan  util   compute  transfer  transferGB  carbonkg  jain  preempt\n",
    );
    for r in results {
        let s = &r.summary;
        out.push_str(&format!(
            "{:<9} {:>5} {:>3} {:>8.0} {:>6} {:>6} {:>6} {:>9.0} {:>9} {:.3} {:>9} {:>9} {:>11.1} {:>9.1} {:.3} {:>8}\n",
            s.policy,
            s.jobs_completed,
            s.jobs_rejected,
            s.mean_jct_s,
            s.p50_jct_s,
            s.p95_jct_s,
            s.p99_jct_s,
            s.mean_wait_s,
            s.makespan_s,
            s.utilization,
            s.compute_cost_fen,
            s.transfer_cost_fen,
            s.transfer_gb,
            s.carbon_kg,
            s.jain_fairness,
            s.preemptions
        ));
    }
    out
}

#[test]
fn golden_results_on_a_real_itp_excerpt() {
    let s = scaled(Some(0.8));
    insta::assert_snapshot!(table(&run_all(&s, 1, false)));
}

#[test]
fn the_same_seed_gives_identical_results_and_another_seed_different_ones() {
    let s = scaled(Some(0.8));
    let strip = |rs: Vec<PolicyResult>| {
        rs.into_iter()
            .map(|r| (r.jcts_s, r.summary.total_cost_fen(), r.summary.carbon_kg.to_bits()))
            .collect::<Vec<_>>()
    };
    let a = strip(run_all(&s, 5, false));
    assert_eq!(a, strip(run_all(&s, 5, false)));
    assert_ne!(a, strip(run_all(&s, 6, false)));
}

#[test]
fn load_scaling_hits_the_requested_load() {
    let native = scaled(None);
    assert_eq!((native.capacity_scale, native.time_compression), (1.0, 1.0));
    for load in [0.5, 0.8, 1.2] {
        let s = scaled(Some(load));
        let achieved = s.workload.offered_load(&s.topology);
        assert!((achieved - load).abs() / load < 0.02, "asked {load}, got {achieved}");
        // The largest gang (64) still fits in some origin city's own pool.
        assert!(s.topology.pools.iter().any(|p| p.count >= 64));
    }
}

#[test]
fn replication_shifts_copies_after_each_other() {
    let w = read_trace(&excerpt(), Some(&Format::Itp)).unwrap();
    let r = w.replicated(3);
    assert_eq!(r.jobs.len(), 3 * w.jobs.len());
    assert_eq!(r.jobs[w.jobs.len()].submit_s, w.span_s() + 1);
    assert!(r.jobs.windows(2).all(|p| p[0].submit_s <= p[1].submit_s));
    assert_eq!(r.work_gpu_s(), 3 * w.work_gpu_s());
}

#[test]
fn the_report_has_the_table_and_three_kinds_of_plot() {
    let s = scaled(Some(0.8));
    let results = run_all(&s, 1, true);
    let header = ReportHeader {
        trace: "excerpt".into(),
        topology: "shandong".into(),
        jobs: s.workload.jobs.len(),
        seed: 1,
        load: Some(0.8),
        capacity_scale: s.capacity_scale,
        time_compression: s.time_compression,
        accelerators: s.topology.total_accelerators(),
    };
    let page = html(&header, &results).unwrap();
    assert!(page.contains("JCT CDF") && page.contains("against mean JCT") && page.contains("busy share by site level"));
    // One CDF, one scatter, one utilisation plot per policy.
    assert_eq!(page.matches("<svg").count(), 2 + NAMES.len());
    for name in NAMES {
        assert!(page.contains(&format!("<tr><td>{name}</td>")), "{name} missing from the table");
    }
    let series = results[0].series.as_ref().unwrap();
    assert!(series.levels.iter().all(|(_, v)| v.iter().all(|&b| (0.0..=1.0 + 1e-9).contains(&b))));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn every_job_completes_exactly_once_or_is_rejected(seed in 0u64..10_000, load in 0.3f64..1.5) {
        let s = scaled(Some(load));
        for r in run_all(&s, seed, false) {
            let sum = &r.summary;
            prop_assert_eq!(sum.jobs_completed + sum.jobs_rejected, s.workload.jobs.len() as u64, "{}", sum.policy);
            prop_assert_eq!(r.jcts_s.len() as u64, sum.jobs_completed);
            prop_assert!(sum.utilization > 0.0 && sum.utilization <= 1.0, "{} utilisation {}", sum.policy, sum.utilization);
            prop_assert!(sum.compute_cost_fen > 0 && sum.transfer_cost_fen >= 0);
            prop_assert!(sum.p50_jct_s <= sum.p95_jct_s && sum.p95_jct_s <= sum.p99_jct_s);
            prop_assert!(sum.jain_fairness > 0.0 && sum.jain_fairness <= 1.0 + 1e-9);
            // Every job runs at least its true duration at the fastest speed.
            prop_assert!(r.jcts_s.iter().all(|&j| j >= 600 * 1000 / 3170));
        }
    }
}

fn run_with(scaled: &Scaled, jobs: &suanwang_sim::Workload, policy: &str, estimates: Estimates) -> PolicyResult {
    let mapper = Mapper::new(scaled.topology.clone(), MappingConfig::new(1));
    let options = RunOptions { check_invariants: true, keep_series: false, estimates, keep_estimates: true };
    run(&scaled.topology, jobs, &mapper, policy, &options, &mut |_| {}).unwrap()
}

#[test]
fn estimates_too_short_are_outlived_not_killed_and_every_job_completes_once() {
    // Every estimate a tenth to a half of the truth: every running job
    // overruns its plan, which the core repairs pass after pass.
    let s = scaled(Some(0.8));
    for name in NAMES {
        let r = run_with(&s, &s.workload, name, Estimates::Noisy { lo: 0.1, hi: 0.5 });
        let sum = &r.summary;
        assert_eq!(sum.jobs_completed + sum.jobs_rejected, s.workload.jobs.len() as u64, "{name}");
        let accuracy = sum.estimates.as_ref().unwrap();
        assert_eq!((accuracy.under_share, accuracy.oracle), (1.0, false), "{name}: {accuracy:?}");
        assert!(accuracy.median_ratio < 0.5 && accuracy.p90_ratio < 0.5, "{accuracy:?}");
    }
    let exact = run_with(&s, &s.workload, "fifo", Estimates::Exact);
    let accuracy = exact.summary.estimates.unwrap();
    assert_eq!((accuracy.median_ratio, accuracy.under_share, accuracy.oracle), (1.0, 0.0, true));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// The history estimator never reads the future: changing every job
    /// after the k-th (its duration, its gang) leaves the estimates of the
    /// first k unchanged, under a policy that reacts to estimates.
    #[test]
    fn history_estimates_never_read_the_future(k in 0usize..399, factor in 2u64..50, policy in 0usize..3) {
        let s = scaled(Some(0.8));
        let name = ["network", "fifo", "las"][policy];
        let before = run_with(&s, &s.workload, name, Estimates::History);
        let mut altered = s.workload.clone();
        for job in altered.jobs.iter_mut().skip(k + 1) {
            job.duration_s = job.duration_s * factor + 7;
        }
        let after = run_with(&s, &altered, name, Estimates::History);
        prop_assert_eq!(&before.estimates_s[..=k], &after.estimates_s[..=k]);
        // And the estimates are the history's, not the truth's.
        prop_assert!(before.summary.estimates.as_ref().unwrap().under_share > 0.0);
    }
}
