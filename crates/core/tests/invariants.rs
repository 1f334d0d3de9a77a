//! Property tests: random networks and random event streams, every policy.
//!
//! The scheduler checks its own invariants after every step (no accelerator
//! allocated twice, no pool over capacity, every job in exactly one state,
//! indexes in step) and panics on a violation. On top, this driver keeps an
//! independent model of what should be running where, built only from the
//! decisions, and checks the core's decisions against it: no double start,
//! stops and requeues only of running attempts, pools never over capacity,
//! starts only on accepted types at sites that are up. The same stream run
//! twice gives the same decisions (determinism).

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use suanwang_core::job::{Feature, JobId, JobSpec, OrgId, OrgKind, Weights};
use suanwang_core::policy;
use suanwang_core::scheduler::{CoreError, Decision, Event, Scheduler};
use suanwang_core::topology::{
    AcceleratorSpec, LinkSpec, PoolId, PoolSpec, SiteId, SiteLevel, SiteSpec, Topology, TopologySpec,
};

const TYPES: [&str; 3] = ["A100", "H100", "Ascend910B"];

#[derive(Debug, Clone)]
struct SiteDraw {
    pools: Vec<(usize, i64, i64)>,
    level: usize,
    city: usize,
}

fn topology_strategy() -> impl Strategy<Value = Arc<Topology>> {
    let site = (proptest::collection::vec((0..3usize, 1..16i64, 100..3000i64), 1..3), 0..5usize, 0..3usize)
        .prop_map(|(pools, level, city)| SiteDraw { pools, level, city });
    proptest::collection::vec(site, 1..6).prop_map(|draws| {
        let levels = [SiteLevel::Hub, SiteLevel::Provincial, SiteLevel::City, SiteLevel::Edge, SiteLevel::Cloud];
        let mut sites = Vec::new();
        for (i, d) in draws.iter().enumerate() {
            let mut pools: Vec<PoolSpec> = Vec::new();
            for &(t, count, price) in &d.pools {
                if !pools.iter().any(|p| p.kind == TYPES[t]) {
                    pools.push(PoolSpec::new(TYPES[t], count, price));
                }
            }
            sites.push(SiteSpec::new(&format!("s{i}"), &format!("city{}", d.city), levels[d.level], pools));
        }
        let links = (1..sites.len())
            .map(|i| LinkSpec::new(&format!("s{}", i - 1), &format!("s{i}"), 10.0 * i as f64, 2.0 * i as f64, i as i64))
            .collect();
        let spec = TopologySpec {
            name: "random".into(),
            note: String::new(),
            accelerators: vec![
                AcceleratorSpec::new("A100", 1.0, 80, 400, false),
                AcceleratorSpec::new("H100", 3.17, 80, 700, false),
                AcceleratorSpec::new("Ascend910B", 1.026, 64, 400, true),
            ],
            sites,
            links,
        };
        Arc::new(spec.build().expect("random topology is valid"))
    })
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        gpus: u32,
        types: u8,
        estimate_s: u64,
        origin: usize,
        budget: bool,
        needs: u8,
    },
    /// A site offers features 0 and 1 by the mask's bits from now on.
    SiteFeatures(usize, u8),
    Finish(usize),
    Fail(usize),
    Cancel(usize),
    SiteDown(usize),
    SiteUp(usize),
    /// A pool's site reports this many of its accelerators usable.
    Capacity(usize, u32),
    /// The site withdraws a running attempt it never began.
    Withdraw(usize),
    Advance(u64),
    Tick,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..20u32, 1..8u8, 1..5000u64, 0..6usize, proptest::bool::weighted(0.1), prop_oneof![6 => Just(0u8), 1 => 1..4u8])
            .prop_map(|(gpus, types, estimate_s, origin, budget, needs)| Op::Submit { gpus, types, estimate_s, origin, budget, needs }),
        1 => (0..6usize, 0..4u8).prop_map(|(site, mask)| Op::SiteFeatures(site, mask)),
        4 => (0..64usize).prop_map(Op::Finish),
        1 => (0..64usize).prop_map(Op::Fail),
        1 => (0..64usize).prop_map(Op::Cancel),
        1 => (0..6usize).prop_map(Op::SiteDown),
        1 => (0..6usize).prop_map(Op::SiteUp),
        2 => (0..12usize, 0..20u32).prop_map(|(pool, usable)| Op::Capacity(pool, usable)),
        1 => (0..64usize).prop_map(Op::Withdraw),
        3 => (1..3000u64).prop_map(Op::Advance),
        1 => Just(Op::Tick),
    ]
}

