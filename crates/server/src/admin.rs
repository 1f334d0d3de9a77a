//! Administration straight on the database file (`suanwang admin`), for
//! the first operator token and for setting up organisations and tokens
//! with or without a running server. SQLite's locking makes this safe
//! while the server runs; the server picks up new tokens on first use.

use std::path::Path;

use rusqlite::{OptionalExtension, params};
use suanwang_core::topology::TopologySpec;
use suanwang_ledger::voucher::{self, OrgKind};
use suanwang_ledger::{Ledger, LedgerError};

use crate::auth::{self, Role};
use crate::world::{migrate, unix_now};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Invalid(String),
}

fn open(db: &Path) -> Result<Ledger, AdminError> {
    let now = unix_now();
    let mut ledger = voucher::open(db, now)?;
    ledger.write(now, |b| {
        migrate(b.sql())?;
        Ok(())
    })?;
    Ok(ledger)
}

/// Creates an operator token. Refused if one exists, unless `force`.
pub fn bootstrap(db: &Path, force: bool) -> Result<String, AdminError> {
    let mut ledger = open(db)?;
    let existing: Option<i64> = ledger
        .connection()
        .query_row("SELECT 1 FROM tokens WHERE role = 'operator' LIMIT 1", [], |r| r.get(0))
        .optional()
        .map_err(LedgerError::from)?;
    if existing.is_some() && !force {
        return Err(AdminError::Invalid("an operator token exists already; pass --force to make another".into()));
    }
    Ok(token(&mut ledger, &Role::Operator, "bootstrap", None)?.0)
}

/// A server-side refusal (bad label, bad expiry) as an admin error.
fn refusal(e: crate::error::Error) -> AdminError {
    match e.body.field {
        Some(field) => AdminError::Invalid(format!("--{}: {}", field.replace('_', "-"), e.body.message)),
        None => AdminError::Invalid(e.body.message),
    }
}

fn token(
    ledger: &mut Ledger,
    role: &Role,
    label: &str,
    expires_in_s: Option<u64>,
) -> Result<(String, String), AdminError> {
    let now = unix_now();
    let mut out = None;
    let mut refused = None;
    ledger.write(now, |b| {
        match auth::create(b.sql(), role, label, now, expires_in_s) {
            Ok(made) => out = Some(made),
            Err(e) => refused = Some(e),
        }
        Ok(())
    })?;
    match (out, refused) {
        (Some(made), _) => Ok(made),
        (None, Some(e)) => Err(refusal(e)),
        (None, None) => unreachable!("a token is made or refused"),
    }
}

/// Every token (never the tokens themselves).
pub fn list_tokens(db: &Path) -> Result<Vec<suanwang_api::TokenInfo>, AdminError> {
    let ledger = open(db)?;
    auth::list(ledger.connection()).map_err(refusal)
}

/// Revokes a token by its public id.
pub fn revoke_token(db: &Path, id: &str) -> Result<suanwang_api::TokenInfo, AdminError> {
    let mut ledger = open(db)?;
    let now = unix_now();
    let mut out = None;
    ledger.write(now, |b| {
        out = Some(auth::revoke(b.sql(), id, now));
        Ok(())
    })?;
    out.expect("ran").map_err(refusal)
}

/// Is this token known, unrevoked and unexpired? (For reusing a stored token.)
pub fn token_valid(db: &Path, token: &str) -> Result<bool, AdminError> {
    let ledger = open(db)?;
    let now = unix_now();
    let valid: Option<i64> = ledger
        .connection()
        .query_row(
            "SELECT 1 FROM tokens WHERE hash = ?1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)",
            params![auth::hash(token).to_vec(), now],
            |r| r.get(0),
        )
        .optional()
        .map_err(LedgerError::from)?;
    Ok(valid.is_some())
}

