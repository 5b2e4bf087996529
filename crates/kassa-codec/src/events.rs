//! Domain events as envelope payloads.
//!
//! Each event has a stable type name, and its payload is the bincode encoding
//! of that one variant's fields, in a fixed order. The enum's variant order is
//! *not* part of the format (reordering variants is safe); the names and
//! field orders below are. Golden files under `tests/golden/` hold one encoded
//! envelope per type and fail CI when today's code stops decoding them.

use crate::envelope::{CodecError, FRAME_BYTES_MAX};
use kassa_domain::settlement::BatchEvent;
use kassa_domain::{PaymentEvent, PaymentRequested};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A domain event type that travels in an envelope.
pub trait EventPayload: Sized {
    /// Every type name this payload can decode, for audits and golden tests.
    const EVENT_TYPES: &'static [&'static str];
    fn event_type(&self) -> &'static str;
    fn encode_payload(&self) -> Vec<u8>;
    fn decode_payload(event_type: &str, payload: &[u8]) -> Result<Self, CodecError>;
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encode any serde value with Kassa's codec (for state, snapshots and messages).
pub fn encode_value<T: Serialize>(value: &T) -> Vec<u8> {
    // bincode's own `encode_to_vec` starts from an empty Vec and grows it field by field.
    let mut out = Vec::with_capacity(256);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("encoding plain data into a Vec cannot fail");
    out
}

/// Decode a value written by [`encode_value`]; every byte must be used.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::BadPayload { event_type: what.to_owned(), reason: e.to_string() })?;
    if read != bytes.len() {
        return Err(CodecError::BadPayload {
            event_type: what.to_owned(),
            reason: format!("{} trailing bytes", bytes.len() - read),
        });
    }
    Ok(value)
}

