//! Attempts, fencing of stale reports, retries, cancels and site outages.

use suanwang_core::JobId;
use suanwang_core::scheduler::{CoreError, Decision, Event, GiveUpReason, Rejection, RequeueReason, StopReason};

use crate::support::{job, scheduler, site_of, starts, three_sites};

#[test]
fn a_stale_report_from_an_old_attempt_is_ignored() {
    let t = three_sites();
    let mut s = scheduler(&t, "fifo");
    s.handle(0, Event::Submit(job(&t, 1, 4, 1000, &["A100"]))).unwrap();
    let decisions = s.handle(10, Event::Lost { job: JobId(1), attempt: 1 }).unwrap();
    assert_eq!(decisions[0], Decision::Requeue { job: JobId(1), attempt: 1, reason: RequeueReason::Lost });
    assert_eq!(starts(&decisions)[0].attempt, 2);
    // Attempt 1 reports success late: it does not count.
    assert!(s.handle(20, Event::Finished { job: JobId(1), attempt: 1 }).unwrap().is_empty());
    assert_eq!(s.counters().stale_reports, 1);
    assert_eq!(s.running_attempt(JobId(1)).map(|(a, _)| a), Some(2));
    s.handle(30, Event::Finished { job: JobId(1), attempt: 2 }).unwrap();
    assert_eq!(s.running_count(), 0);
}

#[test]
fn a_job_that_keeps_getting_lost_is_given_up() {
    let t = three_sites();
    let mut s = scheduler(&t, "fifo").with_max_lost(2);
    s.handle(0, Event::Submit(job(&t, 1, 4, 1000, &["A100"]))).unwrap();
    s.handle(1, Event::Lost { job: JobId(1), attempt: 1 }).unwrap();
    let decisions = s.handle(2, Event::Lost { job: JobId(1), attempt: 2 }).unwrap();
    assert_eq!(decisions, vec![Decision::GiveUp { job: JobId(1), attempts: 2, reason: GiveUpReason::LostTooOften }]);
    assert_eq!(s.running_count() + s.pending_count(), 0);
}

#[test]
fn a_job_s_own_failure_ends_it_unless_it_asked_for_retries() {
    let t = three_sites();
    let mut s = scheduler(&t, "fifo");
    s.handle(0, Event::Submit(job(&t, 1, 4, 1000, &["A100"]))).unwrap();
    let decisions = s.handle(1, Event::Failed { job: JobId(1), attempt: 1 }).unwrap();
    assert_eq!(decisions, vec![Decision::GiveUp { job: JobId(1), attempts: 1, reason: GiveUpReason::Failed }]);
    assert_eq!(s.running_count() + s.pending_count(), 0);

    let mut retried = job(&t, 2, 4, 1000, &["A100"]);
    retried.retries = 2;
    s.handle(2, Event::Submit(retried)).unwrap();
    // Infrastructure losses do not use up the retries.
    let d = s.handle(3, Event::Lost { job: JobId(2), attempt: 1 }).unwrap();
    assert_eq!(d[0], Decision::Requeue { job: JobId(2), attempt: 1, reason: RequeueReason::Lost });
    for attempt in 2..=3 {
        let d = s.handle(3 + attempt as u64, Event::Failed { job: JobId(2), attempt }).unwrap();
        assert_eq!(d[0], Decision::Requeue { job: JobId(2), attempt, reason: RequeueReason::Failed });
    }
    let d = s.handle(10, Event::Failed { job: JobId(2), attempt: 4 }).unwrap();
    assert_eq!(d, vec![Decision::GiveUp { job: JobId(2), attempts: 4, reason: GiveUpReason::Failed }]);
}

#[test]
fn cancel_stops_a_running_job_and_drops_a_pending_one() {
    let t = three_sites();
    let mut s = scheduler(&t, "local");
    s.handle(0, Event::Submit(job(&t, 1, 8, 1000, &["A100"]))).unwrap();
    s.handle(1, Event::Submit(job(&t, 2, 8, 1000, &["A100"]))).unwrap();
    assert!(s.handle(2, Event::Cancel { job: JobId(2) }).unwrap().is_empty());
    let decisions = s.handle(3, Event::Cancel { job: JobId(1) }).unwrap();
    assert_eq!(decisions, vec![Decision::Stop { job: JobId(1), attempt: 1, reason: StopReason::Cancelled }]);
    assert_eq!(s.running_count() + s.pending_count(), 0);
    assert_eq!(s.free(t.site(t.site_id("jinan").unwrap()).pools[0]), 8);
}

