//! Random operation sequences against a simple in-memory model of the
//! ledger's semantics; after every step the outcomes and every account's
//! totals must agree, and the invariants must hold (debits equal credits,
//! no forbidden negative balance). Some steps close and reopen the file;
//! at the end `verify` replays the whole history.

use std::collections::HashMap;

use proptest::prelude::*;
use suanwang_ledger::{
    AccountId, Ledger, NewAccount, NewTransfer, Refusal, TransferId, TransferKind, Unit, flags, verify,
};

use crate::temp_db;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Posted,
    Voided,
    Expired,
}

#[derive(Debug, Clone)]
struct Pending {
    debit: usize,
    credit: usize,
    amount: i64,
    expires_at: i64,
    state: State,
}

#[derive(Debug, Clone, Default)]
struct Totals {
    dp: i64,
    dpost: i64,
    cp: i64,
    cpost: i64,
}

/// The model: the same rules, written as plainly as possible.
#[derive(Debug, Clone, Default)]
struct Model {
    totals: Vec<Totals>,
    flags: Vec<u32>,
    units: Vec<u8>,
    pending: HashMap<u128, Pending>,
    /// Recorded transfers: id -> (request, resolved amount).
    done: HashMap<u128, (Req, i64)>,
    /// Refused ids: id -> (request, code).
    refused: HashMap<u128, (Req, &'static str)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    id: u128,
    debit: usize,
    credit: usize,
    amount: i64,
    kind: u8, // 0 posted, 1 pending, 2 post, 3 void
    pending: u128,
    timeout: i64,
    linked: bool,
}

const ACCOUNTS: usize = 5;

impl Model {
    fn new() -> Model {
        Model {
            totals: vec![Totals::default(); ACCOUNTS],
            // 0: source (no limit), 1-3: cannot be overdrawn, 4: another unit.
            flags: vec![
                0,
                flags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                flags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                flags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                0,
            ],
            units: vec![0, 0, 0, 0, 1],
            ..Model::default()
        }
    }

    fn same_request(recorded: &Req, r: &Req, amount: i64) -> bool {
        let accounts = match r.kind {
            2 | 3 => true,
            _ => recorded.debit == r.debit && recorded.credit == r.credit,
        };
        let amounts = match r.kind {
            2 => r.amount == 0 || r.amount == amount,
            3 => r.amount == 0 || r.amount == amount,
            _ => r.amount == recorded.amount,
        };
        accounts
            && amounts
            && recorded.kind == r.kind
            && recorded.pending == r.pending
            && recorded.timeout == r.timeout
            && recorded.linked == r.linked
    }

    /// One transfer; Ok(amount) or Err(code). Mutates only on success.
    fn one(&mut self, r: &Req, now: i64) -> Result<i64, &'static str> {
        let outcome = self.apply(r, now);
        if let Ok(amount) = outcome {
            self.done.entry(r.id).or_insert((r.clone(), amount));
        }
        outcome
    }

