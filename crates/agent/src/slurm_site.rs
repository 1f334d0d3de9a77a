//! The `slurm` backend: a site whose jobs run on a Slurm cluster.
//!
//! Each leased attempt becomes one Slurm batch job (`sw-JOB-ATTEMPT`, its
//! comment naming this agent instance). The agent tracks all of them with
//! one `squeue` every quarter second, reports each start, ships the job's
//! output file as its log, sends heartbeats while Slurm can be seen, and
//! reports how each ended as Slurm recorded it (accounting when the
//! cluster keeps it, else the controller), with Slurm's elapsed time and
//! allocated GPUs for the bill. It reports the site's capacity (GPUs by
//! type, what is drained, down or reserved) every few seconds, and says the
//! site is unhealthy while the controller does not answer.
//!
//! Rules it keeps:
//!
//! - **No tenant text runs as root.** The batch script Slurm runs (as the
//!   submitting root) holds only fixed text and paths the agent chose: it
//!   drops to the job's own uid (`JOB_ID_BASE + job id`, no groups, no
//!   capabilities, `no_new_privs`) with `setpriv` by full path, and only
//!   then a shell reads the job's command and variables from a file that
//!   user owns (mode 0600) in the job's directory, deletes it, and execs
//!   the command. No secret is ever in a command line or in the script
//!   Slurm keeps, and the Slurm tools run in a cleared environment.
//! - **One live copy.** An attempt whose heartbeats go unanswered for a
//!   lease period (or whose job Slurm cannot be asked about) is cancelled
//!   and given up; a cancel that cannot reach the controller is repeated
//!   when it answers again. Jobs of this instance that no attempt owns are
//!   cancelled by a sweep every ten seconds.
//! - **Restarts adopt.** A root-only record per attempt (its lease without
//!   the environment, and the Slurm job id once known) lets the next life
//!   of the agent take its jobs back instead of running them again.
//! - **Who pays.** An exit (any code), the time limit and the memory limit
//!   are the job's doing and billed; a requeue, preemption, node failure,
//!   boot failure or a cancel the network did not ask for are the site's,
//!   retried elsewhere and never billed; a request the cluster refuses as
//!   more than its nodes can ever give is `unfit`: the job fails, unbilled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use suanwang_api::client::{Client, ClientError};
use suanwang_api::{
    AttemptEnd, AttemptRef, Capabilities, FinishRequest, HeartbeatResponse, Lease, LeaseRequest, LeaseResponse,
    PoolReport, SiteReport,
};

use crate::logs::{Shipped, Shipper, Spool};
use crate::sandbox::{JOB_ID_BASE, MAX_JOB_ID};
use crate::slurm::{Cluster, Ending, Exit, SlurmError, Submission};
use crate::{AgentConfig, AgentError, retry};

/// How a site's agent reaches its Slurm cluster.
#[derive(Debug, Clone)]
pub struct SlurmSite {
    /// The cluster's `slurm.conf` (clients read it, as `SLURM_CONF`).
    pub conf: PathBuf,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// The network's accelerator type -> the cluster's GRES type of GPU
    /// (`A100` -> `a100`). Types not named map to their lowercase name.
    pub gres_map: BTreeMap<String, String>,
    /// Seconds between capacity reports.
    pub report_s: u64,
    /// Most `sbatch` running at once.
    pub submitters: usize,
}

/// Most attempts taken per lease poll.
const LEASE_BATCH: u32 = 64;
/// How often the queue is read.
const TRACK_EVERY: Duration = Duration::from_millis(250);
/// An attempt Slurm does not list for this long is asked about once more, then given up.
const MISSING_GRACE: Duration = Duration::from_secs(10);
/// How often jobs of this instance that no attempt owns are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Bytes a job's output file may hold beyond its log quota: Slurm writes
/// the file, so a job printing without end is cancelled there.
const OUTPUT_SLACK: u64 = 256 << 20;
/// How often running jobs' output files are measured.
const OUTPUT_CHECK_EVERY: Duration = Duration::from_secs(2);
/// A job Slurm holds this long for nodes that are drained or down is taken
/// back and placed elsewhere.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(30);
/// A refusal for the site's own set-up keeps the site unhealthy this long.
const CONFIG_PROBLEM_FOR: Duration = Duration::from_secs(60);

/// What the agent keeps on disk per attempt (root-only, without the
/// environment): enough for its next life to adopt or report the attempt.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    lease: Lease,
    slurm_id: Option<u64>,
}

/// The log of a running attempt: its output file tailed into the spool,
/// and the spool shipped to the server.
struct LogTail {
    done: Arc<AtomicBool>,
    filler: std::thread::JoinHandle<()>,
    shipper: std::thread::JoinHandle<Shipped>,
    spool: Arc<Spool>,
}

struct Tracked {
    lease: Lease,
    slurm_id: Option<u64>,
    /// The start was reported (Slurm ran it).
    started: bool,
    /// The server asked for the stop (a cancel or a preemption).
    stop_asked: bool,
    /// A thread is reporting its end: nothing else touches it (heartbeats
    /// go on until the end is reported, so shipping the last output cannot
    /// lose the lease).
    finishing: bool,
    /// Given up for a lost lease: no more heartbeats.
    abandoned: bool,
    last_ack: Instant,
    last_beat: Instant,
    missing_since: Option<Instant>,
    log: Option<LogTail>,
    /// The report of the start, in flight: the end waits for it.
    start: Option<std::thread::JoinHandle<()>>,
    /// Cancelled for printing past its log quota plus [`OUTPUT_SLACK`]: its own doing.
    over_output: Option<u64>,
    /// Since when Slurm holds it for nodes that are drained or down.
    unavailable_since: Option<Instant>,
}

