//! The real traces in ../shared/traces load completely, streaming.

use suanwang_trace::{Format, open};

use crate::shared_traces;

#[test]
fn every_itp_cluster_loads_with_the_published_job_count() {
    let mut total = 0;
    for entry in std::fs::read_dir(shared_traces().join("microsoft_itp_2021/raw")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "csv") {
            let mut reader = open(&path, &Format::Itp).unwrap();
            let jobs = reader.by_ref().map(|j| j.unwrap()).filter(|j| j.duration_s >= 600).count() as u64;
            assert_eq!(jobs, reader.stats().jobs, "{}: ITP durations are at least 600 s", path.display());
            total += jobs;
        }
    }
    assert_eq!(total, 43_605);
}

#[test]
fn openb_default_list_accounts_for_every_row() {
    let path = shared_traces().join("alibaba_openb_gpu_2023/csv/openb_pod_list_default.csv");
    let mut reader = open(&path, &Format::Openb).unwrap();
    let jobs: Vec<_> = reader.by_ref().map(|j| j.unwrap()).collect();
    let stats = reader.stats();
    assert_eq!(stats.rows, 8_152);
    assert_eq!(stats.skipped.get("cpu_only"), Some(&1_088));
    assert_eq!(stats.rows, stats.jobs + stats.skipped.values().sum::<u64>());
    assert_eq!(jobs.len() as u64, stats.jobs);
    assert_eq!(stats.censored, 4_149, "GPU pods still running at the end of the trace");
}

#[test]
fn gavel_gzipped_traces_stream() {
    let path = shared_traces().join("philly_gavel_msr/traces/seed=0/51b7ef.trace.gz");
    let (jobs, stats) = suanwang_trace::read_all(&path, &Format::Gavel).unwrap();
    assert_eq!(jobs.len() as u64, stats.jobs);
    assert_eq!(jobs.len(), 18);
    assert!(jobs.iter().all(|j| j.duration_s >= 1 && j.gpus >= 1));
}
