//! Compute vouchers (算力券) and compute cards (算力卡) on the ledger.
//!
//! Money flows, all in fen, each a ledger transfer with a business code
//! ([`codes`]):
//!
//! ```text
//! treasury ──fund──▶ programme pool ──grant──▶ voucher(programme, org) ──subsidy──▶ provider revenue
//! bank ──deposit──▶ org wallet ──org share──▶ provider revenue
//!                   org wallet ──transfer fee──▶ network revenue        (never subsidised)
//!                   org wallet ──card purchase──▶ card sales
//! card mint(type) ──issue──▶ card(org, type) ──redeem──▶ card redeemed(type)   (accelerator-seconds)
//! voucher(programme, org) ──expiry return──▶ programme pool
//! ```
//!
//! The programme pool, vouchers, wallets and cards cannot be overdrawn, so a
//! programme can never grant more than its budget and nobody spends what
//! they do not have. A job's bill is held at admission as linked pending
//! transfers (card, subsidy, organisation share, transfer fee), posted at
//! completion for at most what was held, or voided on cancel.
//!
//! Rules (from the published city rules in `shared/facts/REGION.md`):
//! subsidy is a share of the compute bill, in basis points, lower for
//! non-domestic accelerators; capped per job and per organisation per
//! calendar year (China time); only eligible organisation kinds, sites and
//! accelerator types; never between related parties (the organisation runs
//! the site); never twice for the same job; nothing from an expired voucher,
//! whose balance a sweep returns to its programme; data-transfer fees are
//! never subsidised.

use chrono::{FixedOffset, NaiveDate, TimeZone};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::{LedgerError, Refusal};
use crate::ledger::{Batch, Ledger, PendingState, unquote};
use crate::model::{AccountId, NewAccount, NewTransfer, TransferId, TransferKind, Unit, flags};

/// Business codes of voucher transfers.
pub mod codes {
    pub const FUND: u16 = 1;
    pub const GRANT: u16 = 2;
    pub const DEPOSIT: u16 = 3;
    pub const SUBSIDY: u16 = 4;
    pub const ORG_SHARE: u16 = 5;
    pub const TRANSFER_FEE: u16 = 6;
    pub const CARD_PURCHASE: u16 = 7;
    pub const CARD_ISSUE: u16 = 8;
    pub const CARD_REDEEM: u16 = 9;
    pub const EXPIRY_RETURN: u16 = 10;
    pub const DEFUND: u16 = 11;
    /// A settled job refunded: each part back where it came from.
    pub const REFUND_SUBSIDY: u16 = 12;
    pub const REFUND_ORG_SHARE: u16 = 13;
    pub const REFUND_TRANSFER_FEE: u16 = 14;
    pub const REFUND_CARD: u16 = 15;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orgs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
-- A programme's budget is what `programme fund` put in less what
-- `programme defund` took back, each a transfer with the treasury.
CREATE TABLE IF NOT EXISTS programmes (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    funded_fen INTEGER NOT NULL,
    defunded_fen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS billing (
    job TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    provider TEXT NOT NULL,
    site TEXT NOT NULL,
    accel TEXT NOT NULL,
    programme TEXT,
    year INTEGER NOT NULL,
    state TEXT NOT NULL,
    hold TEXT NOT NULL,
    settlement TEXT,
    held_at INTEGER NOT NULL,
    settled_at INTEGER
);
CREATE INDEX IF NOT EXISTS billing_provider ON billing(provider, settled_at);
CREATE TABLE IF NOT EXISTS org_year (
    programme TEXT NOT NULL,
    org TEXT NOT NULL,
    year INTEGER NOT NULL,
    held_fen INTEGER NOT NULL,
    posted_fen INTEGER NOT NULL,
    PRIMARY KEY (programme, org, year)
);
-- Related parties the operator declared (subsidiaries, shareholders): no
-- subsidy between them, as between an organisation and its own site.
CREATE TABLE IF NOT EXISTS relations (
    org TEXT NOT NULL,
    provider TEXT NOT NULL,
    why TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (org, provider)
);
";

/// The voucher tables, each with its key and all its columns: every change
/// of them is a journaled row change.
const JOURNALED: [(&str, &[&str], &[&str]); 5] = [
    ("orgs", &["id"], &["id", "kind", "name", "created_at"]),
    ("programmes", &["id"], &["id", "spec", "created_at", "funded_fen", "defunded_fen"]),
    (
        "billing",
        &["job"],
        &[
            "job",
            "org",
            "provider",
            "site",
            "accel",
            "programme",
            "year",
            "state",
            "hold",
            "settlement",
            "held_at",
            "settled_at",
        ],
    ),
    ("org_year", &["programme", "org", "year"], &["programme", "org", "year", "held_fen", "posted_fen"]),
    ("relations", &["org", "provider"], &["org", "provider", "why", "at"]),
];

/// The kinds of organisation a programme can make eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrgKind {
    Enterprise,
    University,
    Institute,
}

impl std::str::FromStr for OrgKind {
    type Err = Refusal;
    fn from_str(s: &str) -> Result<OrgKind, Refusal> {
        match s {
            "enterprise" => Ok(OrgKind::Enterprise),
            "university" => Ok(OrgKind::University),
            "institute" => Ok(OrgKind::Institute),
            _ => Err(invalid("kind", format!("must be enterprise, university or institute, got '{s}'"))),
        }
    }
}

/// Over which programmes an organisation's yearly cap counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapScope {
    /// All programmes of the same issuer (a city's cap per organisation).
    #[default]
    Issuer,
    /// This programme alone.
    Programme,
}

impl std::str::FromStr for CapScope {
    type Err = Refusal;
    fn from_str(s: &str) -> Result<CapScope, Refusal> {
        match s {
            "issuer" => Ok(CapScope::Issuer),
            "programme" => Ok(CapScope::Programme),
            _ => Err(invalid("cap_per", format!("must be issuer or programme, got '{s}'"))),
        }
    }
}

/// A voucher programme as the operator defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgrammeSpec {
    pub id: String,
    pub name: String,
    /// Who issues the programme (a city's data bureau): the yearly cap of
    /// an organisation counts across the issuer's programmes.
    pub issuer: String,
    /// The budget the programme is created with; `programme fund` and
    /// `defund` change it later ([`Programme::budget_fen`]).
    pub budget_fen: i64,
    /// Valid from this time (inclusive) until `valid_until` (exclusive), unix seconds.
    pub valid_from: i64,
    pub valid_until: i64,
    /// Eligible organisation kinds (at least one).
    pub kinds: Vec<OrgKind>,
    /// Eligible sites; empty means all.
    pub sites: Vec<String>,
    /// Eligible accelerator types; empty means all.
    pub accels: Vec<String>,
    /// Share of the compute bill paid, in basis points (3,000 = 30%).
    pub rate_bp: i64,
    /// The rate for non-domestic accelerators.
    pub foreign_rate_bp: i64,
    /// Most subsidy one organisation receives per calendar year, from all
    /// the issuer's programmes (or from this one, with [`CapScope::Programme`]).
    pub org_year_cap_fen: i64,
    #[serde(default)]
    pub cap_per: CapScope,
    /// Most subsidy one job receives.
    pub job_cap_fen: i64,
}

/// Where a job runs and at what price: the facts the bill needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub site: String,
    /// The organisation that runs the site.
    pub provider: String,
    pub accel: String,
    pub domestic: bool,
    pub price_fen_per_hour: i64,
}

/// What a job uses: accelerator-seconds (count times seconds) and data-transfer fees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub accel_seconds: i64,
    pub transfer_fen: i64,
}

/// The bill of a job, before or after it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    pub org: String,
    pub programme: Option<String>,
    pub rate_bp: i64,
    /// Compute at list price for all the accelerator-seconds.
    pub compute_fen: i64,
    /// Accelerator-seconds paid with a compute card.
    pub card_seconds: i64,
    /// What the voucher pays.
    pub subsidy_fen: i64,
    /// The organisation's share of compute.
    pub org_compute_fen: i64,
    pub transfer_fen: i64,
    /// What the organisation pays in all: its compute share plus transfer fees.
    pub org_total_fen: i64,
    /// Why the voucher pays nothing or less than the rate, if so, each as
    /// `[code] message`.
    pub notes: Vec<String>,
    /// The stable codes of those rules, in the same order (`related_party`,
    /// `voucher_expired`, `not_yet_valid`, `not_eligible`, `no_voucher`,
    /// `cap_exceeded`, `voucher_balance`).
    #[serde(default)]
    pub codes: Vec<String>,
}

/// A rule that limited a bill: its code and words.
fn rule(notes: &mut Vec<(&'static str, String)>, code: &'static str, message: String) {
    notes.push((code, message));
}

/// A held job: its bill and the placement and price it was held at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub job: String,
    pub placement: Placement,
    pub estimated: Usage,
    pub bill: Bill,
    pub year: i32,
    pub timeout_s: i64,
}

/// What completion settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub job: String,
    pub actual: Usage,
    pub bill: Bill,
    /// Compute beyond what was held, which is not billed.
    pub unbilled_fen: i64,
}

fn invalid(field: &'static str, problem: String) -> Refusal {
    Refusal::Invalid { field, problem }
}

/// An id of an organisation, programme, site, provider or job: 1 to 64 of
/// `a-z 0-9 . _ -`, starting with a letter or digit. Account names are
/// built from ids joined by `:`, so an id can never make two of them equal.
pub fn check_id(field: &'static str, id: &str) -> Result<(), LedgerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    let shown: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
    refused(invalid(
        field,
        format!("'{shown}' is not an id (1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)"),
    ))
}

