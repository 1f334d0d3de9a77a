//! # suanwang-agent
//!
//! A site agent: it leases attempts for its site from the server (long
//! poll), runs each on the site's backend, ships its output, sends
//! heartbeats (which also tell it to stop a cancelled attempt), and reports
//! how the attempt ended. If the server is unreachable it retries, with a
//! bound on the wait; an attempt's report names its attempt number, so a
//! late report from an attempt the server has given up on is refused there
//! and never counts.
//!
//! The local backend runs real processes, each in its own working directory
//! and process group, with stdout and stderr captured, killed (the whole
//! group) on cancel or at the attempt's time limit.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use suanwang_api::client::{Client, ClientError};
use suanwang_api::{FinishRequest, HeartbeatResponse, Lease, LeaseRequest, LeaseResponse};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub token: String,
    /// Working directories of attempts go here.
    pub workdir: PathBuf,
    /// Seconds a lease request waits on the server for work.
    pub poll_wait_s: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Api(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the agent until the process is stopped.
pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.workdir)?;
    let client = Client::new(&config.server, &config.token);
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.post::<_, LeaseResponse>("/v1/agent/lease", &LeaseRequest { wait_s: config.poll_wait_s }) {
            Ok(LeaseResponse { lease: Some(lease) }) => {
                backoff = Duration::from_millis(200);
                let client = client.clone();
                let workdir = config.workdir.clone();
                std::thread::spawn(move || {
                    if let Err(e) = run_attempt(&client, &workdir, &lease) {
                        eprintln!("agent: job {} attempt {}: {e}", lease.job, lease.attempt);
                    }
                });
            }
            Ok(LeaseResponse { lease: None }) => backoff = Duration::from_millis(200),
            // A refused token will not get better: stop.
            Err(ClientError::Api { status: 401 | 403, error }) => {
                return Err(AgentError::Api(ClientError::Api { status: 401, error }));
            }
            Err(e) => {
                eprintln!("agent: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
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

fn kill_group(child: &Child) {
    // The child leads its own process group: kill everything it started.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
}

enum Output {
    Chunk(Vec<u8>),
    Closed,
}

fn pipe(mut from: impl Read + Send + 'static, to: mpsc::Sender<Output>) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.send(Output::Chunk(buffer[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.send(Output::Closed);
    });
}

/// Runs one attempt to the end and reports it.
pub fn run_attempt(client: &Client, workdir: &std::path::Path, lease: &Lease) -> Result<(), AgentError> {
    let base = format!("/v1/agent/attempts/{}/{}", lease.job, lease.attempt);
    let dir = workdir.join(format!("job-{}-{}", lease.job, lease.attempt));
    std::fs::create_dir_all(&dir)?;
    let Some((program, args)) = lease.command.split_first() else {
        let report = FinishRequest {
            exit_code: 127,
            wall_s: 0,
            killed: Some("no command (container backends are not available here)".into()),
        };
        retry(Duration::from_secs(60), || {
            client.post::<_, serde_json_value::Value>(&format!("{base}/finish"), &report)
        })?;
        return Ok(());
    };
    let started = Instant::now();
    let spawned = Command::new(program)
        .args(args)
        .envs(&lease.env)
        .env("SUANWANG_JOB", lease.job.to_string())
        .env("SUANWANG_ATTEMPT", lease.attempt.to_string())
        .env("SUANWANG_GPUS", lease.gpus.to_string())
        .env("SUANWANG_ACCELERATOR", &lease.accelerator)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let message = format!("cannot start {program}: {e}\n");
            let _ = client.post_bytes::<serde_json_value::Value>(&format!("{base}/logs"), message.as_bytes());
            let report = FinishRequest { exit_code: 127, wall_s: 0, killed: None };
            retry(Duration::from_secs(60), || {
                client.post::<_, serde_json_value::Value>(&format!("{base}/finish"), &report)
            })?;
            return Ok(());
        }
    };
    retry(Duration::from_secs(30), || client.post::<_, serde_json_value::Value>(&format!("{base}/start"), &()))?;
    let (tx, rx) = mpsc::channel();
    pipe(child.stdout.take().expect("piped stdout"), tx.clone());
    pipe(child.stderr.take().expect("piped stderr"), tx);
    let mut open_pipes = 2;
    let mut pending: Vec<u8> = Vec::new();
    let mut last_ship = Instant::now();
    let mut last_beat = Instant::now();
    let mut killed: Option<String> = None;
    let limit = Duration::from_secs(lease.time_limit_s.max(1));
    let beat = Duration::from_secs(lease.heartbeat_s.max(1));
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Output::Chunk(data)) => pending.extend_from_slice(&data),
            Ok(Output::Closed) => open_pipes -= 1,
            Err(_) => {}
        }
        if !pending.is_empty() && (pending.len() > 64 * 1024 || last_ship.elapsed() > Duration::from_millis(250)) {
            // Logs are best effort: a failed shipment is dropped, not retried forever.
            let _ = client.post_bytes::<serde_json_value::Value>(&format!("{base}/logs"), &pending);
            pending.clear();
            last_ship = Instant::now();
        }
        if killed.is_none() && last_beat.elapsed() >= beat {
            last_beat = Instant::now();
            match client.post::<_, HeartbeatResponse>(&format!("{base}/heartbeat"), &()) {
                Ok(HeartbeatResponse { stop: true }) | Err(ClientError::Api { status: 404 | 409, .. }) => {
                    kill_group(&child);
                    killed = Some("stopped by the server".into());
                }
                _ => {}
            }
        }
        if killed.is_none() && started.elapsed() > limit {
            kill_group(&child);
            killed = Some("time limit".into());
        }
        if let Some(status) = child.try_wait()? {
            if open_pipes == 0 || started.elapsed() > limit + Duration::from_secs(5) {
                break status;
            }
            // Drain what the pipes still hold.
            while let Ok(out) = rx.recv_timeout(Duration::from_millis(50)) {
                match out {
                    Output::Chunk(data) => pending.extend_from_slice(&data),
                    Output::Closed => open_pipes -= 1,
                }
                if open_pipes == 0 {
                    break;
                }
            }
            break status;
        }
    };
    if !pending.is_empty() {
        let _ = client.post_bytes::<serde_json_value::Value>(&format!("{base}/logs"), &pending);
    }
    let exit_code = status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
    let report = FinishRequest { exit_code, wall_s: started.elapsed().as_secs().max(1), killed };
    match retry(Duration::from_secs(300), || {
        client.post::<_, serde_json_value::Value>(&format!("{base}/finish"), &report)
    }) {
        // The server no longer counts this attempt: nothing to do.
        Err(ClientError::Api { status: 409, .. }) => Ok(()),
        other => other.map(|_| ()).map_err(AgentError::from),
    }
}

/// Any JSON, for answers the agent does not read.
mod serde_json_value {
    pub type Value = serde::de::IgnoredAny;
}
