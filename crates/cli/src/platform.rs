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
use suanwang_api::{Balances, Bill, Job, JobEvent, JobList, JobRequest, Quote, Site};
use suanwang_server::auth::Role;
use suanwang_server::{ServerConfig, Timings};

use crate::table::{self, print};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The database file (jobs, tokens and the ledger).
    #[arg(long, env = "SUANWANG_DB", default_value = "suanwang.db")]
    pub db: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "shandong")]
    pub topology: String,
    #[arg(long, default_value = "network")]
    pub policy: String,
    /// Seconds without word from an agent after which its attempt is lost.
    #[arg(long, default_value_t = 30)]
    pub lease_s: i64,
    /// Seconds between an agent's heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_s: u64,
    /// Seconds without a poll after which a site is down and its jobs move.
    #[arg(long, default_value_t = 20)]
    pub site_timeout_s: i64,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Where the local agents run jobs.
    #[arg(long, default_value = "suanwang-work")]
    pub workdir: PathBuf,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long, env = "SUANWANG_SERVER")]
    pub server: String,
    /// The site this agent runs (its token is bound to it).
    #[arg(long)]
    pub site: String,
    #[arg(long, env = "SUANWANG_TOKEN")]
    pub token: String,
    /// Where jobs run: `local` (processes on this machine).
    #[arg(long, default_value = "local")]
    pub backend: String,
    #[arg(long, default_value = "suanwang-work")]
    pub workdir: PathBuf,
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
    /// Create a token: operator; provider --site; consumer --org.
    Token {
        #[arg(long)]
        role: String,
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long, default_value = "")]
        label: String,
    },
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
        let server = pick(&self.server, "SUANWANG_SERVER", file.server)
            .ok_or_else(|| anyhow!("no server: pass --server, set SUANWANG_SERVER or write it in the config file"))?;
        let token = pick(&self.token, "SUANWANG_TOKEN", file.token)
            .ok_or_else(|| anyhow!("no token: pass --token, set SUANWANG_TOKEN or write it in the config file"))?;
        Ok(Client::new(&server, &token))
    }
}

fn time(t: Option<i64>) -> String {
    t.map_or("-".into(), |t| t.to_string())
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
                j.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::render(&["id", "state", "org", "name", "site", "accelerators", "attempts", "billed fen", "reason"], &rows)
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Submit a job described in a TOML file.
    Submit {
        file: PathBuf,
    },
    /// Where and for how much a job would run: ranked sites, explanation, voucher share.
    Quote {
        file: PathBuf,
    },
    /// List jobs.
    Jobs {
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One job, with its events.
    Job {
        id: u64,
    },
    /// A job's output.
    Logs {
        id: u64,
        /// Follow the output while the job runs.
        #[arg(short, long)]
        follow: bool,
    },
    Cancel {
        id: u64,
    },
    /// Why a job is waiting: every site, filtered with a reason or scored.
    Why {
        id: u64,
    },
    Sites,
    /// Wallet and voucher balances.
    Vouchers {
        #[arg(long)]
        org: Option<String>,
    },
    /// Settled jobs and what they cost.
    Bill {
        #[arg(long)]
        org: Option<String>,
    },
}

fn read_job_file(path: &Path) -> anyhow::Result<JobRequest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.message()))
}

