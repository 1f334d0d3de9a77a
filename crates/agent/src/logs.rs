//! An attempt's output, from its pipe to the server, in bounded memory.
//!
//! The reader copies the pipe into a spool file on the agent's disk (the
//! job is never slowed by the network) up to the attempt's log quota;
//! beyond it only the last [`TAIL_BYTES`] are kept, in memory. The shipper
//! sends the spool in chunks of at most [`CHUNK_BYTES`], each with its
//! offset in the stream, so a chunk sent again after a lost answer is not
//! stored twice; while the server is away it waits and retries, the spool
//! holding what the job prints meanwhile. At the end, the tail goes last
//! and the server marks how much was dropped in between.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use suanwang_api::LogAck;
use suanwang_api::client::{Client, ClientError};

/// Largest chunk sent in one request (the server refuses more).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Bytes of output kept after the quota ran out.
pub const TAIL_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct Progress {
    /// Bytes the job printed in all.
    total: u64,
    /// Bytes in the spool file (at most the quota).
    spooled: u64,
    /// The last bytes printed, once past the quota.
    tail: std::collections::VecDeque<u8>,
    /// The pipe is closed: no more output.
    closed: bool,
}

/// Shared between the reader, the shipper and the attempt's supervisor.
pub struct Spool {
    path: PathBuf,
    quota: u64,
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Spool {
    pub fn create(path: &Path, quota: u64) -> std::io::Result<Arc<Spool>> {
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        drop(file);
        Ok(Arc::new(Spool {
            path: path.to_path_buf(),
            quota,
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        }))
    }

    /// Copies `from` into the spool until it closes (run on its own thread).
    pub fn fill(self: &Arc<Self>, mut from: impl Read) {
        let mut file = match std::fs::OpenOptions::new().append(true).open(&self.path) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("agent: spool {}: {e}", self.path.display());
                None
            }
        };
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut p = self.progress.lock().expect("spool lock");
            let room = self.quota.saturating_sub(p.spooled) as usize;
            let to_file = n.min(room);
            if to_file > 0 {
                if let Some(f) = file.as_mut()
                    && f.write_all(&buffer[..to_file]).is_ok()
                {
                    p.spooled += to_file as u64;
                } else {
                    // The agent's disk failed: what cannot be spooled is counted as dropped.
                    file = None;
                }
            }
            if to_file < n {
                p.tail.extend(&buffer[to_file..n]);
                let excess = p.tail.len().saturating_sub(TAIL_BYTES);
                p.tail.drain(..excess);
            }
            p.total += n as u64;
            drop(p);
            self.changed.notify_all();
        }
        self.progress.lock().expect("spool lock").closed = true;
        self.changed.notify_all();
    }

    /// Counts `n` bytes of output that were never read (skipped in a file
    /// far past the quota) as printed and dropped. They came after the
    /// tail kept so far, so that tail is no longer the last output.
    pub fn skipped(&self, n: u64) {
        let mut p = self.progress.lock().expect("spool lock");
        p.total += n;
        p.tail.clear();
        drop(p);
        self.changed.notify_all();
    }

    /// The attempt's log quota: what the spool keeps before only a tail.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    fn snapshot(&self) -> (u64, u64, bool) {
        let p = self.progress.lock().expect("spool lock");
        (p.total, p.spooled, p.closed)
    }

    /// Waits until there is output beyond `offset`, the pipe closes, or `timeout`.
    fn wait_beyond(&self, offset: u64, timeout: Duration) {
        let p = self.progress.lock().expect("spool lock");
        let _ = self.changed.wait_timeout_while(p, timeout, |p| p.spooled <= offset && !p.closed);
    }

    /// Has the pipe closed?
    pub fn closed(&self) -> bool {
        self.snapshot().2
    }

    /// Waits up to `timeout` for the pipe to close.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let p = self.progress.lock().expect("spool lock");
        let (p, _) = self.changed.wait_timeout_while(p, timeout, |p| !p.closed).expect("spool lock");
        p.closed
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why shipping stopped for good.
pub enum Shipped {
    /// Everything the job printed is at the server (or marked dropped there).
    All,
    /// The server refused the attempt's logs (not current, wrong secret).
    Refused(ClientError),
    /// The server stayed unreachable past the deadline.
    GaveUp,
}

