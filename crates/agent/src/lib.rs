//! # suanwang-agent
//!
//! A site agent: it leases attempts for its site from the server (long
//! poll), runs each on the site's backend, ships its output, sends
//! heartbeats, and reports how the attempt ended.
//!
//! - [`sandbox`]: how an attempt is isolated (its own user, namespaces,
//!   cgroup) and how its whole process tree is killed;
//! - [`cgroup`]: the v1 control groups that hold limits and processes;
//! - [`container`]: jobs given as images, under podman with runc;
//! - [`logs`]: output spooled to disk and shipped in bounded chunks;
//! - [`slurm`]: a Slurm cluster through its tools (submit, read, cancel,
//!   capacity, accounting);
//! - [`slurm_site`]: the `slurm` backend: a site whose attempts are Slurm
//!   batch jobs, tracked, billed by Slurm's numbers, adopted after a restart.
//!
//! Safety rules the agent keeps:
//!
//! - a job gets no credential: its environment is built from nothing (its
//!   own variables, its secrets, documented `SUANWANG_*` facts about the
//!   attempt, a minimal `PATH`/`HOME`/`LANG`), and the agent's token and
//!   each attempt's secret never reach it;
//! - at most one live copy of a job: an agent that has not reached the
//!   server for a lease period, minus a margin, kills the attempt before the
//!   server can lease it again; when the agent dies, `--die-with-parent`
//!   takes the sandbox with it, and at its next start it kills whatever is
//!   left in its cgroups;
//! - a stop (cancel, preemption) arrives on the long poll, not the next
//!   heartbeat, and kills the attempt within a poll interval.

pub mod cgroup;
pub mod container;
pub mod logs;
pub mod sandbox;
pub mod slurm;
pub mod slurm_site;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use suanwang_api::client::{Client, ClientError};
use suanwang_api::{
    AttemptEnd, AttemptRef, Capabilities, FinishRequest, HeartbeatResponse, Lease, LeaseRequest, LeaseResponse,
    SiteReport,
};

use crate::logs::{Shipped, Shipper, Spool};
use crate::sandbox::{Isolation, Prepared};

/// Where the agent's token comes from. A token file is read again when it
/// changes, so a provider can rotate the token without restarting the agent
/// (or its running jobs).
#[derive(Debug, Clone)]
pub enum TokenSource {
    File(PathBuf),
    Value(String),
}

