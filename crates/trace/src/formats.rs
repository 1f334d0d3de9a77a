//! Trace file formats, read as streams.
//!
//! | format | file | submit | duration | accelerators |
//! |---|---|---|---|---|
//! | `itp` | Microsoft ITP `raw/clusterNN.csv` | `submission_time` | `duration` | `num_gpu` |
//! | `openb` | Alibaba `openb_pod_list_*.csv` | `creation_time` | `deletion_time - scheduled_time` | `num_gpu` (type from `gpu_spec`) |
//! | `gavel` | Philly/Gavel `<vc>.trace[.gz]` (tab-separated) | `arrival_time` | `total_steps / throughput(model)` | `scale_factor` |
//! | `csv` | any CSV with a header, by `--columns` | `submit=COL` | `duration=COL` | `gpus=COL` |
//!
//! Rows that describe no accelerator job are skipped and counted in
//! [`LoadStats::skipped`] by reason, never silently:
//!
//! - openb pods with `num_gpu = 0` (CPU-only): `cpu_only`;
//! - openb pods never scheduled (`Pending`, empty `scheduled_time`): `never_scheduled`;
//! - openb pods whose deletion is not after scheduling: `zero_duration`.
//!
//! openb pods still `Running` at the end of the trace are censored: their
//! deletion time is the end of the trace, so their duration is a lower
//! bound. They are kept with that duration and counted in
//! [`LoadStats::censored`]. Fractional-GPU pods (`gpu_milli < 1000`) are
//! scheduled as one whole accelerator, since suanwang allocates whole
//! accelerators.
//!
//! Gavel traces give training steps, not seconds. Each model family gets
//! one throughput, calibrated so that the family's mean run time equals the
//! mean of the real Philly run-time distribution (14,613 s, in
//! `philly_runtime_only_alibaba`); see [`GAVEL_STEPS_PER_S`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::Serialize;

/// One job of a trace, as the trace tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceJob {
    /// Line of the file the job came from (1 = header, if any; 32 bits, so
    /// that a million jobs stay small).
    pub line: u32,
    pub submit_s: u64,
    /// Run time as recorded (taken to be at reference speed, A100 = 1.0).
    pub duration_s: u64,
    pub gpus: u32,
    pub gpu_type: Option<String>,
    pub user: Option<String>,
    /// The duration is a lower bound (the job was still running when the trace ended).
    pub censored: bool,
    /// The run time its user asked for, when the trace records it (the
    /// `estimate` column of `--columns`; 32 bits, 136 years, so a million
    /// jobs stay small).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_s: Option<std::num::NonZeroU32>,
}

/// A problem in a trace file: `file:line: problem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {problem}", file.display())]
pub struct TraceError {
    pub file: PathBuf,
    pub line: u64,
    pub problem: String,
}

/// What reading a trace saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadStats {
    pub rows: u64,
    pub jobs: u64,
    pub censored: u64,
    pub skipped: BTreeMap<&'static str, u64>,
}

/// Which column holds what, for the generic CSV loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    pub submit: String,
    pub duration: String,
    pub gpus: String,
    pub gpu_type: Option<String>,
    pub user: Option<String>,
    /// The run time the user asked for (seconds).
    pub estimate: Option<String>,
}

