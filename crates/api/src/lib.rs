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
    #[schema(minimum = 0, maximum = 1000000)]
    pub size_gb: f64,
}

/// How the owner weighs time, cost and carbon (only ratios matter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightsRequest {
    #[schema(maximum = 1000000)]
    pub time: u32,
    #[schema(maximum = 1000000)]
    pub cost: u32,
    #[schema(maximum = 1000000)]
    pub carbon: u32,
}

/// A job to run (or to quote).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Shown in listings: at most 256 characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub name: String,
    /// The program and its arguments (no NUL bytes).
    #[serde(default)]
    #[schema(max_items = 4096)]
    pub command: Vec<String>,
    /// Environment variables of the job (POSIX names; `SUANWANG_*` is reserved;
    /// at most 256 with `secret_env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables: delivered only to the agent of the
    /// site that runs an attempt, never shown again by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    /// A container image, for sites that run containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256, pattern = "^[A-Za-z0-9._/:@-]+$")]
    pub image: Option<String>,
    /// Accelerators wanted, all at one site.
    #[schema(minimum = 1, maximum = 100000)]
    pub gpus: u32,
    /// Acceptable accelerator types (e.g. `["H100", "A100"]`), each once.
    #[schema(min_items = 1, max_items = 16)]
    pub accelerators: Vec<String>,
    /// Estimated run time on a reference accelerator (A100), seconds.
    #[schema(minimum = 1, maximum = 315360000)]
    pub estimate_s: u64,
    /// Kill after this many seconds of running (default: twice the estimate plus a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 31536000)]
    pub time_limit_s: Option<u64>,
    /// Memory limit in MiB for the whole attempt (default: the site's per-accelerator share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 16, maximum = 16777216)]
    pub memory_mb: Option<u64>,
    /// CPU cores for the attempt (default: the site's per-accelerator share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 4096)]
    pub cpus: Option<u32>,
    /// How often to run the job again after it fails by its own fault
    /// (each attempt is billed). Infrastructure faults are retried anyway.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schema(minimum = 0, maximum = 10)]
    pub retries: u32,
    #[serde(default)]
    #[schema(max_items = 64)]
    pub datasets: Vec<DatasetRequest>,
    /// Wanted completion, seconds after submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 315360000)]
    pub deadline_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 10000000000_i64)]
    pub budget_fen: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsRequest>,
    /// The site nearest to the submitter (default: the organisation's home site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub origin: Option<String>,
    /// The owning organisation; only an operator may name one, consumers submit for their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub org: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
    /// The names of the job's secret environment variables (never their values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_keys: Vec<String>,
    pub request: JobRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// How many jobs match in all (the list holds at most `limit` of them).
    pub total: u64,
    /// More jobs follow: pass this as `before` for the next page. (A page
    /// ends early when its jobs' requests are large.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
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
    /// A secret of this attempt alone: every report about the attempt must
    /// carry it (header `X-Attempt-Secret`). The agent never gives it to the job.
    pub secret: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The job's secret environment, for this attempt only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub gpus: u32,
    pub accelerator: String,
    pub time_limit_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Send a heartbeat at least this often.
    pub heartbeat_s: u64,
    /// The lease lasts this long after the last report the server received:
    /// an agent that cannot reach the server for this long must kill the attempt.
    pub lease_s: u64,
    /// Most bytes of output the server keeps of this attempt (the rest is
    /// dropped, the last part kept, and the log says so).
    pub log_quota_bytes: u64,
}

/// One attempt of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptRef {
    pub job: u64,
    pub attempt: u32,
}

/// What a site's agent can run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Runs jobs given as container images (podman with runc), from the
    /// images present at the site: none is ever pulled.
    #[serde(default)]
    pub containers: bool,
    /// The images present at the site, under every name a job may give for
    /// them (`localhost/name:tag`, `name:tag`, and `name` for `:latest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 4096)]
    pub images: Vec<String>,
    /// Runs each attempt in a sandbox (own user, namespaces, cgroup).
    #[serde(default)]
    pub sandboxed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Seconds to wait for work before answering "nothing".
    #[serde(default)]
    #[schema(maximum = 60)]
    pub wait_s: u64,
    /// The attempts this agent is running: the answer says which to stop.
    #[serde(default)]
    pub running: Vec<AttemptRef>,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Most attempts to take in this answer (default 1): a site whose
    /// backend queues work itself (Slurm) takes many at once.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schema(minimum = 1, maximum = 64)]
    pub max: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    /// The attempt taken, when `max` was 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The attempts taken, when `max` was more than 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<Lease>,
    /// Attempts among `running` that must be killed now (cancelled,
    /// preempted, or no longer current).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<AttemptRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// Stop the attempt now (cancelled, preempted or no longer current).
    pub stop: bool,
}

/// The server's answer to a chunk of output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogAck {
    /// Bytes of the attempt's output stream received so far: the next
    /// chunk starts here.
    pub received: u64,
    /// The attempt's log quota is used up: send only the final tail.
    pub over_quota: bool,
}