#[derive(Default)]
struct Health {
    /// The controller does not answer (since, why).
    controller: Option<(Instant, String)>,
    /// A refusal for the site's own set-up (until, why).
    config: Option<(Instant, String)>,
}

impl Health {
    fn problem(&self) -> Option<String> {
        if let Some((_, why)) = &self.controller {
            return Some(format!("the Slurm controller does not answer: {why}"));
        }
        match &self.config {
            Some((until, why)) if Instant::now() < *until => Some(why.clone()),
            _ => None,
        }
    }
}

struct Site {
    client: Client,
    token: crate::TokenSource,
    name: String,
    cluster: Cluster,
    config: SlurmSite,
    /// In every job's comment: which agent instance owns it.
    tag: String,
    jobs_dir: PathBuf,
    spool_dir: PathBuf,
    retention_s: u64,
    as_root: bool,
    accounting: AtomicBool,
    table: Mutex<BTreeMap<AttemptRef, Tracked>>,
    /// Slurm jobs to cancel once the controller answers again.
    abandoned: Mutex<BTreeSet<u64>>,
    health: Mutex<Health>,
    /// Wakes the reporter at once (health changed).
    report_now: (Mutex<bool>, Condvar),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Single-quoted for `sh`: any text, taken literally.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The batch script Slurm runs as root: fixed text and the agent's own
/// paths only. It becomes the job's user and runs the job's file.
pub fn batch_script(job: u64, attempt: u32, run_file: &Path, uid: Option<u32>) -> String {
    let run = shell_quote(&run_file.display().to_string());
    let exec = match uid {
        Some(uid) => format!(
            "exec /usr/bin/setpriv --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs /bin/sh {run}"
        ),
        None => format!("exec /bin/sh {run}"),
    };
    format!("#!/bin/sh\n# suanwang: job {job} attempt {attempt}\n{exec}\n")
}

/// The file the job's user runs: removes itself, sets the job's variables,
/// execs its command.
pub fn run_file(env: &BTreeMap<String, String>, command: &[String]) -> String {
    let mut text = String::from("rm -f -- \"$0\"\n");
    for (k, v) in env {
        // Names are POSIX names (the server refuses others): safe unquoted.
        text.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    let words: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
    text.push_str(&format!("exec {}\n", words.join(" ")));
    text
}

/// Runs a Slurm site's agent until its token is refused.
pub fn run(config: AgentConfig, slurm: SlurmSite) -> Result<(), AgentError> {
    crate::private_dir(&config.workdir, 0o711)?;
    let workdir = std::fs::canonicalize(&config.workdir)?;
    let jobs_dir = workdir.join("jobs");
    let spool_dir = workdir.join(".agent");
    crate::private_dir(&jobs_dir, 0o711)?;
    crate::private_dir(&spool_dir, 0o700)?;
    if std::fs::read_dir(&spool_dir)?.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".lease")) {
        return Err(AgentError::Config(format!(
            "{} holds attempts of a local agent: give the Slurm agent a work directory of its own",
            workdir.display()
        )));
    }
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    if !as_root {
        eprintln!("agent {}: WARNING: not root: Slurm jobs run as this agent's user, not each as its own", config.site);
    }
    let client = Client::new(&config.server, &config.token.read()?);
    let cluster = Cluster::new(&slurm.conf);
    let slurm = check_setup(&client, &config.site, &cluster, slurm)?;
    let site = Arc::new(Site {
        client: client.clone(),
        token: config.token.clone(),
        name: config.site.clone(),
        cluster,
        tag: format!("suanwang:{}", crate::instance_name(&config.site, &workdir)),
        config: slurm,
        jobs_dir,
        spool_dir,
        retention_s: config.retention_s,
        as_root,
        accounting: AtomicBool::new(false),
        table: Mutex::default(),
        abandoned: Mutex::default(),
        health: Mutex::default(),
        report_now: (Mutex::new(false), Condvar::new()),
    });
    if let Ok(on) = site.cluster.accounting() {
        site.accounting.store(on, Ordering::SeqCst);
    }
    eprintln!(
        "agent {}: slurm backend: SLURM_CONF={}, partition {}, account {}, GPUs {}, accounting {}, jobs {}",
        site.name,
        site.cluster.conf().display(),
        site.config.partition.as_deref().unwrap_or("(default)"),
        site.config.account.as_deref().unwrap_or("(default)"),
        site.config.gres_map.iter().map(|(t, g)| format!("{t}=gpu:{g}")).collect::<Vec<_>>().join(","),
        if site.accounting.load(Ordering::SeqCst) { "sacct" } else { "none (scontrol)" },
        if as_root { "as their own users" } else { "as this agent's user" },
    );
    adopt(&site);
    let (submit_tx, submit_rx) = mpsc::channel::<AttemptRef>();
    let submit_rx = Arc::new(Mutex::new(submit_rx));
    for _ in 0..site.config.submitters.max(1) {
        let (site, rx) = (site.clone(), submit_rx.clone());
        std::thread::spawn(move || {
            loop {
                let next = lock(&rx).recv();
                match next {
                    Ok(key) => submit(&site, key),
                    Err(_) => return,
                }
            }
        });
    }
    {
        let site = site.clone();
        std::thread::spawn(move || track(&site));
    }
    {
        let site = site.clone();
        std::thread::spawn(move || beat(&site));
    }
    {
        let site = site.clone();
        std::thread::spawn(move || report(&site));
    }
    lease_loop(&config, &site, &submit_tx)
}

