//! Accounts and transfers: the ledger's two kinds of record.
//!
//! The semantics follow TigerBeetle's: every amount is a positive integer
//! moved from one account's debits to another's credits; an account keeps
//! four running totals (debits and credits, pending and posted); flags on
//! an account forbid it from going below zero; transfers may be pending
//! (a hold) and later posted in full or in part, voided, or expired.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The top bit of a 128-bit id: set on ids the ledger derives from names.
pub const DERIVED: u128 = 1 << 127;

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A 128-bit ", $what, " id, written as 32 hex digits.")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u128);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:032x}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let s = s.trim();
                let s = s.strip_prefix("0x").unwrap_or(s);
                if s.is_empty() || s.len() > 32 {
                    return Err(format!(concat!($what, " id must be 1 to 32 hex digits, got '{}'"), s));
                }
                // Digits only: `from_str_radix` would take a leading `+`.
                if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(concat!($what, " id must be hex digits, got '{}'"), s));
                }
                u128::from_str_radix(s, 16)
                    .map($name)
                    .map_err(|_| format!(concat!($what, " id must be hex digits, got '{}'"), s))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl $name {
            /// A stable id derived from a name (the first 128 bits of its SHA-256).
            /// An id derived from a name (a job's part, a programme's
            /// funding): the top bit is set, and ids chosen by clients
            /// have it clear, so a client can never take an id the
            /// ledger will need.
            pub fn derive(name: &str) -> $name {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(name.as_bytes());
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&digest[..16]);
                $name(u128::from_be_bytes(bytes) | DERIVED)
            }

            /// Was this id derived from a name ([`Self::derive`])?
            pub fn is_derived(self) -> bool {
                self.0 & DERIVED != 0
            }
        }
    };
}

id_type!(AccountId, "account");
id_type!(TransferId, "transfer");

/// What an account counts: fen, or accelerator-seconds of one type (a compute card).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    Fen,
    AccelSeconds(String),
}

impl Unit {
    /// The unit as stored, without an allocation for fen (every transfer writes it).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Unit::Fen => std::borrow::Cow::Borrowed("fen"),
            other => std::borrow::Cow::Owned(other.to_string()),
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Fen => f.write_str("fen"),
            Unit::AccelSeconds(accel) => write!(f, "accel_s:{accel}"),
        }
    }
}

impl FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> Result<Unit, String> {
        match s {
            "fen" => Ok(Unit::Fen),
            _ => match s.strip_prefix("accel_s:") {
                Some(accel) if !accel.is_empty() => Ok(Unit::AccelSeconds(accel.to_string())),
                _ => Err(format!("unit must be 'fen' or 'accel_s:TYPE', got '{s}'")),
            },
        }
    }
}

impl Serialize for Unit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Account flags.
/// The longest a pending transfer may wait before it expires: ten years.
/// (Longer would be a hold that never expires, or a time that overflows.)
pub const MAX_TIMEOUT_S: i64 = 10 * 365 * 86_400;

/// The times the ledger accepts, as unix seconds: from 2000-01-01 to the
/// end of 9999, so that every time plus any timeout stays representable and
/// prints as a date.
pub const EARLIEST_TIME: i64 = 946_684_800;
pub const LATEST_TIME: i64 = 253_402_300_799;

pub mod flags {
    /// The account's debits (posted and pending) may never exceed its posted
    /// credits: it cannot be overdrawn.
    pub const DEBITS_MUST_NOT_EXCEED_CREDITS: u32 = 1;
    /// The account's credits (posted and pending) may never exceed its posted debits.
    pub const CREDITS_MUST_NOT_EXCEED_DEBITS: u32 = 2;
    pub const ALL: u32 = DEBITS_MUST_NOT_EXCEED_CREDITS | CREDITS_MUST_NOT_EXCEED_DEBITS;
}

/// An account to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    pub id: AccountId,
    /// What the account is for (e.g. `voucher`, `wallet`, `treasury`).
    pub kind: String,
    pub owner: String,
    pub unit: Unit,
    pub flags: u32,
}

/// An account with its running totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub id: AccountId,
    pub seq: i64,
    pub kind: String,
    pub owner: String,
    pub unit: Unit,
    pub flags: u32,
    pub debits_pending: i64,
    pub debits_posted: i64,
    pub credits_pending: i64,
    pub credits_posted: i64,
    pub created_at: i64,
}

