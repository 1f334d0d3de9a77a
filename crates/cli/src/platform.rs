//! The running platform from the command line: `serve`, `up`, `agent`,
//! `admin`, and the client commands (`submit`, `quote`, `jobs`, `job`,
//! `logs`, `cancel`, `why`, `sites`, `vouchers`, `bill`).
//!
//! Client commands find the server and token in flags, then the
//! environment (`SUANWANG_SERVER`, `SUANWANG_TOKEN`), then the config file
//! `$XDG_CONFIG_HOME/suanwang/config.toml` (or `~/.config/...`) with
//! `server = "..."` and `token = "..."`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;
use suanwang_api::client::Client;
use suanwang_api::{Balances, Bill, Job, JobEvent, JobList, JobRequest, JobState, Quote, Site};
use suanwang_server::auth::Role;
use suanwang_server::{ServerConfig, Timings};

use crate::table::{self, print};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The database file (jobs, tokens and the ledger).
    #[arg(long, env = "SUANWANG_DB", default_value = "suanwang.db")]
    pub db: PathBuf,
    /// The address the API (and the agents) connect to.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// The network at the database's first start: a topology file or `shandong` (bundled).
    #[arg(long, default_value = "shandong")]
    pub topology: String,
    /// The scheduling policy: local, fifo, sjf, fair, las, cheapest or network.
    #[arg(long, default_value = "network")]
    pub policy: String,
    /// Seconds without word from an agent after which its attempt is lost.
    #[arg(long, default_value_t = 30)]
    pub lease_s: i64,
    /// Seconds between an agent's heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_s: u64,
    /// Seconds without a poll after which a site is down and its jobs move
    /// (at least the lease, so a lost attempt is dead before it runs again).
    #[arg(long, default_value_t = 30)]
    pub site_timeout_s: i64,
    /// Most output kept per job (all attempts together), in MiB; past it
    /// an attempt's log keeps its last 64 KiB and says how much was dropped.
    #[arg(long, default_value_t = 100)]
    pub log_quota_mb: u64,
    /// Most output kept for all of one organisation's jobs together, in MiB.
    #[arg(long, default_value_t = 10240)]
    pub log_quota_per_org_mb: u64,
    /// Most pending and running jobs one organisation may have.
    #[arg(long, default_value_t = 100_000)]
    pub max_active_jobs_per_org: u64,
    /// The operator's checkpoint key (`ledger keygen`): with it, the server
    /// verifies the ledger and writes a signed checkpoint of its head
    /// periodically, for auditors to collect.
    #[arg(long, value_name = "FILE")]
    pub checkpoint_key: Option<PathBuf>,
    /// Where periodic checkpoints go (default: the database's path with `.checkpoints`).
    #[arg(long, value_name = "DIR", requires = "checkpoint_key")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Seconds between periodic checkpoints (one is also written at start).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every_s: u64,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Where the local agents run jobs and keep their tokens.
    #[arg(long, default_value = "suanwang-work")]
    pub workdir: PathBuf,
    /// Run jobs WITHOUT the sandbox (no own user, no namespaces, no cgroup):
    /// only for machines where bubblewrap or cgroups are missing.
    #[arg(long)]
    pub unsandboxed: bool,
    /// A site of the network whose jobs run on a Slurm cluster:
    /// SITE=SLURM_CONF (repeatable); its agent runs with --backend slurm.
    #[arg(long = "slurm-site", value_name = "SITE=SLURM_CONF")]
    pub slurm_sites: Vec<String>,
    /// The Slurm sites' GRES types: TYPE=GRES,... (as the agent's --gres-map).
    #[arg(long, value_name = "TYPE=GRES,...")]
    pub slurm_gres_map: Option<String>,
    /// The Slurm partition the Slurm sites submit to.
    #[arg(long)]
    pub slurm_partition: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long, env = "SUANWANG_SERVER")]
    pub server: String,
    /// The site this agent runs (its token is bound to it).
    #[arg(long)]
    pub site: String,
    /// A file holding the site's provider token (read again when it
    /// changes, so the token can be rotated without a restart).
    #[arg(long, conflicts_with = "agent_token")]
    pub token_file: Option<PathBuf>,
    /// The provider token itself (prefer --token-file: a command line is
    /// visible to other users of the machine).
    #[arg(long = "agent-token", env = "SUANWANG_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Where jobs run: `local` (processes on this machine) or `slurm`
    /// (batch jobs on the Slurm cluster of --slurm-conf).
    #[arg(long, value_enum, default_value_t = BackendArg::Local)]
    pub backend: BackendArg,
    /// The Slurm cluster's configuration file (with --backend slurm).
    #[arg(long, value_name = "SLURM_CONF", required_if_eq("backend", "slurm"))]
    pub slurm_conf: Option<PathBuf>,
    /// The Slurm partition to submit to (default: the cluster's default).
    #[arg(long, requires = "slurm_conf")]
    pub partition: Option<String>,
    /// The Slurm account to submit under.
    #[arg(long, requires = "slurm_conf")]
    pub account: Option<String>,
    /// The cluster's GRES type for each of the site's accelerator types:
    /// TYPE=GRES,... (e.g. A100=a100,Ascend910B=910b); types not named map
    /// to their lowercase name.
    #[arg(long, value_name = "TYPE=GRES,...", requires = "slurm_conf")]
    pub gres_map: Option<String>,
    /// Seconds between reports of the cluster's capacity.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub report_s: u64,
    /// Most `sbatch` run at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub slurm_submitters: u64,
    #[arg(long, default_value = "suanwang-work")]
    pub workdir: PathBuf,
    /// Run jobs WITHOUT the sandbox: as this agent's user, in its own
    /// process group only. For machines without bubblewrap or cgroups.
    #[arg(long)]
    pub unsandboxed: bool,
    /// Memory limit per accelerator for jobs that do not ask, MiB.
    #[arg(long, default_value_t = 8192)]
    pub memory_mb_per_gpu: u64,
    /// CPU cores per accelerator for jobs that do not ask.
    #[arg(long, default_value_t = 2)]
    pub cpus_per_gpu: u32,
    /// Most processes (and threads) one attempt may have.
    #[arg(long, default_value_t = 1024)]
    pub pids_max: u64,
    /// Give jobs the host's network (default: none but their own loopback).
    #[arg(long)]
    pub job_host_network: bool,
    /// Seconds a finished attempt's directory is kept.
    #[arg(long, default_value_t = 3600)]
    pub retention_s: u64,
    /// Run jobs given as container images (podman with runc, images
    /// already at this site): `auto` when podman works here, `yes` (refuse
    /// to start without it) or `no`.
    #[arg(long, value_enum, default_value_t = ContainersArg::Auto)]
    pub containers: ContainersArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Local,
    Slurm,
}