pub fn client(connection: &Connection, command: ClientCommand) -> anyhow::Result<()> {
    let c = connection.client()?;
    let json = connection.json;
    match command {
        ClientCommand::Submit { file } => {
            let job: Job = c.post("/v1/jobs", &read_job_file(&file)?)?;
            print(json, &job, || format!("submitted job {} ({})\n", job.id, job.state.as_str()))
        }
        ClientCommand::Quote { file } => {
            let q: Quote = c.post("/v1/quote", &read_job_file(&file)?)?;
            print(json, &q, || {
                let mut rows = Vec::new();
                for s in q.explanation["sites"].as_array().into_iter().flatten() {
                    let site = s["site"].as_str().unwrap_or_default().to_string();
                    if s["verdict"] == "scored" {
                        let e = &s["estimate"];
                        rows.push(vec![
                            site,
                            s["score"].to_string(),
                            s["accelerator"].as_str().unwrap_or_default().into(),
                            e["wait_s"].to_string(),
                            e["transfer_s"].to_string(),
                            e["run_s"].to_string(),
                            (e["compute_cost_fen"].as_i64().unwrap_or(0)
                                + e["transfer_cost_fen"].as_i64().unwrap_or(0))
                            .to_string(),
                            e["carbon_g"].to_string(),
                        ]);
                    } else {
                        rows.push(vec![
                            site,
                            "-".into(),
                            format!("filtered: {}", s["filter"].as_str().unwrap_or_default()),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                        ]);
                    }
                }
                let mut out = table::render(
                    &["site", "score", "accelerator", "wait s", "transfer s", "run s", "cost fen", "CO2 g"],
                    &rows,
                );
                if let Some(bill) = &q.bill {
                    out.push_str(&format!(
                        "\nat {}: compute {} fen, voucher pays {} fen, you pay {} fen\n",
                        q.best_site.clone().unwrap_or_default(),
                        bill["compute_fen"],
                        bill["subsidy_fen"],
                        bill["org_total_fen"]
                    ));
                }
                out
            })
        }
        ClientCommand::Jobs { state, limit } => {
            let mut path = format!("/v1/jobs?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            let list: JobList = c.get(&path)?;
            print(json, &list, || jobs_table(&list.jobs))
        }
        ClientCommand::Job { id } => {
            let job: Job = c.get(&format!("/v1/jobs/{id}"))?;
            let events: Vec<JobEvent> = c.get(&format!("/v1/jobs/{id}/events"))?;
            print(json, &serde_json::json!({"job": job, "events": events}), || {
                let mut out = jobs_table(std::slice::from_ref(&job));
                out.push_str(&format!(
                    "submitted {}, started {}, finished {}, exit code {}\n",
                    job.submitted_at,
                    time(job.started_at),
                    time(job.finished_at),
                    job.exit_code.map_or("-".into(), |c| c.to_string())
                ));
                let rows: Vec<Vec<String>> =
                    events.iter().map(|e| vec![e.at.to_string(), e.kind.clone(), e.detail.clone()]).collect();
                out.push('\n');
                out.push_str(&table::render(&["at", "event", "detail"], &rows));
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
            print(json, &e, || {
                let rows: Vec<Vec<String>> = e["sites"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        let verdict = if s["verdict"] == "scored" {
                            format!(
                                "score {} on {}: wait {} s, run {} s, {} fen",
                                s["score"],
                                s["accelerator"].as_str().unwrap_or_default(),
                                s["estimate"]["wait_s"],
                                s["estimate"]["run_s"],
                                s["estimate"]["compute_cost_fen"]
                            )
                        } else {
                            let mut f = s.clone();
                            if let Some(o) = f.as_object_mut() {
                                o.remove("site");
                                o.remove("site_id");
                                o.remove("verdict");
                            }
                            format!("filtered: {f}")
                        };
                        vec![s["site"].as_str().unwrap_or_default().to_string(), verdict]
                    })
                    .collect();
                table::render(&["site", "verdict"], &rows)
            })
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
                            .map(|p| format!("{}/{} {}", p.free, p.count, p.accelerator))
                            .collect::<Vec<_>>()
                            .join(", ");
                        vec![
                            s.id.clone(),
                            s.level.clone(),
                            s.city.clone(),
                            if s.up { "up".into() } else { "down".into() },
                            pools,
                        ]
                    })
                    .collect();
                table::render(&["site", "level", "city", "agent", "free/total"], &rows)
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
                    .jobs
                    .iter()
                    .map(|l| {
                        vec![
                            l.job.to_string(),
                            l.site.clone(),
                            l.accelerator.clone(),
                            l.accel_seconds.to_string(),
                            l.compute_fen.to_string(),
                            l.subsidy_fen.to_string(),
                            l.org_fen.to_string(),
                        ]
                    })
                    .collect();
                rows.push(vec![
                    "total".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    b.compute_fen.to_string(),
                    b.subsidy_fen.to_string(),
                    b.org_fen.to_string(),
                ]);
                table::render(
                    &["job", "site", "accelerator", "accel s", "compute fen", "voucher fen", "you pay fen"],
                    &rows,
                )
            })
        }
    }
}

