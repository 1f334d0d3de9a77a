//! Voucher programmes, grants, caps, cards and the job billing flow, with
//! the rules of the published city programmes.

use suanwang_ledger::audit;
use suanwang_ledger::voucher::{self, CapScope, OrgKind, Placement, ProgrammeSpec, Usage, date_to_unix};
use suanwang_ledger::{Ledger, LedgerError, TransferId, verify};

use crate::temp_db;

fn day(date: &str) -> i64 {
    date_to_unix(date).unwrap()
}

fn programme() -> ProgrammeSpec {
    ProgrammeSpec {
        id: "sd-2026".into(),
        name: "Shandong compute vouchers 2026".into(),
        issuer: "sd-bureau".into(),
        cap_per: CapScope::Issuer,
        budget_fen: 1_000_000,
        valid_from: day("2026-01-01"),
        valid_until: day("2027-01-01"),
        kinds: vec![OrgKind::Enterprise, OrgKind::University],
        sites: vec![],
        accels: vec![],
        rate_bp: 3_000,
        foreign_rate_bp: 2_000,
        org_year_cap_fen: 300_000,
        job_cap_fen: 100_000,
    }
}

/// acme (enterprise, 500,000 fen of vouchers, 1,000,000 of its own money),
/// sdu (university), cas (institute), jinan-icc-co (runs a site).
fn books() -> (std::path::PathBuf, Ledger, i64) {
    let path = temp_db("vouchers");
    let now = day("2026-03-01");
    let mut l = voucher::open(&path, now).unwrap();
    voucher::add_org(&mut l, now, "acme", OrgKind::Enterprise, "Acme AI").unwrap();
    voucher::add_org(&mut l, now, "sdu", OrgKind::University, "Shandong University").unwrap();
    voucher::add_org(&mut l, now, "cas", OrgKind::Institute, "An institute").unwrap();
    voucher::add_org(&mut l, now, "jinan-icc-co", OrgKind::Enterprise, "Jinan ICC").unwrap();
    voucher::create_programme(&mut l, now, &programme()).unwrap();
    voucher::grant(&mut l, now, TransferId(1), "sd-2026", "acme", 500_000).unwrap();
    voucher::deposit(&mut l, now, TransferId(2), "acme", 1_000_000).unwrap();
    (path, l, now)
}

fn site(accel: &str, domestic: bool) -> Placement {
    Placement {
        site: "jinan-icc".into(),
        provider: "jinan-icc-co".into(),
        accel: accel.into(),
        domestic,
        price_fen_per_hour: 1_000,
    }
}

fn code(e: LedgerError) -> &'static str {
    e.code()
}

fn hours(h: i64) -> Usage {
    Usage { accel_seconds: h * 3600, transfer_fen: 0 }
}

#[test]
fn grants_come_out_of_the_budget_and_never_exceed_it() {
    let (_, mut l, now) = books();
    voucher::grant(&mut l, now, TransferId(10), "sd-2026", "sdu", 400_000).unwrap();
    let err = voucher::grant(&mut l, now, TransferId(11), "sd-2026", "sdu", 100_001).unwrap_err();
    assert_eq!(err.to_string(), "programme 'sd-2026' is exhausted: 100000 fen left, 100001 wanted");
    assert_eq!(code(voucher::grant(&mut l, now, TransferId(12), "sd-2026", "cas", 10).unwrap_err()), "not_eligible");
    assert_eq!(code(voucher::grant(&mut l, now, TransferId(13), "sd-2026", "nobody", 10).unwrap_err()), "not_found");
    assert_eq!(code(voucher::grant(&mut l, now, TransferId(14), "nope", "sdu", 10).unwrap_err()), "not_found");
    assert_eq!(
        code(voucher::grant(&mut l, now, TransferId(15), "sd-2026", "sdu", -1).unwrap_err()),
        "invalid_argument"
    );
    assert_eq!(
        code(voucher::grant(&mut l, day("2027-01-02"), TransferId(16), "sd-2026", "sdu", 1).unwrap_err()),
        "voucher_expired"
    );
    // The same grant again is the same grant, not another one.
    voucher::grant(&mut l, now, TransferId(10), "sd-2026", "sdu", 400_000).unwrap();
    assert_eq!(l.account(voucher::programme_pool("sd-2026")).unwrap().available(), 100_000);
    let mut changed = programme();
    changed.budget_fen = 5;
    assert_eq!(code(voucher::create_programme(&mut l, now, &changed).unwrap_err()), "id_reused_with_different_content");
    assert!(voucher::verify(&l).unwrap().is_empty());
}

