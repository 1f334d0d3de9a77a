//! `suanwang bench slurm`: the Slurm site's targets, against a real cluster.
//!
//! A real server (in this process, fresh database, a network of one site
//! with the cluster's GPUs) and a real agent process with `--backend slurm`.
//!
//! - Latency: one job every `--every-ms`, each printing the time its first
//!   instruction ran inside Slurm; the figure is that time minus the moment
//!   just before its `POST /v1/jobs`. It spans submission, scheduling, the
//!   lease, `sbatch` and Slurm's own scheduling (report the cluster's
//!   `SchedulerParameters` beside it).
//! - Dispatch: `--jobs` jobs of `true` from `--clients` clients, from the
//!   first submission until the controller's own counter (`sdiag`, "Jobs
//!   submitted") has them all; beside it, the same number of plain `sbatch`
//!   of the same job from the same number of clients, timed the same way.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use suanwang_agent::slurm::Cluster;
use suanwang_api::client::Client;
use suanwang_api::{Job, JobRequest};
use suanwang_server::auth::Role;
use suanwang_server::{ServerConfig, Timings};

use crate::table;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn unix_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The controller's count of jobs submitted since it started.
fn submitted(conf: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("sdiag").env("SLURM_CONF", conf).output().context("sdiag")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Jobs submitted:").and_then(|n| n.trim().parse().ok()))
        .ok_or_else(|| anyhow!("sdiag printed no 'Jobs submitted': {text}"))
}

fn wait_submitted(conf: &Path, target: u64, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while submitted(conf)? < target {
        if started.elapsed() > limit {
            bail!("the controller counted {} of {target} submissions after {limit:?}", submitted(conf)?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn scheduler_parameters(conf: &Path) -> String {
    let out = std::process::Command::new("scontrol").args(["show", "config"]).env("SLURM_CONF", conf).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    ["SchedulerType", "SchedulerParameters", "SelectType", "ProctrackType"]
        .iter()
        .filter_map(|k| {
            text.lines().find(|l| l.starts_with(k)).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn run(
    dir: &Path,
    conf: &Path,
    gres: &str,
    jobs: usize,
    latency_jobs: usize,
    every_ms: u64,
    clients: usize,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let conf = std::fs::canonicalize(conf).with_context(|| format!("--slurm-conf {}", conf.display()))?;
    let cluster = Cluster::new(&conf);
    let gpus = cluster.capacity()?.get(gres).map(|c| c.usable).unwrap_or(0);
    if gpus == 0 {
        bail!("the cluster has no usable GPU of GRES type '{gres}' (scripts/bench-slurm.sh starts one with 1024)");
    }
    let topology = format!(
        "name = \"bench-slurm\"\n[[accelerator]]\ntype = \"A100\"\nspeed = 1.0\nmemory_gb = 80\npower_w = 400\ndomestic = false\n\n[[site]]\nid = \"jinan-icc\"\nname = \"bench\"\ncity = \"Jinan\"\nlevel = \"city\"\nlat = 36.6\nlon = 117.1\npue = 1.3\ngreen_share = 0.2\nprovider = \"bench-co\"\n  [[site.pool]]\n  type = \"A100\"\n  count = {gpus}\n  price_fen_per_hour = 900\n"
    );
    std::fs::write(dir.join("net.toml"), topology)?;
    let db = dir.join("bench.db");
    let token = crate::bench_platform::bench_org(&db)?;
    let (agent_token, _) =
        suanwang_server::admin::create_token(&db, &Role::Provider { site: "jinan-icc".into() }, "bench", None)
            .map_err(|e| anyhow!("{e}"))?;
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, &agent_token)?;
    let config = ServerConfig {
        db: db.clone(),
        topology: dir.join("net.toml").display().to_string(),
        listen: "127.0.0.1:0".parse()?,
        policy: "network".into(),
        timings: Timings::default(),
        checkpoints: None,
    };
    let (runtime, url) = crate::bench_platform::serve_here(config)?;
    let mut agent = std::process::Command::new(std::env::current_exe()?)
        .args(["agent", "--server", &url, "--site", "jinan-icc", "--backend", "slurm", "--slurm-conf"])
        .arg(&conf)
        .args(["--gres-map", &format!("A100={gres}"), "--workdir"])
        .arg(dir.join("agent"))
        .arg("--token-file")
        .arg(&token_file)
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    let outcome = measure(&url, &token, &conf, gres, jobs, latency_jobs, every_ms, clients);
    let _ = agent.kill();
    let _ = agent.wait();
    runtime.shutdown_background();
    // The dispatch jobs may still be queued in Slurm: clear them.
    let _ = std::process::Command::new("scancel").args(["--quiet", "--user", "root"]).env("SLURM_CONF", &conf).status();
    outcome
}

/// Seconds from the first of `jobs` submissions, made by `clients`
/// threads calling `submit`, until the controller has counted them all.
fn dispatch(
    conf: &Path,
    jobs: usize,
    clients: usize,
    submit: &(dyn Fn() -> anyhow::Result<()> + Sync),
) -> anyhow::Result<f64> {
    let base = submitted(conf)?;
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while next.fetch_add(1, Ordering::Relaxed) < jobs {
                        submit()?;
                    }
                    Ok(())
                })
            })
            .collect();
        threads.into_iter().try_for_each(|t| t.join().map_err(|_| anyhow!("client panicked"))?)
    })?;
    wait_submitted(conf, base + jobs as u64, Duration::from_secs(600))?;
    Ok(t0.elapsed().as_secs_f64())
}

