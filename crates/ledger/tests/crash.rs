//! Crash safety: a child process writing transfers is killed with SIGKILL
//! at random moments, 100 times. After each kill the file is reopened;
//! at the end `verify` must pass and every transfer the child reported as
//! committed must be there. The child is this test binary run again with
//! `SUANWANG_CRASH_CHILD` set (see `crash_child`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use suanwang_ledger::{AccountId, Ledger, NewAccount, NewTransfer, TransferId, Unit, verify};

use crate::temp_db;

const SOURCE: AccountId = AccountId(1);
const SINK: AccountId = AccountId(2);

/// Not a test on its own: the body of the child process.
#[test]
fn crash_child() {
    let (Ok(db), Ok(first)) = (std::env::var("SUANWANG_CRASH_CHILD"), std::env::var("SUANWANG_CRASH_FIRST_ID")) else {
        return;
    };
    let mut next: u128 = first.parse().unwrap();
    let mut ledger = Ledger::open(&db).unwrap();
    let accounts = [
        NewAccount { id: SOURCE, kind: "source".into(), owner: "s".into(), unit: Unit::Fen, flags: 0 },
        NewAccount { id: SINK, kind: "sink".into(), owner: "k".into(), unit: Unit::Fen, flags: 0 },
    ];
    ledger.create_accounts(0, &accounts).unwrap();
    let mut size = 1;
    loop {
        let batch: Vec<NewTransfer> =
            (0..size).map(|k| NewTransfer::posted(TransferId(next + k), SOURCE, SINK, 1 + (k as i64 % 7), 0)).collect();
        let outcomes = ledger.create_transfers(1, &batch).unwrap();
        let mut out = String::new();
        for o in outcomes {
            out.push_str(&format!("committed {}\n", o.unwrap().id.0));
        }
        print!("{out}");
        next += size;
        size = size % 40 + 1;
    }
}

#[test]
fn killed_writers_lose_nothing_they_reported() {
    let db = temp_db("crash");
    let exe = std::env::current_exe().unwrap();
    let mut reported: Vec<u128> = Vec::new();
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..100u128 {
        let mut child = Command::new(&exe)
            .args(["crash::crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("SUANWANG_CRASH_CHILD", &db)
            .env("SUANWANG_CRASH_FIRST_ID", (1 + round * 1_000_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("committed ") {
                    let _ = tx.send(id.parse::<u128>().unwrap());
                }
            }
        });
        // Wait for the first commit, then kill at a random moment after it.
        let started = Instant::now();
        let first = rx.recv_timeout(Duration::from_secs(30)).expect("child committed something");
        reported.push(first);
        std::thread::sleep(Duration::from_micros(random(20_000)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        reported.extend(rx.try_iter());
        assert!(started.elapsed() < Duration::from_secs(60));
        // The file opens cleanly after every kill.
        drop(Ledger::open(&db).unwrap());
    }
    let report = verify(&db).unwrap();
    let ledger = Ledger::open(&db).unwrap();
    for id in &reported {
        assert!(ledger.transfer(TransferId(*id)).unwrap().is_some(), "reported transfer {id} lost");
    }
    assert!(report.transfers as usize >= reported.len());
    let source = ledger.account(SOURCE).unwrap();
    let sink = ledger.account(SINK).unwrap();
    assert_eq!(source.debits_posted, sink.credits_posted);
}