#[test]
fn the_quote_applies_rate_caps_and_rules() {
    let (_, mut l, now) = books();
    // 10 accelerator-hours at 10 yuan: 10,000 fen; 30% domestic.
    let q = voucher::quote(&mut l, now, "acme", &site("Ascend910B", true), &hours(10)).unwrap();
    assert_eq!(
        (q.compute_fen, q.subsidy_fen, q.org_total_fen, q.programme.as_deref()),
        (10_000, 3_000, 7_000, Some("sd-2026"))
    );
    // 20% for non-domestic accelerators.
    let q = voucher::quote(&mut l, now, "acme", &site("H100", false), &hours(10)).unwrap();
    assert_eq!(q.subsidy_fen, 2_000);
    // The per-job cap.
    let q = voucher::quote(&mut l, now, "acme", &site("Ascend910B", true), &hours(1_000)).unwrap();
    assert_eq!((q.subsidy_fen, q.org_compute_fen), (100_000, 900_000));
    assert!(q.notes.iter().any(|n| n.contains("[cap_exceeded] subsidy limited by the per-job cap")), "{:?}", q.notes);
    assert!(q.codes.contains(&"cap_exceeded".to_string()), "{:?}", q.codes);
    // Transfer fees are paid in full, never subsidised.
    let q = voucher::quote(
        &mut l,
        now,
        "acme",
        &site("Ascend910B", true),
        &Usage { accel_seconds: 36_000, transfer_fen: 500 },
    )
    .unwrap();
    assert_eq!((q.subsidy_fen, q.transfer_fen, q.org_total_fen), (3_000, 500, 7_500));
    // Related parties: the organisation runs the site.
    voucher::grant(&mut l, now, TransferId(20), "sd-2026", "jinan-icc-co", 1_000).unwrap();
    let q = voucher::quote(&mut l, now, "jinan-icc-co", &site("Ascend910B", true), &hours(10)).unwrap();
    assert_eq!(q.subsidy_fen, 0);
    assert!(q.notes[0].contains("related parties"), "{:?}", q.notes);
    assert_eq!(q.codes, ["related_party"]);
    // An expired voucher pays nothing; nor does one not yet valid.
    let q = voucher::quote(&mut l, day("2027-02-01"), "acme", &site("Ascend910B", true), &hours(10)).unwrap();
    assert_eq!(q.subsidy_fen, 0);
    assert!(q.notes[0].contains("expired"));
    assert_eq!(q.codes, ["voucher_expired"]);
    let q = voucher::quote(&mut l, day("2025-06-01"), "acme", &site("Ascend910B", true), &hours(10)).unwrap();
    assert_eq!((q.subsidy_fen, q.codes.as_slice()), (0, &["not_yet_valid".to_string()][..]), "{:?}", q.notes);
    // A quote reserves nothing.
    assert_eq!(l.account(voucher::voucher("sd-2026", "acme")).unwrap().available(), 500_000);
    assert_eq!(
        code(
            voucher::quote(&mut l, now, "acme", &site("A100", false), &Usage { accel_seconds: -1, transfer_fen: 0 })
                .unwrap_err()
        ),
        "invalid_argument"
    );
    // A declared relation (a subsidiary) counts the same; a reason is required.
    let before = voucher::quote(&mut l, now, "acme", &site("Ascend910B", true), &hours(10)).unwrap();
    assert!(before.subsidy_fen > 0);
    assert_eq!(code(voucher::relate(&mut l, now, "acme", "jinan-icc-co", " ").unwrap_err()), "invalid_argument");
    voucher::relate(&mut l, now, "acme", "jinan-icc-co", "acme owns 51% of the Jinan centre").unwrap();
    voucher::relate(&mut l, now, "acme", "jinan-icc-co", "acme owns 51% of the Jinan centre").unwrap();
    assert_eq!(
        code(voucher::relate(&mut l, now, "acme", "jinan-icc-co", "another reason").unwrap_err()),
        "id_reused_with_different_content"
    );
    let q = voucher::quote(&mut l, now, "acme", &site("Ascend910B", true), &hours(10)).unwrap();
    assert_eq!((q.subsidy_fen, q.codes.as_slice()), (0, &["related_party".to_string()][..]), "{:?}", q.notes);
    assert_eq!(q.org_compute_fen, before.compute_fen, "the organisation pays it all");
}

#[test]
fn hold_settle_and_release() {
    let (path, mut l, now) = books();
    let placement = site("Ascend910B", true);
    let est = Usage { accel_seconds: 36_000, transfer_fen: 400 };
    let hold = voucher::hold(&mut l, now, "job-1", "acme", &placement, &est, 86_400).unwrap();
    assert_eq!((hold.bill.subsidy_fen, hold.bill.org_total_fen), (3_000, 7_400));
    assert_eq!(l.account(voucher::voucher("sd-2026", "acme")).unwrap().available(), 497_000);
    assert_eq!(l.account(voucher::wallet("acme")).unwrap().available(), 992_600);
    // Holding again is the same hold; differently is refused.
    assert_eq!(voucher::hold(&mut l, now, "job-1", "acme", &placement, &est, 86_400).unwrap(), hold);
    assert_eq!(
        code(voucher::hold(&mut l, now, "job-1", "acme", &placement, &hours(1), 86_400).unwrap_err()),
        "id_reused_with_different_content"
    );

    // It ran 6 of the 10 hours estimated and moved less data.
    let actual = Usage { accel_seconds: 21_600, transfer_fen: 100 };
    let s = voucher::settle(&mut l, now + 30_000, "job-1", &actual).unwrap();
    assert_eq!(
        (s.bill.compute_fen, s.bill.subsidy_fen, s.bill.org_compute_fen, s.bill.transfer_fen),
        (6_000, 1_800, 4_200, 100)
    );
    assert_eq!(l.account(voucher::voucher("sd-2026", "acme")).unwrap().available(), 498_200);
    assert_eq!(l.account(voucher::wallet("acme")).unwrap().available(), 995_700);
    assert_eq!(l.account(voucher::revenue("jinan-icc-co")).unwrap().balance(), 6_000);
    assert_eq!(l.account(voucher::network_revenue()).unwrap().balance(), 100);
    // Settling again with the same usage changes nothing; other usage is refused.
    assert_eq!(voucher::settle(&mut l, now + 30_001, "job-1", &actual).unwrap(), s);
    assert_eq!(code(voucher::settle(&mut l, now + 30_001, "job-1", &hours(6)).unwrap_err()), "already_settled");
    assert_eq!(code(voucher::release(&mut l, now, "job-1").unwrap_err()), "not_held");

    // A job that ran longer than held is billed at most the hold.
    voucher::hold(&mut l, now, "job-2", "acme", &placement, &hours(1), 86_400).unwrap();
    let s = voucher::settle(&mut l, now + 10_000, "job-2", &hours(2)).unwrap();
    assert_eq!((s.bill.subsidy_fen, s.bill.org_compute_fen, s.unbilled_fen), (300, 700, 1_000));

    // Release gives everything back.
    voucher::hold(&mut l, now, "job-3", "acme", &placement, &hours(10), 86_400).unwrap();
    voucher::release(&mut l, now + 5, "job-3").unwrap();
    voucher::release(&mut l, now + 6, "job-3").unwrap();
    assert_eq!(code(voucher::settle(&mut l, now + 7, "job-3", &hours(1)).unwrap_err()), "not_held");
    assert_eq!(code(voucher::settle(&mut l, now + 7, "job-404", &hours(1)).unwrap_err()), "not_found");
    assert!(voucher::verify(&l).unwrap().is_empty());
    drop(l);
    verify(&path).unwrap();
}