impl TokenSource {
    pub fn read(&self) -> Result<String, AgentError> {
        match self {
            TokenSource::Value(t) => Ok(t.clone()),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| AgentError::Config(format!("--token-file {}: {e}", path.display())))?;
                let token = text.trim().to_string();
                if token.is_empty() {
                    return Err(AgentError::Config(format!("--token-file {}: the file is empty", path.display())));
                }
                Ok(token)
            }
        }
    }

    /// Gives `client` the source's token if it differs from the one it
    /// has (a rotation); answers whether it did.
    pub fn refresh(&self, client: &Client) -> bool {
        match self.read() {
            Ok(token) if token != client.token() => {
                client.set_token(&token);
                true
            }
            _ => false,
        }
    }

    fn modified(&self) -> Option<SystemTime> {
        match self {
            TokenSource::File(path) => std::fs::metadata(path).and_then(|m| m.modified()).ok(),
            TokenSource::Value(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub token: TokenSource,
    /// The site this agent runs (names its cgroups; the token is bound to it).
    pub site: String,
    /// Attempts' directories go under `jobs/`, the agent's own files under `.agent/`.
    pub workdir: PathBuf,
    /// Seconds a lease request waits on the server for work.
    pub poll_wait_s: u64,
    /// Run jobs without the sandbox (own process group only).
    pub unsandboxed: bool,
    pub defaults: sandbox::Defaults,
    /// Keep a finished attempt's directory this long, then remove it.
    pub retention_s: u64,
    /// Whether to run jobs given as container images.
    pub containers: sandbox::Containers,
    /// Run the site's jobs on a Slurm cluster instead of local processes.
    pub slurm: Option<slurm_site::SlurmSite>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the sandbox cannot be set up: {0} (run the agent with --unsandboxed to run jobs without isolation)")]
    Sandbox(sandbox::SandboxError),
    #[error("{0}")]
    Config(String),
}

/// A running attempt's stop switch.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
}

type Running = Arc<Mutex<BTreeMap<AttemptRef, Arc<Control>>>>;

/// Everything an attempt thread needs.
struct Shared {
    client: Client,
    token: TokenSource,
    retention_s: u64,
    isolation: Isolation,
    site: String,
    jobs_dir: PathBuf,
    spool_dir: PathBuf,
    running: Running,
}

fn private_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

/// Runs the agent until the process is stopped or its token is refused.
pub fn run(mut config: AgentConfig) -> Result<(), AgentError> {
    if let Some(slurm) = config.slurm.clone() {
        return slurm_site::run(config, slurm);
    }
    if config.unsandboxed && config.containers == sandbox::Containers::Required {
        return Err(AgentError::Config(
            "--containers yes needs the sandbox (it cannot be used with --unsandboxed)".into(),
        ));
    }
    private_dir(&config.workdir, 0o711)?;
    // Absolute, so the sandbox binds the right directory whatever its cwd.
    config.workdir = std::fs::canonicalize(&config.workdir)?;
    let jobs_dir = config.workdir.join("jobs");
    let spool_dir = config.workdir.join(".agent");
    // Jobs may enter their own directory under jobs/ but list nothing.
    private_dir(&jobs_dir, 0o711)?;
    private_dir(&spool_dir, 0o700)?;
    // A Slurm agent's attempts live on in its cluster: a local agent here
    // would report them lost and the network would run them twice.
    if std::fs::read_dir(&spool_dir)?.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        name.starts_with("slurm-") && name.ends_with(".json")
    }) {
        return Err(AgentError::Config(format!(
            "{} holds attempts of a Slurm agent: run that agent again (--backend slurm), or give this one another --workdir",
            config.workdir.display()
        )));
    }
    let isolation = if config.unsandboxed {
        eprintln!(
            "agent {}: WARNING: running jobs UNSANDBOXED (--unsandboxed): they run as this agent's user",
            config.site
        );
        Isolation::Unsandboxed
    } else {
        let (isolation, swept) = Isolation::sandboxed(
            &instance_name(&config.site, &config.workdir),
            &jobs_dir,
            config.defaults,
            config.containers,
        )
        .map_err(AgentError::Sandbox)?;
        if swept > 0 {
            eprintln!("agent {}: killed what was left of {swept} attempt(s) of a previous run", config.site);
        }
        isolation
    };
    let capabilities_of = |isolation: &Isolation| Capabilities {
        containers: isolation.runs_containers(),
        images: isolation.images().into_keys().take(4096).collect(),
        sandboxed: isolation.is_sandboxed(),
    };
    let mut capabilities = capabilities_of(&isolation);
    if capabilities.containers {
        eprintln!("agent {}: runs container jobs ({} image names here)", config.site, capabilities.images.len());
    }
    let mut last_images = (Instant::now(), isolation.images_changed());
    let mut token_seen = config.token.modified();
    let client = Client::new(&config.server, &config.token.read()?);
    let shared = Arc::new(Shared {
        client: client.clone(),
        token: config.token.clone(),
        retention_s: config.retention_s,
        isolation,
        site: config.site.clone(),
        jobs_dir,
        spool_dir,
        running: Arc::default(),
    });
    report_leftovers(&shared);
    let mut backoff = Duration::from_millis(200);
    let mut last_sweep = Instant::now() - Duration::from_secs(3600);
    let mut last_report: Option<Instant> = None;
    loop {
        // Which backend runs the site (the server forgets it on a restart,
        // so it is said again now and then). A local site's capacity is
        // what the network registered.
        if last_report.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            let report = SiteReport {
                site: Some(config.site.clone()),
                backend: "local".into(),
                problem: None,
                pools: Vec::new(),
            };
            match client.post::<_, serde::de::IgnoredAny>("/v1/agent/report", &report) {
                Ok(_) => last_report = Some(Instant::now()),
                // The token is another site's: running its work here would
                // mislabel it; stop and say so.
                Err(ClientError::Api { status: 403, error }) => {
                    return Err(AgentError::Config(format!("--site {}: {}", config.site, error.message)));
                }
                Err(_) => {}
            }
        }
        if config.token.modified() != token_seen {
            token_seen = config.token.modified();
            if config.token.refresh(&client) {
                eprintln!("agent {}: token file changed; using the new token", config.site);
            }
        }
        if last_sweep.elapsed() > Duration::from_secs(60) {
            last_sweep = Instant::now();
            remove_old_dirs(&shared, config.retention_s);
        }
        // Images come and go with the provider's `podman import`/`rmi`:
        // read the list again when the store changed, and now and then.
        if capabilities.containers
            && (last_images.0.elapsed() > IMAGES_REFRESH || shared.isolation.images_changed() != last_images.1)
        {
            last_images = (Instant::now(), shared.isolation.images_changed());
            capabilities = capabilities_of(&shared.isolation);
        }
        let running: Vec<AttemptRef> = shared.running.lock().expect("running lock").keys().copied().collect();
        let request = LeaseRequest { wait_s: config.poll_wait_s, running, capabilities: capabilities.clone(), max: 1 };
        match client.post::<_, LeaseResponse>("/v1/agent/lease", &request) {
            Ok(response) => {
                backoff = Duration::from_millis(200);
                for stop in response.stop {
                    if let Some(control) = shared.running.lock().expect("running lock").remove(&stop) {
                        control.stop.store(true, Ordering::SeqCst);
                    }
                }
                if let Some(lease) = response.lease {
                    let key = AttemptRef { job: lease.job, attempt: lease.attempt };
                    let control = Arc::new(Control::default());
                    shared.running.lock().expect("running lock").insert(key, control.clone());
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = run_attempt(&shared, &lease, &control) {
                            eprintln!("agent {}: job {} attempt {}: {e}", shared.site, lease.job, lease.attempt);
                        }
                        shared.running.lock().expect("running lock").remove(&key);
                    });
                }
            }
            // A refused token: unless the file now holds another one, stop.
            Err(ClientError::Api { status: 401, error }) => {
                if !config.token.refresh(&client) {
                    return Err(AgentError::Api(ClientError::Api { status: 401, error }));
                }
            }
            Err(ClientError::Api { status: 403, error }) => {
                return Err(AgentError::Api(ClientError::Api { status: 403, error }));
            }
            Err(e) => {
                eprintln!("agent {}: {e}; retrying in {backoff:?}", config.site);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// How often a container site's image list is read again even if the
/// image store seems unchanged.
const IMAGES_REFRESH: Duration = Duration::from_secs(60);

/// The name of this agent's cgroups: its site and a hash of its work
/// directory, so two agents of one site on one machine (or tests running
/// side by side) never sweep each other's attempts, while the same agent
/// restarted finds its own.
fn instance_name(site: &str, workdir: &Path) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike the std hasher.
    let hash = workdir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    format!("{site}-{:012x}", hash & 0xffff_ffff_ffff)
}