impl ColumnMap {
    /// Parses `submit=COL,duration=COL,gpus=COL[,gpu_type=COL][,user=COL][,estimate=COL]`.
    pub fn parse(text: &str) -> Result<ColumnMap, String> {
        let mut fields: BTreeMap<&str, String> = BTreeMap::new();
        for part in text.split(',') {
            let Some((key, column)) = part.split_once('=') else {
                return Err(format!("--columns: '{part}' is not KEY=COLUMN"));
            };
            let key = key.trim();
            if !["submit", "duration", "gpus", "gpu_type", "user", "estimate"].contains(&key) {
                return Err(format!(
                    "--columns: unknown key '{key}' (known: submit, duration, gpus, gpu_type, user, estimate)"
                ));
            }
            if column.trim().is_empty() {
                return Err(format!("--columns: {key} names no column"));
            }
            if fields.insert(key, column.trim().to_string()).is_some() {
                return Err(format!("--columns: {key} given twice"));
            }
        }
        let mut required = |key: &str| fields.remove(key).ok_or_else(|| format!("--columns: missing {key}=COLUMN"));
        Ok(ColumnMap {
            submit: required("submit")?,
            duration: required("duration")?,
            gpus: required("gpus")?,
            gpu_type: fields.remove("gpu_type"),
            user: fields.remove("user"),
            estimate: fields.remove("estimate"),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Itp,
    Openb,
    Gavel,
    Csv(ColumnMap),
}

impl Format {
    /// The format named on the command line; `csv` needs a column map.
    pub fn parse(name: &str, columns: Option<&str>) -> Result<Format, String> {
        let format = match name {
            "itp" => Format::Itp,
            "openb" => Format::Openb,
            "gavel" => Format::Gavel,
            "csv" => {
                let columns = columns.ok_or("--trace-format csv needs --columns submit=COL,duration=COL,gpus=COL")?;
                return Ok(Format::Csv(ColumnMap::parse(columns)?));
            }
            other => return Err(format!("unknown trace format '{other}' (known: itp, openb, gavel, csv)")),
        };
        if columns.is_some() {
            return Err(format!("--columns only applies to --trace-format csv, not {name}"));
        }
        Ok(format)
    }

    /// Guesses the format from the file name and header line.
    pub fn detect(path: &Path) -> Result<Format, TraceError> {
        let name = path.to_string_lossy();
        if name.ends_with(".trace") || name.ends_with(".trace.gz") {
            return Ok(Format::Gavel);
        }
        let mut header = String::new();
        open_text(path)?.read_line(&mut header).map_err(|e| io_error(path, 1, e))?;
        let header = header.trim_start_matches('\u{feff}').trim();
        if header.starts_with("job_id,submission_time") {
            Ok(Format::Itp)
        } else if header.starts_with("name,cpu_milli") {
            Ok(Format::Openb)
        } else {
            Err(TraceError {
                file: path.to_path_buf(),
                line: 1,
                problem: "cannot tell the trace format from the header; pass --trace-format (itp, openb, gavel, csv)"
                    .into(),
            })
        }
    }
}

/// Steps per second per Gavel model family, calibrated so each family's
/// mean run time over seed 0 equals the mean Philly run time (14,613 s).
pub const GAVEL_STEPS_PER_S: [(&str, f64); 7] = [
    ("A3C", 65.35),
    ("CycleGAN", 51.44),
    ("LM", 1151.9),
    ("Recommendation", 4.223),
    ("ResNet-18", 374.3),
    ("ResNet-50", 74.06),
    ("Transformer", 83.05),
];

fn io_error(path: &Path, line: u64, e: std::io::Error) -> TraceError {
    TraceError { file: path.to_path_buf(), line, problem: format!("cannot read: {e}") }
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead>, TraceError> {
    let file = File::open(path).map_err(|e| io_error(path, 0, e))?;
    let raw: Box<dyn Read> =
        if path.extension().is_some_and(|e| e == "gz") { Box::new(MultiGzDecoder::new(file)) } else { Box::new(file) };
    Ok(Box::new(BufReader::with_capacity(1 << 16, raw)))
}

struct Columns {
    submit: usize,
    duration: usize,
    /// openb: duration is `duration - start` (deletion - scheduled).
    start: Option<usize>,
    gpus: usize,
    gpu_type: Option<usize>,
    user: Option<usize>,
    estimate: Option<usize>,
    /// openb: `gpu_milli` and `pod_phase`.
    openb: Option<(usize, usize)>,
}

enum Inner {
    Csv { reader: csv::Reader<Box<dyn BufRead>>, record: csv::StringRecord, columns: Box<Columns> },
    Gavel { reader: Box<dyn BufRead>, line: u64, buffer: String },
}

/// A streaming reader of one trace file.
pub struct TraceReader {
    file: PathBuf,
    inner: Inner,
    stats: LoadStats,
    done: bool,
}

/// Opens a trace file for streaming.
pub fn open(path: &Path, format: &Format) -> Result<TraceReader, TraceError> {
    open_reader(path, open_text(path)?, format)
}

/// Streams a trace from any reader; `path` only names it in errors.
pub fn open_reader(path: &Path, text: Box<dyn BufRead>, format: &Format) -> Result<TraceReader, TraceError> {
    let inner = match format {
        Format::Gavel => Inner::Gavel { reader: text, line: 0, buffer: String::new() },
        _ => {
            let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text);
            let headers = reader
                .headers()
                .map_err(|e| csv_error(path, 1, e))?
                .iter()
                .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
                .collect::<Vec<_>>();
            let find = |name: &str| -> Result<usize, TraceError> {
                headers.iter().position(|h| h == name).ok_or_else(|| TraceError {
                    file: path.to_path_buf(),
                    line: 1,
                    problem: format!("header has no column '{name}' (columns: {})", headers.join(", ")),
                })
            };
            let columns = match format {
                Format::Itp => Columns {
                    submit: find("submission_time")?,
                    duration: find("duration")?,
                    start: None,
                    gpus: find("num_gpu")?,
                    gpu_type: None,
                    user: None,
                    estimate: None,
                    openb: None,
                },
                Format::Openb => Columns {
                    submit: find("creation_time")?,
                    duration: find("deletion_time")?,
                    start: Some(find("scheduled_time")?),
                    gpus: find("num_gpu")?,
                    gpu_type: Some(find("gpu_spec")?),
                    user: None,
                    estimate: None,
                    openb: Some((find("gpu_milli")?, find("pod_phase")?)),
                },
                Format::Csv(map) => Columns {
                    submit: find(&map.submit)?,
                    duration: find(&map.duration)?,
                    start: None,
                    gpus: find(&map.gpus)?,
                    gpu_type: map.gpu_type.as_deref().map(find).transpose()?,
                    user: map.user.as_deref().map(find).transpose()?,
                    estimate: map.estimate.as_deref().map(find).transpose()?,
                    openb: None,
                },
                Format::Gavel => unreachable!("handled above"),
            };
            Inner::Csv { reader, record: csv::StringRecord::new(), columns: Box::new(columns) }
        }
    };
    Ok(TraceReader { file: path.to_path_buf(), inner, stats: LoadStats::default(), done: false })
}

/// Reads a whole trace, stopping at the first error.
pub fn read_all(path: &Path, format: &Format) -> Result<(Vec<TraceJob>, LoadStats), TraceError> {
    let mut reader = open(path, format)?;
    let jobs = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
    Ok((jobs, reader.stats().clone()))
}

fn csv_error(path: &Path, line: u64, e: csv::Error) -> TraceError {
    let line = e.position().map_or(line, |p| p.line());
    let problem = match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("has {len} fields, the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8".to_string(),
        _ => e.to_string(),
    };
    TraceError { file: path.to_path_buf(), line, problem }
}

/// Largest time or duration accepted: about 31,700 years, far beyond any
/// trace, and small enough that sums of them cannot overflow.
const MAX_SECONDS: f64 = 1e12;

fn seconds(field: &str, name: &str) -> Result<u64, String> {
    let value: f64 = field.trim().parse().map_err(|_| format!("{name}: '{field}' is not a number of seconds"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{name}: must be zero or more, got {field}"));
    }
    if value > MAX_SECONDS {
        return Err(format!("{name}: {field} is beyond any plausible trace time"));
    }
    Ok(value.round() as u64)
}

fn gpu_count(field: &str, name: &str) -> Result<u32, String> {
    let value: i64 =
        field.trim().parse().map_err(|_| format!("{name}: '{field}' is not a whole number of accelerators"))?;
    if !(0..=100_000).contains(&value) {
        return Err(format!("{name}: must be between 0 and 100000, got {value}"));
    }
    Ok(value as u32)
}

impl TraceReader {
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    fn skip(&mut self, reason: &'static str) {
        *self.stats.skipped.entry(reason).or_insert(0) += 1;
    }

    fn fail(&mut self, line: u64, problem: String) -> Option<Result<TraceJob, TraceError>> {
        self.done = true;
        Some(Err(TraceError { file: self.file.clone(), line, problem }))
    }

    fn next_csv(&mut self) -> Option<Result<TraceJob, TraceError>> {
        loop {
            let Inner::Csv { reader, record, columns } = &mut self.inner else { unreachable!() };
            match reader.read_record(record) {
                Ok(false) => return None,
                Ok(true) => {}
                Err(e) => {
                    let error = csv_error(&self.file, 0, e);
                    self.done = true;
                    return Some(Err(error));
                }
            }
            let line = record.position().map_or(0, |p| p.line());
            self.stats.rows += 1;
            let field = |i: usize| record.get(i).unwrap_or("");
            let parsed = (|| -> Result<Result<TraceJob, &'static str>, String> {
                let submit_s = seconds(field(columns.submit), "submit time")?;
                let gpus = gpu_count(field(columns.gpus), "gpus")?;
                let mut censored = false;
                let duration_s = match (columns.start, columns.openb) {
                    (Some(start), Some((_, phase))) => {
                        if gpus == 0 {
                            return Ok(Err("cpu_only"));
                        }
                        if field(start).trim().is_empty() {
                            return Ok(Err("never_scheduled"));
                        }
                        let scheduled = seconds(field(start), "scheduled_time")?;
                        let deleted = seconds(field(columns.duration), "deletion_time")?;
                        censored = field(phase).trim() == "Running";
                        if deleted <= scheduled {
                            return Ok(Err("zero_duration"));
                        }
                        deleted - scheduled
                    }
                    _ => seconds(field(columns.duration), "duration")?,
                };
                if gpus == 0 {
                    return Err("gpus: must be at least 1".into());
                }
                if duration_s == 0 {
                    return Err("duration: must be at least 1 second".into());
                }
                let text = |c: Option<usize>| c.map(field).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
                // An empty cell: the user asked for nothing.
                let requested_s = match text(columns.estimate) {
                    Some(t) => Some(
                        u32::try_from(seconds(&t, "estimate")?.max(1))
                            .ok()
                            .and_then(std::num::NonZeroU32::new)
                            .ok_or_else(|| format!("estimate: {t} seconds is more than a job may ask for"))?,
                    ),
                    None => None,
                };
                Ok(Ok(TraceJob {
                    line: u32::try_from(line).unwrap_or(u32::MAX),
                    submit_s,
                    duration_s,
                    gpus,
                    gpu_type: text(columns.gpu_type),
                    user: text(columns.user),
                    censored,
                    requested_s,
                }))
            })();
            match parsed {
                Ok(Ok(job)) => {
                    self.stats.jobs += 1;
                    self.stats.censored += job.censored as u64;
                    return Some(Ok(job));
                }
                Ok(Err(reason)) => self.skip(reason),
                Err(problem) => return self.fail(line, problem),
            }
        }
    }

    fn next_gavel(&mut self) -> Option<Result<TraceJob, TraceError>> {
        loop {
            let Inner::Gavel { reader, line, buffer } = &mut self.inner else { unreachable!() };
            buffer.clear();
            *line += 1;
            let at = *line;
            match reader.read_line(buffer) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return self.fail(at, format!("cannot read: {e}")),
            }
            let text = buffer.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            self.stats.rows += 1;
            let fields: Vec<&str> = text.split('\t').collect();
            let parsed = (|| -> Result<TraceJob, String> {
                if fields.len() != 7 {
                    return Err(format!(
                        "has {} tab-separated fields, a Gavel trace line has 7 (job_type, command, num_steps_arg, needs_data_dir, total_steps, arrival_time, scale_factor)",
                        fields.len()
                    ));
                }
                let family = fields[0].split(" (").next().unwrap_or("");
                let Some(&(_, rate)) = GAVEL_STEPS_PER_S.iter().find(|(f, _)| *f == family) else {
                    return Err(format!("job_type: unknown model family '{}'", fields[0]));
                };
                let steps = seconds(fields[4], "total_steps")?;
                let submit_s = seconds(fields[5], "arrival_time")?;
                let gpus = gpu_count(fields[6], "scale_factor")?;
                if gpus == 0 {
                    return Err("scale_factor: must be at least 1".into());
                }
                Ok(TraceJob {
                    line: u32::try_from(at).unwrap_or(u32::MAX),
                    submit_s,
                    duration_s: ((steps as f64 / rate).ceil() as u64).max(1),
                    gpus,
                    gpu_type: None,
                    user: None,
                    censored: false,
                    requested_s: None,
                })
            })();
            return match parsed {
                Ok(job) => {
                    self.stats.jobs += 1;
                    Some(Ok(job))
                }
                Err(problem) => self.fail(at, problem),
            };
        }
    }
}

impl Iterator for TraceReader {
    type Item = Result<TraceJob, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.inner {
            Inner::Csv { .. } => self.next_csv(),
            Inner::Gavel { .. } => self.next_gavel(),
        }
    }
}
