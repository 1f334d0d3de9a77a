//! Each policy's defining behaviour, on the three-site network of `support`.

use suanwang_core::job::{OrgId, Weights};
use suanwang_core::scheduler::{Decision, Event, StopReason};

use crate::support::{job, scheduler, site_of, starts, three_sites};

#[test]
fn network_follows_the_owners_weights() {
    let t = three_sites();
    // Time only: the H100s in Qingdao finish 3.17 times sooner.
    let mut fast = job(&t, 1, 4, 36_000, &["A100", "H100"]);
    fast.weights = Weights { time: 100, cost: 0, carbon: 0 };
    let mut s = scheduler(&t, "network");
    let started = starts(&s.handle(0, Event::Submit(fast)).unwrap());
    assert_eq!(site_of(&t, &started[0]), "qingdao");
    assert_eq!(started[0].estimate.run_s, 11_357);

    // Cost only: the hub's A100s at 500 fen/h are the cheapest work.
    let mut cheap = job(&t, 2, 4, 36_000, &["A100", "H100"]);
    cheap.weights = Weights { time: 0, cost: 100, carbon: 0 };
    let mut s = scheduler(&t, "network");
    let started = starts(&s.handle(0, Event::Submit(cheap)).unwrap());
    assert_eq!(site_of(&t, &started[0]), "hub");
    assert_eq!(started[0].estimate.compute_cost_fen, 4 * 10 * 500);
}

#[test]
fn network_waits_for_a_busy_pool_only_when_it_finishes_twice_as_soon() {
    let t = three_sites();
    let mut s = scheduler(&t, "network");
    let mut blocker = job(&t, 1, 16, 3_170, &["H100"]);
    blocker.weights = Weights { time: 100, cost: 0, carbon: 0 };
    s.handle(0, Event::Submit(blocker)).unwrap();
    // The H100s free at t = 1,000; this job would take 36,000 s on A100
    // now, or 1,000 + 11,357 s on H100: it waits.
    let mut patient = job(&t, 2, 4, 36_000, &["A100", "H100"]);
    patient.weights = Weights { time: 100, cost: 0, carbon: 0 };
    assert!(starts(&s.handle(10, Event::Submit(patient)).unwrap()).is_empty());
    // A short job gains nothing worth waiting for: it starts on A100 now.
    let mut short = job(&t, 3, 4, 600, &["A100", "H100"]);
    short.weights = Weights { time: 100, cost: 0, carbon: 0 };
    let started = starts(&s.handle(20, Event::Submit(short)).unwrap());
    assert_eq!(started.len(), 1);
    assert_eq!(t.accelerator(started[0].estimate.accel).name, "A100");
    // When the H100s free, the patient job gets them.
    let started = starts(&s.handle(1_000, Event::Finished { job: suanwang_core::JobId(1), attempt: 1 }).unwrap());
    assert_eq!(started[0].job.0, 2);
    assert_eq!(site_of(&t, &started[0]), "qingdao");
}

#[test]
fn local_keeps_jobs_in_their_city_while_fifo_spills_over_the_network() {
    let t = three_sites();
    for (policy, expected) in [("local", None), ("fifo", Some("hub"))] {
        let mut s = scheduler(&t, policy);
        s.handle(0, Event::Submit(job(&t, 1, 8, 1000, &["A100"]))).unwrap();
        let second = starts(&s.handle(1, Event::Submit(job(&t, 2, 8, 1000, &["A100"]))).unwrap());
        assert_eq!(second.first().map(|st| site_of(&t, st)).as_deref(), expected, "{policy}");
    }
}

#[test]
fn fifo_starts_nearest_first() {
    let t = three_sites();
    let mut s = scheduler(&t, "fifo");
    let started = starts(&s.handle(0, Event::Submit(job(&t, 1, 2, 1000, &["A100", "H100"]))).unwrap());
    assert_eq!(site_of(&t, &started[0]), "jinan");
}

