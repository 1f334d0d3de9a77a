//! `suanwang bench`: the figures the issues ask for, printed as tables.
//!
//! - `bench itp`: every ITP cluster file under each policy at `--load`,
//!   wall time per run, and the quality verdict (does `network` beat
//!   `local`, `fifo` and `cheapest` on mean JCT, and is it dominated on
//!   both mean JCT and total cost by any policy?).
//! - `bench scale`: a real trace replicated with shifted times to at least
//!   `--jobs` jobs on a synthetic network of `--sites` sites: wall time,
//!   jobs per second and peak resident memory per policy.
//!
//! Run them from a release build: `cargo run --release -p suanwang -- bench ...`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use suanwang_sim::{PolicySummary, RunOptions};
use suanwang_trace::{Format, Mapper, MappingConfig};

use crate::simulate::{Prepared, parse_policies, prepare, progress_bar, run_policies};
use crate::table;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Every ITP cluster under every policy: wall time and quality.
    Itp {
        /// Folder holding the ITP `clusterNN.csv` files.
        #[arg(long, default_value = "../shared/traces/microsoft_itp_2021/raw")]
        dir: PathBuf,
        #[arg(long, default_value = "all")]
        policy: String,
        #[arg(long, default_value_t = 0.8)]
        load: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Ledger throughput: batches of transfers, and single transfers from many clients.
    Ledger {
        /// Folder for the benchmark's database files (deleted afterwards).
        #[arg(long, default_value = "target/bench-ledger")]
        dir: PathBuf,
        #[arg(long, default_value_t = 200)]
        batches: usize,
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 300)]
        per_client: usize,
    },
    /// Job submissions per second through the real server, from many clients.
    Submit {
        #[arg(long, default_value = "target/bench-submit")]
        dir: PathBuf,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Print only the rate (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// Scheduling decision latency with a deep queue on a large network.
    Decide {
        #[arg(long, default_value_t = 200)]
        sites: usize,
        #[arg(long, default_value_t = 10_000)]
        queued: usize,
        #[arg(long, default_value_t = 2_000)]
        samples: usize,
        #[arg(long, default_value = "network")]
        policy: String,
    },
    /// The job sandbox: start overhead against unsandboxed starts, and the
    /// agent's memory while a job prints a lot (a real server and agent).
    Sandbox {
        #[arg(long, default_value = "target/bench-sandbox")]
        dir: PathBuf,
        #[arg(long, default_value_t = 200)]
        starts: usize,
        /// Output of the loud job, MB.
        #[arg(long, default_value_t = 1000)]
        output_mb: u64,
        /// The server's log quota, MiB.
        #[arg(long, default_value_t = 100)]
        quota_mb: u64,
    },
    /// A Slurm cluster as a site (real server and agent): submit-to-running
    /// latency, and the dispatch rate beside plain `sbatch` from as many clients.
    Slurm {
        /// The cluster's slurm.conf (scripts/bench-slurm.sh starts one).
        #[arg(long)]
        slurm_conf: PathBuf,
        /// The cluster's GRES type of GPU.
        #[arg(long, default_value = "a100")]
        gres: String,
        #[arg(long, default_value = "target/bench-slurm")]
        dir: PathBuf,
        /// Jobs of the dispatch run (each side).
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Jobs of the latency run, one every --every-ms.
        #[arg(long, default_value_t = 100)]
        latency_jobs: usize,
        #[arg(long, default_value_t = 200)]
        every_ms: u64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
    },
    /// A replicated trace of a million jobs on a network of hundreds of sites.
    Scale {
        #[arg(long, default_value = "../shared/traces/microsoft_itp_2021/raw/cluster04.csv")]
        trace: String,
        /// At least this many jobs (the trace is repeated, each copy shifted in time).
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
        /// Sites of the synthetic network.
        #[arg(long, default_value_t = 200)]
        sites: usize,
        #[arg(long, default_value = "network,las")]
        policy: String,
        #[arg(long, default_value_t = 0.8)]
        load: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; benchmark figures need `cargo run --release`");
    }
    match args.command {
        BenchCommand::Itp { dir, policy, load, seed } => itp(&dir, &policy, load, seed),
        BenchCommand::Scale { trace, jobs, sites, policy, load, seed } => {
            scale(&trace, jobs, sites, &policy, load, seed)
        }
        BenchCommand::Submit { dir, clients, jobs, quiet } => {
            let rate = crate::bench_platform::submit(&dir, clients, jobs, quiet)?;
            if quiet {
                println!("{rate:.0}");
            }
            Ok(())
        }
        BenchCommand::Decide { sites, queued, samples, policy } => {
            crate::bench_platform::decide(sites, queued, samples, &policy)
        }
        BenchCommand::Sandbox { dir, starts, output_mb, quota_mb } => {
            crate::bench_sandbox::run(&dir, starts, output_mb, quota_mb)
        }
        BenchCommand::Slurm { slurm_conf, gres, dir, jobs, latency_jobs, every_ms, clients } => {
            crate::bench_slurm::run(&dir, &slurm_conf, &gres, jobs, latency_jobs, every_ms, clients)
        }
        BenchCommand::Ledger { dir, batches, batch_size, clients, per_client } => {
            crate::bench_ledger::run(&dir, batches, batch_size, clients, per_client)
        }
    }
}

fn itp(dir: &Path, policy: &str, load: f64, seed: u64) -> anyhow::Result<()> {
    let policies = parse_policies(policy)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("--dir {}: no .csv trace files", dir.display());
    }
    let options = RunOptions { check_invariants: false, keep_series: false, ..RunOptions::default() };
    let mut wall_rows = Vec::new();
    let mut verdicts = Vec::new();
    for file in &files {
        let name = file.file_stem().unwrap_or_default().to_string_lossy().to_string();
        let prepared = prepare(&file.to_string_lossy(), Some(&Format::Itp), "shandong", seed, Some(load))?;
        let results = run_policies(&prepared, &policies, &options)?;
        let summaries: Vec<PolicySummary> = results.into_iter().map(|r| r.summary).collect();
        println!(
            "== {name}: {} jobs, {} accelerators after scaling (scale {:.4}, time compression {:.3})",
            prepared.header.jobs,
            prepared.header.accelerators,
            prepared.header.capacity_scale,
            prepared.header.time_compression
        );
        print!("{}", table::results(&summaries));
        println!();
        for s in &summaries {
            wall_rows.push(vec![
                name.clone(),
                s.policy.clone(),
                prepared.header.jobs.to_string(),
                s.wall_ms.to_string(),
            ]);
        }
        verdicts.push(vec![name.clone(), verdict(&summaries)]);
    }
    println!("== wall time per cluster and policy (target: under 2,000 ms each)");
    print!("{}", table::render(&["cluster", "policy", "jobs", "wall ms"], &wall_rows));
    println!("\n== quality at load {load}");
    print!("{}", table::render(&["cluster", "verdict"], &verdicts));
    Ok(())
}

