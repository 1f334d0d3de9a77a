//! `suanwang simulate` and `suanwang topology`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use suanwang_core::policy;
use suanwang_sim::report::{self, ReportHeader};
use suanwang_sim::{PolicyResult, PolicySummary, RunOptions, Scaled};
use suanwang_trace::{Format, Mapper, MappingConfig};

use crate::table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Trace file, or a bundled trace by name.
    #[arg(long, default_value = "itp-cluster01")]
    pub trace: String,
    /// Trace format: itp, openb, gavel or csv (guessed from the file when omitted).
    #[arg(long)]
    pub trace_format: Option<String>,
    /// Column mapping for --trace-format csv: submit=COL,duration=COL,gpus=COL[,gpu_type=COL][,user=COL][,estimate=COL].
    #[arg(long)]
    pub columns: Option<String>,
    /// Topology file, or a bundled topology by name.
    #[arg(long, default_value = "shandong")]
    pub topology: String,
    /// Policies to compare: comma-separated names, or `all`.
    #[arg(long, default_value = "all")]
    pub policy: String,
    /// Seed of the mapping of trace jobs onto the network.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Scale capacity so the trace's offered load is this fraction of it.
    #[arg(long, default_value_t = 0.8, conflicts_with = "native_capacity")]
    pub load: f64,
    /// Keep the topology's own capacity (no load scaling).
    #[arg(long)]
    pub native_capacity: bool,
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Write an HTML report with SVG plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Check every scheduler invariant after every step (slow; always on in debug builds).
    #[arg(long)]
    pub check: bool,
    /// The run-time estimates the scheduler plans with: `history` (an online
    /// predictor from jobs completed before each submission), `user` (the
    /// trace's requested times, `--columns ...,estimate=COL`), `noisy:LO-HI`
    /// (the truth times a seeded factor in [LO, HI)) or `exact` (an oracle).
    #[arg(long, default_value = "noisy:1-2", value_parser = |s: &str| suanwang_sim::Estimates::parse(s))]
    pub estimates: suanwang_sim::Estimates,
}

#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// Topology file, or a bundled topology by name.
    #[arg(default_value = "shandong")]
    pub topology: String,
}

/// The JSON document `--format json` prints: the run's header, then the policies.
#[derive(Debug, Serialize)]
pub struct SimulationOutput<'a> {
    #[serde(flatten)]
    pub header: &'a ReportHeader,
    pub policies: Vec<PolicySummary>,
}

pub fn parse_policies(text: &str) -> anyhow::Result<Vec<String>> {
    if text.trim() == "all" {
        return Ok(policy::NAMES.iter().map(|s| s.to_string()).collect());
    }
    let mut names = Vec::new();
    for name in text.split(',').map(str::trim) {
        policy::by_name(name).map_err(|e| anyhow::anyhow!("--policy: {e}"))?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    if names.is_empty() {
        bail!("--policy: no policy named");
    }
    Ok(names)
}

/// Everything a run needs, after reading and scaling.
pub struct Prepared {
    pub scaled: Scaled,
    pub mapper: Mapper,
    pub header: ReportHeader,
}

pub fn prepare(
    trace: &str,
    format: Option<&Format>,
    topology: &str,
    seed: u64,
    load: Option<f64>,
) -> anyhow::Result<Prepared> {
    let workload = suanwang_sim::read_trace(trace, format)?;
    let spec = suanwang_topology::load_spec(topology)?;
    // Validate the unscaled network first so errors name the user's file.
    suanwang_topology::build(&spec, Path::new(topology))?;
    let scaled = suanwang_sim::scale(&spec, &workload, load, Path::new(topology))?;
    let mapper = Mapper::new(scaled.topology.clone(), MappingConfig::new(seed));
    let header = ReportHeader {
        trace: trace.to_string(),
        topology: scaled.topology.name.clone(),
        jobs: scaled.workload.jobs.len(),
        seed,
        load,
        capacity_scale: scaled.capacity_scale,
        time_compression: scaled.time_compression,
        accelerators: scaled.topology.total_accelerators(),
    };
    Ok(Prepared { scaled, mapper, header })
}

pub fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:10} [{bar:40}] {pos}/{len} jobs ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

