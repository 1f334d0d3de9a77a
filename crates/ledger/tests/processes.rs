//! Several processes writing one ledger file at once, as the server and an
//! operator's `suanwang ledger`/`admin` commands do: each child process
//! (this test binary run again with `SUANWANG_PROCESS_CHILD` set) opens its
//! own `Ledger` and makes random transfers — posted, pending, posted or
//! voided later, linked pairs — many of them more than the debit account
//! holds. Afterwards `verify` must pass (it replays every step and checks
//! that no account that may not go below zero ever did), every transfer a
//! child saw accepted must be in the file, and the totals must add up to
//! what the children report. Property-style: the seeds vary per round.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use suanwang_ledger::model::TransferKind;
use suanwang_ledger::{AccountId, Ledger, NewAccount, NewTransfer, TransferId, Unit, flags, verify};

use crate::temp_db;

const BANK: AccountId = AccountId(1);
/// Wallets that may not go below zero.
const WALLETS: u128 = 6;
const CHILDREN: u64 = 6;
const OPS: u64 = 60;

fn wallet(i: u128) -> AccountId {
    AccountId(100 + i)
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Not a test on its own: the body of a child process.
#[test]
fn process_child() {
    let (Ok(db), Ok(seed)) = (std::env::var("SUANWANG_PROCESS_CHILD"), std::env::var("SUANWANG_PROCESS_SEED")) else {
        return;
    };
    let seed: u64 = seed.parse().unwrap();
    let mut rng = seed | 1;
    let mut ledger = Ledger::open(&db).unwrap();
    let mut next = seed as u128 * 1_000_000;
    let mut id = || {
        next += 1;
        TransferId(next)
    };
    let mut open_holds: Vec<TransferId> = Vec::new();
    for _ in 0..OPS {
        let from = wallet(xorshift(&mut rng) as u128 % WALLETS);
        let to = wallet(xorshift(&mut rng) as u128 % WALLETS);
        let amount = 1 + (xorshift(&mut rng) % 40) as i64;
        let batch = match xorshift(&mut rng) % 6 {
            0 | 1 => vec![NewTransfer::posted(id(), from, to, amount, 0)],
            2 => {
                let mut t = NewTransfer::posted(id(), from, to, amount, 0);
                t.kind = TransferKind::Pending { timeout_s: 0 };
                vec![t]
            }
            3 if !open_holds.is_empty() => {
                let pending = open_holds.swap_remove((xorshift(&mut rng) as usize) % open_holds.len());
                let mut t = NewTransfer::posted(id(), AccountId(0), AccountId(0), 0, 0);
                t.kind = if xorshift(&mut rng).is_multiple_of(2) {
                    TransferKind::PostPending { pending }
                } else {
                    TransferKind::VoidPending { pending }
                };
                t.amount = 0;
                vec![t]
            }
            // A linked pair: both or neither (the second may overdraw).
            _ => {
                let mut first = NewTransfer::posted(id(), from, to, amount, 0);
                first.linked = true;
                vec![first, NewTransfer::posted(id(), to, wallet((to.0 - 99) % WALLETS), amount * 2, 0)]
            }
        };
        let outcomes = ledger.create_transfers(1, &batch).unwrap();
        let mut line = String::new();
        for (t, o) in batch.iter().zip(&outcomes) {
            if o.is_ok() {
                line.push_str(&format!("accepted {}\n", t.id.0));
                if matches!(t.kind, TransferKind::Pending { .. }) {
                    open_holds.push(t.id);
                }
            }
        }
        print!("{line}");
    }
}

#[test]
fn processes_writing_one_file_never_lose_an_update_or_overdraw() {
    let exe = std::env::current_exe().unwrap();
    for round in 0..3u64 {
        let db = temp_db("processes");
        let mut ledger = Ledger::open(&db).unwrap();
        let mut accounts =
            vec![NewAccount { id: BANK, kind: "bank".into(), owner: "b".into(), unit: Unit::Fen, flags: 0 }];
        accounts.extend((0..WALLETS).map(|i| NewAccount {
            id: wallet(i),
            kind: "wallet".into(),
            owner: format!("w{i}"),
            unit: Unit::Fen,
            flags: flags::DEBITS_MUST_NOT_EXCEED_CREDITS,
        }));
        assert!(ledger.create_accounts(0, &accounts).unwrap().iter().all(|o| o.is_ok()));
        // Little money, so that many transfers are refused and races on a
        // stale balance would overdraw.
        let funding: Vec<NewTransfer> =
            (0..WALLETS).map(|i| NewTransfer::posted(TransferId(1 + i), BANK, wallet(i), 50, 0)).collect();
        assert!(ledger.create_transfers(0, &funding).unwrap().iter().all(|o| o.is_ok()));
        drop(ledger);
        let children: Vec<_> = (0..CHILDREN)
            .map(|c| {
                Command::new(&exe)
                    .args(["processes::process_child", "--exact", "--nocapture", "--test-threads=1"])
                    .env("SUANWANG_PROCESS_CHILD", &db)
                    .env("SUANWANG_PROCESS_SEED", (1 + round * 100 + c).to_string())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut accepted = BTreeSet::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "a child failed: {}", String::from_utf8_lossy(&out.stderr));
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                // The harness's "test ... " may start the first line.
                if let Some((_, id)) = line.rsplit_once("accepted ") {
                    accepted.insert(id.parse::<u128>().unwrap());
                }
            }
        }
        let report = verify(&db).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let ledger = Ledger::open(&db).unwrap();
        for id in &accepted {
            assert!(ledger.transfer(TransferId(*id)).unwrap().is_some(), "round {round}: transfer {id} lost");
        }
        let stored: BTreeSet<u128> = {
            let conn = ledger.connection();
            let mut stmt = conn.prepare("SELECT id FROM transfers").unwrap();
            stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
                .unwrap()
                .map(|b| u128::from_be_bytes(b.unwrap().try_into().unwrap()))
                .collect()
        };
        let unexplained: Vec<&u128> = stored.iter().filter(|id| **id > WALLETS && !accepted.contains(id)).collect();
        assert!(unexplained.is_empty(), "round {round}: stored but never accepted: {unexplained:?}");
        // The file holds exactly the funding and what the children saw accepted.
        assert_eq!(report.transfers as usize, WALLETS as usize + accepted.len(), "round {round}: {report:?}");
        let total: i64 = (0..WALLETS).map(|i| ledger.account(wallet(i)).unwrap().balance()).sum();
        assert_eq!(total, 50 * WALLETS as i64, "money is only moved between wallets");
        for i in 0..WALLETS {
            let a = ledger.account(wallet(i)).unwrap();
            assert!(a.available() >= 0, "round {round}: wallet {i} overdrawn: {a:?}");
        }
    }
}