    fn apply(&mut self, r: &Req, now: i64) -> Result<i64, &'static str> {
        if let Some((recorded, amount)) = self.done.get(&r.id) {
            return if Model::same_request(recorded, r, *amount) {
                Ok(*amount)
            } else {
                Err("id_reused_with_different_content")
            };
        }
        if let Some((recorded, code)) = self.refused.get(&r.id) {
            return if recorded == r { Err(code) } else { Err("id_reused_with_different_content") };
        }
        if r.kind >= 2 {
            let Some(p) = self.pending.get(&r.pending).cloned() else { return Err("pending_transfer_not_found") };
            match p.state {
                State::Posted => return Err("pending_transfer_already_posted"),
                State::Voided => return Err("pending_transfer_already_voided"),
                State::Expired => return Err("pending_transfer_expired"),
                State::Pending => {}
            }
            if p.expires_at > 0 && now >= p.expires_at {
                return Err("pending_transfer_expired");
            }
            let amount = if r.kind == 2 {
                if r.amount < 0 {
                    return Err("amount_must_be_positive");
                }
                if r.amount > p.amount {
                    return Err("exceeds_pending_amount");
                }
                if r.amount == 0 { p.amount } else { r.amount }
            } else {
                if r.amount != 0 && r.amount != p.amount {
                    return Err("exceeds_pending_amount");
                }
                0
            };
            self.totals[p.debit].dp -= p.amount;
            self.totals[p.credit].cp -= p.amount;
            self.totals[p.debit].dpost += amount;
            self.totals[p.credit].cpost += amount;
            self.pending.get_mut(&r.pending).unwrap().state = if r.kind == 2 { State::Posted } else { State::Voided };
            return Ok(if r.kind == 2 { amount } else { p.amount });
        }
        if r.debit == r.credit {
            return Err("accounts_must_be_different");
        }
        if r.amount <= 0 {
            return Err("amount_must_be_positive");
        }
        if self.units[r.debit] != self.units[r.credit] {
            return Err("units_must_match");
        }
        let d = &self.totals[r.debit];
        if self.flags[r.debit] & flags::DEBITS_MUST_NOT_EXCEED_CREDITS != 0 && r.amount > d.cpost - d.dpost - d.dp {
            return Err("insufficient_funds");
        }
        if r.kind == 1 {
            self.totals[r.debit].dp += r.amount;
            self.totals[r.credit].cp += r.amount;
            let expires_at = if r.timeout > 0 { now + r.timeout } else { 0 };
            self.pending.insert(
                r.id,
                Pending { debit: r.debit, credit: r.credit, amount: r.amount, expires_at, state: State::Pending },
            );
        } else {
            self.totals[r.debit].dpost += r.amount;
            self.totals[r.credit].cpost += r.amount;
        }
        Ok(r.amount)
    }

    fn batch(&mut self, reqs: &[Req], now: i64) -> Vec<Result<i64, &'static str>> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < reqs.len() {
            let mut end = start;
            while end < reqs.len() && reqs[end].linked {
                end += 1;
            }
            if end == reqs.len() {
                out.extend((start..end).map(|_| Err("linked_chain_open")));
                break;
            }
            let snapshot = self.clone();
            let mut results = Vec::new();
            let mut failed = None;
            for (i, r) in reqs[start..=end].iter().enumerate() {
                match self.one(r, now) {
                    Ok(a) => results.push(Ok(a)),
                    Err(code) => {
                        failed = Some((i, code));
                        results.push(Err(code));
                        break;
                    }
                }
            }
            let chain = &reqs[start..=end];
            if let Some((at, code)) = failed {
                *self = Model { refused: self.refused.clone(), ..snapshot };
                results = (0..chain.len()).map(|i| Err(if i == at { code } else { "linked_event_failed" })).collect();
                for (r, result) in chain.iter().zip(&results) {
                    let code = result.unwrap_err();
                    // An earlier refusal of the same id stays (or_insert keeps the first).
                    let recordable = code != "id_reused_with_different_content";
                    if recordable && !self.done.contains_key(&r.id) && r.id != 0 {
                        self.refused.entry(r.id).or_insert((r.clone(), code));
                    }
                }
            }
            out.extend(results);
            start = end + 1;
        }
        out
    }

    fn expire(&mut self, now: i64) {
        for p in self.pending.values_mut() {
            if p.state == State::Pending && p.expires_at > 0 && p.expires_at <= now {
                self.totals[p.debit].dp -= p.amount;
                self.totals[p.credit].cp -= p.amount;
                p.state = State::Expired;
            }
        }
    }
}

/// (id, debit, credit, amount, kind, pending id, timeout, linked) as drawn.
type Draw = (u8, usize, usize, i64, u8, u8, i64, bool);

#[derive(Debug, Clone)]
enum Op {
    Batch(Vec<Draw>),
    Advance(i64),
    Expire,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let transfer =
        (0u8..40, 0..ACCOUNTS, 0..ACCOUNTS, -2i64..300, 0u8..4, 0u8..40, 0i64..50, proptest::bool::weighted(0.2));
    prop_oneof![
        8 => proptest::collection::vec(transfer, 1..5).prop_map(Op::Batch),
        2 => (1i64..40).prop_map(Op::Advance),
        1 => Just(Op::Expire),
        1 => Just(Op::Reopen),
    ]
}

