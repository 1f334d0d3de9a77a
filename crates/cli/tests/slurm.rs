//! Real Slurm clusters, started by the project's own script
//! (`scripts/slurm-clusters.sh`), on ports of this test run only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Two clusters of this test process, torn down when dropped.
pub struct Clusters {
    pub dir: PathBuf,
    specs: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm-clusters.sh")
}

impl Clusters {
    /// Two clusters: `alpha` (4 a100 on 127.0.0.1) and `beta` (4 910b on 127.0.0.2).
    pub fn up(name: &str) -> Clusters {
        let dir = std::env::temp_dir().join(format!("suanwang-slurm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Ports of this process and of this set of clusters, so that
        // parallel tests and test runs do not meet.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = 20_000 + (std::process::id() % 1_000) * 40 + (n % 2) * 20;
        let specs = format!("alpha:127.0.0.1:{}:a100:4 beta:127.0.0.2:{}:910b:4", base, base + 10);
        let c = Clusters { dir, specs };
        let o = c.run("up");
        assert!(
            o.status.success(),
            "slurm-clusters up: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        c
    }

    fn run(&self, action: &str) -> std::process::Output {
        Command::new("bash")
            .arg(script())
            .arg(action)
            .arg(&self.dir)
            .env("SUANWANG_SLURM_CLUSTERS", &self.specs)
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

#[test]
fn the_agent_s_slurm_client_submits_reads_cancels_and_sees_drained_capacity() {
    use suanwang_agent::slurm::{Cluster, Ending, Exit, Submission};
    let c = Clusters::up("client");
    let alpha = Cluster::new(c.conf("alpha"));
    let work = c.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let submission = |name: &str, script: &str, time_limit_s: u64| Submission {
        name: name.into(),
        comment: format!("suanwang {name}"),
        gres: Some("gpu:a100:2".into()),
        time_limit_s,
        cpus: Some(2),
        memory_mb: Some(256),
        partition: None,
        account: None,
        workdir: work.clone(),
        output: work.join(format!("{name}.out")),
        error: work.join(format!("{name}.err")),
        env: [("SUANWANG_JOB".to_string(), "7".to_string())].into(),
        script: script.into(),
    };
    // Nothing of the submitting process's environment reaches the job
    // (cargo gives this test's process CARGO_MANIFEST_DIR, as the agent's
    // would have its own variables).
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    let id = alpha
        .submit(&submission("sw-7-1", "#!/bin/sh\necho \"job=$SUANWANG_JOB leak=$CARGO_MANIFEST_DIR\"\nexit 3\n", 60))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let j = alpha.job(id).unwrap().expect("the controller knows its job");
        if !j.is_active() {
            break j;
        }
        assert!(Instant::now() < deadline, "{j:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((done.name.as_str(), done.comment.as_str(), done.gpus), ("sw-7-1", "suanwang sw-7-1", 2), "{done:?}");
    assert_eq!((done.ended, done.ending()), (Some(Exit::Code(3)), Some(Ending::Job)), "{done:?}");
    let out = std::fs::read_to_string(work.join("sw-7-1.out")).unwrap();
    assert_eq!(out.trim(), "job=7 leak=", "the submitter's environment reached the job");
    // Cancel: gone from the running jobs at once.
    let id = alpha.submit(&submission("sw-8-1", "#!/bin/sh\nsleep 300\n", 600)).unwrap();
    while alpha.job(id).unwrap().is_some_and(|j| j.state == "PENDING") {
        std::thread::sleep(Duration::from_millis(50));
    }
    let asked = Instant::now();
    alpha.cancel(id).unwrap();
    while alpha.job(id).unwrap().is_some_and(|j| j.is_active()) {
        assert!(asked.elapsed() < Duration::from_secs(2), "still running 2 s after scancel");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(alpha.job(id).unwrap().unwrap().ending(), Some(Ending::Cancelled));
    // Capacity: a drained node counts for nothing, a resumed one again.
    assert_eq!(alpha.capacity().unwrap().get("a100"), Some(&4));
    c.slurm("alpha", "scontrol", &["update", "nodename=alpha1", "state=drain", "reason=test"]);
    assert_eq!(alpha.capacity().unwrap().get("a100"), None);
    c.slurm("alpha", "scontrol", &["update", "nodename=alpha1", "state=resume"]);
    let resumed = Instant::now();
    while alpha.capacity().unwrap().get("a100") != Some(&4) {
        assert!(resumed.elapsed() < Duration::from_secs(5), "{:?}", alpha.nodes().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The other cluster has its own type.
    assert_eq!(Cluster::new(c.conf("beta")).capacity().unwrap().get("910b"), Some(&4));
}
