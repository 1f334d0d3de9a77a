//! Administration straight on the database file (`suanwang admin`), for
//! the first operator token and for setting up organisations and tokens
//! with or without a running server. SQLite's locking makes this safe
//! while the server runs; the server picks up new tokens on first use.

use std::path::Path;

use rusqlite::{OptionalExtension, params};
use suanwang_ledger::voucher::{self, OrgKind};
use suanwang_ledger::{Ledger, LedgerError};

use crate::auth::{self, Role};
use crate::world::{SCHEMA, unix_now};

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
        b.sql().execute_batch(SCHEMA)?;
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
    token(&mut ledger, &Role::Operator, "bootstrap")
}

fn token(ledger: &mut Ledger, role: &Role, label: &str) -> Result<String, AdminError> {
    let now = unix_now();
    let mut out = None;
    ledger.write(now, |b| {
        out = Some(
            auth::create(b.sql(), role, label, now)
                .map_err(|e| LedgerError::Corrupt { path: "tokens".into(), problem: e.body.message })?,
        );
        Ok(())
    })?;
    Ok(out.expect("token created").0)
}

/// Registers an organisation (idempotent) with an optional home site.
pub fn add_org(db: &Path, id: &str, kind: &str, name: &str, home: Option<&str>) -> Result<(), AdminError> {
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

/// Creates a token for a role; the token is returned once.
pub fn create_token(db: &Path, role: &Role, label: &str) -> Result<String, AdminError> {
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
    token(&mut ledger, role, label)
}