/// The driver's own record of running attempts: job -> (attempt, pool, gpus).
type Model = BTreeMap<JobId, (u32, u32, u32)>;

fn check_decisions(
    t: &Topology,
    s: &Scheduler,
    usable: &[u32],
    model: &mut Model,
    specs: &BTreeMap<JobId, JobSpec>,
    decisions: &[Decision],
) {
    for d in decisions {
        match d {
            Decision::Start(st) => {
                let spec = &specs[&st.job];
                assert!(!model.contains_key(&st.job), "{:?} started twice", st.job);
                assert!(spec.accepts(st.estimate.accel), "started on a type it does not accept");
                assert!(s.site_up(st.estimate.site), "started on a site that is down");
                assert!(s.serves(st.estimate.site, spec), "started on a site lacking what the job requires");
                assert_eq!(st.estimate.gpus, spec.gpus);
                model.insert(st.job, (st.attempt, st.estimate.pool.0, spec.gpus));
                // Every start fits in what the site last said it can use now.
                let pool = st.estimate.pool.0;
                let held: u32 = model.values().filter(|&&(_, p, _)| p == pool).map(|&(_, _, g)| g).sum();
                assert!(
                    held <= usable[pool as usize],
                    "start on pool {pool} holds {held} of the {} its site reported usable",
                    usable[pool as usize]
                );
            }
            Decision::Stop { job, attempt, .. } | Decision::Requeue { job, attempt, .. } => {
                let (running, _, _) = model.remove(job).expect("stop or requeue of a job not running");
                assert_eq!(running, *attempt, "stop names the wrong attempt");
            }
            Decision::Reject { job, .. } => assert!(!model.contains_key(job), "rejected a running job"),
            Decision::GiveUp { job, .. } => {
                model.remove(job).expect("gave up on a job that was not running");
            }
        }
    }
    let mut held = vec![0u32; t.pools.len()];
    for &(_, pool, gpus) in model.values() {
        held[pool as usize] += gpus;
    }
    for (i, pool) in t.pools.iter().enumerate() {
        assert!(held[i] <= pool.count, "pool {i} over capacity: {} > {}", held[i], pool.count);
    }
}