/// Checks the partition and the GRES map against the cluster, and the map
/// against the site's types. Types the map leaves out map to their
/// lowercase names.
fn check_setup(client: &Client, site: &str, cluster: &Cluster, mut slurm: SlurmSite) -> Result<SlurmSite, AgentError> {
    // The token must be this site's (the server says so on a report naming it).
    let hello = SiteReport { site: Some(site.to_string()), backend: "slurm".into(), problem: None, pools: Vec::new() };
    match client.post::<_, serde::de::IgnoredAny>("/v1/agent/report", &hello) {
        Err(ClientError::Api { status: 403, error }) => {
            return Err(AgentError::Config(format!("--site {site}: {}", error.message)));
        }
        Err(e @ ClientError::Api { status: 401, .. }) => return Err(AgentError::Api(e)),
        _ => {}
    }
    let sites: Vec<suanwang_api::Site> = client.get("/v1/sites")?;
    let Some(me) = sites.iter().find(|s| s.id == site) else {
        return Err(AgentError::Config(format!("--site: the network has no site '{site}'")));
    };
    let types: Vec<&str> = me.pools.iter().map(|p| p.accelerator.as_str()).collect();
    // `up` gives every Slurm site one map: types the site lacks are left out.
    let foreign: Vec<String> = slurm.gres_map.keys().filter(|t| !types.contains(&t.as_str())).cloned().collect();
    for t in foreign {
        eprintln!("agent {site}: --gres-map names {t}, which this site does not have: left out");
        slurm.gres_map.remove(&t);
    }
    for t in &types {
        slurm.gres_map.entry(t.to_string()).or_insert_with(|| t.to_ascii_lowercase());
    }
    // With the controller away the agent still starts (and reports the
    // site unhealthy); what it can check, it checks. A type whose GRES the
    // cluster lacks is reported with nothing usable; a map none of whose
    // GRES types the cluster has is a mistake, and stops the agent.
    match cluster.capacity() {
        Ok(capacity) => {
            let missing: Vec<String> = slurm
                .gres_map
                .iter()
                .filter(|(_, g)| !capacity.contains_key(*g))
                .map(|(t, g)| format!("{t}=gpu:{g}"))
                .collect();
            let has = capacity.keys().cloned().collect::<Vec<_>>().join(", ");
            if missing.len() == slurm.gres_map.len() {
                return Err(AgentError::Config(format!(
                    "the cluster has no GPU of any GRES type this site maps to ({}); it has: {has}; name them with --gres-map TYPE=GRES (up: --slurm-gres-map)",
                    missing.join(", ")
                )));
            }
            for m in missing {
                eprintln!("agent {site}: the cluster has no GPU for {m} (it has: {has}): reported with none usable");
            }
        }
        Err(e) => eprintln!("agent {site}: cannot read the cluster's nodes yet: {e}"),
    }
    if let Some(p) = &slurm.partition
        && let Ok(partitions) = cluster.partitions()
        && !partitions.contains(p)
    {
        return Err(AgentError::Config(format!(
            "--partition (up: --slurm-partition): the cluster has no partition '{p}' (it has: {})",
            partitions.join(", ")
        )));
    }
    Ok(slurm)
}

fn record_path(site: &Site, key: AttemptRef) -> PathBuf {
    site.spool_dir.join(format!("slurm-{}-{}.json", key.job, key.attempt))
}

fn output_path(site: &Site, key: AttemptRef) -> PathBuf {
    site.spool_dir.join(format!("slurm-{}-{}.out", key.job, key.attempt))
}

fn job_name(key: AttemptRef) -> String {
    format!("sw-{}-{}", key.job, key.attempt)
}

fn write_record(site: &Site, lease: &Lease, slurm_id: Option<u64>) -> std::io::Result<()> {
    let mut lease = lease.clone();
    lease.env.clear();
    lease.secret_env.clear();
    let record = Record { lease, slurm_id };
    let path = record_path(site, AttemptRef { job: record.lease.job, attempt: record.lease.attempt });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&record).map_err(std::io::Error::other)?)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::rename(&tmp, &path)
}

/// Takes back the attempts of a previous life of this agent.
fn adopt(site: &Arc<Site>) {
    let Ok(entries) = std::fs::read_dir(&site.spool_dir) else { return };
    let mut records = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if !(name.starts_with("slurm-") && name.ends_with(".json")) {
            continue;
        }
        match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()) {
            Some(r) => records.push(r),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if records.is_empty() {
        return;
    }
    let queue = site.cluster.queue().ok();
    for mut r in records {
        let key = AttemptRef { job: r.lease.job, attempt: r.lease.attempt };
        if r.slurm_id.is_none()
            && let Some(q) = &queue
        {
            // Died between sbatch and the record: find the job by its name.
            r.slurm_id = q.iter().find(|j| j.name == job_name(key) && j.comment == site.tag).map(|j| j.id);
        }
        match r.slurm_id {
            Some(id) => {
                eprintln!("agent {}: job {} attempt {}: adopted Slurm job {id}", site.name, key.job, key.attempt);
                let now = Instant::now();
                lock(&site.table).insert(
                    key,
                    Tracked {
                        lease: r.lease,
                        slurm_id: Some(id),
                        started: false,
                        stop_asked: false,
                        finishing: false,
                        abandoned: false,
                        last_ack: now,
                        last_beat: now - Duration::from_secs(3600),
                        missing_since: None,
                        log: None,
                        start: None,
                        over_output: None,
                        unavailable_since: None,
                    },
                );
            }
            None if queue.is_some() => {
                // Slurm never had it: the attempt is lost, not the job's fault.
                let _ = post_finish(
                    site,
                    &r.lease,
                    FinishRequest {
                        end: AttemptEnd::Infrastructure,
                        exit_code: 137,
                        wall_s: 1,
                        gpus: None,
                        message: Some("the agent restarted before Slurm took the job".into()),
                    },
                );
                let _ = std::fs::remove_file(record_path(site, key));
            }
            // The controller does not answer: keep the record for the next life.
            None => {}
        }
    }
}

