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

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use crate::error::{LedgerError, Refusal};
use crate::model::{Account, AccountId, NewAccount, NewTransfer, Transfer, TransferId, TransferKind, Unit, flags};

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    unit TEXT NOT NULL,
    flags INTEGER NOT NULL,
    debits_pending INTEGER NOT NULL,
    debits_posted INTEGER NOT NULL,
    credits_pending INTEGER NOT NULL,
    credits_posted INTEGER NOT NULL,
    created_at INTEGER NOT NULL
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
-- One entry per commit: the account and transfer rows it added, chained by hash.
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    accounts_from INTEGER NOT NULL,
    accounts_to INTEGER NOT NULL,
    transfers_from INTEGER NOT NULL,
    transfers_to INTEGER NOT NULL,
    at INTEGER NOT NULL,
    hash BLOB NOT NULL
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
    b.copy_from_slice(&bytes[..16.min(bytes.len())]);
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
    for text in [&t.memo, &t.unit.to_string()] {
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

fn chain(prev: &[u8; 32], accounts: &[u8], transfers: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(accounts);
    h.update(transfers);
    h.finalize().into()
}

fn read_account(row: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    let unit: String = row.get("unit")?;
    Ok(Account {
        seq: row.get("seq")?,
        id: AccountId(from_blob(&row.get::<_, Vec<u8>>("id")?)),
        kind: row.get("kind")?,
        owner: row.get("owner")?,
        unit: unit.parse().unwrap_or(Unit::Fen),
        flags: row.get::<_, i64>("flags")? as u32,
        debits_pending: row.get("debits_pending")?,
        debits_posted: row.get("debits_posted")?,
        credits_pending: row.get("credits_pending")?,
        credits_posted: row.get("credits_posted")?,
        created_at: row.get("created_at")?,
    })
}

fn read_transfer(row: &rusqlite::Row<'_>) -> rusqlite::Result<Transfer> {
    let pending: Option<Vec<u8>> = row.get("pending_id")?;
    let kind_code: i64 = row.get("kind")?;
    let timeout_s: i64 = row.get("timeout_s")?;
    let kind = TransferKind::from_parts(kind_code, pending.map(|p| TransferId(from_blob(&p))), timeout_s)
        .ok_or_else(|| rusqlite::Error::IntegralValueOutOfRange(5, kind_code))?;
    let unit: String = row.get("unit")?;
    Ok(Transfer {
        seq: row.get("seq")?,
        id: TransferId(from_blob(&row.get::<_, Vec<u8>>("id")?)),
        debit: AccountId(from_blob(&row.get::<_, Vec<u8>>("debit")?)),
        credit: AccountId(from_blob(&row.get::<_, Vec<u8>>("credit")?)),
        amount: row.get("amount")?,
        kind,
        linked: row.get::<_, i64>("linked")? != 0,
        code: row.get::<_, i64>("code")? as u16,
        memo: row.get("memo")?,
        unit: unit.parse().unwrap_or(Unit::Fen),
        at: row.get("at")?,
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

/// The ledger: one database file, one writer.
pub struct Ledger {
    conn: Connection,
    path: String,
    accounts: HashMap<AccountId, Account>,
    head: [u8; 32],
    /// The journal entry the caches reflect.
    journal_seq: i64,
    next_account_seq: i64,
    next_transfer_seq: i64,
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        let path = path.as_ref();
        let conn = open_connection(path)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != 0 && version != SCHEMA_VERSION {
            return Err(LedgerError::Corrupt {
                path: path.display().to_string(),
                problem: format!("schema version {version}, this build reads {SCHEMA_VERSION}"),
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let mut ledger = Ledger {
            conn,
            path: path.display().to_string(),
            accounts: HashMap::new(),
            head: [0; 32],
            journal_seq: -1,
            next_account_seq: 1,
            next_transfer_seq: 1,
        };
        ledger.refresh()?;
        Ok(ledger)
    }

    /// The last journal entry in the file: (seq, hash).
    fn journal_head(conn: &Connection) -> Result<(i64, [u8; 32]), LedgerError> {
        let head: Option<(i64, Vec<u8>)> = conn
            .query_row("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match head {
            Some((seq, h)) => {
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(&h[..32]);
                (seq, bytes)
            }
            None => (0, [0; 32]),
        })
    }

    /// Reloads the caches from the file.
    fn refresh(&mut self) -> Result<(), LedgerError> {
        let mut accounts = HashMap::new();
        {
            let mut stmt = self.conn.prepare("SELECT * FROM accounts")?;
            for account in stmt.query_map([], read_account)? {
                let account = account?;
                accounts.insert(account.id, account);
            }
        }
        let (journal_seq, head) = Self::journal_head(&self.conn)?;
        self.accounts = accounts;
        self.journal_seq = journal_seq;
        self.head = head;
        self.next_account_seq =
            self.conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM accounts", [], |r| r.get(0))?;
        self.next_transfer_seq =
            self.conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM transfers", [], |r| r.get(0))?;
        Ok(())
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id)
    }

    /// All accounts, in creation order.
    pub fn accounts(&self) -> Vec<Account> {
        let mut all: Vec<Account> = self.accounts.values().cloned().collect();
        all.sort_by_key(|a| a.seq);
        all
    }

    /// The read side of the store, for queries (statements, reports).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, LedgerError> {
        Ok(self.conn.query_row("SELECT * FROM transfers WHERE id = ?1", [blob(id.0)], read_transfer).optional()?)
    }

    /// Transfers that debit or credit an account, oldest first (a scan).
    pub fn transfers_of(&self, account: AccountId) -> Result<Vec<Transfer>, LedgerError> {
        let mut stmt = self.conn.prepare("SELECT * FROM transfers WHERE debit = ?1 OR credit = ?1 ORDER BY seq")?;
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
        // our last commit. Under the write lock, check the journal head; if
        // it moved, reload the caches and take the lock again.
        let tx = loop {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if Self::journal_head(&tx)?.0 == self.journal_seq {
                break tx;
            }
            drop(tx);
            self.refresh()?;
        };
        let mut batch = Batch {
            tx: &tx,
            base: &self.accounts,
            overlay: HashMap::new(),
            undo: Vec::new(),
            savepoints: 0,
            in_chain: false,
            now,
            accounts_from: self.next_account_seq,
            next_account_seq: self.next_account_seq,
            transfers_from: self.next_transfer_seq,
            next_transfer_seq: self.next_transfer_seq,
            account_bytes: Vec::new(),
            transfer_bytes: Vec::new(),
        };
        let value = f(&mut batch)?;
        let head = batch.finish(&self.head)?;
        let Batch { overlay, next_account_seq, next_transfer_seq, .. } = batch;
        tx.commit()?;
        if let Some(head) = head {
            self.head = head;
            self.journal_seq += 1;
            debug_assert_eq!(Self::journal_head(&self.conn).map(|(s, _)| s).unwrap_or(-1), self.journal_seq);
        }
        self.next_account_seq = next_account_seq;
        self.next_transfer_seq = next_transfer_seq;
        self.accounts.extend(overlay);
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
    touched: std::collections::HashSet<AccountId>,
    next_account_seq: i64,
    next_transfer_seq: i64,
    account_bytes: usize,
    transfer_bytes: usize,
}

/// One write transaction in progress.
pub struct Batch<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    base: &'a HashMap<AccountId, Account>,
    overlay: HashMap<AccountId, Account>,
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
            "INSERT INTO accounts (seq, id, kind, owner, unit, flags, debits_pending, debits_posted, credits_pending, credits_posted, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 0, 0, 0, ?7)",
        )?
        .execute(params![account.seq, blob(a.id.0), a.kind, a.owner, a.unit.to_string(), a.flags, self.now])?;
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
        Ok(())
    }

    /// One transfer: the same request again returns the first outcome.
    pub fn create_transfer(&mut self, t: &NewTransfer) -> Result<Result<Transfer, Refusal>, LedgerError> {
        if t.id.0 == 0 {
            return Ok(Err(Refusal::IdMustNotBeZero));
        }
        let existing = self
            .tx
            .prepare_cached("SELECT * FROM transfers WHERE id = ?1")?
            .query_row([blob(t.id.0)], read_transfer)
            .optional()?;
        if let Some(existing) = existing {
            return Ok(if existing.matches(t) {
                Ok(existing)
            } else {
                Err(Refusal::IdReusedWithDifferentContent(t.id.to_string()))
            });
        }
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
        let transfer = match self.check(t)? {
            Ok(transfer) => transfer,
            Err(refusal) => {
                // Inside a chain, the chain records its members' outcomes
                // once it has rolled back.
                if !self.in_chain {
                    self.record_refusal(t, &refusal)?;
                }
                return Ok(Err(refusal));
            }
        };
        self.record(&transfer)?;
        Ok(Ok(transfer))
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
        if debit.has(flags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            let available = debit.available();
            if t.amount > available {
                return Ok(Err(Refusal::InsufficientFunds { account: debit.id, available, amount: t.amount }));
            }
        }
        if credit.has(flags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && credit.credits_posted.saturating_add(credit.credits_pending).saturating_add(t.amount)
                > credit.debits_posted
        {
            return Ok(Err(Refusal::ExceedsDebits { account: credit.id }));
        }
        Ok(Ok(resolved(t.debit, t.credit, t.amount, debit.unit.clone())))
    }

    /// Stores a checked transfer and applies it.
    fn record(&mut self, t: &Transfer) -> Result<(), LedgerError> {
        self.tx
            .prepare_cached(
                "INSERT INTO transfers (seq, id, debit, credit, amount, kind, pending_id, timeout_s, linked, code, memo, unit, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
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
                t.unit.to_string(),
                t.at
            ])?;
        let mut pending = HashMap::new();
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
        Ok(())
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
            self.record(&t)?;
        }
        Ok(due.len())
    }

    /// Writes the touched accounts and the journal entry; returns the new head.
    fn finish(&mut self, prev: &[u8; 32]) -> Result<Option<[u8; 32]>, LedgerError> {
        let mut stmt = self.tx.prepare_cached(
            "UPDATE accounts SET debits_pending = ?2, debits_posted = ?3, credits_pending = ?4, credits_posted = ?5 WHERE id = ?1",
        )?;
        for a in self.overlay.values() {
            stmt.execute(params![
                blob(a.id.0),
                a.debits_pending,
                a.debits_posted,
                a.credits_pending,
                a.credits_posted
            ])?;
        }
        if self.account_bytes.is_empty() && self.transfer_bytes.is_empty() {
            return Ok(None);
        }
        let head = chain(prev, &self.account_bytes, &self.transfer_bytes);
        self.tx
            .prepare_cached(
                "INSERT INTO journal (accounts_from, accounts_to, transfers_from, transfers_to, at, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                self.accounts_from,
                self.next_account_seq - 1,
                self.transfers_from,
                self.next_transfer_seq - 1,
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
    /// Per unit: total posted debits (= total posted credits) and pending.
    pub totals: Vec<(String, i64, i64)>,
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
        let seq = seq.parse::<u64>().map_err(|_| format!("'{seq}' is not a journal sequence number"))?;
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
    let path = path.as_ref();
    let corrupt = |problem: String| LedgerError::Corrupt { path: path.display().to_string(), problem };
    if !path.exists() {
        return Err(corrupt("no such file".into()));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // Every read below sees one snapshot, however many writers commit
    // meanwhile (WAL): the read transaction pins it at its first read.
    let snapshot = conn.unchecked_transaction()?;
    let conn = &*snapshot;
    let stored: HashMap<AccountId, Account> = {
        let mut stmt = conn.prepare("SELECT * FROM accounts ORDER BY seq")?;
        let rows = stmt.query_map([], read_account)?;
        rows.map(|a| a.map(|a| (a.id, a))).collect::<Result<_, _>>()?
    };
    let mut replayed: HashMap<AccountId, Account> = HashMap::new();
    let mut pending: HashMap<TransferId, PendingRecord> = HashMap::new();
    let mut head = [0u8; 32];
    let mut entries = 0u64;
    let mut transfers = 0u64;
    let mut expected_account = 1i64;
    let mut expected_transfer = 1i64;
    let journal: Vec<(i64, i64, i64, i64, Vec<u8>)> = {
        let mut stmt = conn.prepare(
            "SELECT accounts_from, accounts_to, transfers_from, transfers_to, hash FROM journal ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut account_stmt = conn.prepare("SELECT * FROM accounts WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq")?;
    let mut transfer_stmt = conn.prepare("SELECT * FROM transfers WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq")?;
    for (accounts_from, accounts_to, transfers_from, transfers_to, hash) in journal {
        entries += 1;
        if accounts_from != expected_account || transfers_from != expected_transfer {
            return Err(corrupt(format!("journal entry {entries} does not follow the previous one")));
        }
        let mut account_bytes = Vec::new();
        let accounts: Vec<Account> =
            account_stmt.query_map([accounts_from, accounts_to], read_account)?.collect::<Result<_, _>>()?;
        if accounts.len() as i64 != accounts_to - accounts_from + 1 {
            return Err(corrupt(format!("journal entry {entries}: account rows missing")));
        }
        for a in accounts {
            encode_account(&mut account_bytes, &a);
            replayed.insert(
                a.id,
                Account { debits_pending: 0, debits_posted: 0, credits_pending: 0, credits_posted: 0, ..a },
            );
        }
        let rows: Vec<Transfer> =
            transfer_stmt.query_map([transfers_from, transfers_to], read_transfer)?.collect::<Result<_, _>>()?;
        if rows.len() as i64 != transfers_to - transfers_from + 1 {
            return Err(corrupt(format!("journal entry {entries}: transfer rows missing")));
        }
        let mut transfer_bytes = Vec::new();
        for t in &rows {
            encode_transfer(&mut transfer_bytes, t);
            apply_recorded(&mut replayed, &mut pending, t).map_err(corrupt)?;
            for id in [t.debit, t.credit] {
                let a = &replayed[&id];
                if a.unit != t.unit {
                    return Err(corrupt(format!("transfer {} moves {} on an account of {}", t.id, t.unit, a.unit)));
                }
                if a.has(flags::DEBITS_MUST_NOT_EXCEED_CREDITS) && a.debits_posted + a.debits_pending > a.credits_posted
                {
                    return Err(corrupt(format!("account {id} overdrawn after transfer {}", t.id)));
                }
                if a.has(flags::CREDITS_MUST_NOT_EXCEED_DEBITS)
                    && a.credits_posted + a.credits_pending > a.debits_posted
                {
                    return Err(corrupt(format!("account {id} over-credited after transfer {}", t.id)));
                }
            }
            transfers += 1;
        }
        head = chain(&head, &account_bytes, &transfer_bytes);
        if hash.as_slice() != head {
            return Err(corrupt(format!("journal entry {entries}: hash chain broken")));
        }
        if let Some(a) = anchor
            && a.seq == entries
            && a.hash != head
        {
            return Err(corrupt(format!(
                "journal entry {entries} is not the anchored one: its hash is {}, the anchor says {} (history was rewritten)",
                hex(&head),
                hex(&a.hash)
            )));
        }
        expected_account = accounts_to + 1;
        expected_transfer = transfers_to + 1;
    }
    if let Some(a) = anchor
        && a.seq > entries
    {
        return Err(corrupt(format!(
            "the journal ends at entry {entries}, before the anchored entry {} (entries were removed)",
            a.seq
        )));
    }
    let total_transfers: i64 = conn.query_row("SELECT COUNT(*) FROM transfers", [], |r| r.get(0))?;
    if total_transfers as u64 != transfers || stored.len() != replayed.len() {
        return Err(corrupt("rows exist outside the journal".into()));
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
    let mut totals: HashMap<String, (i64, i64, i64, i64)> = HashMap::new();
    for a in replayed.values() {
        let t = totals.entry(a.unit.to_string()).or_default();
        t.0 += a.debits_posted;
        t.1 += a.credits_posted;
        t.2 += a.debits_pending;
        t.3 += a.credits_pending;
    }
    let mut report_totals = Vec::new();
    for (unit, (dp, cp, dpe, cpe)) in totals {
        if dp != cp || dpe != cpe {
            return Err(corrupt(format!("{unit}: debits {dp}/{dpe} differ from credits {cp}/{cpe}")));
        }
        report_totals.push((unit, dp, dpe));
    }
    report_totals.sort();
    let stored_open: i64 = conn.query_row("SELECT COUNT(*) FROM pending WHERE state = 0", [], |r| r.get(0))?;
    let open = pending.values().filter(|p| p.state == PendingState::Pending).count() as u64;
    if stored_open as u64 != open {
        return Err(corrupt(format!("{stored_open} pending transfers stored open, {open} by the replay")));
    }
    Ok(VerifyReport {
        journal_entries: entries,
        head: hex(&head),
        accounts: stored.len() as u64,
        transfers,
        open_pending: open,
        totals: report_totals,
    })
}