fn run(t: &Arc<Topology>, policy_name: &str, ops: &[Op]) -> Vec<Decision> {
    let mut s = Scheduler::new(t.clone(), policy::by_name(policy_name).unwrap()).with_invariant_checks(true);
    let mut model = Model::new();
    let mut specs = BTreeMap::new();
    let mut log = Vec::new();
    let mut now = 0u64;
    let mut next_id = 0u64;
    let sites = t.sites.len();
    let mut usable: Vec<u32> = t.pools.iter().map(|p| p.count).collect();
    for op in ops {
        let result = match op.clone() {
            Op::Submit { gpus, types, estimate_s, origin, budget, needs } => {
                next_id += 1;
                let mut spec = JobSpec::new(
                    JobId(next_id),
                    OrgId((next_id % 4) as u32),
                    OrgKind::Institute,
                    SiteId((origin % sites) as u32),
                    gpus,
                    estimate_s,
                );
                spec.accepted =
                    (0..3).filter(|b| types & (1 << b) != 0).map(|b| t.accelerator_id(TYPES[b]).unwrap()).collect();
                spec.oracle_s = Some(estimate_s / 2 + 1);
                spec.retries = (next_id % 3) as u32;
                spec.weights = Weights { time: (next_id % 5) as u32, cost: 3, carbon: 1 };
                if budget {
                    spec.budget_fen = Some(gpus as i64 * estimate_s as i64 / 10);
                }
                spec.requires = (0..2).filter(|b| needs & (1 << b) != 0).map(Feature).collect();
                specs.insert(spec.id, spec.clone());
                s.handle(now, Event::Submit(spec))
            }
            Op::Finish(k) | Op::Fail(k) => match model.keys().nth(k % model.len().max(1)).copied() {
                Some(job) => {
                    let attempt = model[&job].0;
                    if matches!(op, Op::Finish(_)) {
                        model.remove(&job);
                        s.handle(now, Event::Finished { job, attempt })
                    } else if k % 2 == 0 {
                        s.handle(now, Event::Failed { job, attempt })
                    } else {
                        s.handle(now, Event::Lost { job, attempt })
                    }
                }
                None => continue,
            },
            Op::Cancel(k) => {
                let job = JobId((k as u64 % next_id.max(1)) + 1);
                s.handle(now, Event::Cancel { job })
            }
            Op::SiteDown(k) => s.handle(now, Event::SiteDown(SiteId((k % sites) as u32))),
            Op::SiteUp(k) => s.handle(now, Event::SiteUp(SiteId((k % sites) as u32))),
            Op::Capacity(k, n) => {
                let pool = k % t.pools.len();
                usable[pool] = n.min(t.pools[pool].count);
                s.handle(now, Event::PoolCapacity { pool: PoolId(pool as u32), usable: n })
            }
            Op::Withdraw(k) => match model.keys().nth(k % model.len().max(1)).copied() {
                Some(job) => {
                    let attempt = model[&job].0;
                    let decisions = s.handle(now, Event::Withdraw { job, attempt });
                    // Withdrawn: queued again, never given up (no loss counted).
                    if let Ok(d) = &decisions {
                        assert!(
                            d.iter().any(|d| matches!(d, Decision::Requeue { job: j, .. } if *j == job)),
                            "a withdrawn attempt's job is queued again: {d:?}"
                        );
                    }
                    decisions
                }
                None => continue,
            },
            Op::SiteFeatures(k, mask) => s.handle(
                now,
                Event::SiteFeatures {
                    site: SiteId((k % sites) as u32),
                    features: (0..2).filter(|b| mask & (1 << b) != 0).map(Feature).collect(),
                },
            ),
            Op::Advance(dt) => {
                now += dt;
                s.handle(now, Event::Tick)
            }
            Op::Tick => match s.next_wakeup() {
                Some(at) => {
                    now = now.max(at);
                    s.handle(now, Event::Tick)
                }
                None => continue,
            },
        };
        let decisions = match result {
            Ok(d) => d,
            Err(CoreError::InvalidJob(_)) => Vec::new(),
            Err(e) => panic!("unexpected error {e}"),
        };
        check_decisions(t, &s, &usable, &mut model, &specs, &decisions);
        log.extend(decisions);
        // A finish reported twice is stale and ignored.
        if let Op::Finish(_) = op
            && let Some(Decision::Start(st)) = log.iter().rev().find(|d| matches!(d, Decision::Start(_)))
            && !model.contains_key(&st.job)
        {
            let before = s.counters().stale_reports;
            s.handle(now, Event::Finished { job: st.job, attempt: st.attempt }).unwrap();
            assert_eq!(s.counters().stale_reports, before + 1);
        }
    }
    s.check_invariants().unwrap();
    log
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_every_policy(t in topology_strategy(), ops in proptest::collection::vec(op_strategy(), 1..80)) {
        for name in policy::NAMES {
            run(&t, name, &ops);
        }
    }

    #[test]
    fn the_same_events_give_the_same_decisions(t in topology_strategy(), ops in proptest::collection::vec(op_strategy(), 1..60)) {
        for name in ["network", "las", "fifo", "local"] {
            prop_assert_eq!(run(&t, name, &ops), run(&t, name, &ops));
        }
    }
}