/// What the agent keeps on its disk while an attempt runs, so that after a
/// crash its next life can tell the server the attempt is gone (root-only
/// directory; deleted when the attempt ends).
#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseRecord {
    job: u64,
    attempt: u32,
    secret: String,
}

/// Attempts of a previous life (killed by the cgroup sweep): reported to the
/// server as lost at once, instead of waiting for their leases to expire.
fn report_leftovers(shared: &Shared) {
    let Ok(entries) = std::fs::read_dir(&shared.spool_dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("lease") => {
                if let Some(r) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok())
                {
                    let report = FinishRequest {
                        end: AttemptEnd::Infrastructure,
                        exit_code: 137,
                        wall_s: 1,
                        gpus: None,
                        message: Some("the agent restarted and killed what was left of it".into()),
                    };
                    let answer = retry(Duration::from_secs(10), || {
                        shared.client.post_with::<_, serde::de::IgnoredAny>(
                            &format!("/v1/agent/attempts/{}/{}/finish", r.job, r.attempt),
                            &[("X-Attempt-Secret", &r.secret)],
                            &report,
                        )
                    });
                    eprintln!(
                        "agent {}: job {} attempt {} of a previous run: reported lost ({})",
                        shared.site,
                        r.job,
                        r.attempt,
                        match answer {
                            Ok(_) => "accepted".to_string(),
                            Err(e) => e.to_string(),
                        }
                    );
                }
                let _ = std::fs::remove_file(&path);
            }
            Some("log") => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
}