/// `TYPE=GRES,...` as a map; a GRES may be given as `gpu:NAME` or `NAME`.
pub fn parse_gres_map(text: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut map = std::collections::BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((t, g)) = item.split_once('=') else {
            bail!("--gres-map: '{item}' is not TYPE=GRES (e.g. A100=a100)");
        };
        let g = g.trim().strip_prefix("gpu:").unwrap_or(g.trim());
        if t.trim().is_empty()
            || g.is_empty()
            || !g.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            bail!(
                "--gres-map: '{item}': the type and the GRES name must be non-empty, the GRES letters, digits, '_', '-' or '.'"
            );
        }
        if map.insert(t.trim().to_string(), g.to_string()).is_some() {
            bail!("--gres-map: type '{}' is named twice", t.trim());
        }
    }
    Ok(map)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ContainersArg {
    Auto,
    Yes,
    No,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[arg(long, env = "SUANWANG_DB", default_value = "suanwang.db", global = true)]
    pub db: PathBuf,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create the first operator token (shown once).
    Bootstrap {
        /// Make another operator token even if one exists.
        #[arg(long)]
        force: bool,
    },
    /// Register an organisation.
    Org {
        id: String,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Home site: the default origin of its jobs.
        #[arg(long)]
        home: Option<String>,
    },
    /// Add a site to the database's network (used from the server's next start).
    Site {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        city: String,
        /// hub, provincial, city, edge or cloud
        #[arg(long)]
        level: String,
        #[arg(long)]
        lat: f64,
        #[arg(long)]
        lon: f64,
        #[arg(long, default_value_t = 1.3)]
        pue: f64,
        #[arg(long, default_value_t = 0.2)]
        green_share: f64,
        /// The organisation that runs the site.
        #[arg(long)]
        provider: String,
        /// An accelerator pool: TYPE:COUNT:PRICE_FEN_PER_HOUR (repeatable).
        #[arg(long = "pool", required = true)]
        pools: Vec<String>,
        /// A link: SITE:GBPS:LATENCY_MS:FEN_PER_GB (repeatable).
        #[arg(long = "link", required = true)]
        links: Vec<String>,
        /// The network to start from if the database has none yet.
        #[arg(long, default_value = "shandong")]
        topology: String,
    },
    /// Tokens: create one (--role operator; provider --site; consumer --org), or list and revoke.
    Token {
        #[command(subcommand)]
        action: Option<TokenAction>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long, default_value = "")]
        label: String,
        /// The token stops working this many seconds after now.
        #[arg(long)]
        expires_in_s: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Every token: id, role, site or organisation, label, dates (never the token).
    List,
    /// Revoke a token by its id (from `token list`).
    Revoke { id: String },
}

#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// Server URL (or SUANWANG_SERVER, or the config file).
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Bearer token (or SUANWANG_TOKEN, or the config file).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: Option<String>,
    token: Option<String>,
}

fn config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("suanwang/config.toml"))
}

impl Connection {
    pub fn client(&self) -> anyhow::Result<Client> {
        let file: ConfigFile = match config_file().filter(|p| p.exists()) {
            Some(path) => {
                toml::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{}", path.display()))?
            }
            None => ConfigFile::default(),
        };
        let pick = |flag: &Option<String>, env: &str, file: Option<String>| {
            flag.clone().or_else(|| std::env::var(env).ok()).or(file)
        };
        let config_path = config_file().map_or("~/.config/suanwang/config.toml".into(), |p| p.display().to_string());
        let server = pick(&self.server, "SUANWANG_SERVER", file.server).ok_or_else(|| {
            anyhow!("no server: pass --server URL, set SUANWANG_SERVER or write server = \"URL\" in {config_path}")
        })?;
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            bail!("the server address '{server}' must start with http:// (for example http://127.0.0.1:7878)");
        }
        let token = pick(&self.token, "SUANWANG_TOKEN", file.token).ok_or_else(|| {
            anyhow!("no token: pass --token, set SUANWANG_TOKEN or write token = \"...\" in {config_path}")
        })?;
        Ok(Client::new(&server, &token))
    }
}

/// A unix time as local date and time with its age: `2026-11-29 14:03 (3 min ago)`.
pub fn when(t: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    format!("{} ({})", local_time(t), age(now - t))
}

fn when_opt(t: Option<i64>) -> String {
    t.map_or("-".into(), when)
}

/// `YYYY-MM-DD HH:MM` in the machine's time zone.
fn local_time(t: i64) -> String {
    // SAFETY: localtime_r writes into the tm we own; the time_t is ours.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let time: libc::time_t = t as libc::time_t;
        if libc::localtime_r(&time, &mut tm).is_null() {
            return t.to_string();
        }
        tm
    };
    format!("{:04}-{:02}-{:02} {:02}:{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min)
}

fn age(seconds: i64) -> String {
    let (n, future) = if seconds < 0 { (-seconds, true) } else { (seconds, false) };
    let text = match n {
        0..60 => return if future { "in a moment".into() } else { "just now".into() },
        60..3600 => format!("{} min", n / 60),
        3600..86_400 => format!("{} h", n / 3600),
        _ => format!("{} d", n / 86_400),
    };
    if future { format!("in {text}") } else { format!("{text} ago") }
}

fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.state.as_str().into(),
                j.org.clone(),
                j.name.clone(),
                j.site.clone().unwrap_or_else(|| "-".into()),
                j.accelerator.clone().map_or("-".into(), |a| format!("{}x{a}", j.request.gpus)),
                j.attempts.to_string(),
                j.billed_fen.map_or("-".into(), |f| f.to_string()),
                when(j.submitted_at),
                j.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &["id", "state", "org", "name", "site", "accelerators", "attempts", "billed fen", "submitted", "reason"],
        &rows,
    )
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Submit a job described in a TOML file, or a Slurm batch script (its
    /// `#SBATCH` directives become the request, the script the command).
    Submit { file: PathBuf },
    /// Where and for how much a job would run: ranked sites, explanation,
    /// voucher share (a TOML job file or a Slurm batch script).
    Quote { file: PathBuf },
    /// List jobs, newest first.
    Jobs {
        #[arg(long)]
        state: Option<String>,
        /// At most this many, up to 1,000 (see --all).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Every job (fetched a thousand at a time).
        #[arg(long)]
        all: bool,
    },
    /// One job, with its events.
    Job { id: u64 },
    /// A job's output, each attempt's after a marker line.
    Logs {
        id: u64,
        /// Follow the output while the job runs.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a job: a running attempt is killed and billed for the time it ran.
    Cancel { id: u64 },
    /// Why a job is waiting: every site, filtered with a reason or scored.
    Why { id: u64 },
    /// Sites: level, agent state, backend, capabilities, capacity reported and when, free and usable accelerators.
    Sites,
    /// Wallet and voucher balances.
    Vouchers {
        /// The organisation (operators must name one; consumers see their own).
        #[arg(long)]
        org: Option<String>,
    },
    /// Every attempt and what it cost.
    Bill {
        /// The organisation (operators must name one; consumers see their own).
        #[arg(long)]
        org: Option<String>,
    },
}

/// A job file (TOML), or a Slurm batch script whose `#SBATCH` directives
/// become the request (the network's accelerator types asked of the server).
fn read_job_file(c: &Client, path: &Path) -> anyhow::Result<JobRequest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    if suanwang_api::sbatch::is_batch_script(&text) {
        let sites: Vec<Site> = c.get("/v1/sites")?;
        let mut types: Vec<String> = sites.iter().flat_map(|s| s.pools.iter().map(|p| p.accelerator.clone())).collect();
        types.sort();
        types.dedup();
        let parsed = suanwang_api::sbatch::parse(&text, &types).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        for note in &parsed.notes {
            eprintln!("{}: note: {note}", path.display());
        }
        return Ok(parsed.request);
    }
    toml::from_str(&text).map_err(|e| anyhow!("{}", job_file_error(path, &text, &e)))
}

/// `FILE:LINE: FIELD: problem`, in words rather than Rust's types.
fn job_file_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .replace("expected u32", "expected a whole number")
        .replace("expected u64", "expected a whole number")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("expected a sequence", "expected a list like [\"a\", \"b\"]")
        .replace("expected a map", "expected a table");
    // A missing field belongs to no line: the span is the whole table.
    let Some(span) = e.span().filter(|_| !message.starts_with("missing field")) else {
        return format!("{}: {message}", path.display());
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let key = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !message.contains(&format!("`{k}`")));
    match key {
        Some(key) => format!("{}:{line}: {key}: {message}", path.display()),
        None => format!("{}:{line}: {message}", path.display()),
    }
}

/// A site's verdict from an explanation, in words.
fn verdict_words(s: &serde_json::Value) -> (String, String) {
    if s["verdict"] == "scored" {
        let e = &s["estimate"];
        let cost = e["compute_cost_fen"].as_i64().unwrap_or(0) + e["transfer_cost_fen"].as_i64().unwrap_or(0);
        let start =
            if s["can_start_now"] == true { "can start now".to_string() } else { format!("waits ~{} s", e["wait_s"]) };
        (
            s["score"].to_string(),
            format!(
                "{} x {}: {start}, transfer {} s, run {} s, {cost} fen, {} g CO2{}",
                e["gpus"],
                s["accelerator"].as_str().unwrap_or_default(),
                e["transfer_s"],
                e["run_s"],
                e["carbon_g"],
                if s["meets_deadline"] == false { ", misses the deadline" } else { "" }
            ),
        )
    } else {
        (
            "-".into(),
            format!("excluded: {}", s["reason"].as_str().unwrap_or_else(|| s["filter"].as_str().unwrap_or("?"))),
        )
    }
}

fn explanation_table(e: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = e["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let (score, words) = verdict_words(s);
            vec![s["site"].as_str().unwrap_or_default().to_string(), score, words]
        })
        .collect();
    table::render(&["site", "score", "verdict"], &rows)
}

