//! Bearer tokens and roles. Tokens are random 256-bit values shown once;
//! only their SHA-256 is stored. An operator sees everything; a provider
//! token is bound to one site (its agent); a consumer token to one
//! organisation, whose jobs, bills and vouchers are all it can see.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rusqlite::params;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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

/// A fresh token: 32 random bytes from the kernel, as hex, with a prefix
/// that says what it is.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("sw_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The tokens, cached in memory for the request path (the database is the
/// source of truth; the cache is filled at start and on every new token).
#[derive(Clone, Default)]
pub struct Tokens {
    map: Arc<RwLock<HashMap<[u8; 32], Principal>>>,
    /// The database, for tokens created by `suanwang admin` while serving.
    db: PathBuf,
}

impl Tokens {
    pub fn load(sql: &rusqlite::Connection, db: PathBuf) -> rusqlite::Result<Tokens> {
        let tokens = Tokens { map: Default::default(), db };
        let mut stmt = sql.prepare("SELECT hash, role, org, site, label FROM tokens")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        for row in rows {
            let (h, role, org, site, label) = row?;
            if let (Ok(h), Some(role)) = (<[u8; 32]>::try_from(h.as_slice()), role_of(&role, org, site)) {
                tokens.map.write().expect("tokens lock").insert(h, Principal { role, label });
            }
        }
        Ok(tokens)
    }

    pub fn insert(&self, h: [u8; 32], principal: Principal) {
        self.map.write().expect("tokens lock").insert(h, principal);
    }

    pub fn find(&self, token: &str) -> Option<Principal> {
        let h = hash(token);
        if let Some(p) = self.map.read().expect("tokens lock").get(&h) {
            return Some(p.clone());
        }
        // Not cached: it may have been created offline since the start.
        let conn = rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
        let (role, org, site, label): (String, Option<String>, Option<String>, String) = conn
            .query_row("SELECT role, org, site, label FROM tokens WHERE hash = ?1", [h.to_vec()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .ok()?;
        let principal = Principal { role: role_of(&role, org, site)?, label };
        self.insert(h, principal.clone());
        Some(principal)
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

/// Stores a new token's hash; returns the token (the only time it is seen).
pub fn create(sql: &rusqlite::Connection, role: &Role, label: &str, now: i64) -> Result<(String, [u8; 32])> {
    let token = new_token().map_err(Error::internal)?;
    let h = hash(&token);
    let (org, site) = match role {
        Role::Operator => (None, None),
        Role::Provider { site } => (None, Some(site.clone())),
        Role::Consumer { org } => (Some(org.clone()), None),
    };
    sql.execute(
        "INSERT INTO tokens (hash, role, org, site, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![h.to_vec(), role.name(), org, site, label, now],
    )?;
    Ok((token, h))
}
