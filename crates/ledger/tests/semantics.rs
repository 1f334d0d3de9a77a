//! Transfer rules one by one, persistence, and what `verify` catches.

use suanwang_ledger::ledger::PendingState;
use suanwang_ledger::{
    AccountId, Anchor, Ledger, NewAccount, NewTransfer, Refusal, TransferId, TransferKind, Unit, flags, verify,
    verify_anchored,
};

use crate::temp_db;

const SOURCE: AccountId = AccountId(1);
const WALLET: AccountId = AccountId(2);
const SHOP: AccountId = AccountId(3);
const CARD: AccountId = AccountId(4);

fn books() -> (std::path::PathBuf, Ledger) {
    let path = temp_db("semantics");
    let mut ledger = Ledger::open(&path).unwrap();
    let account = |id, kind: &str, unit, flags| NewAccount { id, kind: kind.into(), owner: "o".into(), unit, flags };
    for outcome in ledger
        .create_accounts(
            0,
            &[
                account(SOURCE, "source", Unit::Fen, 0),
                account(WALLET, "wallet", Unit::Fen, flags::DEBITS_MUST_NOT_EXCEED_CREDITS),
                account(SHOP, "shop", Unit::Fen, 0),
                account(CARD, "card", Unit::AccelSeconds("H100".into()), 0),
            ],
        )
        .unwrap()
    {
        outcome.unwrap();
    }
    ledger.create_transfers(1, &[NewTransfer::posted(TransferId(1), SOURCE, WALLET, 1_000, 0)]).unwrap()[0]
        .as_ref()
        .unwrap();
    (path, ledger)
}

fn one(ledger: &mut Ledger, now: i64, t: NewTransfer) -> Result<i64, Refusal> {
    ledger.create_transfers(now, &[t]).unwrap().remove(0).map(|t| t.amount)
}

fn pending(id: u128, amount: i64, timeout_s: i64) -> NewTransfer {
    NewTransfer {
        kind: TransferKind::Pending { timeout_s },
        ..NewTransfer::posted(TransferId(id), WALLET, SHOP, amount, 0)
    }
}

fn post(id: u128, pending: u128, amount: i64) -> NewTransfer {
    NewTransfer {
        kind: TransferKind::PostPending { pending: TransferId(pending) },
        ..NewTransfer::posted(TransferId(id), AccountId(0), AccountId(0), amount, 0)
    }
}

#[test]
fn no_overdraft_and_clear_refusals() {
    let (_, mut l) = books();
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(10), WALLET, SHOP, 1_001, 0)),
        Err(Refusal::InsufficientFunds { account: WALLET, available: 1_000, amount: 1_001 })
    );
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(11), WALLET, SHOP, 0, 0)).unwrap_err().code(),
        "amount_must_be_positive"
    );
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(12), WALLET, SHOP, -5, 0)).unwrap_err().code(),
        "amount_must_be_positive"
    );
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(13), WALLET, WALLET, 5, 0)).unwrap_err().code(),
        "accounts_must_be_different"
    );
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(14), WALLET, CARD, 5, 0)).unwrap_err().code(),
        "units_must_match"
    );
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(15), AccountId(99), SHOP, 5, 0)).unwrap_err().code(),
        "debit_account_not_found"
    );
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(0), WALLET, SHOP, 5, 0)).unwrap_err().code(),
        "id_must_not_be_zero"
    );
    // The source has 1,000 of debits already.
    assert_eq!(
        one(&mut l, 2, NewTransfer::posted(TransferId(16), SOURCE, SHOP, i64::MAX - 1_000, 0)),
        Ok(i64::MAX - 1_000)
    );
    assert_eq!(one(&mut l, 2, NewTransfer::posted(TransferId(17), SOURCE, SHOP, 1, 0)).unwrap_err().code(), "overflow");
    assert_eq!(l.account(WALLET).unwrap().balance(), 1_000);
}