#[test]
fn a_hold_the_organisation_cannot_pay_stores_nothing() {
    let (_, mut l, now) = books();
    voucher::grant(&mut l, now, TransferId(30), "sd-2026", "sdu", 10_000).unwrap();
    let before = l.accounts();
    let err = voucher::hold(&mut l, now, "job-poor", "sdu", &site("Ascend910B", true), &hours(10), 3600).unwrap_err();
    assert_eq!(code(err), "insufficient_funds");
    assert_eq!(l.accounts(), before);
    assert_eq!(code(voucher::settle(&mut l, now, "job-poor", &hours(1)).unwrap_err()), "not_found");
}

#[test]
fn the_yearly_cap_of_an_organisation_holds_across_jobs() {
    let (_, mut l, now) = books();
    let placement = site("Ascend910B", true);
    voucher::deposit(&mut l, now, TransferId(50), "acme", 2_000_000).unwrap();
    // Each job: 400 hours = 400,000 fen, 30% = 120,000, capped at 100,000 per job.
    let mut subsidies = Vec::new();
    for i in 0..4 {
        let job = format!("big-{i}");
        let h = voucher::hold(&mut l, now, &job, "acme", &placement, &hours(400), 86_400).unwrap();
        subsidies.push(h.bill.subsidy_fen);
        voucher::settle(&mut l, now + 100, &job, &hours(400)).unwrap();
    }
    assert_eq!(subsidies, vec![100_000, 100_000, 100_000, 0]);
    // A new year brings a new cap.
    let next_year = day("2027-01-01") - 1;
    assert_eq!(voucher::year_of(next_year), 2026);
    assert!(voucher::verify(&l).unwrap().is_empty());
}

#[test]
fn compute_cards_pay_accelerator_seconds_of_their_type_first() {
    let (_, mut l, now) = books();
    voucher::buy_card(&mut l, now, TransferId(40), "acme", "H100", 4 * 3600, 20_000).unwrap();
    assert_eq!(l.account(voucher::wallet("acme")).unwrap().available(), 980_000);
    let h = voucher::hold(&mut l, now, "card-job", "acme", &site("H100", false), &hours(10), 86_400).unwrap();
    // 4 hours from the card, 6 hours in fen with 20% subsidy.
    assert_eq!((h.bill.card_seconds, h.bill.subsidy_fen, h.bill.org_compute_fen), (14_400, 1_200, 4_800));
    let q = voucher::quote(&mut l, now, "acme", &site("A100", false), &hours(1)).unwrap();
    assert_eq!(q.card_seconds, 0, "a card pays only its own type");
    let s = voucher::settle(&mut l, now + 10, "card-job", &hours(3)).unwrap();
    assert_eq!((s.bill.card_seconds, s.bill.subsidy_fen, s.bill.org_compute_fen), (10_800, 0, 0));
    assert_eq!(l.account(voucher::card("acme", "H100")).unwrap().available(), 3_600);
    assert_eq!(
        code(voucher::buy_card(&mut l, now, TransferId(41), "acme", "H100", 3600, 2_000_000).unwrap_err()),
        "insufficient_funds"
    );
}

#[test]
fn expiry_returns_unused_vouchers_and_expires_stale_holds() {
    let (_, mut l, now) = books();
    voucher::hold(&mut l, now, "stale", "acme", &site("Ascend910B", true), &hours(10), 3600).unwrap();
    let report = voucher::sweep(&mut l, now + 3600).unwrap();
    // One job's hold, of two parts: the voucher's share and the organisation's.
    assert_eq!((report.holds_expired, report.parts_expired, report.returned.len()), (vec!["stale".to_string()], 2, 0));
    assert_eq!(code(voucher::settle(&mut l, now + 3601, "stale", &hours(1)).unwrap_err()), "not_held");
    assert_eq!(l.account(voucher::voucher("sd-2026", "acme")).unwrap().available(), 500_000);
    let after = day("2027-01-01");
    let report = voucher::sweep(&mut l, after).unwrap();
    assert_eq!(report.returned, vec![("sd-2026".to_string(), "acme".to_string(), 500_000)]);
    assert_eq!(voucher::sweep(&mut l, after + 1).unwrap().returned, vec![], "returned once");
    assert_eq!(l.account(voucher::programme_pool("sd-2026")).unwrap().available(), 1_000_000);
    let spend = audit::programme_spend(&l).unwrap();
    assert_eq!((spend[0].granted_fen, spend[0].returned_fen, spend[0].pool_fen), (500_000, 500_000, 1_000_000));
    assert!(voucher::verify(&l).unwrap().is_empty());
}

#[test]
fn statements_and_spend_reports_add_up() {
    let (_, mut l, now) = books();
    let placement = site("Ascend910B", true);
    for (i, h) in [2, 5, 7].iter().enumerate() {
        let job = format!("s-{i}");
        voucher::hold(&mut l, now, &job, "acme", &placement, &hours(*h), 86_400).unwrap();
        voucher::settle(&mut l, now + 100 * (i as i64 + 1), &job, &hours(*h)).unwrap();
    }
    voucher::hold(&mut l, now, "running", "acme", &placement, &hours(1), 86_400).unwrap();
    let st = audit::statement(&l, "jinan-icc-co", now, now + 1_000).unwrap();
    assert_eq!(st.lines.len(), 3);
    assert_eq!((st.total.compute_fen, st.total.voucher_fen, st.total.org_fen), (14_000, 4_200, 9_800));
    assert_eq!(st.total.voucher_fen + st.total.org_fen, l.account(voucher::revenue("jinan-icc-co")).unwrap().balance());
    let partial = audit::statement(&l, "jinan-icc-co", now + 150, now + 1_000).unwrap();
    assert_eq!(partial.lines.len(), 2);
    let csv = audit::to_csv(&st.lines).unwrap();
    let mut rows = csv.lines();
    assert_eq!(
        rows.next().unwrap(),
        "job,org,site,accel,programme,settled_at,accel_seconds,card_seconds,compute_fen,voucher_fen,org_fen,transfer_fen,unbilled_fen"
    );
    assert_eq!(
        rows.next().unwrap(),
        format!("s-0,acme,jinan-icc,Ascend910B,sd-2026,{},7200,0,2000,600,1400,0,0", now + 100)
    );
    let spend = &audit::programme_spend(&l).unwrap()[0];
    assert_eq!(
        (spend.budget_fen, spend.granted_fen, spend.spent_fen, spend.held_fen),
        (1_000_000, 500_000, 4_200, 300)
    );
    assert_eq!(spend.pool_fen + spend.granted_fen, spend.budget_fen);
    assert_eq!(spend.spent_fen + spend.held_fen + spend.vouchers_fen, spend.granted_fen);
}