fn lease_loop(config: &AgentConfig, site: &Arc<Site>, submit: &mpsc::Sender<AttemptRef>) -> Result<(), AgentError> {
    let mut backoff = Duration::from_millis(200);
    let mut token_seen = config.token.modified();
    let mut last_sweep = Instant::now();
    loop {
        if config.token.modified() != token_seen {
            token_seen = config.token.modified();
            if config.token.refresh(&site.client) {
                eprintln!("agent {}: token file changed; using the new token", site.name);
            }
        }
        if last_sweep.elapsed() > Duration::from_secs(60) {
            last_sweep = Instant::now();
            remove_old_dirs(site);
        }
        let running: Vec<AttemptRef> = lock(&site.table).keys().copied().collect();
        let request = LeaseRequest {
            wait_s: config.poll_wait_s,
            running,
            capabilities: Capabilities { containers: false, images: Vec::new(), sandboxed: false },
            max: LEASE_BATCH,
        };
        match site.client.post::<_, LeaseResponse>("/v1/agent/lease", &request) {
            Ok(response) => {
                backoff = Duration::from_millis(200);
                for stop in response.stop {
                    let id = {
                        let mut table = lock(&site.table);
                        match table.get_mut(&stop) {
                            Some(t) => {
                                t.stop_asked = true;
                                t.slurm_id
                            }
                            None => None,
                        }
                    };
                    if let Some(id) = id {
                        cancel(site, id);
                    }
                }
                for lease in response.lease.into_iter().chain(response.leases) {
                    let key = AttemptRef { job: lease.job, attempt: lease.attempt };
                    let now = Instant::now();
                    lock(&site.table).insert(
                        key,
                        Tracked {
                            lease,
                            slurm_id: None,
                            started: false,
                            stop_asked: false,
                            finishing: false,
                            abandoned: false,
                            last_ack: now,
                            last_beat: now,
                            missing_since: None,
                            log: None,
                            start: None,
                            over_output: None,
                            unavailable_since: None,
                        },
                    );
                    let _ = submit.send(key);
                }
            }
            Err(ClientError::Api { status: 401, error }) => {
                if !config.token.refresh(&site.client) {
                    return Err(AgentError::Api(ClientError::Api { status: 401, error }));
                }
            }
            Err(ClientError::Api { status: 403, error }) => {
                return Err(AgentError::Api(ClientError::Api { status: 403, error }));
            }
            Err(e) => {
                eprintln!("agent {}: {e}; retrying in {backoff:?}", site.name);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Cancels a Slurm job now, or once the controller answers again.
fn cancel(site: &Site, id: u64) {
    match site.cluster.cancel(id) {
        Ok(()) => {}
        Err(SlurmError::Failed { stderr, .. }) if stderr.contains("Invalid job id") => {}
        Err(e) => {
            eprintln!("agent {}: scancel {id}: {e}; will retry", site.name);
            lock(&site.abandoned).insert(id);
        }
    }
}

fn set_config_problem(site: &Site, why: String) {
    lock(&site.health).config = Some((Instant::now() + CONFIG_PROBLEM_FOR, why));
    wake_reporter(site);
}

fn wake_reporter(site: &Site) {
    *lock(&site.report_now.0) = true;
    site.report_now.1.notify_all();
}

/// Submits one leased attempt as a Slurm batch job.
fn submit(site: &Arc<Site>, key: AttemptRef) {
    let (lease, stopped) = {
        let table = lock(&site.table);
        match table.get(&key) {
            Some(t) if !t.finishing => (t.lease.clone(), t.stop_asked),
            _ => return,
        }
    };
    if stopped {
        finish_now(
            site,
            key,
            &lease,
            AttemptEnd::Infrastructure,
            137,
            0,
            None,
            Some("stopped before Slurm took it".into()),
        );
        return;
    }
    match prepare_and_submit(site, &lease) {
        Ok(id) => {
            let mut table = lock(&site.table);
            if let Some(t) = table.get_mut(&key) {
                t.slurm_id = Some(id);
                let _ = write_record(site, &t.lease, Some(id));
                if t.stop_asked {
                    drop(table);
                    cancel(site, id);
                }
            }
        }
        Err(Refused::Unfit(why)) => {
            finish_now(site, key, &lease, AttemptEnd::Unfit, 1, 0, None, Some(format!("Slurm refused it: {why}")))
        }
        Err(Refused::Site(why)) => {
            set_config_problem(site, format!("Slurm refuses this site's set-up: {why}"));
            finish_now(
                site,
                key,
                &lease,
                AttemptEnd::Infrastructure,
                127,
                0,
                None,
                Some(format!("the site could not submit it to Slurm: {why}")),
            )
        }
        Err(Refused::Transient(why)) => finish_now(
            site,
            key,
            &lease,
            AttemptEnd::Infrastructure,
            127,
            0,
            None,
            Some(format!("the site could not submit it to Slurm: {why}")),
        ),
        Err(Refused::Job(why)) => finish_now(site, key, &lease, AttemptEnd::Exited, 127, 0, None, Some(why)),
    }
}

enum Refused {
    /// More than the cluster's nodes can ever give: the job's request.
    Unfit(String),
    /// The site's own set-up (partition, account, GRES): the site is unhealthy.
    Site(String),
    /// The controller did not answer, a file could not be written.
    Transient(String),
    /// The job cannot run anywhere as given (no command, id out of range).
    Job(String),
}

fn classify(e: SlurmError) -> Refused {
    let text = e.to_string();
    if e.is_unreachable() {
        return Refused::Transient(text);
    }
    let lower = text.to_ascii_lowercase();
    if ["invalid partition", "invalid account", "invalid generic resource", "invalid qos", "access/permission denied"]
        .iter()
        .any(|w| lower.contains(w))
    {
        Refused::Site(text)
    } else if [
        "requested node configuration is not available",
        "memory specification can not be satisfied",
        "more processors requested than permitted",
        "requested time limit is invalid",
        "node count specification invalid",
        "cpu count per node can not be satisfied",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        Refused::Unfit(text)
    } else {
        Refused::Transient(text)
    }
}

fn prepare_and_submit(site: &Site, lease: &Lease) -> Result<u64, Refused> {
    if lease.command.is_empty() {
        return Err(Refused::Job("the job has no command (a Slurm site runs commands, not images)".into()));
    }
    if lease.job > MAX_JOB_ID {
        return Err(Refused::Job(format!("job id {} is too large to map to a user id", lease.job)));
    }
    let key = AttemptRef { job: lease.job, attempt: lease.attempt };
    let io = |e: std::io::Error| Refused::Transient(format!("preparing the job's directory: {e}"));
    write_record(site, lease, None).map_err(io)?;
    let dir = site.jobs_dir.join(format!("job-{}-{}", lease.job, lease.attempt));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tmp")).map_err(io)?;
    let uid = site.as_root.then_some(JOB_ID_BASE + lease.job as u32);
    let mut env = crate::environment(lease, &site.name, &dir);
    env.insert("TMPDIR".into(), dir.join("tmp").display().to_string());
    let run = dir.join(".suanwang-run");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&run).map_err(io)?;
        std::io::Write::write_all(&mut f, run_file(&env, &lease.command).as_bytes()).map_err(io)?;
    }
    if let Some(uid) = uid {
        for path in [&dir, &dir.join("tmp"), &run] {
            std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(io)?;
        }
    }
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io)?;
    let output = output_path(site, key);
    let _ = std::fs::remove_file(&output);
    let gres = (lease.gpus > 0).then(|| {
        let kind = site
            .config
            .gres_map
            .get(&lease.accelerator)
            .cloned()
            .unwrap_or_else(|| lease.accelerator.to_ascii_lowercase());
        format!("gpu:{kind}:{}", lease.gpus)
    });
    let submission = Submission {
        name: job_name(key),
        comment: site.tag.clone(),
        gres,
        time_limit_s: lease.time_limit_s,
        cpus: lease.cpus,
        memory_mb: lease.memory_mb,
        partition: site.config.partition.clone(),
        account: site.config.account.clone(),
        workdir: dir.clone(),
        output,
        script: batch_script(lease.job, lease.attempt, &run, uid),
    };
    site.cluster.submit(&submission).map_err(classify)
}

/// Reports an attempt's end and forgets it.
#[allow(clippy::too_many_arguments)]
fn finish_now(
    site: &Site,
    key: AttemptRef,
    lease: &Lease,
    end: AttemptEnd,
    exit_code: i32,
    wall_s: u64,
    gpus: Option<u32>,
    message: Option<String>,
) {
    let answer = post_finish(site, lease, FinishRequest { end, exit_code, wall_s, gpus, message });
    if let Err(e) = answer {
        eprintln!("agent {}: job {} attempt {}: reporting its end: {e}", site.name, key.job, key.attempt);
    }
    let _ = std::fs::remove_file(record_path(site, key));
    let _ = std::fs::remove_file(output_path(site, key));
    if site.retention_s == 0 {
        let _ = std::fs::remove_dir_all(site.jobs_dir.join(format!("job-{}-{}", key.job, key.attempt)));
    }
    lock(&site.table).remove(&key);
}

fn post_finish(site: &Site, lease: &Lease, report: FinishRequest) -> Result<(), ClientError> {
    crate::report_finish(&site.client, &site.token, lease, &report)
}

/// Follows every tracked job in the queue.
fn track(site: &Arc<Site>) {
    let mut last_sweep = Instant::now();
    let mut last_output_check = Instant::now();
    loop {
        std::thread::sleep(TRACK_EVERY);
        let queue = match site.cluster.queue() {
            Ok(q) => q,
            Err(e) => {
                let newly = {
                    let mut health = lock(&site.health);
                    let newly = health.controller.is_none();
                    if newly {
                        health.controller = Some((Instant::now(), e.to_string()));
                    }
                    newly
                };
                if newly {
                    eprintln!("agent {}: the Slurm controller does not answer: {e}", site.name);
                    wake_reporter(site);
                }
                continue;
            }
        };
        if lock(&site.health).controller.take().is_some() {
            eprintln!("agent {}: the Slurm controller answers again", site.name);
            wake_reporter(site);
        }
        let listed: BTreeMap<u64, &crate::slurm::Queued> = queue.iter().map(|q| (q.id, q)).collect();
        let abandoned: Vec<u64> = std::mem::take(&mut *lock(&site.abandoned)).into_iter().collect();
        for id in abandoned {
            if listed.get(&id).is_some_and(|q| crate::slurm::is_active(&q.state)) {
                cancel(site, id);
            }
        }
        let mut to_finish = Vec::new();
        let mut given_back: Vec<(AttemptRef, u64, AttemptEnd, String)> = Vec::new();
        {
            let mut table = lock(&site.table);
            for (&key, t) in table.iter_mut() {
                let Some(id) = t.slurm_id else { continue };
                if t.finishing {
                    continue;
                }
                match listed.get(&id) {
                    Some(q) if crate::slurm::is_active(&q.state) => {
                        t.missing_since = None;
                        if q.state == "RUNNING" && !t.started {
                            t.started = true;
                            t.log = open_log(site, key, &t.lease);
                            let (site, lease) = (site.clone(), t.lease.clone());
                            t.start = Some(std::thread::spawn(move || post_start(&site, &lease)));
                        } else if q.state == "PENDING" && crate::slurm::is_hopeless_reason(&q.reason) {
                            t.finishing = true;
                            let why = format!("Slurm would never run it as asked (pending: {}); cancelled", q.reason);
                            given_back.push((key, id, AttemptEnd::Unfit, why));
                        } else if q.state == "PENDING" && crate::slurm::is_unavailable_reason(&q.reason) {
                            let since = *t.unavailable_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > UNAVAILABLE_FOR {
                                t.finishing = true;
                                let why = format!(
                                    "Slurm held it for {} s for nodes that are drained or down ({}); placed again",
                                    UNAVAILABLE_FOR.as_secs(),
                                    q.reason
                                );
                                given_back.push((key, id, AttemptEnd::Infrastructure, why));
                            }
                        } else {
                            t.unavailable_since = None;
                        }
                    }
                    Some(_) => {
                        t.finishing = true;
                        to_finish.push(key);
                    }
                    None => {
                        let since = *t.missing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > MISSING_GRACE {
                            t.finishing = true;
                            to_finish.push(key);
                        }
                    }
                }
            }
        }
        for key in to_finish {
            let site = site.clone();
            std::thread::spawn(move || ended(&site, key));
        }
        // Jobs Slurm will not run here: cancelled there, and reported.
        for (key, id, end, message) in given_back {
            let site = site.clone();
            std::thread::spawn(move || {
                cancel(&site, id);
                let Some(lease) = lock(&site.table).get(&key).map(|t| t.lease.clone()) else { return };
                let exit_code = if end == AttemptEnd::Unfit { 1 } else { 137 };
                finish_now(&site, key, &lease, end, exit_code, 0, None, Some(message));
            });
        }
        if last_output_check.elapsed() >= OUTPUT_CHECK_EVERY {
            last_output_check = Instant::now();
            let mut loud = Vec::new();
            for (&key, t) in lock(&site.table).iter_mut() {
                let (Some(id), true, None) = (t.slurm_id, t.started, t.over_output) else { continue };
                let size = std::fs::metadata(output_path(site, key)).map_or(0, |m| m.len());
                if size > t.lease.log_quota_bytes.saturating_add(OUTPUT_SLACK) {
                    t.over_output = Some(size);
                    loud.push(id);
                }
            }
            for id in loud {
                cancel(site, id);
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            let owned: BTreeSet<String> = lock(&site.table).keys().map(|&k| job_name(k)).collect();
            for q in &queue {
                if q.comment == site.tag && crate::slurm::is_active(&q.state) && !owned.contains(&q.name) {
                    eprintln!("agent {}: Slurm job {} ({}) belongs to no attempt: cancelled", site.name, q.id, q.name);
                    cancel(site, q.id);
                }
            }
        }
    }
}

/// Reports that Slurm runs the attempt.
fn post_start(site: &Site, lease: &Lease) {
    let path = format!("/v1/agent/attempts/{}/{}/start", lease.job, lease.attempt);
    let _ = retry(Duration::from_secs(lease.lease_s.max(2) / 2), || {
        site.client.post_with::<_, serde::de::IgnoredAny>(&path, &[("X-Attempt-Secret", lease.secret.as_str())], &())
    });
}

/// Tails the attempt's output file into its spool and ships the spool.
fn open_log(site: &Site, key: AttemptRef, lease: &Lease) -> Option<LogTail> {
    let path = site.spool_dir.join(format!("slurm-{}-{}.log", key.job, key.attempt));
    let spool = match Spool::create(&path, lease.log_quota_bytes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agent {}: job {} attempt {}: no log spool: {e}", site.name, key.job, key.attempt);
            return None;
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let filler = {
        let (spool, done, file) = (spool.clone(), done.clone(), output_path(site, key));
        std::thread::spawn(move || spool.fill(Tail { file, open: None, done, read: 0, spool: spool.clone() }))
    };
    let shipper = {
        let spool = spool.clone();
        let shipper = Shipper {
            client: site.client.clone(),
            path: format!("/v1/agent/attempts/{}/{}/logs", lease.job, lease.attempt),
            secret: lease.secret.clone(),
            token: site.token.clone(),
        };
        std::thread::spawn(move || shipper.run(&spool, Duration::from_secs(600)))
    };
    Some(LogTail { done, filler, shipper, spool })
}

/// Stops tailing (the output is complete) and waits until it is shipped.
fn close_log(site: &Site, key: AttemptRef, log: LogTail) {
    log.done.store(true, Ordering::SeqCst);
    let _ = log.filler.join();
    if let Ok(Shipped::GaveUp) = log.shipper.join() {
        eprintln!("agent {}: job {} attempt {}: could not deliver all output", site.name, key.job, key.attempt);
    }
    log.spool.remove();
}

/// A job's output file, read as it grows until the job has ended. Past
/// the log quota only the last [`crate::logs::TAIL_BYTES`] matter: what
/// lies before them is skipped, not read (a job may make its file huge, or
/// sparse, through its own output handle).
struct Tail {
    file: PathBuf,
    open: Option<std::fs::File>,
    done: Arc<AtomicBool>,
    /// Bytes of the file consumed so far (read or skipped).
    read: u64,
    spool: Arc<Spool>,
}

impl std::io::Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::Seek;
        loop {
            // Read what is there before looking at `done`, so that the last
            // output (written before Slurm reported the end) is not lost.
            let finished = self.done.load(Ordering::SeqCst);
            if self.open.is_none() {
                self.open = std::fs::File::open(&self.file).ok();
            }
            if let Some(f) = self.open.as_mut() {
                let len = f.metadata()?.len();
                let tail_from = len.saturating_sub(crate::logs::TAIL_BYTES as u64);
                if self.read >= self.spool.quota() && tail_from > self.read {
                    self.spool.skipped(tail_from - self.read);
                    self.read = f.seek(std::io::SeekFrom::Start(tail_from))?;
                }
                let n = f.read(buf)?;
                if n > 0 {
                    self.read += n as u64;
                    return Ok(n);
                }
            }
            if finished {
                return Ok(0);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Slurm ended the job: report how, as Slurm recorded it.
fn ended(site: &Arc<Site>, key: AttemptRef) {
    let Some((lease, id, stop_asked, started, start, log, over_output)) = ({
        let mut table = lock(&site.table);
        table.get_mut(&key).map(|t| {
            let id = t.slurm_id.unwrap_or(0);
            (t.lease.clone(), id, t.stop_asked, t.started, t.start.take(), t.log.take(), t.over_output)
        })
    }) else {
        return;
    };
    let record = read_end(site, id);
    // The start is reported before the end: in flight, or now if the job
    // ended before the tracker saw it run.
    match start {
        Some(h) => {
            let _ = h.join();
        }
        None if !started && record.as_ref().is_some_and(|e| e.elapsed_s > 0 || output_path(site, key).exists()) => {
            post_start(site, &lease)
        }
        None => {}
    }
    // The output is complete once Slurm has ended the job: drain it, then ship.
    let log = log.or_else(|| output_path(site, key).exists().then(|| open_log(site, key, &lease)).flatten());
    if let Some(log) = log {
        close_log(site, key, log);
    }
    // Slurm's limit is whole minutes: the one it enforced, not the one asked.
    let limit_s = lease.time_limit_s.div_ceil(60).max(1) * 60;
    let (end, exit_code, wall_s, gpus, message) = match &record {
        None => {
            (AttemptEnd::Infrastructure, 137, 1, None, Some(format!("Slurm job {id}: the cluster no longer knows it")))
        }
        Some(e) => {
            let wall = e.elapsed_s.clamp(1, limit_s);
            let gpus = (e.gpus > 0).then_some(e.gpus);
            let from = if e.source == "accounting" { "from Slurm's accounting" } else { "from the Slurm controller" };
            let code = match e.exit {
                Exit::Code(c) => c,
                Exit::Signal(s) => 128 + s,
            };
            match e.ending() {
                Ending::Exited => {
                    (AttemptEnd::Exited, code, wall, gpus, Some(format!("Slurm job {id} {} ({from})", e.state)))
                }
                Ending::TimeLimit => (
                    AttemptEnd::TimeLimit,
                    137,
                    wall,
                    gpus,
                    Some(format!("Slurm job {id} ended at its time limit of {} min ({from})", limit_s.div_ceil(60))),
                ),
                Ending::Memory => {
                    (AttemptEnd::MemoryLimit, 137, wall, gpus, Some(format!("Slurm job {id} OUT_OF_MEMORY ({from})")))
                }
                Ending::Cancelled if stop_asked => (AttemptEnd::Infrastructure, 137, wall, None, None),
                Ending::Cancelled if over_output.is_some() => (
                    AttemptEnd::Exited,
                    137,
                    wall,
                    gpus,
                    Some(format!(
                        "cancelled: its output passed {} bytes (its log quota and {} MiB more are the most a Slurm site keeps)",
                        over_output.unwrap_or(0),
                        OUTPUT_SLACK >> 20
                    )),
                ),
                Ending::Cancelled => (
                    AttemptEnd::Infrastructure,
                    137,
                    wall,
                    None,
                    Some(format!("Slurm job {id} was cancelled on the cluster, not by the network")),
                ),
                Ending::Infrastructure => (
                    AttemptEnd::Infrastructure,
                    137,
                    wall,
                    None,
                    Some(format!("Slurm job {id} ended {} (a fault of the cluster)", e.state)),
                ),
            }
        }
    };
    finish_now(site, key, &lease, end, exit_code, wall_s, gpus, message);
}

/// How a job ended: from accounting when the cluster keeps it (waiting a
/// little for slurmdbd to have the record), else from the controller.
fn read_end(site: &Site, id: u64) -> Option<crate::slurm::Ended> {
    if site.accounting.load(Ordering::SeqCst) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match site.cluster.ended_from_accounting(id) {
                Ok(Some(e)) => return Some(e),
                Ok(None) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(250)),
                _ => break,
            }
        }
    }
    site.cluster.ended_from_controller(id).ok().flatten()
}

/// Sends each attempt's heartbeats while Slurm can be seen, and gives up
/// attempts whose leases have run out.
fn beat(site: &Arc<Site>) {
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let controller_away = lock(&site.health).controller.is_some();
        let due: Vec<(AttemptRef, Lease, Instant)> = {
            let table = lock(&site.table);
            table
                .iter()
                .filter(|(_, t)| {
                    !t.abandoned && t.last_beat.elapsed() >= Duration::from_secs(t.lease.heartbeat_s.max(1))
                })
                .map(|(&k, t)| (k, t.lease.clone(), t.last_ack))
                .collect()
        };
        for (key, lease, last_ack) in due {
            let margin = Duration::from_secs(lease.lease_s.saturating_sub(2).max(1));
            if last_ack.elapsed() > margin {
                give_up(site, key, &lease);
                continue;
            }
            // While the controller is away nothing can be known of the job:
            // let the lease run out so the network places it elsewhere.
            if controller_away {
                continue;
            }
            let client = site.client.with_timeout(Duration::from_secs((lease.lease_s / 4).clamp(1, 10)));
            let sent = Instant::now();
            let path = format!("/v1/agent/attempts/{}/{}/heartbeat", lease.job, lease.attempt);
            let answer =
                client.post_with::<_, HeartbeatResponse>(&path, &[("X-Attempt-Secret", lease.secret.as_str())], &());
            let mut table = lock(&site.table);
            let Some(t) = table.get_mut(&key) else { continue };
            t.last_beat = sent;
            match answer {
                Ok(HeartbeatResponse { stop: false }) => t.last_ack = sent,
                Ok(HeartbeatResponse { stop: true }) | Err(ClientError::Api { status: 403 | 404 | 409, .. }) => {
                    t.stop_asked = true;
                    let id = t.slurm_id;
                    drop(table);
                    if let Some(id) = id {
                        cancel(site, id);
                    }
                }
                Err(ClientError::Api { status: 401, .. }) => {
                    site.token.refresh(&site.client);
                }
                Err(_) => {}
            }
        }
    }
}

/// No word from the server (or of the job) for a lease period: the network
/// has given the attempt up and may run it elsewhere, so cancel it here.
fn give_up(site: &Arc<Site>, key: AttemptRef, lease: &Lease) {
    let (id, log) = {
        let mut table = lock(&site.table);
        let Some(t) = table.get_mut(&key) else { return };
        if t.finishing {
            return;
        }
        t.finishing = true;
        t.abandoned = true;
        (t.slurm_id, t.log.take())
    };
    eprintln!("agent {}: job {} attempt {}: lease lost; cancelling it in Slurm", site.name, key.job, key.attempt);
    if let Some(id) = id {
        cancel(site, id);
    }
    let site = site.clone();
    let lease = lease.clone();
    // On its own thread: shipping the last output may wait for the server.
    std::thread::spawn(move || {
        if let Some(log) = log {
            close_log(&site, key, log);
        }
        finish_now(
            &site,
            key,
            &lease,
            AttemptEnd::Infrastructure,
            137,
            1,
            None,
            Some("lease lost: the agent could not reach the server or its cluster".into()),
        )
    });
}

/// Reports the site's capacity and health every `report_s`, and at once
/// when its health changes.
fn report(site: &Arc<Site>) {
    let every = Duration::from_secs(site.config.report_s.max(1));
    loop {
        let problem = lock(&site.health).problem();
        let (pools, problem) = match problem {
            Some(p) => (Vec::new(), Some(p)),
            None => match site.cluster.capacity() {
                Ok(capacity) => (
                    site.config
                        .gres_map
                        .iter()
                        .map(|(t, g)| {
                            let c = capacity.get(g).copied().unwrap_or_default();
                            PoolReport {
                                accelerator: t.clone(),
                                total: c.total,
                                usable: c.usable,
                                drained: c.drained,
                                down: c.down,
                                reserved: c.reserved,
                            }
                        })
                        .collect(),
                    None,
                ),
                Err(e) if e.is_unreachable() => {
                    (Vec::new(), Some(format!("the Slurm controller does not answer: {e}")))
                }
                Err(e) => (Vec::new(), Some(format!("cannot read the cluster's nodes: {e}"))),
            },
        };
        let body = SiteReport { site: Some(site.name.clone()), backend: "slurm".into(), problem, pools };
        match site.client.post::<_, serde::de::IgnoredAny>("/v1/agent/report", &body) {
            Ok(_) => {}
            Err(ClientError::Api { status: 401, .. }) => {
                site.token.refresh(&site.client);
            }
            Err(e) => eprintln!("agent {}: reporting capacity: {e}", site.name),
        }
        let (flag, wake) = &site.report_now;
        let guard = lock(flag);
        let (mut guard, _) = wake.wait_timeout_while(guard, every, |now| !*now).unwrap_or_else(|p| p.into_inner());
        *guard = false;
    }
}

/// Removes attempt directories finished more than `retention_s` ago.
fn remove_old_dirs(site: &Site) {
    let live: BTreeSet<String> = lock(&site.table).keys().map(|k| format!("job-{}-{}", k.job, k.attempt)).collect();
    let Ok(entries) = std::fs::read_dir(&site.jobs_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() >= site.retention_s);
        if old && !live.contains(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_file_gives_the_job_its_variables_and_arguments_literally() {
        let dir = std::env::temp_dir().join(format!("suanwang-runfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env: BTreeMap<String, String> = [
            ("A".to_string(), "it's $HOME `id` \"q\"\nline2".to_string()),
            ("B".to_string(), "; rm -rf /".to_string()),
        ]
        .into();
        let command: Vec<String> = ["sh", "-c", "printf '%s|%s|%s' \"$A\" \"$B\" \"$1\"", "x", "$(id) 'y'"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let file = dir.join("run");
        std::fs::write(&file, run_file(&env, &command)).unwrap();
        let out = std::process::Command::new("/bin/sh").arg(&file).env_clear().output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME `id` \"q\"\nline2|; rm -rf /|$(id) 'y'");
        assert!(!file.exists(), "the run file removes itself");
        let script = batch_script(7, 2, Path::new("/w/it's/.suanwang-run"), Some(JOB_ID_BASE + 7));
        assert!(script.contains("--reuid=1000000007 --regid=1000000007 --clear-groups"), "{script}");
        assert!(script.ends_with("/bin/sh '/w/it'\\''s/.suanwang-run'\n"), "{script}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