impl Account {
    /// Posted credits minus posted debits.
    pub fn balance(&self) -> i64 {
        self.credits_posted - self.debits_posted
    }

    /// What can still be debited: posted credits minus all debits.
    pub fn available(&self) -> i64 {
        self.credits_posted - self.debits_posted - self.debits_pending
    }

    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// What a transfer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TransferKind {
    /// Moves the amount at once.
    Posted,
    /// Holds the amount until posted, voided or expired (`timeout_s` 0: never expires).
    Pending { timeout_s: i64 },
    /// Posts a pending transfer: `amount` of it (at most the held amount), releasing the rest.
    PostPending { pending: TransferId },
    /// Releases a pending transfer entirely.
    VoidPending { pending: TransferId },
    /// Written by the ledger when a pending transfer times out.
    ExpirePending { pending: TransferId },
}

impl TransferKind {
    pub fn code(&self) -> i64 {
        match self {
            TransferKind::Posted => 0,
            TransferKind::Pending { .. } => 1,
            TransferKind::PostPending { .. } => 2,
            TransferKind::VoidPending { .. } => 3,
            TransferKind::ExpirePending { .. } => 4,
        }
    }

    pub fn pending_id(&self) -> Option<TransferId> {
        match self {
            TransferKind::PostPending { pending }
            | TransferKind::VoidPending { pending }
            | TransferKind::ExpirePending { pending } => Some(*pending),
            _ => None,
        }
    }

    pub fn timeout_s(&self) -> i64 {
        match self {
            TransferKind::Pending { timeout_s } => *timeout_s,
            _ => 0,
        }
    }

    /// Strict: a part that the kind does not have must be absent (no
    /// pending id on a posted transfer, no timeout but on a pending one),
    /// so that each stored row reads back one way only.
    pub fn from_parts(code: i64, pending: Option<TransferId>, timeout_s: i64) -> Option<TransferKind> {
        Some(match (code, pending, timeout_s) {
            (0, None, 0) => TransferKind::Posted,
            (1, None, _) => TransferKind::Pending { timeout_s },
            (2, Some(pending), 0) => TransferKind::PostPending { pending },
            (3, Some(pending), 0) => TransferKind::VoidPending { pending },
            (4, Some(pending), 0) => TransferKind::ExpirePending { pending },
            _ => return None,
        })
    }
}

/// A transfer to make. For post and void, `debit` and `credit` may be zero
/// (meaning "those of the pending transfer") and `amount` 0 posts the full
/// held amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransfer {
    pub id: TransferId,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: i64,
    pub kind: TransferKind,
    /// Linked to the next transfer of the batch: the chain succeeds or fails as one.
    pub linked: bool,
    /// A business code (what the money is for), see `voucher::codes`.
    pub code: u16,
    pub memo: String,
}

impl NewTransfer {
    pub fn posted(id: TransferId, debit: AccountId, credit: AccountId, amount: i64, code: u16) -> NewTransfer {
        NewTransfer { id, debit, credit, amount, kind: TransferKind::Posted, linked: false, code, memo: String::new() }
    }
}

/// A transfer as recorded: ids resolved, amount as moved, with its position
/// in the journal and its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transfer {
    pub seq: i64,
    pub id: TransferId,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: i64,
    #[serde(flatten)]
    pub kind: TransferKind,
    pub linked: bool,
    pub code: u16,
    pub memo: String,
    pub unit: Unit,
    pub at: i64,
}

impl Transfer {
    /// Does this record answer the request `t` (same id and content)?
    /// Post and void requests may leave accounts zero and post amounts 0.
    pub fn matches(&self, t: &NewTransfer) -> bool {
        let accounts_match = match t.kind {
            TransferKind::PostPending { .. } | TransferKind::VoidPending { .. } => {
                (t.debit.0 == 0 || t.debit == self.debit) && (t.credit.0 == 0 || t.credit == self.credit)
            }
            _ => t.debit == self.debit && t.credit == self.credit,
        };
        let amount_matches = match t.kind {
            TransferKind::PostPending { .. } if t.amount == 0 => true,
            TransferKind::VoidPending { .. } => t.amount == 0 || t.amount == self.amount,
            _ => t.amount == self.amount,
        };
        self.id == t.id
            && accounts_match
            && amount_matches
            && self.kind == t.kind
            && self.linked == t.linked
            && self.code == t.code
            && self.memo == t.memo
    }
}
