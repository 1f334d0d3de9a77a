//! The double-entry ledger on SQLite.
//!
//! One [`Ledger`] owns one database file and is its only writer (the
//! [`crate::service`] puts it behind a thread for concurrent clients). Every
//! change happens in [`Ledger::write`]: one SQLite transaction (WAL,
//! `synchronous=FULL`, so a commit that returned survives a crash) in which
//! accounts are created and transfers applied, and which appends one entry to
//! the hash-chained journal. Account totals are kept in memory as well, so
//! the hot path reads no account rows.
//!
//! Records are append-only: transfers are never updated or deleted; a
//! pending transfer's fate is another transfer (post, void, expire).
//! [`verify`] replays the whole history from the file and checks it.

// foldhash, seeded per process: the writer's account caches are hashed
// on every transfer, and SipHash costs more than the rest of the lookup.
use foldhash::{HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use crate::error::{LedgerError, Refusal};
use crate::model::{Account, AccountId, NewAccount, NewTransfer, Transfer, TransferId, TransferKind, Unit, flags};

/// 2: the journal also covers row changes of the journaled tables, and
/// each entry's hash covers its sequence number, time and row ranges.
/// 3: account totals in their own narrow table.
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    unit TEXT NOT NULL,
    flags INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
-- An account's totals, by its row number: the only rows a commit rewrites,
-- kept narrow so that a commit touching thousands of accounts writes as
-- few pages as it can.
CREATE TABLE IF NOT EXISTS balances (
    seq INTEGER PRIMARY KEY,
    debits_pending INTEGER NOT NULL,
    debits_posted INTEGER NOT NULL,
    credits_pending INTEGER NOT NULL,
    credits_posted INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS transfers (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    debit BLOB NOT NULL,
    credit BLOB NOT NULL,
    amount INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    pending_id BLOB,
    timeout_s INTEGER NOT NULL,
    linked INTEGER NOT NULL,
    code INTEGER NOT NULL,
    memo TEXT NOT NULL,
    unit TEXT NOT NULL,
    at INTEGER NOT NULL
);
-- No index by account: every insert would dirty a random page of each,
-- which costs more than the rare history query (a scan) saves.
-- The fate of each pending transfer: 0 pending, 1 posted, 2 voided, 3 expired.
CREATE TABLE IF NOT EXISTS pending (
    id BLOB PRIMARY KEY,
    debit BLOB NOT NULL,
    credit BLOB NOT NULL,
    amount INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    state INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_open ON pending(expires_at) WHERE state = 0 AND expires_at > 0;
-- Requests that were refused, so that repeating one returns the same refusal.
CREATE TABLE IF NOT EXISTS refusals (
    id BLOB PRIMARY KEY,
    digest BLOB NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL
) WITHOUT ROWID;
-- One entry per commit: the account and transfer rows it added and the
-- row changes it made, chained by hash.
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    accounts_from INTEGER NOT NULL,
    accounts_to INTEGER NOT NULL,
    transfers_from INTEGER NOT NULL,
    transfers_to INTEGER NOT NULL,
    changes_from INTEGER NOT NULL,
    changes_to INTEGER NOT NULL,
    at INTEGER NOT NULL,
    hash BLOB NOT NULL
);
-- Every insert, update and delete of a journaled table, as its key and its
-- new row (NULL: deleted), each a JSON array of SQL literals. Triggers
-- write it, so no code path can change such a table unrecorded.
CREATE TABLE IF NOT EXISTS row_changes (
    seq INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    row TEXT
);
-- The tables whose changes the journal records besides the core ones
-- (the voucher tables), with their key and columns as JSON arrays.
CREATE TABLE IF NOT EXISTS journaled_tables (
    name TEXT PRIMARY KEY,
    key_columns TEXT NOT NULL,
    columns TEXT NOT NULL
);
";

/// State of a pending transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingState {
    Pending = 0,
    Posted = 1,
    Voided = 2,
    Expired = 3,
}

impl PendingState {
    pub(crate) fn from_code(code: i64) -> PendingState {
        match code {
            1 => PendingState::Posted,
            2 => PendingState::Voided,
            3 => PendingState::Expired,
            _ => PendingState::Pending,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingRecord {
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: i64,
    pub expires_at: i64,
    pub state: PendingState,
}

fn blob(id: u128) -> [u8; 16] {
    id.to_be_bytes()
}

fn from_blob(bytes: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = bytes.len().min(16);
    b[..n].copy_from_slice(&bytes[..n]);
    u128::from_be_bytes(b)
}

/// Applies a recorded transfer to account totals and pending records. The
/// writer and [`verify`] share it, so a replay computes exactly what the
/// writer stored.
pub(crate) fn apply_recorded(
    accounts: &mut HashMap<AccountId, Account>,
    pending: &mut HashMap<TransferId, PendingRecord>,
    t: &Transfer,
) -> Result<(), String> {
    if t.debit == t.credit {
        return Err(format!("transfer {} debits and credits the same account", t.id));
    }
    for id in [t.debit, t.credit] {
        if !accounts.contains_key(&id) {
            return Err(format!("transfer {} moves money of unknown account {id}", t.id));
        }
    }
    let a = t.amount;
    // (change of pending, change of posted), the same on both sides.
    let (pending_delta, posted_delta) = match t.kind {
        TransferKind::Posted => (0, a),
        TransferKind::Pending { timeout_s } => {
            // Saturating: a stored timeout beyond the limit (written before
            // it) never expires rather than wrapping into the past.
            let expires_at = if timeout_s > 0 { t.at.saturating_add(timeout_s) } else { 0 };
            pending.insert(
                t.id,
                PendingRecord { debit: t.debit, credit: t.credit, amount: a, expires_at, state: PendingState::Pending },
            );
            (a, 0)
        }
        TransferKind::PostPending { pending: p }
        | TransferKind::VoidPending { pending: p }
        | TransferKind::ExpirePending { pending: p } => {
            let record =
                pending.get_mut(&p).ok_or_else(|| format!("transfer {} resolves unknown pending {p}", t.id))?;
            if record.state != PendingState::Pending {
                return Err(format!("transfer {} resolves pending {p} twice", t.id));
            }
            if (record.debit, record.credit) != (t.debit, t.credit) || a > record.amount {
                return Err(format!("transfer {} does not match pending {p}", t.id));
            }
            let (state, posted) = match t.kind {
                TransferKind::PostPending { .. } => (PendingState::Posted, a),
                TransferKind::VoidPending { .. } => (PendingState::Voided, 0),
                _ => (PendingState::Expired, 0),
            };
            record.state = state;
            (-record.amount, posted)
        }
    };
    let debit = accounts.get_mut(&t.debit).expect("checked above");
    debit.debits_pending += pending_delta;
    debit.debits_posted += posted_delta;
    let credit = accounts.get_mut(&t.credit).expect("checked above");
    credit.credits_pending += pending_delta;
    credit.credits_posted += posted_delta;
    Ok(())
}

/// The canonical bytes of an account row, for the hash chain.
fn encode_account(out: &mut Vec<u8>, a: &Account) {
    out.push(b'A');
    out.extend_from_slice(&a.seq.to_be_bytes());
    out.extend_from_slice(&blob(a.id.0));
    for text in [&a.kind, &a.owner, &a.unit.to_string()] {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&a.flags.to_be_bytes());
    out.extend_from_slice(&a.created_at.to_be_bytes());
}

/// The canonical bytes of a transfer row, for the hash chain.
fn encode_transfer(out: &mut Vec<u8>, t: &Transfer) {
    out.push(b'T');
    out.extend_from_slice(&t.seq.to_be_bytes());
    out.extend_from_slice(&blob(t.id.0));
    out.extend_from_slice(&blob(t.debit.0));
    out.extend_from_slice(&blob(t.credit.0));
    out.extend_from_slice(&t.amount.to_be_bytes());
    out.push(t.kind.code() as u8);
    out.extend_from_slice(&blob(t.kind.pending_id().map_or(0, |p| p.0)));
    out.extend_from_slice(&t.kind.timeout_s().to_be_bytes());
    out.push(t.linked as u8);
    out.extend_from_slice(&t.code.to_be_bytes());
    for text in [t.memo.as_str(), &t.unit.text()] {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&t.at.to_be_bytes());
}

/// Digest of a request, to tell "the same request again" from "the same id, other content".
fn request_digest(t: &NewTransfer) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(blob(t.id.0));
    h.update(blob(t.debit.0));
    h.update(blob(t.credit.0));
    h.update(t.amount.to_be_bytes());
    h.update([t.kind.code() as u8, t.linked as u8]);
    h.update(blob(t.kind.pending_id().map_or(0, |p| p.0)));
    h.update(t.kind.timeout_s().to_be_bytes());
    h.update(t.code.to_be_bytes());
    h.update(t.memo.as_bytes());
    h.finalize().into()
}

/// The canonical bytes of a journal entry's own fields, for the hash
/// chain: its number, time and the ranges of rows it covers.
fn encode_header(seq: i64, at: i64, ranges: [(i64, i64); 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(65);
    out.push(b'H');
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&at.to_be_bytes());
    for (from, to) in ranges {
        out.extend_from_slice(&from.to_be_bytes());
        out.extend_from_slice(&to.to_be_bytes());
    }
    out
}

/// One recorded change of a journaled table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowChange {
    seq: i64,
    table: String,
    key: String,
    /// The row after the change; `None`: deleted.
    row: Option<String>,
}

fn read_change(row: &rusqlite::Row<'_>) -> rusqlite::Result<RowChange> {
    Ok(RowChange { seq: row.get(0)?, table: row.get(1)?, key: row.get(2)?, row: row.get(3)? })
}

/// The canonical bytes of a row change, for the hash chain.
fn encode_change(out: &mut Vec<u8>, c: &RowChange) {
    out.push(b'C');
    out.extend_from_slice(&c.seq.to_be_bytes());
    for text in [&c.table, &c.key] {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    match &c.row {
        None => out.push(0),
        Some(row) => {
            out.push(1);
            out.extend_from_slice(&(row.len() as u32).to_be_bytes());
            out.extend_from_slice(row.as_bytes());
        }
    }
}

fn chain(prev: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    for part in parts {
        h.update(part);
    }
    h.finalize().into()
}

/// A table besides the core ones whose every change the journal records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournaledTable {
    pub name: String,
    pub key: Vec<String>,
    pub columns: Vec<String>,
}

/// The core tables journaled by row change (the others are covered by the
/// replay of transfers): (name, key columns, columns).
const CORE_JOURNALED: [(&str, &[&str], &[&str]); 2] = [
    ("refusals", &["id"], &["id", "digest", "code", "message"]),
    ("journaled_tables", &["name"], &["name", "key_columns", "columns"]),
];

/// Tables whose content the replay of accounts and transfers checks.
const CORE_REPLAYED: [&str; 5] = ["accounts", "balances", "transfers", "pending", "journal"];

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `json_array(quote(P.c1), ...)`: the canonical text of a row (or key),
/// the same from a trigger (`P` = `NEW`/`OLD`) as from a query (no prefix),
/// and exact for every SQLite type (`quote` keeps integers, text and blobs apart).
fn canonical(prefix: &str, columns: &[String]) -> String {
    let cells: Vec<String> = columns
        .iter()
        .map(|c| if prefix.is_empty() { format!("quote(\"{c}\")") } else { format!("quote({prefix}.\"{c}\")") })
        .collect();
    format!("json_array({})", cells.join(", "))
}

/// The triggers that record every change of `t`: (name, statement). The
/// statement is exactly the text SQLite keeps for it, so a stored trigger
/// can be compared with what it must be.
fn trigger_sql(t: &JournaledTable) -> Vec<(String, String)> {
    let n = &t.name;
    let (new_key, old_key, new_row) =
        (canonical("NEW", &t.key), canonical("OLD", &t.key), canonical("NEW", &t.columns));
    vec![
        (
            format!("journal_{n}_insert"),
            format!(
                "CREATE TRIGGER journal_{n}_insert AFTER INSERT ON \"{n}\" BEGIN INSERT INTO row_changes (tbl, key, row) VALUES ('{n}', {new_key}, {new_row}); END"
            ),
        ),
        (
            format!("journal_{n}_update"),
            format!(
                "CREATE TRIGGER journal_{n}_update AFTER UPDATE ON \"{n}\" BEGIN INSERT INTO row_changes (tbl, key, row) SELECT '{n}', {old_key}, NULL WHERE {old_key} IS NOT {new_key}; INSERT INTO row_changes (tbl, key, row) VALUES ('{n}', {new_key}, {new_row}); END"
            ),
        ),
        (
            format!("journal_{n}_delete"),
            format!(
                "CREATE TRIGGER journal_{n}_delete AFTER DELETE ON \"{n}\" BEGIN INSERT INTO row_changes (tbl, key, row) VALUES ('{n}', {old_key}, NULL); END"
            ),
        ),
    ]
}

/// Makes `t`'s triggers exactly what they must be: missing ones created,
/// altered ones (another body under the ledger's name) replaced, right
/// ones left alone (no schema change, so other writers need not re-check).
fn create_triggers(conn: &Connection, t: &JournaledTable) -> Result<(), LedgerError> {
    for (name, sql) in trigger_sql(t) {
        let stored: Option<String> = conn
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1", [&name], |r| r.get(0))
            .optional()?;
        if stored.as_deref() == Some(sql.as_str()) {
            continue;
        }
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {name}; {sql};"))?;
    }
    Ok(())
}

/// The names of the triggers the ledger makes for `tables`.
fn trigger_names(tables: &[JournaledTable]) -> HashSet<String> {
    tables.iter().flat_map(|t| ["insert", "update", "delete"].map(|op| format!("journal_{}_{op}", t.name))).collect()
}

/// The tables journaled now: the core ones and the registered ones.
fn journaled_now(conn: &Connection) -> Result<Vec<JournaledTable>, LedgerError> {
    let mut tables = core_journaled();
    let mut stmt = conn.prepare("SELECT name, key_columns, columns FROM journaled_tables ORDER BY name")?;
    let rows: Vec<(String, String, String)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    for (name, key, columns) in rows {
        let list =
            |text: &str| serde_json::from_str::<Vec<String>>(text).ok().filter(|l| l.iter().all(|n| is_identifier(n)));
        match (is_identifier(&name), list(&key), list(&columns)) {
            (true, Some(key), Some(columns)) => tables.push(JournaledTable { name, key, columns }),
            _ => {
                return Err(LedgerError::Corrupt {
                    path: String::new(),
                    problem: format!("journaled_tables: unreadable entry for '{name}'"),
                });
            }
        }
    }
    Ok(tables)
}

/// Refuses a file with a trigger that is not the ledger's (it would act
/// inside the ledger's commits), and re-makes the ledger's own, so that a
/// trigger of the ledger's name with another body is replaced.
fn guard_triggers(conn: &Connection, path: &str) -> Result<(), LedgerError> {
    let tables = journaled_now(conn)?;
    let ours = trigger_names(&tables);
    let mut stmt = conn.prepare("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' ORDER BY name")?;
    let triggers: Vec<(String, String)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    if let Some((name, table)) = triggers.iter().find(|(name, _)| !ours.contains(name)) {
        return Err(LedgerError::Corrupt {
            path: path.to_string(),
            problem: format!(
                "trigger {name} on table {table} is not the ledger's: it would act inside the ledger's commits, so nothing is written until it is removed (and the book verified)"
            ),
        });
    }
    for t in &tables {
        create_triggers(conn, t)?;
    }
    Ok(())
}

fn core_journaled() -> Vec<JournaledTable> {
    CORE_JOURNALED
        .iter()
        .map(|(name, key, columns)| JournaledTable {
            name: name.to_string(),
            key: key.iter().map(|c| c.to_string()).collect(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        })
        .collect()
}

/// The value of an SQL literal as `quote()` writes text: `'it''s'` is `it's`.
pub(crate) fn unquote(literal: &str) -> Option<String> {
    literal.strip_prefix('\'')?.strip_suffix('\'').map(|inner| inner.replace("''", "'"))
}

/// A journaled table from its registry row (canonical text), as replayed.
fn registered_table(row: &str) -> Option<JournaledTable> {
    let cells: Vec<String> = serde_json::from_str(row).ok()?;
    let [name, key, columns] = <[String; 3]>::try_from(cells).ok()?;
    let list = |cell: &str| -> Option<Vec<String>> {
        let names: Vec<String> = serde_json::from_str(&unquote(cell)?).ok()?;
        names.iter().all(|n| is_identifier(n)).then_some(names)
    };
    let name = unquote(&name).filter(|n| is_identifier(n))?;
    Some(JournaledTable { name, key: list(&key)?, columns: list(&columns)? })
}

/// The columns [`read_account`] reads, in its order.
const ACCOUNT_COLUMNS: &str = "a.seq, a.id, a.kind, a.owner, a.unit, a.flags, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, a.created_at";

/// Accounts with their totals, for [`ACCOUNT_COLUMNS`].
const ACCOUNTS_JOINED: &str = "accounts a JOIN balances b ON b.seq = a.seq";

/// The columns [`read_transfer`] reads, in its order.
const TRANSFER_COLUMNS: &str =
    "seq, id, debit, credit, amount, kind, pending_id, timeout_s, linked, code, memo, unit, at";

/// A 16-byte id column, read without a copy (verify reads millions).
fn id_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u128> {
    let bytes = row
        .get_ref(i)?
        .as_blob()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, Box::new(e)))?;
    if bytes.len() != 16 {
        return Err(rusqlite::Error::InvalidColumnType(
            i,
            format!("a {}-byte id", bytes.len()),
            rusqlite::types::Type::Blob,
        ));
    }
    Ok(from_blob(bytes))
}

/// A value the ledger never writes: reading it is an error, not a guess.
fn out_of_domain(i: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(i, what, rusqlite::types::Type::Text)
}

/// A unit, exactly as the ledger writes it (so `FEN` is not `fen`).
fn unit_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Unit> {
    let text = row
        .get_ref(i)?
        .as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))?;
    if text == "fen" {
        return Ok(Unit::Fen);
    }
    match text.parse::<Unit>() {
        Ok(unit) if unit.to_string() == text => Ok(unit),
        _ => Err(out_of_domain(i, format!("unit '{text}'"))),
    }
}

