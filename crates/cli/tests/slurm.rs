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
        // Ports of this process, so that parallel test runs do not meet.
        let base = 20_000 + (std::process::id() % 2_000) * 20;
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
