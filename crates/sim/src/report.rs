//! The HTML report of a simulation: the results table and three SVG plots
//! (JCT CDF per policy; utilisation over time by site level, per policy;
//! total cost against mean JCT per policy), in one self-contained page.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::Serialize;

use crate::metrics::PolicyResult;

/// What the report says about the run, above the table.
#[derive(Debug, Clone, Serialize)]
pub struct ReportHeader {
    pub trace: String,
    pub topology: String,
    pub jobs: usize,
    pub seed: u64,
    pub load: Option<f64>,
    pub capacity_scale: f64,
    pub time_compression: f64,
    pub accelerators: u64,
}

const COLOURS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders the full HTML page.
pub fn html(header: &ReportHeader, results: &[PolicyResult]) -> Result<String, String> {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>suanwang simulation: {}</title>\n<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}.plots svg{{margin:0.5em}}</style></head><body>\n",
        escape(&header.trace)
    );
    let load = header.load.map_or("native capacity".to_string(), |l| format!("{l}"));
    let _ = write!(
        page,
        "<h1>suanwang simulation</h1>\n<p>Trace <b>{}</b> ({} jobs) on topology <b>{}</b> ({} accelerators after scaling), seed {}, load {}, capacity scale {:.4}, time compression {:.3}.</p>\n",
        escape(&header.trace),
        header.jobs,
        escape(&header.topology),
        header.accelerators,
        header.seed,
        load,
        header.capacity_scale,
        header.time_compression
    );
    page.push_str("<h2>Results</h2>\n<table><tr><th>policy</th><th>completed</th><th>rejected</th><th>mean JCT (s)</th><th>p50</th><th>p95</th><th>p99</th><th>mean wait (s)</th><th>makespan (s)</th><th>utilisation</th><th>compute (yuan)</th><th>transfer (yuan)</th><th>transfer (GB)</th><th>carbon (kg)</th><th>Jain</th><th>preemptions</th><th>wall (ms)</th></tr>\n");
    for r in results {
        let s = &r.summary;
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{:.3}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{:.1}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.policy),
            s.jobs_completed,
            s.jobs_rejected,
            s.mean_jct_s,
            s.p50_jct_s,
            s.p95_jct_s,
            s.p99_jct_s,
            s.mean_wait_s,
            s.makespan_s,
            s.utilization,
            s.compute_cost_fen as f64 / 100.0,
            s.transfer_cost_fen as f64 / 100.0,
            s.transfer_gb,
            s.carbon_kg,
            s.jain_fairness,
            s.preemptions,
            s.wall_ms
        );
    }
    page.push_str("</table>\n<div class=\"plots\">\n<h2>Job completion time CDF</h2>\n");
    page.push_str(&svg(900, 450, |area| jct_cdf(area, results))?);
    page.push_str("\n<h2>Total cost against mean JCT</h2>\n");
    page.push_str(&svg(900, 450, |area| cost_vs_jct(area, results))?);
    page.push_str("\n<h2>Utilisation over time by site level</h2>\n");
    for r in results {
        if r.series.is_some() {
            page.push_str(&svg(580, 300, |area| utilisation(area, r))?);
        }
    }
    page.push_str("\n</div>\n<p>Sources: Microsoft ITP traces (MIT), Alibaba openb (CC BY 4.0), Philly/Gavel (MIT); see ../shared/traces. Topology capacities and prices are illustrative.</p>\n</body></html>\n");
    Ok(page)
}

fn svg(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> PlotResult,
) -> Result<String, String> {
    let mut out = String::new();
    {
        let area = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        area.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&area).map_err(|e| e.to_string())?;
        area.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn jct_cdf(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, results: &[PolicyResult]) -> PlotResult {
    let max_h = results.iter().filter_map(|r| r.jcts_s.last()).max().map_or(1.0, |&s| s as f64 / 3600.0).max(0.2);
    let mut chart = ChartBuilder::on(area)
        .caption("JCT CDF (log time axis)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0.01f64..max_h * 1.1).log_scale(), 0f64..1f64)?;
    chart.configure_mesh().x_desc("JCT (hours)").y_desc("fraction of jobs").draw()?;
    for (i, r) in results.iter().enumerate() {
        let n = r.jcts_s.len().max(1) as f64;
        // At most ~500 points per curve keeps the SVG small.
        let step = (r.jcts_s.len() / 500).max(1);
        let points: Vec<(f64, f64)> = r
            .jcts_s
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k + 1 == r.jcts_s.len())
            .map(|(k, &j)| ((j as f64 / 3600.0).max(0.01), (k + 1) as f64 / n))
            .collect();
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(r.summary.policy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

fn cost_vs_jct(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, results: &[PolicyResult]) -> PlotResult {
    let points: Vec<(f64, f64)> =
        results.iter().map(|r| (r.summary.mean_jct_s / 3600.0, r.summary.total_cost_fen() as f64 / 100.0)).collect();
    let max_x = points.iter().map(|p| p.0).fold(0.0, f64::max).max(0.1) * 1.15;
    let max_y = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Total cost (compute + transfer) against mean JCT", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)?;
    chart.configure_mesh().x_desc("mean JCT (hours)").y_desc("total cost (yuan)").draw()?;
    for (i, (r, &(x, y))) in results.iter().zip(&points).enumerate() {
        let c = colour(i);
        chart.draw_series(std::iter::once(Circle::new((x, y), 6, c.filled())))?;
        chart.draw_series(std::iter::once(Text::new(
            r.summary.policy.clone(),
            (x, y),
            ("sans-serif", 14).into_font().color(&c),
        )))?;
    }
    Ok(())
}

fn utilisation(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, result: &PolicyResult) -> PlotResult {
    let series = result.series.as_ref().expect("series kept");
    let buckets = series.levels.first().map_or(1, |(_, v)| v.len());
    let hours = |b: usize| (b as u64 * series.bucket_s) as f64 / 3600.0;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{}: busy share by site level", result.summary.policy), ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..hours(buckets).max(0.01), 0f64..1.05f64)?;
    chart.configure_mesh().x_desc("time (hours)").y_desc("busy").draw()?;
    for (i, (level, values)) in series.levels.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(values.iter().enumerate().map(|(b, &v)| (hours(b), v)), c.stroke_width(1)))?
            .label(level.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