/// Not a test on its own: a child making voucher operations (grants, holds,
/// settlements, releases, top-ups, relations), each on the tables and the
/// transfers at once.
#[test]
fn voucher_process_child() {
    use suanwang_ledger::voucher::{self, Placement, Usage};
    let (Ok(db), Ok(seed)) = (std::env::var("SUANWANG_VOUCHER_CHILD"), std::env::var("SUANWANG_PROCESS_SEED")) else {
        return;
    };
    let seed: u64 = seed.parse().unwrap();
    let mut rng = seed | 1;
    let now = 1_772_294_400; // 2026-03-01
    let mut ledger = Ledger::open(&db).unwrap();
    let place = Placement {
        site: "jinan-icc".into(),
        provider: "jinan-icc-co".into(),
        accel: "Ascend910B".into(),
        domestic: true,
        price_fen_per_hour: 1_000,
    };
    let mut held: Vec<String> = Vec::new();
    for n in 0..VOUCHER_OPS {
        let org = ["acme", "sdu"][(xorshift(&mut rng) % 2) as usize];
        let id = TransferId(seed as u128 * 1_000_000 + n as u128);
        let hours = 1 + (xorshift(&mut rng) % 30) as i64;
        let usage = Usage { accel_seconds: hours * 3600, transfer_fen: (xorshift(&mut rng) % 50) as i64 };
        let done = match xorshift(&mut rng) % 6 {
            0 => {
                voucher::grant(&mut ledger, now, id, "sd-2026", org, 1 + (xorshift(&mut rng) % 20_000) as i64).map(drop)
            }
            1 => voucher::fund_programme(&mut ledger, now, id, "sd-2026", 1_000, "top-up").map(drop),
            2 if !held.is_empty() => {
                let job = held.swap_remove((xorshift(&mut rng) as usize) % held.len());
                if xorshift(&mut rng).is_multiple_of(3) {
                    voucher::release(&mut ledger, now, &job)
                } else {
                    let actual = Usage { accel_seconds: usage.accel_seconds / 2, transfer_fen: usage.transfer_fen };
                    voucher::settle(&mut ledger, now + 60, &job, &actual).map(drop)
                }
            }
            3 => voucher::relate(&mut ledger, now, org, &format!("provider-{}", xorshift(&mut rng) % 4), "shares")
                .map(drop),
            _ => {
                let job = format!("job-{seed}-{n}");
                let outcome = voucher::hold(&mut ledger, now, &job, org, &place, &usage, 86_400).map(drop);
                if outcome.is_ok() {
                    held.push(job);
                }
                outcome
            }
        };
        // Refusals (an exhausted budget, a wallet short of money) are part
        // of the game; a store error is not.
        if let Err(e) = done {
            assert!(matches!(e, suanwang_ledger::LedgerError::Refused(_)), "{e}");
        }
    }
}

