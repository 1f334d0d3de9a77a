//! The run-time estimates the scheduler plans with, in a simulation.
//!
//! A real scheduler never knows how long a job will run. It plans with the
//! owner's guess or with a prediction from history, and is wrong both ways.
//! The estimators here:
//!
//! - `history`: an online predictor that knows only what has completed
//!   before the job's submission: the median duration of the last
//!   [`HISTORY_WINDOW`] completed jobs of the same organisation and gang
//!   size, else of the organisation, else of everyone, else one hour (the
//!   practice of Tiresias and Helios: users repeat their jobs). It never
//!   reads the job's own duration nor any later one.
//! - `noisy:LO-HI`: the true duration times a seeded factor uniform in
//!   `[LO, HI)` (`noisy:1-2`, the default until issue 10 is done, is users
//!   who overestimate by up to double; `noisy:1-10` and `noisy:1-100` are
//!   Mu'alem–Feitelson's wilder users).
//! - `user`: what the job's user asked for, from the trace's requested-time
//!   column (`--columns ...,estimate=COL`); a job that asked nothing gets
//!   the history's estimate.
//! - `exact`: the truth. An oracle, and labelled so wherever it is shown.
//!
//! Whatever the estimate, the simulator ends a job when its true duration
//! has passed; a job outliving its estimate is not killed (the core repairs
//! its plan, see `Scheduler::schedule`).

use std::collections::{HashMap, VecDeque};

use serde::Serialize;
use suanwang_core::job::OrgId;

/// Completed jobs remembered per class.
pub const HISTORY_WINDOW: usize = 32;
/// The estimate when nothing has completed yet.
pub const NO_HISTORY_S: u64 = 3600;

/// Which estimates the scheduler is given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Estimates {
    History,
    User,
    Noisy { lo: f64, hi: f64 },
    Exact,
}

impl Default for Estimates {
    fn default() -> Self {
        Estimates::Noisy { lo: 1.0, hi: 2.0 }
    }
}

impl Estimates {
    /// `history`, `exact` or `noisy:LO-HI` (0 < LO < HI <= 1000).
    pub fn parse(text: &str) -> Result<Estimates, String> {
        match text.trim() {
            "history" => Ok(Estimates::History),
            "user" => Ok(Estimates::User),
            "exact" => Ok(Estimates::Exact),
            other => {
                let range = other.strip_prefix("noisy:").ok_or_else(|| {
                    format!("'{other}' is not an estimator: history, user, exact or noisy:LO-HI (e.g. noisy:1-10)")
                })?;
                let (lo, hi) =
                    range.split_once('-').ok_or_else(|| format!("noisy:{range}: give LO-HI, e.g. noisy:1-10"))?;
                let number = |t: &str| t.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0);
                match (number(lo), number(hi)) {
                    (Some(lo), Some(hi)) if lo < hi && hi <= 1000.0 => Ok(Estimates::Noisy { lo, hi }),
                    _ => Err(format!("noisy:{range}: LO and HI must be numbers with 0 < LO < HI <= 1000")),
                }
            }
        }
    }

    /// Its name as given on the command line.
    pub fn name(&self) -> String {
        match self {
            Estimates::History => "history".into(),
            Estimates::User => "user".into(),
            Estimates::Exact => "exact".into(),
            Estimates::Noisy { lo, hi } => format!("noisy:{lo}-{hi}"),
        }
    }

    /// Does the scheduler see the truth (or a bound of it that never errs low)?
    pub fn is_oracle(&self) -> bool {
        matches!(self, Estimates::Exact)
    }
}

/// The last durations of one class of jobs.
#[derive(Debug, Default)]
struct Recent(VecDeque<u64>);

impl Recent {
    fn push(&mut self, duration_s: u64) {
        if self.0.len() == HISTORY_WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(duration_s);
    }

    fn median(&self) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted: Vec<u64> = self.0.iter().copied().collect();
        sorted.sort_unstable();
        Some(sorted[sorted.len() / 2])
    }
}

/// One run's estimator: what has completed so far, and how good its
/// estimates were.
#[derive(Debug, Default)]
pub struct Estimator {
    kind: Estimates,
    by_class: HashMap<(OrgId, u32), Recent>,
    by_org: HashMap<OrgId, Recent>,
    everyone: Recent,
    /// estimate / truth of every job estimated (single precision: a
    /// million jobs' worth is 4 MB).
    ratios: Vec<f32>,
}

impl Estimator {
    pub fn new(kind: Estimates) -> Estimator {
        Estimator { kind, ..Estimator::default() }
    }

    /// One for a run of `jobs` jobs (room for their ratios from the start).
    pub fn with_capacity(kind: Estimates, jobs: usize) -> Estimator {
        Estimator { kind, ratios: Vec::with_capacity(jobs), ..Estimator::default() }
    }

