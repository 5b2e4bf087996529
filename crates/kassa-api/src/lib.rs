//! The payments API contract, without the HTTP server: what a request must
//! look like, the errors a caller sees, API keys and idempotency fingerprints.
//!
//! Everything here is a pure function over bytes and values, so every bad
//! input a caller can send is tested without a server. The HTTP layer (axum)
//! only moves bytes in and out and calls these.

pub mod error;
pub mod keys;
pub mod request;

pub use error::{ApiError, ErrorType};
pub use keys::{ApiKey, KeyError, fingerprint};
pub use request::{
    AmountRequest, CreatePayment, ListQuery, parse_amount_request, parse_create_payment, parse_list_query,
};
