//! "Why is my job pending?": every filter reason and the score breakdown.

use suanwang_core::explain::{Filter, Verdict};
use suanwang_core::scheduler::Event;

use crate::support::{job, scheduler, three_sites, with_dataset};

fn verdict<'a>(e: &'a suanwang_core::explain::Explanation, site: &str) -> &'a Verdict {
    &e.sites.iter().find(|s| s.site == site).expect("every site is explained").verdict
}

#[test]
fn every_site_is_either_filtered_with_a_reason_or_scored() {
    let t = three_sites();
    let mut s = scheduler(&t, "network");
    s.handle(0, Event::SiteDown(t.site_id("qingdao").unwrap())).unwrap();
    let e = s.explain(0, &job(&t, 1, 16, 3600, &["A100", "H100"]));
    assert_eq!(e.sites.len(), 3);
    assert_eq!(verdict(&e, "qingdao"), &Verdict::Filtered(Filter::SiteDown));
    assert_eq!(verdict(&e, "jinan"), &Verdict::Filtered(Filter::GangTooLarge { gpus: 16, largest_pool: 8 }));
    let Verdict::Scored(hub) = verdict(&e, "hub") else { panic!("hub should be scored") };
    assert_eq!((hub.score, hub.can_start_now, hub.accelerator.as_str()), (100, true, "A100"));
    assert_eq!(e.best().unwrap().0.site, "hub");

    let e = s.explain(0, &job(&t, 2, 4, 3600, &["V100"]));
    assert_eq!(verdict(&e, "hub"), &Verdict::Filtered(Filter::NoAcceptedType));

    let mut poor = job(&t, 3, 4, 3600, &["A100"]);
    poor.budget_fen = Some(2500);
    let e = s.explain(0, &poor);
    // Jinan: 4 x 1 h x 900 = 3,600 fen > 2,500; the hub: 2,000.
    assert_eq!(verdict(&e, "jinan"), &Verdict::Filtered(Filter::OverBudget { cost_fen: 3600, budget_fen: 2500 }));
    assert!(matches!(verdict(&e, "hub"), Verdict::Scored(_)));
}

#[test]
fn local_names_the_origin_city() {
    let t = three_sites();
    let s = scheduler(&t, "local");
    let e = s.explain(0, &job(&t, 1, 4, 3600, &["H100"]));
    assert_eq!(verdict(&e, "qingdao"), &Verdict::Filtered(Filter::NotLocal { origin_city: "Jinan".into() }));
    assert_eq!(verdict(&e, "jinan"), &Verdict::Filtered(Filter::NoAcceptedType));
    assert!(e.best().is_none());
}

#[test]
fn the_breakdown_counts_wait_transfer_run_cost_and_carbon() {
    let t = three_sites();
    let mut s = scheduler(&t, "network");
    // Fill the H100s until t = 1,000.
    s.handle(0, Event::Submit(job(&t, 1, 16, 3170, &["H100"]))).unwrap();
    let spec = with_dataset(job(&t, 2, 4, 3600, &["A100", "H100"]), &t, "jinan", 100_000);
    let e = s.explain(10, &spec);
    let Verdict::Scored(hub) = verdict(&e, "hub") else { panic!() };
    // 100 GB over the 10 Gbit/s link, plus 20 ms: 81 s; 8 fen/GB.
    assert_eq!((hub.estimate.transfer_s, hub.estimate.transfer_cost_fen), (81, 800));
    assert_eq!((hub.estimate.run_s, hub.estimate.compute_cost_fen, hub.estimate.wait_s), (3600, 2000, 0));
    let Verdict::Scored(qingdao) = verdict(&e, "qingdao") else { panic!() };
    assert_eq!((qingdao.estimate.wait_s, qingdao.estimate.run_s, qingdao.can_start_now), (990, 1136, false));
    let Verdict::Scored(jinan) = verdict(&e, "jinan") else { panic!() };
    assert_eq!((jinan.estimate.transfer_s, jinan.estimate.transfer_cost_fen), (0, 0));
    // 4 x 400 W x 1 h x PUE 1.3 = 2,080 Wh, 70% brown, 0.5703 kg/kWh.
    assert_eq!((jinan.estimate.energy_wh, jinan.estimate.carbon_g), (2080, 831));
    // Scores are relative to the best site, which scores 100.
    let best = e.best().unwrap().1;
    assert_eq!(best.score, 100);
    for site in &e.sites {
        if let Verdict::Scored(sc) = &site.verdict {
            assert!(sc.objective >= best.objective && sc.score <= 100);
        }
    }
}

#[test]
fn explaining_reserves_nothing() {
    let t = three_sites();
    let mut s = scheduler(&t, "network");
    s.handle(0, Event::Submit(job(&t, 1, 4, 3600, &["A100"]))).unwrap();
    let pools: Vec<u32> = (0..t.pools.len() as u32).map(|p| s.free(suanwang_core::topology::PoolId(p))).collect();
    let _ = s.explain(1, &job(&t, 2, 8, 3600, &["A100", "H100"]));
    let _ = s.explain_job(suanwang_core::JobId(1)).unwrap();
    let after: Vec<u32> = (0..t.pools.len() as u32).map(|p| s.free(suanwang_core::topology::PoolId(p))).collect();
    assert_eq!(pools, after);
    assert_eq!(s.pending_count(), 0);
}
