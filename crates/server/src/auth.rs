//! Bearer tokens and roles. Tokens are random 256-bit values shown once;
//! only their SHA-256 is stored, with a public id (the first 12 hex digits
//! of the hash) for listing and revoking. An operator sees everything; a
//! provider token is bound to one site (its agent); a consumer token to one
//! organisation, whose jobs, bills and vouchers are all it can see.
//!
//! A token may expire and may be revoked, by the API or by `suanwang admin`
//! on the database file while the server runs: the in-memory cache re-reads
//! a token's row when its entry is older than [`RECHECK`], so a revocation
//! made behind the server's back takes effect within that time.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};
use suanwang_api::TokenInfo;

use crate::error::{Error, Result};

/// How long a cached token is trusted before its row is read again.
pub const RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Operator,
    Provider { site: String },
    Consumer { org: String },
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Provider { .. } => "provider",
            Role::Consumer { .. } => "consumer",
        }
    }

    /// The role as the API names it.
    pub fn api(&self) -> suanwang_api::Role {
        match self {
            Role::Operator => suanwang_api::Role::Operator,
            Role::Provider { .. } => suanwang_api::Role::Provider,
            Role::Consumer { .. } => suanwang_api::Role::Consumer,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub label: String,
}

impl Principal {
    pub fn require_operator(&self) -> Result<()> {
        match self.role {
            Role::Operator => Ok(()),
            _ => Err(Error::forbidden("only an operator may do this")),
        }
    }

    /// May this principal see and act on the organisation's jobs and money?
    pub fn may_act_for(&self, org: &str) -> bool {
        match &self.role {
            Role::Operator => true,
            Role::Consumer { org: mine } => mine == org,
            Role::Provider { .. } => false,
        }
    }
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token's public id: the first 12 hex digits of its hash.
pub fn public_id(hash: &[u8]) -> String {
    hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets' hashes without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh token: 32 random bytes from the kernel, as hex, with a prefix
/// that says what it is.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("sw_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

#[derive(Clone)]
struct Cached {
    principal: Principal,
    expires_at: Option<i64>,
    checked: Instant,
}

/// The tokens, cached in memory for the request path (the database is the
/// source of truth).
#[derive(Clone, Default)]
pub struct Tokens {
    map: Arc<RwLock<HashMap<[u8; 32], Cached>>>,
    /// The database, for tokens created or revoked by `suanwang admin` while serving.
    db: PathBuf,
}

/// A token's row: role, org, site, label, expiry, revocation.
type TokenRow = (String, Option<String>, Option<String>, String, Option<i64>, Option<i64>);

fn read_row(sql: &rusqlite::Connection, h: &[u8; 32]) -> rusqlite::Result<Option<TokenRow>> {
    sql.query_row(
        "SELECT role, org, site, label, expires_at, revoked_at FROM tokens WHERE hash = ?1",
        [h.to_vec()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
    )
    .optional()
}

impl Tokens {
    pub fn new(db: PathBuf) -> Tokens {
        Tokens { map: Default::default(), db }
    }

    /// Forgets a token at once (revoked through the API).
    pub fn forget(&self, id: &str) {
        self.map.write().expect("tokens lock").retain(|h, _| public_id(h) != id);
    }

    /// The principal of a valid token: known, not revoked, not expired.
    pub fn find(&self, token: &str, now: i64) -> Option<Principal> {
        let h = hash(token);
        if let Some(c) = self.map.read().expect("tokens lock").get(&h)
            && c.checked.elapsed() < RECHECK
        {
            return c.expires_at.is_none_or(|at| now < at).then(|| c.principal.clone());
        }
        let conn = rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
        conn.busy_timeout(Duration::from_secs(5)).ok()?;
        let row = read_row(&conn, &h).ok()?;
        let Some((role, org, site, label, expires_at, revoked_at)) = row else {
            self.map.write().expect("tokens lock").remove(&h);
            return None;
        };
        if revoked_at.is_some() {
            self.map.write().expect("tokens lock").remove(&h);
            return None;
        }
        let principal = Principal { role: role_of(&role, org, site)?, label };
        self.map
            .write()
            .expect("tokens lock")
            .insert(h, Cached { principal: principal.clone(), expires_at, checked: Instant::now() });
        expires_at.is_none_or(|at| now < at).then_some(principal)
    }
}

fn role_of(role: &str, org: Option<String>, site: Option<String>) -> Option<Role> {
    match (role, org, site) {
        ("operator", _, _) => Some(Role::Operator),
        ("provider", _, Some(site)) => Some(Role::Provider { site }),
        ("consumer", Some(org), _) => Some(Role::Consumer { org }),
        _ => None,
    }
}

/// Stores a new token's hash; returns the token (the only time it is seen)
/// and its public id.
pub fn create(
    sql: &rusqlite::Connection,
    role: &Role,
    label: &str,
    now: i64,
    expires_in_s: Option<u64>,
) -> Result<(String, String)> {
    crate::validate::display_name("label", label)?;
    if let Some(s) = expires_in_s
        && (s == 0 || s > 10 * 365 * 86_400)
    {
        return Err(Error::invalid("expires_in_s", format!("must be between 1 and {}, got {s}", 10 * 365 * 86_400)));
    }
    let token = new_token().map_err(Error::internal)?;
    let h = hash(&token);
    let id = public_id(&h);
    let (org, site) = match role {
        Role::Operator => (None, None),
        Role::Provider { site } => (None, Some(site.clone())),
        Role::Consumer { org } => (Some(org.clone()), None),
    };
    sql.execute(
        "INSERT INTO tokens (hash, role, org, site, label, created_at, id, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![h.to_vec(), role.name(), org, site, label, now, id, expires_in_s.map(|s| now + s as i64)],
    )?;
    Ok((token, id))
}

/// Every token, oldest first (never the tokens themselves).
pub fn list(sql: &rusqlite::Connection) -> Result<Vec<TokenInfo>> {
    let mut stmt = sql.prepare(
        "SELECT id, role, org, site, label, created_at, expires_at, revoked_at FROM tokens ORDER BY created_at, id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            let role: String = r.get(1)?;
            Ok(TokenInfo {
                id: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                role: match role.as_str() {
                    "operator" => suanwang_api::Role::Operator,
                    "provider" => suanwang_api::Role::Provider,
                    _ => suanwang_api::Role::Consumer,
                },
                org: r.get(2)?,
                site: r.get(3)?,
                label: r.get(4)?,
                created_at: r.get(5)?,
                expires_at: r.get(6)?,
                revoked_at: r.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Revokes a token by its public id; revoking twice is accepted.
pub fn revoke(sql: &rusqlite::Connection, id: &str, now: i64) -> Result<TokenInfo> {
    let changed =
        sql.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1", params![id, now])?;
    if changed == 0 {
        return Err(Error::not_found("token", id));
    }
    list(sql)?.into_iter().find(|t| t.id == id).ok_or_else(|| Error::not_found("token", id))
}