/// Does `network` beat local, fifo and cheapest on mean JCT, and is it
/// dominated (better on both mean JCT and total cost) by any policy?
fn verdict(summaries: &[PolicySummary]) -> String {
    let Some(network) = summaries.iter().find(|s| s.policy == "network") else {
        return "network not run".into();
    };
    let mut notes = Vec::new();
    for baseline in ["local", "fifo", "cheapest"] {
        if let Some(b) = summaries.iter().find(|s| s.policy == baseline) {
            let beats = network.mean_jct_s < b.mean_jct_s;
            notes.push(format!(
                "{} {baseline} ({:.0} vs {:.0})",
                if beats { "beats" } else { "LOSES TO" },
                network.mean_jct_s,
                b.mean_jct_s
            ));
        }
    }
    let dominators: Vec<&str> = summaries
        .iter()
        .filter(|s| {
            s.policy != "network" && s.mean_jct_s < network.mean_jct_s && s.total_cost_fen() < network.total_cost_fen()
        })
        .map(|s| s.policy.as_str())
        .collect();
    if dominators.is_empty() {
        notes.push("not dominated".into());
    } else {
        notes.push(format!("DOMINATED by {}", dominators.join(", ")));
    }
    notes.join("; ")
}

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn scale(trace: &str, jobs: usize, sites: usize, policy: &str, load: f64, seed: u64) -> anyhow::Result<()> {
    let policies = parse_policies(policy)?;
    let started = Instant::now();
    let base = suanwang_sim::read_trace(trace, None)?;
    let copies = jobs.div_ceil(base.jobs.len()).max(1);
    let workload = base.replicated(copies);
    let spec = suanwang_topology::synthetic(sites, seed);
    let scaled = suanwang_sim::scale(&spec, &workload, Some(load), Path::new("synthetic"))?;
    let mapper = Mapper::new(scaled.topology.clone(), MappingConfig::new(seed));
    let header = suanwang_sim::report::ReportHeader {
        trace: workload.name.clone(),
        topology: scaled.topology.name.clone(),
        jobs: scaled.workload.jobs.len(),
        seed,
        load: Some(load),
        capacity_scale: scaled.capacity_scale,
        time_compression: scaled.time_compression,
        accelerators: scaled.topology.total_accelerators(),
    };
    println!(
        "{} ({} copies, {} jobs) on {} ({} sites, {} pools, {} accelerators), load {load}; prepared in {} ms",
        trace,
        copies,
        header.jobs,
        header.topology,
        scaled.topology.sites.len(),
        scaled.topology.pools.len(),
        header.accelerators,
        started.elapsed().as_millis()
    );
    let prepared = Prepared { scaled, mapper, header };
    let options = RunOptions { check_invariants: false, keep_series: false, ..RunOptions::default() };
    let mut rows = Vec::new();
    for name in &policies {
        let bar = progress_bar(prepared.header.jobs as u64);
        bar.set_message(name.clone());
        let result = suanwang_sim::run(
            &prepared.scaled.topology,
            &prepared.scaled.workload,
            &prepared.mapper,
            name,
            &options,
            &mut |d| bar.set_position(d),
        )?;
        bar.finish_and_clear();
        let s = &result.summary;
        let seconds = s.wall_ms as f64 / 1000.0;
        rows.push(vec![
            name.clone(),
            prepared.header.jobs.to_string(),
            format!("{seconds:.1}"),
            format!("{:.0}", prepared.header.jobs as f64 / seconds.max(1e-9)),
            format!("{:.0}", s.mean_jct_s),
            format!("{:.3}", s.utilization),
            s.preemptions.to_string(),
            peak_rss_mib().map_or("?".into(), |m| format!("{m:.0}")),
        ]);
    }
    print!(
        "{}",
        table::render(&["policy", "jobs", "wall s", "jobs/s", "mean JCT s", "util", "preempt", "peak RSS MiB"], &rows)
    );
    Ok(())
}
