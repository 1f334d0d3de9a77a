//! Many threads transferring at once through the group-commit service.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use suanwang_ledger::service::LedgerService;
use suanwang_ledger::{AccountId, Ledger, NewAccount, NewTransfer, TransferId, Unit, flags, verify};

use crate::temp_db;

const BANK: AccountId = AccountId(1);
const SHOP: AccountId = AccountId(2);
const SCARCE: AccountId = AccountId(3);

fn wallet(i: u64) -> AccountId {
    AccountId(100 + i as u128)
}

#[test]
fn sixty_four_clients_at_once_keep_the_books_balanced() {
    let path = temp_db("concurrency");
    let mut ledger = Ledger::open(&path).unwrap();
    let mut accounts = vec![
        NewAccount { id: BANK, kind: "bank".into(), owner: "b".into(), unit: Unit::Fen, flags: 0 },
        NewAccount { id: SHOP, kind: "shop".into(), owner: "s".into(), unit: Unit::Fen, flags: 0 },
        NewAccount {
            id: SCARCE,
            kind: "pool".into(),
            owner: "p".into(),
            unit: Unit::Fen,
            flags: flags::DEBITS_MUST_NOT_EXCEED_CREDITS,
        },
    ];
    accounts.extend((0..64).map(|i| NewAccount {
        id: wallet(i),
        kind: "wallet".into(),
        owner: format!("w{i}"),
        unit: Unit::Fen,
        flags: flags::DEBITS_MUST_NOT_EXCEED_CREDITS,
    }));
    assert!(ledger.create_accounts(0, &accounts).unwrap().iter().all(|o| o.is_ok()));
    // The scarce pool holds 100: exactly 10 of the 64 clients can take 10 from it.
    ledger.create_transfers(0, &[NewTransfer::posted(TransferId(1), BANK, SCARCE, 100, 0)]).unwrap();
    let service = LedgerService::start(ledger);
    let next_id = Arc::new(AtomicU64::new(1_000));
    let scarce_wins = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..64u64)
        .map(|i| {
            let client = service.client();
            let next_id = next_id.clone();
            let scarce_wins = scarce_wins.clone();
            std::thread::spawn(move || {
                let id = || TransferId(next_id.fetch_add(1, Ordering::Relaxed) as u128);
                let took =
                    client.create_transfers(1, vec![NewTransfer::posted(id(), SCARCE, wallet(i), 10, 0)]).unwrap();
                if took[0].is_ok() {
                    scarce_wins.fetch_add(1, Ordering::Relaxed);
                }
                client.create_transfers(1, vec![NewTransfer::posted(id(), BANK, wallet(i), 1_000, 0)]).unwrap()[0]
                    .as_ref()
                    .unwrap();
                let mut spent = 0;
                for _ in 0..50 {
                    let outcome =
                        client.create_transfers(2, vec![NewTransfer::posted(id(), wallet(i), SHOP, 30, 0)]).unwrap();
                    if outcome[0].is_ok() {
                        spent += 30;
                    }
                }
                spent
            })
        })
        .collect();
    let spent: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(scarce_wins.load(Ordering::Relaxed), 10);
    let client = service.client();
    let (shop, scarce) =
        client.with(|l| (l.account(SHOP).unwrap().balance(), l.account(SCARCE).unwrap().balance())).unwrap();
    assert_eq!((shop, scarce), (spent, 0));
    // Each wallet had 1,000 (or 1,010): 33 payments of 30 fit, 17 were refused.
    assert_eq!(spent, 64 * 33 * 30);
    drop(client);
    drop(service);
    let report = verify(&path).unwrap();
    assert_eq!(report.transfers, 1 + 10 + 64 + 64 * 33);
}