/// An integer column within `range`.
fn int_in(
    row: &rusqlite::Row<'_>,
    i: usize,
    range: std::ops::RangeInclusive<i64>,
    what: &str,
) -> rusqlite::Result<i64> {
    let v: i64 = row.get(i)?;
    if range.contains(&v) { Ok(v) } else { Err(out_of_domain(i, format!("{what} {v}"))) }
}

/// An account row selected as [`ACCOUNT_COLUMNS`].
fn read_account(row: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        seq: row.get(0)?,
        id: AccountId(id_at(row, 1)?),
        kind: row.get(2)?,
        owner: row.get(3)?,
        unit: unit_at(row, 4)?,
        flags: int_in(row, 5, 0..=flags::ALL as i64, "flags")? as u32,
        debits_pending: row.get(6)?,
        debits_posted: row.get(7)?,
        credits_pending: row.get(8)?,
        credits_posted: row.get(9)?,
        created_at: row.get(10)?,
    })
}

/// A transfer row selected as [`TRANSFER_COLUMNS`].
fn read_transfer(row: &rusqlite::Row<'_>) -> rusqlite::Result<Transfer> {
    let pending = match row.get_ref(6)? {
        rusqlite::types::ValueRef::Null => None,
        _ => Some(TransferId(id_at(row, 6)?)),
    };
    let kind_code: i64 = row.get(5)?;
    let timeout_s: i64 = row.get(7)?;
    let kind = TransferKind::from_parts(kind_code, pending, timeout_s).ok_or_else(|| {
        out_of_domain(5, format!("kind {kind_code} with pending id {pending:?} and timeout {timeout_s}"))
    })?;
    Ok(Transfer {
        seq: row.get(0)?,
        id: TransferId(id_at(row, 1)?),
        debit: AccountId(id_at(row, 2)?),
        credit: AccountId(id_at(row, 3)?),
        amount: row.get(4)?,
        kind,
        linked: int_in(row, 8, 0..=1, "linked")? == 1,
        code: int_in(row, 9, 0..=u16::MAX as i64, "code")? as u16,
        memo: row.get(10)?,
        unit: unit_at(row, 11)?,
        at: row.get(12)?,
    })
}

