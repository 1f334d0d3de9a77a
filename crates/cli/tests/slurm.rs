//! Real Slurm clusters, started by the project's own script
//! (`scripts/slurm-clusters.sh`), on ports of this test run only, as sites
//! of a running network: the real `suanwang serve` and `suanwang agent
//! --backend slurm` binaries, real Slurm daemons, no mock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Two clusters of this test process, torn down when dropped.
pub struct Clusters {
    pub dir: PathBuf,
    specs: String,
    /// With slurmdbd on MariaDB (`SUANWANG_SLURM_ACCOUNTING=1`).
    accounting: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm-clusters.sh")
}

impl Clusters {
    /// Two clusters: `alpha` (4 a100 on 127.0.0.1) and `beta` (4 910b on 127.0.0.2).
    pub fn up(name: &str) -> Clusters {
        Clusters::up_with(name, false)
    }

    /// The same two clusters, keeping accounting in one slurmdbd.
    pub fn up_with(name: &str, accounting: bool) -> Clusters {
        let dir = std::env::temp_dir().join(format!("suanwang-slurm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Ports of this process and of this set of clusters, so that
        // parallel tests and test runs do not meet.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Below the ephemeral range (32768 and up), 20 ports a set, 7 sets a process.
        assert!(n < 7, "more cluster sets than this process has ports for");
        let base = 10_000 + (std::process::id() % 150) * 150 + n * 20;
        let specs = format!("alpha:127.0.0.1:{}:a100:4 beta:127.0.0.2:{}:910b:4", base, base + 10);
        let c = Clusters { dir, specs, accounting };
        let o = c.run("up");
        assert!(
            o.status.success(),
            "slurm-clusters up: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        c
    }

    pub fn run(&self, action: &str) -> std::process::Output {
        Command::new("bash")
            .arg(script())
            .arg(action)
            .arg(&self.dir)
            .env("SUANWANG_SLURM_CLUSTERS", &self.specs)
            .env("SUANWANG_SLURM_ACCOUNTING", if self.accounting { "1" } else { "0" })
            .output()
            .unwrap()
    }

    pub fn conf(&self, cluster: &str) -> PathBuf {
        self.dir.join(cluster).join("slurm.conf")
    }

    /// A Slurm client command against one cluster.
    pub fn slurm(&self, cluster: &str, program: &str, args: &[&str]) -> String {
        let o = Command::new(program).args(args).env("SLURM_CONF", self.conf(cluster)).output().unwrap();
        assert!(o.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The cluster's jobs: (id, name, state), ended ones included.
    pub fn jobs(&self, cluster: &str) -> Vec<(u64, String, String)> {
        self.slurm(cluster, "squeue", &["--noheader", "--states=all", "--format=%i|%j|%T"])
            .lines()
            .filter_map(|l| {
                let mut f = l.trim().split('|');
                Some((f.next()?.parse().ok()?, f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect()
    }

    /// A daemon's pid, from its pid file.
    pub fn pid(&self, cluster: &str, daemon: &str) -> u32 {
        std::fs::read_to_string(self.dir.join(cluster).join(format!("{daemon}.pid"))).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Clusters {
    fn drop(&mut self) {
        let _ = self.run("down");
    }
}

fn pids(dir: &Path) -> Vec<String> {
    let o = Command::new("pgrep").args(["-f", &dir.display().to_string()]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_project_s_slurm_clusters_run_gpu_jobs_of_their_own_types_and_stop() {
    let c = Clusters::up("script");
    for (cluster, gpu) in [("alpha", "a100"), ("beta", "910b")] {
        // Each its own cluster, with its own GPU type.
        assert_eq!(c.slurm(cluster, "sinfo", &["-h", "-o", "%G"]), format!("gpu:{gpu}:4"));
        let out = c.dir.join(format!("{cluster}-%j.out"));
        let id = c.slurm(
            cluster,
            "sbatch",
            &[
                "--parsable",
                "--gres",
                &format!("gpu:{gpu}:2"),
                "-o",
                out.to_str().unwrap(),
                "--wrap",
                "echo ran on $SLURM_CLUSTER_NAME; exit 3",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let state = loop {
            let show = c.slurm(cluster, "scontrol", &["show", "job", &id]);
            if show.contains("JobState=FAILED") || show.contains("JobState=COMPLETED") {
                break show;
            }
            assert!(Instant::now() < deadline, "job {id} on {cluster} did not end: {show}");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(state.contains("ExitCode=3:0"), "{state}");
        let log = std::fs::read_to_string(c.dir.join(format!("{cluster}-{id}.out"))).unwrap();
        assert_eq!(log.trim(), format!("ran on {cluster}"));
        // More GPUs than the cluster has: Slurm itself refuses.
        let o = Command::new("sbatch")
            .args(["--gres", &format!("gpu:{gpu}:5"), "--wrap", "true"])
            .env("SLURM_CONF", c.conf(cluster))
            .output()
            .unwrap();
        assert!(!o.status.success(), "{o:?}");
    }
    let dir = c.dir.clone();
    assert!(!pids(&dir).is_empty(), "the daemons run from the test's directory");
    drop(c);
    assert!(pids(&dir).is_empty(), "daemons left after down: {:?}", pids(&dir));
}

use suanwang_api::client::Client;
use suanwang_api::{Balances, Job, JobEvent, JobRequest, JobState, Site};

use crate::platform::{Platform, bill_lines, exe, logs, submit};

/// Two Slurm sites (alpha: 4 A100, beta: 4 Ascend910B) and, where a test
/// asks, a local site (gamma: 4 A100), with short leases.
fn network(with_local: bool) -> String {
    let site = |id: &str, city: &str, kind: &str, price: u32| {
        format!(
            "[[site]]\nid = \"{id}\"\nname = \"{id}\"\ncity = \"{city}\"\nlevel = \"city\"\nlat = 36.5\nlon = 118.0\npue = 1.3\ngreen_share = 0.2\nprovider = \"{id}-co\"\n  [[site.pool]]\n  type = \"{kind}\"\n  count = 4\n  price_fen_per_hour = {price}\n\n"
        )
    };
    let mut t = String::from(
        "name = \"slurm-sites\"\n[[accelerator]]\ntype = \"A100\"\nspeed = 1.0\nmemory_gb = 80\npower_w = 400\ndomestic = false\n[[accelerator]]\ntype = \"Ascend910B\"\nspeed = 1.0\nmemory_gb = 64\npower_w = 400\ndomestic = true\n\n",
    );
    t += &site("alpha", "Jinan", "A100", 900);
    t += &site("beta", "Qingdao", "Ascend910B", 900);
    if with_local {
        t += &site("gamma", "Yantai", "A100", 900);
    }
    let link = |a: &str, b: &str| {
        format!("[[link]]\na = \"{a}\"\nb = \"{b}\"\nbandwidth_gbps = 100\nlatency_ms = 4.0\nprice_fen_per_gb = 2\n\n")
    };
    t += &link("alpha", "beta");
    if with_local {
        t += &link("beta", "gamma");
    }
    t
}

const SHORT: [&str; 6] = ["--lease-s", "6", "--heartbeat-s", "1", "--site-timeout-s", "6"];

/// Starts the agent of a Slurm site and waits until it reported capacity.
fn start_slurm_agent(p: &mut Platform, c: &Clusters, site: &str, cluster: &str, gres: &str) {
    let token_file = p.agent_token_file(site);
    let log = std::fs::File::create(p.dir.join(format!("agent-{site}.log"))).unwrap();
    let child = Command::new(exe())
        .args(["agent", "--server", &p.url, "--site", site, "--backend", "slurm", "--slurm-conf"])
        .arg(c.conf(cluster))
        .args(["--gres-map", gres, "--report-s", "1", "--workdir"])
        .arg(p.workdir(site))
        .arg("--token-file")
        .arg(&token_file)
        .stderr(log)
        .spawn()
        .unwrap();
    p.agents.insert(site.to_string(), child);
    let operator = Client::new(&p.url, &p.operator);
    let started = Instant::now();
    loop {
        let sites: Vec<Site> = operator.get("/v1/sites").unwrap();
        if sites.iter().any(|s| s.id == site && s.up && s.reported_at.is_some() && s.problem.is_none()) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent of {site} never reported: {}",
            agent_log(p, site)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agent_log(p: &Platform, site: &str) -> String {
    std::fs::read_to_string(p.dir.join(format!("agent-{site}.log"))).unwrap_or_default()
}

fn site_of(p: &Platform, id: &str) -> Site {
    let sites: Vec<Site> = Client::new(&p.url, &p.operator).get("/v1/sites").unwrap();
    sites.into_iter().find(|s| s.id == id).unwrap()
}

fn wait_until<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_job(client: &Client, id: u64, limit: Duration, done: impl Fn(&Job) -> bool) -> Job {
    let mut last = None;
    let started = Instant::now();
    loop {
        let job: Job = client.get(&format!("/v1/jobs/{id}")).unwrap();
        if done(&job) {
            return job;
        }
        if started.elapsed() > limit {
            let events: Vec<JobEvent> = client.get(&format!("/v1/jobs/{id}/events")).unwrap();
            panic!("job {id} not as expected within {limit:?}: {job:?}\nevents: {events:#?}\nlast: {last:?}");
        }
        last = Some(job);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn gpu_job(command: &str, accelerators: &[&str]) -> JobRequest {
    let mut j = crate::platform::job(command);
    j.gpus = 2;
    j.accelerators = accelerators.iter().map(|a| a.to_string()).collect();
    j.estimate_s = 30;
    j
}

/// Seconds Slurm measured for a job (its controller's RunTime).
fn slurm_elapsed(c: &Clusters, cluster: &str, id: u64) -> u64 {
    let show = c.slurm(cluster, "scontrol", &["show", "job", "--oneliner", &id.to_string()]);
    let run = show.split_whitespace().find_map(|w| w.strip_prefix("RunTime=")).unwrap();
    run.split(':').fold(0, |acc, p| acc * 60 + p.parse::<u64>().unwrap())
}

/// The bill's lines of one job that cost something (unbilled attempts are listed too).
fn billed(client: &Client, job: u64) -> Vec<suanwang_api::BillLine> {
    bill_lines(client).lines.into_iter().filter(|l| l.job == job && !l.cause.contains("not billed")).collect()
}

fn held(client: &Client) -> i64 {
    let b: Balances = client.get("/v1/vouchers").unwrap();
    b.wallet_held_fen + b.vouchers.iter().map(|v| v.held_fen).sum::<i64>()
}

#[test]
fn two_slurm_clusters_and_a_local_site_run_a_batch_each_job_billed_where_it_ran() {
    let c = Clusters::up("batch");
    let mut p = Platform::with_topology("slurm-batch", &network(true), &SHORT);
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    start_slurm_agent(&mut p, &c, "beta", "beta", "Ascend910B=910b");
    p.start_agent_with("gamma", &["--unsandboxed"]);
    let acme = p.org("acme", "alpha");
    // Six 2-GPU jobs, each 4 s, any type: more than any one site can run at once.
    let ids: Vec<u64> = (0..6)
        .map(|i| {
            let code = if i % 2 == 0 { 0 } else { 3 };
            let command = format!(
                "echo job $SUANWANG_JOB slurm=${{SLURM_JOB_ID:-none}} on $SUANWANG_SITE; echo to-stderr >&2; sleep 4; exit {code}"
            );
            submit(&acme, &gpu_job(&command, &["A100", "Ascend910B"]))
        })
        .collect();
    let mut sites_used = std::collections::BTreeSet::new();
    let bill = wait_until("every job billed", Duration::from_secs(90), || {
        let done = ids.iter().all(|&id| acme.get::<Job>(&format!("/v1/jobs/{id}")).unwrap().state.is_terminal());
        let mut bill = bill_lines(&acme);
        bill.lines.retain(|l| !l.cause.contains("not billed"));
        (done && bill.lines.len() == ids.len()).then_some(bill)
    });
    for (i, &id) in ids.iter().enumerate() {
        let job: Job = acme.get(&format!("/v1/jobs/{id}")).unwrap();
        let site = job.site.clone().unwrap();
        let expected = if i % 2 == 0 { JobState::Succeeded } else { JobState::Failed };
        assert_eq!(
            (job.state, job.exit_code, job.attempts),
            (expected, Some(if i % 2 == 0 { 0 } else { 3 }), 1),
            "{job:?}"
        );
        let out = logs(&acme, id);
        assert!(out.starts_with(&format!("=== attempt 1 at {site} ===\n")), "{out}");
        assert!(out.contains("to-stderr") && out.contains(&format!("on {site}")), "{out}");
        let line = bill.lines.iter().find(|l| l.job == id).unwrap();
        assert_eq!((line.site.as_str(), line.attempt), (site.as_str(), 1), "{line:?}");
        if site == "gamma" {
            assert!(out.contains("slurm=none"), "{out}");
        } else {
            // The Slurm job that ran it: one, named for the attempt, with
            // the attempt's GPUs; the bill is Slurm's elapsed time x GPUs.
            let slurm_id: u64 = out.split("slurm=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
            let jobs = c.jobs(&site);
            let named: Vec<_> = jobs.iter().filter(|j| j.1 == format!("sw-{id}-1")).collect();
            assert_eq!(named.len(), 1, "{jobs:?}");
            assert_eq!(named[0].0, slurm_id);
            let show = c.slurm(&site, "scontrol", &["show", "job", "--oneliner", &slurm_id.to_string()]);
            let gres = if site == "alpha" { "gpu:a100:2" } else { "gpu:910b:2" };
            assert!(show.contains(gres), "{show}");
            assert_eq!(line.accel_seconds, 2 * slurm_elapsed(&c, &site, slurm_id).max(1) as i64, "{line:?}");
        }
        sites_used.insert(site);
    }
    assert_eq!(sites_used.len(), 3, "the network placed work on every site: {sites_used:?}");
    assert_eq!(held(&acme), 0, "every hold settled");
    // Current jobs' secrets live in the database: only the server's user may read it.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&p.db).unwrap().permissions().mode() & 0o077, 0);
    p.verify();
}

#[test]
fn cancel_an_administrator_s_cancel_a_drained_node_and_a_script_run_as_sbatch_would() {
    let c = Clusters::up("cancel");
    let mut p = Platform::with_topology("slurm-cancel", &network(false), &SHORT);
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    let acme = p.org("acme", "alpha");
    // An agent started for another site than its token's, or with a GRES
    // map the cluster has nothing of, stops at once with exit code 78.
    for (site, gres) in [("beta", "Ascend910B=910b"), ("alpha", "A100=h100")] {
        let o = Command::new(exe())
            .args(["agent", "--server", &p.url, "--site", site, "--backend", "slurm", "--slurm-conf"])
            .arg(c.conf("alpha"))
            .args(["--gres-map", gres, "--workdir"])
            .arg(p.dir.join(format!("wrong-{site}")))
            .arg("--token-file")
            .arg(p.agent_token_file("alpha"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{err}");
        assert!(err.contains("bound to site alpha, not beta") || err.contains("no GPU of any GRES type"), "{err}");
    }
    // Cancel: the Slurm job is gone within 2 s, the hold is released.
    let id = submit(&acme, &gpu_job("echo started; sleep 300", &["A100"]));
    wait_job(&acme, id, Duration::from_secs(30), |j| logs(&acme, j.id).contains("started"));
    let name = format!("sw-{id}-1");
    let asked = Instant::now();
    let _: Job = acme.post(&format!("/v1/jobs/{id}/cancel"), &()).unwrap();
    wait_until("the Slurm job ended after the cancel", Duration::from_secs(2), || {
        c.jobs("alpha")
            .iter()
            .all(|j| j.1 != name || j.2 != "RUNNING" && j.2 != "PENDING" && j.2 != "COMPLETING")
            .then_some(())
    });
    let gone = asked.elapsed();
    wait_until("the hold released", Duration::from_secs(10), || (held(&acme) == 0).then_some(()));
    assert!(gone < Duration::from_secs(2), "{gone:?}");

    // An administrator cancels a job in Slurm: not billed, run again.
    let mut request = gpu_job("echo run $SUANWANG_ATTEMPT; sleep 3", &["A100"]);
    request.retries = 0;
    let id = submit(&acme, &request);
    wait_job(&acme, id, Duration::from_secs(30), |j| logs(&acme, j.id).contains("run 1"));
    let first = c.jobs("alpha").into_iter().find(|j| j.1 == format!("sw-{id}-1")).unwrap();
    c.slurm("alpha", "scancel", &[&first.0.to_string()]);
    let done = wait_job(&acme, id, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Succeeded, 2), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("cancelled on the cluster, not by the network")), "{events:#?}");
    let lines = billed(&acme, id);
    assert_eq!(
        lines.iter().map(|l| l.attempt).collect::<Vec<_>>(),
        vec![2],
        "only the attempt that ran to its end is billed"
    );

    // A drained node: the site's capacity shrinks within a report period and
    // nothing is placed beyond it; resumed, it grows and the job runs.
    c.slurm("alpha", "scontrol", &["update", "nodename=alpha1", "state=drain", "reason=maintenance"]);
    wait_until("capacity shrinks", Duration::from_secs(5), || {
        let s = site_of(&p, "alpha");
        (s.pools[0].usable == 0 && s.pools[0].drained == 4).then_some(())
    });
    let sites = crate::platform::run_ok(&["sites", "--server", &p.url, "--token", &p.operator]);
    assert!(sites.contains("0/0 A100 (of 4; 4 drained)") && sites.contains("slurm"), "{sites}");
    let id = submit(&acme, &gpu_job("echo after resume", &["A100"]));
    std::thread::sleep(Duration::from_secs(3));
    let job: Job = acme.get(&format!("/v1/jobs/{id}")).unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Pending, 0), "placed on a drained site: {job:?}");
    c.slurm("alpha", "scontrol", &["update", "nodename=alpha1", "state=resume"]);
    let done = wait_job(&acme, id, Duration::from_secs(30), |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");

    // A user's batch script gives the same output through the network as
    // with sbatch on the same centre.
    let script = "#!/bin/sh\n#SBATCH --job-name=same\n#SBATCH --gres=gpu:a100:2\n#SBATCH --time=00:05:00\n#SBATCH --output=ignored.out\necho \"args=$# gpus-asked=2\"\nfor w in alpha 'b c'; do echo \"[$w]\"; done\nexit 4\n";
    let file = p.dir.join("same.sbatch");
    std::fs::write(&file, script).unwrap();
    let token = p.consumer_token("acme");
    let out = crate::platform::run_ok(&["submit", file.to_str().unwrap(), "--server", &p.url, "--token", &token]);
    let id: u64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    let ours = wait_job(&acme, id, Duration::from_secs(30), |j| j.state.is_terminal());
    assert_eq!((ours.exit_code, ours.site.as_deref()), (Some(4), Some("alpha")), "{ours:?}");
    let network_out = logs(&acme, id).lines().skip(1).collect::<Vec<_>>().join("\n");
    let direct = c.dir.join("direct.out");
    let sid: u64 = c
        .slurm("alpha", "sbatch", &["--parsable", "--output", direct.to_str().unwrap(), file.to_str().unwrap()])
        .parse()
        .unwrap();
    wait_until("the direct sbatch ended", Duration::from_secs(30), || {
        c.jobs("alpha").iter().any(|j| j.0 == sid && (j.2 == "FAILED" || j.2 == "COMPLETED")).then_some(())
    });
    let direct_out = std::fs::read_to_string(&direct).unwrap();
    assert_eq!(network_out.trim_end(), direct_out.trim_end());
    assert!(c.slurm("alpha", "scontrol", &["show", "job", &sid.to_string()]).contains("ExitCode=4:0"));
    p.verify();
}

#[test]
fn slurm_ends_a_job_at_its_time_limit_and_the_bill_stops_there() {
    let c = Clusters::up("timeout");
    let mut args = SHORT.to_vec();
    args.extend(["--log-quota-mb", "1"]);
    let mut p = Platform::with_topology("slurm-timeout", &network(false), &args);
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    let acme = p.org("acme", "alpha");
    // A job printing without end is cancelled once its output file passes
    // its log quota and 256 MiB: its own doing, billed; the log keeps the quota.
    let loud = submit(&acme, &gpu_job("yes 0123456789abcdef", &["A100"]));
    // Or makes its output file huge and sparse through its own handle: the
    // same, without the agent reading the hole (nor losing the lease to it).
    let sparse = submit(
        &acme,
        &gpu_job(
            "echo working; sleep 2; perl -e 'truncate(STDOUT, 4 * 2**40) or die $!'; echo after; sleep 60",
            &["A100"],
        ),
    );
    let mut request = gpu_job("echo sleeping; sleep 600", &["A100"]);
    // 30 s: Slurm's limits are whole minutes, so it runs (and is billed) a minute.
    request.time_limit_s = Some(30);
    let id = submit(&acme, &request);
    // Slurm checks limits every ~30 s: the end comes 60 to 100 s after the start.
    let done = wait_job(&acme, id, Duration::from_secs(150), |j| j.state.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert!(done.reason.as_deref().unwrap_or_default().contains("time limit"), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("ended at its time limit of 1 min")), "{events:#?}");
    let line = billed(&acme, id).pop().unwrap();
    assert_eq!(
        (line.cause.as_str(), line.accel_seconds),
        ("time limit", 120),
        "2 GPUs x Slurm's 1 min limit: {line:?}"
    );
    let loud = wait_job(&acme, loud, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!((loud.state, loud.exit_code), (JobState::Failed, Some(137)), "{loud:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{}/events", loud.id)).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("its output passed")), "{events:#?}");
    assert_eq!(billed(&acme, loud.id).len(), 1);
    assert!(logs(&acme, loud.id).contains("[truncated:"));
    let sparse = wait_job(&acme, sparse, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!((sparse.state, sparse.exit_code, sparse.attempts), (JobState::Failed, Some(137), 1), "{sparse:?}");
    assert_eq!(billed(&acme, sparse.id).len(), 1);
    let out = logs(&acme, sparse.id);
    assert!(
        out.contains("working") && out.contains("[truncated:") && out.contains("after"),
        "{}",
        &out[..out.len().min(300)]
    );
    assert!(
        !p.workdir("alpha").join(".agent").read_dir().unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "out")),
        "the output file is removed after the end"
    );
    assert_eq!(held(&acme), 0);
    p.verify();
}

#[test]
fn a_killed_agent_adopts_its_slurm_jobs_and_a_dead_controller_moves_the_work() {
    let c = Clusters::up("faults");
    let mut p = Platform::with_topology("slurm-faults", &network(false), &SHORT);
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    start_slurm_agent(&mut p, &c, "beta", "beta", "Ascend910B=910b");
    let acme = p.org("acme", "alpha");
    // The agent is SIGKILLed while its job runs in Slurm, then restarted:
    // the job is adopted, not run again, not orphaned, billed once.
    let id = submit(&acme, &gpu_job("echo begin $SUANWANG_ATTEMPT; sleep 8; echo end", &["A100"]));
    wait_job(&acme, id, Duration::from_secs(30), |j| logs(&acme, j.id).contains("begin 1"));
    p.kill_agent("alpha");
    std::thread::sleep(Duration::from_secs(1));
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    let done = wait_job(&acme, id, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!((done.state, done.attempts), (JobState::Succeeded, 1), "{done:?}\n{}", agent_log(&p, "alpha"));
    let named = c.jobs("alpha").into_iter().filter(|j| j.1.starts_with(&format!("sw-{id}-"))).count();
    assert_eq!(named, 1, "one Slurm job for the job");
    let out = logs(&acme, id);
    assert_eq!((out.matches("begin 1").count(), out.matches("end").count()), (1, 1), "{out}");
    assert_eq!(billed(&acme, id).len(), 1);

    // The agent dies long enough for the network to run the job elsewhere:
    // its next life finds the abandoned Slurm job, cancels it, and none of
    // what that attempt printed late lands in the job's log.
    let both = ["A100", "Ascend910B"];
    let moved =
        submit(&acme, &gpu_job("echo at $SUANWANG_SITE; for i in $(seq 15); do sleep 1; echo tick $i; done", &both));
    wait_job(&acme, moved, Duration::from_secs(30), |j| {
        j.site.as_deref() == Some("alpha") && logs(&acme, j.id).contains("tick 1")
    });
    p.kill_agent("alpha");
    wait_job(&acme, moved, Duration::from_secs(30), |j| j.attempts == 2);
    std::thread::sleep(Duration::from_secs(3));
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    wait_until("the abandoned Slurm job is cancelled", Duration::from_secs(15), || {
        c.jobs("alpha")
            .iter()
            .all(|j| j.1 != format!("sw-{moved}-1") || !matches!(j.2.as_str(), "RUNNING" | "PENDING"))
            .then_some(())
    });
    let done = wait_job(&acme, moved, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!((done.state, done.site.as_deref()), (JobState::Succeeded, Some("beta")), "{done:?}");
    let out = logs(&acme, moved);
    assert_eq!(out.matches("=== attempt 1 at alpha ===").count(), 1, "{out}");
    // Only the attempt that ran to its end is billed (attempt 2 may itself
    // have been assigned to alpha before the site went down, and a third run).
    assert!(done.attempts >= 2, "{done:?}");
    assert_eq!(billed(&acme, moved).iter().map(|l| l.attempt).collect::<Vec<_>>(), vec![done.attempts]);

    // alpha's controller dies under a running job: the site goes unhealthy
    // with nothing usable, new work goes to beta, and the running job is
    // run again on beta once its lease expires, billed once.
    let running =
        submit(&acme, &gpu_job("echo at $SUANWANG_SITE; for i in $(seq 12); do sleep 1; echo tick $i; done", &both));
    let first = wait_job(&acme, running, Duration::from_secs(30), |j| logs(&acme, j.id).contains("at "));
    assert_eq!(first.site.as_deref(), Some("alpha"), "{first:?}");
    let ctld = c.pid("alpha", "slurmctld");
    // SAFETY: SIGKILL to a daemon this test started.
    unsafe { libc::kill(ctld as i32, libc::SIGKILL) };
    wait_until("alpha unhealthy", Duration::from_secs(10), || {
        let s = site_of(&p, "alpha");
        (s.problem.is_some() && s.pools[0].free == 0).then_some(())
    });
    let fresh = submit(&acme, &gpu_job("echo fresh at $SUANWANG_SITE", &both));
    let fresh = wait_job(&acme, fresh, Duration::from_secs(30), |j| j.state.is_terminal());
    assert_eq!((fresh.state, fresh.site.as_deref()), (JobState::Succeeded, Some("beta")), "{fresh:?}");
    let moved = wait_job(&acme, running, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!(
        (moved.state, moved.site.as_deref(), moved.attempts),
        (JobState::Succeeded, Some("beta"), 2),
        "{moved:?}"
    );
    let lines = billed(&acme, running);
    assert_eq!(lines.iter().map(|l| (l.attempt, l.site.as_str())).collect::<Vec<_>>(), vec![(2, "beta")]);
    // What the abandoned attempt printed after it was given up is not mixed into the log.
    let out = logs(&acme, running);
    assert_eq!(
        (out.matches("=== attempt 1 at alpha ===").count(), out.matches("=== attempt 2 at beta ===").count()),
        (1, 1),
        "{out}"
    );
    // The controller comes back: the abandoned attempt is cancelled there
    // and the site is usable again.
    assert!(c.run("up").status.success());
    wait_until("alpha healthy again", Duration::from_secs(30), || {
        let s = site_of(&p, "alpha");
        (s.problem.is_none() && s.pools[0].usable == 4).then_some(())
    });
    wait_until("the abandoned attempt is not left running", Duration::from_secs(30), || {
        c.jobs("alpha")
            .iter()
            .all(|j| j.1 != format!("sw-{running}-1") || !matches!(j.2.as_str(), "RUNNING" | "PENDING"))
            .then_some(())
    });
    assert_eq!(held(&acme), 0);
    p.verify();
}

#[test]
fn with_slurmdbd_the_end_and_the_bill_come_from_slurm_s_accounting() {
    let c = Clusters::up_with("acct", true);
    let mut p = Platform::with_topology("slurm-acct", &network(false), &SHORT);
    start_slurm_agent(&mut p, &c, "alpha", "alpha", "A100=a100");
    assert!(agent_log(&p, "alpha").contains("accounting sacct"), "{}", agent_log(&p, "alpha"));
    let acme = p.org("acme", "alpha");
    let id = submit(&acme, &gpu_job("echo slurm=$SLURM_JOB_ID; sleep 3; exit 5", &["A100"]));
    let done = wait_job(&acme, id, Duration::from_secs(60), |j| j.state.is_terminal());
    assert_eq!((done.state, done.exit_code), (JobState::Failed, Some(5)), "{done:?}");
    let events: Vec<JobEvent> = acme.get(&format!("/v1/jobs/{id}/events")).unwrap();
    assert!(events.iter().any(|e| e.detail.contains("FAILED (from Slurm's accounting)")), "{events:#?}");
    let out = logs(&acme, id);
    let slurm_id = out.split("slurm=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let record = c.slurm(
        "alpha",
        "sacct",
        &["--noheader", "--parsable2", "--allocations", "--format=ElapsedRaw,AllocTRES", "-j", &slurm_id],
    );
    let (elapsed, tres) = record.split_once('|').unwrap();
    assert!(tres.contains("gres/gpu=2"), "{record}");
    let line = billed(&acme, id).pop().unwrap();
    assert_eq!(line.accel_seconds, 2 * elapsed.parse::<i64>().unwrap().max(1), "{line:?} vs sacct {record}");
    p.verify();
}
