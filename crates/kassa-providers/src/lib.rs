//! Providers (acquirers) behind one connector trait, and simulated acquirers.
//!
//! Kassa talks to every provider through [`Connector`]. Every call carries the
//! attempt id the provider records, so a [`Connector::inquire`] can find an
//! attempt whose answer never arrived. The error type keeps the one
//! distinction that prevents double charges: [`ProviderError::Unavailable`]
//! means the provider certainly did not act (try another), while
//! [`ProviderError::Timeout`] means it may have (inquire first, or reverse).

mod http_connector;
pub mod http_sim;
pub mod journal;
pub mod protocol;
mod simulator;

pub use http_connector::HttpConnector;
pub use journal::{JournalError, JournalOp};

pub use simulator::{
    CallPlan, FAILS_OVER_CARD, Fault, FaultMode, LedgerEntry, LedgerState, SimulatedAcquirer, SimulatorConfig,
    test_card_outcome,
};

use async_trait::async_trait;
pub use kassa_domain::reconciliation::ReportLine;
use kassa_domain::{AttemptId, CaptureId, CardDetails, DeclineCategory, MerchantId, Money, PaymentId, RefundId};
use std::time::Duration;

/// What a provider needs to authorize. Holds the card in clear: in memory only.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub attempt_id: AttemptId,
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    pub card: CardDetails,
}

/// A provider's answer to an authorization it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    Approved {
        authorization_code: String,
    },
    Declined {
        code: String,
        category: DeclineCategory,
        /// Mastercard's merchant advice code, when the provider sends one (`03`, `21`: never retry).
        merchant_advice_code: Option<String>,
    },
}

/// What a provider knows about an attempt, asked after the fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptStatus {
    /// The provider never saw the attempt: nothing to undo.
    NotFound,
    Authorized {
        authorization_code: String,
    },
    Declined {
        code: String,
        category: DeclineCategory,
    },
    /// Authorized, then reversed: no money is held.
    Reversed,
}

/// Operating failures of a provider call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Connection refused, 5xx before acceptance, breaker open: the provider
    /// did not act on the request. Another provider may be tried.
    #[error("provider unavailable: {reason}")]
    Unavailable { reason: String },
    /// No answer within the deadline: the provider may have acted.
    #[error("provider did not answer within {deadline_ms} ms")]
    Timeout { deadline_ms: u64 },
    /// The provider refused the request itself (unknown attempt, amount over
    /// what is held): a bug or a race on Kassa's side, never retried blindly.
    #[error("provider refused the request: {reason}")]
    Refused { reason: String },
}

/// One provider, as Kassa sees it. Adding a real provider means implementing this.
#[async_trait]
pub trait Connector: Send + Sync + std::fmt::Debug + 'static {
    fn name(&self) -> &str;
    async fn authorize(&self, request: AuthorizeRequest, deadline: Duration)
    -> Result<AuthorizeOutcome, ProviderError>;
    /// Capture `amount` of an authorization. Idempotent by `capture_id`: a
    /// retried capture (after a timeout or a restart) is applied once.
    async fn capture(
        &self,
        attempt_id: AttemptId,
        capture_id: CaptureId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError>;
    /// Release an authorization (void before capture, or reversal of an attempt
    /// whose outcome was unknown). Reversing an attempt the provider has not
    /// seen yet makes it refuse that attempt if it arrives late.
    async fn reverse(&self, attempt_id: AttemptId, deadline: Duration) -> Result<(), ProviderError>;
    /// Refund part of what was captured. Idempotent by `refund_id`.
    async fn refund(
        &self,
        attempt_id: AttemptId,
        refund_id: RefundId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError>;
    async fn inquire(&self, attempt_id: AttemptId, deadline: Duration) -> Result<AttemptStatus, ProviderError>;
    /// The provider's settlement report for a batch Kassa submits: for each
    /// capture or refund id, the line the provider itself recorded (absent
    /// when it has none).
    async fn settlement_report(&self, entry_ids: &[u128], deadline: Duration)
    -> Result<Vec<ReportLine>, ProviderError>;
}