#[test]
fn repeating_an_id_returns_the_original_outcome() {
    let (_, mut l) = books();
    let pay = NewTransfer::posted(TransferId(20), WALLET, SHOP, 300, 7);
    assert_eq!(one(&mut l, 2, pay.clone()), Ok(300));
    assert_eq!(one(&mut l, 3, pay.clone()), Ok(300));
    assert_eq!(l.account(WALLET).unwrap().balance(), 700, "applied once");
    let other = NewTransfer { amount: 301, ..pay };
    assert_eq!(one(&mut l, 3, other).unwrap_err().code(), "id_reused_with_different_content");
    // A refusal is an outcome too: the same request is refused again, even
    // though the wallet could now pay.
    let too_much = NewTransfer::posted(TransferId(21), WALLET, SHOP, 800, 0);
    assert_eq!(one(&mut l, 4, too_much.clone()).unwrap_err().code(), "insufficient_funds");
    one(&mut l, 5, NewTransfer::posted(TransferId(22), SOURCE, WALLET, 500, 0)).unwrap();
    let again = one(&mut l, 6, too_much).unwrap_err();
    assert_eq!((again.code(), again.to_string().contains("700 available")), ("insufficient_funds", true));
}

#[test]
fn holds_post_in_part_void_and_expire() {
    let (path, mut l) = books();
    assert_eq!(one(&mut l, 10, pending(30, 400, 0)), Ok(400));
    assert_eq!(l.account(WALLET).unwrap().available(), 600);
    assert_eq!(one(&mut l, 11, post(31, 30, 500)).unwrap_err().code(), "exceeds_pending_amount");
    // Id 31 was refused: that id keeps its outcome, so a new request needs a new id.
    assert_eq!(one(&mut l, 11, post(31, 30, 250)).unwrap_err().code(), "id_reused_with_different_content");
    assert_eq!(one(&mut l, 11, post(33, 30, 250)), Ok(250));
    let w = l.account(WALLET).unwrap();
    assert_eq!((w.debits_pending, w.debits_posted, w.available()), (0, 250, 750));
    assert_eq!(one(&mut l, 12, post(32, 30, 10)).unwrap_err().code(), "pending_transfer_already_posted");
    assert_eq!(l.pending_state(TransferId(30)).unwrap(), Some(PendingState::Posted));

    one(&mut l, 20, pending(40, 100, 0)).unwrap();
    let void = NewTransfer { kind: TransferKind::VoidPending { pending: TransferId(40) }, ..post(41, 40, 0) };
    assert_eq!(one(&mut l, 21, void), Ok(100));
    assert_eq!(one(&mut l, 21, post(42, 40, 0)).unwrap_err().code(), "pending_transfer_already_voided");

    one(&mut l, 30, pending(50, 100, 60)).unwrap();
    assert_eq!(l.expire_pending(89).unwrap(), 0);
    assert_eq!(one(&mut l, 90, post(51, 50, 0)).unwrap_err().code(), "pending_transfer_expired");
    assert_eq!(l.expire_pending(90).unwrap(), 1);
    assert_eq!(l.pending_state(TransferId(50)).unwrap(), Some(PendingState::Expired));
    assert_eq!(l.account(WALLET).unwrap().available(), 750);
    assert_eq!(one(&mut l, 91, post(52, 99, 0)).unwrap_err().code(), "pending_transfer_not_found");
    drop(l);
    let report = verify(&path).unwrap();
    assert_eq!(report.open_pending, 0);
    assert_eq!(report.transfers, 7);
}

#[test]
fn linked_transfers_succeed_or_fail_together() {
    let (_, mut l) = books();
    let chain = |id: u128, second: i64| {
        vec![
            NewTransfer { linked: true, ..NewTransfer::posted(TransferId(id), WALLET, SHOP, 100, 0) },
            NewTransfer::posted(TransferId(id + 1), WALLET, SHOP, second, 0),
        ]
    };
    let out = l.create_transfers(5, &chain(60, 5_000)).unwrap();
    assert_eq!(out[0].as_ref().unwrap_err().code(), "linked_event_failed");
    assert_eq!(out[1].as_ref().unwrap_err().code(), "insufficient_funds");
    assert_eq!(l.account(WALLET).unwrap().balance(), 1_000, "nothing of the chain applied");
    assert!(l.transfer(TransferId(60)).unwrap().is_none());
    let out = l.create_transfers(6, &chain(70, 50)).unwrap();
    assert!(out.iter().all(|o| o.is_ok()));
    assert_eq!(l.account(WALLET).unwrap().balance(), 850);
    let open = vec![NewTransfer { linked: true, ..NewTransfer::posted(TransferId(80), WALLET, SHOP, 1, 0) }];
    assert_eq!(l.create_transfers(7, &open).unwrap()[0].as_ref().unwrap_err().code(), "linked_chain_open");
}