pub fn client(connection: &Connection, command: ClientCommand) -> anyhow::Result<()> {
    let c = connection.client()?;
    let json = connection.json;
    match command {
        ClientCommand::Submit { file } => {
            let job: Job = c.post("/v1/jobs", &read_job_file(&c, &file)?)?;
            print(json, &job, || format!("submitted job {} ({})\n", job.id, job.state.as_str()))?;
            if job.state == JobState::Rejected {
                bail!("job {} was rejected: {}", job.id, job.reason.unwrap_or_default());
            }
            Ok(())
        }
        ClientCommand::Quote { file } => {
            let q: Quote = c.post("/v1/quote", &read_job_file(&c, &file)?)?;
            let balances: Option<Balances> = c.get("/v1/vouchers").ok();
            print(json, &q, || {
                let mut out = explanation_table(&q.explanation);
                if let Some(bill) = &q.bill {
                    let pay = bill["org_total_fen"].as_i64().unwrap_or(0);
                    out.push_str(&format!(
                        "\nbest: {}: compute {} fen, transfer {} fen, voucher pays {} fen, you pay {} fen\n",
                        q.best_site.clone().unwrap_or_default(),
                        bill["compute_fen"],
                        bill["transfer_fen"],
                        bill["subsidy_fen"],
                        pay
                    ));
                    if let Some(b) = &balances
                        && b.wallet_fen < pay
                    {
                        out.push_str(&format!(
                            "warning: your wallet holds {} fen, less than the {pay} fen you would pay: the job would fail at placement\n",
                            b.wallet_fen
                        ));
                    }
                } else {
                    out.push_str("\nno site can take this job now\n");
                }
                out
            })
        }
        ClientCommand::Jobs { state, limit, all } => {
            let page = if all { 1000 } else { limit.clamp(1, 1000) };
            let mut list = JobList { jobs: Vec::new(), total: 0, next_before: None };
            let mut before: Option<u64> = None;
            loop {
                let mut path = format!("/v1/jobs?limit={page}");
                if let Some(s) = &state {
                    path.push_str(&format!("&state={s}"));
                }
                if let Some(b) = before {
                    path.push_str(&format!("&before={b}"));
                }
                let next: JobList = c.get(&path)?;
                if before.is_none() {
                    list.total = next.total;
                }
                list.jobs.extend(next.jobs);
                list.next_before = next.next_before;
                before = next.next_before;
                if !all || before.is_none() {
                    break;
                }
            }
            print(json, &list, || {
                if list.jobs.is_empty() {
                    return "no jobs\n".into();
                }
                let mut out = jobs_table(&list.jobs);
                let more = list.total.saturating_sub(list.jobs.len() as u64);
                if more > 0 {
                    out.push_str(&format!("{more} more (use --limit N or --all)\n"));
                }
                out
            })
        }
        ClientCommand::Job { id } => {
            let job: Job = c.get(&format!("/v1/jobs/{id}"))?;
            let events: Vec<JobEvent> = c.get(&format!("/v1/jobs/{id}/events"))?;
            // Why a waiting job waits, in one line (`why` gives every site).
            let waiting = (job.state == JobState::Pending)
                .then(|| c.get::<serde_json::Value>(&format!("/v1/jobs/{id}/why")).ok())
                .flatten()
                .map(|e| {
                    let sites = e["sites"].as_array().cloned().unwrap_or_default();
                    match sites.iter().find(|s| s["verdict"] == "scored") {
                        Some(best) => format!(
                            "waiting for {} ({}; `suanwang why {id}` for every site)",
                            best["site"].as_str().unwrap_or_default(),
                            verdict_words(best).1
                        ),
                        None => format!(
                            "waiting: no site can take it now ({}); `suanwang why {id}` for every site",
                            sites.first().map(|s| verdict_words(s).1).unwrap_or_default()
                        ),
                    }
                });
            print(json, &serde_json::json!({"job": job, "events": events}), || {
                let mut out = jobs_table(std::slice::from_ref(&job));
                if let Some(w) = &waiting {
                    out.push_str(&format!("\n{w}\n"));
                }
                out.push_str(&format!(
                    "\nsubmitted {}\nstarted   {}\nfinished  {}\nexit code {}\n",
                    when(job.submitted_at),
                    when_opt(job.started_at),
                    when_opt(job.finished_at),
                    job.exit_code.map_or("-".into(), |c| c.to_string())
                ));
                if let Some(deadline) = job.request.deadline_s {
                    let due = job.submitted_at + deadline as i64;
                    let missed = job.finished_at.map_or(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .is_ok_and(|n| n.as_secs() as i64 > due),
                        |f| f > due,
                    );
                    out.push_str(&format!("deadline  {}{}\n", when(due), if missed { " — MISSED" } else { "" }));
                }
                if let Some(image) = &job.request.image {
                    out.push_str(&format!("image     {image} (runs in a container)\n"));
                }
                if !job.secret_keys.is_empty() {
                    out.push_str(&format!("secrets   {} (values never shown)\n", job.secret_keys.join(", ")));
                }
                let rows: Vec<Vec<String>> =
                    events.iter().map(|e| vec![when(e.at), e.kind.replace('_', " "), e.detail.clone()]).collect();
                out.push('\n');
                out.push_str(&table::render(&["when", "event", "detail"], &rows));
                out
            })
        }
        ClientCommand::Logs { id, follow } => {
            let mut out = std::io::stdout().lock();
            c.stream(&format!("/v1/jobs/{id}/logs?follow={follow}"), &mut out)?;
            Ok(())
        }
        ClientCommand::Cancel { id } => {
            let job: Job = c.post(&format!("/v1/jobs/{id}/cancel"), &())?;
            print(json, &job, || format!("job {} {}\n", job.id, job.state.as_str()))
        }
        ClientCommand::Why { id } => {
            let e: serde_json::Value = c.get(&format!("/v1/jobs/{id}/why"))?;
            print(json, &e, || explanation_table(&e))
        }
        ClientCommand::Sites => {
            let sites: Vec<Site> = c.get("/v1/sites")?;
            print(json, &sites, || {
                let rows: Vec<Vec<String>> = sites
                    .iter()
                    .map(|s| {
                        let pools = s
                            .pools
                            .iter()
                            .map(|p| {
                                // free/usable TYPE, and what of the registered count is out.
                                let mut out = Vec::new();
                                if p.usable != p.count {
                                    out.push(format!("of {}", p.count));
                                }
                                for (n, what) in [(p.drained, "drained"), (p.down, "down"), (p.reserved, "reserved")] {
                                    if n > 0 {
                                        out.push(format!("{n} {what}"));
                                    }
                                }
                                let out = if out.is_empty() { String::new() } else { format!(" ({})", out.join("; ")) };
                                format!("{}/{} {}{out}", p.free, p.usable, p.accelerator)
                            })
                            .collect::<Vec<_>>()
                            .join(", ");
                        let mut caps = Vec::new();
                        if s.capabilities.sandboxed {
                            caps.push("sandboxed".to_string());
                        }
                        if s.capabilities.containers {
                            // Each image once, by its full name (the aliases are in --json).
                            let full: Vec<&str> = s
                                .capabilities
                                .images
                                .iter()
                                .map(String::as_str)
                                .filter(|i| i.contains('/') && i.rsplit('/').next().is_some_and(|n| n.contains(':')))
                                .collect();
                            caps.push(match full.len() {
                                0 => "containers (no image)".to_string(),
                                1..=3 => format!("containers: {}", full.join(" ")),
                                n => format!("containers: {} +{} more", full[..3].join(" "), n - 3),
                            });
                        }
                        vec![
                            s.id.clone(),
                            s.level.clone(),
                            s.city.clone(),
                            match (s.up, &s.problem) {
                                (false, _) => "down".into(),
                                (true, None) => "up".into(),
                                // The whole reason is in --json.
                                (true, Some(problem)) => {
                                    let short: String = problem.chars().take(48).collect();
                                    let more = if short.len() < problem.len() { "..." } else { "" };
                                    format!("unhealthy: {short}{more}")
                                }
                            },
                            s.last_seen.map_or("-".into(), when),
                            s.backend.clone().unwrap_or_else(|| "-".into()),
                            if caps.is_empty() { "-".into() } else { caps.join(",") },
                            s.reported_at.map_or("-".into(), when),
                            pools,
                        ]
                    })
                    .collect();
                table::render(
                    &[
                        "site",
                        "level",
                        "city",
                        "agent",
                        "last heard",
                        "backend",
                        "runs",
                        "capacity reported",
                        "free/usable",
                    ],
                    &rows,
                )
            })
        }
        ClientCommand::Vouchers { org } => {
            let b: Balances = c.get(&match org {
                Some(o) => format!("/v1/vouchers?org={o}"),
                None => "/v1/vouchers".into(),
            })?;
            print(json, &b, || {
                let mut rows =
                    vec![vec!["wallet".to_string(), b.wallet_fen.to_string(), b.wallet_held_fen.to_string()]];
                rows.extend(b.vouchers.iter().map(|v| {
                    vec![format!("voucher {}", v.programme), v.available_fen.to_string(), v.held_fen.to_string()]
                }));
                table::render(&["account", "available fen", "held fen"], &rows)
            })
        }
        ClientCommand::Bill { org } => {
            let b: Bill = c.get(&match org {
                Some(o) => format!("/v1/bill?org={o}"),
                None => "/v1/bill".into(),
            })?;
            print(json, &b, || {
                let mut rows: Vec<Vec<String>> = b
                    .lines
                    .iter()
                    .map(|l| {
                        vec![
                            l.job.to_string(),
                            l.attempt.to_string(),
                            l.cause.clone(),
                            l.site.clone(),
                            l.accelerator.clone(),
                            l.accel_seconds.to_string(),
                            l.compute_fen.to_string(),
                            l.card_fen.to_string(),
                            l.subsidy_fen.to_string(),
                            l.transfer_fen.to_string(),
                            l.org_fen.to_string(),
                        ]
                    })
                    .collect();
                rows.push(vec![
                    "total".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    b.compute_fen.to_string(),
                    b.card_fen.to_string(),
                    b.subsidy_fen.to_string(),
                    b.transfer_fen.to_string(),
                    b.org_fen.to_string(),
                ]);
                let mut out = table::render(
                    &[
                        "job",
                        "attempt",
                        "cause",
                        "site",
                        "accelerator",
                        "accel s",
                        "compute",
                        "card",
                        "voucher",
                        "transfer",
                        "you pay",
                    ],
                    &rows,
                );
                out.push_str("fen; compute - card - voucher + transfer = you pay\n");
                out
            })
        }
    }
}