fn request(command: &str) -> JobRequest {
    JobRequest {
        command: vec!["sh".into(), "-c".into(), command.into()],
        accelerators: vec!["A100".into()],
        estimate_s: 60,
        time_limit_s: Some(300),
        ..crate::bench_platform::bench_request()
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    url: &str,
    token: &str,
    conf: &Path,
    gres: &str,
    jobs: usize,
    latency_jobs: usize,
    every_ms: u64,
    clients: usize,
) -> anyhow::Result<()> {
    let client = Client::new(url, token);
    // Wait for the agent's first capacity report.
    let started = Instant::now();
    loop {
        let sites: Vec<suanwang_api::Site> = client.get("/v1/sites")?;
        if sites.iter().any(|s| s.reported_at.is_some() && s.problem.is_none()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the agent never reported (see its log in the bench folder)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Latency: submit -> first instruction inside Slurm.
    let mut sent = Vec::new();
    for _ in 0..latency_jobs {
        let at = unix_s();
        let job: Job = client.post("/v1/jobs", &request("date +%s.%N"))?;
        sent.push((job.id, at));
        std::thread::sleep(Duration::from_millis(every_ms));
    }
    let mut latencies = Vec::new();
    for (id, at) in &sent {
        let deadline = Instant::now() + Duration::from_secs(120);
        let ran = loop {
            let job: Job = client.get(&format!("/v1/jobs/{id}"))?;
            if job.state.is_terminal() {
                let mut out = Vec::new();
                client.stream(&format!("/v1/jobs/{id}/logs"), &mut out)?;
                let text = String::from_utf8_lossy(&out).to_string();
                break text.lines().filter_map(|l| l.trim().parse::<f64>().ok()).next();
            }
            if Instant::now() > deadline {
                bail!("latency job {id} did not end: {job:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let ran = ran.ok_or_else(|| anyhow!("latency job {id} printed no time"))?;
        latencies.push(ran - at);
    }
    latencies.sort_by(f64::total_cmp);

    // Dispatch: suanwang, from the first submission until Slurm counted
    // all; then plain sbatch of the same job from as many clients.
    let dispatcher = Client::new(url, token);
    let req = request("true");
    let ours = dispatch(conf, jobs, clients, &|| {
        let _: Job = dispatcher.post("/v1/jobs", &req)?;
        Ok(())
    })?;
    let gres_arg = format!("--gres=gpu:{gres}:1");
    let plain = dispatch(conf, jobs, clients, &|| {
        let ok = std::process::Command::new("sbatch")
            .args(["--quiet", "--output=/dev/null", "--time=5", &gres_arg, "--wrap", "true"])
            .env("SLURM_CONF", conf)
            .status()?
            .success();
        if !ok {
            bail!("sbatch failed");
        }
        Ok(())
    })?;

    println!("Slurm: {}", scheduler_parameters(conf));
    print!(
        "{}",
        table::render(
            &["measure", "jobs", "clients", "median s", "p99 s", "max s"],
            &[vec![
                format!("submit -> first instruction in Slurm (one every {every_ms} ms)"),
                latencies.len().to_string(),
                "1".into(),
                format!("{:.3}", percentile(&latencies, 0.5)),
                format!("{:.3}", percentile(&latencies, 0.99)),
                format!("{:.3}", latencies.last().copied().unwrap_or(0.0)),
            ]]
        )
    );
    print!(
        "{}",
        table::render(
            &["dispatch to one cluster", "jobs", "clients", "seconds", "jobs/s"],
            &[
                vec![
                    "suanwang (HTTP submit -> schedule -> lease -> sbatch)".into(),
                    jobs.to_string(),
                    clients.to_string(),
                    format!("{ours:.2}"),
                    format!("{:.0}", jobs as f64 / ours),
                ],
                vec![
                    "plain sbatch".into(),
                    jobs.to_string(),
                    clients.to_string(),
                    format!("{plain:.2}"),
                    format!("{:.0}", jobs as f64 / plain),
                ],
            ]
        )
    );
    Ok(())
}