mod random {
    //! Random sequences of voucher operations; after every step no programme
    //! is over budget, no cap is exceeded, nothing is overdrawn, and
    //! repeating any earlier operation changes nothing.

    use proptest::prelude::*;
    use suanwang_ledger::TransferId;
    use suanwang_ledger::voucher::{self, Usage};

    use super::{books, site};

    #[derive(Debug, Clone)]
    enum Op {
        Grant(u8, i64),
        Hold(u8, u8, i64, bool),
        Settle(u8, i64),
        Release(u8),
        Sweep(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..2, 1i64..400_000).prop_map(|(o, a)| Op::Grant(o, a)),
            (0u8..12, 0u8..2, 0i64..2_000_000, any::<bool>()).prop_map(|(j, o, s, d)| Op::Hold(j, o, s, d)),
            (0u8..12, 0i64..2_000_000).prop_map(|(j, s)| Op::Settle(j, s)),
            (0u8..12).prop_map(Op::Release),
            (0i64..200_000).prop_map(Op::Sweep),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn budgets_caps_and_idempotency_hold(ops in proptest::collection::vec(op(), 1..30)) {
            let (_, mut l, start) = books();
            let orgs = ["acme", "sdu"];
            let mut now = start;
            let mut next_id = 1_000u128;
            let mut done: Vec<(Op, String)> = Vec::new();
            for op in ops {
                let outcome = match &op {
                    Op::Grant(o, amount) => {
                        next_id += 1;
                        voucher::grant(&mut l, now, TransferId(next_id), "sd-2026", orgs[*o as usize], *amount).map(|_| String::new())
                    }
                    Op::Hold(job, o, seconds, domestic) => voucher::hold(
                        &mut l, now, &format!("j{job}"), orgs[*o as usize], &site("Ascend910B", *domestic),
                        &Usage { accel_seconds: *seconds, transfer_fen: 10 }, 50_000,
                    ).map(|h| format!("{:?}", h.bill)),
                    Op::Settle(job, seconds) => voucher::settle(&mut l, now, &format!("j{job}"), &Usage { accel_seconds: *seconds, transfer_fen: 10 })
                        .map(|s| format!("{:?}", s.bill)),
                    Op::Release(job) => voucher::release(&mut l, now, &format!("j{job}")).map(|_| String::new()),
                    Op::Sweep(dt) => {
                        now += dt;
                        voucher::sweep(&mut l, now).map(|_| String::new())
                    }
                };
                if let Ok(text) = &outcome
                    && matches!(op, Op::Hold(..) | Op::Settle(..))
                {
                    done.push((op.clone(), text.clone()));
                }
                let pool = l.account(voucher::programme_pool("sd-2026")).unwrap();
                // Never granted more than the budget (plus what expiry returned).
                prop_assert!(pool.available() >= 0 && pool.debits_posted <= pool.credits_posted);
                for a in l.accounts() {
                    if a.kind != "treasury" && a.kind != "bank" && a.kind != "card_mint" {
                        prop_assert!(a.debits_posted + a.debits_pending <= a.credits_posted || a.kind == "revenue", "{} overdrawn", a.kind);
                    }
                }
                let problems = voucher::verify(&l).unwrap();
                prop_assert!(problems.is_empty(), "{:?}", problems);
            }
            // Repeating a successful hold or settle returns the same bill.
            for (op, text) in done {
                let again = match &op {
                    Op::Hold(job, o, seconds, domestic) => voucher::hold(
                        &mut l, now, &format!("j{job}"), orgs[*o as usize], &site("Ascend910B", *domestic),
                        &Usage { accel_seconds: *seconds, transfer_fen: 10 }, 50_000,
                    ).map(|h| format!("{:?}", h.bill)),
                    Op::Settle(job, seconds) => voucher::settle(&mut l, now, &format!("j{job}"), &Usage { accel_seconds: *seconds, transfer_fen: 10 })
                        .map(|s| format!("{:?}", s.bill)),
                    _ => unreachable!(),
                };
                match (&op, again) {
                    (_, Ok(again)) => prop_assert_eq!(again, text),
                    // A hold that has ended is not held again.
                    (Op::Hold(..), Err(e)) => {
                        let code = match &e {
                            suanwang_ledger::LedgerError::Refused(r) => r.code(),
                            other => panic!("{other}"),
                        };
                        prop_assert!(matches!(code, "already_settled" | "not_held"), "{e}");
                    }
                    (_, Err(e)) => panic!("repeating {op:?}: {e}"),
                }
            }
        }
    }
}

