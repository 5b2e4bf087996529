//! The error every caller sees: `{"error": {"type", "code", "message", "param"?}}`
//! with the right HTTP status.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request is wrong (400, 404, 409, 413, 415): fix it before retrying.
    InvalidRequestError,
    /// No key, or a wrong one (401).
    AuthenticationError,
    /// An Idempotency-Key was reused with a different request (409).
    IdempotencyError,
    /// Too many requests or not ready (429, 503): retry later.
    RateLimitError,
    /// Kassa failed (500): retry with the same Idempotency-Key.
    ApiError,
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    #[serde(rename = "type")]
    pub error_type: ErrorType,
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid(code: &'static str, param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            error_type: ErrorType::InvalidRequestError,
            code,
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    pub fn new(status: u16, error_type: ErrorType, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, error_type, code, message: message.into(), param: None }
    }

    pub fn not_found(what: &str) -> Self {
        ApiError::new(404, ErrorType::InvalidRequestError, "resource_missing", format!("no such {what}"))
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            401,
            ErrorType::AuthenticationError,
            "invalid_api_key",
            "missing or invalid API key: send `Authorization: Bearer sk_…`",
        )
    }

    /// The JSON body: `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}
