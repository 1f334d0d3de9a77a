//! The server's error: an HTTP status and the public `{code, message, field}`
//! body. Internal details of store failures are logged, not sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use suanwang_api::ApiError;
use suanwang_ledger::{LedgerError, Refusal};

#[derive(Debug, Clone)]
pub struct Error {
    pub status: StatusCode,
    pub body: ApiError,
}

impl Error {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Error {
        Error { status, body: ApiError { code: code.into(), message: message.into(), field: None } }
    }

    pub fn field(mut self, field: &str) -> Error {
        self.body.field = Some(field.into());
        self
    }

    /// 400: the request is malformed or a field is invalid.
    pub fn invalid(field: &str, message: impl Into<String>) -> Error {
        Error::new(StatusCode::BAD_REQUEST, "invalid_argument", message).field(field)
    }

    pub fn not_found(what: &str, id: impl std::fmt::Display) -> Error {
        Error::new(StatusCode::NOT_FOUND, "not_found", format!("{what} {id} not found"))
    }

    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn conflict(code: &str, message: impl Into<String>) -> Error {
        Error::new(StatusCode::CONFLICT, code, message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Error {
        eprintln!("suanwang server: internal error: {message}");
        Error::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }
}

impl From<LedgerError> for Error {
    fn from(e: LedgerError) -> Error {
        match e {
            LedgerError::Refused(r) => r.into(),
            other => Error::internal(other),
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        let status = match r {
            Refusal::NotFound { .. } => StatusCode::NOT_FOUND,
            Refusal::Invalid { .. } | Refusal::AmountMustBePositive(_) | Refusal::TimeoutMustNotBeNegative(_) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::InsufficientFunds { .. } => StatusCode::PAYMENT_REQUIRED,
            _ => StatusCode::CONFLICT,
        };
        let field = match &r {
            Refusal::Invalid { field, .. } => Some(field.to_string()),
            _ => None,
        };
        Error { status, body: ApiError { code: r.code().into(), message: r.to_string(), field } }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        Error::internal(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub type Result<T> = std::result::Result<T, Error>;