#[test]
fn easy_backfills_only_what_does_not_delay_the_reservation() {
    let t = three_sites();
    let mut s = scheduler(&t, "local");
    s.handle(0, Event::Submit(job(&t, 1, 6, 1_000, &["A100"]))).unwrap();
    // Needs all 8: reserved for t = 1,000 with nothing to spare.
    assert!(starts(&s.handle(1, Event::Submit(job(&t, 2, 8, 1_000, &["A100"]))).unwrap()).is_empty());
    // Ends before the shadow time: backfilled.
    assert_eq!(starts(&s.handle(2, Event::Submit(job(&t, 3, 1, 500, &["A100"]))).unwrap()).len(), 1);
    // Would run past the shadow time on the last free accelerator: held back.
    assert!(starts(&s.handle(3, Event::Submit(job(&t, 4, 1, 5_000, &["A100"]))).unwrap()).is_empty());
    assert_eq!(s.pending().iter().map(|j| j.0).collect::<Vec<_>>(), vec![2, 4]);
}

#[test]
fn sjf_runs_the_truly_shortest_job_first() {
    let t = three_sites();
    let mut s = scheduler(&t, "sjf");
    let mut long = job(&t, 1, 40, 10_000, &["A100"]);
    long.gpus = 32;
    let mut short = job(&t, 2, 32, 10_000, &["A100"]);
    short.oracle_s = Some(100); // the owner overestimated
    let mut blocker = job(&t, 0, 32, 50, &["A100"]);
    blocker.oracle_s = Some(50);
    s.handle(0, Event::Submit(blocker)).unwrap();
    s.apply(1, Event::Submit(long)).unwrap();
    s.apply(1, Event::Submit(short)).unwrap();
    assert!(s.schedule(1).unwrap().is_empty());
    let started = starts(&s.handle(50, Event::Finished { job: suanwang_core::JobId(0), attempt: 1 }).unwrap());
    assert_eq!(started.iter().map(|st| st.job.0).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn fair_serves_the_organisation_holding_least() {
    let t = three_sites();
    let mut s = scheduler(&t, "fair");
    let mut hog = job(&t, 1, 32, 1000, &["A100"]);
    hog.org = OrgId(7);
    s.handle(0, Event::Submit(hog)).unwrap();
    let mut a = job(&t, 2, 8, 1000, &["A100"]);
    a.org = OrgId(7);
    let mut b = job(&t, 3, 8, 1000, &["A100"]);
    b.org = OrgId(8);
    // Only jinan's 8 A100s are left: org 8 holds nothing, so it goes first.
    s.apply(1, Event::Submit(a)).unwrap();
    s.apply(1, Event::Submit(b)).unwrap();
    let started = starts(&s.schedule(1).unwrap());
    assert_eq!(started.iter().map(|st| st.job.0).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn cheapest_picks_the_lowest_bill_free_now() {
    let t = three_sites();
    let mut s = scheduler(&t, "cheapest");
    let started = starts(&s.handle(0, Event::Submit(job(&t, 1, 4, 3600, &["A100", "H100", "V100"]))).unwrap());
    // V100 at 300 fen/h but 2.5x slower: 750 per unit of work; hub A100: 500.
    assert_eq!(site_of(&t, &started[0]), "hub");
}

#[test]
fn las_demotes_long_jobs_and_preempts_them_for_new_ones() {
    let t = three_sites();
    let mut s = scheduler(&t, "las");
    s.handle(0, Event::Submit(job(&t, 1, 32, 100_000, &["A100"]))).unwrap();
    // 32 GPUs cross 7,200 GPU-seconds after 225 s of compute.
    assert_eq!(s.next_wakeup(), Some(225));
    s.handle(225, Event::Tick).unwrap();
    let decisions = s.handle(1_000, Event::Submit(job(&t, 2, 32, 1_000, &["A100"]))).unwrap();
    assert_eq!(
        decisions[0],
        Decision::Stop { job: suanwang_core::JobId(1), attempt: 1, reason: StopReason::Preempted }
    );
    let started = starts(&decisions);
    assert_eq!((started[0].job.0, site_of(&t, &started[0])), (2, "hub".to_string()));
    assert_eq!(s.pending(), vec![suanwang_core::JobId(1)]);
    assert_eq!(s.counters().preemptions, 1);
    // Same queue never preempts: another fresh job waits.
    let decisions = s.handle(1_001, Event::Submit(job(&t, 3, 32, 1_000, &["A100"]))).unwrap();
    assert!(decisions.is_empty(), "{decisions:?}");
}

#[test]
fn every_policy_is_known_by_name_and_unknown_names_are_refused() {
    for name in suanwang_core::policy::NAMES {
        assert_eq!(suanwang_core::policy::by_name(name).unwrap().name(), name);
    }
    let err = suanwang_core::policy::by_name("magic").err().unwrap();
    assert!(err.to_string().contains("unknown policy 'magic'"));
}