#[test]
fn a_site_outage_requeues_its_jobs_elsewhere_and_recovery_restores_it() {
    let t = three_sites();
    let jinan = t.site_id("jinan").unwrap();
    let mut s = scheduler(&t, "fifo");
    s.handle(0, Event::Submit(job(&t, 1, 4, 1000, &["A100"]))).unwrap();
    let decisions = s.handle(5, Event::SiteDown(jinan)).unwrap();
    assert_eq!(decisions[0], Decision::Requeue { job: JobId(1), attempt: 1, reason: RequeueReason::SiteDown });
    let restarted = starts(&decisions);
    assert_eq!((restarted[0].attempt, site_of(&t, &restarted[0])), (2, "hub".to_string()));
    assert!(!s.site_up(jinan));
    s.handle(6, Event::SiteUp(jinan)).unwrap();
    let next = starts(&s.handle(7, Event::Submit(job(&t, 2, 4, 1000, &["A100"]))).unwrap());
    assert_eq!(site_of(&t, &next[0]), "jinan");
}

#[test]
fn jobs_that_can_never_run_are_rejected_with_the_reason() {
    let t = three_sites();
    let mut s = scheduler(&t, "network");
    let decisions = s.handle(0, Event::Submit(job(&t, 1, 33, 1000, &["A100"]))).unwrap();
    assert_eq!(
        decisions,
        vec![Decision::Reject { job: JobId(1), reason: Rejection::CannotFitAnywhere { gpus: 33, largest: 32 } }]
    );
    let mut poor = job(&t, 2, 4, 3600, &["A100"]);
    poor.budget_fen = Some(100);
    let decisions = s.handle(0, Event::Submit(poor)).unwrap();
    assert_eq!(
        decisions,
        vec![Decision::Reject { job: JobId(2), reason: Rejection::OverBudget { cheapest_fen: 2000, budget_fen: 100 } }]
    );
    // local cannot use the hub: 16 A100s never fit in Jinan.
    let mut local = scheduler(&t, "local");
    let decisions = local.handle(0, Event::Submit(job(&t, 3, 16, 1000, &["A100"]))).unwrap();
    assert!(matches!(
        decisions[0],
        Decision::Reject { reason: Rejection::CannotFitAnywhere { gpus: 16, largest: 8 }, .. }
    ));
}

#[test]
fn bad_events_are_refused_with_a_typed_error() {
    let t = three_sites();
    let mut s = scheduler(&t, "fifo");
    s.handle(10, Event::Tick).unwrap();
    assert_eq!(s.handle(5, Event::Tick), Err(CoreError::TimeWentBackwards { now_s: 5, last_s: 10 }));
    s.handle(10, Event::Submit(job(&t, 1, 1, 100, &["A100"]))).unwrap();
    assert_eq!(s.handle(10, Event::Submit(job(&t, 1, 1, 100, &["A100"]))), Err(CoreError::DuplicateJob(1)));
    let mut no_types = job(&t, 2, 1, 100, &[]);
    no_types.accepted.clear();
    let err = s.handle(10, Event::Submit(no_types)).unwrap_err();
    assert_eq!(err.to_string(), "job 2: accepted: must name at least one accelerator type");
    let err = s.handle(10, Event::Submit(job(&t, 3, 0, 100, &["A100"]))).unwrap_err();
    assert_eq!(err.to_string(), "job 3: gpus: must be between 1 and 100000, got 0");
    let err = s.handle(10, Event::Submit(job(&t, 4, 1, 0, &["A100"]))).unwrap_err();
    assert!(err.to_string().starts_with("job 4: estimate_s: must be between 1 and"));
    assert_eq!(s.handle(10, Event::SiteDown(suanwang_core::topology::SiteId(99))), Err(CoreError::UnknownSite(99)));
    // Refusals change nothing.
    s.check_invariants().unwrap();
    assert_eq!(s.running_count(), 1);
}

