//! # suanwang-api
//!
//! The request and response bodies of the HTTP/JSON API (`/v1/...`), shared
//! by the server, the site agents and the command line so they cannot drift
//! apart. Request bodies refuse unknown fields. Money is integer fen, time
//! unix seconds, durations seconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error: a stable code, a message, and the field at fault if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A dataset a job reads and the site where it lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetRequest {
    pub site: String,
    pub size_gb: f64,
}

/// How the owner weighs time, cost and carbon (only ratios matter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightsRequest {
    pub time: u32,
    pub cost: u32,
    pub carbon: u32,
}

/// A job to run (or to quote).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    #[serde(default)]
    pub name: String,
    /// The program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A container image, for backends that run containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Accelerators wanted, all at one site.
    pub gpus: u32,
    /// Acceptable accelerator types (e.g. `["H100", "A100"]`).
    pub accelerators: Vec<String>,
    /// Estimated run time on a reference accelerator (A100), seconds.
    pub estimate_s: u64,
    /// Kill after this many seconds of running (default: twice the estimate plus a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_s: Option<u64>,
    #[serde(default)]
    pub datasets: Vec<DatasetRequest>,
    /// Wanted completion, seconds after submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_fen: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsRequest>,
    /// The site nearest to the submitter (default: the organisation's home site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The owning organisation; only an operator may name one, consumers submit for their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Rejected,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        [
            JobState::Pending,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Rejected,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running)
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: u64,
    pub org: String,
    pub name: String,
    pub state: JobState,
    /// Why it failed, was cancelled or rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    pub attempts: u32,
    pub submitted_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What the organisation was billed, once settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed_fen: Option<i64>,
    /// What the voucher paid, once settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsidy_fen: Option<i64>,
    pub request: JobRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    pub at: i64,
    pub kind: String,
    pub detail: String,
}

/// A quote: the ranked sites with their explanation, and the bill at the best one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Quote {
    #[schema(value_type = Object)]
    pub explanation: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub bill: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_site: Option<String>,
}

/// Work leased to a site agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub job: u64,
    pub attempt: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub gpus: u32,
    pub accelerator: String,
    pub time_limit_s: u64,
    /// Send a heartbeat at least this often.
    pub heartbeat_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Seconds to wait for work before answering "nothing".
    #[serde(default)]
    pub wait_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// Stop the attempt now (cancelled, preempted or no longer current).
    pub stop: bool,
}

/// How an attempt ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    pub exit_code: i32,
    /// Seconds the process ran.
    pub wall_s: u64,
    /// Why the agent stopped it, if it did (time limit, cancel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killed: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub city: String,
    pub level: String,
    pub up: bool,
    pub pools: Vec<SitePool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SitePool {
    pub accelerator: String,
    pub count: u32,
    pub free: u32,
    pub price_fen_per_hour: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgRequest {
    pub id: String,
    /// enterprise, university or institute
    pub kind: String,
    #[serde(default)]
    pub name: String,
    /// Home site (origin of its jobs by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// operator, provider (with `site`) or consumer (with `org`)
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub token: String,
    pub role: String,
}

/// An organisation's money: wallet and vouchers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Balances {
    pub org: String,
    pub wallet_fen: i64,
    pub wallet_held_fen: i64,
    pub vouchers: Vec<VoucherBalance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VoucherBalance {
    pub programme: String,
    pub available_fen: i64,
    pub held_fen: i64,
}

/// An organisation's bill: its settled jobs and the totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Bill {
    pub org: String,
    pub jobs: Vec<BillLine>,
    pub compute_fen: i64,
    pub subsidy_fen: i64,
    pub org_fen: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BillLine {
    pub job: u64,
    pub site: String,
    pub accelerator: String,
    pub accel_seconds: i64,
    pub compute_fen: i64,
    pub subsidy_fen: i64,
    pub org_fen: i64,
}

#[cfg(feature = "client")]
pub mod client;