fn server_config(args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    let checkpoints = match &args.checkpoint_key {
        None => None,
        Some(key) => {
            let text = std::fs::read_to_string(key).with_context(|| format!("--checkpoint-key {}", key.display()))?;
            let secret = suanwang_ledger::checkpoint::parse_secret(&text)
                .map_err(|e| anyhow!("--checkpoint-key {}: {e}", key.display()))?;
            let dir = args
                .checkpoint_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.checkpoints", args.db.display())));
            Some(suanwang_server::Checkpoints { secret, dir, every_s: args.checkpoint_every_s })
        }
    };
    Ok(ServerConfig {
        checkpoints,
        db: args.db.clone(),
        topology: args.topology.clone(),
        listen: args.listen,
        policy: args.policy.clone(),
        timings: Timings {
            lease_s: args.lease_s,
            heartbeat_s: args.heartbeat_s,
            site_timeout_s: args.site_timeout_s,
            log_quota_bytes: args.log_quota_mb.saturating_mul(1 << 20),
            log_quota_per_org_bytes: args.log_quota_per_org_mb.saturating_mul(1 << 20),
            max_active_jobs_per_org: args.max_active_jobs_per_org,
        },
    })
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    suanwang_core::policy::by_name(&args.policy).map_err(|e| anyhow!("--policy: {e}"))?;
    let config = server_config(&args)?;
    config.timings.check().map_err(|e| anyhow!(e))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(suanwang_server::serve(config, Some(tx)));
        if let Ok(address) = rx.await {
            eprintln!("suanwang serving on http://{address} (database {})", args.db.display());
        }
        server.await?.map_err(anyhow::Error::from)
    })
}

/// The local agents of `up`, restarted with back-off when they die, all
/// stopped when `up` ends.
struct Supervisor {
    exe: PathBuf,
    db: PathBuf,
    url: String,
    workdir: PathBuf,
    unsandboxed: bool,
    /// How the Slurm sites' agents submit: GRES map and partition.
    slurm_gres_map: Option<String>,
    slurm_partition: Option<String>,
    agents: Vec<Agent>,
}

struct Agent {
    site: String,
    /// The Slurm cluster of a Slurm site.
    slurm_conf: Option<PathBuf>,
    token_file: PathBuf,
    child: Option<std::process::Child>,
    restarts: u32,
    next_start: std::time::Instant,
    /// Not restarted any more (its token was revoked).
    stopped: bool,
}

impl Supervisor {
    fn spawn(&self, agent: &Agent) -> anyhow::Result<std::process::Child> {
        let mut command = std::process::Command::new(&self.exe);
        command
            .args(["agent", "--server", &self.url, "--site", &agent.site, "--token-file"])
            .arg(&agent.token_file)
            .arg("--workdir")
            .arg(self.workdir.join(&agent.site))
            .env_remove("SUANWANG_TOKEN")
            .stdin(std::process::Stdio::null());
        match &agent.slurm_conf {
            Some(conf) => {
                command.args(["--backend", "slurm", "--slurm-conf"]).arg(conf);
                if let Some(map) = &self.slurm_gres_map {
                    command.args(["--gres-map", map]);
                }
                if let Some(p) = &self.slurm_partition {
                    command.args(["--partition", p]);
                }
            }
            None => {
                command.args(["--backend", "local"]);
                if self.unsandboxed {
                    command.arg("--unsandboxed");
                }
            }
        }
        command.spawn().with_context(|| format!("starting the agent of {}", agent.site))
    }

