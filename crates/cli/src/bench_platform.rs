//! `suanwang bench submit` and `suanwang bench decide`: the platform's
//! targets.
//!
//! - `submit`: a real server (in this process, on a loopback port, with a
//!   fresh database) and `--clients` threads submitting jobs over HTTP; a
//!   submission counts when its `201 Created` arrived, i.e. it is committed
//!   (`synchronous=FULL`). No agent runs, so jobs stay queued and the figure
//!   is pure admission.
//! - `decide`: the scheduler core alone on a synthetic network of `--sites`
//!   sites, filled with running jobs and `--queued` waiting ones; each
//!   measured decision is one completion event and the scheduling pass it
//!   triggers (what the server does per event).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, anyhow};
use suanwang_api::client::Client;
use suanwang_api::{Job, JobRequest};
use suanwang_core::job::{JobId, JobSpec, OrgId, OrgKind};
use suanwang_core::scheduler::{Decision, Event, Scheduler};
use suanwang_core::topology::{AccelId, SiteId};
use suanwang_server::auth::Role;
use suanwang_server::{ServerConfig, Timings};

use crate::table;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The benchmarks' organisation `bench` (home `jinan-icc`) with money to pay
/// with (a tenant with none is refused at the door); returns its token.
pub fn bench_org(db: &Path) -> anyhow::Result<String> {
    suanwang_server::admin::add_org(db, "bench", "enterprise", "bench", Some("jinan-icc"))
        .map_err(|e| anyhow!("{e}"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let mut ledger = suanwang_ledger::voucher::open(db, now)?;
    suanwang_ledger::voucher::deposit(&mut ledger, now, suanwang_ledger::TransferId(0xbe7c_0001), "bench", 1 << 40)?;
    let (token, _) = suanwang_server::admin::create_token(db, &Role::Consumer { org: "bench".into() }, "bench", None)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(token)
}

/// The benchmarks' job: `true` on one accelerator of any common type.
pub fn bench_request() -> JobRequest {
    JobRequest {
        name: "bench".into(),
        command: vec!["true".into()],
        env: Default::default(),
        secret_env: Default::default(),
        image: None,
        gpus: 1,
        accelerators: vec!["A100".into(), "H100".into(), "Ascend910B".into()],
        estimate_s: 600,
        time_limit_s: None,
        memory_mb: None,
        cpus: None,
        retries: 0,
        datasets: vec![],
        deadline_s: None,
        budget_fen: None,
        weights: None,
        origin: None,
        org: None,
    }
}

/// A real server in this process on a loopback port: its runtime (drop or
/// shut it down to stop the server) and its URL.
pub fn serve_here(config: ServerConfig) -> anyhow::Result<(tokio::runtime::Runtime, String)> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    runtime.spawn(suanwang_server::serve(config, Some(tx)));
    let address = runtime.block_on(rx).context("server start")?;
    Ok((runtime, format!("http://{address}")))
}

/// Submissions per second through the real HTTP server; returns the rate.
pub fn submit(dir: &Path, clients: usize, jobs: usize, quiet: bool) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let db = dir.join("submit.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let token = bench_org(&db)?;
    let config = ServerConfig {
        db: db.clone(),
        topology: "shandong".into(),
        listen: "127.0.0.1:0".parse()?,
        policy: "network".into(),
        timings: Timings::default(),
        checkpoints: None,
    };
    let (runtime, url) = serve_here(config)?;
    let request = bench_request();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let client = Client::new(&url, &token);
            let request = request.clone();
            let next = next.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut latencies = Vec::new();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < jobs {
                    let sent = Instant::now();
                    let _: Job = client.post("/v1/jobs", &request)?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(t.join().map_err(|_| anyhow!("client panicked"))??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let rate = jobs as f64 / seconds;
    if !quiet {
        print!(
            "{}",
            table::render(
                &["workload", "submissions", "seconds", "submissions/s", "p50 ms", "p99 ms"],
                &[vec![
                    format!("HTTP POST /v1/jobs, {clients} clients, durable"),
                    jobs.to_string(),
                    format!("{seconds:.2}"),
                    format!("{rate:.0}"),
                    format!("{:.2}", percentile(&latencies, 0.5)),
                    format!("{:.2}", percentile(&latencies, 0.99)),
                ]]
            )
        );
    }
    runtime.shutdown_background();
    Ok(rate)
}

/// Decision latency of the core with a deep queue on a large network.
pub fn decide(sites: usize, queued: usize, samples: usize, policy: &str) -> anyhow::Result<()> {
    let spec = suanwang_topology::synthetic(sites, 7);
    let topology = Arc::new(spec.build().map_err(|e| anyhow!("{e:?}"))?);
    let policy_box = suanwang_core::policy::by_name(policy)?;
    let mut s = Scheduler::new(topology.clone(), policy_box).with_invariant_checks(false);
    let all: Vec<AccelId> = (0..topology.accelerators.len() as u16).map(AccelId).collect();
    let mut id = 0u64;
    let mut job = |gpus: u32, estimate_s: u64, origin: u32| {
        id += 1;
        let mut spec =
            JobSpec::new(JobId(id), OrgId((id % 50) as u32), OrgKind::Enterprise, SiteId(origin), gpus, estimate_s);
        spec.accepted = all.clone();
        spec
    };
    // Fill every pool to the brim with running jobs of up to 8 accelerators
    // and varied lengths, placed directly (as after a restart).
    let mut running = Vec::new();
    for (p, pool) in topology.pools.iter().enumerate() {
        let mut left = pool.count;
        while left > 0 {
            let gpus = left.min(8);
            let length = 3600 + (p as u64 * 7919 + left as u64 * 104_729) % 36_000;
            let mut spec = job(gpus, length, pool.site.0);
            spec.accepted = vec![pool.accel];
            let attempt = 1;
            running.push((spec.id, attempt));
            s.adopt(0, spec, attempt, suanwang_core::topology::PoolId(p as u32), 0)?;
            left -= gpus;
        }
    }
    // A deep queue of mixed gangs that cannot start.
    for i in 0..queued as u64 {
        let gpus = [1, 1, 2, 4, 8][(i % 5) as usize];
        s.apply(1, Event::Submit(job(gpus, 600 + (i * 104_729) % 20_000, (i % sites as u64) as u32)))?;
    }
    s.schedule(1)?;
    let pending_before = s.pending_count();
    let mut latencies = Vec::with_capacity(samples);
    let mut now = 2;
    for k in 0..samples.min(running.len()) {
        let (job_id, attempt) = running[(k * 7_919) % running.len()];
        if s.running_attempt(job_id).map(|(a, _)| a) != Some(attempt) {
            continue;
        }
        now += 1;
        let started = Instant::now();
        let decisions = s.handle(now, Event::Finished { job: job_id, attempt })?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        for d in decisions {
            if let Decision::Start(st) = d {
                running.push((st.job, st.attempt));
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    print!(
        "{}",
        table::render(
            &["policy", "sites", "pools", "queued", "decisions", "p50 ms", "p99 ms", "max ms"],
            &[vec![
                policy.to_string(),
                sites.to_string(),
                topology.pools.len().to_string(),
                pending_before.to_string(),
                latencies.len().to_string(),
                format!("{:.3}", percentile(&latencies, 0.5)),
                format!("{:.3}", percentile(&latencies, 0.99)),
                format!("{:.3}", latencies.last().copied().unwrap_or(0.0)),
            ]]
        )
    );
    Ok(())
}
