//! Messages between services that are not domain events: commands to the
//! authorization service, and its record of a refused command. Same rules as
//! domain events: stable type names, fields in a fixed order.

use kassa_codec::{CodecError, EventPayload, decode_value, encode_value};
use kassa_domain::settlement::{BatchKey, SettlementEntry};
use kassa_domain::{
    BatchId, CaptureId, MerchantId, PaymentEvent, PaymentId, PaymentRequested, RefundId, ReportId, Timestamp,
};

/// What arrives on `payments.commands`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommandMessage {
    /// The card of a payment about to be requested, sealed by ingest for
    /// authorization ([`crate::seal`]); published just before the request.
    CardSealed {
        payment_id: PaymentId,
        sealed: Vec<u8>,
    },
    /// A new payment, as accepted by ingest.
    Requested(PaymentRequested),
    Capture {
        payment_id: PaymentId,
        capture_id: CaptureId,
        amount_minor: Option<i64>,
    },
    Void {
        payment_id: PaymentId,
    },
    Refund {
        payment_id: PaymentId,
        refund_id: RefundId,
        amount_minor: Option<i64>,
    },
    /// From settlement: the payment's capture is in a closed batch.
    RecordSettlement {
        payment_id: PaymentId,
        batch_id: BatchId,
    },
    /// From reconciliation: the provider's report matched the payment.
    RecordReconciliation {
        payment_id: PaymentId,
        report_id: ReportId,
    },
    /// From ingest, just before a request made with an `Idempotency-Key`: the
    /// payment claims the merchant's key. Ingest puts the payment on the
    /// partition the key maps to, so every instance's claims on one key meet
    /// at one authorization actor, which lets the first in and turns the
    /// others into a [`DuplicateRequest`].
    ClaimIdempotencyKey {
        payment_id: PaymentId,
        merchant_id: MerchantId,
        /// SHA-256 of the key (the key itself stays with ingest).
        key_hash: [u8; 32],
        /// The request's fingerprint (`kassa_api::fingerprint`): same key, same request?
        fingerprint: String,
    },
    /// From ingest, just before a capture, void or refund made with an
    /// `Idempotency-Key`, in the same append: the command (by its id) claims the
    /// merchant's key at the payment's authorization actor. The first claim
    /// holds it; a command whose claim finds the key held by another command —
    /// the key reused for a different request, perhaps on another ingest
    /// instance — is refused (`idempotency_key_reused`) and never carried out.
    ClaimCommandKey {
        payment_id: PaymentId,
        merchant_id: MerchantId,
        /// As in [`PaymentCommandMessage::ClaimIdempotencyKey`].
        key_hash: [u8; 32],
        fingerprint: String,
        /// The event id of the command that follows.
        command_id: u128,
    },
}

pub const CARD_SEALED: &str = "command.card_sealed";
pub const CAPTURE: &str = "command.capture_payment";
pub const VOID: &str = "command.void_payment";
pub const REFUND: &str = "command.refund_payment";
pub const RECORD_SETTLEMENT: &str = "command.record_settlement";
pub const RECORD_RECONCILIATION: &str = "command.record_reconciliation";
pub const COMMAND_REJECTED: &str = "payment.command_rejected";
pub const CLAIM_IDEMPOTENCY_KEY: &str = "command.claim_idempotency_key";
pub const DUPLICATE_REQUEST: &str = "payment.duplicate_request";
pub const CLAIM_COMMAND_KEY: &str = "command.claim_command_key";

impl PaymentCommandMessage {
    pub fn payment_id(&self) -> PaymentId {
        match self {
            PaymentCommandMessage::Requested(r) => r.payment_id,
            PaymentCommandMessage::CardSealed { payment_id, .. }
            | PaymentCommandMessage::Capture { payment_id, .. }
            | PaymentCommandMessage::Void { payment_id }
            | PaymentCommandMessage::Refund { payment_id, .. }
            | PaymentCommandMessage::RecordSettlement { payment_id, .. }
            | PaymentCommandMessage::RecordReconciliation { payment_id, .. }
            | PaymentCommandMessage::ClaimIdempotencyKey { payment_id, .. }
            | PaymentCommandMessage::ClaimCommandKey { payment_id, .. } => *payment_id,
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            PaymentCommandMessage::Requested(_) => "payment.requested",
            PaymentCommandMessage::CardSealed { .. } => CARD_SEALED,
            PaymentCommandMessage::Capture { .. } => CAPTURE,
            PaymentCommandMessage::Void { .. } => VOID,
            PaymentCommandMessage::Refund { .. } => REFUND,
            PaymentCommandMessage::RecordSettlement { .. } => RECORD_SETTLEMENT,
            PaymentCommandMessage::RecordReconciliation { .. } => RECORD_RECONCILIATION,
            PaymentCommandMessage::ClaimIdempotencyKey { .. } => CLAIM_IDEMPOTENCY_KEY,
            PaymentCommandMessage::ClaimCommandKey { .. } => CLAIM_COMMAND_KEY,
        }
    }