pub fn run_policies(
    prepared: &Prepared,
    policies: &[String],
    options: &RunOptions,
) -> anyhow::Result<Vec<PolicyResult>> {
    let jobs = prepared.scaled.workload.jobs.len() as u64;
    let bar = progress_bar(jobs * policies.len() as u64);
    let mut results = Vec::new();
    for (i, name) in policies.iter().enumerate() {
        bar.set_message(name.clone());
        let base = i as u64 * jobs;
        let result = suanwang_sim::run(
            &prepared.scaled.topology,
            &prepared.scaled.workload,
            &prepared.mapper,
            name,
            options,
            &mut |done| bar.set_position(base + done),
        )
        .with_context(|| format!("policy {name}"))?;
        results.push(result);
    }
    bar.finish_and_clear();
    Ok(results)
}

pub fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let format = match &args.trace_format {
        Some(name) => Some(Format::parse(name, args.columns.as_deref()).map_err(anyhow::Error::msg)?),
        None if args.columns.is_some() => bail!("--columns needs --trace-format csv"),
        None => None,
    };
    let policies = parse_policies(&args.policy)?;
    let load = (!args.native_capacity).then_some(args.load);
    let prepared = prepare(&args.trace, format.as_ref(), &args.topology, args.seed, load)?;
    if args.estimates == suanwang_sim::Estimates::User
        && prepared.scaled.workload.jobs.iter().all(|j| j.requested_s.is_none())
    {
        bail!(
            "--estimates user: the trace records no requested run times; name its column with --trace-format csv --columns ...,estimate=COL"
        );
    }
    let options = RunOptions {
        check_invariants: args.check || cfg!(debug_assertions),
        keep_series: args.report.is_some(),
        estimates: args.estimates,
        keep_estimates: false,
    };
    let results = run_policies(&prepared, &policies, &options)?;
    let h = &prepared.header;
    let output = SimulationOutput { header: h, policies: results.iter().map(|r| r.summary.clone()).collect() };
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir).with_context(|| format!("--report: cannot create {}", dir.display()))?;
        let page = report::html(h, &results).map_err(|e| anyhow::anyhow!("report: {e}"))?;
        let file = dir.join("index.html");
        std::fs::write(&file, page).with_context(|| format!("--report: cannot write {}", file.display()))?;
        eprintln!("report written to {}", file.display());
    }
    let mut stdout = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => {
            serde_json::to_writer(&mut stdout, &output)?;
            writeln!(stdout)?;
        }
        OutputFormat::Table => {
            let load = h.load.map_or("native".to_string(), |l| l.to_string());
            writeln!(
                stdout,
                "trace {} ({} jobs) on {} ({} accelerators), seed {}, load {}, capacity scale {:.4}, time compression {:.3}\n",
                h.trace, h.jobs, h.topology, h.accelerators, h.seed, load, h.capacity_scale, h.time_compression
            )?;
            write!(stdout, "{}", table::results(&output.policies))?;
            // How good the estimates were: per policy, since history
            // depends on which jobs completed first.
            let rows: Vec<Vec<String>> = output
                .policies
                .iter()
                .filter_map(|p| p.estimates.as_ref().map(|e| (p, e)))
                .map(|(p, e)| {
                    vec![
                        p.policy.clone(),
                        if e.oracle { format!("{} (ORACLE)", e.estimator) } else { e.estimator.clone() },
                        format!("{:.2}", e.median_ratio),
                        format!("{:.2}", e.p90_ratio),
                        format!("{:.0}%", e.under_share * 100.0),
                    ]
                })
                .collect();
            writeln!(stdout)?;
            write!(
                stdout,
                "{}",
                table::render(&["policy", "estimates", "median est/true", "p90 est/true", "under"], &rows)
            )?;
        }
    }
    Ok(())
}

pub fn topology(args: TopologyArgs) -> anyhow::Result<()> {
    let t = suanwang_topology::load(&args.topology)?;
    println!("{}: {} sites, {} links, {} accelerators", t.name, t.sites.len(), t.links.len(), t.total_accelerators());
    if !t.note.is_empty() {
        println!("note: {}", t.note);
    }
    let rows: Vec<Vec<String>> = t
        .sites
        .iter()
        .map(|s| {
            let pools = s
                .pools
                .iter()
                .map(|&p| {
                    let p = t.pool(p);
                    format!("{}x{} @{}", p.count, t.accelerator(p.accel).name, p.price_fen_per_hour)
                })
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                s.key.clone(),
                s.level.to_string(),
                s.city.clone(),
                format!("{:.2}", s.pue_milli as f64 / 1000.0),
                format!("{:.0}%", s.green_bp as f64 / 100.0),
                pools,
            ]
        })
        .collect();
    print!("{}", table::render(&["site", "level", "city", "PUE", "green", "pools (count x type @ fen/h)"], &rows));
    Ok(())
}
