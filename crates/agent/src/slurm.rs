//! A Slurm cluster as the agent sees it: its command-line tools (`sbatch`,
//! `squeue`, `scancel`, `scontrol`) pointed at one `slurm.conf`.
//!
//! This is the ground the agent's `slurm` backend stands on: submitting an
//! attempt as one batch job whose environment is only the job's own (the
//! tools run with a cleared environment and `--export=ALL`, so nothing of
//! the agent's reaches the job), reading jobs back with their state, exit
//! code and allocated GPUs, cancelling them, and reading the cluster's
//! capacity from its nodes (drained, down or failed nodes count for
//! nothing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What went wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("{tool}: cannot run it: {source}")]
    Spawn { tool: &'static str, source: std::io::Error },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: &'static str, stderr: String },
    #[error("{tool} answered what this agent cannot read: {problem}")]
    Unreadable { tool: &'static str, problem: String },
}

/// One batch job to submit: an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// Slurm's job name: it identifies job and attempt (`sw-JOB-ATTEMPT`).
    pub name: String,
    pub comment: String,
    /// GPUs as Slurm's GRES (`gpu:a100:2`), if any.
    pub gres: Option<String>,
    pub time_limit_s: u64,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub workdir: PathBuf,
    pub output: PathBuf,
    pub error: PathBuf,
    /// The job's whole environment: nothing else reaches it.
    pub env: BTreeMap<String, String>,
    /// The batch script (with its `#!` line).
    pub script: String,
}

/// A job as `squeue --json --states=all` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    pub id: u64,
    pub name: String,
    pub comment: String,
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `TIMEOUT`, `CANCELLED`, `NODE_FAIL`, ...
    pub state: String,
    /// How the batch script ended, once it ended: its exit code, or the
    /// signal that killed it.
    pub ended: Option<Exit>,
    pub start_time: i64,
    pub end_time: i64,
    /// GPUs the job holds on its node (from its GRES request).
    pub gpus: u32,
}

/// A finished batch script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Whose fault an ended Slurm job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The job's own doing: its exit (0 or not), or its time limit.
    Job,
    /// The cluster's: a node failure, preemption, a boot failure, a cancel
    /// by the cluster's administrator: retried elsewhere, not billed.
    Infrastructure,
    /// Cancelled (by the agent, or by an administrator: the agent knows
    /// which it asked for).
    Cancelled,
}

impl SlurmJob {
    /// Still queued or running?
    pub fn is_active(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
        )
    }

    /// How an ended job ended, by its fault; `None` while it is active.
    pub fn ending(&self) -> Option<Ending> {
        if self.is_active() {
            return None;
        }
        Some(match self.state.as_str() {
            "COMPLETED" | "FAILED" | "TIMEOUT" | "OUT_OF_MEMORY" => Ending::Job,
            "CANCELLED" => Ending::Cancelled,
            _ => Ending::Infrastructure,
        })
    }
}

/// A node and what it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Slurm's state words (`IDLE`, `MIXED`, `ALLOCATED`, `DRAIN`, `DOWN`, ...).
    pub state: Vec<String>,
    /// GPUs by type (`a100` -> 4).
    pub gpus: BTreeMap<String, u32>,
}

impl Node {
    /// Can it take work now? Not while drained, draining, down, failed,
    /// in maintenance or not responding.
    pub fn usable(&self) -> bool {
        !self.state.iter().any(|s| {
            matches!(
                s.as_str(),
                "DRAIN"
                    | "DRAINING"
                    | "DRAINED"
                    | "DOWN"
                    | "FAIL"
                    | "FAILING"
                    | "MAINT"
                    | "NOT_RESPONDING"
                    | "FUTURE"
                    | "INVAL"
                    | "UNKNOWN"
            )
        })
    }
}

/// One cluster, by its configuration file.
#[derive(Debug, Clone)]
pub struct Cluster {
    conf: PathBuf,
}

impl Cluster {
    pub fn new(conf: impl AsRef<Path>) -> Cluster {
        Cluster { conf: conf.as_ref().to_path_buf() }
    }