    pub fn encode_payload(&self) -> Vec<u8> {
        match self {
            PaymentCommandMessage::Requested(r) => PaymentEvent::Requested(r.clone()).encode_payload(),
            PaymentCommandMessage::CardSealed { payment_id, sealed } => encode_value(&(payment_id, sealed)),
            PaymentCommandMessage::Capture { payment_id, capture_id, amount_minor } => {
                encode_value(&(payment_id, capture_id, amount_minor))
            }
            PaymentCommandMessage::Void { payment_id } => encode_value(payment_id),
            PaymentCommandMessage::Refund { payment_id, refund_id, amount_minor } => {
                encode_value(&(payment_id, refund_id, amount_minor))
            }
            PaymentCommandMessage::RecordSettlement { payment_id, batch_id } => encode_value(&(payment_id, batch_id)),
            PaymentCommandMessage::RecordReconciliation { payment_id, report_id } => {
                encode_value(&(payment_id, report_id))
            }
            PaymentCommandMessage::ClaimIdempotencyKey { payment_id, merchant_id, key_hash, fingerprint } => {
                encode_value(&(payment_id, merchant_id, key_hash, fingerprint))
            }
            PaymentCommandMessage::ClaimCommandKey { payment_id, merchant_id, key_hash, fingerprint, command_id } => {
                encode_value(&(payment_id, merchant_id, key_hash, fingerprint, command_id))
            }
        }
    }

    pub fn decode(event_type: &str, payload: &[u8]) -> Result<Self, CodecError> {
        Ok(match event_type {
            "payment.requested" => match PaymentEvent::decode_payload(event_type, payload)? {
                PaymentEvent::Requested(r) => PaymentCommandMessage::Requested(r),
                _ => unreachable!("payment.requested decodes to Requested"),
            },
            CARD_SEALED => {
                let (payment_id, sealed) = decode_value(payload, event_type)?;
                PaymentCommandMessage::CardSealed { payment_id, sealed }
            }
            CAPTURE => {
                let (payment_id, capture_id, amount_minor) = decode_value(payload, event_type)?;
                PaymentCommandMessage::Capture { payment_id, capture_id, amount_minor }
            }
            VOID => PaymentCommandMessage::Void { payment_id: decode_value(payload, event_type)? },
            REFUND => {
                let (payment_id, refund_id, amount_minor) = decode_value(payload, event_type)?;
                PaymentCommandMessage::Refund { payment_id, refund_id, amount_minor }
            }
            RECORD_SETTLEMENT => {
                let (payment_id, batch_id) = decode_value(payload, event_type)?;
                PaymentCommandMessage::RecordSettlement { payment_id, batch_id }
            }
            RECORD_RECONCILIATION => {
                let (payment_id, report_id) = decode_value(payload, event_type)?;
                PaymentCommandMessage::RecordReconciliation { payment_id, report_id }
            }
            CLAIM_IDEMPOTENCY_KEY => {
                let (payment_id, merchant_id, key_hash, fingerprint) = decode_value(payload, event_type)?;
                PaymentCommandMessage::ClaimIdempotencyKey { payment_id, merchant_id, key_hash, fingerprint }
            }
            CLAIM_COMMAND_KEY => {
                let (payment_id, merchant_id, key_hash, fingerprint, command_id) = decode_value(payload, event_type)?;
                PaymentCommandMessage::ClaimCommandKey { payment_id, merchant_id, key_hash, fingerprint, command_id }
            }
            other => return Err(CodecError::UnknownEventType { event_type: other.to_owned() }),
        })
    }
}

/// The authorization service refused a command (an illegal transition, an
/// amount over what is left). Recorded so the caller learns why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRejected {
    /// The command envelope's event id.
    pub command_id: u128,
    pub code: String,
    pub message: String,
}

impl CommandRejected {
    pub fn encode_payload(&self) -> Vec<u8> {
        encode_value(&(self.command_id, &self.code, &self.message))
    }

    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let (command_id, code, message) = decode_value(payload, COMMAND_REJECTED)?;
        Ok(CommandRejected { command_id, code, message })
    }
}

/// Authorization's answer to a [`PaymentCommandMessage::ClaimIdempotencyKey`]
/// that came second: the key belongs to `original`. Recorded on the stream of
/// the payment that claimed it in vain, which is never requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateRequest {
    /// The payment that claimed the key first.
    pub original: PaymentId,
    /// Whether this request is the same as the original's (a retry), or a
    /// different one made with the same key (refused).
    pub same_request: bool,
}

impl DuplicateRequest {
    pub fn encode_payload(&self) -> Vec<u8> {
        encode_value(&(self.original, self.same_request))
    }

    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let (original, same_request) = decode_value(payload, DUPLICATE_REQUEST)?;
        Ok(DuplicateRequest { original, same_request })
    }
}