fn open_connection(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // WAL: readers never block the writer; FULL: a commit is on disk
    // (fsync of the WAL) before it returns, so it survives power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The writer touches index pages all over the file (accounts are
    // random); a page cache of up to 256 MiB keeps them from being re-read
    // and spilled mid-transaction. It grows only as pages are used.
    conn.pragma_update(None, "cache_size", -262_144)?;
    // Checkpoint the WAL into the database every ~40 MiB instead of ~4 MiB:
    // fewer, larger checkpoints.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    Ok(conn)
}

fn schema_problem(version: i64) -> String {
    if version < SCHEMA_VERSION {
        format!(
            "schema version {version}, made by an older build; this build reads version {SCHEMA_VERSION} (whose journal also covers the voucher tables) and never rewrites an older book: keep the file for its audit with the older build and start a new one"
        )
    } else {
        format!("schema version {version}, made by a newer build; this build reads version {SCHEMA_VERSION}")
    }
}

/// What a writer keeps in memory, read from one state of the file.
struct Caches {
    accounts: HashMap<AccountId, Account>,
    /// Ids of refused requests (a superset: a refusal rolled back with its
    /// batch may stay), so that the hot path looks refusals up only for them.
    refused: HashSet<TransferId>,
    /// The journal entry the caches reflect, and its hash.
    journal_seq: i64,
    head: [u8; 32],
    next_account_seq: i64,
    next_transfer_seq: i64,
}

impl Caches {
    fn load(conn: &Connection) -> Result<Caches, LedgerError> {
        let mut accounts = HashMap::default();
        {
            let mut stmt = conn.prepare(&format!("SELECT {ACCOUNT_COLUMNS} FROM {ACCOUNTS_JOINED}"))?;
            for account in stmt.query_map([], read_account)? {
                let account = account?;
                accounts.insert(account.id, account);
            }
        }
        let refused = {
            let mut stmt = conn.prepare("SELECT id FROM refusals")?;
            let ids = stmt.query_map([], |r| id_at(r, 0))?;
            ids.map(|id| id.map(TransferId)).collect::<Result<_, _>>()?
        };
        let (journal_seq, head) = Ledger::journal_head(conn)?;
        Ok(Caches {
            accounts,
            refused,
            journal_seq,
            head,
            next_account_seq: conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM accounts", [], |r| r.get(0))?,
            next_transfer_seq: conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM transfers", [], |r| r.get(0))?,
        })
    }
}

/// The ledger: one database file, one writer.
pub struct Ledger {
    conn: Connection,
    path: String,
    caches: Caches,
    /// SQLite's schema counter when the triggers were last checked (-1: not yet).
    schema_version: i64,
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        let path = path.as_ref();
        let conn = open_connection(path)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != 0 && version != SCHEMA_VERSION {
            return Err(LedgerError::Corrupt { path: path.display().to_string(), problem: schema_problem(version) });
        }
        conn.execute_batch(SCHEMA)?;
        for t in core_journaled() {
            create_triggers(&conn, &t)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        // One read transaction, so that the caches are of one state of the file.
        let caches = {
            let snapshot = conn.unchecked_transaction()?;
            Caches::load(&snapshot)?
        };
        Ok(Ledger { conn, path: path.display().to_string(), caches, schema_version: -1 })
    }

    /// The last journal entry in the file: (seq, hash).
    fn journal_head(conn: &Connection) -> Result<(i64, [u8; 32]), LedgerError> {
        let head: Option<(i64, Vec<u8>)> = conn
            .query_row("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match head {
            Some((seq, h)) => {
                // A hash of another length matches no head: the caches reload
                // and verify names the broken entry.
                let mut bytes = [0u8; 32];
                let n = h.len().min(32);
                bytes[..n].copy_from_slice(&h[..n]);
                (seq, bytes)
            }
            None => (0, [0; 32]),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.caches.accounts.get(&id)
    }

    /// All accounts, in creation order.
    pub fn accounts(&self) -> Vec<Account> {
        let mut all: Vec<Account> = self.caches.accounts.values().cloned().collect();
        all.sort_by_key(|a| a.seq);
        all
    }

    /// The read side of the store, for queries (statements, reports).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, LedgerError> {
        Ok(self
            .conn
            .query_row(&format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ?1"), [blob(id.0)], read_transfer)
            .optional()?)
    }

    /// Transfers that debit or credit an account, oldest first (a scan).
    pub fn transfers_of(&self, account: AccountId) -> Result<Vec<Transfer>, LedgerError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE debit = ?1 OR credit = ?1 ORDER BY seq"
        ))?;
        let rows = stmt.query_map([blob(account.0)], read_transfer)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The state of a pending transfer.
    pub fn pending_state(&self, id: TransferId) -> Result<Option<PendingState>, LedgerError> {
        let state: Option<i64> =
            self.conn.query_row("SELECT state FROM pending WHERE id = ?1", [blob(id.0)], |r| r.get(0)).optional()?;
        Ok(state.map(PendingState::from_code))
    }

    /// Runs `f` in one atomic, durable transaction. If `f` fails nothing of
    /// it is stored; if it succeeds, everything is, with one journal entry.
    pub fn write<T>(
        &mut self,
        now: i64,
        f: impl FnOnce(&mut Batch<'_>) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        // Another process (an administration command) may have written since
        // our last commit. Under the write lock, check the journal head (its
        // number and hash); if it moved, reload the caches, still under the
        // lock, so that they are exactly the state this commit builds on.
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        if Self::journal_head(&tx)? != (self.caches.journal_seq, self.caches.head) {
            self.caches = Caches::load(&tx)?;
        }
        // A trigger planted in the file would run inside this commit and
        // have its edits journaled as ours: whenever the schema changed,
        // the ledger's own triggers are re-made and any other refused.
        let schema_version: i64 = tx.pragma_query_value(None, "schema_version", |r| r.get(0))?;
        if schema_version != self.schema_version {
            guard_triggers(&tx, &self.path)?;
            self.schema_version = tx.pragma_query_value(None, "schema_version", |r| r.get(0))?;
        }
        // Read under the write lock: a change recorded outside the journal
        // before this commit leaves a gap that verify reports, instead of
        // being swept into this entry.
        let changes_from: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM row_changes", [], |r| r.get(0))?;
        let mut batch = Batch {
            changes_from,
            tx: &tx,
            base: &self.caches.accounts,
            refused: &self.caches.refused,
            newly_refused: Vec::new(),
            overlay: HashMap::default(),
            undo: Vec::new(),
            savepoints: 0,
            in_chain: false,
            now,
            accounts_from: self.caches.next_account_seq,
            next_account_seq: self.caches.next_account_seq,
            transfers_from: self.caches.next_transfer_seq,
            next_transfer_seq: self.caches.next_transfer_seq,
            account_bytes: Vec::new(),
            transfer_bytes: Vec::new(),
        };
        let value = f(&mut batch)?;
        let head = batch.finish(self.caches.journal_seq + 1, &self.caches.head)?;
        let Batch { overlay, next_account_seq, next_transfer_seq, newly_refused, .. } = batch;
        tx.commit()?;
        if let Some(head) = head {
            self.caches.head = head;
            self.caches.journal_seq += 1;
            debug_assert_eq!(Self::journal_head(&self.conn).map(|(s, _)| s).unwrap_or(-1), self.caches.journal_seq);
        }
        self.caches.next_account_seq = next_account_seq;
        self.caches.next_transfer_seq = next_transfer_seq;
        self.caches.accounts.extend(overlay);
        self.caches.refused.extend(newly_refused);
        Ok(value)
    }

    /// Creates accounts in one transaction; one outcome per account.
    pub fn create_accounts(
        &mut self,
        now: i64,
        accounts: &[NewAccount],
    ) -> Result<Vec<Result<Account, Refusal>>, LedgerError> {
        self.write(now, |b| accounts.iter().map(|a| b.create_account(a)).collect())
    }

    /// Applies transfers in one transaction; one outcome per transfer.
    pub fn create_transfers(
        &mut self,
        now: i64,
        transfers: &[NewTransfer],
    ) -> Result<Vec<Result<Transfer, Refusal>>, LedgerError> {
        self.write(now, |b| b.create_transfers(transfers))
    }

    /// Expires every pending transfer whose timeout has passed; returns how many.
    pub fn expire_pending(&mut self, now: i64) -> Result<usize, LedgerError> {
        self.write(now, |b| b.expire_pending())
    }
}