/// An accelerator type: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_accel(field: &'static str, accel: &str) -> Result<(), LedgerError> {
    let ok = !accel.is_empty()
        && accel.len() <= 64
        && accel.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    let shown: String = accel.chars().take(64).filter(|c| !c.is_control()).collect();
    refused(invalid(field, format!("'{shown}' is not an accelerator type (1 to 64 of A-Z a-z 0-9 . _ -)")))
}

fn check_placement(p: &Placement) -> Result<(), LedgerError> {
    check_id("site", &p.site)?;
    check_id("provider", &p.provider)?;
    check_accel("accel", &p.accel)
}

/// A transfer id chosen by a client: never one of the ids the ledger
/// derives for itself (a job's hold parts, a programme's funding, an
/// expiry), which a client could otherwise take first and so block.
pub fn check_client_id(id: TransferId) -> Result<(), LedgerError> {
    if id.is_derived() {
        return refused(invalid(
            "id",
            format!("{id} is in the ledger's own range (from 8000...0 up, derived from names); choose an id below it"),
        ));
    }
    Ok(())
}

fn refused<T>(r: Refusal) -> Result<T, LedgerError> {
    Err(LedgerError::Refused(r))
}

/// China Standard Time, for calendar years and dates.
fn china() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("valid offset")
}

/// The calendar year (China time) of a unix time.
pub fn year_of(unix_s: i64) -> i32 {
    use chrono::Datelike;
    china().timestamp_opt(unix_s, 0).single().map_or(1970, |t| t.year())
}

/// Midnight China time at the start of `YYYY-MM-DD`, as unix seconds.
pub fn date_to_unix(date: &str) -> Result<i64, Refusal> {
    let day = NaiveDate::parse_from_str(date.trim(), "%Y-%m-%d")
        .map_err(|_| invalid("date", format!("'{date}' is not a date (YYYY-MM-DD)")))?;
    let midnight = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    Ok(china().from_local_datetime(&midnight).single().expect("fixed offset").timestamp())
}

/// The corrections an operator may make by hand, as (debit kind, credit
/// kind): money between the outside world and organisations' wallets, a
/// wallet paying a provider, a provider paid out, a card sale refunded.
/// Never a provider's revenue into a wallet: revenue holds what vouchers
/// paid, and a wallet can be paid out, so that would turn vouchers into
/// cash; a job's bill is given back only by [`refund`], each part to where
/// it came from. Nothing that touches the
/// treasury, a programme's pool, a voucher or compute-card units: those move
/// only through their operations (fund, grant, hold, settle, release,
/// expiry), so no correction can turn vouchers into cash or grant beyond a
/// budget.
pub const PERMITTED_CORRECTIONS: [(&str, &str); 5] =
    [("bank", "wallet"), ("wallet", "bank"), ("wallet", "revenue"), ("revenue", "bank"), ("card_sales", "wallet")];

/// An operator's correction: a posted transfer between two accounts of
/// kinds in [`PERMITTED_CORRECTIONS`], with its reason kept in the journal
/// (the transfer's memo).
pub fn correction(
    ledger: &mut Ledger,
    now: i64,
    id: TransferId,
    debit: AccountId,
    credit: AccountId,
    amount_fen: i64,
    reason: &str,
) -> Result<crate::model::Transfer, LedgerError> {
    check_client_id(id)?;
    if reason.trim().is_empty() || reason.len() > 1024 || reason.chars().any(|c| c.is_control()) {
        return refused(invalid(
            "reason",
            "a correction needs a reason: 1 to 1024 characters, no control characters".into(),
        ));
    }
    let kind_of = |id: AccountId, missing: fn(AccountId) -> Refusal| {
        ledger.account(id).map(|a| a.kind.clone()).ok_or_else(|| LedgerError::Refused(missing(id)))
    };
    let (debit_kind, credit_kind) =
        (kind_of(debit, Refusal::DebitAccountNotFound)?, kind_of(credit, Refusal::CreditAccountNotFound)?);
    if !PERMITTED_CORRECTIONS.contains(&(debit_kind.as_str(), credit_kind.as_str())) {
        return refused(Refusal::FlowNotPermitted {
            debit: debit_kind,
            credit: credit_kind,
            permitted: PERMITTED_CORRECTIONS.iter().map(|(d, c)| format!("{d} -> {c}")).collect::<Vec<_>>().join(", "),
        });
    }
    let mut t = NewTransfer::posted(id, debit, credit, amount_fen, 0);
    t.memo = format!("correction: {reason}");
    ledger.create_transfers(now, &[t])?.remove(0).map_err(LedgerError::Refused)
}

pub fn treasury() -> AccountId {
    AccountId::derive("treasury")
}
pub fn bank() -> AccountId {
    AccountId::derive("bank")
}
pub fn network_revenue() -> AccountId {
    AccountId::derive("revenue:network")
}
pub fn card_sales() -> AccountId {
    AccountId::derive("card-sales")
}
pub fn programme_pool(programme: &str) -> AccountId {
    AccountId::derive(&format!("programme:{programme}"))
}
pub fn voucher(programme: &str, org: &str) -> AccountId {
    AccountId::derive(&format!("voucher:{programme}:{org}"))
}
pub fn wallet(org: &str) -> AccountId {
    AccountId::derive(&format!("wallet:{org}"))
}
pub fn revenue(provider: &str) -> AccountId {
    AccountId::derive(&format!("revenue:{provider}"))
}
pub fn card(org: &str, accel: &str) -> AccountId {
    AccountId::derive(&format!("card:{org}:{accel}"))
}
fn card_mint(accel: &str) -> AccountId {
    AccountId::derive(&format!("card-mint:{accel}"))
}
fn card_redeemed(accel: &str) -> AccountId {
    AccountId::derive(&format!("card-redeemed:{accel}"))
}

fn account(id: AccountId, kind: &str, owner: &str, unit: Unit, flags: u32) -> NewAccount {
    NewAccount { id, kind: kind.into(), owner: owner.into(), unit, flags }
}

/// Creates accounts that may already exist (same content), refusing conflicts.
fn ensure_accounts(b: &mut Batch<'_>, accounts: &[NewAccount]) -> Result<(), LedgerError> {
    for a in accounts {
        b.create_account(a)?.map_err(LedgerError::Refused)?;
    }
    Ok(())
}

/// Applies transfers that must all succeed (as one linked chain).
fn transfer_all(b: &mut Batch<'_>, mut transfers: Vec<NewTransfer>) -> Result<(), LedgerError> {
    let n = transfers.len();
    for (i, t) in transfers.iter_mut().enumerate() {
        t.linked = i + 1 < n;
    }
    for outcome in b.create_transfers(&transfers)? {
        if let Err(refusal) = outcome
            && refusal != Refusal::LinkedEventFailed
        {
            return refused(refusal);
        }
    }
    Ok(())
}

fn positive(field: &'static str, value: i64) -> Result<(), LedgerError> {
    if value <= 0 {
        return refused(invalid(field, format!("must be positive, got {value}")));
    }
    Ok(())
}

/// Creates the voucher tables and the system accounts. Idempotent.
pub fn init(ledger: &mut Ledger, now: i64) -> Result<(), LedgerError> {
    ledger.write(now, |b| {
        b.sql().execute_batch(SCHEMA)?;
        // Everything that decides money besides the transfers: under the
        // journal, so verify catches any edit of it.
        for (table, key, columns) in JOURNALED {
            b.journal_table(table, key, columns)?;
        }
        ensure_accounts(
            b,
            &[
                account(treasury(), "treasury", "operator", Unit::Fen, 0),
                account(bank(), "bank", "outside", Unit::Fen, 0),
                account(network_revenue(), "revenue", "network", Unit::Fen, 0),
                account(card_sales(), "card_sales", "operator", Unit::Fen, 0),
            ],
        )
    })
}

/// Registers an organisation and its wallet. Idempotent for the same content.
pub fn add_org(ledger: &mut Ledger, now: i64, id: &str, kind: OrgKind, name: &str) -> Result<(), LedgerError> {
    ledger.write(now, |b| add_org_in(b, id, kind, name))
}

/// [`add_org`] inside a caller's transaction.
pub fn add_org_in(b: &mut Batch<'_>, id: &str, kind: OrgKind, name: &str) -> Result<(), LedgerError> {
    check_id("org", id)?;
    let now = b.now();
    b.atomic(|b| {
        let kind_text = serde_json::to_value(kind).expect("kind serialises").as_str().unwrap_or_default().to_string();
        let existing: Option<(String, String)> = b
            .sql()
            .query_row("SELECT kind, name FROM orgs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match existing {
            Some((k, n)) if k == kind_text && n == name => return Ok(()),
            Some(_) => return refused(Refusal::IdReusedWithDifferentContent(id.to_string())),
            None => {}
        }
        b.sql().execute(
            "INSERT INTO orgs (id, kind, name, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, kind_text, name, now],
        )?;
        ensure_accounts(b, &[account(wallet(id), "wallet", id, Unit::Fen, flags::DEBITS_MUST_NOT_EXCEED_CREDITS)])
    })
}