fn server_config(args: &ServeArgs) -> ServerConfig {
    ServerConfig {
        db: args.db.clone(),
        topology: args.topology.clone(),
        listen: args.listen,
        policy: args.policy.clone(),
        timings: Timings::default(),
    }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    suanwang_core::policy::by_name(&args.policy).map_err(|e| anyhow!("--policy: {e}"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(suanwang_server::serve(server_config(&args), Some(tx)));
        if let Ok(address) = rx.await {
            eprintln!("suanwang serving on http://{address} (database {})", args.db.display());
        }
        server.await?.map_err(anyhow::Error::from)
    })
}

/// Kills the local agents when `up` ends.
struct Agents(Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let db = &args.serve.db;
    let topology = suanwang_topology::load(&args.serve.topology)?;
    let operator = match suanwang_server::admin::bootstrap(db, false) {
        Ok(token) => Some(token),
        Err(suanwang_server::admin::AdminError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    // A demo organisation with money, so a job can be submitted at once.
    // Both steps are idempotent: running `up` again changes nothing.
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
            suanwang_ledger::TransferId::derive("up:demo-deposit"),
            "demo",
            1_000_000,
        )?;
    }
    let demo = suanwang_server::admin::create_token(db, &Role::Consumer { org: "demo".into() }, "suanwang up demo")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(suanwang_server::serve(server_config(&args.serve), Some(tx)));
        let address = rx.await.map_err(|_| anyhow!("server did not start"))?;
        let url = format!("http://{address}");
        let exe = std::env::current_exe()?;
        let mut agents = Agents(Vec::new());
        for site in &topology.sites {
            let token =
                suanwang_server::admin::create_token(db, &Role::Provider { site: site.key.clone() }, "suanwang up")?;
            let child = std::process::Command::new(&exe)
                .args(["agent", "--server", &url, "--site", &site.key, "--backend", "local", "--workdir"])
                .arg(args.workdir.join(&site.key))
                .env("SUANWANG_TOKEN", token)
                .spawn()
                .with_context(|| format!("starting the agent of {}", site.key))?;
            agents.0.push(child);
        }
        println!(
            "suanwang is up at {url}: server, database {}, {} local agents (one per site of {}).",
            db.display(),
            agents.0.len(),
            topology.name
        );
        match &operator {
            Some(token) => println!("operator token (shown once): {token}"),
            None => println!(
                "an operator token exists already; make another with: suanwang admin --db {} bootstrap --force",
                db.display()
            ),
        }
        println!("a token of the demo organisation (10,000 yuan in its wallet):");
        println!("  export SUANWANG_SERVER={url} SUANWANG_TOKEN={demo}");
        println!("  suanwang quote examples/job.toml; suanwang submit examples/job.toml; suanwang jobs; suanwang logs -f 1");
        println!("more organisations and tokens: suanwang admin --db {} org ID --kind enterprise|university|institute; suanwang admin --db {} token --role consumer --org ID", db.display(), db.display());
        let outcome = server.await;
        drop(agents);
        outcome?.map_err(anyhow::Error::from)
    })
}

pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    if args.backend != "local" {
        bail!("--backend: '{}' is not available here (available: local)", args.backend);
    }
    let _ = &args.site;
    suanwang_agent::run(suanwang_agent::AgentConfig {
        server: args.server,
        token: args.token,
        workdir: args.workdir,
        poll_wait_s: 20,
    })?;
    Ok(())
}

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
        AdminCommand::Token { role, org, site, label } => {
            let role = match (role.as_str(), org, site) {
                ("operator", None, None) => Role::Operator,
                ("provider", None, Some(site)) => Role::Provider { site },
                ("consumer", Some(org), None) => Role::Consumer { org },
                _ => bail!("--role: operator (no --org/--site), provider --site SITE, or consumer --org ORG"),
            };
            println!("{}", suanwang_server::admin::create_token(&args.db, &role, &label)?);
        }
    }
    Ok(())
}