/// What to restore if an atomic block (a linked chain, or a caller's
/// [`Batch::atomic`]) fails: the accounts as they were before the block
/// first touched them, and the batch's counters.
struct Undo {
    accounts: Vec<(AccountId, Option<Account>)>,
    touched: HashSet<AccountId>,
    next_account_seq: i64,
    next_transfer_seq: i64,
    account_bytes: usize,
    transfer_bytes: usize,
}

/// One write transaction in progress.
pub struct Batch<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    /// The first row change this transaction's triggers write.
    changes_from: i64,
    base: &'a HashMap<AccountId, Account>,
    overlay: HashMap<AccountId, Account>,
    refused: &'a HashSet<TransferId>,
    newly_refused: Vec<TransferId>,
    /// Open atomic blocks, innermost last.
    undo: Vec<Undo>,
    savepoints: u32,
    in_chain: bool,
    now: i64,
    accounts_from: i64,
    next_account_seq: i64,
    transfers_from: i64,
    next_transfer_seq: i64,
    account_bytes: Vec<u8>,
    transfer_bytes: Vec<u8>,
}

impl Batch<'_> {
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Changes the time stamped on what follows (group commit serves
    /// requests made at different times).
    pub fn set_now(&mut self, now: i64) {
        self.now = now;
    }

    /// The SQLite transaction, for tables kept alongside the ledger (vouchers).
    pub fn sql(&self) -> &rusqlite::Connection {
        self.tx
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.overlay.get(&id).or_else(|| self.base.get(&id))
    }

    /// Is a transfer with this id recorded (a repeated request)?
    pub fn transfer_exists(&self, id: TransferId) -> Result<bool, LedgerError> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM transfers WHERE id = ?1")?
            .query_row([blob(id.0)], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Puts a table kept alongside the ledger under the journal: triggers
    /// record every insert, update and delete of it as a row change hashed
    /// into the chain, and [`verify`] replays them and compares the table.
    /// Call it before the table gets rows; idempotent.
    pub fn journal_table(&mut self, name: &str, key: &[&str], columns: &[&str]) -> Result<(), LedgerError> {
        let t = JournaledTable {
            name: name.to_string(),
            key: key.iter().map(|c| c.to_string()).collect(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        };
        let all_names = std::iter::once(&t.name).chain(&t.key).chain(&t.columns);
        if let Some(bad) = all_names.into_iter().find(|n| !is_identifier(n)) {
            return Err(LedgerError::Corrupt {
                path: self.tx.path().unwrap_or_default().into(),
                problem: format!("'{bad}' cannot name a journaled table or column"),
            });
        }
        if CORE_REPLAYED.contains(&name) || CORE_JOURNALED.iter().any(|(n, ..)| *n == name) || name == "row_changes" {
            return Err(LedgerError::Corrupt { path: String::new(), problem: format!("{name} is a core table") });
        }
        let (key_text, columns_text) =
            (serde_json::to_string(&t.key).expect("names"), serde_json::to_string(&t.columns).expect("names"));
        let registered: Option<(String, String)> = self
            .tx
            .query_row("SELECT key_columns, columns FROM journaled_tables WHERE name = ?1", [name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if registered.as_ref() == Some(&(key_text.clone(), columns_text.clone())) {
            return create_triggers(self.tx, &t);
        }
        create_triggers(self.tx, &t)?;
        self.tx.execute(
            "INSERT INTO journaled_tables (name, key_columns, columns) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET key_columns = excluded.key_columns, columns = excluded.columns",
            params![name, key_text, columns_text],
        )?;
        Ok(())
    }

    fn account_mut(&mut self, id: AccountId) -> Option<&mut Account> {
        if !self.overlay.contains_key(&id) {
            let account = self.base.get(&id)?.clone();
            self.remember(id);
            self.overlay.insert(id, account);
        } else {
            self.remember(id);
        }
        self.overlay.get_mut(&id)
    }

    /// Records an account's overlay state before the innermost block changes it.
    fn remember(&mut self, id: AccountId) {
        if let Some(undo) = self.undo.last_mut()
            && undo.touched.insert(id)
        {
            undo.accounts.push((id, self.overlay.get(&id).cloned()));
        }
    }

    fn begin(&mut self) -> Result<(), LedgerError> {
        self.savepoints += 1;
        self.tx.execute_batch(&format!("SAVEPOINT sp{}", self.savepoints))?;
        self.undo.push(Undo {
            accounts: Vec::new(),
            touched: Default::default(),
            next_account_seq: self.next_account_seq,
            next_transfer_seq: self.next_transfer_seq,
            account_bytes: self.account_bytes.len(),
            transfer_bytes: self.transfer_bytes.len(),
        });
        Ok(())
    }

    fn end(&mut self, keep: bool) -> Result<(), LedgerError> {
        let undo = self.undo.pop().expect("an open block");
        let name = format!("sp{}", self.savepoints);
        self.savepoints -= 1;
        if keep {
            self.tx.execute_batch(&format!("RELEASE {name}"))?;
            // The enclosing block must be able to undo this one's changes too.
            if let Some(outer) = self.undo.last_mut() {
                for (id, before) in undo.accounts {
                    if outer.touched.insert(id) {
                        outer.accounts.push((id, before));
                    }
                }
            }
            return Ok(());
        }
        self.tx.execute_batch(&format!("ROLLBACK TO {name}; RELEASE {name}"))?;
        for (id, before) in undo.accounts.into_iter().rev() {
            match before {
                Some(account) => self.overlay.insert(id, account),
                None => self.overlay.remove(&id),
            };
        }
        self.next_account_seq = undo.next_account_seq;
        self.next_transfer_seq = undo.next_transfer_seq;
        self.account_bytes.truncate(undo.account_bytes);
        self.transfer_bytes.truncate(undo.transfer_bytes);
        Ok(())
    }

    /// Runs `f` as one unit inside this transaction: if it fails, everything
    /// it did (rows, account totals, journal bytes) is undone and the rest of
    /// the batch goes on. Blocks nest.
    pub fn atomic<T, E: From<LedgerError>>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E> {
        self.begin()?;
        match f(self) {
            Ok(value) => {
                self.end(true)?;
                Ok(value)
            }
            Err(e) => {
                self.end(false)?;
                Err(e)
            }
        }
    }

    pub fn create_account(&mut self, a: &NewAccount) -> Result<Result<Account, Refusal>, LedgerError> {
        if a.id.0 == 0 {
            return Ok(Err(Refusal::IdMustNotBeZero));
        }
        if let Some(existing) = self.account(a.id) {
            let same = existing.kind == a.kind
                && existing.owner == a.owner
                && existing.unit == a.unit
                && existing.flags == a.flags;
            return Ok(if same {
                Ok(existing.clone())
            } else {
                Err(Refusal::IdReusedWithDifferentContent(a.id.to_string()))
            });
        }
        if a.kind.trim().is_empty() {
            return Ok(Err(Refusal::Invalid { field: "kind", problem: "must not be empty".into() }));
        }
        if a.flags & !flags::ALL != 0 || a.flags == flags::ALL {
            return Ok(Err(Refusal::Invalid {
                field: "flags",
                problem: format!("{} is not a valid combination", a.flags),
            }));
        }
        let account = Account {
            id: a.id,
            seq: self.next_account_seq,
            kind: a.kind.clone(),
            owner: a.owner.clone(),
            unit: a.unit.clone(),
            flags: a.flags,
            debits_pending: 0,
            debits_posted: 0,
            credits_pending: 0,
            credits_posted: 0,
            created_at: self.now,
        };
        self.tx.prepare_cached(
            "INSERT INTO accounts (seq, id, kind, owner, unit, flags, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![account.seq, blob(a.id.0), a.kind, a.owner, a.unit.to_string(), a.flags, self.now])?;
        self.tx
            .prepare_cached("INSERT INTO balances (seq, debits_pending, debits_posted, credits_pending, credits_posted) VALUES (?1, 0, 0, 0, 0)")?
            .execute([account.seq])?;
        self.next_account_seq += 1;
        encode_account(&mut self.account_bytes, &account);
        self.overlay.insert(a.id, account.clone());
        Ok(Ok(account))
    }

    /// Applies transfers in order; linked chains succeed or fail as one.
    pub fn create_transfers(
        &mut self,
        transfers: &[NewTransfer],
    ) -> Result<Vec<Result<Transfer, Refusal>>, LedgerError> {
        let mut results = Vec::with_capacity(transfers.len());
        let mut start = 0;
        while start < transfers.len() {
            let mut end = start;
            while end < transfers.len() && transfers[end].linked {
                end += 1;
            }
            if end == transfers.len() {
                results.extend((start..end).map(|_| Err(Refusal::LinkedChainOpen)));
                break;
            }
            if start == end {
                results.push(self.create_transfer(&transfers[start])?);
            } else {
                results.extend(self.create_chain(&transfers[start..=end])?);
            }
            start = end + 1;
        }
        Ok(results)
    }

    fn create_chain(&mut self, chain: &[NewTransfer]) -> Result<Vec<Result<Transfer, Refusal>>, LedgerError> {
        self.begin()?;
        self.in_chain = true;
        let mut results = Vec::with_capacity(chain.len());
        let mut failed = None;
        for (i, t) in chain.iter().enumerate() {
            match self.create_transfer(t) {
                Ok(Ok(done)) => results.push(Ok(done)),
                Ok(Err(refusal)) => {
                    failed = Some((i, refusal));
                    break;
                }
                Err(e) => {
                    self.in_chain = false;
                    self.end(false)?;
                    return Err(e);
                }
            }
        }
        self.in_chain = false;
        let Some((at, refusal)) = failed else {
            self.end(true)?;
            return Ok(results);
        };
        // Roll the whole chain back, in the store and in memory.
        self.end(false)?;
        let outcomes: Vec<Result<Transfer, Refusal>> =
            (0..chain.len()).map(|i| Err(if i == at { refusal.clone() } else { Refusal::LinkedEventFailed })).collect();
        for (t, outcome) in chain.iter().zip(&outcomes) {
            if let Err(r) = outcome {
                self.record_refusal(t, r)?;
            }
        }
        Ok(outcomes)
    }

    fn record_refusal(&mut self, t: &NewTransfer, refusal: &Refusal) -> Result<(), LedgerError> {
        if t.id.0 == 0 || matches!(refusal, Refusal::IdReusedWithDifferentContent(_) | Refusal::Replayed { .. }) {
            return Ok(());
        }
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO refusals (id, digest, code, message) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![blob(t.id.0), request_digest(t), refusal.code(), refusal.to_string()])?;
        self.newly_refused.push(t.id);
        Ok(())
    }

    /// One transfer: the same request again returns the first outcome.
    pub fn create_transfer(&mut self, t: &NewTransfer) -> Result<Result<Transfer, Refusal>, LedgerError> {
        if t.id.0 == 0 {
            return Ok(Err(Refusal::IdMustNotBeZero));
        }
        // A request refused before answers its refusal again (looked up
        // only for ids that may have been refused: the hot path reads nothing).
        if self.refused.contains(&t.id) || self.newly_refused.contains(&t.id) {
            let refused: Option<(Vec<u8>, String, String)> = self
                .tx
                .prepare_cached("SELECT digest, code, message FROM refusals WHERE id = ?1")?
                .query_row([blob(t.id.0)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            if let Some((digest, code, message)) = refused {
                return Ok(Err(if digest == request_digest(t) {
                    Refusal::replayed(&code, message)
                } else {
                    Refusal::IdReusedWithDifferentContent(t.id.to_string())
                }));
            }
        }
        let transfer = match self.check(t)? {
            Ok(transfer) => transfer,
            Err(refusal) => {
                // A repeat of an accepted transfer may fail the checks now
                // (its money was moved): its first outcome stands.
                if let Some(existing) = self.existing(t)? {
                    return Ok(existing);
                }
                // Inside a chain, the chain records its members' outcomes
                // once it has rolled back.
                if !self.in_chain {
                    self.record_refusal(t, &refusal)?;
                }
                return Ok(Err(refusal));
            }
        };
        // The insert finds a repeated id itself (the unique index), so a new
        // transfer costs one index walk, not a lookup and then an insert.
        if !self.record(&transfer)? {
            return Ok(self.existing(t)?.expect("the insert met an existing transfer"));
        }
        Ok(Ok(transfer))
    }

    /// The outcome of an earlier transfer with `t`'s id, if there is one:
    /// itself when the request is the same, else a refusal.
    fn existing(&self, t: &NewTransfer) -> Result<Option<Result<Transfer, Refusal>>, LedgerError> {
        let existing = self
            .tx
            .prepare_cached(&format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ?1"))?
            .query_row([blob(t.id.0)], read_transfer)
            .optional()?;
        Ok(existing
            .map(|e| if e.matches(t) { Ok(e) } else { Err(Refusal::IdReusedWithDifferentContent(t.id.to_string())) }))
    }

    fn pending_record(&self, id: TransferId) -> Result<Option<PendingRecord>, LedgerError> {
        Ok(self
            .tx
            .prepare_cached("SELECT debit, credit, amount, expires_at, state FROM pending WHERE id = ?1")?
            .query_row([blob(id.0)], |r| {
                Ok(PendingRecord {
                    debit: AccountId(from_blob(&r.get::<_, Vec<u8>>(0)?)),
                    credit: AccountId(from_blob(&r.get::<_, Vec<u8>>(1)?)),
                    amount: r.get(2)?,
                    expires_at: r.get(3)?,
                    state: PendingState::from_code(r.get(4)?),
                })
            })
            .optional()?)
    }

    /// Validates a request against the current totals and resolves it into
    /// the transfer to record.
    fn check(&self, t: &NewTransfer) -> Result<Result<Transfer, Refusal>, LedgerError> {
        let resolved = |debit: AccountId, credit: AccountId, amount: i64, unit: Unit| Transfer {
            seq: self.next_transfer_seq,
            id: t.id,
            debit,
            credit,
            amount,
            kind: t.kind,
            linked: t.linked,
            code: t.code,
            memo: t.memo.clone(),
            unit,
            at: self.now,
        };
        if let Some(pending_id) = t.kind.pending_id() {
            if matches!(t.kind, TransferKind::ExpirePending { .. }) {
                return Ok(Err(Refusal::Invalid {
                    field: "kind",
                    problem: "expiry is written by the ledger only".into(),
                }));
            }
            let Some(p) = self.pending_record(pending_id)? else {
                return Ok(Err(Refusal::PendingNotFound(pending_id)));
            };
            match p.state {
                PendingState::Posted => return Ok(Err(Refusal::PendingAlreadyPosted(pending_id))),
                PendingState::Voided => return Ok(Err(Refusal::PendingAlreadyVoided(pending_id))),
                PendingState::Expired => return Ok(Err(Refusal::PendingExpired(pending_id))),
                PendingState::Pending => {}
            }
            if p.expires_at > 0 && self.now >= p.expires_at {
                return Ok(Err(Refusal::PendingExpired(pending_id)));
            }
            if (t.debit.0 != 0 && t.debit != p.debit) || (t.credit.0 != 0 && t.credit != p.credit) {
                return Ok(Err(Refusal::PendingAccountsDiffer(pending_id)));
            }
            let amount = match t.kind {
                TransferKind::PostPending { .. } if t.amount == 0 => p.amount,
                TransferKind::PostPending { .. } if t.amount < 0 => {
                    return Ok(Err(Refusal::AmountMustBePositive(t.amount)));
                }
                TransferKind::PostPending { .. } if t.amount > p.amount => {
                    return Ok(Err(Refusal::ExceedsPendingAmount { held: p.amount, amount: t.amount }));
                }
                TransferKind::VoidPending { .. } if t.amount != 0 && t.amount != p.amount => {
                    return Ok(Err(Refusal::ExceedsPendingAmount { held: p.amount, amount: t.amount }));
                }
                TransferKind::VoidPending { .. } => p.amount,
                _ => t.amount,
            };
            let unit = self.account(p.debit).map(|a| a.unit.clone()).unwrap_or(Unit::Fen);
            return Ok(Ok(resolved(p.debit, p.credit, amount, unit)));
        }
        if t.debit == t.credit {
            return Ok(Err(Refusal::AccountsMustBeDifferent));
        }
        if t.amount <= 0 {
            return Ok(Err(Refusal::AmountMustBePositive(t.amount)));
        }
        if t.kind.timeout_s() < 0 {
            return Ok(Err(Refusal::TimeoutMustNotBeNegative(t.kind.timeout_s())));
        }
        if t.kind.timeout_s() > crate::model::MAX_TIMEOUT_S {
            return Ok(Err(Refusal::TimeoutTooLong(t.kind.timeout_s())));
        }
        let Some(debit) = self.account(t.debit) else { return Ok(Err(Refusal::DebitAccountNotFound(t.debit))) };
        let Some(credit) = self.account(t.credit) else { return Ok(Err(Refusal::CreditAccountNotFound(t.credit))) };
        if debit.unit != credit.unit {
            return Ok(Err(Refusal::UnitsMustMatch { debit: debit.unit.to_string(), credit: credit.unit.to_string() }));
        }
        // More than the account holds is the clearer answer, and the
        // sums below cannot overflow an account bound by its credits.
        if debit.has(flags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            let available = debit.available();
            if t.amount > available {
                return Ok(Err(Refusal::InsufficientFunds { account: debit.id, available, amount: t.amount }));
            }
        }
        let pending = matches!(t.kind, TransferKind::Pending { .. });
        let overflows = if pending {
            debit.debits_pending.checked_add(t.amount).is_none()
                || credit.credits_pending.checked_add(t.amount).is_none()
        } else {
            debit.debits_posted.checked_add(t.amount).is_none() || credit.credits_posted.checked_add(t.amount).is_none()
        };
        // Totals of pending and posted are added together in balance checks.
        let sums_overflow =
            debit.debits_posted.checked_add(debit.debits_pending).and_then(|x| x.checked_add(t.amount)).is_none()
                || credit
                    .credits_posted
                    .checked_add(credit.credits_pending)
                    .and_then(|x| x.checked_add(t.amount))
                    .is_none();
        if overflows || sums_overflow {
            return Ok(Err(Refusal::Overflow));
        }
        if credit.has(flags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && credit.credits_posted.saturating_add(credit.credits_pending).saturating_add(t.amount)
                > credit.debits_posted
        {
            return Ok(Err(Refusal::ExceedsDebits { account: credit.id }));
        }
        Ok(Ok(resolved(t.debit, t.credit, t.amount, debit.unit.clone())))
    }

    /// Stores a checked transfer and applies it; `false` (nothing done) if
    /// a transfer with its id exists.
    fn record(&mut self, t: &Transfer) -> Result<bool, LedgerError> {
        let inserted = self
            .tx
            .prepare_cached(
                "INSERT INTO transfers (seq, id, debit, credit, amount, kind, pending_id, timeout_s, linked, code, memo, unit, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![
                t.seq,
                blob(t.id.0),
                blob(t.debit.0),
                blob(t.credit.0),
                t.amount,
                t.kind.code(),
                t.kind.pending_id().map(|p| blob(p.0)),
                t.kind.timeout_s(),
                t.linked as i64,
                t.code as i64,
                t.memo,
                t.unit.text(),
                t.at
            ])?;
        if inserted == 0 {
            return Ok(false);
        }
        let mut pending = HashMap::default();
        if let Some(p) = t.kind.pending_id()
            && let Some(record) = self.pending_record(p)?
        {
            pending.insert(p, record);
        }
        // Bring both accounts into the overlay, then apply.
        for id in [t.debit, t.credit] {
            self.account_mut(id).ok_or(Refusal::DebitAccountNotFound(id))?;
        }
        apply_recorded(&mut self.overlay, &mut pending, t)
            .map_err(|problem| LedgerError::Corrupt { path: String::new(), problem })?;
        match t.kind {
            TransferKind::Pending { .. } => {
                let record = pending[&t.id];
                self.tx
                    .prepare_cached("INSERT INTO pending (id, debit, credit, amount, expires_at, state) VALUES (?1, ?2, ?3, ?4, ?5, 0)")?
                    .execute(params![blob(t.id.0), blob(t.debit.0), blob(t.credit.0), t.amount, record.expires_at])?;
            }
            TransferKind::PostPending { pending: p }
            | TransferKind::VoidPending { pending: p }
            | TransferKind::ExpirePending { pending: p } => {
                self.tx
                    .prepare_cached("UPDATE pending SET state = ?2 WHERE id = ?1")?
                    .execute(params![blob(p.0), pending[&p].state as i64])?;
            }
            TransferKind::Posted => {}
        }
        self.next_transfer_seq += 1;
        encode_transfer(&mut self.transfer_bytes, t);
        Ok(true)
    }

    /// Expires pending transfers whose timeout has passed.
    pub fn expire_pending(&mut self) -> Result<usize, LedgerError> {
        let due: Vec<(TransferId, PendingRecord)> = {
            let mut stmt = self.tx.prepare_cached(
                "SELECT id, debit, credit, amount, expires_at FROM pending WHERE state = 0 AND expires_at > 0 AND expires_at <= ?1 ORDER BY expires_at, id",
            )?;
            let rows = stmt.query_map([self.now], |r| {
                Ok((
                    TransferId(from_blob(&r.get::<_, Vec<u8>>(0)?)),
                    PendingRecord {
                        debit: AccountId(from_blob(&r.get::<_, Vec<u8>>(1)?)),
                        credit: AccountId(from_blob(&r.get::<_, Vec<u8>>(2)?)),
                        amount: r.get(3)?,
                        expires_at: r.get(4)?,
                        state: PendingState::Pending,
                    },
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (id, p) in &due {
            let unit = self.account(p.debit).map(|a| a.unit.clone()).unwrap_or(Unit::Fen);
            let t = Transfer {
                seq: self.next_transfer_seq,
                id: TransferId::derive(&format!("expire:{id}")),
                debit: p.debit,
                credit: p.credit,
                amount: p.amount,
                kind: TransferKind::ExpirePending { pending: *id },
                linked: false,
                code: 0,
                memo: "expired".into(),
                unit,
                at: self.now,
            };
            if !self.record(&t)? {
                return Err(LedgerError::Corrupt {
                    path: String::new(),
                    problem: format!("pending transfer {id} is open, but its expiry is already recorded"),
                });
            }
        }
        Ok(due.len())
    }

    /// Writes the touched accounts and the journal entry `seq`; returns the new head.
    fn finish(&mut self, seq: i64, prev: &[u8; 32]) -> Result<Option<[u8; 32]>, LedgerError> {
        let mut stmt = self.tx.prepare_cached(
            "UPDATE balances SET debits_pending = ?2, debits_posted = ?3, credits_pending = ?4, credits_posted = ?5 WHERE seq = ?1",
        )?;
        // By row number, not by id: one B-tree walk per account, not two;
        // in row order, so that walks share the pages they pass.
        let mut touched: Vec<&Account> = self.overlay.values().collect();
        touched.sort_unstable_by_key(|a| a.seq);
        for a in touched {
            stmt.execute(params![a.seq, a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted])?;
        }
        let mut change_bytes = Vec::new();
        let mut changes_to = self.changes_from - 1;
        {
            let mut stmt =
                self.tx.prepare_cached("SELECT seq, tbl, key, row FROM row_changes WHERE seq >= ?1 ORDER BY seq")?;
            for change in stmt.query_map([self.changes_from], read_change)? {
                let change = change?;
                changes_to = change.seq;
                encode_change(&mut change_bytes, &change);
            }
        }
        if self.account_bytes.is_empty() && self.transfer_bytes.is_empty() && change_bytes.is_empty() {
            return Ok(None);
        }
        let ranges = [
            (self.accounts_from, self.next_account_seq - 1),
            (self.transfers_from, self.next_transfer_seq - 1),
            (self.changes_from, changes_to),
        ];
        let header = encode_header(seq, self.now, ranges);
        let head = chain(prev, &[&header, &self.account_bytes, &self.transfer_bytes, &change_bytes]);
        self.tx
            .prepare_cached(
                "INSERT INTO journal (seq, accounts_from, accounts_to, transfers_from, transfers_to, changes_from, changes_to, at, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                seq,
                self.accounts_from,
                self.next_account_seq - 1,
                self.transfers_from,
                self.next_transfer_seq - 1,
                self.changes_from,
                changes_to,
                self.now,
                head.to_vec()
            ])?;
        Ok(Some(head))
    }
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub journal_entries: u64,
    /// The last journal entry's hash (hex): with `journal_entries`, the head
    /// an auditor keeps and later gives back as an [`Anchor`].
    pub head: String,
    pub accounts: u64,
    pub transfers: u64,
    pub open_pending: u64,
    /// Changes of journaled tables (organisations, programmes, bills...) replayed.
    pub row_changes: u64,
    /// Per unit: total posted debits (= total posted credits) and pending,
    /// summed without overflow.
    pub totals: Vec<(String, i128, i128)>,
}

/// A head of the journal kept by someone outside the database (an
/// auditor): the book must still contain entry `seq` with exactly this hash,
/// so a truncation below it or a re-hashed history is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HASH`, as `verify` prints the head.
    fn from_str(text: &str) -> Result<Anchor, String> {
        let (seq, hash) = text.split_once(':').ok_or("expected SEQ:HASH, as verify prints the head")?;
        let seq = Some(seq)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s >= 1)
            .ok_or_else(|| format!("'{seq}' is not a journal sequence number (the first entry is 1)"))?;
        let bytes = (0..hash.len())
            .step_by(2)
            .map(|i| hash.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .filter(|b| b.len() == 32 && hash.len() == 64)
            .ok_or("the hash must be 64 hex digits")?;
        Ok(Anchor { seq, hash: bytes.try_into().expect("32 bytes") })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replays the ledger in `path` from the beginning: checks the hash chain,
/// recomputes every account's totals from the transfers and compares them
/// with the stored ones, checks every flag held at every step, and that total
/// debits equal total credits per unit. Opens the file read-only.
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport, LedgerError> {
    verify_anchored(path, None)
}

/// [`verify`], and that the book extends `anchor` (if given).
pub fn verify_anchored(path: impl AsRef<Path>, anchor: Option<Anchor>) -> Result<VerifyReport, LedgerError> {
    struct Nothing;
    impl Replay for Nothing {}
    verify_with(path, anchor, &mut Nothing)
}

/// What a layer on top of the ledger (the vouchers) checks during
/// [`verify_with`]: it sees every transfer as it is replayed, then the
/// same snapshot of the file, so that both checks judge the same book.
pub trait Replay {
    /// A transfer of the history, with its accounts as they are after it.
    fn transfer(&mut self, _t: &Transfer, _debit: &Account, _credit: &Account) -> Result<(), String> {
        Ok(())
    }

    /// A change of a journaled table in the history: the row before (None:
    /// inserted) and after (None: deleted), as canonical JSON arrays of
    /// SQL literals.
    fn row_change(&mut self, _table: &str, _before: Option<&str>, _after: Option<&str>) -> Result<(), String> {
        Ok(())
    }

    /// After the replay succeeded, on the snapshot it read.
    fn finish(&mut self, _snapshot: &Connection) -> Result<(), LedgerError> {
        Ok(())
    }
}

/// [`verify_anchored`], with `replay` shown every transfer and then the
/// same snapshot of the file.
pub fn verify_with(
    path: impl AsRef<Path>,
    anchor: Option<Anchor>,
    replay: &mut dyn Replay,
) -> Result<VerifyReport, LedgerError> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(LedgerError::Corrupt { path: path.display().to_string(), problem: "no such file".into() });
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != SCHEMA_VERSION {
        return Err(LedgerError::Corrupt { path: path.display().to_string(), problem: schema_problem(version) });
    }
    // Every read below sees one snapshot, however many writers commit
    // meanwhile (WAL): the read transaction pins it at its first read.
    let snapshot = conn.unchecked_transaction()?;
    let report = verify_snapshot(&snapshot, &path.display().to_string(), anchor, replay)?;
    replay.finish(&snapshot)?;
    Ok(report)
}

/// The rows of journal entry `n`'s range `(from, to)` of one table, every
/// one of them as the ledger wrote it, or what is wrong: (table, what its
/// rows are called).
fn entry_rows<T>(
    stmt: &mut rusqlite::Statement<'_>,
    (from, to): (i64, i64),
    read: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    (table, rows_are): (&str, &str),
    n: u64,
) -> Result<Vec<T>, String> {
    let rows: Vec<T> = stmt
        .query_map([from, to], read)
        .and_then(|rows| rows.collect())
        .map_err(|e| format!("{table}: a row the ledger never writes: {e}"))?;
    if rows.len() as i64 != to - from + 1 {
        return Err(format!("journal entry {n}: {rows_are} missing"));
    }
    Ok(rows)
}

/// Journal entry columns, as verify reads them.
struct EntryRow {
    accounts: (i64, i64),
    transfers: (i64, i64),
    changes: (i64, i64),
    at: i64,
    hash: Vec<u8>,
}

fn verify_snapshot(
    conn: &Connection,
    path: &str,
    anchor: Option<Anchor>,
    replay: &mut dyn Replay,
) -> Result<VerifyReport, LedgerError> {
    let corrupt = |problem: String| LedgerError::Corrupt { path: path.to_string(), problem };
    // A row that cannot be read as the ledger wrote it is named, not guessed.
    let unreadable =
        |table: &'static str| move |e: rusqlite::Error| corrupt(format!("{table}: a row the ledger never writes: {e}"));
    let stored: HashMap<AccountId, Account> = {
        let mut stmt = conn.prepare(&format!("SELECT {ACCOUNT_COLUMNS} FROM {ACCOUNTS_JOINED} ORDER BY a.seq"))?;
        let rows = stmt.query_map([], read_account)?;
        rows.map(|a| a.map(|a| (a.id, a))).collect::<Result<_, _>>().map_err(unreadable("accounts"))?
    };
    let mut replayed: HashMap<AccountId, Account> = HashMap::default();
    let mut pending: HashMap<TransferId, PendingRecord> = HashMap::default();
    // Journaled tables as the row changes say they must be: table -> key -> row.
    let mut tables: HashMap<String, std::collections::BTreeMap<String, String>> = HashMap::default();
    let mut head = [0u8; 32];
    let mut entries = 0u64;
    let mut transfers = 0u64;
    let mut changes = 0u64;
    let (mut expected_account, mut expected_transfer, mut expected_change) = (1i64, 1i64, 1i64);
    let journal: Vec<(i64, EntryRow)> = {
        let mut stmt = conn.prepare(
            "SELECT seq, accounts_from, accounts_to, transfers_from, transfers_to, changes_from, changes_to, at, hash FROM journal ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                EntryRow {
                    accounts: (r.get(1)?, r.get(2)?),
                    transfers: (r.get(3)?, r.get(4)?),
                    changes: (r.get(5)?, r.get(6)?),
                    at: r.get(7)?,
                    hash: r.get(8)?,
                },
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut account_stmt = conn.prepare(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM {ACCOUNTS_JOINED} WHERE a.seq BETWEEN ?1 AND ?2 ORDER BY a.seq"
    ))?;
    let mut transfer_stmt =
        conn.prepare(&format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq"))?;
    let mut change_stmt =
        conn.prepare("SELECT seq, tbl, key, row FROM row_changes WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq")?;
    for (seq, entry) in journal {
        entries += 1;
        let n = entries;
        if seq != n as i64
            || entry.accounts.0 != expected_account
            || entry.transfers.0 != expected_transfer
            || entry.changes.0 != expected_change
        {
            return Err(corrupt(format!("journal entry {n} does not follow the previous one")));
        }
        // Read and hash the entry first: its rows are judged (and shown to
        // the voucher rules) only once the chain says they are the ones
        // that were written.
        let accounts = entry_rows(&mut account_stmt, entry.accounts, read_account, ("accounts", "account rows"), n)
            .map_err(corrupt)?;
        let rows = entry_rows(&mut transfer_stmt, entry.transfers, read_transfer, ("transfers", "transfer rows"), n)
            .map_err(corrupt)?;
        let recorded = entry_rows(&mut change_stmt, entry.changes, read_change, ("row_changes", "row changes"), n)
            .map_err(corrupt)?;
        let (mut account_bytes, mut transfer_bytes, mut change_bytes) = (Vec::new(), Vec::new(), Vec::new());
        accounts.iter().for_each(|a| encode_account(&mut account_bytes, a));
        rows.iter().for_each(|t| encode_transfer(&mut transfer_bytes, t));
        recorded.iter().for_each(|c| encode_change(&mut change_bytes, c));
        let header = encode_header(seq, entry.at, [entry.accounts, entry.transfers, entry.changes]);
        head = chain(&head, &[&header, &account_bytes, &transfer_bytes, &change_bytes]);
        if entry.hash.as_slice() != head {
            return Err(corrupt(format!("journal entry {n}: hash chain broken")));
        }
        if let Some(a) = anchor
            && a.seq == n
            && a.hash != head
        {
            return Err(corrupt(format!(
                "journal entry {n} is not the anchored one: its hash is {}, the anchor says {} (history was rewritten)",
                hex(&head),
                hex(&a.hash)
            )));
        }
        for a in accounts {
            replayed.insert(
                a.id,
                Account { debits_pending: 0, debits_posted: 0, credits_pending: 0, credits_posted: 0, ..a },
            );
        }
        for t in &rows {
            apply_recorded(&mut replayed, &mut pending, t).map_err(corrupt)?;
            for id in [t.debit, t.credit] {
                let a = &replayed[&id];
                if a.unit != t.unit {
                    return Err(corrupt(format!("transfer {} moves {} on an account of {}", t.id, t.unit, a.unit)));
                }
                if a.has(flags::DEBITS_MUST_NOT_EXCEED_CREDITS)
                    && a.debits_posted.saturating_add(a.debits_pending) > a.credits_posted
                {
                    return Err(corrupt(format!("account {id} overdrawn after transfer {}", t.id)));
                }
                if a.has(flags::CREDITS_MUST_NOT_EXCEED_DEBITS)
                    && a.credits_posted.saturating_add(a.credits_pending) > a.debits_posted
                {
                    return Err(corrupt(format!("account {id} over-credited after transfer {}", t.id)));
                }
            }
            replay.transfer(t, &replayed[&t.debit], &replayed[&t.credit]).map_err(corrupt)?;
            transfers += 1;
        }
        for c in recorded {
            let table = tables.entry(c.table.clone()).or_default();
            replay
                .row_change(&c.table, table.get(&c.key).map(String::as_str), c.row.as_deref())
                .map_err(|problem| corrupt(format!("journal entry {n}, row change {}: {problem}", c.seq)))?;
            match c.row {
                Some(row) => {
                    table.insert(c.key, row);
                }
                None => {
                    if table.remove(&c.key).is_none() {
                        return Err(corrupt(format!(
                            "journal entry {n}: row change {} deletes {} row {} that does not exist",
                            c.seq, c.table, c.key
                        )));
                    }
                }
            }
            changes += 1;
        }
        expected_account = entry.accounts.1 + 1;
        expected_transfer = entry.transfers.1 + 1;
        expected_change = entry.changes.1 + 1;
    }
    if let Some(a) = anchor
        && a.seq > entries
    {
        return Err(corrupt(format!(
            "the journal ends at entry {entries}, before the anchored entry {} (entries were removed)",
            a.seq
        )));
    }
    let count = |table: &str| -> Result<i64, LedgerError> {
        Ok(conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?)
    };
    if count("transfers")? as u64 != transfers {
        return Err(corrupt("transfers: rows exist outside the journal".into()));
    }
    if stored.len() != replayed.len() || count("accounts")? as usize != replayed.len() {
        return Err(corrupt("accounts: rows exist outside the journal, or without their balances".into()));
    }
    if count("balances")? as usize != replayed.len() {
        return Err(corrupt("balances: rows of no account".into()));
    }
    if count("row_changes")? as u64 != changes {
        let stray: Option<RowChange> = conn
            .query_row(
                "SELECT seq, tbl, key, row FROM row_changes WHERE seq >= ?1 OR seq < 1 ORDER BY seq LIMIT 1",
                [expected_change],
                read_change,
            )
            .optional()?;
        return Err(corrupt(match stray {
            Some(c) => format!(
                "row_changes: {} of {} row {} is outside the journal (the table was edited around the ledger)",
                if c.row.is_some() { "a write" } else { "a delete" },
                c.table,
                c.key
            ),
            None => "row_changes: changes exist outside the journal".into(),
        }));
    }
    for (id, a) in &stored {
        let r = &replayed[id];
        if (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
            != (r.debits_pending, r.debits_posted, r.credits_pending, r.credits_posted)
        {
            return Err(corrupt(format!(
                "account {id}: stored totals ({}, {}, {}, {}) differ from the replay ({}, {}, {}, {})",
                a.debits_pending,
                a.debits_posted,
                a.credits_pending,
                a.credits_posted,
                r.debits_pending,
                r.debits_posted,
                r.credits_pending,
                r.credits_posted
            )));
        }
    }
    verify_pending(conn, &pending).map_err(corrupt)?;
    verify_tables(conn, &tables).map_err(corrupt)?;
    // Sums over all accounts in i128: no total of i64 amounts can wrap.
    let mut totals: HashMap<String, (i128, i128, i128, i128)> = HashMap::default();
    for a in replayed.values() {
        let t = totals.entry(a.unit.to_string()).or_default();
        t.0 += a.debits_posted as i128;
        t.1 += a.credits_posted as i128;
        t.2 += a.debits_pending as i128;
        t.3 += a.credits_pending as i128;
    }
    let mut report_totals = Vec::new();
    for (unit, (dp, cp, dpe, cpe)) in totals {
        if dp != cp || dpe != cpe {
            return Err(corrupt(format!("{unit}: debits {dp}/{dpe} differ from credits {cp}/{cpe}")));
        }
        report_totals.push((unit, dp, dpe));
    }
    report_totals.sort();
    let open = pending.values().filter(|p| p.state == PendingState::Pending).count() as u64;
    Ok(VerifyReport {
        journal_entries: entries,
        head: hex(&head),
        accounts: stored.len() as u64,
        transfers,
        open_pending: open,
        row_changes: changes,
        totals: report_totals,
    })
}

/// The pending table must be exactly what the replay of the transfers says:
/// every hold's accounts, amount, expiry and state.
fn verify_pending(conn: &Connection, replayed: &HashMap<TransferId, PendingRecord>) -> Result<(), String> {
    let mut stmt =
        conn.prepare("SELECT id, debit, credit, amount, expires_at, state FROM pending").map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                TransferId(id_at(r, 0)?),
                PendingRecord {
                    debit: AccountId(id_at(r, 1)?),
                    credit: AccountId(id_at(r, 2)?),
                    amount: r.get(3)?,
                    expires_at: r.get(4)?,
                    state: PendingState::from_code(int_in(r, 5, 0..=3, "state")?),
                },
            ))
        })
        .map_err(|e| e.to_string())?;
    let mut seen = 0usize;
    for row in rows {
        let (id, stored) = row.map_err(|e| format!("pending: a row the ledger never writes: {e}"))?;
        match replayed.get(&id) {
            None => return Err(format!("pending: transfer {id} is held in the table but by no transfer")),
            Some(r) if *r != stored => {
                return Err(format!(
                    "pending: transfer {id} stored as {} of {} expiring at {} ({:?}), the replay says {} of {} expiring at {} ({:?})",
                    stored.amount,
                    stored.debit,
                    stored.expires_at,
                    stored.state,
                    r.amount,
                    r.debit,
                    r.expires_at,
                    r.state
                ));
            }
            Some(_) => seen += 1,
        }
    }
    if seen != replayed.len() {
        return Err(format!("pending: {} pending transfers missing from the table", replayed.len() - seen));
    }
    Ok(())
}

/// Every journaled table must hold exactly the rows its changes say.
fn verify_tables(
    conn: &Connection,
    replayed: &HashMap<String, std::collections::BTreeMap<String, String>>,
) -> Result<(), String> {
    let empty = std::collections::BTreeMap::new();
    let mut journaled = core_journaled();
    for row in replayed.get("journaled_tables").unwrap_or(&empty).values() {
        journaled.push(registered_table(row).ok_or_else(|| format!("journaled_tables: unreadable entry {row}"))?);
    }
    let names: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .map_err(|e| e.to_string())?;
        stmt.query_map([], |r| r.get(0))
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?
    };
    // Other tables may share the file (the platform's jobs and attempts):
    // they are not the books, and nothing that decides money reads them.
    // A trigger, though, acts inside the ledger's commits.
    let ours = trigger_names(&journaled);
    let mut stmt = conn
        .prepare("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name")
        .map_err(|e| e.to_string())?;
    let triggers: Vec<(String, String, Option<String>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if let Some((name, table, _)) = triggers.iter().find(|(name, ..)| !ours.contains(name)) {
        return Err(format!("trigger {name} on table {table} is not the ledger's (planted in the file)"));
    }
    let expected: HashMap<String, String> = journaled.iter().flat_map(trigger_sql).collect();
    for (name, table, sql) in &triggers {
        if sql.as_ref() != expected.get(name) {
            return Err(format!(
                "trigger {name} on table {table} is not the one the ledger makes (its body was altered)"
            ));
        }
    }
    for name in replayed.keys() {
        if !journaled.iter().any(|t| &t.name == name) {
            return Err(format!("row_changes: changes of {name}, which is not a journaled table"));
        }
    }
    for t in &journaled {
        let want = replayed.get(&t.name).unwrap_or(&empty);
        if !names.contains(&t.name) {
            return Err(format!("table {} is journaled but missing", t.name));
        }
        let sql = format!("SELECT {}, {} FROM \"{}\"", canonical("", &t.key), canonical("", &t.columns), t.name);
        let mut stmt = conn.prepare(&sql).map_err(|e| format!("table {}: {e}", t.name))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| format!("table {}: {e}", t.name))?;
        let mut seen = 0usize;
        for row in rows {
            let (key, row) = row.map_err(|e| format!("table {}: {e}", t.name))?;
            match want.get(&key) {
                None => return Err(format!("table {}: row {key} is not in the journal (inserted outside it)", t.name)),
                Some(w) if *w != row => {
                    return Err(format!(
                        "table {}: row {key} differs from the journal (stored {row}, journaled {w})",
                        t.name
                    ));
                }
                Some(_) => seen += 1,
            }
        }
        if seen != want.len() {
            let stored: HashSet<String> = {
                let sql = format!("SELECT {} FROM \"{}\"", canonical("", &t.key), t.name);
                let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
                stmt.query_map([], |r| r.get(0))
                    .map_err(|e| e.to_string())?
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?
            };
            let gone = want.keys().find(|k| !stored.contains(*k)).cloned().unwrap_or_default();
            return Err(format!("table {}: row {gone} of the journal is missing (deleted outside it)", t.name));
        }
    }
    Ok(())
}