    /// The estimate of a job at its submission. `noisy` draws from
    /// `noisy(lo, hi)` (the mapping's seeded factor); only `noisy` and
    /// `exact` look at `true_s`.
    pub fn estimate(
        &mut self,
        org: OrgId,
        gpus: u32,
        true_s: u64,
        requested_s: Option<u64>,
        noisy: impl Fn(f64, f64) -> u64,
    ) -> u64 {
        let estimate = match (self.kind, requested_s) {
            (Estimates::Exact, _) => true_s.max(1),
            (Estimates::Noisy { lo, hi }, _) => noisy(lo, hi),
            (Estimates::User, Some(asked)) => asked.max(1),
            (Estimates::History | Estimates::User, _) => self
                .by_class
                .get(&(org, gpus))
                .and_then(Recent::median)
                .or_else(|| self.by_org.get(&org).and_then(Recent::median))
                .or_else(|| self.everyone.median())
                .unwrap_or(NO_HISTORY_S)
                .max(1),
        };
        self.ratios.push((estimate as f64 / true_s.max(1) as f64) as f32);
        estimate
    }

    /// A job completed after `duration_s` of reference-speed work.
    pub fn observe(&mut self, org: OrgId, gpus: u32, duration_s: u64) {
        self.by_class.entry((org, gpus)).or_default().push(duration_s);
        self.by_org.entry(org).or_default().push(duration_s);
        self.everyone.push(duration_s);
    }

    /// How good the estimates were.
    pub fn accuracy(&mut self) -> EstimateAccuracy {
        // In place: a million ratios are not copied.
        self.ratios.sort_unstable_by(f32::total_cmp);
        let sorted = &self.ratios;
        let at = |p: f64| {
            if sorted.is_empty() {
                0.0
            } else {
                sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1] as f64
            }
        };
        let under = sorted.iter().filter(|&&r| r < 1.0).count();
        EstimateAccuracy {
            estimator: self.kind.name(),
            oracle: self.kind.is_oracle(),
            median_ratio: (at(0.5) * 1000.0).round() / 1000.0,
            p90_ratio: (at(0.9) * 1000.0).round() / 1000.0,
            under_share: if sorted.is_empty() {
                0.0
            } else {
                (under as f64 / sorted.len() as f64 * 1000.0).round() / 1000.0
            },
        }
    }
}

/// How good a run's estimates were: estimate / true duration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EstimateAccuracy {
    pub estimator: String,
    /// The scheduler saw the truth.
    pub oracle: bool,
    pub median_ratio: f64,
    pub p90_ratio: f64,
    /// Share of jobs estimated shorter than they ran.
    pub under_share: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_bad_ones_say_why() {
        for text in ["history", "exact", "noisy:1-2", "noisy:0.5-10"] {
            assert_eq!(Estimates::parse(text).unwrap().name(), text);
        }
        for bad in ["oracle", "noisy:2-1", "noisy:0-2", "noisy:1", "noisy:a-b", "noisy:1-5000"] {
            assert!(Estimates::parse(bad).is_err(), "{bad}");
        }
        assert!(Estimates::Exact.is_oracle() && !Estimates::History.is_oracle());
        assert_eq!(Estimates::parse("user").unwrap(), Estimates::User);
        let mut e = Estimator::new(Estimates::User);
        assert_eq!(e.estimate(OrgId(1), 1, 50, Some(7200), |_, _| 0), 7200, "what the user asked");
        assert_eq!(e.estimate(OrgId(1), 1, 50, None, |_, _| 0), NO_HISTORY_S, "asked nothing: history");
    }

    #[test]
    fn history_uses_the_class_then_the_organisation_then_everyone() {
        let mut e = Estimator::new(Estimates::History);
        let never = |_: f64, _: f64| panic!("history never draws noise");
        assert_eq!(e.estimate(OrgId(1), 2, 50, None, never), NO_HISTORY_S);
        e.observe(OrgId(2), 8, 900);
        assert_eq!(e.estimate(OrgId(1), 2, 50, None, never), 900, "everyone's");
        e.observe(OrgId(1), 4, 300);
        assert_eq!(e.estimate(OrgId(1), 2, 50, None, never), 300, "the organisation's");
        for d in [100, 120, 110] {
            e.observe(OrgId(1), 2, d);
        }
        assert_eq!(e.estimate(OrgId(1), 2, 50, None, never), 110, "the class's median");
        let a = e.accuracy();
        assert_eq!((a.estimator.as_str(), a.oracle), ("history", false));
        assert_eq!(a.under_share, 0.0, "every estimate here was longer than 50 s");
    }
}