#[test]
fn a_budget_changes_only_by_fund_and_defund_and_reports_follow() {
    let (path, mut l, now) = books();
    let p = voucher::fund_programme(&mut l, now, TransferId(50), "sd-2026", 200_000, "council top-up").unwrap();
    assert_eq!((p.budget_fen(), p.funded_fen, p.defunded_fen), (1_200_000, 1_200_000, 0));
    // The same request again is the same funding.
    voucher::fund_programme(&mut l, now, TransferId(50), "sd-2026", 200_000, "council top-up").unwrap();
    assert_eq!(
        code(voucher::fund_programme(&mut l, now, TransferId(50), "sd-2026", 300_000, "other").unwrap_err()),
        "id_reused_with_different_content"
    );
    assert_eq!(
        code(voucher::fund_programme(&mut l, now, TransferId(51), "sd-2026", 1, " ").unwrap_err()),
        "invalid_argument"
    );
    assert_eq!(code(voucher::fund_programme(&mut l, now, TransferId(52), "nope", 1, "x").unwrap_err()), "not_found");
    // 1,200,000 funded, 500,000 granted: 700,000 can go back, not more.
    let err = voucher::defund_programme(&mut l, now, TransferId(53), "sd-2026", 700_001, "cut").unwrap_err();
    assert_eq!(code(err), "programme_exhausted");
    let p = voucher::defund_programme(&mut l, now, TransferId(54), "sd-2026", 300_000, "budget cut").unwrap();
    assert_eq!((p.budget_fen(), p.defunded_fen), (900_000, 300_000));
    voucher::defund_programme(&mut l, now, TransferId(54), "sd-2026", 300_000, "budget cut").unwrap();
    assert_eq!(voucher::programmes(&l).unwrap()[0].budget_fen(), 900_000);
    // An expiry return, then the report: every figure from its own record.
    voucher::sweep(&mut l, day("2027-01-02")).unwrap();
    let report = &audit::programme_spend(&l).unwrap()[0];
    assert_eq!(
        (report.budget_fen, report.defunded_fen, report.granted_fen, report.returned_fen, report.pool_fen),
        (900_000, 300_000, 500_000, 500_000, 900_000),
        "{report:?}"
    );
    // A grant can never exceed the budget as funded less defunded.
    let err = voucher::grant(&mut l, now, TransferId(55), "sd-2026", "sdu", 900_001).unwrap_err();
    assert_eq!(code(err), "programme_exhausted");
    assert!(voucher::verify(&l).unwrap().is_empty());
    // The purpose of each operation is in the journal.
    let memos: Vec<String> =
        l.transfers_of(voucher::programme_pool("sd-2026")).unwrap().into_iter().map(|t| t.memo).collect();
    assert!(memos.contains(&"fund sd-2026: council top-up".to_string()), "{memos:?}");
    assert!(memos.contains(&"defund sd-2026: budget cut".to_string()), "{memos:?}");
    // A budget edited in the table, with its row changes let through by a
    // dropped trigger, is caught by the replay.
    drop(l);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("DROP TRIGGER journal_programmes_update; UPDATE programmes SET funded_fen = funded_fen + 1")
        .unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert!(err.contains("table programmes: row [\"'sd-2026'\"] differs from the journal"), "{err}");
}

#[test]
fn every_raw_transfer_outside_the_permitted_flows_is_refused_with_its_code() {
    let (_, mut l, now) = books();
    voucher::buy_card(&mut l, now, TransferId(60), "acme", "H100", 3600, 1000).unwrap();
    voucher::hold(&mut l, now, "j", "acme", &site("Ascend910B", true), &hours(1), 3600).unwrap();
    // One account of every kind the vouchers make.
    let kinds: Vec<(String, suanwang_ledger::AccountId)> = {
        let mut seen = std::collections::BTreeMap::new();
        for a in l.accounts() {
            seen.entry(a.kind.clone()).or_insert(a.id);
        }
        seen.into_iter().collect()
    };
    let names: Vec<&str> = kinds.iter().map(|(k, _)| k.as_str()).collect();
    for kind in [
        "treasury",
        "bank",
        "programme",
        "voucher",
        "wallet",
        "revenue",
        "card_sales",
        "card",
        "card_mint",
        "card_redeemed",
    ] {
        assert!(names.contains(&kind), "no {kind} account in {names:?}");
    }
    let mut id = 1000u128;
    let mut permitted = 0;
    for (debit_kind, debit) in &kinds {
        for (credit_kind, credit) in &kinds {
            if debit == credit {
                continue;
            }
            id += 1;
            let outcome = voucher::correction(&mut l, now, TransferId(id), *debit, *credit, 1, "test");
            let allowed = voucher::PERMITTED_CORRECTIONS.contains(&(debit_kind.as_str(), credit_kind.as_str()));
            match outcome {
                Err(e) if !allowed => assert_eq!(e.code(), "flow_not_permitted", "{debit_kind} -> {credit_kind}"),
                Err(e) => {
                    // Permitted, but the debited account may not hold 1 fen.
                    assert_eq!(e.code(), "insufficient_funds", "{debit_kind} -> {credit_kind}: {e}")
                }
                Ok(_) => {
                    assert!(allowed, "{debit_kind} -> {credit_kind} went through");
                    permitted += 1;
                }
            }
        }
    }
    assert!(permitted >= 4, "only {permitted} permitted corrections went through");
    assert!(voucher::verify(&l).unwrap().is_empty());
}

#[test]
fn verify_catches_a_transfer_along_a_flow_no_operation_makes() {
    let (path, mut l, now) = books();
    // Below the voucher rules, straight on the ledger: a "grant" from an
    // organisation's wallet into a voucher, which no operation makes.
    let t = suanwang_ledger::NewTransfer::posted(
        TransferId(70),
        voucher::wallet("acme"),
        voucher::voucher("sd-2026", "acme"),
        10,
        voucher::codes::GRANT,
    );
    l.create_transfers(now, &[t]).unwrap().remove(0).unwrap();
    let err = voucher::verify_file(&path, None).unwrap_err().to_string();
    assert!(err.contains("from a wallet account to a voucher account with code 2: not a permitted flow"), "{err}");
}

fn issuer_programme(id: &str, issuer: &str, cap: i64, cap_per: CapScope) -> ProgrammeSpec {
    ProgrammeSpec {
        id: id.into(),
        issuer: issuer.into(),
        org_year_cap_fen: cap,
        cap_per,
        job_cap_fen: 1_000_000,
        ..programme()
    }
}

