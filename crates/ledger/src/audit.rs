//! Write-off (核销) and audit: per-provider settlement statements for a
//! period, per-programme spend reports, as rows that export to CSV or JSON.

use rusqlite::params;
use serde::Serialize;

use crate::error::{LedgerError, Refusal};
use crate::ledger::Ledger;
use crate::voucher::{self, HoldRecord, Settlement};

/// One settled job on a provider's statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementLine {
    pub job: String,
    pub org: String,
    pub site: String,
    pub accel: String,
    pub programme: String,
    pub settled_at: i64,
    pub accel_seconds: i64,
    pub card_seconds: i64,
    pub compute_fen: i64,
    pub voucher_fen: i64,
    pub org_fen: i64,
    pub transfer_fen: i64,
    pub unbilled_fen: i64,
}

/// A provider's statement for `[from, to)`: its settled jobs and their totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Statement {
    pub provider: String,
    pub from: i64,
    pub to: i64,
    pub lines: Vec<StatementLine>,
    pub total: StatementLine,
}

fn corrupt(e: serde_json::Error) -> LedgerError {
    LedgerError::Corrupt { path: "billing".into(), problem: e.to_string() }
}

/// Whose settled jobs a statement lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party<'a> {
    /// The provider running the sites (its write-off statement).
    Provider(&'a str),
    /// The organisation that owns the jobs (its bill).
    Org(&'a str),
}

pub fn statement(ledger: &Ledger, provider: &str, from: i64, to: i64) -> Result<Statement, LedgerError> {
    statement_of(ledger.connection(), Party::Provider(provider), from, to)
}

/// The settled jobs of a provider or an organisation in `[from, to)`, on
/// any connection to the ledger file (a read-only one will do).
pub fn statement_of(
    sql: &rusqlite::Connection,
    party: Party<'_>,
    from: i64,
    to: i64,
) -> Result<Statement, LedgerError> {
    let (column, name) = match party {
        Party::Provider(p) => ("provider", p),
        Party::Org(o) => ("org", o),
    };
    let mut stmt = sql.prepare(&format!(
        "SELECT hold, settlement, settled_at FROM billing WHERE {column} = ?1 AND state = 'settled' AND settled_at >= ?2 AND settled_at < ?3 ORDER BY settled_at, job"
    ))?;
    let rows: Vec<(String, String, i64)> = stmt
        .query_map(params![name, from, to], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let provider = name;
    let mut total = StatementLine {
        job: "TOTAL".into(),
        org: String::new(),
        site: String::new(),
        accel: String::new(),
        programme: String::new(),
        settled_at: 0,
        accel_seconds: 0,
        card_seconds: 0,
        compute_fen: 0,
        voucher_fen: 0,
        org_fen: 0,
        transfer_fen: 0,
        unbilled_fen: 0,
    };
    let mut lines = Vec::new();
    for (hold, settlement, settled_at) in rows {
        let hold: HoldRecord = serde_json::from_str(&hold).map_err(corrupt)?;
        let s: Settlement = serde_json::from_str(&settlement).map_err(corrupt)?;
        let line = StatementLine {
            job: hold.job.clone(),
            org: s.bill.org.clone(),
            site: hold.placement.site.clone(),
            accel: hold.placement.accel.clone(),
            programme: s.bill.programme.clone().unwrap_or_default(),
            settled_at,
            accel_seconds: s.actual.accel_seconds,
            card_seconds: s.bill.card_seconds,
            compute_fen: s.bill.compute_fen,
            voucher_fen: s.bill.subsidy_fen,
            org_fen: s.bill.org_compute_fen,
            transfer_fen: s.bill.transfer_fen,
            unbilled_fen: s.unbilled_fen,
        };
        // Checked: a total that cannot be written is refused, never wrapped.
        for (sum, value) in [
            (&mut total.accel_seconds, line.accel_seconds),
            (&mut total.card_seconds, line.card_seconds),
            (&mut total.compute_fen, line.compute_fen),
            (&mut total.voucher_fen, line.voucher_fen),
            (&mut total.org_fen, line.org_fen),
            (&mut total.transfer_fen, line.transfer_fen),
            (&mut total.unbilled_fen, line.unbilled_fen),
        ] {
            *sum = sum.checked_add(value).ok_or(LedgerError::Refused(Refusal::Overflow))?;
        }
        lines.push(line);
    }
    Ok(Statement { provider: provider.into(), from, to, lines, total })
}

/// Where a programme's money is. Two identities hold, and are checked
/// before a report is given: `pool = budget - granted + returned` (the
/// pool's side) and `granted = spent + held + vouchers + returned` (the
/// organisations' side), with `budget = funded - defunded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgrammeSpend {
    pub programme: String,
    pub issuer: String,
    /// Put in from the treasury, the creation budget included.
    pub funded_fen: i64,
    /// Taken back to the treasury by `programme defund`.
    pub defunded_fen: i64,
    /// Funded less defunded: what the programme may grant in all.
    pub budget_fen: i64,
    /// Granted to organisations, in all.
    pub granted_fen: i64,
    /// Returned to the pool from expired vouchers.
    pub returned_fen: i64,
    /// Subsidy paid for settled jobs.
    pub spent_fen: i64,
    /// Subsidy held for running jobs.
    pub held_fen: i64,
    /// Still in the programme's pool.
    pub pool_fen: i64,
    /// Granted and not yet spent or held.
    pub vouchers_fen: i64,
    /// Organisations with subsidy held or spent.
    pub organisations: i64,
}

pub fn programme_spend(ledger: &Ledger) -> Result<Vec<ProgrammeSpend>, LedgerError> {
    let sql = ledger.connection();
    let overflow = || LedgerError::Refused(Refusal::Overflow);
    let mut out = Vec::new();
    for p in voucher::programmes(ledger)? {
        let pool = voucher::programme_pool(&p.spec.id);
        // The pool is credited by its funding and by expiry returns, and
        // debited by grants and defunding: with the funding recorded on the
        // programme, its totals tell all four without a scan.
        let (debited, credited) = ledger.account(pool).map_or((0, 0), |a| (a.debits_posted, a.credits_posted));
        let returned = credited.checked_sub(p.funded_fen).ok_or_else(overflow)?;
        let granted = debited.checked_sub(p.defunded_fen).ok_or_else(overflow)?;
        let (held, spent, organisations): (i64, i64, i64) = sql.query_row(
            "SELECT COALESCE(SUM(held_fen), 0), COALESCE(SUM(posted_fen), 0), COUNT(DISTINCT org) FROM org_year WHERE programme = ?1",
            [&p.spec.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut vouchers = 0i64;
        for a in
            ledger.accounts().iter().filter(|a| a.kind == "voucher" && voucher::voucher(&p.spec.id, &a.owner) == a.id)
        {
            vouchers = vouchers.checked_add(a.available()).ok_or_else(overflow)?;
        }
        let row = ProgrammeSpend {
            programme: p.spec.id.clone(),
            issuer: p.spec.issuer.clone(),
            funded_fen: p.funded_fen,
            defunded_fen: p.defunded_fen,
            budget_fen: p.budget_fen(),
            granted_fen: granted,
            returned_fen: returned,
            spent_fen: spent,
            held_fen: held,
            pool_fen: ledger.account(pool).map_or(0, |a| a.available()),
            vouchers_fen: vouchers,
            organisations,
        };
        // A report that does not add up is a broken book, never printed as if it were right.
        let wide = |v: i64| v as i128;
        let pool_side = wide(row.budget_fen) - wide(row.granted_fen) + wide(row.returned_fen) == wide(row.pool_fen);
        let org_side = wide(row.granted_fen)
            == wide(row.spent_fen) + wide(row.held_fen) + wide(row.vouchers_fen) + wide(row.returned_fen);
        if !pool_side || !org_side {
            return Err(LedgerError::Corrupt {
                path: ledger.path().to_string(),
                problem: format!("the spend report of programme {} does not add up: {row:?}", row.programme),
            });
        }
        out.push(row);
    }
    Ok(out)
}

/// Rows as CSV with a header, safe to open in a spreadsheet: a text cell
/// that a spreadsheet would take for a formula (starting with `=`, `+`,
/// `-`, `@`, a tab or a carriage return) is prefixed with `'`; numbers are
/// left as they are.
pub fn to_csv<T: Serialize>(rows: &[T]) -> Result<String, LedgerError> {
    let fail = |e: &dyn std::fmt::Display| LedgerError::Corrupt { path: "csv".into(), problem: e.to_string() };
    let mut plain = csv::Writer::from_writer(Vec::new());
    for row in rows {
        plain.serialize(row).map_err(|e| fail(&e))?;
    }
    let plain = plain.into_inner().map_err(|e| fail(&e))?;
    // Read the records back and write them again with risky cells escaped:
    // the serializer decides the columns, this decides only the cells.
    let mut safe = csv::Writer::from_writer(Vec::new());
    for record in csv::ReaderBuilder::new().has_headers(false).from_reader(plain.as_slice()).records() {
        let record = record.map_err(|e| fail(&e))?;
        safe.write_record(record.iter().map(|cell| spreadsheet_safe(cell).into_owned())).map_err(|e| fail(&e))?;
    }
    let bytes = safe.into_inner().map_err(|e| fail(&e))?;
    Ok(String::from_utf8(bytes).expect("csv of strings is utf-8"))
}

/// A cell a spreadsheet will not evaluate.
fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    let risky = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if risky && cell.parse::<i64>().is_err() && cell.parse::<f64>().map_or(true, |f| !f.is_finite()) {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        job: String,
        amount_fen: i64,
    }

    #[test]
    fn formulas_are_escaped_and_numbers_kept() {
        let rows = [
            Row { job: "=HYPERLINK(\"http://x\",\"y\")".into(), amount_fen: -100 },
            Row { job: "+1".into(), amount_fen: 5 },
            Row { job: "-1+2".into(), amount_fen: 0 },
            Row { job: "@SUM(A1)".into(), amount_fen: 1 },
            Row { job: "plain".into(), amount_fen: 2 },
        ];
        let csv = to_csv(&rows).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "job,amount_fen");
        assert_eq!(lines[1], "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\",-100");
        // "+1" is a number to a spreadsheet, not a formula.
        assert_eq!(lines[2], "+1,5");
        assert_eq!(lines[3], "'-1+2,0");
        assert_eq!(lines[4], "'@SUM(A1),1");
        assert_eq!(lines[5], "plain,2");
    }
}
