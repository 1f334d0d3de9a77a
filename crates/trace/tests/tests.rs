//! Integration tests of trace loading and mapping, one binary:
//!
//! - `golden`: small excerpts of the real traces, parsed and snapshotted;
//! - `errors`: one test per kind of bad input, each naming file and line;
//! - `mapping`: the seeded mapping is deterministic and keeps its promises;
//! - `shared`: the full real traces in ../shared/traces load completely.

mod errors;
mod golden;
mod mapping;
mod shared;

use std::path::PathBuf;

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

pub fn shared_traces() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces")
}

/// Writes `text` to a fresh temporary file with the given name.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("suanwang-trace-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