#[test]
fn everything_survives_a_reopen() {
    let (path, mut l) = books();
    one(&mut l, 5, pending(90, 100, 1000)).unwrap();
    drop(l);
    let mut l = Ledger::open(&path).unwrap();
    assert_eq!(l.account(WALLET).unwrap().available(), 900);
    assert_eq!(one(&mut l, 6, post(91, 90, 0)), Ok(100));
    assert_eq!(l.transfers_of(WALLET).unwrap().len(), 3);
    let account =
        NewAccount { id: WALLET, kind: "wallet".into(), owner: "someone else".into(), unit: Unit::Fen, flags: 0 };
    assert_eq!(
        l.create_accounts(7, &[account]).unwrap()[0].as_ref().unwrap_err().code(),
        "id_reused_with_different_content"
    );
}

#[test]
fn verify_catches_tampering_and_a_broken_chain() {
    let (path, mut l) = books();
    one(&mut l, 2, NewTransfer::posted(TransferId(100), WALLET, SHOP, 10, 0)).unwrap();
    drop(l);
    verify(&path).unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE transfers SET amount = 9 WHERE seq = 2", []).unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert!(err.contains("differ from the replay") || err.contains("hash chain broken"), "{err}");
    raw.execute("UPDATE transfers SET amount = 10 WHERE seq = 2", []).unwrap();
    verify(&path).unwrap();
    raw.execute("UPDATE balances SET credits_posted = credits_posted + 1 WHERE seq = 3", []).unwrap();
    assert!(verify(&path).unwrap_err().to_string().contains("stored totals"));
    raw.execute("UPDATE balances SET credits_posted = credits_posted - 1 WHERE seq = 3", []).unwrap();
    raw.execute("UPDATE transfers SET memo = 'forged' WHERE seq = 1", []).unwrap();
    assert!(verify(&path).unwrap_err().to_string().contains("hash chain broken"));
    assert!(verify(temp_db("missing")).unwrap_err().to_string().contains("no such file"));
}

#[test]
fn another_writer_on_the_same_file_is_picked_up() {
    let (path, mut first) = books();
    let mut second = Ledger::open(&path).unwrap();
    let account =
        |id, owner: &str| NewAccount { id, kind: "wallet".into(), owner: owner.into(), unit: Unit::Fen, flags: 0 };
    second.create_accounts(5, &[account(AccountId(50), "b")]).unwrap()[0].as_ref().unwrap();
    second.create_transfers(5, &[NewTransfer::posted(TransferId(500), SOURCE, AccountId(50), 7, 0)]).unwrap()[0]
        .as_ref()
        .unwrap();
    // The first ledger's caches are stale; its next write must see the change.
    first.create_accounts(6, &[account(AccountId(51), "a")]).unwrap()[0].as_ref().unwrap();
    one(&mut first, 6, NewTransfer::posted(TransferId(501), AccountId(50), AccountId(51), 3, 0)).unwrap();
    assert_eq!(first.account(AccountId(50)).unwrap().balance(), 4);
    drop((first, second));
    verify(&path).unwrap();
}

