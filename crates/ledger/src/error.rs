//! Errors. A [`Refusal`] is the ledger saying no to a request, with a stable
//! code that clients and the HTTP API can match on; it never changes stored
//! data. A [`LedgerError`] is the store failing (I/O, a corrupt file) or a
//! refusal of a whole operation.

use serde::Serialize;

use crate::model::{AccountId, TransferId};

/// Why a request was refused. `code()` is stable and public.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("id must not be zero")]
    IdMustNotBeZero,
    #[error("debit and credit accounts must be different")]
    AccountsMustBeDifferent,
    #[error("debit account {0} not found")]
    DebitAccountNotFound(AccountId),
    #[error("credit account {0} not found")]
    CreditAccountNotFound(AccountId),
    #[error("amount must be positive, got {0}")]
    AmountMustBePositive(i64),
    #[error("timeout must not be negative, got {0}")]
    TimeoutMustNotBeNegative(i64),
    #[error("timeout must be at most {max} s (ten years), got {0}", max = crate::model::MAX_TIMEOUT_S)]
    TimeoutTooLong(i64),
    #[error("accounts count different units: {debit} and {credit}")]
    UnitsMustMatch { debit: String, credit: String },
    #[error("insufficient funds in account {account}: {available} available, {amount} wanted")]
    InsufficientFunds { account: AccountId, available: i64, amount: i64 },
    #[error("account {account} may not be credited beyond its debits")]
    ExceedsDebits { account: AccountId },
    #[error("amount would overflow an account total")]
    Overflow,
    #[error("pending transfer {0} not found")]
    PendingNotFound(TransferId),
    #[error("pending transfer {0} was already posted")]
    PendingAlreadyPosted(TransferId),
    #[error("pending transfer {0} was already voided")]
    PendingAlreadyVoided(TransferId),
    #[error("pending transfer {0} has expired")]
    PendingExpired(TransferId),
    #[error("post or void names other accounts than pending transfer {0}")]
    PendingAccountsDiffer(TransferId),
    #[error("cannot post {amount}: only {held} is held")]
    ExceedsPendingAmount { held: i64, amount: i64 },
    #[error("id {0} was already used with different content")]
    IdReusedWithDifferentContent(String),
    #[error("a linked transfer in the same chain failed")]
    LinkedEventFailed,
    #[error("the last transfer of a batch must not be linked")]
    LinkedChainOpen,
    #[error("invalid {field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    #[error("programme '{programme}' is exhausted: {available} fen left, {amount} wanted")]
    ProgrammeExhausted { programme: String, available: i64, amount: i64 },
    #[error("{cap} cap exceeded: {limit} fen, {used} used, {amount} more wanted")]
    CapExceeded { cap: &'static str, limit: i64, used: i64, amount: i64 },
    #[error("voucher of programme '{0}' has expired")]
    VoucherExpired(String),
    #[error("programme '{0}' is not valid yet")]
    NotYetValid(String),
    #[error("not eligible: {0}")]
    NotEligible(String),
    #[error("'{org}' and the provider of site '{site}' are related parties: no subsidy")]
    RelatedParty { org: String, site: String },
    #[error("job '{0}' is already settled")]
    AlreadySettled(String),
    #[error(
        "a correction may not move money from a {debit} account to a {credit} account (permitted: {permitted}); the treasury, programme pools, vouchers and compute cards move only through their operations (programme fund and defund, grant, card, hold, settle, release, sweep)"
    )]
    FlowNotPermitted { debit: String, credit: String, permitted: String },
    #[error("job '{job}' is {state}, not held")]
    NotHeld { job: String, state: String },
    /// The stored outcome of a request that was refused before, returned
    /// again when the same request (same id, same content) is repeated.
    #[error("{message}")]
    Replayed { code: &'static str, message: String },
}