#[test]
fn the_yearly_cap_counts_across_the_issuer_s_programmes() {
    let (_, mut l, now) = books();
    voucher::deposit(&mut l, now, TransferId(90), "acme", 100_000_000).unwrap();
    // Two more programmes of the same issuer (sd-bureau, cap 300,000),
    // one of another issuer, one of the same issuer capped on its own.
    for (n, p) in [
        issuer_programme("sd-ai", "sd-bureau", 300_000, CapScope::Issuer),
        issuer_programme("jn-city", "jn-bureau", 300_000, CapScope::Issuer),
        issuer_programme("sd-own", "sd-bureau", 50_000, CapScope::Programme),
    ]
    .into_iter()
    .enumerate()
    {
        voucher::create_programme(&mut l, now, &p).unwrap();
        voucher::grant(&mut l, now, TransferId(0x700 + n as u128), &p.id, "acme", 1_000_000).unwrap();
    }
    // An issuer's cap is one cap: a programme of it with another cap is refused.
    let err = voucher::create_programme(&mut l, now, &issuer_programme("sd-x", "sd-bureau", 1, CapScope::Issuer));
    assert!(err.unwrap_err().to_string().contains("issuer 'sd-bureau' caps an organisation at 300000 fen"));
    // 3,000 hours at 10 yuan: 3,000,000 fen, 30% = 900,000 by rate, each job's subsidy capped by what is left.
    let big = hours(1000);
    let mut paid = Vec::new();
    for job in ["j1", "j2", "j3", "j4", "j5", "j6"] {
        let h = voucher::hold(&mut l, now, job, "acme", &site("Ascend910B", true), &big, 3600).unwrap();
        paid.push((h.bill.programme.clone().unwrap_or_default(), h.bill.subsidy_fen, h.bill.codes.clone()));
    }
    let from = |issuer: &str| -> i64 {
        let ids: Vec<String> = voucher::programmes(&l)
            .unwrap()
            .into_iter()
            .filter(|p| p.spec.issuer == issuer && p.spec.cap_per == CapScope::Issuer)
            .map(|p| p.spec.id)
            .collect();
        paid.iter().filter(|(p, ..)| ids.contains(p)).map(|(_, s, _)| s).sum()
    };
    // sd-bureau's issuer-wide programmes pay 300,000 in all, not 300,000 each.
    assert_eq!(from("sd-bureau"), 300_000, "{paid:?}");
    assert_eq!(from("jn-bureau"), 300_000, "{paid:?}");
    let own: i64 = paid.iter().filter(|(p, ..)| p == "sd-own").map(|(_, s, _)| s).sum();
    assert_eq!(own, 50_000, "{paid:?}");
    // Every job after the caps were used says so, by code.
    assert!(paid.iter().any(|(_, s, codes)| *s == 0 || codes.contains(&"cap_exceeded".to_string())));
    let last = voucher::quote(&mut l, now, "acme", &site("Ascend910B", true), &big).unwrap();
    assert_eq!(last.subsidy_fen, 0, "{last:?}");
    assert!(last.codes.contains(&"cap_exceeded".to_string()), "{last:?}");
    let problems = voucher::verify(&l).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_zero_usage_hold_settles_as_zero_and_an_unsettled_one_expires() {
    let (_, mut l, now) = books();
    let nothing = Usage { accel_seconds: 0, transfer_fen: 0 };
    let h = voucher::hold(&mut l, now, "z1", "acme", &site("Ascend910B", true), &nothing, 600).unwrap();
    assert_eq!((h.bill.compute_fen, h.bill.subsidy_fen, h.bill.org_total_fen), (0, 0, 0));
    let s = voucher::settle(&mut l, now + 10, "z1", &nothing).unwrap();
    assert_eq!(s.bill.org_total_fen, 0);
    voucher::hold(&mut l, now, "z2", "acme", &site("Ascend910B", true), &nothing, 600).unwrap();
    assert!(voucher::sweep(&mut l, now + 599).unwrap().holds_expired.is_empty());
    assert_eq!(voucher::sweep(&mut l, now + 600).unwrap().holds_expired, vec!["z2".to_string()]);
    assert_eq!(code(voucher::settle(&mut l, now + 700, "z2", &nothing).unwrap_err()), "not_held");
    assert!(voucher::verify(&l).unwrap().is_empty());
}

/// One book with every voucher table in use, copied fresh for each case.
fn voucher_tamper_book() -> std::path::PathBuf {
    let (path, mut l, now) = books();
    voucher::relate(&mut l, now, "sdu", "jinan-icc-co", "sdu owns the centre").unwrap();
    voucher::hold(&mut l, now, "held-job", "acme", &site("Ascend910B", true), &hours(2), 3600).unwrap();
    voucher::hold(&mut l, now, "done-job", "acme", &site("Ascend910B", true), &hours(2), 3600).unwrap();
    voucher::settle(&mut l, now + 60, "done-job", &hours(1)).unwrap();
    // A refusal, remembered so that a repeat answers the same.
    assert!(voucher::grant(&mut l, now, TransferId(80), "sd-2026", "cas", 10).is_err());
    l.create_transfers(
        now,
        &[suanwang_ledger::NewTransfer::posted(TransferId(81), voucher::bank(), voucher::wallet("sdu"), i64::MAX, 0)],
    )
    .unwrap();
    drop(l);
    verify(&path).unwrap();
    path
}

#[test]
fn every_kind_of_edit_to_the_voucher_tables_is_caught_and_named() {
    // (case, SQL, what the error must name)
    let cases: [(&str, &str, &str); 20] = [
        (
            "change an organisation's kind",
            "UPDATE orgs SET kind = 'university' WHERE id = 'acme'",
            "orgs row [\"'acme'\"]",
        ),
        ("delete an organisation", "DELETE FROM orgs WHERE id = 'cas'", "orgs row [\"'cas'\"]"),
        ("insert an organisation", "INSERT INTO orgs VALUES ('evil', 'enterprise', '', 0)", "orgs row [\"'evil'\"]"),
        (
            "raise a programme's rate",
            "UPDATE programmes SET spec = replace(spec, '\"rate_bp\":3000', '\"rate_bp\":9000')",
            "programmes row",
        ),
        (
            "raise a programme's cap",
            "UPDATE programmes SET spec = replace(spec, '300000', '900000000')",
            "programmes row",
        ),
        (
            "rewrite a statement line",
            "UPDATE billing SET settlement = replace(settlement, '\"subsidy_fen\":3000', '\"subsidy_fen\":1') WHERE job = 'done-job'",
            "billing row [\"'done-job'\"]",
        ),
        ("delete a statement line", "DELETE FROM billing WHERE job = 'done-job'", "billing row [\"'done-job'\"]"),
        (
            "close a held bill",
            "UPDATE billing SET state = 'released' WHERE job = 'held-job'",
            "billing row [\"'held-job'\"]",
        ),
        ("reset a yearly counter", "UPDATE org_year SET posted_fen = 0", "org_year row"),
        ("delete a relation", "DELETE FROM relations", "relations row [\"'sdu'\",\"'jinan-icc-co'\"]"),
        ("declare a relation", "INSERT INTO relations VALUES ('acme', 'x', 'y', 0)", "relations row"),
        ("forget a refusal", "DELETE FROM refusals", "refusals row"),
        (
            "change a hold's expiry",
            "UPDATE pending SET expires_at = expires_at + 86400 WHERE state = 0",
            "pending: transfer",
        ),
        ("change a hold's amount", "UPDATE pending SET amount = amount - 1 WHERE state = 0", "pending: transfer"),
        ("change a hold's state", "UPDATE pending SET state = 2 WHERE state = 0", "pending"),
        ("delete a row change", "DELETE FROM row_changes WHERE seq = 3", "row changes missing"),
        (
            "edit a row change",
            "UPDATE row_changes SET row = replace(row, 'enterprise', 'university') WHERE tbl = 'orgs'",
            "hash chain broken",
        ),
        (
            "reorder row changes",
            "UPDATE row_changes SET seq = -seq WHERE seq IN (3, 4); UPDATE row_changes SET seq = 7 - (-seq) WHERE seq < 0",
            "hash chain broken",
        ),
        (
            "unregister a table",
            "DELETE FROM journaled_tables WHERE name = 'billing'",
            "journaled_tables row [\"'billing'\"]",
        ),
        (
            "edit with the triggers dropped",
            "DROP TRIGGER journal_orgs_update; UPDATE orgs SET name = 'x' WHERE id = 'acme'",
            "table orgs: row [\"'acme'\"] differs from the journal",
        ),
    ];
    for (case, sql, named) in cases {
        let path = voucher_tamper_book();
        rusqlite::Connection::open(&path).unwrap().execute_batch(sql).unwrap_or_else(|e| panic!("{case}: {e}"));
        let err = match voucher::verify_file(&path, None) {
            Ok((_, problems)) if !problems.is_empty() => problems.join("; "),
            Ok(_) => panic!("{case}: not caught"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(named), "{case}: the error does not name {named:?}: {err}");
    }
}

#[test]
fn a_trigger_planted_in_the_file_stops_every_write() {
    let (path, mut l, now) = books();
    drop(l);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TRIGGER zz AFTER INSERT ON transfers BEGIN UPDATE orgs SET kind = 'university' WHERE id = 'acme'; END;")
        .unwrap();
    l = Ledger::open(&path).unwrap();
    let err = voucher::deposit(&mut l, now, TransferId(95), "acme", 10).unwrap_err().to_string();
    assert!(err.contains("trigger zz on table transfers is not the ledger's"), "{err}");
    let err = verify(&path).unwrap_err().to_string();
    assert!(err.contains("trigger zz on table transfers is not the ledger's"), "{err}");
    // A trigger under the ledger's own name with another body is replaced
    // before the commit it would act in.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DROP TRIGGER zz; DROP TRIGGER journal_orgs_update;
             CREATE TRIGGER journal_orgs_update AFTER UPDATE ON orgs BEGIN SELECT 1; END;",
        )
        .unwrap();
    voucher::deposit(&mut l, now, TransferId(96), "acme", 10).unwrap();
    let sql: String = l
        .connection()
        .query_row("SELECT sql FROM sqlite_master WHERE name = 'journal_orgs_update'", [], |r| r.get(0))
        .unwrap();
    assert!(sql.contains("INSERT INTO row_changes"), "{sql}");
    assert!(voucher::verify(&l).unwrap().is_empty());
}

#[test]
fn edits_journaled_as_if_they_were_operations_still_break_the_history_rules() {
    // What a trigger acting inside a real commit would have written: each
    // edit made in the writer's own transaction, so journaled and hashed.
    let cases: [(&str, &str, &str); 6] = [
        (
            "redefine a programme",
            "UPDATE programmes SET spec = replace(spec, '\"org_year_cap_fen\":300000', '\"org_year_cap_fen\":900000000')",
            "programme 'sd-2026' was redefined",
        ),
        (
            "change an organisation's kind",
            "UPDATE orgs SET kind = 'university' WHERE id = 'acme'",
            "orgs row was changed",
        ),
        ("delete a relation", "DELETE FROM relations", "a relations row was deleted"),
        ("delete a settled bill", "DELETE FROM billing WHERE job = 'done-job'", "a billing row was deleted"),
        (
            "re-open a settled bill",
            "UPDATE billing SET state = 'held' WHERE job = 'done-job'",
            "a bill ends once, from held",
        ),
        ("lower the funding", "UPDATE programmes SET funded_fen = funded_fen - 1", "funding totals went down"),
    ];
    for (case, edit, named) in cases {
        let path = voucher_tamper_book();
        let mut l = Ledger::open(&path).unwrap();
        l.write(day("2026-03-02"), |b| {
            b.sql().execute_batch(edit)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let err = match voucher::verify_file(&path, None) {
            Ok((_, problems)) if !problems.is_empty() => problems.join("; "),
            Ok(_) => panic!("{case}: not caught"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(named), "{case}: the error does not name {named:?}: {err}");
    }
}

#[test]
fn a_refund_gives_every_part_back_where_it_came_from() {
    let (_, mut l, now) = books();
    voucher::buy_card(&mut l, now, TransferId(97), "acme", "Ascend910B", 1800, 100).unwrap();
    let usage = Usage { accel_seconds: 4 * 3600, transfer_fen: 50 };
    let wallet = |l: &Ledger| l.account(voucher::wallet("acme")).unwrap().available();
    let voucher_left = |l: &Ledger| l.account(voucher::voucher("sd-2026", "acme")).unwrap().available();
    let card_left = |l: &Ledger| l.account(voucher::card("acme", "Ascend910B")).unwrap().available();
    let before = (wallet(&l), voucher_left(&l), card_left(&l));
    let spend_before = audit::programme_spend(&l).unwrap()[0].clone();
    voucher::hold(&mut l, now, "r1", "acme", &site("Ascend910B", true), &usage, 3600).unwrap();
    // Settled: the voucher, the wallet and the card paid.
    let s = voucher::settle(&mut l, now + 60, "r1", &usage).unwrap();
    assert!(s.bill.subsidy_fen > 0 && s.bill.org_total_fen > 0 && s.bill.card_seconds > 0, "{s:?}");
    assert_eq!(code(voucher::refund(&mut l, now, "r1", "").unwrap_err()), "invalid_argument");
    voucher::refund(&mut l, now + 120, "r1", "the provider's nodes failed the job's results").unwrap();
    // Everything back where it came from, the cap freed.
    assert_eq!((wallet(&l), voucher_left(&l), card_left(&l)), before);
    let spend = &audit::programme_spend(&l).unwrap()[0];
    assert_eq!((spend.spent_fen, spend.held_fen, spend.vouchers_fen), (0, 0, spend_before.vouchers_fen));
    // Once: again is the same refund; a held or unknown job is no refund.
    voucher::refund(&mut l, now + 130, "r1", "again").unwrap();
    assert_eq!((wallet(&l), voucher_left(&l)), (before.0, before.1));
    voucher::hold(&mut l, now, "r2", "acme", &site("Ascend910B", true), &hours(1), 3600).unwrap();
    assert_eq!(code(voucher::refund(&mut l, now, "r2", "x").unwrap_err()), "not_held");
    assert_eq!(code(voucher::refund(&mut l, now, "ghost", "x").unwrap_err()), "not_found");
    // Off the provider's statement.
    let st = audit::statement(&l, "jinan-icc-co", now, now + 1000).unwrap();
    assert!(st.lines.iter().all(|line| line.job != "r1"), "{st:?}");
    let problems = voucher::verify(&l).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_hold_kept_past_the_programme_s_end_settles_without_subsidy() {
    let (_, mut l, now) = books();
    // Held a day before the programme ends, with a timeout of a year.
    let late = day("2026-12-31");
    let h = voucher::hold(&mut l, late, "late", "acme", &site("Ascend910B", true), &hours(10), 365 * 86_400).unwrap();
    assert!(h.bill.subsidy_fen > 0);
    let _ = now;
    let s = voucher::settle(&mut l, day("2027-06-01"), "late", &hours(10)).unwrap();
    assert_eq!(s.bill.subsidy_fen, 0, "{s:?}");
    assert_eq!(s.bill.codes, vec!["voucher_expired".to_string()]);
    assert!(s.unbilled_fen > 0, "the voucher's share is not moved onto the organisation: {s:?}");
    let problems = voucher::verify(&l).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_client_cannot_take_an_id_the_ledger_derives_for_itself() {
    let (_, mut l, now) = books();
    // The id the sweep will use to return acme's expired vouchers, and a
    // job's settlement part: both derived, both refused as client ids.
    for taken in [TransferId::derive("expiry:sd-2026:acme:0"), TransferId::derive("job:j8:settle:org")] {
        let err = voucher::deposit(&mut l, now, taken, "acme", 1).unwrap_err();
        assert_eq!(code(err), "invalid_argument");
        assert_eq!(code(voucher::grant(&mut l, now, taken, "sd-2026", "acme", 1).unwrap_err()), "invalid_argument");
    }
    let report = voucher::sweep(&mut l, day("2027-01-02")).unwrap();
    assert_eq!(report.returned, vec![("sd-2026".to_string(), "acme".to_string(), 500_000)]);
}

#[test]
fn a_bill_made_while_the_rules_were_edited_away_breaks_them_in_verify() {
    // The tables edited between two commits, the traces of the edit
    // removed, a hold made under the edited rules, then everything put
    // back: the tables match the journal again, but the bill was judged
    // by rules the journal never had.
    let around = |path: &std::path::Path, sql: &str| {
        let raw = rusqlite::Connection::open(path).unwrap();
        let before: i64 = raw.query_row("SELECT COALESCE(MAX(seq), 0) FROM row_changes", [], |r| r.get(0)).unwrap();
        raw.execute_batch(&format!("BEGIN IMMEDIATE; {sql}; DELETE FROM row_changes WHERE seq > {before}; COMMIT;"))
            .unwrap();
    };
    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "a related party",
            "DELETE FROM relations WHERE org = 'acme'",
            "INSERT INTO relations VALUES ('acme', 'jinan-icc-co', 'acme owns 51%', 1772294400)",
            "were related parties",
        ),
        (
            "a rate raised",
            "UPDATE programmes SET spec = replace(spec, '\"rate_bp\":3000', '\"rate_bp\":10000')",
            "UPDATE programmes SET spec = replace(spec, '\"rate_bp\":10000', '\"rate_bp\":3000')",
            "the rate was 3000 bp",
        ),
        (
            "an organisation made eligible",
            "UPDATE orgs SET kind = 'university' WHERE id = 'cas'",
            "UPDATE orgs SET kind = 'institute' WHERE id = 'cas'",
            "not eligible then",
        ),
    ];
    for (case, edit, restore, named) in cases {
        let (path, mut l, now) = books();
        voucher::relate(&mut l, now, "acme", "jinan-icc-co", "acme owns 51%").unwrap();
        voucher::grant(&mut l, now, TransferId(98), "sd-2026", "sdu", 100_000).unwrap();
        if case == "an organisation made eligible" {
            // cas (an institute) gets vouchers only while it passes for a
            // university: the grant itself breaks the rules of its moment.
            around(&path, "UPDATE orgs SET kind = 'university' WHERE id = 'cas'");
            voucher::grant(&mut l, now, TransferId(99), "sd-2026", "cas", 100_000).unwrap();
            around(&path, "UPDATE orgs SET kind = 'institute' WHERE id = 'cas'");
        }
        let job_org = match case {
            "a related party" => "acme",
            "a rate raised" => "sdu",
            _ => "cas",
        };
        voucher::deposit(&mut l, now, TransferId(100), job_org, 1_000_000).unwrap();
        around(&path, edit);
        let h = voucher::hold(&mut l, now, "j", job_org, &site("Ascend910B", true), &hours(10), 3600).unwrap();
        assert!(h.bill.subsidy_fen > 0, "{case}: the edit did not take: {h:?}");
        around(&path, restore);
        let err = match voucher::verify_file(&path, None) {
            Ok((_, problems)) if !problems.is_empty() => problems.join("; "),
            Ok(_) => panic!("{case}: not caught"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(named), "{case}: the error does not name {named:?}: {err}");
    }
}
