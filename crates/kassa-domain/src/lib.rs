//! Kassa's pure domain core.
//!
//! Plain functions over plain data: no I/O, no clock, no randomness. Time and
//! ids come in as arguments, which is what makes replay exact and the
//! deterministic simulation possible. See ARCHITECTURE.md for the invariants.

pub mod card;
pub mod currency;
pub mod id;
pub mod money;
pub mod payment;
pub mod reconciliation;
pub mod routing;
pub mod settlement;
pub mod time;

pub use card::{CardBrand, CardDetails, CardError, CardSummary, CardToken, Expiry, Pan};
pub use currency::{Currency, UnknownCurrency};
pub use id::{AttemptId, BatchId, CaptureId, EventId, Id128, IdError, MerchantId, PaymentId, RefundId, ReportId};
pub use money::{Money, MoneyError};
pub use payment::{
    AuthorizationResult, DeclineCategory, PaymentCommand, PaymentEvent, PaymentRequested, PaymentState, PaymentStatus,
    Rejection, RequestPayment, STAND_IN_CODE, Stage, apply, decide, try_apply,
};
pub use time::Timestamp;
