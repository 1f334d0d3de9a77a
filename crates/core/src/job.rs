//! Jobs as the scheduler sees them: who owns them, what they ask for, what
//! data they read and how their owner weighs time against cost and carbon.

use serde::{Deserialize, Serialize};

use crate::topology::{AccelId, SiteId, Topology};

/// A job's id, unique for the life of a scheduler. Ids order jobs by
/// submission in the simulator, and FIFO ties are broken by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub u64);

/// An organisation (the owner of jobs, bills and vouchers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrgId(pub u32);

/// The kinds of organisation a voucher programme can make eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrgKind {
    Enterprise,
    University,
    Institute,
}

impl OrgKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgKind::Enterprise => "enterprise",
            OrgKind::University => "university",
            OrgKind::Institute => "institute",
        }
    }
}

/// Something a job needs of the site that runs it beyond accelerators, such
/// as a container image present there. The core only compares ids; what
/// each id means (and which sites offer it now) is the caller's to say, with
/// [`crate::scheduler::Event::SiteFeatures`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Feature(pub u64);

/// A dataset a job reads, and the site where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRef {
    pub size_mb: u64,
    pub home: SiteId,
}

/// How the owner weighs completion time, money and carbon. Only the ratios
/// matter; all zero is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub time: u32,
    pub cost: u32,
    pub carbon: u32,
}

impl Weights {
    pub const BALANCED: Weights = Weights { time: 50, cost: 40, carbon: 10 };

    pub fn total(&self) -> u64 {
        self.time as u64 + self.cost as u64 + self.carbon as u64
    }
}

/// Everything the scheduler needs to know about a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: JobId,
    pub org: OrgId,
    pub org_kind: OrgKind,
    /// The site nearest to the submitter: its city is the job's origin city.
    pub origin: SiteId,
    /// Accelerators wanted, all at one site, started together (a gang).
    pub gpus: u32,
    /// Acceptable accelerator types; the job runs on exactly one of them.
    pub accepted: Vec<AccelId>,
    /// The owner's estimate of run time on a reference-speed accelerator.
    pub estimate_s: u64,
    /// The true run time at reference speed, when known (the simulator knows
    /// it). Only the oracle `sjf` policy may look at it.
    pub oracle_s: Option<u64>,
    pub datasets: Vec<DatasetRef>,
    /// Latest wanted completion, in scheduler time.
    pub deadline_s: Option<u64>,
    /// Most the owner will pay for compute and transfer, in fen.
    pub budget_fen: Option<i64>,
    pub weights: Weights,
    /// How often the job may be run again after failing by its own fault
    /// (a non-zero exit, its time limit). Infrastructure faults (a lost
    /// lease, a site down) are retried regardless and do not count.
    #[serde(default)]
    pub retries: u32,
    /// What the running site must offer (sorted, each once); a site offers
    /// nothing until told otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Feature>,
}

/// Why a job description is not acceptable at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {job}: {field}: {problem}")]
pub struct InvalidJob {
    pub job: u64,
    pub field: &'static str,
    pub problem: String,
}

/// The most accelerators a single job may ask for.
pub const MAX_GANG: u32 = 100_000;
/// The most retries a job may ask for after its own failures.
pub const MAX_RETRIES: u32 = 10;
/// The most features a job may require.
pub const MAX_REQUIREMENTS: usize = 16;
/// The longest estimate a job may give: ten years.
pub const MAX_ESTIMATE_S: u64 = 10 * 365 * 86_400;

impl JobSpec {
    /// A job with balanced weights, no datasets, and no accepted types yet.
    pub fn new(id: JobId, org: OrgId, org_kind: OrgKind, origin: SiteId, gpus: u32, estimate_s: u64) -> Self {
        JobSpec {
            id,
            org,
            org_kind,
            origin,
            gpus,
            accepted: Vec::new(),
            estimate_s,
            oracle_s: None,
            datasets: Vec::new(),
            deadline_s: None,
            budget_fen: None,
            weights: Weights::BALANCED,
            retries: 0,
            requires: Vec::new(),
        }
    }

    /// Checks the description against the topology: every field that could
    /// make arithmetic overflow or refer to nothing is refused here.
    pub fn validate(&self, topology: &Topology) -> Result<(), InvalidJob> {
        let fail = |field: &'static str, problem: String| Err(InvalidJob { job: self.id.0, field, problem });
        if self.gpus == 0 || self.gpus > MAX_GANG {
            return fail("gpus", format!("must be between 1 and {MAX_GANG}, got {}", self.gpus));
        }
        if self.accepted.is_empty() {
            return fail("accepted", "must name at least one accelerator type".into());
        }
        if let Some(bad) = self.accepted.iter().find(|a| a.0 as usize >= topology.accelerators.len()) {
            return fail("accepted", format!("unknown accelerator type id {}", bad.0));
        }
        if self.estimate_s == 0 || self.estimate_s > MAX_ESTIMATE_S {
            return fail("estimate_s", format!("must be between 1 and {MAX_ESTIMATE_S}, got {}", self.estimate_s));
        }
        if let Some(oracle) = self.oracle_s
            && (oracle == 0 || oracle > MAX_ESTIMATE_S)
        {
            return fail("oracle_s", format!("must be between 1 and {MAX_ESTIMATE_S}, got {oracle}"));
        }
        if self.origin.0 as usize >= topology.sites.len() {
            return fail("origin", format!("unknown site id {}", self.origin.0));
        }
        for d in &self.datasets {
            if d.home.0 as usize >= topology.sites.len() {
                return fail("datasets", format!("unknown home site id {}", d.home.0));
            }
            if d.size_mb > 1_000_000_000 {
                return fail("datasets", format!("size_mb must be at most 1,000,000,000 (1 PB), got {}", d.size_mb));
            }
        }
        if self.retries > MAX_RETRIES {
            return fail("retries", format!("must be at most {MAX_RETRIES}, got {}", self.retries));
        }
        if self.weights.total() == 0 {
            return fail("weights", "time, cost and carbon weights are all zero".into());
        }
        if let Some(budget) = self.budget_fen
            && budget < 0
        {
            return fail("budget_fen", format!("must not be negative, got {budget}"));
        }
        if !self.requires.is_sorted() || self.requires.windows(2).any(|w| w[0] == w[1]) {
            return fail("requires", "must be sorted and name each feature once".into());
        }
        if self.requires.len() > MAX_REQUIREMENTS {
            return fail("requires", format!("at most {MAX_REQUIREMENTS} features, got {}", self.requires.len()));
        }
        Ok(())
    }

    pub fn accepts(&self, accel: AccelId) -> bool {
        self.accepted.contains(&accel)
    }
}
