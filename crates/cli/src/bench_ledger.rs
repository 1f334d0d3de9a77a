//! `suanwang bench ledger`: durable transfer throughput, in batches and
//! from many concurrent clients with group commit, against the targets of
//! the voucher issue (100,000 transfers/s in batches of 1,000; 2,000 single
//! transfers/s from 64 clients). Every figure is for commits that returned,
//! i.e. are on disk (`synchronous=FULL`).
//!
//! Beside the batches, in the same run, a raw-SQLite baseline of the same
//! shape: the same transfer rows (same table and unique index), the same
//! two account-total updates per transfer (by row number, as the ledger
//! writes them) and one journal row per batch,
//! the same pragmas and durability, but no ledger logic (no checks of
//! balances, flags, ids or units, no hash chain, no caches). The ratio
//! ledger / raw says what the ledger's rules cost.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use suanwang_ledger::service::LedgerService;
use suanwang_ledger::{AccountId, Ledger, NewAccount, NewTransfer, TransferId, Unit};

use crate::table;

const ACCOUNTS: u64 = 10_000;

fn books(path: &Path) -> anyhow::Result<Ledger> {
    let _ = std::fs::remove_file(path);
    let mut ledger = Ledger::open(path)?;
    let accounts: Vec<NewAccount> = (0..ACCOUNTS)
        .map(|i| NewAccount {
            id: AccountId(1 + i as u128),
            kind: "bench".into(),
            owner: format!("o{i}"),
            unit: Unit::Fen,
            flags: 0,
        })
        .collect();
    for outcome in ledger.create_accounts(0, &accounts)? {
        outcome.map_err(|r| anyhow::anyhow!("{r}"))?;
    }
    Ok(ledger)
}

/// A deterministic pair of different accounts for transfer `n`.
fn pair(n: u64) -> (AccountId, AccountId) {
    let a = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % ACCOUNTS;
    let b = (a + 1 + n % (ACCOUNTS - 1)) % ACCOUNTS;
    (AccountId(1 + a as u128), AccountId(1 + b as u128))
}

fn transfer(n: u64) -> NewTransfer {
    let (debit, credit) = pair(n);
    NewTransfer::posted(TransferId(1_000_000 + n as u128), debit, credit, 1 + (n % 1000) as i64, 1)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub fn run(dir: &Path, batches: usize, batch_size: usize, clients: usize, per_client: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let mut rows = Vec::new();

    // 1. Batches of `batch_size`, one commit each.
    let path = dir.join("batches.db");
    let mut ledger = books(&path)?;
    let started = Instant::now();
    for b in 0..batches {
        let batch: Vec<NewTransfer> = (0..batch_size).map(|i| transfer((b * batch_size + i) as u64)).collect();
        let outcomes = ledger.create_transfers(1, &batch)?;
        anyhow::ensure!(outcomes.iter().all(|o| o.is_ok()), "a benchmark transfer was refused");
    }
    let seconds = started.elapsed().as_secs_f64();
    let n = batches * batch_size;
    rows.push(vec![
        format!("batches of {batch_size}"),
        n.to_string(),
        format!("{seconds:.2}"),
        format!("{:.0}", n as f64 / seconds),
        "-".into(),
        "-".into(),
    ]);
    let ledger_rate = n as f64 / seconds;
    drop(ledger);
    let verified = Instant::now();
    let report = suanwang_ledger::verify(&path)?;
    anyhow::ensure!(report.transfers as usize == n, "verify counted {} transfers", report.transfers);
    let verify_s = verified.elapsed().as_secs_f64();

    // 1b. The same batches straight into SQLite: the baseline.
    let raw_seconds = raw_batches(&dir.join("raw.db"), batches, batch_size)?;
    let raw_rate = n as f64 / raw_seconds;
    rows.push(vec![
        format!("raw SQLite baseline, batches of {batch_size}"),
        n.to_string(),
        format!("{raw_seconds:.2}"),
        format!("{raw_rate:.0}"),
        "-".into(),
        "-".into(),
    ]);

    // 2. Single transfers, each its own commit, one client: the fsync rate.
    let path = dir.join("singles.db");
    let mut ledger = books(&path)?;
    let singles = 300;
    let started = Instant::now();
    for i in 0..singles {
        ledger.create_transfers(1, &[transfer(i)])?.remove(0).map_err(|r| anyhow::anyhow!("{r}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    rows.push(vec![
        "single, 1 client, no grouping".into(),
        singles.to_string(),
        format!("{seconds:.2}"),
        format!("{:.0}", singles as f64 / seconds),
        "-".into(),
        "-".into(),
    ]);
    drop(ledger);

    // 3. Single transfers from many clients through group commit.
    let path = dir.join("clients.db");
    let service = LedgerService::start(books(&path)?);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let client = service.client();
            let next = next.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = transfer(next.fetch_add(1, Ordering::Relaxed));
                    let sent = Instant::now();
                    client.create_transfers(1, vec![t])?.remove(0).map_err(|r| anyhow::anyhow!("{r}"))?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(t.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(service);
    latencies.sort_by(f64::total_cmp);
    let n = clients * per_client;
    rows.push(vec![
        format!("single, {clients} clients, group commit"),
        n.to_string(),
        format!("{seconds:.2}"),
        format!("{:.0}", n as f64 / seconds),
        format!("{:.2}", percentile(&latencies, 0.5)),
        format!("{:.2}", percentile(&latencies, 0.99)),
    ]);
    suanwang_ledger::verify(&path)?;
    print!(
        "{}",
        table::render(
            &["workload (durable, synchronous=FULL)", "transfers", "seconds", "transfers/s", "p50 ms", "p99 ms"],
            &rows
        )
    );
    println!("ledger / raw SQLite in batches: {:.2}", ledger_rate / raw_rate);
    println!("verify of {} transfers: {verify_s:.2} s", batches * batch_size);
    for name in ["batches.db", "singles.db", "clients.db", "raw.db"] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.join(format!("{name}{suffix}")));
        }
    }
    Ok(())
}

