//! A Slurm cluster as the agent sees it: its command-line tools (`sbatch`,
//! `squeue`, `scontrol`, `sacct`, `scancel`) pointed at one `slurm.conf`.
//!
//! Every tool runs with a cleared environment (the cluster's configuration
//! and a fixed `PATH` only) and by its full path, so nothing of the agent's
//! or a tenant's environment can steer it. The batch script goes to
//! `sbatch` on its standard input and holds only what the agent wrote: no
//! tenant text and no secret (see [`crate::slurm_site`] for how the job's
//! command and variables reach it).
//!
//! How an ended job ended comes from accounting (`sacct`) when the cluster
//! keeps it, else from the controller (`scontrol show job`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

impl SlurmError {
    /// Did the tool fail because the controller did not answer?
    pub fn is_unreachable(&self) -> bool {
        match self {
            SlurmError::Failed { stderr, .. } => {
                let s = stderr.to_ascii_lowercase();
                s.contains("unable to contact slurm controller")
                    || s.contains("connection refused")
                    || s.contains("socket timed out")
                    || s.contains("communication connection failure")
                    || s.contains("zero bytes were transmitted or received")
                    || s.contains("slurm_load_jobs error: unable to contact")
                    || s.contains("timed out")
            }
            SlurmError::Spawn { .. } | SlurmError::Unreadable { .. } => false,
        }
    }
}

/// One batch job to submit: an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// Slurm's job name: it identifies job and attempt (`sw-JOB-ATTEMPT`).
    pub name: String,
    /// Identifies the agent instance that owns the job (for adoption and sweeps).
    pub comment: String,
    /// GPUs as Slurm's GRES (`gpu:a100:2`), if any.
    pub gres: Option<String>,
    pub time_limit_s: u64,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub workdir: PathBuf,
    /// Standard output and error, together.
    pub output: PathBuf,
    /// The batch script (with its `#!` line): written by the agent only.
    pub script: String,
}

/// A job as the queue lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `TIMEOUT`, `CANCELLED`, `NODE_FAIL`, ...
    pub state: String,
    /// Why it is pending (`Resources`, `Priority`, `PartitionConfig`, ...).
    pub reason: String,
    pub name: String,
    pub comment: String,
}

/// Is a job in this state still queued or running?
pub fn is_active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
            | "RESV_DEL_HOLD"
            | "SPECIAL_EXIT"
    )
}

/// Reasons a pending job never starts without someone changing the
/// cluster or the request: the request does not fit what the partition allows.
pub fn is_hopeless_reason(reason: &str) -> bool {
    matches!(reason, "PartitionConfig" | "PartitionTimeLimit" | "PartitionNodeLimit" | "BadConstraints" | "InvalidQOS")
}

/// Reasons a pending job waits for nodes that are drained, down or
/// reserved: the site cannot run it now, though another could.
pub fn is_unavailable_reason(reason: &str) -> bool {
    reason.starts_with("ReqNodeNotAvail") || reason.starts_with("NodeDown") || reason.contains("DOWN, DRAINED")
}

/// How a finished batch script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// An ended job as the cluster recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub state: String,
    pub exit: Exit,
    /// Seconds it ran, as Slurm measured.
    pub elapsed_s: u64,
    /// GPUs it was allocated.
    pub gpus: u32,
    /// Where this came from: `accounting` (sacct) or `controller` (scontrol).
    pub source: &'static str,
}

/// Whose fault an ended Slurm job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The job's own doing: its exit (0 or not).
    Exited,
    /// Killed at its time limit.
    TimeLimit,
    /// Killed over its memory.
    Memory,
    /// Cancelled (by the agent, or by an administrator: the agent knows
    /// which it asked for).
    Cancelled,
    /// The cluster's: a node failure, preemption, a boot failure, a
    /// requeue: retried elsewhere, not billed.
    Infrastructure,
}