const VOUCHER_OPS: u64 = 40;

#[test]
fn processes_making_voucher_operations_keep_tables_and_books_in_step() {
    use suanwang_ledger::voucher::{self, CapScope, OrgKind, ProgrammeSpec};
    let exe = std::env::current_exe().unwrap();
    let db = temp_db("voucher-processes");
    let now = 1_772_294_400;
    {
        let mut l = voucher::open(&db, now).unwrap();
        voucher::add_org(&mut l, now, "acme", OrgKind::Enterprise, "").unwrap();
        voucher::add_org(&mut l, now, "sdu", OrgKind::University, "").unwrap();
        let p = ProgrammeSpec {
            id: "sd-2026".into(),
            name: String::new(),
            issuer: "sd-bureau".into(),
            cap_per: CapScope::Issuer,
            budget_fen: 100_000,
            valid_from: now - 86_400,
            valid_until: now + 365 * 86_400,
            kinds: vec![OrgKind::Enterprise, OrgKind::University],
            sites: vec![],
            accels: vec![],
            rate_bp: 3_000,
            foreign_rate_bp: 2_000,
            org_year_cap_fen: 60_000,
            job_cap_fen: 5_000,
        };
        voucher::create_programme(&mut l, now, &p).unwrap();
        voucher::deposit(&mut l, now, TransferId(1), "acme", 200_000).unwrap();
        voucher::deposit(&mut l, now, TransferId(2), "sdu", 100_000).unwrap();
    }
    let children: Vec<_> = (0..4u64)
        .map(|c| {
            Command::new(&exe)
                .args(["processes::voucher_process_child", "--exact", "--nocapture", "--test-threads=1"])
                .env("SUANWANG_VOUCHER_CHILD", &db)
                .env("SUANWANG_PROCESS_SEED", (7 + c).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (report, problems) = voucher::verify_file(&db, None).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(report.row_changes > 20, "the children changed few rows: {report:?}");
    let l = Ledger::open(&db).unwrap();
    let p = &voucher::programmes(&l).unwrap()[0];
    assert_eq!(
        l.account(voucher::programme_pool("sd-2026")).unwrap().credits_posted,
        p.funded_fen,
        "every top-up is on the programme"
    );
}