/// Declares that `org` and `provider` are related parties (the reason is
/// kept): vouchers never pay for `org`'s work at `provider`'s sites.
/// Idempotent for the same pair and reason.
pub fn relate(ledger: &mut Ledger, now: i64, org: &str, provider: &str, why: &str) -> Result<(), LedgerError> {
    check_id("org", org)?;
    check_id("provider", provider)?;
    if why.trim().is_empty() || why.len() > 1024 || why.chars().any(|c| c.is_control()) {
        return refused(invalid(
            "why",
            "a relation needs a reason: 1 to 1024 characters, no control characters".into(),
        ));
    }
    ledger.write(now, |b| {
        org_kind(b, org)?;
        let existing: Option<String> = b
            .sql()
            .query_row("SELECT why FROM relations WHERE org = ?1 AND provider = ?2", [org, provider], |r| r.get(0))
            .optional()?;
        match existing {
            Some(w) if w == why => Ok(()),
            Some(_) => refused(Refusal::IdReusedWithDifferentContent(format!("{org}:{provider}"))),
            None => {
                b.sql().execute(
                    "INSERT INTO relations (org, provider, why, at) VALUES (?1, ?2, ?3, ?4)",
                    params![org, provider, why, now],
                )?;
                Ok(())
            }
        }
    })
}

/// Are `org` and `provider` related parties: the same, or declared so?
fn related(b: &Batch<'_>, org: &str, provider: &str) -> Result<bool, LedgerError> {
    if org == provider {
        return Ok(true);
    }
    let declared: Option<i64> = b
        .sql()
        .query_row("SELECT 1 FROM relations WHERE org = ?1 AND provider = ?2", [org, provider], |r| r.get(0))
        .optional()?;
    Ok(declared.is_some())
}

fn org_kind(b: &Batch<'_>, org: &str) -> Result<OrgKind, LedgerError> {
    let kind: Option<String> =
        b.sql().query_row("SELECT kind FROM orgs WHERE id = ?1", [org], |r| r.get(0)).optional()?;
    match kind {
        Some(k) => Ok(k.parse()?),
        None => refused(Refusal::NotFound { what: "organisation", id: org.to_string() }),
    }
}

/// A programme as it stands: its definition and its funding so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Programme {
    #[serde(flatten)]
    pub spec: ProgrammeSpec,
    /// Put in from the treasury, the creation budget included.
    pub funded_fen: i64,
    /// Taken back to the treasury.
    pub defunded_fen: i64,
}

impl Programme {
    /// What the programme may grant in all: funded less defunded.
    pub fn budget_fen(&self) -> i64 {
        self.funded_fen - self.defunded_fen
    }
}