/// Every stable code, so a stored code can be returned as itself.
pub const CODES: [&str; 32] = [
    "id_must_not_be_zero",
    "accounts_must_be_different",
    "debit_account_not_found",
    "credit_account_not_found",
    "amount_must_be_positive",
    "timeout_must_not_be_negative",
    "timeout_too_long",
    "units_must_match",
    "insufficient_funds",
    "exceeds_debits",
    "overflow",
    "pending_transfer_not_found",
    "pending_transfer_already_posted",
    "pending_transfer_already_voided",
    "pending_transfer_expired",
    "pending_transfer_accounts_differ",
    "exceeds_pending_amount",
    "id_reused_with_different_content",
    "linked_event_failed",
    "linked_chain_open",
    "invalid_argument",
    "not_found",
    "programme_exhausted",
    "cap_exceeded",
    "voucher_expired",
    "not_yet_valid",
    "not_eligible",
    "related_party",
    "already_settled",
    "not_held",
    "flow_not_permitted",
    "store_error",
];

/// Serialised as `{"code": "...", "message": "..."}`.
impl Serialize for Refusal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("Refusal", 2)?;
        out.serialize_field("code", self.code())?;
        out.serialize_field("message", &self.to_string())?;
        out.end()
    }
}

impl Refusal {
    /// The stable public code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::IdMustNotBeZero => "id_must_not_be_zero",
            Refusal::AccountsMustBeDifferent => "accounts_must_be_different",
            Refusal::DebitAccountNotFound(_) => "debit_account_not_found",
            Refusal::CreditAccountNotFound(_) => "credit_account_not_found",
            Refusal::AmountMustBePositive(_) => "amount_must_be_positive",
            Refusal::TimeoutMustNotBeNegative(_) => "timeout_must_not_be_negative",
            Refusal::TimeoutTooLong(_) => "timeout_too_long",
            Refusal::UnitsMustMatch { .. } => "units_must_match",
            Refusal::InsufficientFunds { .. } => "insufficient_funds",
            Refusal::ExceedsDebits { .. } => "exceeds_debits",
            Refusal::Overflow => "overflow",
            Refusal::PendingNotFound(_) => "pending_transfer_not_found",
            Refusal::PendingAlreadyPosted(_) => "pending_transfer_already_posted",
            Refusal::PendingAlreadyVoided(_) => "pending_transfer_already_voided",
            Refusal::PendingExpired(_) => "pending_transfer_expired",
            Refusal::PendingAccountsDiffer(_) => "pending_transfer_accounts_differ",
            Refusal::ExceedsPendingAmount { .. } => "exceeds_pending_amount",
            Refusal::IdReusedWithDifferentContent(_) => "id_reused_with_different_content",
            Refusal::LinkedEventFailed => "linked_event_failed",
            Refusal::LinkedChainOpen => "linked_chain_open",
            Refusal::Invalid { .. } => "invalid_argument",
            Refusal::NotFound { .. } => "not_found",
            Refusal::ProgrammeExhausted { .. } => "programme_exhausted",
            Refusal::CapExceeded { .. } => "cap_exceeded",
            Refusal::VoucherExpired(_) => "voucher_expired",
            Refusal::NotYetValid(_) => "not_yet_valid",
            Refusal::NotEligible(_) => "not_eligible",
            Refusal::RelatedParty { .. } => "related_party",
            Refusal::FlowNotPermitted { .. } => "flow_not_permitted",
            Refusal::AlreadySettled(_) => "already_settled",
            Refusal::NotHeld { .. } => "not_held",
            Refusal::Replayed { code, .. } => code,
        }
    }

    /// A refusal read back from the store.
    pub(crate) fn replayed(code: &str, message: String) -> Refusal {
        let code = CODES.iter().find(|&&c| c == code).copied().unwrap_or("invalid_argument");
        Refusal::Replayed { code, message }
    }
}

/// A failed ledger operation.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("ledger store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("ledger file {path}: {problem}")]
    Corrupt { path: String, problem: String },
    #[error("ledger writer has stopped")]
    WriterGone,
}

impl LedgerError {
    /// The stable code of a refusal, or `store_error`.
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Refused(r) => r.code(),
            LedgerError::Corrupt { .. } => "corrupt",
            LedgerError::Store(_) | LedgerError::WriterGone => "store_error",
        }
    }
}
