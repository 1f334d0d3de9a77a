//! Plain-text tables for the terminal: left-aligned first column,
//! right-aligned numbers, columns as wide as their widest cell.

use std::fmt::Write as _;

use serde::Serialize;
use suanwang_sim::PolicySummary;

/// Does a cell read as a number (or a blank)? Such columns are right-aligned.
fn numeric(cell: &str) -> bool {
    let cell = cell.trim();
    cell.is_empty()
        || cell == "-"
        || (cell.chars().any(|c| c.is_ascii_digit())
            && cell.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | ',' | '%' | '+')))
}

pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    // Numbers line up on the right, words on the left; a header goes the
    // way of its column. The first column is always on the left.
    let right: Vec<bool> = (0..headers.len())
        .map(|i| i > 0 && !rows.is_empty() && rows.iter().all(|r| r.get(i).is_none_or(|c| numeric(c))))
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut parts = Vec::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i] - cell.chars().count();
            parts.push(if right[i] {
                format!("{}{cell}", " ".repeat(pad))
            } else {
                format!("{cell}{}", " ".repeat(pad))
            });
        }
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, &mut headers.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

pub fn results(policies: &[PolicySummary]) -> String {
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|s| {
            vec![
                s.policy.clone(),
                s.jobs_completed.to_string(),
                s.jobs_rejected.to_string(),
                format!("{:.0}", s.mean_jct_s),
                s.p50_jct_s.to_string(),
                s.p95_jct_s.to_string(),
                s.p99_jct_s.to_string(),
                format!("{:.0}", s.mean_wait_s),
                format!("{:.3}", s.utilization),
                format!("{:.2}", s.compute_cost_fen as f64 / 100.0),
                format!("{:.2}", s.transfer_cost_fen as f64 / 100.0),
                format!("{:.1}", s.carbon_kg),
                format!("{:.3}", s.jain_fairness),
                s.preemptions.to_string(),
                s.wall_ms.to_string(),
            ]
        })
        .collect();
    render(
        &[
            "policy",
            "done",
            "rejected",
            "mean JCT s",
            "p50",
            "p95",
            "p99",
            "wait s",
            "util",
            "compute ¥",
            "transfer ¥",
            "CO2 kg",
            "Jain",
            "preempt",
            "wall ms",
        ],
        &rows,
    )
}

/// Prints `value` as one line of JSON, or the table `text` makes.
/// Prints JSON or text on stdout; a closed pipe is an error the caller
/// can recognise (`main` ends quietly on it), never a panic.
pub fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    use std::io::Write as _;
    let out = if json { format!("{}\n", serde_json::to_string(value)?) } else { text() };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