fn read_programme(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn parse_programme((spec, funded_fen, defunded_fen): (String, i64, i64)) -> Result<Programme, LedgerError> {
    let spec = serde_json::from_str(&spec)
        .map_err(|e| LedgerError::Corrupt { path: "programmes".into(), problem: e.to_string() })?;
    Ok(Programme { spec, funded_fen, defunded_fen })
}

fn programme(sql: &rusqlite::Connection, id: &str) -> Result<ProgrammeSpec, LedgerError> {
    Ok(programme_state(sql, id)?.spec)
}

fn programme_state(sql: &rusqlite::Connection, id: &str) -> Result<Programme, LedgerError> {
    let row = sql
        .query_row("SELECT spec, funded_fen, defunded_fen FROM programmes WHERE id = ?1", [id], read_programme)
        .optional()?;
    match row {
        Some(row) => parse_programme(row),
        None => refused(Refusal::NotFound { what: "programme", id: id.to_string() }),
    }
}

/// All programmes, by id.
pub fn programmes(ledger: &Ledger) -> Result<Vec<Programme>, LedgerError> {
    programmes_of(ledger.connection())
}

/// All programmes, by id, on any connection to the ledger file.
pub fn programmes_of(sql: &rusqlite::Connection) -> Result<Vec<Programme>, LedgerError> {
    let mut stmt = sql.prepare_cached("SELECT spec, funded_fen, defunded_fen FROM programmes ORDER BY id")?;
    let rows: Vec<(String, i64, i64)> = stmt.query_map([], read_programme)?.collect::<Result<_, _>>()?;
    rows.into_iter().map(parse_programme).collect()
}

fn validate_programme(p: &ProgrammeSpec) -> Result<(), LedgerError> {
    check_id("id", &p.id)?;
    check_id("issuer", &p.issuer)?;
    positive("budget_fen", p.budget_fen)?;
    if p.valid_until <= p.valid_from {
        return refused(invalid("valid_until", "must be after valid_from".into()));
    }
    if p.kinds.is_empty() {
        return refused(invalid("kinds", "must name at least one organisation kind".into()));
    }
    for (field, rate) in [("rate_bp", p.rate_bp), ("foreign_rate_bp", p.foreign_rate_bp)] {
        if !(0..=10_000).contains(&rate) {
            return refused(invalid(field, format!("must be between 0 and 10000 basis points, got {rate}")));
        }
    }
    positive("org_year_cap_fen", p.org_year_cap_fen)?;
    positive("job_cap_fen", p.job_cap_fen)?;
    Ok(())
}

/// Creates a programme and funds its pool with the budget from the treasury.
/// The same programme again is accepted; a different one under the same id
/// is refused. Programmes of one issuer whose yearly cap counts across the
/// issuer must agree on it: it is the issuer's cap.
pub fn create_programme(ledger: &mut Ledger, now: i64, p: &ProgrammeSpec) -> Result<(), LedgerError> {
    validate_programme(p)?;
    ledger.write(now, |b| {
        let text = serde_json::to_string(p).expect("spec serialises");
        let existing: Option<String> =
            b.sql().query_row("SELECT spec FROM programmes WHERE id = ?1", [&p.id], |r| r.get(0)).optional()?;
        match existing {
            Some(e) if e == text => return Ok(()),
            Some(_) => return refused(Refusal::IdReusedWithDifferentContent(p.id.clone())),
            None => {}
        }
        if p.cap_per == CapScope::Issuer
            && let Some(other) = programmes_of(b.sql())?.into_iter().find(|o| {
                o.spec.issuer == p.issuer && o.spec.cap_per == CapScope::Issuer && o.spec.org_year_cap_fen != p.org_year_cap_fen
            })
        {
            return refused(invalid(
                "org_year_cap_fen",
                format!(
                    "issuer '{}' caps an organisation at {} fen a year (programme '{}'); a programme of the issuer with cap_per issuer must have the same cap, or cap_per programme",
                    p.issuer, other.spec.org_year_cap_fen, other.spec.id
                ),
            ));
        }
        b.sql().execute(
            "INSERT INTO programmes (id, spec, created_at, funded_fen, defunded_fen) VALUES (?1, ?2, ?3, 0, 0)",
            params![p.id, text, now],
        )?;
        let pool = programme_pool(&p.id);
        ensure_accounts(b, &[account(pool, "programme", &p.id, Unit::Fen, flags::DEBITS_MUST_NOT_EXCEED_CREDITS)])?;
        fund_in(b, TransferId::derive(&format!("fund:{}", p.id)), &p.id, p.budget_fen, "budget at creation")
    })
}

fn check_reason(field: &'static str, reason: &str) -> Result<(), LedgerError> {
    if reason.trim().is_empty() || reason.len() > 1024 || reason.chars().any(|c| c.is_control()) {
        return refused(invalid(field, "needs a reason: 1 to 1024 characters, no control characters".into()));
    }
    Ok(())
}

/// Adds `amount_fen` to a programme's budget from the treasury, with the
/// reason kept in the journal (a council's top-up). Repeating the same id
/// is safe.
pub fn fund_programme(
    ledger: &mut Ledger,
    now: i64,
    id: TransferId,
    programme_id: &str,
    amount_fen: i64,
    reason: &str,
) -> Result<Programme, LedgerError> {
    check_client_id(id)?;
    positive("amount", amount_fen)?;
    check_reason("reason", reason)?;
    ledger.write(now, |b| {
        fund_in(b, id, programme_id, amount_fen, reason)?;
        programme_state(b.sql(), programme_id)
    })
}

fn fund_in(
    b: &mut Batch<'_>,
    id: TransferId,
    programme_id: &str,
    amount_fen: i64,
    reason: &str,
) -> Result<(), LedgerError> {
    programme_state(b.sql(), programme_id)?;
    let mut t = NewTransfer::posted(id, treasury(), programme_pool(programme_id), amount_fen, codes::FUND);
    t.memo = format!("fund {programme_id}: {reason}");
    let new = !b.transfer_exists(id)?;
    b.create_transfer(&t)?.map_err(LedgerError::Refused)?;
    if new {
        b.sql().execute(
            "UPDATE programmes SET funded_fen = funded_fen + ?2 WHERE id = ?1",
            params![programme_id, amount_fen],
        )?;
    }
    Ok(())
}

/// Takes `amount_fen` of a programme's budget back to the treasury: at
/// most what is still in its pool (neither granted nor held), with the
/// reason kept in the journal. Repeating the same id is safe.
pub fn defund_programme(
    ledger: &mut Ledger,
    now: i64,
    id: TransferId,
    programme_id: &str,
    amount_fen: i64,
    reason: &str,
) -> Result<Programme, LedgerError> {
    check_client_id(id)?;
    positive("amount", amount_fen)?;
    check_reason("reason", reason)?;
    ledger.write(now, |b| {
        programme_state(b.sql(), programme_id)?;
        let mut t = NewTransfer::posted(id, programme_pool(programme_id), treasury(), amount_fen, codes::DEFUND);
        t.memo = format!("defund {programme_id}: {reason}");
        let new = !b.transfer_exists(id)?;
        match b.create_transfer(&t)? {
            Ok(_) if new => {
                b.sql().execute(
                    "UPDATE programmes SET defunded_fen = defunded_fen + ?2 WHERE id = ?1",
                    params![programme_id, amount_fen],
                )?;
            }
            Ok(_) => {}
            Err(Refusal::InsufficientFunds { available, amount, .. }) => {
                return refused(Refusal::ProgrammeExhausted { programme: programme_id.into(), available, amount });
            }
            Err(r) => return refused(r),
        }
        programme_state(b.sql(), programme_id)
    })
}

/// Puts an organisation's own money in its wallet.
pub fn deposit(ledger: &mut Ledger, now: i64, id: TransferId, org: &str, amount_fen: i64) -> Result<(), LedgerError> {
    check_client_id(id)?;
    positive("amount", amount_fen)?;
    ledger.write(now, |b| {
        org_kind(b, org)?;
        transfer_all(b, vec![NewTransfer::posted(id, bank(), wallet(org), amount_fen, codes::DEPOSIT)])
    })
}

/// Grants vouchers of a programme to an organisation, out of the programme's budget.
pub fn grant(
    ledger: &mut Ledger,
    now: i64,
    id: TransferId,
    programme_id: &str,
    org: &str,
    amount_fen: i64,
) -> Result<(), LedgerError> {
    check_client_id(id)?;
    positive("amount", amount_fen)?;
    ledger.write(now, |b| {
        let p = programme(b.sql(), programme_id)?;
        let kind = org_kind(b, org)?;
        if !p.kinds.contains(&kind) {
            return refused(Refusal::NotEligible(format!(
                "programme '{programme_id}' does not admit {kind:?} organisations"
            )));
        }
        if now >= p.valid_until {
            return refused(Refusal::VoucherExpired(programme_id.into()));
        }
        ensure_accounts(
            b,
            &[account(voucher(programme_id, org), "voucher", org, Unit::Fen, flags::DEBITS_MUST_NOT_EXCEED_CREDITS)],
        )?;
        let pool = programme_pool(programme_id);
        let t = NewTransfer::posted(id, pool, voucher(programme_id, org), amount_fen, codes::GRANT);
        match b.create_transfer(&t)? {
            Ok(_) => Ok(()),
            Err(Refusal::InsufficientFunds { available, amount, .. }) => {
                refused(Refusal::ProgrammeExhausted { programme: programme_id.into(), available, amount })
            }
            Err(r) => refused(r),
        }
    })
}

/// An organisation buys a compute card: `seconds` accelerator-seconds of
/// `accel`, paid `price_fen` from its wallet.
pub fn buy_card(
    ledger: &mut Ledger,
    now: i64,
    id: TransferId,
    org: &str,
    accel: &str,
    seconds: i64,
    price_fen: i64,
) -> Result<(), LedgerError> {
    check_client_id(id)?;
    positive("seconds", seconds)?;
    positive("price_fen", price_fen)?;
    check_accel("accel", accel)?;
    ledger.write(now, |b| {
        org_kind(b, org)?;
        let unit = Unit::AccelSeconds(accel.to_string());
        ensure_accounts(
            b,
            &[
                account(card_mint(accel), "card_mint", "operator", unit.clone(), 0),
                account(card_redeemed(accel), "card_redeemed", "operator", unit.clone(), 0),
                account(card(org, accel), "card", org, unit, flags::DEBITS_MUST_NOT_EXCEED_CREDITS),
            ],
        )?;
        transfer_all(
            b,
            vec![
                NewTransfer::posted(id, wallet(org), card_sales(), price_fen, codes::CARD_PURCHASE),
                NewTransfer::posted(
                    TransferId::derive(&format!("card-issue:{id}")),
                    card_mint(accel),
                    card(org, accel),
                    seconds,
                    codes::CARD_ISSUE,
                ),
            ],
        )
    })
}

fn ceil_div(a: i128, b: i128) -> i64 {
    ((a + b - 1) / b) as i64
}

/// Compute fen for `accel_seconds` at `price_fen_per_hour`, rounded up.
pub fn compute_fen(accel_seconds: i64, price_fen_per_hour: i64) -> i64 {
    ceil_div(accel_seconds as i128 * price_fen_per_hour as i128, 3600)
}

fn validate_usage(usage: &Usage, placement: &Placement) -> Result<(), LedgerError> {
    if usage.accel_seconds < 0 || usage.accel_seconds > 1_000_000_000_000 {
        return refused(invalid("accel_seconds", format!("must be between 0 and 10^12, got {}", usage.accel_seconds)));
    }
    if usage.transfer_fen < 0 || usage.transfer_fen > 1_000_000_000_000 {
        return refused(invalid("transfer_fen", format!("must be between 0 and 10^12, got {}", usage.transfer_fen)));
    }
    if placement.price_fen_per_hour <= 0 || placement.price_fen_per_hour > 100_000_000 {
        return refused(invalid(
            "price_fen_per_hour",
            format!("must be between 1 and 10^8, got {}", placement.price_fen_per_hour),
        ));
    }
    Ok(())
}

fn org_year_used(sql: &rusqlite::Connection, programme: &str, org: &str, year: i32) -> Result<i64, LedgerError> {
    Ok(sql
        .query_row(
            "SELECT held_fen + posted_fen FROM org_year WHERE programme = ?1 AND org = ?2 AND year = ?3",
            params![programme, org, year],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Subsidy held or paid to `org` in `year` that counts against `p`'s
/// yearly cap: from `p` alone, or from every programme of its issuer that
/// counts its cap across the issuer.
fn year_used(
    sql: &rusqlite::Connection,
    all: &[ProgrammeSpec],
    p: &ProgrammeSpec,
    org: &str,
    year: i32,
) -> Result<i64, LedgerError> {
    if p.cap_per == CapScope::Programme {
        return org_year_used(sql, &p.id, org, year);
    }
    let mut used = 0i64;
    // A programme capped on its own stands outside its issuer's cap.
    for q in all.iter().filter(|q| q.issuer == p.issuer && q.cap_per == CapScope::Issuer) {
        used =
            used.checked_add(org_year_used(sql, &q.id, org, year)?).ok_or(LedgerError::Refused(Refusal::Overflow))?;
    }
    Ok(used)
}

fn bump_org_year(
    sql: &rusqlite::Connection,
    programme: &str,
    org: &str,
    year: i32,
    held: i64,
    posted: i64,
) -> Result<(), LedgerError> {
    sql.execute(
        "INSERT INTO org_year (programme, org, year, held_fen, posted_fen) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (programme, org, year) DO UPDATE SET held_fen = held_fen + ?4, posted_fen = posted_fen + ?5",
        params![programme, org, year, held, posted],
    )?;
    Ok(())
}

/// The bill of a job: card first, then the voucher on what is left, then
/// the organisation's share. Reserves nothing (it only reads).
pub fn bill(b: &Batch<'_>, org: &str, placement: &Placement, usage: &Usage) -> Result<Bill, LedgerError> {
    validate_usage(usage, placement)?;
    let kind = org_kind(b, org)?;
    let now = b.now();
    let mut notes = Vec::new();
    let card_available = b.account(card(org, &placement.accel)).map_or(0, |a| a.available());
    let card_seconds = usage.accel_seconds.min(card_available.max(0));
    let compute = compute_fen(usage.accel_seconds, placement.price_fen_per_hour);
    let payable = compute_fen(usage.accel_seconds - card_seconds, placement.price_fen_per_hour);
    let all: Vec<ProgrammeSpec> = programmes_of(b.sql())?.into_iter().map(|p| p.spec).collect();
    let mut eligible: Vec<(&ProgrammeSpec, i64)> = Vec::new();
    if related(b, org, &placement.provider)? {
        let r = Refusal::RelatedParty { org: org.into(), site: placement.site.clone() };
        rule(&mut notes, r.code(), r.to_string());
    } else {
        for p in &all {
            let available = b.account(voucher(&p.id, org)).map_or(0, |a| a.available());
            if available <= 0 {
                continue;
            }
            let refusal = |r: Refusal| Some((r.code(), r.to_string()));
            let why_not = if now >= p.valid_until {
                refusal(Refusal::VoucherExpired(p.id.clone()))
            } else if now < p.valid_from {
                refusal(Refusal::NotYetValid(p.id.clone()))
            } else if !p.kinds.contains(&kind) {
                Some(("not_eligible", format!("programme '{}' does not admit {kind:?} organisations", p.id)))
            } else if !p.sites.is_empty() && !p.sites.contains(&placement.site) {
                Some(("not_eligible", format!("programme '{}' does not cover site '{}'", p.id, placement.site)))
            } else if !p.accels.is_empty() && !p.accels.contains(&placement.accel) {
                Some(("not_eligible", format!("programme '{}' does not cover accelerator '{}'", p.id, placement.accel)))
            } else {
                None
            };
            match why_not {
                Some((code, note)) => rule(&mut notes, code, note),
                None => eligible.push((p, available)),
            }
        }
        if eligible.is_empty() && notes.is_empty() {
            rule(&mut notes, "no_voucher", "no voucher balance".into());
        }
    }
    // The voucher that expires first is spent first; one whose caps leave
    // it nothing to pay gives way to the next, and says why.
    eligible.sort_by(|(a, _), (b, _)| (a.valid_until, &a.id).cmp(&(b.valid_until, &b.id)));
    let mut chosen = None;
    for (p, available) in eligible {
        let rate = if placement.domestic { p.rate_bp } else { p.foreign_rate_bp };
        let by_rate = (payable as i128 * rate as i128 / 10_000) as i64;
        let used = year_used(b.sql(), &all, p, org, year_of(now))?;
        let year_left = (p.org_year_cap_fen - used).max(0);
        let year_note = match p.cap_per {
            CapScope::Issuer => format!("yearly cap of the organisation across issuer {}'s programmes", p.issuer),
            CapScope::Programme => format!("yearly cap of the organisation in programme {}", p.id),
        };
        let mut subsidy = by_rate;
        let mut limits = Vec::new();
        for (limit, code, note) in [
            (p.job_cap_fen, "cap_exceeded", format!("per-job cap of programme {}", p.id)),
            (year_left, "cap_exceeded", year_note),
            (available, "voucher_balance", format!("voucher balance of programme {}", p.id)),
        ] {
            if limit < subsidy {
                subsidy = limit;
                limits.push((code, format!("subsidy limited by the {note} to {limit} fen")));
            }
        }
        let first = chosen.is_none();
        if first || subsidy > 0 {
            notes.extend(limits);
            chosen = Some((Some(p.id.clone()), rate, subsidy));
        }
        if subsidy > 0 {
            break;
        }
    }
    let (programme, rate_bp, subsidy) = chosen.unwrap_or((None, 0, 0));
    let org_compute = payable - subsidy;
    Ok(Bill {
        org: org.into(),
        programme,
        rate_bp,
        compute_fen: compute,
        card_seconds,
        subsidy_fen: subsidy,
        org_compute_fen: org_compute,
        transfer_fen: usage.transfer_fen,
        org_total_fen: org_compute + usage.transfer_fen,
        codes: notes.iter().map(|(code, _)| code.to_string()).collect(),
        notes: notes.into_iter().map(|(code, note)| format!("[{code}] {note}")).collect(),
    })
}

/// What the voucher would pay and what the organisation pays. Reserves nothing.
pub fn quote(
    ledger: &mut Ledger,
    now: i64,
    org: &str,
    placement: &Placement,
    usage: &Usage,
) -> Result<Bill, LedgerError> {
    // `bill` only reads: the transaction gives it the same view of the
    // books a hold would see, and commits nothing.
    ledger.write(now, |b| bill(b, org, placement, usage))
}

fn part_id(job: &str, step: &str, part: &str) -> TransferId {
    TransferId::derive(&format!("job:{job}:{step}:{part}"))
}

/// The pending parts of a hold: (part, debit, credit, amount, code).
fn hold_parts(h: &HoldRecord) -> Vec<(&'static str, AccountId, AccountId, i64, u16)> {
    let org = &h.bill.org;
    let provider = &h.placement.provider;
    let mut parts = vec![(
        "card",
        card(org, &h.placement.accel),
        card_redeemed(&h.placement.accel),
        h.bill.card_seconds,
        codes::CARD_REDEEM,
    )];
    if let Some(p) = &h.bill.programme {
        parts.push(("subsidy", voucher(p, org), revenue(provider), h.bill.subsidy_fen, codes::SUBSIDY));
    }
    parts.push(("org", wallet(org), revenue(provider), h.bill.org_compute_fen, codes::ORG_SHARE));
    parts.push(("transfer", wallet(org), network_revenue(), h.bill.transfer_fen, codes::TRANSFER_FEE));
    parts.into_iter().filter(|p| p.3 > 0).collect()
}

/// Ends every part of a hold, as one linked chain: posts `amount(part)` of
/// it, or voids it when that is 0 (posting 0 would mean "all").
fn resolve_hold(
    b: &mut Batch<'_>,
    hold: &HoldRecord,
    step: &str,
    amount: impl Fn(&str) -> i64,
) -> Result<(), LedgerError> {
    let job = &hold.job;
    let transfers = hold_parts(hold)
        .into_iter()
        .map(|(part, _, _, _, code)| {
            let pending = part_id(job, "hold", part);
            let amount = amount(part);
            NewTransfer {
                id: part_id(job, step, part),
                debit: AccountId(0),
                credit: AccountId(0),
                amount,
                kind: if amount > 0 {
                    TransferKind::PostPending { pending }
                } else {
                    TransferKind::VoidPending { pending }
                },
                linked: false,
                code,
                memo: job.clone(),
            }
        })
        .collect();
    transfer_all(b, transfers)
}

fn load_hold(
    sql: &rusqlite::Connection,
    job: &str,
) -> Result<Option<(String, HoldRecord, Option<Settlement>)>, LedgerError> {
    let row: Option<(String, String, Option<String>)> = sql
        .query_row("SELECT state, hold, settlement FROM billing WHERE job = ?1", [job], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let corrupt = |e: serde_json::Error| LedgerError::Corrupt { path: "billing".into(), problem: e.to_string() };
    Ok(match row {
        None => None,
        Some((state, hold, settlement)) => Some((
            state,
            serde_json::from_str(&hold).map_err(corrupt)?,
            settlement.map(|s| serde_json::from_str(&s)).transpose().map_err(corrupt)?,
        )),
    })
}

/// Holds a job's bill at admission: card seconds, voucher share,
/// organisation share and transfer fee as linked pending transfers that
/// expire after `timeout_s`. Holding the same job again with the same
/// content returns the first hold; with different content it is refused.
pub fn hold(
    ledger: &mut Ledger,
    now: i64,
    job: &str,
    org: &str,
    placement: &Placement,
    estimated: &Usage,
    timeout_s: i64,
) -> Result<HoldRecord, LedgerError> {
    ledger.write(now, |b| hold_in(b, job, org, placement, estimated, timeout_s))
}

/// [`hold`] inside a caller's transaction, as one atomic block.
pub fn hold_in(
    b: &mut Batch<'_>,
    job: &str,
    org: &str,
    placement: &Placement,
    estimated: &Usage,
    timeout_s: i64,
) -> Result<HoldRecord, LedgerError> {
    check_id("job", job)?;
    check_id("org", org)?;
    check_placement(placement)?;
    if timeout_s < 0 {
        return refused(Refusal::TimeoutMustNotBeNegative(timeout_s));
    }
    if timeout_s > crate::model::MAX_TIMEOUT_S {
        return refused(Refusal::TimeoutTooLong(timeout_s));
    }
    let now = b.now();
    b.atomic(|b| {
        if let Some((state, existing, _)) = load_hold(b.sql(), job)? {
            let same = existing.bill.org == org && existing.placement == *placement && existing.estimated == *estimated && existing.timeout_s == timeout_s;
            return match (same, state.as_str()) {
                // A repeated request for a hold still open: its outcome again.
                (true, "held") => Ok(existing),
                // A job's bill is held once: once it ended, holding it again
                // is a mistake, not a repeat.
                (true, "settled") => refused(Refusal::AlreadySettled(job.to_string())),
                (true, other) => refused(Refusal::NotHeld { job: job.into(), state: other.into() }),
                (false, _) => refused(Refusal::IdReusedWithDifferentContent(job.to_string())),
            };
        }
        let bill = bill(b, org, placement, estimated)?;
        ensure_accounts(b, &[account(revenue(&placement.provider), "revenue", &placement.provider, Unit::Fen, 0)])?;
        let record = HoldRecord { job: job.into(), placement: placement.clone(), estimated: *estimated, bill, year: year_of(now), timeout_s };
        let transfers = hold_parts(&record)
            .into_iter()
            .map(|(part, debit, credit, amount, code)| NewTransfer {
                id: part_id(job, "hold", part),
                debit,
                credit,
                amount,
                kind: TransferKind::Pending { timeout_s },
                linked: false,
                code,
                memo: job.into(),
            })
            .collect();
        transfer_all(b, transfers)?;
        if let Some(p) = &record.bill.programme {
            bump_org_year(b.sql(), p, org, record.year, record.bill.subsidy_fen, 0)?;
        }
        b.sql().execute(
            "INSERT INTO billing (job, org, provider, site, accel, programme, year, state, hold, held_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'held', ?8, ?9)",
            params![
                job,
                org,
                placement.provider,
                placement.site,
                placement.accel,
                record.bill.programme,
                record.year,
                serde_json::to_string(&record).expect("hold serialises"),
                now
            ],
        )?;
        Ok(record)
    })
}

/// Settles a held job with its actual usage: posts at most what was held
/// and releases the rest. Settling again with the same usage returns the
/// first settlement; with other usage it is refused: the same usage is
/// never billed or subsidised twice.
pub fn settle(ledger: &mut Ledger, now: i64, job: &str, actual: &Usage) -> Result<Settlement, LedgerError> {
    ledger.write(now, |b| settle_in(b, job, actual))
}

/// [`settle`] inside a caller's transaction, as one atomic block.
pub fn settle_in(b: &mut Batch<'_>, job: &str, actual: &Usage) -> Result<Settlement, LedgerError> {
    let now = b.now();
    b.atomic(|b| {
        let Some((state, hold, settled)) = load_hold(b.sql(), job)? else {
            return refused(Refusal::NotFound { what: "job", id: job.into() });
        };
        match (state.as_str(), settled) {
            ("held", _) => {}
            ("settled", Some(s)) if s.actual == *actual => return Ok(s),
            ("settled", _) => return refused(Refusal::AlreadySettled(job.into())),
            (other, _) => return refused(Refusal::NotHeld { job: job.into(), state: other.into() }),
        }
        validate_usage(actual, &hold.placement)?;
        let h = &hold.bill;
        let price = hold.placement.price_fen_per_hour;
        let card_seconds = actual.accel_seconds.min(h.card_seconds);
        let payable = compute_fen(actual.accel_seconds - card_seconds, price);
        // Nothing from an expired voucher: a hold kept open past the
        // programme's end (a long timeout) cannot carry its subsidy, or its
        // year's cap, into a later one.
        let mut notes = Vec::new();
        let expired = match &h.programme {
            Some(p) => now >= programme(b.sql(), p)?.valid_until,
            None => false,
        };
        let subsidy = if expired {
            let r = Refusal::VoucherExpired(h.programme.clone().unwrap_or_default());
            notes.push(format!("[{}] {r}: settled after the programme ended, no subsidy", r.code()));
            0
        } else {
            ((payable as i128 * h.rate_bp as i128 / 10_000) as i64).min(h.subsidy_fen)
        };
        let org_compute = (payable - subsidy).min(h.org_compute_fen);
        let transfer_fen = actual.transfer_fen.min(h.transfer_fen);
        let unbilled = (payable - subsidy - org_compute) + (actual.transfer_fen - transfer_fen);
        let bill = Bill {
            org: h.org.clone(),
            programme: h.programme.clone(),
            rate_bp: h.rate_bp,
            compute_fen: compute_fen(actual.accel_seconds, price),
            card_seconds,
            subsidy_fen: subsidy,
            org_compute_fen: org_compute,
            transfer_fen,
            org_total_fen: org_compute + transfer_fen,
            codes: if expired { vec!["voucher_expired".into()] } else { Vec::new() },
            notes,
        };
        let posted = |part: &str| match part {
            "card" => card_seconds,
            "subsidy" => subsidy,
            "org" => org_compute,
            _ => transfer_fen,
        };
        resolve_hold(b, &hold, "settle", posted)?;
        if let Some(p) = &h.programme {
            bump_org_year(b.sql(), p, &h.org, hold.year, -h.subsidy_fen, subsidy)?;
        }
        let settlement = Settlement { job: job.into(), actual: *actual, bill, unbilled_fen: unbilled };
        b.sql().execute(
            "UPDATE billing SET state = 'settled', settlement = ?2, settled_at = ?3 WHERE job = ?1",
            params![job, serde_json::to_string(&settlement).expect("settlement serialises"), now],
        )?;
        Ok(settlement)
    })
}

/// Releases a held job's bill (cancelled, or the provider failed it).
/// Releasing a released job again is accepted.
pub fn release(ledger: &mut Ledger, now: i64, job: &str) -> Result<(), LedgerError> {
    ledger.write(now, |b| release_in(b, job))
}

/// [`release`] inside a caller's transaction, as one atomic block.
pub fn release_in(b: &mut Batch<'_>, job: &str) -> Result<(), LedgerError> {
    let now = b.now();
    b.atomic(|b| {
        let Some((state, hold, _)) = load_hold(b.sql(), job)? else {
            return refused(Refusal::NotFound { what: "job", id: job.into() });
        };
        match state.as_str() {
            "held" => {}
            "released" => return Ok(()),
            other => return refused(Refusal::NotHeld { job: job.into(), state: other.into() }),
        }
        resolve_hold(b, &hold, "release", |_| 0)?;
        if let Some(p) = &hold.bill.programme {
            bump_org_year(b.sql(), p, &hold.bill.org, hold.year, -hold.bill.subsidy_fen, 0)?;
        }
        b.sql().execute("UPDATE billing SET state = 'released', settled_at = ?2 WHERE job = ?1", params![job, now])?;
        Ok(())
    })
}

/// Refunds a settled job (the provider failed it after all, or a dispute
/// was decided for the organisation): each part of its bill goes back to
/// where it came from, the subsidy to the voucher, the organisation's share
/// and the transfer fee to its wallet, card seconds to its card, and the
/// subsidy no longer counts against the yearly cap. The reason is kept in
/// the journal. Refunding a refunded job again is accepted.
pub fn refund(ledger: &mut Ledger, now: i64, job: &str, reason: &str) -> Result<Settlement, LedgerError> {
    check_reason("reason", reason)?;
    ledger.write(now, |b| {
        b.atomic(|b| {
            let Some((state, hold, settled)) = load_hold(b.sql(), job)? else {
                return refused(Refusal::NotFound { what: "job", id: job.into() });
            };
            let settlement = match (state.as_str(), settled) {
                ("settled" | "refunded", Some(s)) => s,
                (other, _) => {
                    return refused(Refusal::NotHeld { job: job.into(), state: format!("{other}, not settled") });
                }
            };
            if state == "refunded" {
                return Ok(settlement);
            }
            let s = &settlement.bill;
            let org = &s.org;
            let provider = &hold.placement.provider;
            let memo = format!("{job}: {reason}");
            let mut parts = vec![(
                "card",
                card_redeemed(&hold.placement.accel),
                card(org, &hold.placement.accel),
                s.card_seconds,
                codes::REFUND_CARD,
            )];
            if let Some(p) = &s.programme {
                parts.push(("subsidy", revenue(provider), voucher(p, org), s.subsidy_fen, codes::REFUND_SUBSIDY));
            }
            parts.push(("org", revenue(provider), wallet(org), s.org_compute_fen, codes::REFUND_ORG_SHARE));
            parts.push(("transfer", network_revenue(), wallet(org), s.transfer_fen, codes::REFUND_TRANSFER_FEE));
            let transfers = parts
                .into_iter()
                .filter(|p| p.3 > 0)
                .map(|(part, debit, credit, amount, code)| {
                    let mut t = NewTransfer::posted(part_id(job, "refund", part), debit, credit, amount, code);
                    t.memo = if code == codes::REFUND_SUBSIDY { job.to_string() } else { memo.clone() };
                    t
                })
                .collect();
            transfer_all(b, transfers)?;
            if let Some(p) = &s.programme {
                bump_org_year(b.sql(), p, org, hold.year, 0, -s.subsidy_fen)?;
            }
            b.sql()
                .execute("UPDATE billing SET state = 'refunded', settled_at = ?2 WHERE job = ?1", params![job, now])?;
            Ok(settlement)
        })
    })
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Jobs whose held bill expired, by job.
    pub holds_expired: Vec<String>,
    /// The pending transfers (parts of those holds) that expired.
    pub parts_expired: usize,
    /// (programme, organisation, fen returned to the programme).
    pub returned: Vec<(String, String, i64)>,
}

/// Expires holds past their timeout, and returns the unused balance of
/// every expired voucher to its programme.
pub fn sweep(ledger: &mut Ledger, now: i64) -> Result<SweepReport, LedgerError> {
    ledger.write(now, |b| {
        let mut report =
            SweepReport { holds_expired: Vec::new(), parts_expired: b.expire_pending()?, returned: Vec::new() };
        let held: Vec<(String, i64)> = {
            let mut stmt = b.sql().prepare("SELECT job, held_at FROM billing WHERE state = 'held' ORDER BY job")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
        };
        for (job, held_at) in held {
            let (_, hold, _) = load_hold(b.sql(), &job)?.expect("listed job");
            let expired = match hold_parts(&hold).first() {
                Some((part, ..)) => {
                    pending_state(b, part_id(&job, "hold", part)).is_ok_and(|s| s == Some(PendingState::Expired))
                }
                // A bill of nothing holds no transfer: it expires on its own clock.
                None => hold.timeout_s > 0 && now >= held_at.saturating_add(hold.timeout_s),
            };
            if expired {
                if let Some(p) = &hold.bill.programme {
                    bump_org_year(b.sql(), p, &hold.bill.org, hold.year, -hold.bill.subsidy_fen, 0)?;
                }
                b.sql().execute(
                    "UPDATE billing SET state = 'expired', settled_at = ?2 WHERE job = ?1",
                    params![job, now],
                )?;
                report.holds_expired.push(job);
            }
        }
        let vouchers: Vec<(String, String)> = {
            let mut stmt = b.sql().prepare("SELECT p.id, o.id FROM programmes p JOIN orgs o ORDER BY p.id, o.id")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
        };
        for (p, org) in vouchers {
            let spec = programme(b.sql(), &p)?;
            if now < spec.valid_until {
                continue;
            }
            let Some(v) = b.account(voucher(&p, &org)) else { continue };
            let available = v.available();
            if available <= 0 {
                continue;
            }
            // The id names the voucher's state, so each return happens once.
            let id = TransferId::derive(&format!("expiry:{p}:{org}:{}", v.debits_posted));
            transfer_all(
                b,
                vec![NewTransfer::posted(id, voucher(&p, &org), programme_pool(&p), available, codes::EXPIRY_RETURN)],
            )?;
            report.returned.push((p, org, available));
        }
        Ok(report)
    })
}

fn pending_state(b: &Batch<'_>, id: TransferId) -> Result<Option<PendingState>, LedgerError> {
    let state: Option<i64> =
        b.sql().query_row("SELECT state FROM pending WHERE id = ?1", [id.0.to_be_bytes()], |r| r.get(0)).optional()?;
    Ok(state.map(PendingState::from_code))
}

/// Opens a ledger file with the voucher tables and system accounts ready.
pub fn open(path: impl AsRef<std::path::Path>, now: i64) -> Result<Ledger, LedgerError> {
    let mut ledger = Ledger::open(path)?;
    init(&mut ledger, now)?;
    Ok(ledger)
}

/// The flows money may take, as (debit kind, credit kind, business code):
/// every operation's transfers, and the operator's corrections (code 0).
/// A pending transfer's resolution (post, void, expiry) follows its hold.
pub const PERMITTED_FLOWS: [(&str, &str, u16); 15] = [
    ("treasury", "programme", codes::FUND),
    ("programme", "treasury", codes::DEFUND),
    ("programme", "voucher", codes::GRANT),
    ("bank", "wallet", codes::DEPOSIT),
    ("voucher", "revenue", codes::SUBSIDY),
    ("wallet", "revenue", codes::ORG_SHARE),
    ("wallet", "revenue", codes::TRANSFER_FEE),
    ("wallet", "card_sales", codes::CARD_PURCHASE),
    ("card_mint", "card", codes::CARD_ISSUE),
    ("card", "card_redeemed", codes::CARD_REDEEM),
    ("voucher", "programme", codes::EXPIRY_RETURN),
    ("revenue", "voucher", codes::REFUND_SUBSIDY),
    ("revenue", "wallet", codes::REFUND_ORG_SHARE),
    ("revenue", "wallet", codes::REFUND_TRANSFER_FEE),
    ("card_redeemed", "card", codes::REFUND_CARD),
];

/// What the replay of the transfers tells the voucher checks.
#[derive(Default)]
struct RuleCheck {
    /// Per programme pool: (funded, defunded) by FUND and DEFUND transfers.
    funding: std::collections::HashMap<AccountId, (i64, i64)>,
    /// Jobs whose subsidy was posted: how often, and how much in all.
    subsidies: std::collections::HashMap<String, (u32, i64)>,
    /// Jobs whose subsidy was refunded, and how much.
    refunds: std::collections::HashMap<String, i64>,
    /// The voucher tables as the journal says they were at each step, for
    /// judging each bill by the rules that held when it was made.
    orgs: std::collections::HashMap<String, OrgKind>,
    relations: std::collections::HashSet<(String, String)>,
    specs: std::collections::HashMap<String, ProgrammeSpec>,
    problems: Vec<String>,
}

impl crate::ledger::Replay for RuleCheck {
    fn transfer(
        &mut self,
        t: &crate::model::Transfer,
        debit: &crate::model::Account,
        credit: &crate::model::Account,
    ) -> Result<(), String> {
        match t.kind {
            TransferKind::Posted | TransferKind::Pending { .. } => {
                let flow = (debit.kind.as_str(), credit.kind.as_str());
                let permitted = if t.code == 0 {
                    PERMITTED_CORRECTIONS.contains(&flow)
                } else {
                    PERMITTED_FLOWS.contains(&(flow.0, flow.1, t.code))
                };
                if !permitted {
                    return Err(format!(
                        "transfer {} moves {} from a {} account to a {} account with code {}: not a permitted flow",
                        t.id, t.amount, flow.0, flow.1, t.code
                    ));
                }
            }
            TransferKind::PostPending { .. } if t.code == codes::SUBSIDY => {
                let s = self.subsidies.entry(t.memo.clone()).or_default();
                s.0 += 1;
                s.1 = s.1.saturating_add(t.amount);
            }

            _ => {}
        }
        // A grant, by the rules of its moment: an eligible organisation, a
        // programme still running.
        if t.kind == TransferKind::Posted && t.code == codes::GRANT {
            let (programme, org) = (&debit.owner, &credit.owner);
            let spec = self.specs.get(programme).ok_or_else(|| format!("grant {}: no programme {programme}", t.id))?;
            match self.orgs.get(org) {
                Some(kind) if spec.kinds.contains(kind) && t.at < spec.valid_until => {}
                kind => {
                    return Err(format!(
                        "grant {} of programme {programme} to {org} ({kind:?}) at {}: not eligible then",
                        t.id, t.at
                    ));
                }
            }
        }
        if t.kind == TransferKind::Posted && t.code == codes::REFUND_SUBSIDY {
            let r = self.refunds.entry(t.memo.clone()).or_default();
            *r = r.saturating_add(t.amount);
        }
        if t.kind == TransferKind::Posted {
            let overflow = || format!("transfer {}: the programme's funding total overflows", t.id);
            if t.code == codes::FUND {
                let f = self.funding.entry(t.credit).or_default();
                f.0 = f.0.checked_add(t.amount).ok_or_else(overflow)?;
            } else if t.code == codes::DEFUND {
                let f = self.funding.entry(t.debit).or_default();
                f.1 = f.1.checked_add(t.amount).ok_or_else(overflow)?;
            }
        }
        Ok(())
    }

    fn row_change(&mut self, table: &str, before: Option<&str>, after: Option<&str>) -> Result<(), String> {
        history_rule(table, before, after)?;
        let Some(row) = after else { return Ok(()) };
        let now = cells(row)?;
        let text =
            |i: usize| now.get(i).and_then(|c| unquote(c)).ok_or_else(|| format!("unreadable {table} row {row}"));
        match table {
            "orgs" => {
                let kind: OrgKind = text(1)?.parse().map_err(|e: Refusal| e.to_string())?;
                self.orgs.insert(text(0)?, kind);
            }
            "relations" => {
                self.relations.insert((text(0)?, text(1)?));
            }
            "programmes" => {
                let spec: ProgrammeSpec = serde_json::from_str(&text(1)?)
                    .map_err(|e| format!("programme {}: {e}", text(0).unwrap_or_default()))?;
                self.specs.insert(spec.id.clone(), spec);
            }
            "billing" => self.judge_bill(before, &now, row)?,
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, sql: &rusqlite::Connection) -> Result<(), LedgerError> {
        let problems = rule_problems(sql, self)?;
        self.problems.extend(problems);
        Ok(())
    }
}

/// The cells of a journaled row (SQL literals: `'text'`, `12`, `NULL`).
fn cells(row: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(row).map_err(|_| format!("unreadable row {row}"))
}

/// How each voucher table may change over its history, so that an edit
/// journaled as if it were an operation (a trigger planted in the file
/// acting inside a real commit) still breaks a rule: organisations,
/// relations and refusals are only ever added; a programme's definition
/// never changes, only its funding grows; a bill is added as held and ends
/// once (settled, released or expired), its hold never rewritten; nothing
/// is deleted.
fn history_rule(table: &str, before: Option<&str>, after: Option<&str>) -> Result<(), String> {
    let (Some(row), before) = (after, before) else {
        return Err(format!("a {table} row was deleted: rows of the books are never deleted"));
    };
    let now = cells(row)?;
    let was = before.map(cells).transpose()?;
    // Every journaled row has its key first: a row without one is no row of the books.
    if now.is_empty() || was.as_ref().is_some_and(|w| w.is_empty()) {
        return Err(format!("an empty {table} row: {row}"));
    }
    let same = |was: &[String], columns: &[usize]| columns.iter().all(|&i| was.get(i) == now.get(i));
    match (table, was) {
        ("orgs" | "relations" | "refusals", Some(_)) => {
            Err(format!("a {table} row was changed: {table} are only ever added ({row})"))
        }
        ("programmes", Some(was)) => {
            let grows = |i: usize| {
                let n = |c: &[String]| c.get(i).and_then(|v| v.parse::<i64>().ok());
                matches!((n(&was), n(&now)), (Some(a), Some(b)) if b >= a)
            };
            if !same(&was, &[0, 1, 2]) {
                return Err(format!(
                    "programme {} was redefined: its rates, caps and eligibility never change",
                    now[0]
                ));
            }
            if !grows(3) || !grows(4) {
                return Err(format!("programme {}: its funding totals went down", now[0]));
            }
            Ok(())
        }
        ("billing", None) if now.get(7).map(String::as_str) != Some("'held'") => {
            Err(format!("bill {} was added as {}, not held", now[0], now.get(7).cloned().unwrap_or_default()))
        }
        ("billing", Some(was)) => {
            let ended = ["'settled'", "'released'", "'expired'"];
            let (from, to) = (was.get(7).map_or("", String::as_str), now.get(7).map_or("", String::as_str));
            let step = (from == "'held'" && ended.contains(&to)) || (from == "'settled'" && to == "'refunded'");
            if !step {
                return Err(format!(
                    "bill {} went from {} to {}: a bill ends once, from held (and a settled one may be refunded)",
                    now[0],
                    was.get(7).cloned().unwrap_or_default(),
                    now.get(7).cloned().unwrap_or_default()
                ));
            }
            if !same(&was, &[0, 1, 2, 3, 4, 5, 6, 8, 10]) {
                return Err(format!("bill {}: its hold was rewritten", now[0]));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl RuleCheck {
    /// A bill as it was held or settled, against the rules of that moment
    /// (as the journal says they were, not as the tables stand): a bill
    /// made while the tables were edited around the ledger and put back
    /// afterwards still breaks them.
    fn judge_bill(&self, before: Option<&str>, now: &[String], row: &str) -> Result<(), String> {
        let text = |cells: &[String], i: usize| {
            cells.get(i).and_then(|c| unquote(c)).ok_or_else(|| format!("unreadable bill {row}"))
        };
        let number = |cells: &[String], i: usize| {
            cells.get(i).and_then(|c| c.parse::<i64>().ok()).ok_or_else(|| format!("unreadable bill {row}"))
        };
        let hold: HoldRecord = serde_json::from_str(&text(now, 8)?).map_err(|e| format!("bill {row}: {e}"))?;
        let job = &hold.job;
        let Some(programme) = &hold.bill.programme else { return Ok(()) };
        let spec = self
            .specs
            .get(programme)
            .ok_or_else(|| format!("bill of job {job}: programme {programme} does not exist"))?;
        match before {
            None => {
                let b = &hold.bill;
                if b.subsidy_fen == 0 {
                    return Ok(());
                }
                let held_at = number(now, 10)?;
                let (org, provider) = (&b.org, &hold.placement.provider);
                let kind = self
                    .orgs
                    .get(org)
                    .ok_or_else(|| format!("bill of job {job}: organisation {org} does not exist"))?;
                let rate = if hold.placement.domestic { spec.rate_bp } else { spec.foreign_rate_bp };
                let payable =
                    compute_fen(hold.estimated.accel_seconds - b.card_seconds, hold.placement.price_fen_per_hour);
                let broken = if org == provider || self.relations.contains(&(org.clone(), provider.clone())) {
                    Some(format!("{org} and {provider} were related parties"))
                } else if !spec.kinds.contains(kind) {
                    Some(format!("programme {programme} did not admit {kind:?} organisations"))
                } else if !spec.sites.is_empty() && !spec.sites.contains(&hold.placement.site) {
                    Some(format!("programme {programme} did not cover site {}", hold.placement.site))
                } else if !spec.accels.is_empty() && !spec.accels.contains(&hold.placement.accel) {
                    Some(format!("programme {programme} did not cover {}", hold.placement.accel))
                } else if held_at < spec.valid_from || held_at >= spec.valid_until {
                    Some(format!("programme {programme} was not valid at {held_at}"))
                } else if b.rate_bp != rate {
                    Some(format!("the rate was {rate} bp, the bill says {}", b.rate_bp))
                } else if b.subsidy_fen > spec.job_cap_fen {
                    Some(format!("the per-job cap was {} fen", spec.job_cap_fen))
                } else if b.subsidy_fen as i128 > payable as i128 * rate as i128 / 10_000 {
                    Some(format!("{rate} bp of {payable} fen is less than the subsidy"))
                } else {
                    None
                };
                match broken {
                    Some(why) => Err(format!("bill of job {job} holds {} fen of subsidy, but {why}", b.subsidy_fen)),
                    None => Ok(()),
                }
            }
            Some(_) if text(now, 7)? == "settled" => {
                let s: Settlement = serde_json::from_str(&text(now, 9)?).map_err(|e| format!("bill {row}: {e}"))?;
                let settled_at = number(now, 11)?;
                if s.bill.subsidy_fen > hold.bill.subsidy_fen {
                    return Err(format!("job {job} settled with more subsidy than it held"));
                }
                if s.bill.subsidy_fen > 0 && settled_at >= spec.valid_until {
                    return Err(format!(
                        "job {job} was paid {} fen of subsidy after programme {programme} ended",
                        s.bill.subsidy_fen
                    ));
                }
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}

/// Verifies the ledger file in `path` ([`crate::verify_anchored`]) and the
/// voucher rules over its whole history, on one snapshot: every transfer
/// follows a permitted flow; every programme's pool received exactly the
/// funding recorded on it; no organisation's subsidy in a year exceeds its
/// cap (across the issuer where the cap says so); the per-year counters
/// match the jobs; no job's subsidy was posted twice; held jobs still hold.
/// Returns the book's report and the broken rules (none: all hold).
pub fn verify_file(
    path: impl AsRef<std::path::Path>,
    anchor: Option<crate::ledger::Anchor>,
) -> Result<(crate::ledger::VerifyReport, Vec<String>), LedgerError> {
    let mut check = RuleCheck::default();
    let report = crate::ledger::verify_with(path, anchor, &mut check)?;
    Ok((report, check.problems))
}

/// [`verify_file`] of an open ledger's file: the broken rules.
pub fn verify(ledger: &Ledger) -> Result<Vec<String>, LedgerError> {
    Ok(verify_file(ledger.path(), None)?.1)
}

fn rule_problems(sql: &rusqlite::Connection, check: &RuleCheck) -> Result<Vec<String>, LedgerError> {
    let corrupt = |e: serde_json::Error| LedgerError::Corrupt { path: "billing".into(), problem: e.to_string() };
    let mut problems = Vec::new();
    let all = programmes_of(sql)?;
    for p in &all {
        let (funded, defunded) = check.funding.get(&programme_pool(&p.spec.id)).copied().unwrap_or((0, 0));
        if (funded, defunded) != (p.funded_fen, p.defunded_fen) {
            problems.push(format!(
                "programme {}: transfers funded {funded} and defunded {defunded} fen, the programme records {} and {}",
                p.spec.id, p.funded_fen, p.defunded_fen
            ));
        }
    }
    let funded_pools: std::collections::HashSet<AccountId> = all.iter().map(|p| programme_pool(&p.spec.id)).collect();
    if let Some(pool) = check.funding.keys().find(|k| !funded_pools.contains(k)) {
        problems.push(format!("account {pool}: funded as a programme pool, but no programme has it"));
    }
    let specs: Vec<ProgrammeSpec> = all.into_iter().map(|p| p.spec).collect();
    let rows: Vec<(String, String, i32, i64, i64)> = {
        let mut stmt = sql
            .prepare("SELECT programme, org, year, held_fen, posted_fen FROM org_year ORDER BY programme, org, year")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut jobs =
        sql.prepare("SELECT state, hold, settlement FROM billing WHERE programme = ?1 AND org = ?2 AND year = ?3")?;
    for (programme_id, org, year, held, posted) in &rows {
        let Some(p) = specs.iter().find(|p| &p.id == programme_id) else {
            problems.push(format!("org_year: counters of {programme_id}, which is not a programme"));
            continue;
        };
        let used = year_used(sql, &specs, p, org, *year)?;
        if used > p.org_year_cap_fen {
            let over = match p.cap_per {
                CapScope::Issuer => format!("from issuer {}'s programmes", p.issuer),
                CapScope::Programme => "from it".to_string(),
            };
            problems
                .push(format!("programme {}: {org} in {year} has {used} fen {over}, cap {}", p.id, p.org_year_cap_fen));
        }
        let (mut want_held, mut want_posted) = (0i64, 0i64);
        let listed: Vec<(String, String, Option<String>)> = jobs
            .query_map(params![programme_id, org, year], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (state, hold, settlement) in listed {
            let hold: HoldRecord = serde_json::from_str(&hold).map_err(corrupt)?;
            match state.as_str() {
                "held" => want_held = want_held.saturating_add(hold.bill.subsidy_fen),
                "settled" => {
                    let s: Settlement =
                        serde_json::from_str(settlement.as_deref().unwrap_or("null")).map_err(corrupt)?;
                    want_posted = want_posted.saturating_add(s.bill.subsidy_fen);
                }
                _ => {}
            }
        }
        if (*held, *posted) != (want_held, want_posted) {
            problems.push(format!(
                "programme {programme_id}: {org} in {year}: counters ({held}, {posted}) but jobs say ({want_held}, {want_posted})"
            ));
        }
    }
    let mut twice: Vec<&String> = check.subsidies.iter().filter(|(_, (n, _))| *n > 1).map(|(job, _)| job).collect();
    twice.sort();
    for job in twice {
        problems.push(format!("job {job}: subsidy posted more than once"));
    }
    // What each settled bill says the voucher paid is what the transfers
    // paid; a refunded one, all of it given back.
    let settled: Vec<(String, String, String)> = {
        let mut stmt = sql.prepare(
            "SELECT job, state, settlement FROM billing WHERE state IN ('settled', 'refunded') ORDER BY job",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<String>>(2)?.unwrap_or_default())))?
            .collect::<Result<_, _>>()?
    };
    let mut billed = std::collections::HashSet::new();
    for (job, state, settlement) in &settled {
        let s: Settlement = serde_json::from_str(settlement).map_err(corrupt)?;
        let paid = check.subsidies.get(job).map_or(0, |(_, amount)| *amount);
        let back = check.refunds.get(job).copied().unwrap_or(0);
        let want_back = if state == "refunded" { s.bill.subsidy_fen } else { 0 };
        if paid != s.bill.subsidy_fen || back != want_back {
            problems.push(format!(
                "job {job} ({state}): the bill says the voucher paid {} fen and got {want_back} back, the transfers {paid} and {back}",
                s.bill.subsidy_fen
            ));
        }
        billed.insert(job.as_str());
    }
    let mut refunded_unbilled: Vec<&String> =
        check.refunds.keys().filter(|job| !billed.contains(job.as_str())).collect();
    refunded_unbilled.sort();
    for job in refunded_unbilled {
        problems.push(format!("job {job}: subsidy was refunded, but no bill says so"));
    }
    let mut unbilled: Vec<&String> = check.subsidies.keys().filter(|job| !billed.contains(job.as_str())).collect();
    unbilled.sort();
    for job in unbilled {
        problems.push(format!("job {job}: subsidy was paid, but no settled bill says so"));
    }
    // An issuer's cap is one cap.
    for p in specs.iter().filter(|p| p.cap_per == CapScope::Issuer) {
        if let Some(q) = specs
            .iter()
            .find(|q| q.issuer == p.issuer && q.cap_per == CapScope::Issuer && q.org_year_cap_fen != p.org_year_cap_fen)
        {
            problems.push(format!(
                "issuer {}: programmes {} and {} cap an organisation differently ({} and {} fen)",
                p.issuer, p.id, q.id, p.org_year_cap_fen, q.org_year_cap_fen
            ));
            break;
        }
    }
    let held: Vec<String> = {
        let mut stmt = sql.prepare("SELECT job FROM billing WHERE state = 'held' ORDER BY job")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut state_of = sql.prepare("SELECT state FROM pending WHERE id = ?1")?;
    for job in held {
        let (_, hold, _) = load_hold(sql, &job)?.expect("listed job");
        for (part, ..) in hold_parts(&hold) {
            let state: Option<i64> =
                state_of.query_row([part_id(&job, "hold", part).0.to_be_bytes()], |r| r.get(0)).optional()?;
            if state.map(PendingState::from_code) != Some(PendingState::Pending) {
                problems.push(format!("job {job}: held, but its {part} hold is not pending"));
            }
        }
    }
    Ok(problems)
}
