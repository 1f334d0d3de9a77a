//! A workload: a trace read into memory, sorted by submission, rebased to
//! start at time zero, and the network it runs on, with capacity scaled so
//! the trace's offered load is the requested fraction of it.
//!
//! Offered load is work over capacity: the sum of accelerators times
//! duration (at reference speed), divided by the span of submissions, over
//! the network's capacity in reference-speed accelerators (count times
//! speed). `--load X` scales every pool so that ratio is X. When the scaled
//! network would be too small to hold the trace's largest gang in a single
//! origin city, capacity is kept at the smallest scale that holds it and
//! submissions are compressed in time instead, by the factor that brings
//! the load back to X; the JSON output reports both (`capacity_scale`,
//! `time_compression`).

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use suanwang_core::topology::{SiteLevel, Topology, TopologySpec};
use suanwang_topology::{LoadError, scale_capacity};
use suanwang_trace::{Format, LoadStats, TraceError, TraceJob};

/// Traces compiled into the binary, by name: (name, format label, text).
pub const BUNDLED_TRACES: &[(&str, &str)] = &[("itp-cluster01", include_str!("../traces/itp-cluster01.csv"))];

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Topology(#[from] LoadError),
    #[error("{0}: the trace has no jobs")]
    Empty(String),
    #[error("--load must be a positive number, got {0}")]
    BadLoad(f64),
}

/// A trace ready to replay.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    /// Jobs by submission time (ties in file order), submissions from 0.
    pub jobs: Vec<TraceJob>,
    pub stats: LoadStats,
}

/// Reads a trace file, or a bundled trace by name.
pub fn read_trace(name_or_path: &str, format: Option<&Format>) -> Result<Workload, WorkloadError> {
    let (jobs, stats) = if let Some((_, text)) = BUNDLED_TRACES.iter().find(|(n, _)| *n == name_or_path) {
        let format = format.cloned().unwrap_or(Format::Itp);
        let mut reader =
            suanwang_trace::open_reader(Path::new(name_or_path), Box::new(BufReader::new(text.as_bytes())), &format)?;
        let jobs = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
        (jobs, reader.stats().clone())
    } else {
        let path = Path::new(name_or_path);
        let format = match format {
            Some(f) => f.clone(),
            None => Format::detect(path)?,
        };
        suanwang_trace::read_all(path, &format)?
    };
    Workload::new(name_or_path, jobs, stats)
}

impl Workload {
    pub fn new(name: &str, mut jobs: Vec<TraceJob>, stats: LoadStats) -> Result<Workload, WorkloadError> {
        if jobs.is_empty() {
            return Err(WorkloadError::Empty(name.to_string()));
        }
        // Stable: equal submission times keep file order.
        jobs.sort_by_key(|j| j.submit_s);
        let first = jobs[0].submit_s;
        for job in &mut jobs {
            job.submit_s -= first;
        }
        Ok(Workload { name: name.to_string(), jobs, stats })
    }

    /// The trace repeated `copies` times, each copy shifted to start when the
    /// previous one's submissions end: a longer stream with the real
    /// arrival pattern, durations and gang sizes, for scale runs.
    pub fn replicated(&self, copies: usize) -> Workload {
        let span = self.span_s() + 1;
        let mut jobs = Vec::with_capacity(self.jobs.len() * copies);
        for copy in 0..copies as u64 {
            jobs.extend(self.jobs.iter().map(|j| TraceJob { submit_s: j.submit_s + copy * span, ..j.clone() }));
        }
        let mut stats = self.stats.clone();
        stats.jobs *= copies as u64;
        stats.rows *= copies as u64;
        Workload { name: format!("{} x{copies}", self.name), jobs, stats }
    }

    pub fn span_s(&self) -> u64 {
        self.jobs.last().map_or(0, |j| j.submit_s)
    }

    /// Accelerator-seconds of work at reference speed.
    pub fn work_gpu_s(&self) -> u128 {
        self.jobs.iter().map(|j| j.gpus as u128 * j.duration_s as u128).sum()
    }

    pub fn largest_gang(&self) -> u32 {
        self.jobs.iter().map(|j| j.gpus).max().unwrap_or(1)
    }

    /// Offered load on a network: work per second of submission span over
    /// capacity in reference-speed accelerators.
    pub fn offered_load(&self, topology: &Topology) -> f64 {
        let capacity = topology.reference_capacity_milli() as f64 / 1000.0;
        self.work_gpu_s() as f64 / self.span_s().max(1) as f64 / capacity
    }
}

/// The network and workload after load scaling.
#[derive(Debug, Clone)]
pub struct Scaled {
    pub topology: Arc<Topology>,
    pub workload: Workload,
    pub capacity_scale: f64,
    pub time_compression: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ScaleReport {
    pub capacity_scale: f64,
    pub time_compression: f64,
    pub accelerators: u64,
}

fn reference_capacity(spec: &TopologySpec, factor: f64) -> f64 {
    let catalogue = &spec.accelerators;
    scale_capacity(spec, factor)
        .sites
        .iter()
        .flat_map(|s| &s.pools)
        .map(|p| {
            let speed = p.speed.or_else(|| catalogue.iter().find(|a| a.kind == p.kind).map(|a| a.speed)).unwrap_or(1.0);
            p.count as f64 * speed
        })
        .sum()
}

fn largest_local_pool(spec: &TopologySpec, factor: f64) -> i64 {
    scale_capacity(spec, factor)
        .sites
        .iter()
        .filter(|s| matches!(s.level, SiteLevel::Provincial | SiteLevel::City | SiteLevel::Edge))
        .flat_map(|s| &s.pools)
        .map(|p| p.count)
        .max()
        .unwrap_or(0)
}

/// Smallest factor in `[lo, hi]` for which `ok` holds (`ok` is monotone).
fn smallest_factor(mut lo: f64, mut hi: f64, ok: impl Fn(f64) -> bool) -> f64 {
    for _ in 0..100 {
        let mid = (lo * hi).sqrt();
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Scales the network so the workload's offered load is `load`; `None`
/// keeps the network as it is.
pub fn scale(
    spec: &TopologySpec,
    workload: &Workload,
    load: Option<f64>,
    file: &Path,
) -> Result<Scaled, WorkloadError> {
    let Some(load) = load else {
        return Ok(Scaled {
            topology: Arc::new(suanwang_topology::build(spec, file)?),
            workload: workload.clone(),
            capacity_scale: 1.0,
            time_compression: 1.0,
        });
    };
    if !(load.is_finite() && load > 0.0) {
        return Err(WorkloadError::BadLoad(load));
    }
    let work_per_s = workload.work_gpu_s() as f64 / workload.span_s().max(1) as f64;
    let target = work_per_s / load;
    let for_load = smallest_factor(1e-9, 1e9, |f| reference_capacity(spec, f) >= target);
    let gang = workload.largest_gang() as i64;
    let for_gang = smallest_factor(1e-9, 1e9, |f| largest_local_pool(spec, f) >= gang);
    let factor = for_load.max(for_gang);
    let scaled_spec = scale_capacity(spec, factor);
    let topology = Arc::new(suanwang_topology::build(&scaled_spec, file)?);
    let capacity = reference_capacity(spec, factor);
    // Compress submissions so the larger network still sees `load`.
    let compression = (capacity / target).max(1.0);
    let mut workload = workload.clone();
    if compression > 1.0 + 1e-9 {
        for job in &mut workload.jobs {
            job.submit_s = (job.submit_s as f64 / compression).round() as u64;
        }
    }
    Ok(Scaled { topology, workload, capacity_scale: factor, time_compression: compression })
}