impl Ended {
    pub fn ending(&self) -> Ending {
        match self.state.split_whitespace().next().unwrap_or_default() {
            "COMPLETED" | "FAILED" => Ending::Exited,
            "TIMEOUT" => Ending::TimeLimit,
            "OUT_OF_MEMORY" => Ending::Memory,
            "CANCELLED" => Ending::Cancelled,
            _ => Ending::Infrastructure,
        }
    }
}

/// A node and what it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Slurm's state words (`IDLE`, `MIXED`, `ALLOCATED`, `DRAIN`, `DOWN`, ...).
    pub state: Vec<String>,
    /// GPUs by GRES type (`a100` -> 4; untyped GPUs under `gpu`).
    pub gpus: BTreeMap<String, u32>,
}

/// Why a node cannot take work now, if it cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Drained,
    Down,
    Reserved,
}

impl Node {
    /// Can it take work now? Not while drained, down, failed, in
    /// maintenance, reserved, or not responding.
    pub fn unusable(&self) -> Option<Unusable> {
        let has = |words: &[&str]| self.state.iter().any(|s| words.contains(&s.as_str()));
        if has(&["DOWN", "FAIL", "FAILING", "NOT_RESPONDING", "FUTURE", "INVAL", "UNKNOWN", "POWERED_DOWN"]) {
            Some(Unusable::Down)
        } else if has(&["DRAIN", "DRAINING", "DRAINED"]) {
            Some(Unusable::Drained)
        } else if has(&["MAINT", "RESERVED"]) {
            Some(Unusable::Reserved)
        } else {
            None
        }
    }
}

/// GPUs of one GRES type across the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub total: u32,
    pub usable: u32,
    pub drained: u32,
    pub down: u32,
    pub reserved: u32,
}

/// One cluster, by its configuration file.
#[derive(Debug, Clone)]
pub struct Cluster {
    conf: PathBuf,
}

/// A query the controller does not answer within this is taken as an
/// outage (Slurm's own retries would take a minute).
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// `sbatch` may wait on a busy controller a little longer.
const SUBMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs a tool to its end or until `limit` (then kills it), with `input`
/// on its standard input.
fn run_within(
    tool: &'static str,
    mut command: Command,
    input: Option<&[u8]>,
    limit: std::time::Duration,
) -> Result<std::process::Output, SlurmError> {
    command.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| SlurmError::Spawn { tool, source })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error shows as the tool's own failure below.
        let _ = stdin.write_all(input);
    }
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait().map_err(|source| SlurmError::Spawn { tool, source })? {
            Some(status) => break status,
            None if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SlurmError::Failed {
                    tool,
                    stderr: format!("no answer within {} s: timed out", limit.as_secs()),
                });
            }
            None => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Where the tools are: by full path, never looked up in a `PATH`.
fn tool_path(tool: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/bin").join(tool)
}

