//! Ledger tests, one binary:
//!
//! - `model`: random operation sequences against an in-memory model;
//! - `semantics`: each transfer rule and refusal, persistence, tampering;
//! - `vouchers`: programmes, grants, caps, cards, the job billing flow, audit;
//! - `concurrency`: many threads through the group-commit service;
//! - `crash`: a child killed with SIGKILL over and over, then verified;
//! - `processes`: several processes writing one file at once.

mod concurrency;
mod crash;
mod model;
mod processes;
mod semantics;
mod vouchers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh database path in a per-process temporary directory.
pub fn temp_db(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("suanwang-ledger-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}.db", NEXT.fetch_add(1, Ordering::Relaxed)))
}