/// Sends an attempt's spool to the server.
pub struct Shipper {
    pub client: Client,
    pub path: String,
    pub secret: String,
    /// Read again on a 401: the token may have been rotated.
    pub token: crate::TokenSource,
}

impl Shipper {
    fn send(&self, offset: u64, tail: bool, data: &[u8]) -> Result<LogAck, ClientError> {
        let path = format!("{}?offset={offset}{}", self.path, if tail { "&tail=true" } else { "" });
        self.client.post_bytes_with(&path, &[("X-Attempt-Secret", &self.secret)], data)
    }

    /// Ships until the pipe has closed and everything is sent; while the
    /// pipe is open, a transport error waits and retries. After the pipe
    /// closes, gives up once the server has been unreachable for `patience`.
    pub fn run(&self, spool: &Spool, patience: Duration) -> Shipped {
        let mut received = 0u64;
        let mut over_quota = false;
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut unreachable_since: Option<Instant> = None;
        let mut wait = Duration::from_millis(100);
        loop {
            let (_, spooled, closed) = spool.snapshot();
            if received >= spooled || over_quota {
                if closed {
                    break;
                }
                spool.wait_beyond(received, Duration::from_millis(250));
                continue;
            }
            let n = ((spooled - received) as usize).min(CHUNK_BYTES);
            let read = File::open(&spool.path)
                .and_then(|mut f| f.seek(SeekFrom::Start(received)).and_then(|_| f.read_exact(&mut buffer[..n])));
            if let Err(e) = read {
                eprintln!("agent: reading spool {}: {e}", spool.path.display());
                return Shipped::GaveUp;
            }
            match self.send(received, false, &buffer[..n]) {
                Ok(ack) => {
                    received = ack.received.max(received);
                    over_quota = ack.over_quota;
                    unreachable_since = None;
                    wait = Duration::from_millis(100);
                }
                // The server has less (or more) than we thought: ask it where to resume.
                Err(ClientError::Api { status: 409, .. }) => match self.send(0, false, &[]) {
                    Ok(ack) => received = ack.received,
                    Err(e) => return Shipped::Refused(e),
                },
                Err(e @ (ClientError::Transport(_) | ClientError::Api { status: 401, .. })) => {
                    if matches!(e, ClientError::Api { .. }) {
                        self.token.refresh(&self.client);
                    }
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if spool.closed() && since.elapsed() > patience {
                        return Shipped::GaveUp;
                    }
                    eprintln!("agent: shipping logs: {e}; retrying in {wait:?}");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Shipped::Refused(e),
            }
        }
        // Past the quota: the tail, so the last lines (the error, usually) are kept.
        let (total, spooled, mut tail) = {
            let p = spool.progress.lock().expect("spool lock");
            (p.total, p.spooled, p.tail.iter().copied().collect::<Vec<u8>>())
        };
        // The server may have stopped taking output before the spool was
        // full (its quota for the organisation): the tail then starts in
        // the spool file.
        let from_file = (TAIL_BYTES - tail.len().min(TAIL_BYTES)) as u64;
        let start = spooled.saturating_sub(from_file).max(received);
        if start < spooled {
            let mut head = vec![0u8; (spooled - start) as usize];
            let read = File::open(&spool.path)
                .and_then(|mut f| f.seek(SeekFrom::Start(start)).and_then(|_| f.read_exact(&mut head)));
            if read.is_ok() {
                head.extend_from_slice(&tail);
                tail = head;
            }
        }
        let offset = (total - tail.len() as u64).max(received);
        let tail = &tail[(offset - (total - tail.len() as u64)) as usize..];
        if total > received {
            let started = Instant::now();
            loop {
                match self.send(offset, true, tail) {
                    Ok(_) => break,
                    Err(ClientError::Transport(_)) if started.elapsed() < patience => {
                        std::thread::sleep(Duration::from_secs(1))
                    }
                    Err(ClientError::Transport(_)) => return Shipped::GaveUp,
                    Err(e) => return Shipped::Refused(e),
                }
            }
        }
        Shipped::All
    }
}