impl Cluster {
    pub fn new(conf: impl AsRef<Path>) -> Cluster {
        Cluster { conf: conf.as_ref().to_path_buf() }
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// A Slurm tool with nothing of the agent's environment but the
    /// cluster's configuration and a plain `PATH` (which is all a job's
    /// batch script inherits from `sbatch`).
    fn tool(&self, tool: &'static str) -> Command {
        let mut c = Command::new(tool_path(tool));
        c.env_clear().env("SLURM_CONF", &self.conf).env("PATH", "/usr/local/bin:/usr/bin:/bin").env("LANG", "C");
        c
    }

    fn run(&self, tool: &'static str, command: Command) -> Result<String, SlurmError> {
        let out = run_within(tool, command, None, TOOL_TIMEOUT)?;
        if !out.status.success() {
            return Err(SlurmError::Failed { tool, stderr: one_line(&String::from_utf8_lossy(&out.stderr)) });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The `sbatch` arguments of a submission (the script goes on stdin).
    pub fn sbatch_args(s: &Submission) -> Vec<String> {
        let mut args = vec![
            "--parsable".to_string(),
            // The network retries elsewhere; Slurm must not run it twice.
            "--no-requeue".into(),
            "--open-mode=append".into(),
            "--export=ALL".into(),
            format!("--job-name={}", s.name),
            format!("--comment={}", s.comment),
            format!("--time={}", s.time_limit_s.div_ceil(60).max(1)),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            format!("--chdir={}", s.workdir.display()),
            format!("--output={}", s.output.display()),
            format!("--error={}", s.output.display()),
        ];
        if let Some(gres) = &s.gres {
            args.push(format!("--gres={gres}"));
        }
        if let Some(cpus) = s.cpus {
            args.push(format!("--cpus-per-task={cpus}"));
        }
        if let Some(mb) = s.memory_mb {
            args.push(format!("--mem={mb}M"));
        }
        if let Some(p) = &s.partition {
            args.push(format!("--partition={p}"));
        }
        if let Some(a) = &s.account {
            args.push(format!("--account={a}"));
        }
        args
    }

    /// Submits one batch job; returns its id.
    pub fn submit(&self, s: &Submission) -> Result<u64, SlurmError> {
        let mut c = self.tool("sbatch");
        c.args(Self::sbatch_args(s));
        let out = run_within("sbatch", c, Some(s.script.as_bytes()), SUBMIT_TIMEOUT)?;
        if !out.status.success() {
            return Err(SlurmError::Failed { tool: "sbatch", stderr: one_line(&String::from_utf8_lossy(&out.stderr)) });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // `--parsable`: `ID` or `ID;CLUSTER`.
        let id = text.trim().split(';').next().unwrap_or_default();
        id.parse().map_err(|_| SlurmError::Unreadable {
            tool: "sbatch",
            problem: format!("'{}' is not a job id", text.trim()),
        })
    }

    /// Every job of this agent's user the controller knows (ended ones for
    /// `MinJobAge`). Only this user's: another user's job may carry any
    /// text, line breaks included, in its name or comment, and must not be
    /// able to forge a line of ours.
    pub fn queue(&self) -> Result<Vec<Queued>, SlurmError> {
        let mut c = self.tool("squeue");
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        c.args(["--noheader", "--states=all", &format!("--user={uid}"), "--format=%i|%T|%r|%j|%k"]);
        read_queue(&self.run("squeue", c)?)
    }

    /// Cancels a job (the whole batch job, all its steps).
    pub fn cancel(&self, id: u64) -> Result<(), SlurmError> {
        let mut c = self.tool("scancel");
        c.arg(id.to_string());
        self.run("scancel", c).map(drop)
    }

    /// Does the cluster keep accounting (`sacct` works)?
    pub fn accounting(&self) -> Result<bool, SlurmError> {
        let mut c = self.tool("scontrol");
        c.args(["show", "config"]);
        let text = self.run("scontrol", c)?;
        Ok(text.lines().any(|l| {
            let mut kv = l.splitn(2, '=');
            kv.next().is_some_and(|k| k.trim() == "AccountingStorageType")
                && kv.next().is_some_and(|v| v.trim() == "accounting_storage/slurmdbd")
        }))
    }

    /// How an ended job ended, from accounting. `None` until the record
    /// is complete (slurmdbd learns of the end a moment after the controller).
    pub fn ended_from_accounting(&self, id: u64) -> Result<Option<Ended>, SlurmError> {
        let mut c = self.tool("sacct");
        c.args([
            "--noheader",
            "--parsable2",
            "--allocations",
            "--format=JobID,State,ExitCode,ElapsedRaw,AllocTRES",
            "-j",
        ])
        .arg(id.to_string());
        let text = self.run("sacct", c)?;
        Ok(text.lines().find_map(|l| read_sacct(l, id)))
    }

    /// How an ended job ended, from the controller's record.
    pub fn ended_from_controller(&self, id: u64) -> Result<Option<Ended>, SlurmError> {
        let mut c = self.tool("scontrol");
        c.args(["show", "job", "--oneliner"]).arg(id.to_string());
        match self.run("scontrol", c) {
            Ok(text) => Ok(text.lines().find_map(read_scontrol_job)),
            Err(SlurmError::Failed { stderr, .. }) if stderr.contains("Invalid job id") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The cluster's nodes.
    pub fn nodes(&self) -> Result<Vec<Node>, SlurmError> {
        let mut c = self.tool("scontrol");
        c.args(["show", "nodes", "--oneliner"]);
        let text = self.run("scontrol", c)?;
        Ok(text.lines().filter(|l| l.starts_with("NodeName=")).map(read_node).collect())
    }

    /// Partitions by name.
    pub fn partitions(&self) -> Result<Vec<String>, SlurmError> {
        let mut c = self.tool("scontrol");
        c.args(["show", "partitions", "--oneliner"]);
        let text = self.run("scontrol", c)?;
        Ok(text.lines().filter_map(|l| field(l, "PartitionName").map(str::to_string)).collect())
    }

    /// GPUs by GRES type: in all, usable now, and what is out and why.
    pub fn capacity(&self) -> Result<BTreeMap<String, Capacity>, SlurmError> {
        let mut total: BTreeMap<String, Capacity> = BTreeMap::new();
        for node in self.nodes()? {
            let out = node.unusable();
            for (gpu, n) in node.gpus {
                let c = total.entry(gpu).or_default();
                c.total += n;
                match out {
                    None => c.usable += n,
                    Some(Unusable::Drained) => c.drained += n,
                    Some(Unusable::Down) => c.down += n,
                    Some(Unusable::Reserved) => c.reserved += n,
                }
            }
        }
        Ok(total)
    }
}

/// A tool's error on one line, at most 500 characters.
fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    joined.chars().take(500).collect()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// The queue's lines; a job listed twice means the listing cannot be
/// trusted (a forged line), and none of it is used.
fn read_queue(text: &str) -> Result<Vec<Queued>, SlurmError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut jobs = Vec::new();
    for q in text.lines().filter_map(read_queued) {
        if !seen.insert(q.id) {
            return Err(SlurmError::Unreadable { tool: "squeue", problem: format!("job {} is listed twice", q.id) });
        }
        jobs.push(q);
    }
    Ok(jobs)
}

fn read_queued(line: &str) -> Option<Queued> {
    let mut parts = line.trim_start().splitn(5, '|');
    let id = parts.next()?.trim().parse().ok()?;
    Some(Queued {
        id,
        state: parts.next()?.trim().to_string(),
        reason: parts.next()?.trim().to_string(),
        name: parts.next()?.trim().to_string(),
        comment: parts.next().unwrap_or_default().trim().to_string(),
    })
}

/// `a:b`: exit code `a`, or death by signal `b`.
fn read_exit(text: &str) -> Exit {
    let mut parts = text.split(':');
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let signal = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if signal != 0 { Exit::Signal(signal) } else { Exit::Code(code) }
}

/// `[D-]HH:MM:SS`, `MM:SS`.
fn read_duration(text: &str) -> Option<u64> {
    let (days, rest) = match text.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, text),
    };
    let parts: Vec<u64> = rest.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let s = match parts.as_slice() {
        [h, m, s] => h * 3600 + m * 60 + s,
        [m, s] => m * 60 + s,
        [s] => *s,
        _ => return None,
    };
    Some(days * 86_400 + s)
}

/// A GPU count as Slurm prints it: `2`, `1K`, `1M`.
fn read_count(text: &str) -> Option<u32> {
    let (digits, scale) = match text.chars().last()? {
        'K' | 'k' => (&text[..text.len() - 1], 1024),
        'M' | 'm' => (&text[..text.len() - 1], 1024 * 1024),
        _ => (text, 1),
    };
    digits.parse::<u32>().ok()?.checked_mul(scale)
}

/// GPUs in a TRES or GRES list: `gres/gpu=2`, `gres/gpu:a100=2`,
/// `gres:gpu:a100:2`, `gpu:2`. Typed and untyped entries of one request
/// name the same GPUs: the untyped total wins when both are there.
pub fn gpus_of(list: &str) -> u32 {
    let mut untyped = None;
    let mut typed = 0u32;
    for item in list.split(',') {
        let item = item.trim().trim_start_matches("gres:").trim_start_matches("gres/");
        let Some(rest) = item.strip_prefix("gpu") else { continue };
        if let Some(n) = rest.strip_prefix('=') {
            untyped = read_count(n);
        } else if let Some(r) = rest.strip_prefix(':') {
            let n = r.rsplit([':', '=']).next().and_then(read_count).unwrap_or(0);
            if r.contains([':', '=']) {
                typed = typed.saturating_add(n);
            } else {
                untyped = Some(n);
            }
        }
    }
    untyped.unwrap_or(typed)
}

fn read_sacct(line: &str, id: u64) -> Option<Ended> {
    let f: Vec<&str> = line.split('|').collect();
    let [job, state, exit, elapsed, tres] = f.as_slice() else { return None };
    if job.trim() != id.to_string() || is_active(state.split_whitespace().next().unwrap_or_default()) {
        return None;
    }
    Some(Ended {
        state: state.to_string(),
        exit: read_exit(exit),
        elapsed_s: elapsed.parse().ok()?,
        gpus: gpus_of(tres),
        source: "accounting",
    })
}

fn read_scontrol_job(line: &str) -> Option<Ended> {
    let state = field(line, "JobState")?;
    if is_active(state) {
        return None;
    }
    // Allocated TRES when the cluster counts GPUs as TRES; else the request.
    let gpus = ["AllocTRES", "TRES", "TresPerNode", "TresPerJob", "Gres"]
        .iter()
        .filter_map(|k| field(line, k))
        .map(gpus_of)
        .find(|&g| g > 0)
        .unwrap_or(0);
    Some(Ended {
        state: state.to_string(),
        exit: read_exit(field(line, "ExitCode").unwrap_or("0:0")),
        elapsed_s: field(line, "RunTime").and_then(read_duration).unwrap_or(0),
        gpus,
        source: "controller",
    })
}

fn read_node(line: &str) -> Node {
    let mut gpus = BTreeMap::new();
    // `Gres=gpu:a100:4(S:0)` or `gpu:a100:4,gpu:v100:2` or `gpu:2`.
    for item in field(line, "Gres").unwrap_or_default().split(',') {
        let item = item.split('(').next().unwrap_or_default();
        let parts: Vec<&str> = item.split(':').collect();
        let (kind, n) = match parts.as_slice() {
            ["gpu", t, n] => (t.to_string(), n),
            ["gpu", n] => ("gpu".to_string(), n),
            _ => continue,
        };
        if let Some(n) = read_count(n) {
            *gpus.entry(kind).or_insert(0) += n;
        }
    }
    Node {
        name: field(line, "NodeName").unwrap_or_default().to_string(),
        state: field(line, "State")
            .unwrap_or_default()
            .split('+')
            .map(str::to_string)
            .filter(|s| !s.is_empty())
            .collect(),
        gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_as_slurm_writes_them() {
        let node = read_node("NodeName=alpha1 Arch=x86_64 Gres=gpu:a100:4(S:0) State=IDLE+DRAIN ThreadsPerCore=1");
        assert_eq!(node.name, "alpha1");
        assert_eq!(node.state, vec!["IDLE", "DRAIN"]);
        assert_eq!(node.gpus.get("a100"), Some(&4));
        assert_eq!(node.unusable(), Some(Unusable::Drained));
        assert_eq!(read_node("NodeName=b State=MIXED Gres=gpu:910b:2,gpu:a100:1").unusable(), None);
        assert_eq!(read_node("NodeName=b State=DOWN+DRAIN+NOT_RESPONDING Gres=gpu:2").unusable(), Some(Unusable::Down));
        assert_eq!(read_node("NodeName=b State=IDLE+RESERVED Gres=gpu:a100:1K").gpus.get("a100"), Some(&1024));
    }

    #[test]
    fn gpu_counts_in_every_form_slurm_prints() {
        assert_eq!(gpus_of("gres:gpu:a100:2"), 2);
        assert_eq!(gpus_of("gpu:3"), 3);
        assert_eq!(gpus_of("gres/gpu=2"), 2);
        assert_eq!(gpus_of("billing=1,cpu=1,gres/gpu=2,gres/gpu:a100=2,mem=1G,node=1"), 2);
        assert_eq!(gpus_of("cpu=1,mem=100M,node=1,billing=1"), 0);
        assert_eq!(gpus_of("gres:gpu:a100:1K"), 1024);
        assert_eq!(gpus_of(""), 0);
    }

    #[test]
    fn ends_as_the_controller_and_accounting_record_them() {
        let e = read_scontrol_job(
            "JobId=7 JobName=sw-1-1 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 RunTime=00:01:05 TimeLimit=00:02:00 TresPerNode=gres:gpu:a100:2",
        )
        .unwrap();
        assert_eq!((e.exit, e.elapsed_s, e.gpus, e.ending()), (Exit::Code(3), 65, 2, Ending::Exited));
        let e = read_scontrol_job("JobId=7 JobState=CANCELLED ExitCode=0:15 RunTime=1-00:00:01").unwrap();
        assert_eq!((e.exit, e.elapsed_s, e.ending()), (Exit::Signal(15), 86_401, Ending::Cancelled));
        assert!(read_scontrol_job("JobId=7 JobState=RUNNING ExitCode=0:0").is_none());
        assert_eq!(
            read_scontrol_job("JobId=7 JobState=NODE_FAIL ExitCode=0:0").unwrap().ending(),
            Ending::Infrastructure
        );
        assert_eq!(read_scontrol_job("JobId=7 JobState=TIMEOUT ExitCode=0:0").unwrap().ending(), Ending::TimeLimit);
        let e = read_sacct("12|CANCELLED by 0|0:15|61|billing=2,cpu=2,gres/gpu=2,mem=200M,node=1", 12).unwrap();
        assert_eq!((e.elapsed_s, e.gpus, e.ending(), e.source), (61, 2, Ending::Cancelled, "accounting"));
        assert!(read_sacct("12|RUNNING|0:0|61|", 12).is_none());
        assert!(read_sacct("12.batch|COMPLETED|0:0|61|", 12).is_none());
    }

    #[test]
    fn queue_lines_keep_a_comment_with_bars_whole() {
        let q = read_queued("  42|PENDING|PartitionConfig|sw-3-1|suanwang a|b|c").unwrap();
        assert_eq!(
            (q.id, q.state.as_str(), q.reason.as_str(), q.comment.as_str()),
            (42, "PENDING", "PartitionConfig", "suanwang a|b|c")
        );
        assert!(is_hopeless_reason(&q.reason) && is_active(&q.state));
        assert!(is_unavailable_reason("ReqNodeNotAvail,_UnavailableNodes:beta1"));
        assert!(is_unavailable_reason(
            "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"
        ));
        assert!(!is_unavailable_reason("Resources") && !is_unavailable_reason("Priority"));
        assert_eq!(read_duration("05:07"), Some(307));
        // A comment with a line break forging a line of its own: the
        // listing is refused rather than read.
        let forged = "1|RUNNING|None|sw-7-1|tag\n2|PENDING|None|y|y\n1|PENDING|PartitionConfig|sw-7-1|tag\n";
        assert!(matches!(read_queue(forged), Err(SlurmError::Unreadable { .. })));
        assert_eq!(read_queue("1|RUNNING|None|a|b\n2|PENDING|None|c|d\n").unwrap().len(), 2);
    }

    #[test]
    fn controller_outages_are_told_apart_from_refusals() {
        let failed = |s: &str| SlurmError::Failed { tool: "squeue", stderr: s.into() };
        assert!(failed("squeue: error: Unable to contact slurm controller (connect failure)").is_unreachable());
        assert!(!failed("sbatch: error: Invalid partition name specified").is_unreachable());
    }
}
