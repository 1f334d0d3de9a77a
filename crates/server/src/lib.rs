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
    let world = world::start(ledger, topology.clone(), &config.policy, config.timings)?;
    let tokens = auth::Tokens::new(config.db.clone());
    Ok(http::AppState { world, tokens, topology, db: config.db.clone(), timings: config.timings })
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
    if let Some(bound) = bound {
        let _ = bound.send(address);
    }
    axum::serve(listener, http::router(state)).await?;
    Ok(())
}