pub const ENTRY_PENDING: &str = "settlement.entry_pending";
pub const CUTOFF_REQUESTED: &str = "settlement.cutoff_requested";

/// What arrives on `settlement.entries`, keyed by batch key: the input of the
/// partition that owns a key's batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettlementInput {
    /// A capture or refund on its way into the open batch of `key`: settlement's
    /// feed, which follows `payments.events`, knows the payment's provider,
    /// merchant and currency by then.
    EntryPending { key: BatchKey, entry: SettlementEntry },
    /// Close every open batch of the partition it is on. `slot`: a scheduled
    /// cut-off, named by its time (ms since the Unix epoch, a multiple of the
    /// cut-off interval); a partition closes once per slot, however many
    /// instances ask. None: an operator's, which always closes.
    CutoffRequested { cutoff_id: u128, slot: Option<u64>, requested_at: Timestamp },
}

impl SettlementInput {
    pub fn event_type(&self) -> &'static str {
        match self {
            SettlementInput::EntryPending { .. } => ENTRY_PENDING,
            SettlementInput::CutoffRequested { .. } => CUTOFF_REQUESTED,
        }
    }

    pub fn encode_payload(&self) -> Vec<u8> {
        match self {
            SettlementInput::EntryPending { key, entry } => encode_value(&(key, entry)),
            SettlementInput::CutoffRequested { cutoff_id, slot, requested_at } => {
                encode_value(&(cutoff_id, slot, requested_at))
            }
        }
    }

    pub fn decode(event_type: &str, payload: &[u8]) -> Result<Self, CodecError> {
        Ok(match event_type {
            ENTRY_PENDING => {
                let (key, entry) = decode_value(payload, event_type)?;
                SettlementInput::EntryPending { key, entry }
            }
            CUTOFF_REQUESTED => {
                let (cutoff_id, slot, requested_at) = decode_value(payload, event_type)?;
                SettlementInput::CutoffRequested { cutoff_id, slot, requested_at }
            }
            other => return Err(CodecError::UnknownEventType { event_type: other.to_owned() }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let messages = [
            PaymentCommandMessage::Capture {
                payment_id: PaymentId::from_u128(1),
                capture_id: CaptureId::from_u128(2),
                amount_minor: Some(5),
            },
            PaymentCommandMessage::Void { payment_id: PaymentId::from_u128(1) },
            PaymentCommandMessage::Refund {
                payment_id: PaymentId::from_u128(1),
                refund_id: RefundId::from_u128(3),
                amount_minor: None,
            },
            PaymentCommandMessage::RecordSettlement {
                payment_id: PaymentId::from_u128(1),
                batch_id: BatchId::from_u128(4),
            },
            PaymentCommandMessage::RecordReconciliation {
                payment_id: PaymentId::from_u128(1),
                report_id: ReportId::from_u128(5),
            },
            PaymentCommandMessage::ClaimIdempotencyKey {
                payment_id: PaymentId::from_u128(1),
                merchant_id: MerchantId::from_u128(6),
                key_hash: [7; 32],
                fingerprint: "f".into(),
            },
            PaymentCommandMessage::ClaimCommandKey {
                payment_id: PaymentId::from_u128(1),
                merchant_id: MerchantId::from_u128(6),
                key_hash: [8; 32],
                fingerprint: "g".into(),
                command_id: 10,
            },
        ];
        for message in messages {
            let decoded = PaymentCommandMessage::decode(message.event_type(), &message.encode_payload()).unwrap();
            assert_eq!(decoded, message);
        }
        assert!(PaymentCommandMessage::decode("command.teleport", &[]).is_err());
        let rejected = CommandRejected { command_id: 9, code: "c".into(), message: "m".into() };
        assert_eq!(CommandRejected::decode(&rejected.encode_payload()).unwrap(), rejected);
        let duplicate = DuplicateRequest { original: PaymentId::from_u128(8), same_request: true };
        assert_eq!(DuplicateRequest::decode(&duplicate.encode_payload()).unwrap(), duplicate);
        let eur = kassa_domain::Currency::from_code("EUR").unwrap();
        let inputs = [
            SettlementInput::EntryPending {
                key: BatchKey { provider: "acq-alpha".into(), merchant_id: MerchantId::from_u128(2), currency: eur },
                entry: SettlementEntry {
                    entry_id: 3,
                    payment_id: PaymentId::from_u128(4),
                    kind: kassa_domain::settlement::EntryKind::Refund,
                    amount: kassa_domain::Money::new(500, eur),
                },
            },
            SettlementInput::CutoffRequested { cutoff_id: 5, slot: Some(6), requested_at: Timestamp(7) },
            SettlementInput::CutoffRequested { cutoff_id: 8, slot: None, requested_at: Timestamp(9) },
        ];
        for input in inputs {
            assert_eq!(SettlementInput::decode(input.event_type(), &input.encode_payload()).unwrap(), input);
        }
        assert!(SettlementInput::decode(ENTRY_PENDING, &[1, 2]).is_err());
    }
}