#[test]
fn adopted_attempts_after_a_restart_run_on_and_are_fenced() {
    let t = three_sites();
    let jinan_a100 = t.site(t.site_id("jinan").unwrap()).pools[0];
    let mut s = scheduler(&t, "fifo");
    s.adopt(100, job(&t, 7, 6, 1000, &["A100"]), 3, jinan_a100, 40).unwrap();
    assert_eq!(s.running_attempt(JobId(7)), Some((3, jinan_a100)));
    assert_eq!(s.free(jinan_a100), 2);
    // Only attempt 3 counts.
    s.handle(101, Event::Finished { job: JobId(7), attempt: 2 }).unwrap();
    assert_eq!(s.counters().stale_reports, 1);
    // Adoption refuses what cannot be true: no room, wrong type, twice.
    assert!(s.adopt(101, job(&t, 8, 4, 1000, &["A100"]), 1, jinan_a100, 0).is_err());
    assert!(s.adopt(101, job(&t, 9, 1, 1000, &["H100"]), 1, jinan_a100, 0).is_err());
    assert_eq!(s.adopt(101, job(&t, 7, 1, 1000, &["A100"]), 1, jinan_a100, 0), Err(CoreError::DuplicateJob(7)));
    s.handle(102, Event::Finished { job: JobId(7), attempt: 3 }).unwrap();
    assert_eq!(s.free(jinan_a100), 8);
    s.check_invariants().unwrap();
}

#[test]
fn a_job_that_requires_a_feature_waits_for_a_site_that_offers_it() {
    use suanwang_core::explain::{Filter, Verdict};
    use suanwang_core::job::Feature;
    let t = three_sites();
    for policy in suanwang_core::policy::NAMES {
        let mut s = scheduler(&t, policy);
        let mut spec = job(&t, 1, 2, 1000, &["A100"]);
        spec.requires = vec![Feature(7)];
        // No site offers it yet: the job waits, it is not rejected.
        assert!(s.handle(0, Event::Submit(spec.clone())).unwrap().is_empty(), "{policy}");
        assert_eq!(s.pending_count(), 1);
        let why = s.explain(0, &spec);
        let jinan = why.sites.iter().find(|v| v.site == "jinan").unwrap();
        assert_eq!(jinan.verdict, Verdict::Filtered(Filter::MissingRequirement));
        // The hub offers something else: still nothing.
        let hub = t.site_id("hub").unwrap();
        s.apply(1, Event::SiteFeatures { site: hub, features: vec![Feature(3)] }).unwrap();
        assert!(s.schedule(1).unwrap().is_empty(), "{policy}");
        if policy == "local" {
            // `local` keeps the job in Jinan, so only Jinan offering it helps.
            let jinan = t.site_id("jinan").unwrap();
            s.apply(2, Event::SiteFeatures { site: jinan, features: vec![Feature(7), Feature(3)] }).unwrap();
            let started = starts(&s.schedule(2).unwrap());
            assert_eq!(started.iter().map(|st| site_of(&t, st)).collect::<Vec<_>>(), vec!["jinan"]);
            continue;
        }
        s.apply(2, Event::SiteFeatures { site: hub, features: vec![Feature(7), Feature(3)] }).unwrap();
        let started = starts(&s.schedule(2).unwrap());
        // Jinan is nearer and free, but only the hub has what the job needs.
        assert_eq!(started.iter().map(|st| site_of(&t, st)).collect::<Vec<_>>(), vec!["hub"], "{policy}");
        // Withdrawing the feature does not stop the running attempt; a
        // requeue then waits again.
        s.apply(3, Event::SiteFeatures { site: hub, features: vec![] }).unwrap();
        assert_eq!(s.running_count(), 1);
        let d = s.handle(4, Event::Lost { job: JobId(1), attempt: 1 }).unwrap();
        assert!(starts(&d).is_empty(), "{policy}: restarted where the feature is gone");
        assert_eq!(s.pending_count(), 1);
    }
}
