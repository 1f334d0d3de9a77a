//! # suanwang-server
//!
//! The control plane: an HTTP/JSON API (axum on tokio) in front of one
//! writer thread that owns the SQLite database (jobs, attempts, events,
//! logs, tokens, and the voucher ledger) and the deterministic scheduler
//! core. Site agents lease work from it by long poll.
//!
//! - [`world`]: the state, the writer with group commit, every state change;
//! - [`http`]: routes, extractors, handlers, OpenAPI;
//! - [`auth`]: tokens and roles;
//! - [`admin`]: bootstrap and administration straight on the database file;
//! - [`validate`]: the limits every request field is checked against.

pub mod admin;
pub mod auth;
pub mod error;
pub mod http;
pub mod validate;
pub mod world;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use suanwang_ledger::Ledger;

pub use world::Timings;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub db: PathBuf,
    /// Topology file or bundled name.
    pub topology: String,
    pub listen: SocketAddr,
    pub policy: String,
    pub timings: Timings,
    /// Signed checkpoints of the ledger written while serving, if configured.
    pub checkpoints: Option<Checkpoints>,
}

/// Periodic signed checkpoints of the ledger's head, for auditors to
/// collect: each one verifies the whole book first and is written only
/// when the head moved.
#[derive(Clone)]
pub struct Checkpoints {
    /// The operator's Ed25519 secret key.
    pub secret: [u8; 32],
    /// Where the checkpoint files go.
    pub dir: PathBuf,
    /// Seconds between two checkpoints.
    pub every_s: u64,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret key.
        f.debug_struct("Checkpoints").field("dir", &self.dir).field("every_s", &self.every_s).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Topology(#[from] suanwang_topology::LoadError),
    #[error(transparent)]
    Ledger(#[from] suanwang_ledger::LedgerError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("tokens: {0}")]
    Tokens(#[from] rusqlite::Error),
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Config(String),
}

/// Opens the database and starts the writer; returns the router's state.
/// The database remembers its network: the first start stores the topology
/// given; later starts use the stored one (which `suanwang admin site`
/// extends), and refuse a different network.
pub fn open(config: &ServerConfig) -> Result<http::AppState, ServeError> {
    config.timings.check().map_err(ServeError::Config)?;
    let requested = suanwang_topology::load_spec(&config.topology)?;
    let spec = match admin::stored_network(&config.db).map_err(|e| ServeError::Network(e.to_string()))? {
        Some(stored) if stored.name != requested.name => {
            return Err(ServeError::Network(format!(
                "{} holds network '{}', not '{}' (--topology {})",
                config.db.display(),
                stored.name,
                requested.name,
                config.topology
            )));
        }
        Some(stored) => stored,
        None => {
            admin::store_network(&config.db, &requested).map_err(|e| ServeError::Network(e.to_string()))?;
            requested
        }
    };
    let topology = Arc::new(suanwang_topology::build(&spec, std::path::Path::new(&config.topology))?);
    let ledger = Ledger::open(&config.db)?;
    // Current jobs' secrets are in the file (and its write-ahead log): the
    // server's user only, whoever made it and whatever the umask was.
    for suffix in ["", "-wal", "-shm"] {
        let path = std::path::PathBuf::from(format!("{}{suffix}", config.db.display()));
        if path.exists() {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| ServeError::Config(format!("{}: cannot make it private: {e}", path.display())))?;
        }
    }
    let world = world::start(ledger, topology.clone(), &config.policy, config.timings)?;
    let tokens = auth::Tokens::new(config.db.clone());
    Ok(http::AppState { world, tokens, topology, db: config.db.clone(), timings: config.timings })
}

/// Verifies and signs the ledger's head every `every_s` seconds (the first
/// at start), beside the writer: verify reads its own snapshot.
async fn checkpoint_loop(db: PathBuf, c: Checkpoints) {
    let mut interval = tokio::time::interval(Duration::from_secs(c.every_s.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The newest head this server signed: it must be extended even if its
    // file is removed or a copy of an older one is put in its place.
    let last = std::sync::Arc::new(std::sync::Mutex::new(None));
    loop {
        interval.tick().await;
        let (db, c2, last) = (db.clone(), c.clone(), last.clone());
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let done = tokio::task::spawn_blocking(move || {
            let mut last = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            suanwang_ledger::checkpoint::write_periodic(&db, &c2.secret, &c2.dir, at, &mut last)
        })
        .await;
        match done {
            Ok(Ok(suanwang_ledger::checkpoint::Periodic::Written(checkpoint, path))) => {
                eprintln!(
                    "suanwang server: checkpoint of head {}:{} written to {}",
                    checkpoint.seq,
                    checkpoint.head,
                    path.display()
                );
            }
            Ok(Ok(suanwang_ledger::checkpoint::Periodic::Unchanged(_))) => {}
            // Loud, and no checkpoint: an auditor must never get a signed
            // head of a book that does not verify, or that rewrote a head
            // it signed before.
            Ok(Err(e)) => eprintln!("suanwang server: NO CHECKPOINT: the ledger does not verify: {e}"),
            Err(e) => eprintln!("suanwang server: the checkpoint task failed: {e}"),
        }
    }
}

/// Serves until the process is stopped. `bound` receives the address once
/// the socket is listening (port 0 picks a free one).
pub async fn serve(
    config: ServerConfig,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    let state = open(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| {
        ServeError::Config(if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "cannot listen on {}: the port is in use (another suanwang?); choose another with --listen",
                config.listen
            )
        } else {
            format!("cannot listen on {}: {e}", config.listen)
        })
    })?;
    let address = listener.local_addr()?;
    let world = state.world.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            interval.tick().await;
            if world.call(|s, b| s.tick(b)).await.is_err() {
                break;
            }
        }
    });
    if let Some(checkpoints) = config.checkpoints.clone() {
        tokio::spawn(checkpoint_loop(config.db.clone(), checkpoints));
    }
    if let Some(bound) = bound {
        let _ = bound.send(address);
    }
    axum::serve(listener, http::router(state)).await?;
    Ok(())
}
