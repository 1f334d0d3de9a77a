//! # suanwang-trace
//!
//! Reads real GPU-cluster job traces as a stream of [`TraceJob`]s, one row
//! at a time (gzip is decompressed on the fly), with every problem reported
//! as `file:line: problem`; and maps each trace job onto a suanwang network
//! ([`mapping`]): owner organisation, origin city, accepted accelerator
//! types and datasets, deterministically from a seed.

pub mod formats;
pub mod mapping;

pub use formats::{ColumnMap, Format, LoadStats, TraceError, TraceJob, TraceReader, open, open_reader, read_all};
pub use mapping::{Mapper, MappingConfig};