/// How an attempt ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// The job's process exited by itself (any exit code).
    Exited,
    /// Killed at its time limit.
    TimeLimit,
    /// Killed for going over its memory limit.
    MemoryLimit,
    /// Killed because the server said stop (cancel, preemption).
    Stopped,
    /// The site could not run it (sandbox set-up failed, agent shutting
    /// down, provider-side kill): not the job's fault, never billed.
    Infrastructure,
    /// The site's cluster manager refused the request as more than its
    /// nodes can ever give (memory, CPUs): the job's own request, so it
    /// fails, but nothing ran, so nothing is billed.
    Unfit,
}

impl AttemptEnd {
    /// Did the job's own behaviour end it (so its usage is billed)?
    pub fn is_job_fault(self) -> bool {
        matches!(self, AttemptEnd::Exited | AttemptEnd::TimeLimit | AttemptEnd::MemoryLimit)
    }
}

/// How an attempt ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    pub end: AttemptEnd,
    /// The exit code, or 128 + signal.
    #[schema(minimum = 0, maximum = 255)]
    pub exit_code: i32,
    /// Seconds the attempt ran.
    pub wall_s: u64,
    /// Accelerators the site's cluster manager allocated (billed, never
    /// more than the job asked for); the job's count when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Details for the job's events (at most 1,000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub city: String,
    pub level: String,
    pub up: bool,
    /// What its agent said it can run, when it last polled.
    pub capabilities: Capabilities,
    /// When its agent was last heard from (unix seconds), if ever since the server started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
    /// The backend its agent runs jobs on (`local`, `slurm`), once it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Why its agent says it cannot take work now (e.g. its cluster's
    /// controller does not answer); none while healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// When its agent last reported the site's capacity (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<i64>,
    pub pools: Vec<SitePool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SitePool {
    pub accelerator: String,
    /// Registered accelerators.
    pub count: u32,
    /// Usable now, as the agent last reported (the registered count until it reports).
    pub usable: u32,
    pub free: u32,
    pub price_fen_per_hour: i64,
    /// Of the registered count, as last reported: on drained, down or reserved nodes.
    #[serde(default)]
    pub drained: u32,
    #[serde(default)]
    pub down: u32,
    #[serde(default)]
    pub reserved: u32,
}

/// What a site's agent reports of its site, periodically and whenever it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteReport {
    /// The site the agent was started for: refused (403) unless it is the
    /// site its token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The backend it runs jobs on (`local`, `slurm`).
    #[schema(max_length = 32)]
    pub backend: String,
    /// Why the site cannot take work now (its cluster's controller does
    /// not answer, ...): queued work moves elsewhere. None while healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1000)]
    pub problem: Option<String>,
    /// Capacity by accelerator type, as the cluster reports it.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub pools: Vec<PoolReport>,
}

/// One accelerator type of a site, as its cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolReport {
    /// The network's name of the type (`A100`, `Ascend910B`).
    pub accelerator: String,
    /// On every node the cluster has.
    pub total: u32,
    /// On nodes that can take work now.
    pub usable: u32,
    #[serde(default)]
    pub drained: u32,
    #[serde(default)]
    pub down: u32,
    #[serde(default)]
    pub reserved: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgRequest {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub id: String,
    pub kind: OrgKind,
    #[serde(default)]
    #[schema(max_length = 256)]
    pub name: String,
    /// Home site (origin of its jobs by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// operator, provider (with `site`) or consumer (with `org`)
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    #[schema(max_length = 256)]
    pub label: String,
    /// The token stops working this many seconds after its creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 315360000)]
    pub expires_in_s: Option<u64>,
}

/// The kinds of organisation (voucher programmes are for some of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
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

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything: programmes, organisations, tokens, every job.
    Operator,
    /// One site's agent: leases and reports of that site's attempts only.
    Provider,
    /// One organisation: its jobs, bills and vouchers.
    Consumer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// The token itself: shown this once, stored only as a hash.
    pub token: String,
    /// Its public id, for listing and revoking.
    pub id: String,
    pub role: Role,
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub label: String,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
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

/// An organisation's bill: every billed attempt and the totals. On each
/// line `compute_fen - card_fen - subsidy_fen + transfer_fen = org_fen`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Bill {
    pub org: String,
    pub lines: Vec<BillLine>,
    pub compute_fen: i64,
    pub card_fen: i64,
    pub subsidy_fen: i64,
    pub transfer_fen: i64,
    pub org_fen: i64,
}

/// One billed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BillLine {
    pub job: u64,
    pub attempt: u32,
    /// How the attempt ended: succeeded, failed (exit code N), time limit,
    /// memory limit, cancelled.
    pub cause: String,
    pub site: String,
    pub accelerator: String,
    pub settled_at: i64,
    pub accel_seconds: i64,
    /// Compute at list price.
    pub compute_fen: i64,
    /// Compute paid by a compute card.
    pub card_fen: i64,
    /// Compute paid by a voucher.
    pub subsidy_fen: i64,
    pub transfer_fen: i64,
    /// What the organisation pays for the attempt.
    pub org_fen: i64,
}

#[cfg(feature = "client")]
pub mod client;
pub mod sbatch;