    /// Restarts agents that died, each after a back-off that doubles per
    /// restart (up to a minute).
    fn check(&mut self) {
        let now = std::time::Instant::now();
        for i in 0..self.agents.len() {
            let exited = match self.agents[i].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            if let Some(status) = exited
                && status.code() == Some(AgentSetupError::EXIT as i32)
            {
                let a = &mut self.agents[i];
                a.child = None;
                a.stopped = true;
                eprintln!(
                    "suanwang up: the agent of {} cannot work as set up (see its error above); it is not restarted: fix the options of `up` (--slurm-site, --slurm-gres-map, --slurm-partition) and start again",
                    a.site
                );
                continue;
            }
            if let Some(status) = exited {
                let valid = std::fs::read_to_string(&self.agents[i].token_file)
                    .ok()
                    .is_some_and(|t| suanwang_server::admin::token_valid(&self.db, t.trim()).unwrap_or(true));
                let a = &mut self.agents[i];
                a.child = None;
                if !valid {
                    a.stopped = true;
                    eprintln!(
                        "suanwang up: the agent of {} stopped: its token was revoked or expired; it is not restarted (run `suanwang up` again to give it a new token)",
                        a.site
                    );
                    continue;
                }
                a.restarts += 1;
                let wait = std::time::Duration::from_millis(500u64.saturating_mul(1 << a.restarts.min(7)));
                a.next_start = now + wait;
                eprintln!("suanwang up: the agent of {} exited ({status}); restarting in {wait:?}", a.site);
            }
            if self.agents[i].child.is_none() && !self.agents[i].stopped && now >= self.agents[i].next_start {
                match self.spawn(&self.agents[i]) {
                    Ok(child) => self.agents[i].child = Some(child),
                    Err(e) => eprintln!("suanwang up: {e:#}"),
                }
            }
        }
    }