/// Seconds to write `batches` batches of `batch_size` transfers as bare
/// SQL: the ledger's rows and durability without its rules.
fn raw_batches(path: &Path, batches: usize, batch_size: usize) -> anyhow::Result<f64> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -262_144)?;
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    conn.execute_batch(
        "CREATE TABLE accounts (seq INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, debits_posted INTEGER NOT NULL, credits_posted INTEGER NOT NULL);
         CREATE TABLE transfers (seq INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, debit BLOB NOT NULL, credit BLOB NOT NULL,
             amount INTEGER NOT NULL, kind INTEGER NOT NULL, pending_id BLOB, timeout_s INTEGER NOT NULL, linked INTEGER NOT NULL,
             code INTEGER NOT NULL, memo TEXT NOT NULL, unit TEXT NOT NULL, at INTEGER NOT NULL);
         CREATE TABLE journal (seq INTEGER PRIMARY KEY, transfers_from INTEGER, transfers_to INTEGER, at INTEGER, hash BLOB);",
    )?;
    {
        let tx = conn.transaction()?;
        let mut insert = tx.prepare("INSERT INTO accounts (id, debits_posted, credits_posted) VALUES (?1, 0, 0)")?;
        for i in 0..ACCOUNTS {
            insert.execute([(1 + i as u128).to_be_bytes().to_vec()])?;
        }
        drop(insert);
        tx.commit()?;
    }
    let started = Instant::now();
    let mut seq = 1i64;
    for b in 0..batches {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO transfers (seq, id, debit, credit, amount, kind, pending_id, timeout_s, linked, code, memo, unit, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, NULL, 0, 0, 1, '', 'fen', 1)",
            )?;
            // By row number, as the ledger writes its totals: account n is row n.
            let mut debit_update =
                tx.prepare_cached("UPDATE accounts SET debits_posted = debits_posted + ?2 WHERE seq = ?1")?;
            let mut credit_update =
                tx.prepare_cached("UPDATE accounts SET credits_posted = credits_posted + ?2 WHERE seq = ?1")?;
            let from = seq;
            for i in 0..batch_size {
                let t = transfer((b * batch_size + i) as u64);
                insert.execute(rusqlite::params![
                    seq,
                    t.id.0.to_be_bytes().to_vec(),
                    t.debit.0.to_be_bytes().to_vec(),
                    t.credit.0.to_be_bytes().to_vec(),
                    t.amount
                ])?;
                debit_update.execute(rusqlite::params![t.debit.0 as i64, t.amount])?;
                credit_update.execute(rusqlite::params![t.credit.0 as i64, t.amount])?;
                seq += 1;
            }
            tx.execute(
                "INSERT INTO journal (transfers_from, transfers_to, at, hash) VALUES (?1, ?2, 1, zeroblob(32))",
                [from, seq - 1],
            )?;
        }
        tx.commit()?;
    }
    Ok(started.elapsed().as_secs_f64())
}
