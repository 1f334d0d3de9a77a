//! `suanwang ledger`: the voucher ledger from the command line.
//!
//! Every command works on one database file (`--db`, or `SUANWANG_DB`).
//! Time is `--now` (unix seconds or `YYYY-MM-DD`), else the system clock:
//! the library never reads a clock, the command line does.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use suanwang_ledger::audit;
use suanwang_ledger::voucher::{self, OrgKind, Placement, ProgrammeSpec, Usage};
use suanwang_ledger::{AccountId, LedgerError, TransferId};

use crate::table::{self, print};

#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// The ledger database file.
    #[arg(long, env = "SUANWANG_DB", default_value = "suanwang.db", global = true)]
    pub db: PathBuf,
    /// The time of the operation: unix seconds or YYYY-MM-DD (China time). Default: now.
    #[arg(long, global = true)]
    pub now: Option<String>,
    #[command(subcommand)]
    pub command: LedgerCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Create the database, its tables and system accounts (idempotent).
    Init,
    /// Register an organisation (enterprise, university or institute) and its wallet.
    Org {
        id: String,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Create a voucher programme (`programme create`), or change its
    /// budget (`programme fund`, `programme defund`).
    #[command(subcommand)]
    Programme(ProgrammeAction),
    /// List programmes.
    Programmes,
    /// Put an organisation's own money in its wallet.
    Deposit {
        org: String,
        amount_fen: i64,
        /// Client-chosen transfer id (hex): repeating it is safe.
        #[arg(long)]
        id: String,
    },
    /// Grant vouchers of a programme to an organisation.
    Grant {
        programme: String,
        org: String,
        amount_fen: i64,
        #[arg(long)]
        id: String,
    },
    /// Sell a compute card: prepaid accelerator-hours of one type.
    Card {
        org: String,
        /// An accelerator type of the network (`--topology`).
        #[arg(long)]
        accel: String,
        #[arg(long)]
        hours: i64,
        #[arg(long)]
        price_fen: i64,
        #[arg(long)]
        id: String,
        /// The network whose accelerator types cards may be sold for.
        #[arg(long, default_value = "shandong")]
        topology: String,
    },
    /// What the voucher would pay for a job and what the organisation pays.
    Quote {
        org: String,
        #[command(flatten)]
        job: JobPlacement,
    },
    /// Hold a job's bill at admission.
    Hold {
        job: String,
        org: String,
        #[command(flatten)]
        placement: JobPlacement,
        /// Seconds before the hold expires on its own.
        #[arg(long, default_value_t = 7 * 86_400)]
        timeout_s: i64,
    },
    /// Settle a held job with its actual usage.
    Settle {
        job: String,
        #[arg(long)]
        accel_seconds: i64,
        #[arg(long, default_value_t = 0)]
        transfer_fen: i64,
    },
    /// Release a held job's bill (cancel, provider fault).
    Release { job: String },
    /// Refund a settled job: each part of its bill back where it came from
    /// (subsidy to the voucher, the organisation's share and fee to its wallet, card seconds to its card).
    Refund {
        job: String,
        /// Why (kept in the journal with the transfers).
        #[arg(long)]
        reason: String,
    },
    /// Expire stale holds and return expired vouchers to their programmes.
    Sweep,
    /// Accounts and their balances.
    Accounts,
    /// An operator's correction: a transfer between two accounts of
    /// permitted kinds (bank, wallet, revenue, card sales), with a reason.
    Transfer {
        /// Client-chosen transfer id (hex): repeating it is safe.
        #[arg(long)]
        id: String,
        /// The account debited: by name (`bank`, `wallet:ORG`,
        /// `revenue:PROVIDER`, `card-sales`) or by id (32 hex digits, as `accounts` prints).
        #[arg(long)]
        debit: String,
        /// The account credited, named the same way.
        #[arg(long)]
        credit: String,
        /// Fen.
        #[arg(long)]
        amount: i64,
        /// Why: kept in the journal with the transfer.
        #[arg(long)]
        reason: String,
    },
    /// A provider's settlement statement (write-off) for [from, to).
    Statement {
        provider: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_enum, default_value_t = ExportFormat::Table)]
        format: ExportFormat,
    },
    /// Per-programme spend report.
    Report {
        #[arg(long, value_enum, default_value_t = ExportFormat::Table)]
        format: ExportFormat,
    },
    /// Replay the whole journal and check every balance and rule.
    Verify {
        /// The database to verify (default: --db).
        #[arg(value_name = "DB")]
        file: Option<PathBuf>,
        /// A head kept from an earlier verify (`SEQ:HASH`, as it prints):
        /// the book must still contain exactly that entry.
        #[arg(long, value_name = "SEQ:HASH", conflicts_with = "anchor")]
        expect_head: Option<suanwang_ledger::Anchor>,
        /// A signed checkpoint kept from `ledger checkpoint` or the server:
        /// its signature must verify with --public-key and the book must
        /// still contain its head.
        #[arg(long, value_name = "FILE", requires = "public_key")]
        anchor: Option<PathBuf>,
        /// The operator's public key (hex, as `ledger keygen` printed it)
        /// the checkpoint must be signed with: a checkpoint anyone could
        /// sign proves nothing.
        #[arg(long, value_name = "HEX", requires = "anchor")]
        public_key: Option<String>,
    },
    /// Declare an organisation and a provider related parties (a subsidiary,
    /// a shareholder): vouchers never pay for the one's work at the other's sites.
    Relate {
        org: String,
        provider: String,
        /// Why they are related (kept).
        #[arg(long)]
        why: String,
    },
    /// Make an operator's signing key for checkpoints (secret in FILE, mode 0600; prints the public key).
    Keygen {
        /// Where the secret key goes (a new file, never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Verify the book and sign its head with the operator's key: a checkpoint for an auditor to keep.
    Checkpoint {
        /// The operator's secret key (from `ledger keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Write the checkpoint here (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The previous checkpoint of this book: the new one is signed only
        /// if the book still extends it (nothing rewritten since).
        #[arg(long, value_name = "FILE")]
        after: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProgrammeAction {
    /// Create a voucher programme and fund it with its budget from the treasury.
    Create(ProgrammeArgs),
    /// Add to a programme's budget from the treasury (journaled with its reason).
    Fund(BudgetChange),
    /// Take part of a programme's budget back to the treasury: at most what
    /// is neither granted nor held (journaled with its reason).
    Defund(BudgetChange),
}

/// A change of a programme's budget.
#[derive(Debug, Args)]
pub struct BudgetChange {
    pub programme: String,
    pub amount_fen: i64,
    /// Client-chosen transfer id (hex): repeating it is safe.
    #[arg(long)]
    pub id: String,
    /// Why (kept in the journal with the transfer).
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct ProgrammeArgs {
    #[arg(long)]
    pub id: String,
    #[arg(long, default_value = "")]
    pub name: String,
    /// Who issues the programme (an id, e.g. a city's data bureau): an
    /// organisation's yearly cap counts across the issuer's programmes.
    #[arg(long)]
    pub issuer: String,
    /// Count the yearly cap across the issuer's programmes (`issuer`) or in this programme only.
    #[arg(long, default_value = "issuer")]
    pub cap_per: String,
    #[arg(long)]
    pub budget_fen: i64,
    #[arg(long)]
    pub from: String,
    #[arg(long)]
    pub until: String,
    /// Eligible organisation kinds, comma-separated.
    #[arg(long, default_value = "enterprise,university,institute")]
    pub kinds: String,
    /// Eligible sites, comma-separated (default: all).
    #[arg(long, default_value = "")]
    pub sites: String,
    /// Eligible accelerator types, comma-separated (default: all).
    #[arg(long, default_value = "")]
    pub accels: String,
    /// The network the sites and accelerator types must belong to.
    #[arg(long, default_value = "shandong")]
    pub topology: String,
    #[arg(long, default_value_t = 3_000)]
    pub rate_bp: i64,
    #[arg(long, default_value_t = 2_000)]
    pub foreign_rate_bp: i64,
    #[arg(long)]
    pub org_year_cap_fen: i64,
    #[arg(long)]
    pub job_cap_fen: i64,
}

#[derive(Debug, Args)]
pub struct JobPlacement {
    #[arg(long)]
    pub site: String,
    #[arg(long)]
    pub accel: String,
    #[arg(long)]
    pub accel_seconds: i64,
    #[arg(long, default_value_t = 0)]
    pub transfer_fen: i64,
    /// The topology that gives the site's provider and price.
    #[arg(long, default_value = "shandong")]
    pub topology: String,
}

fn parse_time(text: &str) -> anyhow::Result<i64> {
    use suanwang_ledger::model::{EARLIEST_TIME, LATEST_TIME};
    let seconds = match text.trim().parse::<i64>() {
        Ok(seconds) => seconds,
        Err(_) => voucher::date_to_unix(text).map_err(|e| anyhow!("[invalid_time] {e}"))?,
    };
    if !(EARLIEST_TIME..=LATEST_TIME).contains(&seconds) {
        bail!(
            "[invalid_time] {text} is outside the times the ledger keeps (unix seconds {EARLIEST_TIME} to {LATEST_TIME}, 2000-01-01 to 9999-12-31)"
        );
    }
    Ok(seconds)
}

fn now(args: &LedgerArgs) -> anyhow::Result<i64> {
    match &args.now {
        Some(text) => parse_time(text).context("--now"),
        None => Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64),
    }
}

/// Refuses accelerator types the network does not have (a typo would sell
/// a card, or make a programme, nobody can ever use).
fn known_accelerators(topology: &str, flag: &str, types: &[String]) -> anyhow::Result<()> {
    let network = suanwang_topology::load(topology)?;
    if let Some(bad) = types.iter().find(|t| network.accelerator_id(t).is_none()) {
        bail!(
            "[unknown_accelerator] {flag}: '{bad}' is not an accelerator type of the network {} (types: {})",
            network.name,
            network.accelerators.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

fn transfer_id(text: &str) -> anyhow::Result<TransferId> {
    text.parse().map_err(|e: String| anyhow!("[invalid_argument] --id: {e}"))
}

/// An account by hex id or by voucher name (`wallet:ORG`, `voucher:PROGRAMME:ORG`, ...).
fn account_id(text: &str) -> anyhow::Result<AccountId> {
    if text.contains(':') || !text.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(AccountId::derive(text));
    }
    text.parse().map_err(|e: String| anyhow!(e))
}

fn placement(job: &JobPlacement) -> anyhow::Result<(Placement, Usage)> {
    let topology = suanwang_topology::load(&job.topology)?;
    let site_id = topology
        .site_id(&job.site)
        .ok_or_else(|| anyhow!("[unknown_site] --site: no site '{}' in topology {}", job.site, topology.name))?;
    let site = topology.site(site_id);
    let accel_id = topology
        .accelerator_id(&job.accel)
        .ok_or_else(|| anyhow!("[unknown_accelerator] --accel: unknown accelerator type '{}'", job.accel))?;
    let pool = site
        .pools
        .iter()
        .map(|&p| topology.pool(p))
        .find(|p| p.accel == accel_id)
        .ok_or_else(|| anyhow!("[unknown_accelerator] --accel: site '{}' has no {} pool", job.site, job.accel))?;
    Ok((
        Placement {
            site: site.key.clone(),
            provider: site.provider.clone(),
            accel: job.accel.clone(),
            domestic: topology.accelerator(accel_id).domestic,
            price_fen_per_hour: pool.price_fen_per_hour,
        },
        Usage { accel_seconds: job.accel_seconds, transfer_fen: job.transfer_fen },
    ))
}

fn export<T: Serialize>(format: ExportFormat, rows: &[T], table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match format {
        ExportFormat::Table => print!("{}", table()),
        ExportFormat::Csv => print!("{}", audit::to_csv(rows)?),
        ExportFormat::Json => println!("{}", serde_json::to_string(rows)?),
    }
    Ok(())
}

fn list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// A refusal becomes `[code] message`, so scripts can match the code.
fn refused(e: LedgerError) -> anyhow::Error {
    anyhow!("[{}] {e}", e.code())
}

fn bill_text(bill: &voucher::Bill) -> String {
    let mut out = table::render(
        &[
            "compute fen",
            "card s",
            "voucher fen",
            "org compute fen",
            "transfer fen",
            "org total fen",
            "programme",
            "rate bp",
        ],
        &[vec![
            bill.compute_fen.to_string(),
            bill.card_seconds.to_string(),
            bill.subsidy_fen.to_string(),
            bill.org_compute_fen.to_string(),
            bill.transfer_fen.to_string(),
            bill.org_total_fen.to_string(),
            bill.programme.clone().unwrap_or_else(|| "-".into()),
            bill.rate_bp.to_string(),
        ]],
    );
    for note in &bill.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

fn budget_changed(json: bool, programme: voucher::Programme, what: &str) -> anyhow::Result<()> {
    print(json, &programme, || {
        format!(
            "programme {} {what}: budget {} fen (funded {}, defunded {})\n",
            programme.spec.id,
            programme.budget_fen(),
            programme.funded_fen,
            programme.defunded_fen
        )
    })
}

pub fn run(args: LedgerArgs, json: bool) -> anyhow::Result<()> {
    if let LedgerCommand::Keygen { out } = &args.command {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (secret, public) = suanwang_ledger::checkpoint::keygen()?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .with_context(|| format!("--out {} (an existing key is never overwritten)", out.display()))?;
        writeln!(file, "{}", secret.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
        println!("{public}");
        eprintln!("secret key in {} (keep it private); the public key above is for auditors", out.display());
        return Ok(());
    }
    if let LedgerCommand::Checkpoint { key, out, after } = &args.command {
        let text = std::fs::read_to_string(key).with_context(|| format!("--key {}", key.display()))?;
        let secret = suanwang_ledger::checkpoint::parse_secret(&text).map_err(|e| anyhow!("--key: {e}"))?;
        let after = match after {
            None => None,
            Some(file) => {
                let text = std::fs::read_to_string(file).with_context(|| format!("--after {}", file.display()))?;
                let previous: suanwang_ledger::checkpoint::Checkpoint = serde_json::from_str(&text)
                    .map_err(|e| anyhow!("[bad_checkpoint] --after {}: not a checkpoint: {e}", file.display()))?;
                let own = suanwang_ledger::checkpoint::public_key(&secret);
                Some(
                    suanwang_ledger::checkpoint::check(&previous, Some(&own))
                        .map_err(|e| anyhow!("[bad_checkpoint] --after {}: {e}", file.display()))?,
                )
            }
        };
        let checkpoint =
            suanwang_ledger::checkpoint::verify_and_sign(&args.db, &secret, now(&args)?, after).map_err(refused)?;
        let json_text = serde_json::to_string_pretty(&checkpoint)?;
        match out {
            Some(path) => {
                std::fs::write(path, format!("{json_text}\n")).with_context(|| format!("--out {}", path.display()))?;
                println!("checkpoint of head {}:{} written to {}", checkpoint.seq, checkpoint.head, path.display());
            }
            None => println!("{json_text}"),
        }
        return Ok(());
    }
    if let LedgerCommand::Verify { file, expect_head, anchor, public_key } = &args.command {
        let path = file.clone().unwrap_or_else(|| args.db.clone());
        let expected = match anchor {
            Some(file) => {
                let text = std::fs::read_to_string(file).with_context(|| format!("--anchor {}", file.display()))?;
                let checkpoint: suanwang_ledger::checkpoint::Checkpoint = serde_json::from_str(&text)
                    .map_err(|e| anyhow!("--anchor {}: not a checkpoint: {e}", file.display()))?;
                Some(
                    suanwang_ledger::checkpoint::check(&checkpoint, public_key.as_deref())
                        .map_err(|e| anyhow!("[bad_checkpoint] --anchor {}: {e}", file.display()))?,
                )
            }
            None => *expect_head,
        };
        let (report, problems) = voucher::verify_file(&path, expected).map_err(refused)?;
        if !problems.is_empty() {
            bail!("{}: voucher rules broken:\n{}", path.display(), problems.join("\n"));
        }
        return print(json, &report, || {
            let totals: Vec<String> = report
                .totals
                .iter()
                .map(|(u, posted, pending)| format!("{u}: {posted} posted, {pending} pending"))
                .collect();
            format!(
                "{}: ok: {} journal entries, {} accounts, {} transfers, {} holds open, {} row changes; debits equal credits ({})\nhead {}:{}{}\n",
                path.display(),
                report.journal_entries,
                report.accounts,
                report.transfers,
                report.open_pending,
                report.row_changes,
                totals.join("; "),
                report.journal_entries,
                report.head,
                match expected {
                    Some(a) => format!(" (extends the expected head {})", a.seq),
                    None => String::new(),
                }
            )
        });
    }
    let now = now(&args)?;
    let mut ledger =
        voucher::open(&args.db, now).map_err(refused).with_context(|| format!("--db {}", args.db.display()))?;
    let l = &mut ledger;
    let ok = |what: String| print(json, &serde_json::json!({"ok": true, "what": what.clone()}), || format!("{what}\n"));
    match args.command {
        LedgerCommand::Init => ok(format!("ledger ready in {}", args.db.display())),
        LedgerCommand::Org { id, kind, name } => {
            let kind: OrgKind = kind.parse().map_err(|e| anyhow!("[invalid_argument] --kind: {e}"))?;
            voucher::add_org(l, now, &id, kind, &name).map_err(refused)?;
            ok(format!("organisation {id} registered"))
        }
        LedgerCommand::Programme(ProgrammeAction::Fund(c)) => {
            let programme = voucher::fund_programme(l, now, transfer_id(&c.id)?, &c.programme, c.amount_fen, &c.reason);
            budget_changed(json, programme.map_err(refused)?, "funded")
        }
        LedgerCommand::Programme(ProgrammeAction::Defund(c)) => {
            let programme =
                voucher::defund_programme(l, now, transfer_id(&c.id)?, &c.programme, c.amount_fen, &c.reason);
            budget_changed(json, programme.map_err(refused)?, "defunded")
        }
        LedgerCommand::Programme(ProgrammeAction::Create(p)) => {
            let cap_per: voucher::CapScope =
                p.cap_per.parse().map_err(|e| anyhow!("[invalid_argument] --cap-per: {e}"))?;
            known_accelerators(&p.topology, "--accels", &list(&p.accels))?;
            let network = suanwang_topology::load(&p.topology)?;
            if let Some(bad) = list(&p.sites).iter().find(|s| network.site_id(s).is_none()) {
                bail!("[unknown_site] --sites: no site '{bad}' in the network {}", network.name);
            }
            let kinds = list(&p.kinds)
                .iter()
                .map(|k| k.parse::<OrgKind>().map_err(|e| anyhow!("[invalid_argument] --kinds: {e}")))
                .collect::<anyhow::Result<_>>()?;
            let spec = ProgrammeSpec {
                id: p.id.clone(),
                name: p.name,
                issuer: p.issuer,
                cap_per,
                budget_fen: p.budget_fen,
                valid_from: parse_time(&p.from).context("--from")?,
                valid_until: parse_time(&p.until).context("--until")?,
                kinds,
                sites: list(&p.sites),
                accels: list(&p.accels),
                rate_bp: p.rate_bp,
                foreign_rate_bp: p.foreign_rate_bp,
                org_year_cap_fen: p.org_year_cap_fen,
                job_cap_fen: p.job_cap_fen,
            };
            voucher::create_programme(l, now, &spec).map_err(refused)?;
            ok(format!("programme {} created with {} fen", spec.id, spec.budget_fen))
        }
        LedgerCommand::Programmes => {
            let all = voucher::programmes(l).map_err(refused)?;
            print(json, &all, || {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|p| {
                        vec![
                            p.spec.id.clone(),
                            p.spec.issuer.clone(),
                            p.budget_fen().to_string(),
                            p.spec.rate_bp.to_string(),
                            p.spec.foreign_rate_bp.to_string(),
                            p.spec.org_year_cap_fen.to_string(),
                            format!("{:?}", p.spec.cap_per).to_lowercase(),
                            p.spec.job_cap_fen.to_string(),
                        ]
                    })
                    .collect();
                table::render(
                    &[
                        "programme",
                        "issuer",
                        "budget fen",
                        "rate bp",
                        "foreign bp",
                        "org/year cap",
                        "cap per",
                        "job cap",
                    ],
                    &rows,
                )
            })
        }
        LedgerCommand::Deposit { org, amount_fen, id } => {
            voucher::deposit(l, now, transfer_id(&id)?, &org, amount_fen).map_err(refused)?;
            ok(format!("{amount_fen} fen deposited for {org}"))
        }
        LedgerCommand::Grant { programme, org, amount_fen, id } => {
            voucher::grant(l, now, transfer_id(&id)?, &programme, &org, amount_fen).map_err(refused)?;
            ok(format!("{amount_fen} fen of {programme} granted to {org}"))
        }
        LedgerCommand::Card { org, accel, hours, price_fen, id, topology } => {
            known_accelerators(&topology, "--accel", std::slice::from_ref(&accel))?;
            let seconds = hours.checked_mul(3600).ok_or_else(|| anyhow!("[invalid_argument] --hours: too large"))?;
            voucher::buy_card(l, now, transfer_id(&id)?, &org, &accel, seconds, price_fen).map_err(refused)?;
            ok(format!("card of {hours} {accel}-hours sold to {org}"))
        }
        LedgerCommand::Quote { org, job } => {
            let (placement, usage) = placement(&job)?;
            let bill = voucher::quote(l, now, &org, &placement, &usage).map_err(refused)?;
            print(json, &bill, || bill_text(&bill))
        }
        LedgerCommand::Hold { job, org, placement: p, timeout_s } => {
            let (placement, usage) = placement(&p)?;
            let hold = voucher::hold(l, now, &job, &org, &placement, &usage, timeout_s).map_err(refused)?;
            print(json, &hold, || bill_text(&hold.bill))
        }
        LedgerCommand::Settle { job, accel_seconds, transfer_fen } => {
            let s = voucher::settle(l, now, &job, &Usage { accel_seconds, transfer_fen }).map_err(refused)?;
            print(json, &s, || {
                let mut out = bill_text(&s.bill);
                if s.unbilled_fen > 0 {
                    out.push_str(&format!(
                        "note: [unbilled] {} fen of the usage beyond what was held is not billed (neither the voucher nor the organisation pays it)\n",
                        s.unbilled_fen
                    ));
                }
                out
            })
        }
        LedgerCommand::Release { job } => {
            voucher::release(l, now, &job).map_err(refused)?;
            ok(format!("job {job} released"))
        }
        LedgerCommand::Refund { job, reason } => {
            let s = voucher::refund(l, now, &job, &reason).map_err(refused)?;
            print(json, &s, || {
                format!(
                    "job {job} refunded: {} fen to the voucher, {} fen to {}'s wallet, {} card seconds back\n",
                    s.bill.subsidy_fen, s.bill.org_total_fen, s.bill.org, s.bill.card_seconds
                )
            })
        }
        LedgerCommand::Relate { org, provider, why } => {
            voucher::relate(l, now, &org, &provider, &why).map_err(refused)?;
            ok(format!("{org} and {provider} are related parties: no voucher pays between them"))
        }
        LedgerCommand::Sweep => {
            let report = voucher::sweep(l, now).map_err(refused)?;
            print(json, &report, || {
                let mut out = match report.holds_expired.len() {
                    0 => "0 holds expired\n".to_string(),
                    n => format!("{n} holds expired: {}\n", report.holds_expired.join(", ")),
                };
                for (p, org, fen) in &report.returned {
                    out.push_str(&format!("{fen} fen of {p} returned from {org}\n"));
                }
                out
            })
        }
        LedgerCommand::Accounts => {
            let accounts = l.accounts();
            print(json, &accounts, || {
                let rows: Vec<Vec<String>> = accounts
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.to_string(),
                            a.kind.clone(),
                            a.owner.clone(),
                            a.unit.to_string(),
                            a.balance().to_string(),
                            a.debits_pending.to_string(),
                            a.available().to_string(),
                        ]
                    })
                    .collect();
                table::render(&["id", "kind", "owner", "unit", "balance", "held", "available"], &rows)
            })
        }
        LedgerCommand::Transfer { id, debit, credit, amount, reason } => {
            let done = voucher::correction(
                l,
                now,
                transfer_id(&id)?,
                account_id(&debit)?,
                account_id(&credit)?,
                amount,
                &reason,
            )
            .map_err(|e| match e {
                // Say the name the operator typed, not its hash.
                LedgerError::Refused(suanwang_ledger::Refusal::DebitAccountNotFound(_)) => {
                    anyhow!("[debit_account_not_found] --debit: no account '{debit}' (see `ledger accounts`)")
                }
                LedgerError::Refused(suanwang_ledger::Refusal::CreditAccountNotFound(_)) => {
                    anyhow!("[credit_account_not_found] --credit: no account '{credit}' (see `ledger accounts`)")
                }
                e => refused(e),
            })?;
            print(json, &done, || format!("correction {} of {} {} done\n", done.id, done.amount, done.unit))
        }
        LedgerCommand::Statement { provider, from, to, format } => {
            let (from, to) = (parse_time(&from).context("--from")?, parse_time(&to).context("--to")?);
            if from >= to {
                bail!("[invalid_time] --from must be before --to (the statement covers [from, to))");
            }
            let st = audit::statement(l, &provider, from, to).map_err(refused)?;
            let mut rows = st.lines.clone();
            rows.push(st.total.clone());
            export(format, &rows, || {
                let body: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.job.clone(),
                            r.org.clone(),
                            r.site.clone(),
                            r.accel.clone(),
                            r.accel_seconds.to_string(),
                            r.card_seconds.to_string(),
                            r.compute_fen.to_string(),
                            r.voucher_fen.to_string(),
                            r.org_fen.to_string(),
                            r.transfer_fen.to_string(),
                            r.unbilled_fen.to_string(),
                        ]
                    })
                    .collect();
                table::render(
                    &[
                        "job",
                        "org",
                        "site",
                        "accel",
                        "accel s",
                        "card s",
                        "compute fen",
                        "voucher fen",
                        "org fen",
                        "transfer fen",
                        "unbilled fen",
                    ],
                    &body,
                )
            })
        }
        LedgerCommand::Report { format } => {
            let rows = audit::programme_spend(l).map_err(refused)?;
            export(format, &rows, || {
                let body: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.programme.clone(),
                            r.funded_fen.to_string(),
                            r.defunded_fen.to_string(),
                            r.budget_fen.to_string(),
                            r.granted_fen.to_string(),
                            r.returned_fen.to_string(),
                            r.spent_fen.to_string(),
                            r.held_fen.to_string(),
                            r.vouchers_fen.to_string(),
                            r.pool_fen.to_string(),
                        ]
                    })
                    .collect();
                let mut out = table::render(
                    &[
                        "programme",
                        "funded",
                        "defunded",
                        "budget",
                        "granted",
                        "returned",
                        "spent",
                        "held",
                        "in vouchers",
                        "pool",
                    ],
                    &body,
                );
                out.push_str(
                    "fen; budget = funded - defunded; pool = budget - granted + returned; granted = spent + held + in vouchers + returned\n",
                );
                out
            })
        }
        LedgerCommand::Verify { .. } | LedgerCommand::Keygen { .. } | LedgerCommand::Checkpoint { .. } => {
            unreachable!("handled above")
        }
    }
}
