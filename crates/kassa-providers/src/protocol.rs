//! The simulated acquirers' HTTP protocol: the wire types both sides share.
//! Documented for people in `proto/provider-http.md`.
//!
//! Every call names Kassa's attempt id, so a status inquiry finds an attempt
//! whose answer was lost. Status codes carry the one distinction that matters:
//! `503` (and a refused connection) means the provider did not act; `422`
//! means it refused the request itself; a `200` is an answer. A call that
//! gets no answer in time may have been acted on.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardBody {
    pub number: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub cvc: String,
}

/// `POST /v1/authorizations`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeBody {
    pub attempt_id: String,
    pub payment_id: String,
    pub merchant_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub card: CardBody,
}

/// The answer to an authorization, and to a status inquiry
/// (`GET /v1/authorizations/{attempt_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum AttemptBody {
    Approved {
        authorization_code: String,
    },
    Declined {
        code: String,
        /// `hard` or `soft`.
        category: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merchant_advice_code: Option<String>,
    },
    /// Inquiry only: authorized, then reversed.
    Reversed,
    /// Inquiry only: the provider never saw the attempt.
    NotFound,
}

/// `POST /v1/authorizations/{attempt_id}/captures` and `…/refunds`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmountBody {
    /// The capture's or refund's id: the call is idempotent by it.
    pub id: String,
    pub amount_minor: i64,
    pub currency: String,
}

/// `POST /v1/settlement-reports`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequestBody {
    /// Capture and refund ids, 32 hex digits each.
    pub entry_ids: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportLineBody {
    pub entry_id: String,
    /// `capture` or `refund`.
    pub kind: String,
    pub amount_minor: i64,
    pub currency: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBody {
    pub lines: Vec<ReportLineBody>,
}

/// Any refusal: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `POST /sim/{provider}/faults`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultBody {
    pub mode: String,
    /// Share of calls hit, 0.0–1.0 (default 1.0).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Extra latency of `slow` (ms).
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Clear by itself after this many seconds.
    #[serde(default)]
    pub duration_s: Option<u64>,
}

/// One row of `GET /sim/{provider}/ledger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRow {
    pub attempt_id: String,
    pub payment_id: String,
    pub amount: i64,
    pub currency: String,
    /// `authorized`, `captured`, `reversed` or `refunded`.
    pub state: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LedgerBody {
    pub data: Vec<LedgerRow>,
}

pub fn hex_id(id: u128) -> String {
    format!("{id:032x}")
}

pub fn parse_hex_id(text: &str) -> Option<u128> {
    (text.len() == 32).then(|| u128::from_str_radix(text, 16).ok()).flatten()
}