/// Revokes every unrevoked token with this role, site or organisation and
/// label except `keep` (so a restarted `suanwang up` leaves one live token
/// per agent); returns how many it revoked.
pub fn revoke_others(db: &Path, role: &Role, label: &str, keep: &str) -> Result<usize, AdminError> {
    let mut ledger = open(db)?;
    let now = unix_now();
    let (org, site) = match role {
        Role::Operator => (None, None),
        Role::Provider { site } => (None, Some(site.clone())),
        Role::Consumer { org } => (Some(org.clone()), None),
    };
    let keep = auth::public_id(&auth::hash(keep));
    let mut revoked = 0;
    ledger.write(now, |b| {
        revoked = b.sql().execute(
            "UPDATE tokens SET revoked_at = ?1 WHERE revoked_at IS NULL AND role = ?2 AND org IS ?3 AND site IS ?4 AND label = ?5 AND id != ?6",
            params![now, role.name(), org, site, label, keep],
        )?;
        Ok(())
    })?;
    Ok(revoked)
}

/// Registers an organisation (idempotent) with an optional home site.
pub fn add_org(db: &Path, id: &str, kind: &str, name: &str, home: Option<&str>) -> Result<(), AdminError> {
    crate::validate::identifier("id", id).map_err(|e| AdminError::Invalid(e.body.message))?;
    crate::validate::display_name("name", name)
        .map_err(|e| AdminError::Invalid(format!("--name: {}", e.body.message)))?;
    let kind: OrgKind = kind.parse().map_err(|e: suanwang_ledger::Refusal| AdminError::Invalid(e.to_string()))?;
    let mut ledger = open(db)?;
    ledger.write(unix_now(), |b| {
        voucher::add_org_in(b, id, kind, name)?;
        if let Some(home) = home {
            b.sql().execute("INSERT OR REPLACE INTO org_homes (org, home) VALUES (?1, ?2)", params![id, home])?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Creates a token for a role; the token and its public id are returned
/// (the token this once).
pub fn create_token(
    db: &Path,
    role: &Role,
    label: &str,
    expires_in_s: Option<u64>,
) -> Result<(String, String), AdminError> {
    let mut ledger = open(db)?;
    if let Role::Consumer { org } = role {
        let known: Option<i64> = ledger
            .connection()
            .query_row("SELECT 1 FROM orgs WHERE id = ?1", [org], |r| r.get(0))
            .optional()
            .map_err(LedgerError::from)?;
        if known.is_none() {
            return Err(AdminError::Invalid(format!("organisation '{org}' not found")));
        }
    }
    token(&mut ledger, role, label, expires_in_s)
}

const NETWORK_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS network (id INTEGER PRIMARY KEY CHECK (id = 1), spec TEXT NOT NULL)";

/// The network stored in the database, if any.
pub fn stored_network(db: &Path) -> Result<Option<TopologySpec>, AdminError> {
    let conn = rusqlite::Connection::open(db).map_err(LedgerError::from)?;
    conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(LedgerError::from)?;
    conn.execute_batch(NETWORK_TABLE).map_err(LedgerError::from)?;
    let text: Option<String> = conn
        .query_row("SELECT spec FROM network WHERE id = 1", [], |r| r.get(0))
        .optional()
        .map_err(LedgerError::from)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| AdminError::Invalid(format!("stored network: {e}")))).transpose()
}

/// Stores (or replaces) the database's network, after validating it.
pub fn store_network(db: &Path, spec: &TopologySpec) -> Result<(), AdminError> {
    spec.build()
        .map_err(|errors| AdminError::Invalid(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")))?;
    let conn = rusqlite::Connection::open(db).map_err(LedgerError::from)?;
    conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(LedgerError::from)?;
    conn.execute_batch(NETWORK_TABLE).map_err(LedgerError::from)?;
    let text = serde_json::to_string(spec).map_err(|e| AdminError::Invalid(e.to_string()))?;
    conn.execute("INSERT OR REPLACE INTO network (id, spec) VALUES (1, ?1)", [text]).map_err(LedgerError::from)?;
    Ok(())
}

/// Adds a site (and its links) to the database's network, storing
/// `default` first if the database has none. The server uses it from its
/// next start.
pub fn add_site(
    db: &Path,
    default: &str,
    site: suanwang_core::topology::SiteSpec,
    links: Vec<suanwang_core::topology::LinkSpec>,
) -> Result<TopologySpec, AdminError> {
    let mut spec = match stored_network(db)? {
        Some(spec) => spec,
        None => suanwang_topology::load_spec(default).map_err(|e| AdminError::Invalid(e.to_string()))?,
    };
    spec.sites.push(site);
    spec.links.extend(links);
    store_network(db, &spec)?;
    Ok(spec)
}