    /// A Slurm tool with nothing of the agent's environment but the
    /// cluster's configuration and a plain `PATH`.
    fn tool(&self, tool: &'static str) -> Command {
        let mut c = Command::new(tool);
        c.env_clear().env("SLURM_CONF", &self.conf).env("PATH", "/usr/local/bin:/usr/bin:/bin");
        c
    }

    fn run(&self, tool: &'static str, mut command: Command) -> Result<String, SlurmError> {
        let out = command.output().map_err(|source| SlurmError::Spawn { tool, source })?;
        if !out.status.success() {
            return Err(SlurmError::Failed { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Submits one batch job; returns its id.
    pub fn submit(&self, s: &Submission) -> Result<u64, SlurmError> {
        let mut c = self.tool("sbatch");
        // The job's environment is exactly what sbatch runs with: only the
        // job's own variables (over the cleared one `tool` made).
        c.envs(&s.env);
        c.arg("--parsable")
            .arg("--export=ALL")
            .arg(format!("--job-name={}", s.name))
            .arg(format!("--comment={}", s.comment))
            .arg(format!("--time={}", s.time_limit_s.div_ceil(60).max(1)))
            .arg("--nodes=1")
            .arg("--ntasks=1")
            .arg("--chdir")
            .arg(&s.workdir)
            .arg("--output")
            .arg(&s.output)
            .arg("--error")
            .arg(&s.error);
        if let Some(gres) = &s.gres {
            c.arg(format!("--gres={gres}"));
        }
        if let Some(cpus) = s.cpus {
            c.arg(format!("--cpus-per-task={cpus}"));
        }
        if let Some(mb) = s.memory_mb {
            c.arg(format!("--mem={mb}M"));
        }
        if let Some(p) = &s.partition {
            c.arg(format!("--partition={p}"));
        }
        if let Some(a) = &s.account {
            c.arg(format!("--account={a}"));
        }
        let script = s.workdir.join(format!("{}.sbatch", s.name));
        std::fs::write(&script, &s.script).map_err(|source| SlurmError::Spawn { tool: "sbatch", source })?;
        c.arg(&script);
        let out = self.run("sbatch", c)?;
        // `--parsable`: `ID` or `ID;CLUSTER`.
        let id = out.trim().split(';').next().unwrap_or_default();
        id.parse().map_err(|_| SlurmError::Unreadable {
            tool: "sbatch",
            problem: format!("'{}' is not a job id", out.trim()),
        })
    }

    /// Every job the controller still knows (finished ones for `MinJobAge`).
    pub fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError> {
        let mut c = self.tool("squeue");
        c.args(["--json", "--states=all"]);
        let text = self.run("squeue", c)?;
        let unreadable = |problem: String| SlurmError::Unreadable { tool: "squeue", problem };
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
        let jobs = doc["jobs"].as_array().ok_or_else(|| unreadable("no jobs list".into()))?;
        jobs.iter().map(|j| read_job(j).ok_or_else(|| unreadable(format!("a job without its fields: {j}")))).collect()
    }

    /// One job, if the controller still knows it.
    pub fn job(&self, id: u64) -> Result<Option<SlurmJob>, SlurmError> {
        Ok(self.jobs()?.into_iter().find(|j| j.id == id))
    }

    /// Cancels a job (the whole batch job, all its steps).
    pub fn cancel(&self, id: u64) -> Result<(), SlurmError> {
        let mut c = self.tool("scancel");
        c.arg(id.to_string());
        self.run("scancel", c).map(drop)
    }

    /// The cluster's nodes.
    pub fn nodes(&self) -> Result<Vec<Node>, SlurmError> {
        let mut c = self.tool("scontrol");
        c.args(["show", "nodes", "--oneliner"]);
        let text = self.run("scontrol", c)?;
        Ok(text.lines().filter(|l| l.starts_with("NodeName=")).map(read_node).collect())
    }

    /// GPUs by type, on nodes that can take work now.
    pub fn capacity(&self) -> Result<BTreeMap<String, u32>, SlurmError> {
        let mut total = BTreeMap::new();
        for node in self.nodes()?.into_iter().filter(Node::usable) {
            for (gpu, n) in node.gpus {
                *total.entry(gpu).or_insert(0) += n;
            }
        }
        Ok(total)
    }
}

fn read_job(j: &serde_json::Value) -> Option<SlurmJob> {
    let state = j["job_state"].as_str()?.to_string();
    let active = !matches!(
        state.as_str(),
        "COMPLETED"
            | "FAILED"
            | "TIMEOUT"
            | "CANCELLED"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "OUT_OF_MEMORY"
    );
    // A wait status, as waitpid gives it: 768 is exit 3.
    let raw = j["exit_code"].as_i64().unwrap_or(0) as i32;
    let ended =
        (!active).then_some(if raw & 0x7f != 0 { Exit::Signal(raw & 0x7f) } else { Exit::Code((raw >> 8) & 0xff) });
    Some(SlurmJob {
        id: j["job_id"].as_u64()?,
        name: j["name"].as_str().unwrap_or_default().to_string(),
        comment: j["comment"].as_str().unwrap_or_default().to_string(),
        state,
        ended,
        start_time: j["start_time"].as_i64().unwrap_or(0),
        end_time: j["end_time"].as_i64().unwrap_or(0),
        gpus: gpus_of(j["tres_per_node"].as_str().unwrap_or_default()),
    })
}

/// GPUs in a GRES or TRES request: `gres:gpu:a100:2`, `gpu:2`, `gres/gpu=2`.
fn gpus_of(request: &str) -> u32 {
    request
        .split(',')
        .filter_map(|item| {
            let item = item.trim_start_matches("gres:").trim_start_matches("gres/");
            if !item.starts_with("gpu") {
                return None;
            }
            item.rsplit([':', '=']).next()?.parse::<u32>().ok()
        })
        .sum()
}

fn read_node(line: &str) -> Node {
    let field = |key: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('='))).unwrap_or_default()
    };
    let mut gpus = BTreeMap::new();
    // `Gres=gpu:a100:4(S:0)` or `gpu:a100:4,gpu:v100:2`.
    for item in field("Gres").split(',') {
        let item = item.split('(').next().unwrap_or_default();
        let parts: Vec<&str> = item.split(':').collect();
        match parts.as_slice() {
            ["gpu", t, n] => {
                if let Ok(n) = n.parse::<u32>() {
                    *gpus.entry(t.to_string()).or_insert(0) += n;
                }
            }
            ["gpu", n] => {
                if let Ok(n) = n.parse::<u32>() {
                    *gpus.entry("gpu".to_string()).or_insert(0) += n;
                }
            }
            _ => {}
        }
    }
    Node {
        name: field("NodeName").to_string(),
        state: field("State").split('+').map(str::to_string).filter(|s| !s.is_empty()).collect(),
        gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_and_requests_as_slurm_writes_them() {
        let node = read_node("NodeName=alpha1 Arch=x86_64 Gres=gpu:a100:4(S:0) State=IDLE+DRAIN ThreadsPerCore=1");
        assert_eq!(node.name, "alpha1");
        assert_eq!(node.state, vec!["IDLE", "DRAIN"]);
        assert_eq!(node.gpus.get("a100"), Some(&4));
        assert!(!node.usable());
        assert!(read_node("NodeName=b State=MIXED Gres=gpu:910b:2,gpu:a100:1").usable());
        assert_eq!((gpus_of("gres:gpu:a100:2"), gpus_of("gpu:3"), gpus_of("gres/gpu=2"), gpus_of("")), (2, 3, 2, 0));
        let ended = |state: &str, raw: i64| {
            read_job(&serde_json::json!({"job_id": 1, "job_state": state, "exit_code": raw})).unwrap()
        };
        assert_eq!(ended("FAILED", 768).ended, Some(Exit::Code(3)));
        assert_eq!(ended("CANCELLED", 15).ended, Some(Exit::Signal(15)));
        assert_eq!(ended("RUNNING", 0).ended, None);
        assert_eq!(ended("NODE_FAIL", 0).ending(), Some(Ending::Infrastructure));
        assert_eq!(ended("TIMEOUT", 0).ending(), Some(Ending::Job));
    }
}