    fn stop_all(&mut self) {
        for a in &mut self.agents {
            if let Some(child) = a.child.as_mut() {
                // SAFETY: SIGTERM to our own child.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        for a in &mut self.agents {
            if let Some(mut child) = a.child.take() {
                while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A token kept in a file (mode 0600) and reused while it stays valid;
/// otherwise a new one is made and the older ones of the same purpose are
/// revoked, so restarts do not pile up live tokens.
fn stored_token(db: &Path, file: &Path, role: &Role, label: &str) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(file) {
        let token = text.trim().to_string();
        if !token.is_empty() && suanwang_server::admin::token_valid(db, &token)? {
            return Ok(token);
        }
    }
    let (token, _) = suanwang_server::admin::create_token(db, role, label, None)?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{token}\n"))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::rename(&tmp, file)?;
    suanwang_server::admin::revoke_others(db, role, label, &token)?;
    Ok(token)
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let db = &args.serve.db;
    let config = server_config(&args.serve)?;
    let timings = config.timings;
    timings.check().map_err(|e| anyhow!(e))?;
    // Before anything is written: a busy port fails here, changing nothing.
    if let Err(e) = std::net::TcpListener::bind(args.serve.listen) {
        bail!(
            "cannot listen on {}: {}; choose another address with --listen",
            args.serve.listen,
            if e.kind() == std::io::ErrorKind::AddrInUse {
                "the port is in use (another suanwang?)".into()
            } else {
                e.to_string()
            }
        );
    }
    // The database's own network when it has one (`admin site` may have
    // grown it since its first start): one agent for each of its sites.
    let requested = suanwang_topology::load_spec(&args.serve.topology)?;
    let spec = match suanwang_server::admin::stored_network(db)? {
        Some(stored) if stored.name == requested.name => stored,
        _ => requested,
    };
    let topology = suanwang_topology::build(&spec, Path::new(&args.serve.topology))?;
    let mut slurm_sites = std::collections::BTreeMap::new();
    for spec in &args.slurm_sites {
        let Some((site, conf)) = spec.split_once('=') else {
            bail!("--slurm-site: '{spec}' is not SITE=SLURM_CONF");
        };
        if !topology.sites.iter().any(|s| s.key == site) {
            let known: Vec<&str> = topology.sites.iter().map(|s| s.key.as_str()).collect();
            bail!("--slurm-site: the network has no site '{site}' (its sites: {})", known.join(", "));
        }
        let conf = std::fs::canonicalize(conf).with_context(|| format!("--slurm-site {site}: {conf}"))?;
        if slurm_sites.insert(site.to_string(), conf).is_some() {
            bail!("--slurm-site: site '{site}' is named twice");
        }
    }
    if let Some(map) = &args.slurm_gres_map {
        parse_gres_map(map)?;
    }
    if !args.unsandboxed {
        // Refuse early, with the reason, rather than have every agent refuse.
        let scratch = args.workdir.join(".up-check");
        std::fs::create_dir_all(&scratch)?;
        let check = suanwang_agent::sandbox::Isolation::sandboxed(
            "up-check",
            &scratch,
            Default::default(),
            suanwang_agent::sandbox::Containers::Off,
        );
        let _ = std::fs::remove_dir_all(&scratch);
        if let Err(e) = check {
            bail!(
                "the job sandbox cannot be set up: {e}\n(jobs would run unisolated: pass --unsandboxed to accept that)"
            );
        }
    } else {
        eprintln!("suanwang up: WARNING: --unsandboxed: jobs run as this user, without isolation");
    }
    let operator = match suanwang_server::admin::bootstrap(db, false) {
        Ok(token) => Some(token),
        Err(suanwang_server::admin::AdminError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    // A demo organisation with money, so a job can be submitted at once.
    // Every step is idempotent: running `up` again changes nothing.
    let home = topology
        .sites
        .iter()
        .find(|s| s.level == suanwang_core::topology::SiteLevel::Provincial)
        .unwrap_or(&topology.sites[0])
        .key
        .clone();
    suanwang_server::admin::add_org(db, "demo", "enterprise", "Demo enterprise", Some(&home))?;
    {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let mut ledger = suanwang_ledger::voucher::open(db, now)?;
        suanwang_ledger::voucher::deposit(
            &mut ledger,
            now,
            suanwang_ledger::TransferId(0x5550_0001),
            "demo",
            1_000_000,
        )?;
        // A demo voucher programme, so quotes show what a voucher pays.
        let programme = suanwang_ledger::voucher::ProgrammeSpec {
            id: "demo-vouchers".into(),
            name: "Demo compute vouchers (30%, 20% on foreign accelerators)".into(),
            issuer: "demo-bureau".into(),
            cap_per: suanwang_ledger::voucher::CapScope::Issuer,
            budget_fen: 10_000_000,
            valid_from: 0,
            valid_until: 4_102_444_800,
            kinds: vec![suanwang_ledger::voucher::OrgKind::Enterprise],
            sites: vec![],
            accels: vec![],
            rate_bp: 3000,
            foreign_rate_bp: 2000,
            org_year_cap_fen: 1_000_000,
            job_cap_fen: 100_000,
        };
        suanwang_ledger::voucher::create_programme(&mut ledger, now, &programme)?;
        suanwang_ledger::voucher::grant(
            &mut ledger,
            now,
            suanwang_ledger::TransferId(0x5550_0002),
            "demo-vouchers",
            "demo",
            200_000,
        )?;
    }
    let tokens = args.workdir.join(".tokens");
    let demo =
        stored_token(db, &tokens.join("demo.token"), &Role::Consumer { org: "demo".into() }, "suanwang up demo")?;
    let mut agents = Vec::new();
    for site in &topology.sites {
        let file = tokens.join(format!("{}.token", site.key));
        stored_token(db, &file, &Role::Provider { site: site.key.clone() }, "suanwang up")?;
        agents.push(Agent {
            site: site.key.clone(),
            slurm_conf: slurm_sites.get(&site.key).cloned(),
            token_file: file,
            child: None,
            restarts: 0,
            next_start: std::time::Instant::now(),
            stopped: false,
        });
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut server = tokio::spawn(suanwang_server::serve(config, Some(tx)));
        let address = match rx.await {
            Ok(address) => address,
            // The server ended before listening: say why.
            Err(_) => return match server.await {
                Ok(Err(e)) => Err(anyhow!(e)),
                Ok(Ok(())) => Err(anyhow!("the server stopped before it listened")),
                Err(e) => Err(anyhow!(e)),
            },
        };
        let url = format!("http://{address}");
        let mut supervisor = Supervisor {
            exe: std::env::current_exe()?,
            db: db.clone(),
            url: url.clone(),
            workdir: args.workdir.clone(),
            unsandboxed: args.unsandboxed,
            slurm_gres_map: args.slurm_gres_map.clone(),
            slurm_partition: args.slurm_partition.clone(),
            agents,
        };
        supervisor.check();
        println!(
            "suanwang is up at {url}: server, database {}, {} agents (one per site of {}; {} on Slurm{}).",
            db.display(),
            supervisor.agents.len(),
            topology.name,
            slurm_sites.len(),
            if args.unsandboxed { ", UNSANDBOXED" } else { ", jobs sandboxed" }
        );
        match &operator {
            Some(token) => println!("operator token (shown once): {token}"),
            None => println!(
                "an operator token exists already; make another with: suanwang admin --db {} bootstrap --force",
                db.display()
            ),
        }
        println!("a token of the demo organisation (given 10,000 yuan and 2,000 yuan of demo vouchers at the first start):");
        println!("  export SUANWANG_SERVER={url} SUANWANG_TOKEN={demo}");
        println!("  suanwang quote examples/job.toml; suanwang submit examples/job.toml; suanwang jobs; suanwang logs -f 1");
        println!("more organisations and tokens: suanwang admin --db {} org ID --kind enterprise|university|institute; suanwang admin --db {} token --role consumer --org ID", db.display(), db.display());
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        let outcome = loop {
            tokio::select! {
                result = &mut server => break result.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from)),
                _ = tokio::signal::ctrl_c() => { eprintln!("suanwang up: interrupted; stopping the agents"); break Ok(()) }
                _ = terminate.recv() => { eprintln!("suanwang up: terminated; stopping the agents"); break Ok(()) }
                _ = tick.tick() => supervisor.check(),
            }
        };
        supervisor.stop_all();
        outcome
    })
}

pub fn agent(args: AgentArgs, connection: &Connection) -> anyhow::Result<()> {
    let slurm = match args.backend {
        BackendArg::Local => {
            if args.slurm_conf.is_some() {
                bail!("--slurm-conf needs --backend slurm");
            }
            None
        }
        BackendArg::Slurm => {
            let conf = args.slurm_conf.clone().ok_or_else(|| anyhow!("--backend slurm needs --slurm-conf FILE"))?;
            if !conf.is_file() {
                bail!("--slurm-conf: {} is not a file", conf.display());
            }
            Some(suanwang_agent::slurm_site::SlurmSite {
                conf: std::fs::canonicalize(&conf)?,
                partition: args.partition.clone(),
                account: args.account.clone(),
                gres_map: parse_gres_map(args.gres_map.as_deref().unwrap_or(""))?,
                report_s: args.report_s,
                submitters: args.slurm_submitters as usize,
            })
        }
    };
    suanwang_server::validate::identifier("site", &args.site).map_err(|e| anyhow!("--site: {}", e.body.message))?;
    let _ = connection;
    let token = match (&args.token_file, &args.agent_token) {
        (Some(file), _) => suanwang_agent::TokenSource::File(file.clone()),
        (None, Some(token)) => suanwang_agent::TokenSource::Value(token.clone()),
        (None, None) => bail!("no provider token: pass --token-file FILE (or set SUANWANG_AGENT_TOKEN)"),
    };
    // The token must not linger where a child could find it.
    // SAFETY: single-threaded here, before the agent starts any thread.
    unsafe {
        std::env::remove_var("SUANWANG_AGENT_TOKEN");
        std::env::remove_var("SUANWANG_TOKEN");
    }
    let site = args.site.clone();
    suanwang_agent::run(suanwang_agent::AgentConfig {
        server: args.server,
        token,
        site: args.site,
        workdir: args.workdir,
        poll_wait_s: 20,
        unsandboxed: args.unsandboxed,
        defaults: suanwang_agent::sandbox::Defaults {
            memory_mb_per_gpu: args.memory_mb_per_gpu,
            cpus_per_gpu: args.cpus_per_gpu,
            pids_max: args.pids_max,
            host_network: args.job_host_network,
        },
        retention_s: args.retention_s,
        containers: match args.containers {
            ContainersArg::Auto => suanwang_agent::sandbox::Containers::Auto,
            ContainersArg::Yes => suanwang_agent::sandbox::Containers::Required,
            ContainersArg::No => suanwang_agent::sandbox::Containers::Off,
        },
        slurm,
    })
    .map_err(|e| match e {
        // A set-up that cannot work: the exit code tells `up` not to restart it.
        suanwang_agent::AgentError::Config(why) => {
            anyhow::Error::new(AgentSetupError(format!("agent of {site}: {why}")))
        }
        e => anyhow!("agent of {site}: {e}"),
    })?;
    Ok(())
}

/// An agent's set-up can never work as given (another site's token, a
/// GRES type or partition the cluster lacks): `main` exits with
/// [`AgentSetupError::EXIT`], and `up` does not restart such an agent.
#[derive(Debug)]
pub struct AgentSetupError(pub String);

impl AgentSetupError {
    /// `EX_CONFIG` of sysexits.h.
    pub const EXIT: u8 = 78;
}

impl std::fmt::Display for AgentSetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AgentSetupError {}

pub fn admin(args: AdminArgs) -> anyhow::Result<()> {
    match args.command {
        AdminCommand::Bootstrap { force } => println!("{}", suanwang_server::admin::bootstrap(&args.db, force)?),
        AdminCommand::Site { id, name, city, level, lat, lon, pue, green_share, provider, pools, links, topology } => {
            let level = serde_json::from_value(serde_json::Value::String(level.clone()))
                .map_err(|_| anyhow!("--level: must be hub, provincial, city, edge or cloud, got '{level}'"))?;
            let field = |text: &str, what: &str, index: usize| -> anyhow::Result<String> {
                text.split(':').nth(index).map(str::to_string).ok_or_else(|| anyhow!("{what} '{text}': too few parts"))
            };
            let mut pool_specs = Vec::new();
            for p in &pools {
                let count =
                    field(p, "--pool", 1)?.parse().map_err(|_| anyhow!("--pool '{p}': COUNT is not a number"))?;
                let price =
                    field(p, "--pool", 2)?.parse().map_err(|_| anyhow!("--pool '{p}': PRICE is not a number"))?;
                pool_specs.push(suanwang_core::topology::PoolSpec::new(&field(p, "--pool", 0)?, count, price));
            }
            let mut link_specs = Vec::new();
            for l in &links {
                let number = |i: usize| -> anyhow::Result<f64> {
                    field(l, "--link", i)?.parse().map_err(|_| anyhow!("--link '{l}': part {} is not a number", i + 1))
                };
                link_specs.push(suanwang_core::topology::LinkSpec::new(
                    &field(l, "--link", 0)?,
                    &id,
                    number(1)?,
                    number(2)?,
                    number(3)? as i64,
                ));
            }
            suanwang_server::validate::identifier("id", &id).map_err(|e| anyhow!("site id: {}", e.body.message))?;
            let site = suanwang_core::topology::SiteSpec {
                id: id.clone(),
                name: name.unwrap_or_else(|| id.clone()),
                city,
                level,
                lat,
                lon,
                pue,
                green_share,
                provider,
                elastic: false,
                pools: pool_specs,
            };
            let spec = suanwang_server::admin::add_site(&args.db, &topology, site, link_specs)?;
            println!(
                "site {id} added: the network '{}' of {} now has {} sites; restart the server to use it",
                spec.name,
                args.db.display(),
                spec.sites.len()
            );
        }
        AdminCommand::Org { id, kind, name, home } => {
            if let Some(home) = &home {
                let spec = match suanwang_server::admin::stored_network(&args.db)? {
                    Some(spec) => spec,
                    None => suanwang_topology::load_spec("shandong")?,
                };
                if !spec.sites.iter().any(|s| &s.id == home) {
                    bail!("--home: unknown site '{home}' in network '{}'", spec.name);
                }
            }
            suanwang_server::admin::add_org(&args.db, &id, &kind, &name, home.as_deref())?;
            println!("organisation {id} registered");
        }
        AdminCommand::Token { action: Some(TokenAction::List), .. } => {
            let tokens = suanwang_server::admin::list_tokens(&args.db)?;
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        format!("{:?}", t.role).to_lowercase(),
                        t.site.clone().or_else(|| t.org.clone()).unwrap_or_else(|| "-".into()),
                        t.label.clone(),
                        when(t.created_at),
                        t.expires_at.map_or("never".into(), when),
                        t.revoked_at.map_or("-".into(), when),
                    ]
                })
                .collect();
            print!("{}", table::render(&["id", "role", "site/org", "label", "created", "expires", "revoked"], &rows));
        }
        AdminCommand::Token { action: Some(TokenAction::Revoke { id }), .. } => {
            let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            let t = suanwang_server::admin::revoke_token(&args.db, &id)?;
            let whose = format!("{} {}", format!("{:?}", t.role).to_lowercase(), t.site.or(t.org).unwrap_or_default());
            match t.revoked_at {
                Some(at) if at < before => println!("token {} ({whose}) was already revoked {}", t.id, when(at)),
                _ => println!("token {} ({whose}) revoked", t.id),
            }
        }
        AdminCommand::Token { action: None, role, org, site, label, expires_in_s } => {
            let role = match (role.as_deref(), org, site) {
                (Some("operator"), None, None) => Role::Operator,
                (Some("provider"), None, Some(site)) => Role::Provider { site },
                (Some("consumer"), Some(org), None) => Role::Consumer { org },
                _ => bail!("--role: operator (no --org/--site), provider --site SITE, or consumer --org ORG"),
            };
            let (token, id) = suanwang_server::admin::create_token(&args.db, &role, &label, expires_in_s)?;
            eprintln!("token id {id} (for `token list` and `token revoke`); the token is shown once:");
            println!("{token}");
        }
    }
    Ok(())
}