impl EventPayload for PaymentEvent {
    const EVENT_TYPES: &'static [&'static str] = &[
        "payment.requested",
        "payment.authorization_started",
        "payment.authorized",
        "payment.declined",
        "payment.authorization_failed",
        "payment.authorization_outcome_unknown",
        "payment.authorization_reversed",
        "payment.captured",
        "payment.voided",
        "payment.refunded",
        "payment.settled",
        "payment.reconciled",
        "payment.attempt_declined",
        "payment.authorized_by_stand_in",
        "payment.stand_in_confirmed",
        "payment.stand_in_declined",
    ];

    fn event_type(&self) -> &'static str {
        match self {
            PaymentEvent::Requested(_) => "payment.requested",
            PaymentEvent::AuthorizationStarted { .. } => "payment.authorization_started",
            PaymentEvent::Authorized { .. } => "payment.authorized",
            PaymentEvent::Declined { .. } => "payment.declined",
            PaymentEvent::AuthorizationFailed { .. } => "payment.authorization_failed",
            PaymentEvent::AttemptDeclined { .. } => "payment.attempt_declined",
            PaymentEvent::AuthorizedByStandIn { .. } => "payment.authorized_by_stand_in",
            PaymentEvent::StandInConfirmed { .. } => "payment.stand_in_confirmed",
            PaymentEvent::StandInDeclined { .. } => "payment.stand_in_declined",
            PaymentEvent::AuthorizationOutcomeUnknown { .. } => "payment.authorization_outcome_unknown",
            PaymentEvent::AuthorizationReversed { .. } => "payment.authorization_reversed",
            PaymentEvent::Captured { .. } => "payment.captured",
            PaymentEvent::Voided { .. } => "payment.voided",
            PaymentEvent::Refunded { .. } => "payment.refunded",
            PaymentEvent::Settled { .. } => "payment.settled",
            PaymentEvent::Reconciled { .. } => "payment.reconciled",
        }
    }

    fn encode_payload(&self) -> Vec<u8> {
        use PaymentEvent as E;
        match self {
            E::Requested(requested) => encode_value(requested),
            E::AuthorizationStarted { attempt_id, provider } => encode_value(&(attempt_id, provider)),
            E::Authorized { attempt_id, provider, authorization_code, amount } => {
                encode_value(&(attempt_id, provider, authorization_code, amount))
            }
            E::Declined { attempt_id, provider, code, category } => {
                encode_value(&(attempt_id, provider, code, category))
            }
            E::AuthorizationFailed { attempt_id, provider, reason }
            | E::AuthorizationOutcomeUnknown { attempt_id, provider, reason } => {
                encode_value(&(attempt_id, provider, reason))
            }
            E::AttemptDeclined { attempt_id, provider, code } => encode_value(&(attempt_id, provider, code)),
            E::AuthorizedByStandIn { amount } => encode_value(amount),
            E::StandInConfirmed { attempt_id, provider, authorization_code } => {
                encode_value(&(attempt_id, provider, authorization_code))
            }
            E::StandInDeclined { attempt_id, provider, code } => encode_value(&(attempt_id, provider, code)),
            E::AuthorizationReversed { attempt_id, provider } => encode_value(&(attempt_id, provider)),
            E::Captured { capture_id, amount } => encode_value(&(capture_id, amount)),
            E::Voided { amount } => encode_value(amount),
            E::Refunded { refund_id, amount } => encode_value(&(refund_id, amount)),
            E::Settled { batch_id } => encode_value(batch_id),
            E::Reconciled { report_id } => encode_value(report_id),
        }
    }

    fn decode_payload(event_type: &str, payload: &[u8]) -> Result<Self, CodecError> {
        use PaymentEvent as E;
        let t = event_type;
        Ok(match event_type {
            "payment.requested" => E::Requested(decode_value::<PaymentRequested>(payload, t)?),
            "payment.authorization_started" => {
                let (attempt_id, provider) = decode_value(payload, t)?;
                E::AuthorizationStarted { attempt_id, provider }
            }
            "payment.authorized" => {
                let (attempt_id, provider, authorization_code, amount) = decode_value(payload, t)?;
                E::Authorized { attempt_id, provider, authorization_code, amount }
            }
            "payment.declined" => {
                let (attempt_id, provider, code, category) = decode_value(payload, t)?;
                E::Declined { attempt_id, provider, code, category }
            }
            "payment.authorization_failed" => {
                let (attempt_id, provider, reason) = decode_value(payload, t)?;
                E::AuthorizationFailed { attempt_id, provider, reason }
            }
            "payment.authorized_by_stand_in" => E::AuthorizedByStandIn { amount: decode_value(payload, t)? },
            "payment.stand_in_confirmed" => {
                let (attempt_id, provider, authorization_code) = decode_value(payload, t)?;
                E::StandInConfirmed { attempt_id, provider, authorization_code }
            }
            "payment.stand_in_declined" => {
                let (attempt_id, provider, code) = decode_value(payload, t)?;
                E::StandInDeclined { attempt_id, provider, code }
            }
            "payment.attempt_declined" => {
                let (attempt_id, provider, code) = decode_value(payload, t)?;
                E::AttemptDeclined { attempt_id, provider, code }
            }
            "payment.authorization_outcome_unknown" => {
                let (attempt_id, provider, reason) = decode_value(payload, t)?;
                E::AuthorizationOutcomeUnknown { attempt_id, provider, reason }
            }
            "payment.authorization_reversed" => {
                let (attempt_id, provider) = decode_value(payload, t)?;
                E::AuthorizationReversed { attempt_id, provider }
            }
            "payment.captured" => {
                let (capture_id, amount) = decode_value(payload, t)?;
                E::Captured { capture_id, amount }
            }
            "payment.voided" => E::Voided { amount: decode_value(payload, t)? },
            "payment.refunded" => {
                let (refund_id, amount) = decode_value(payload, t)?;
                E::Refunded { refund_id, amount }
            }
            "payment.settled" => E::Settled { batch_id: decode_value(payload, t)? },
            "payment.reconciled" => E::Reconciled { report_id: decode_value(payload, t)? },
            other => return Err(CodecError::UnknownEventType { event_type: other.to_owned() }),
        })
    }
}

impl EventPayload for BatchEvent {
    const EVENT_TYPES: &'static [&'static str] =
        &["settlement.batch_opened", "settlement.entry_added", "settlement.batch_closed"];

    fn event_type(&self) -> &'static str {
        match self {
            BatchEvent::Opened { .. } => "settlement.batch_opened",
            BatchEvent::EntryAdded { .. } => "settlement.entry_added",
            BatchEvent::Closed { .. } => "settlement.batch_closed",
        }
    }

    fn encode_payload(&self) -> Vec<u8> {
        match self {
            BatchEvent::Opened { batch_id, key, opened_at } => encode_value(&(batch_id, key, opened_at)),
            BatchEvent::EntryAdded { entry } => encode_value(entry),
            BatchEvent::Closed { totals, closed_at } => encode_value(&(totals, closed_at)),
        }
    }

    fn decode_payload(event_type: &str, payload: &[u8]) -> Result<Self, CodecError> {
        let t = event_type;
        Ok(match event_type {
            "settlement.batch_opened" => {
                let (batch_id, key, opened_at) = decode_value(payload, t)?;
                BatchEvent::Opened { batch_id, key, opened_at }
            }
            "settlement.entry_added" => BatchEvent::EntryAdded { entry: decode_value(payload, t)? },
            "settlement.batch_closed" => {
                let (totals, closed_at) = decode_value(payload, t)?;
                BatchEvent::Closed { totals, closed_at }
            }
            other => return Err(CodecError::UnknownEventType { event_type: other.to_owned() }),
        })
    }
}
