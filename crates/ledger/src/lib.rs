//! # suanwang-ledger
//!
//! The ledger of public compute money. Two layers:
//!
//! - [`ledger`]: a double-entry ledger with TigerBeetle's semantics (integer
//!   amounts, client-chosen 128-bit idempotent transfer ids, two-phase
//!   pending transfers posted in full or in part, voided or expired, linked
//!   transfers that succeed or fail together, accounts that cannot be
//!   overdrawn), stored append-only in SQLite (WAL, `synchronous=FULL`) with
//!   a hash-chained journal and a full replay check ([`ledger::verify`]);
//! - [`voucher`]: compute-voucher programmes (算力券) and compute cards
//!   (算力卡) on top: budgets, grants, eligibility, subsidy rates and caps,
//!   the job billing flow (quote, hold, settle, release), expiry;
//!   [`audit`] writes settlement statements and spend reports.
//!
//! [`service`] puts one ledger behind a writer thread with group commit for
//! many concurrent clients; [`checkpoint`] signs the journal's head for an
//! auditor to keep.

pub mod audit;
pub mod checkpoint;
pub mod error;
pub mod ledger;
pub mod model;
pub mod service;
pub mod voucher;

pub use error::{LedgerError, Refusal};
pub use ledger::{Anchor, Ledger, Replay, VerifyReport, verify, verify_anchored, verify_with};
pub use model::{Account, AccountId, NewAccount, NewTransfer, Transfer, TransferId, TransferKind, Unit, flags};