/// Removes attempt directories finished more than `retention_s` ago.
fn remove_old_dirs(shared: &Shared, retention_s: u64) {
    let live: BTreeSet<String> =
        shared.running.lock().expect("running lock").keys().map(|k| format!("job-{}-{}", k.job, k.attempt)).collect();
    let Ok(entries) = std::fs::read_dir(&shared.jobs_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() >= retention_s);
        if old && !live.contains(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Reports how an attempt ended, retrying while the server is away (ten
/// minutes) and once more after a token rotation. A 409 means the server no
/// longer counts the attempt (it asked for the stop, or the lease expired):
/// nothing more to say.
fn report_finish(
    client: &Client,
    token: &TokenSource,
    lease: &Lease,
    report: &FinishRequest,
) -> Result<(), ClientError> {
    let path = format!("/v1/agent/attempts/{}/{}/finish", lease.job, lease.attempt);
    let secret = [("X-Attempt-Secret", lease.secret.as_str())];
    let send =
        || retry(Duration::from_secs(600), || client.post_with::<_, serde::de::IgnoredAny>(&path, &secret, report));
    let answer = match send() {
        Err(ClientError::Api { status: 401, .. }) => {
            token.refresh(client);
            send()
        }
        other => other,
    };
    match answer {
        Err(ClientError::Api { status: 409, .. }) => Ok(()),
        other => other.map(drop),
    }
}

/// Retries a call while the server is unreachable, for at most `limit`.
fn retry<T>(limit: Duration, mut call: impl FnMut() -> Result<T, ClientError>) -> Result<T, ClientError> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match call() {
            Err(ClientError::Transport(e)) if started.elapsed() < limit => {
                eprintln!("agent: {e}; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// The environment of an attempt, built from nothing. A container keeps
/// its image's `PATH` unless the job gives one.
fn environment(lease: &Lease, site: &str, workdir_inside: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if lease.image.is_none() {
        env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    }
    env.insert("HOME".into(), workdir_inside.display().to_string());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("TMPDIR".into(), "/tmp".into());
    for (k, v) in lease.env.iter().chain(&lease.secret_env) {
        env.insert(k.clone(), v.clone());
    }
    // Last, so a job cannot override them (the server refuses such names too).
    env.insert("SUANWANG_JOB".into(), lease.job.to_string());
    env.insert("SUANWANG_ATTEMPT".into(), lease.attempt.to_string());
    env.insert("SUANWANG_SITE".into(), site.to_string());
    env.insert("SUANWANG_GPUS".into(), lease.gpus.to_string());
    env.insert("SUANWANG_ACCELERATOR".into(), lease.accelerator.clone());
    env.insert("SUANWANG_WORKDIR".into(), workdir_inside.display().to_string());
    env
}

/// Runs one attempt to the end and reports it.
fn run_attempt(shared: &Shared, lease: &Lease, control: &Control) -> Result<(), AgentError> {
    let client = &shared.client;
    let name = format!("job-{}-{}", lease.job, lease.attempt);
    let dir = shared.jobs_dir.join(&name);
    let finish = |end: AttemptEnd, exit_code: i32, wall_s: u64, message: Option<String>| -> Result<(), AgentError> {
        let report = FinishRequest { end, exit_code, wall_s, gpus: None, message };
        report_finish(client, &shared.token, lease, &report).map_err(AgentError::from)
    };
    if lease.image.is_some() && !shared.isolation.runs_containers() {
        return finish(AttemptEnd::Infrastructure, 127, 0, Some("this site cannot run container images".into()));
    }
    if lease.command.is_empty() && lease.image.is_none() {
        return finish(AttemptEnd::Exited, 127, 0, Some("the job has no command".into()));
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let record_path = shared.spool_dir.join(format!("{name}.lease"));
    let record = LeaseRecord { job: lease.job, attempt: lease.attempt, secret: lease.secret.clone() };
    std::fs::write(&record_path, serde_json::to_vec(&record).map_err(|e| AgentError::Config(e.to_string()))?)?;
    std::fs::set_permissions(&record_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let outcome = run_prepared(shared, lease, control, &dir, &name, &finish);
    let _ = std::fs::remove_file(&record_path);
    outcome
}

/// The attempt from its sandbox to its report.
fn run_prepared(
    shared: &Shared,
    lease: &Lease,
    control: &Control,
    dir: &Path,
    name: &str,
    finish: &dyn Fn(AttemptEnd, i32, u64, Option<String>) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let client = &shared.client;
    let base = format!("/v1/agent/attempts/{}/{}", lease.job, lease.attempt);
    let secret = [("X-Attempt-Secret", lease.secret.as_str())];
    let dir = dir.to_path_buf();
    let request = sandbox::Request {
        job: lease.job,
        attempt: lease.attempt,
        gpus: lease.gpus,
        memory_mb: lease.memory_mb,
        cpus: lease.cpus,
        image: lease.image.as_deref(),
        command_given: !lease.command.is_empty(),
    };
    let prepared = match shared.isolation.prepare(&request, &dir) {
        Ok(p) => p,
        Err(e @ sandbox::SandboxError::NoDefaultCommand(_)) => {
            return finish(AttemptEnd::Exited, 127, 0, Some(e.to_string()));
        }
        Err(e) => return finish(AttemptEnd::Infrastructure, 127, 0, Some(format!("sandbox set-up failed: {e}"))),
    };
    let env = environment(lease, &shared.site, &prepared.workdir_inside);
    let mut command = match shared.isolation.command(&prepared, &dir, &lease.command, &env) {
        Ok(c) => c,
        Err(e) => {
            shared.isolation.cleanup(&prepared);
            return finish(AttemptEnd::Infrastructure, 127, 0, Some(format!("sandbox set-up failed: {e}")));
        }
    };
    let (reader, writer) = std::io::pipe()?;
    command.stdin(Stdio::null()).stdout(writer.try_clone()?).stderr(writer);
    let spool = Spool::create(&shared.spool_dir.join(format!("{name}.log")), lease.log_quota_bytes)?;
    let started = Instant::now();
    let spawned = command.spawn();
    // The parent's copies of the pipe's write end are gone with `command`.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            shared.isolation.cleanup(&prepared);
            spool.remove();
            // A program that does not exist is the job's mistake; anything
            // else (bwrap missing, out of processes) is the site's.
            let (end, message) = match (e.kind(), shared.isolation.is_sandboxed()) {
                (std::io::ErrorKind::NotFound, false) => {
                    (AttemptEnd::Exited, format!("cannot start {}: {e}", lease.command.first().map_or("", |c| c)))
                }
                // Its arguments and environment are too big to exec: the
                // job's doing, whichever backend.
                _ if e.raw_os_error() == Some(libc::E2BIG) => {
                    (AttemptEnd::Exited, format!("cannot start the job: its command and environment are too big ({e})"))
                }
                _ => (AttemptEnd::Infrastructure, format!("cannot start the attempt: {e}")),
            };
            return finish(end, 127, 0, Some(message));
        }
    };
    let filler = {
        let spool = spool.clone();
        std::thread::spawn(move || spool.fill(reader))
    };
    let shipper = {
        let spool = spool.clone();
        let shipper = Shipper {
            client: client.clone(),
            path: format!("{base}/logs"),
            secret: lease.secret.clone(),
            token: shared.token.clone(),
        };
        std::thread::spawn(move || shipper.run(&spool, Duration::from_secs(600)))
    };
    let outcome = supervise(shared, lease, control, &prepared, &mut child, started);
    // A container's end as podman saw it, before the kill removes it.
    let container_end = match outcome {
        Outcome::Exited(code) => shared.isolation.container_end(&prepared, code),
        _ => None,
    };
    // Whatever the job left behind (daemons, `setsid` children) dies with it.
    shared.isolation.kill(&prepared, child.id());
    if !spool.wait_closed(Duration::from_secs(5)) {
        eprintln!("agent {}: {name}: output pipe still open after the kill", shared.site);
    }
    let _ = filler.join();
    let oom = shared.isolation.oom_killed(&prepared);
    shared.isolation.cleanup(&prepared);
    let shipped = shipper.join().unwrap_or(Shipped::GaveUp);
    spool.remove();
    let wall_s = started.elapsed().as_secs().max(1);
    let (end, exit_code, message) = match (outcome, container_end) {
        (Outcome::Exited(code), Some(container::Ended::EngineFailed(why))) => {
            (AttemptEnd::Infrastructure, code, Some(format!("the container engine failed: {why}")))
        }
        (Outcome::Exited(code), Some(container::Ended::CommandFailed(_))) => (
            AttemptEnd::Exited,
            code,
            Some(format!(
                "the command cannot be run in the image {} (see the log)",
                lease.image.as_deref().unwrap_or("")
            )),
        ),
        (Outcome::Exited(code), _) if oom => (
            AttemptEnd::MemoryLimit,
            code,
            Some(format!("killed by the kernel over its memory limit of {} MiB", prepared.memory_mb)),
        ),
        (Outcome::Exited(code), _) => (AttemptEnd::Exited, code, None),
        (Outcome::TimeLimit, _) => {
            (AttemptEnd::TimeLimit, 137, Some(format!("time limit of {} s", lease.time_limit_s)))
        }
        (Outcome::Stopped, _) => (AttemptEnd::Stopped, 137, None),
        (Outcome::LeaseLost, _) => {
            eprintln!("agent {}: {name}: killed: no word from the server for a lease period", shared.site);
            (AttemptEnd::Infrastructure, 137, Some("lease lost: the agent could not reach the server".into()))
        }
    };
    if let Shipped::GaveUp = shipped {
        eprintln!("agent {}: {name}: could not deliver all output", shared.site);
    }
    if shared.retention_s == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if end == AttemptEnd::Stopped {
        // The server asked for the stop and has already ended the attempt.
        let _ = client.post_with::<_, serde::de::IgnoredAny>(
            &format!("{base}/finish"),
            &secret,
            &FinishRequest { end: AttemptEnd::Infrastructure, exit_code, wall_s, gpus: None, message: None },
        );
        return Ok(());
    }
    finish(end, exit_code, wall_s, message)
}

enum Outcome {
    Exited(i32),
    TimeLimit,
    Stopped,
    LeaseLost,
}

/// Watches the attempt: heartbeats, the stop switch, the time limit, and
/// the lease. Returns how it ended; the caller kills what is left.
fn supervise(
    shared: &Shared,
    lease: &Lease,
    control: &Control,
    prepared: &Prepared,
    child: &mut std::process::Child,
    started: Instant,
) -> Outcome {
    // Reports here must not block past the lease margin: a server that
    // accepts connections but does not answer must not keep the attempt alive.
    let client = &shared.client.with_timeout(Duration::from_secs((lease.lease_s / 4).clamp(1, 10)));
    let base = format!("/v1/agent/attempts/{}/{}", lease.job, lease.attempt);
    let secret = [("X-Attempt-Secret", lease.secret.as_str())];
    let _ = retry(Duration::from_secs(lease.lease_s.max(2) / 2), || {
        client.post_with::<_, serde::de::IgnoredAny>(&format!("{base}/start"), &secret, &())
    });
    let limit = Duration::from_secs(lease.time_limit_s.max(1));
    let beat = Duration::from_secs(lease.heartbeat_s.max(1));
    // The server expires the lease `lease_s` after it last heard from us; we
    // count from when we *sent* our last report that got an answer (which
    // it received after that), and stop two seconds early.
    let lease_margin = Duration::from_secs(lease.lease_s.saturating_sub(2).max(1));
    let mut last_acknowledged = Instant::now();
    let mut last_beat = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let code = status
                .code()
                .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
            return Outcome::Exited(code);
        }
        if control.stop.load(Ordering::SeqCst) {
            shared.isolation.kill(prepared, child.id());
            return Outcome::Stopped;
        }
        if started.elapsed() > limit {
            shared.isolation.kill(prepared, child.id());
            return Outcome::TimeLimit;
        }
        if last_beat.elapsed() >= beat {
            let sent = Instant::now();
            last_beat = sent;
            match client.post_with::<_, HeartbeatResponse>(&format!("{base}/heartbeat"), &secret, &()) {
                Ok(HeartbeatResponse { stop: false }) => last_acknowledged = sent,
                // A rotation: running attempts keep reporting without
                // waiting for the main loop to notice.
                Err(ClientError::Api { status: 401, .. }) => {
                    shared.token.refresh(&shared.client);
                }
                Ok(HeartbeatResponse { stop: true }) | Err(ClientError::Api { status: 403 | 404 | 409, .. }) => {
                    shared.isolation.kill(prepared, child.id());
                    return Outcome::Stopped;
                }
                Err(_) => {}
            }
        }
        if last_acknowledged.elapsed() > lease_margin {
            shared.isolation.kill(prepared, child.id());
            return Outcome::LeaseLost;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