#[test]
fn an_anchor_catches_truncation_and_rewritten_history() {
    let (path, mut l) = books();
    for i in 0..3 {
        one(&mut l, 2 + i, NewTransfer::posted(TransferId(200 + i as u128), WALLET, SHOP, 10, 0)).unwrap();
    }
    drop(l);
    let kept = verify(&path).unwrap();
    let anchor: Anchor = format!("{}:{}", kept.journal_entries, kept.head).parse().unwrap();
    assert_eq!(verify_anchored(&path, Some(anchor)).unwrap().head, kept.head);
    // More commits extend the anchored head: still fine.
    let mut l = Ledger::open(&path).unwrap();
    one(&mut l, 9, NewTransfer::posted(TransferId(300), WALLET, SHOP, 1, 0)).unwrap();
    drop(l);
    verify_anchored(&path, Some(anchor)).unwrap();
    // Truncation: the last two commits removed, rows and journal alike,
    // which plain verify cannot tell from a shorter history.
    let raw = rusqlite::Connection::open(&path).unwrap();
    let last_two: i64 = raw
        .query_row(
            "SELECT MIN(transfers_from) FROM (SELECT transfers_from FROM journal ORDER BY seq DESC LIMIT 2)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    raw.execute("DELETE FROM transfers WHERE seq >= ?1", [last_two]).unwrap();
    raw.execute("DELETE FROM journal WHERE seq > (SELECT MAX(seq) - 2 FROM journal)", []).unwrap();
    raw.execute(
        "UPDATE balances SET debits_posted = debits_posted - 11 WHERE seq = (SELECT seq FROM accounts WHERE id = ?1)",
        [WALLET.0.to_be_bytes().to_vec()],
    )
    .unwrap();
    raw.execute(
        "UPDATE balances SET credits_posted = credits_posted - 11 WHERE seq = (SELECT seq FROM accounts WHERE id = ?1)",
        [SHOP.0.to_be_bytes().to_vec()],
    )
    .unwrap();
    verify(&path).unwrap();
    let err = verify_anchored(&path, Some(anchor)).unwrap_err().to_string();
    assert!(err.contains("before the anchored entry"), "{err}");
    // A history rewritten and re-hashed from the start (another book of
    // the same length) does not contain the anchored entry.
    let (other, mut o) = books();
    for i in 0..3 {
        one(&mut o, 2 + i, NewTransfer::posted(TransferId(200 + i as u128), WALLET, SHOP, 11, 0)).unwrap();
    }
    drop(o);
    verify(&other).unwrap();
    let err = verify_anchored(&other, Some(anchor)).unwrap_err().to_string();
    assert!(err.contains("is not the anchored one") && err.contains("history was rewritten"), "{err}");
    // Anchors are parsed strictly.
    assert!("5".parse::<Anchor>().is_err() && "x:00".parse::<Anchor>().is_err() && "1:abc".parse::<Anchor>().is_err());
}

#[test]
fn verify_beside_a_busy_writer_sees_one_snapshot() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let (path, l) = books();
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let commits = commits.clone();
        std::thread::spawn(move || {
            let mut l = l;
            // Small commits, one after the other, as a busy server makes them.
            for n in 0..400u128 {
                let batch: Vec<NewTransfer> =
                    (0..5).map(|k| NewTransfer::posted(TransferId(10_000 + n * 5 + k), SOURCE, SHOP, 1, 0)).collect();
                l.create_transfers(3, &batch).unwrap();
                commits.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut rounds = 0;
    while commits.load(Ordering::Relaxed) < 400 {
        verify(&path).unwrap_or_else(|e| panic!("round {rounds}: a false failure beside a writer: {e}"));
        rounds += 1;
    }
    writer.join().unwrap();
    assert!(rounds >= 10, "only {rounds} verifies ran beside the writer");
    assert_eq!(verify(&path).unwrap().transfers, 1 + 400 * 5);
}

/// One book with posted, pending (open and posted) transfers, copied fresh
/// for each tampering case.
fn tamper_book() -> std::path::PathBuf {
    let (path, mut l) = books();
    one(&mut l, 2, NewTransfer::posted(TransferId(100), WALLET, SHOP, 10, 0)).unwrap();
    one(&mut l, 3, pending(101, 20, 0)).unwrap();
    one(&mut l, 4, pending(102, 30, 0)).unwrap();
    one(&mut l, 5, post(103, 102, 30)).unwrap();
    one(&mut l, 6, NewTransfer::posted(TransferId(104), WALLET, SHOP, 5, 0)).unwrap();
    drop(l);
    verify(&path).unwrap();
    path
}

#[test]
fn every_kind_of_edit_to_the_core_tables_is_caught() {
    let kept = {
        let path = tamper_book();
        let r = verify(&path).unwrap();
        format!("{}:{}", r.journal_entries, r.head).parse::<Anchor>().unwrap()
    };
    // Every copy is the same book, so the kept head fits an untouched one.
    verify_anchored(tamper_book(), Some(kept)).unwrap();
    let wallet = WALLET.0.to_be_bytes().to_vec();
    // (case, SQL on a fresh copy, caught by plain verify?); the anchor catches all.
    let cases: Vec<(&str, String, bool)> = vec![
        ("change a transfer's amount", "UPDATE transfers SET amount = amount + 1 WHERE seq = 2".into(), true),
        ("change a transfer's accounts", "UPDATE transfers SET credit = debit WHERE seq = 2".into(), true),
        ("delete a transfer", "DELETE FROM transfers WHERE seq = 2".into(), true),
        (
            "insert a transfer",
            "INSERT INTO transfers SELECT seq + 100, randomblob(16), debit, credit, amount, kind, pending_id, timeout_s, linked, code, memo, unit, at FROM transfers WHERE seq = 2".into(),
            true,
        ),
        (
            "reorder two transfers",
            "UPDATE transfers SET seq = CASE seq WHEN 2 THEN -6 WHEN 6 THEN 2 END WHERE seq IN (2, 6); UPDATE transfers SET seq = 6 WHERE seq = -6".into(),
            true,
        ),
        ("change an account's totals", format!("UPDATE balances SET credits_posted = credits_posted + 5 WHERE seq = (SELECT seq FROM accounts WHERE id = x'{}')", hex(&wallet)), true),
        ("delete an account's balances", "DELETE FROM balances WHERE seq = 4".into(), true),
        ("balances of no account", "INSERT INTO balances VALUES (99, 0, 0, 0, 0)".into(), true),
        ("change an account's flags", format!("UPDATE accounts SET flags = 0 WHERE id = x'{}'", hex(&wallet)), true),
        ("delete an account", "DELETE FROM accounts WHERE seq = 4".into(), true),
        ("re-open a posted hold", "UPDATE pending SET state = 0 WHERE state = 1".into(), true),
        ("close an open hold", "UPDATE pending SET state = 2 WHERE state = 0".into(), true),
        ("change a journal hash", "UPDATE journal SET hash = randomblob(32) WHERE seq = 3".into(), true),
        ("cut a journal hash short", "UPDATE journal SET hash = x'00' WHERE seq = 3".into(), true),
        // Values the ledger never writes, which a lax reading would take for others.
        ("flags past 32 bits", format!("UPDATE accounts SET flags = flags + 4294967296 WHERE id = x'{}'", hex(&wallet)), true),
        ("a unit in capitals", "UPDATE accounts SET unit = 'FEN' WHERE seq = 1".into(), true),
        ("a transfer's unit", "UPDATE transfers SET unit = 'zzz' WHERE seq = 2".into(), true),
        ("a code past 16 bits", "UPDATE transfers SET code = code + 65536 WHERE seq = 2".into(), true),
        ("linked other than 0 or 1", "UPDATE transfers SET linked = 9 WHERE seq = 2".into(), true),
        ("a timeout on a posted transfer", "UPDATE transfers SET timeout_s = 60 WHERE seq = 2".into(), true),
        ("a pending id on a posted transfer", "UPDATE transfers SET pending_id = id WHERE seq = 2".into(), true),
        ("an id of 17 bytes", "UPDATE transfers SET id = id || x'00' WHERE seq = 2".into(), true),
        ("a hold's state out of range", "UPDATE pending SET state = 9 WHERE state = 0".into(), true),
        ("a pending account with a byte more", "UPDATE pending SET debit = debit || x'00' WHERE state = 1".into(), true),
        ("a journal entry's range", "UPDATE journal SET accounts_to = accounts_to - 1, accounts_from = accounts_from - 1 WHERE seq = 1 AND accounts_to > accounts_from".into(), true),
        ("delete a journal entry in the middle", "DELETE FROM journal WHERE seq = 3".into(), true),
        // Cut the last commit, rows and totals alike: a shorter book that
        // is consistent in itself. Only the kept head catches it.
        (
            "truncate the last commit",
            format!(
                "DELETE FROM transfers WHERE seq = (SELECT MAX(seq) FROM transfers); DELETE FROM journal WHERE seq = (SELECT MAX(seq) FROM journal); \
                 UPDATE balances SET debits_posted = debits_posted - 5 WHERE seq = (SELECT seq FROM accounts WHERE id = x'{}'); UPDATE balances SET credits_posted = credits_posted - 5 WHERE seq = (SELECT seq FROM accounts WHERE id = x'{}')",
                hex(&wallet),
                hex(&SHOP.0.to_be_bytes())
            ),
            false,
        ),
    ];
    for (case, sql, plain) in cases {
        let path = tamper_book();
        rusqlite::Connection::open(&path).unwrap().execute_batch(&sql).unwrap_or_else(|e| panic!("{case}: {e}"));
        let caught = verify(&path);
        assert_eq!(caught.is_err(), plain, "{case}: plain verify gave {caught:?}");
        // The anchor is a head of an identical book: the same chain, so it applies here.
        let anchored = verify_anchored(&path, Some(kept));
        assert!(anchored.is_err(), "{case}: not caught with the kept head");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn verify_sums_totals_beyond_what_one_account_holds_without_wrapping() {
    let (path, mut l) = books();
    let big = 5_000_000_000_000_000_000i64;
    one(&mut l, 2, NewTransfer::posted(TransferId(200), SOURCE, SHOP, big, 0)).unwrap();
    one(&mut l, 3, NewTransfer::posted(TransferId(201), SHOP, SOURCE, big, 0)).unwrap();
    // Each account is within i64, their sum is not.
    let report = verify(&path).unwrap();
    let fen = report.totals.iter().find(|(unit, ..)| unit == "fen").unwrap();
    assert_eq!(fen.1, 2 * big as i128 + 1_000, "{report:?}");
    // A third one would overflow an account's own total: refused, never wrapped.
    assert_eq!(one(&mut l, 4, NewTransfer::posted(TransferId(202), SOURCE, SHOP, big, 0)), Err(Refusal::Overflow));
}

#[test]
fn a_periodic_checkpoint_extends_the_last_one_or_is_refused() {
    use suanwang_ledger::checkpoint::{self, Periodic};
    use suanwang_ledger::voucher::{self, OrgKind};
    let vouchers = |deposits: u128| {
        let path = temp_db("checkpoints");
        let mut l = voucher::open(&path, 1_772_294_400).unwrap();
        voucher::add_org(&mut l, 1_772_294_400, "acme", OrgKind::Enterprise, "").unwrap();
        for n in 0..deposits {
            voucher::deposit(&mut l, 1_772_294_400, TransferId(1 + n), "acme", 10).unwrap();
        }
        (path, l)
    };
    let (path, mut l) = vouchers(1);
    let dir = path.with_extension("checkpoints");
    let secret = [7u8; 32];
    let mut last = None;
    let Periodic::Written(first, file) = checkpoint::write_periodic(&path, &secret, &dir, 100, &mut last).unwrap()
    else {
        panic!("no first checkpoint")
    };
    // Unchanged book: nothing written, the file kept as it was.
    assert_eq!(
        checkpoint::write_periodic(&path, &secret, &dir, 200, &mut last).unwrap(),
        Periodic::Unchanged(first.seq)
    );
    voucher::deposit(&mut l, 1_772_294_500, TransferId(300), "acme", 5).unwrap();
    let Periodic::Written(second, _) = checkpoint::write_periodic(&path, &secret, &dir, 300, &mut last).unwrap() else {
        panic!("no second checkpoint")
    };
    assert_eq!(second.seq, first.seq + 1);
    assert!(std::fs::read_to_string(&file).unwrap().contains("\"at\": 100"), "the first file was re-dated");
    // Another history in the place of this book (rewritten and re-hashed,
    // longer than the last checkpoint): never signed.
    drop(l);
    let (other, o) = vouchers(5);
    drop(o);
    std::fs::copy(&other, &path).unwrap();
    let err = checkpoint::write_periodic(&path, &secret, &dir, 400, &mut None).unwrap_err().to_string();
    assert!(err.contains("history was rewritten"), "{err}");
    // Neither a copy of an old checkpoint under a newer name, nor the
    // newest file removed (the server remembers what it signed) lets it
    // sign the other history.
    std::fs::copy(&file, dir.join(checkpoint::file_name(999_999))).unwrap();
    let err = checkpoint::write_periodic(&path, &secret, &dir, 410, &mut None).unwrap_err().to_string();
    assert!(err.contains("a checkpoint file was renamed"), "{err}");
    std::fs::remove_file(dir.join(checkpoint::file_name(999_999))).unwrap();
    std::fs::remove_file(dir.join(checkpoint::file_name(second.seq))).unwrap();
    let err = checkpoint::write_periodic(&path, &secret, &dir, 420, &mut last).unwrap_err().to_string();
    assert!(err.contains("history was rewritten"), "{err}");
    // A checkpoint in the folder signed by another key is not taken as ours.
    let err = checkpoint::write_periodic(&path, &[8u8; 32], &dir, 500, &mut None).unwrap_err().to_string();
    assert!(err.contains("not by the expected key"), "{err}");
}
