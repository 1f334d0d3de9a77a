//! `suanwang bench sandbox`: the isolation targets of the hostile-tenant issue.
//!
//! - Start overhead: `--starts` attempts of `true`, each prepared (cgroup
//!   with limits, directory handed to the job's user), started under
//!   bubblewrap, waited for and cleaned up (the whole tree killed, the
//!   cgroup removed) — against the same with the unsandboxed backend (own
//!   process group, clean environment). Median, p95 and mean per start.
//! - Loud job: a real server (in this process, fresh database) and a real
//!   agent process; one job prints `--output-mb` MB; the agent's peak
//!   resident memory (`VmHWM`) while it runs, the time, and what the log
//!   kept (the quota, the tail and the truncation marker).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use suanwang_agent::sandbox::{Containers, Defaults, Isolation, Request};
use suanwang_api::client::Client;
use suanwang_api::{Job, JobRequest};
use suanwang_server::auth::Role;
use suanwang_server::{ServerConfig, Timings};

use crate::table;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Milliseconds per start of `true`, one isolation.
fn starts(isolation: &Isolation, dir: &Path, n: usize, image: Option<&str>) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(n);
    let argv = vec!["true".to_string()];
    let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())].into_iter().collect();
    for i in 0..n {
        let work = dir.join(format!("job-{}-1", i + 1));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let started = Instant::now();
        let request =
            Request { job: i as u64 + 1, attempt: 1, gpus: 1, memory_mb: None, cpus: None, image, command_given: true };
        let prepared = isolation.prepare(&request, &work)?;
        let status = isolation.command(&prepared, &work, &argv, &env)?.status()?;
        isolation.cleanup(&prepared);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            bail!("a start of `true` failed: {status}");
        }
        std::fs::remove_dir_all(&work)?;
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

pub fn run(dir: &Path, n: usize, output_mb: u64, quota_mb: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs)?;
    std::fs::set_permissions(&jobs, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let (sandboxed, _) = Isolation::sandboxed("bench-sandbox", &jobs, Defaults::default(), Containers::Auto)
        .map_err(|e| anyhow!("the sandbox cannot be set up here: {e}"))?;
    let image = sandboxed.images().into_keys().next();
    let mut rows = Vec::new();
    let mut backends = vec![
        ("unsandboxed (process group)".to_string(), &Isolation::Unsandboxed, None),
        ("sandboxed (bwrap + cgroup)".to_string(), &sandboxed, None),
    ];
    match &image {
        Some(image) => backends.push((format!("container (podman + runc, {image})"), &sandboxed, Some(image.as_str()))),
        None => eprintln!("no container row: no podman image at this machine (see scripts/test-image.sh)"),
    }
    for (name, isolation, image) in backends {
        let t = starts(isolation, &jobs, n, image)?;
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        rows.push(vec![
            name,
            n.to_string(),
            format!("{:.1}", percentile(&t, 0.5)),
            format!("{:.1}", percentile(&t, 0.95)),
            format!("{mean:.1}"),
        ]);
    }
    println!("start, wait and clean up `true`:");
    print!("{}", table::render(&["backend", "starts", "median ms", "p95 ms", "mean ms"], &rows));
    loud_job(&dir, output_mb, quota_mb)
}

/// A job printing `output_mb` MB through a real server and agent.
fn loud_job(dir: &Path, output_mb: u64, quota_mb: u64) -> anyhow::Result<()> {
    let db = dir.join("loud.db");
    let consumer = crate::bench_platform::bench_org(&db)?;
    let (operator, _) =
        suanwang_server::admin::create_token(&db, &Role::Operator, "bench", None).map_err(|e| anyhow!("{e}"))?;
    let (provider, _) =
        suanwang_server::admin::create_token(&db, &Role::Provider { site: "jinan-icc".into() }, "bench", None)
            .map_err(|e| anyhow!("{e}"))?;
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, &provider)?;
    let config = ServerConfig {
        db: db.clone(),
        topology: "shandong".into(),
        listen: "127.0.0.1:0".parse()?,
        policy: "network".into(),
        timings: Timings { log_quota_bytes: quota_mb << 20, ..Timings::default() },
        checkpoints: None,
    };
    let (runtime, url) = crate::bench_platform::serve_here(config)?;
    let mut agent = std::process::Command::new(std::env::current_exe()?)
        .args(["agent", "--server", &url, "--site", "jinan-icc", "--token-file"])
        .arg(&token_file)
        .arg("--workdir")
        .arg(dir.join("agent"))
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let operator = Client::new(&url, &operator);
    let started = Instant::now();
    loop {
        let sites: Vec<suanwang_api::Site> = operator.get("/v1/sites")?;
        if sites.iter().any(|s| s.id == "jinan-icc" && s.up) {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the agent did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let request: JobRequest = serde_json::from_value(serde_json::json!({
        "name": "loud",
        "command": ["sh", "-c", format!("yes 0123456789abcdef | head -c {}; echo; echo LAST LINE", output_mb * 1_000_000)],
        "gpus": 1, "accelerators": ["A100", "H100", "Ascend910B", "A800", "H20"], "estimate_s": 600,
        "origin": "jinan-icc"
    }))?;
    let client = Client::new(&url, &consumer);
    let job: Job = client.post("/v1/jobs", &request)?;
    let started = Instant::now();
    let pid = agent.id();
    let mut peak_kib = 0u64;
    let done = loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(kib) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
            peak_kib = peak_kib.max(kib.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
        }
        let j: Job = client.get(&format!("/v1/jobs/{}", job.id))?;
        if j.state.is_terminal() {
            break j;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the loud job did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut log = Vec::new();
    client.stream(&format!("/v1/jobs/{}/logs", job.id), &mut log)?;
    let text = String::from_utf8_lossy(&log);
    let marker = text.lines().find(|l| l.starts_with("[truncated: ")).unwrap_or("(none)").to_string();
    let _ = agent.kill();
    let _ = agent.wait();
    runtime.shutdown_background();
    println!("\na job printing {output_mb} MB, log quota {quota_mb} MiB (real server and agent):");
    print!(
        "{}",
        table::render(
            &["job state", "seconds", "agent peak RSS MiB", "log kept MiB", "last line kept", "marker"],
            &[vec![
                done.state.as_str().to_string(),
                format!("{seconds:.1}"),
                format!("{:.1}", peak_kib as f64 / 1024.0),
                format!("{:.1}", log.len() as f64 / (1 << 20) as f64),
                text.trim_end().ends_with("LAST LINE").to_string(),
                marker,
            ]]
        )
    );
    Ok(())
}