fn account_id(i: usize) -> AccountId {
    AccountId(1000 + i as u128)
}

fn setup(path: &std::path::Path) -> Ledger {
    let mut ledger = Ledger::open(path).unwrap();
    let model = Model::new();
    let accounts: Vec<NewAccount> = (0..ACCOUNTS)
        .map(|i| NewAccount {
            id: account_id(i),
            kind: "test".into(),
            owner: format!("owner{i}"),
            unit: if model.units[i] == 0 { Unit::Fen } else { Unit::AccelSeconds("H100".into()) },
            flags: model.flags[i],
        })
        .collect();
    for outcome in ledger.create_accounts(0, &accounts).unwrap() {
        outcome.unwrap();
    }
    ledger
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let path = temp_db("model");
        let mut ledger = setup(&path);
        let mut model = Model::new();
        let mut now = 1_000i64;
        for op in ops {
            match op {
                Op::Batch(draws) => {
                    let reqs: Vec<Req> = draws
                        .iter()
                        // Fields a kind does not use are zero, as a client would send them.
                        .map(|&(id, d, c, amount, kind, pending, timeout, linked)| Req {
                            id: 1 + id as u128,
                            debit: if kind >= 2 { 0 } else { d },
                            credit: if kind >= 2 { 0 } else { c },
                            amount: if kind >= 2 { amount.max(0) % 200 } else { amount },
                            kind,
                            pending: if kind >= 2 { 1 + pending as u128 } else { 0 },
                            timeout: if kind == 1 { timeout } else { 0 },
                            linked,
                        })
                        .collect();
                    let transfers: Vec<NewTransfer> = reqs
                        .iter()
                        .map(|r| NewTransfer {
                            id: TransferId(r.id),
                            debit: if r.kind >= 2 { AccountId(0) } else { account_id(r.debit) },
                            credit: if r.kind >= 2 { AccountId(0) } else { account_id(r.credit) },
                            amount: r.amount,
                            kind: match r.kind {
                                0 => TransferKind::Posted,
                                1 => TransferKind::Pending { timeout_s: r.timeout },
                                2 => TransferKind::PostPending { pending: TransferId(r.pending) },
                                _ => TransferKind::VoidPending { pending: TransferId(r.pending) },
                            },
                            linked: r.linked,
                            code: 1,
                            memo: String::new(),
                        })
                        .collect();
                    let got: Vec<Result<i64, &str>> = ledger
                        .create_transfers(now, &transfers)
                        .unwrap()
                        .into_iter()
                        .map(|o| o.map(|t| t.amount).map_err(|r: Refusal| r.code()))
                        .collect();
                    let want = model.batch(&reqs, now);
                    prop_assert_eq!(got, want, "requests {:?}", reqs);
                }
                Op::Advance(dt) => now += dt,
                Op::Expire => {
                    ledger.expire_pending(now).unwrap();
                    model.expire(now);
                }
                Op::Reopen => {
                    drop(ledger);
                    ledger = Ledger::open(&path).unwrap();
                }
            }
            let (mut debits, mut credits) = (0i64, 0i64);
            for i in 0..ACCOUNTS {
                let a = ledger.account(account_id(i)).unwrap();
                let m = &model.totals[i];
                prop_assert_eq!((a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted), (m.dp, m.dpost, m.cp, m.cpost), "account {}", i);
                if a.has(flags::DEBITS_MUST_NOT_EXCEED_CREDITS) {
                    prop_assert!(a.debits_posted + a.debits_pending <= a.credits_posted, "account {} overdrawn", i);
                }
                debits += a.debits_posted + a.debits_pending;
                credits += a.credits_posted + a.credits_pending;
            }
            prop_assert_eq!(debits, credits);
        }
        drop(ledger);
        let report = verify(&path).unwrap();
        prop_assert_eq!(report.accounts, ACCOUNTS as u64);
    }
}
