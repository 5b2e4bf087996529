//! Messages between services that are not domain events: commands to the
//! authorization service, and its record of a refused command. Same rules as
//! domain events: stable type names, fields in a fixed order.

use crate::runtime::derived_id;
use kassa_bus::partition_for;
use kassa_codec::{CodecError, EventPayload, decode_value, encode_value};
use kassa_domain::settlement::{BatchKey, SettlementEntry};
use kassa_domain::{
    BatchId, CaptureId, MerchantId, PaymentEvent, PaymentId, PaymentRequested, RefundId, ReportId, Timestamp,
};
use kassa_eventlog::NewEvent;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

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
    /// From settlement: these payments' captures are in a closed batch. All
    /// are on one partition of `payments.commands`; the first names the
    /// stream (and so the partition) the message goes on. Never empty.
    RecordSettlements {
        payment_ids: Vec<PaymentId>,
        batch_id: BatchId,
    },
    /// From reconciliation: the provider's report matched these payments. As
    /// [`PaymentCommandMessage::RecordSettlements`]: one partition, never empty.
    RecordReconciliations {
        payment_ids: Vec<PaymentId>,
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
pub const RECORD_SETTLEMENTS: &str = "command.record_settlements";
pub const RECORD_RECONCILIATIONS: &str = "command.record_reconciliations";
/// Payments in one [`PaymentCommandMessage::RecordSettlements`] or
/// [`PaymentCommandMessage::RecordReconciliations`], at most: authorization's
/// batches are bounded in inputs, and with the changelog such a command
/// weighs this many.
pub const PAYMENTS_PER_COMMAND_MAX: usize = 4;
pub const COMMAND_REJECTED: &str = "payment.command_rejected";
pub const CLAIM_IDEMPOTENCY_KEY: &str = "command.claim_idempotency_key";
pub const DUPLICATE_REQUEST: &str = "payment.duplicate_request";
pub const CLAIM_COMMAND_KEY: &str = "command.claim_command_key";

impl PaymentCommandMessage {
    /// The payment the command is for; of a command for several, the first
    /// (whose stream it goes on).
    pub fn payment_id(&self) -> PaymentId {
        match self {
            PaymentCommandMessage::RecordSettlements { payment_ids, .. }
            | PaymentCommandMessage::RecordReconciliations { payment_ids, .. } => {
                // Never empty: decoding refuses an empty list, and the services make none.
                payment_ids.first().copied().unwrap_or(PaymentId::from_u128(0))
            }
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
            PaymentCommandMessage::RecordSettlements { .. } => RECORD_SETTLEMENTS,
            PaymentCommandMessage::RecordReconciliations { .. } => RECORD_RECONCILIATIONS,
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
            PaymentCommandMessage::RecordSettlements { payment_ids, batch_id } => {
                encode_value(&(payment_ids, batch_id))
            }
            PaymentCommandMessage::RecordReconciliations { payment_ids, report_id } => {
                encode_value(&(payment_ids, report_id))
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
            RECORD_SETTLEMENTS => {
                let (payment_ids, batch_id) = decode_value(payload, event_type)?;
                PaymentCommandMessage::RecordSettlements {
                    payment_ids: some_payments(payment_ids, event_type)?,
                    batch_id,
                }
            }
            RECORD_RECONCILIATIONS => {
                let (payment_ids, report_id) = decode_value(payload, event_type)?;
                let payment_ids = some_payments(payment_ids, event_type)?;
                PaymentCommandMessage::RecordReconciliations { payment_ids, report_id }
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

/// Commands made by `make` for `payment_ids`, grouped by the partition of
/// `payments.commands` each payment is on (of `partitions`), in id order,
/// each payment once, at most [`PAYMENTS_PER_COMMAND_MAX`] a command, each on
/// its first payment's stream. A command's id comes from `cause` and the
/// payments it names: made again with the same payments (a close or report
/// made again, in any order), it has the same id and authorization drops it;
/// with others (a report that matched more the second time), it has another,
/// and authorization records what is new — recording a payment again in the
/// same batch or report changes nothing.
pub fn commands_for_payments(
    payment_ids: impl IntoIterator<Item = PaymentId>,
    partitions: u32,
    cause: u128,
    timestamp_ms: i64,
    make: impl Fn(Vec<PaymentId>) -> PaymentCommandMessage,
) -> Vec<NewEvent> {
    let mut by_partition: BTreeMap<u32, std::collections::BTreeSet<PaymentId>> = BTreeMap::new();
    for payment_id in payment_ids {
        let partition = partition_for(&crate::payment_key(payment_id.as_u128()), partitions);
        by_partition.entry(partition).or_default().insert(payment_id);
    }
    let mut commands = Vec::new();
    for payment_ids in by_partition.into_values() {
        let payment_ids: Vec<PaymentId> = payment_ids.into_iter().collect();
        for chunk in payment_ids.chunks(PAYMENTS_PER_COMMAND_MAX) {
            let command = make(chunk.to_vec());
            let mut named = Sha256::new();
            for payment_id in chunk {
                named.update(payment_id.as_u128().to_be_bytes());
            }
            let named = named.finalize();
            let content = u64::from_be_bytes(named[..8].try_into().expect("a SHA-256 digest has 8 bytes"));
            commands.push(NewEvent {
                event_id: derived_id(cause, command.event_type(), content),
                event_type: command.event_type().to_owned(),
                stream_id: chunk[0].as_u128(),
                timestamp_ms,
                causation_id: Some(cause),
                correlation_id: None,
                payload: command.encode_payload(),
            });
        }
    }
    commands
}

/// A command's list of payments, refused when empty or longer than
/// [`PAYMENTS_PER_COMMAND_MAX`]: a peer's bad message changes nothing.
fn some_payments(payment_ids: Vec<PaymentId>, event_type: &str) -> Result<Vec<PaymentId>, CodecError> {
    if payment_ids.is_empty() || payment_ids.len() > PAYMENTS_PER_COMMAND_MAX {
        return Err(CodecError::BadPayload {
            event_type: event_type.to_owned(),
            reason: format!("names {} payments; 1 to {PAYMENTS_PER_COMMAND_MAX} expected", payment_ids.len()),
        });
    }
    Ok(payment_ids)
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

    #[test]
    fn commands_for_many_payments_keep_to_one_partition_and_a_bound() {
        let payments: Vec<PaymentId> = (1..=50u128).map(|i| PaymentId::from_u128(i * 0x9E37_79B9)).collect();
        let batch_id = BatchId::from_u128(77);
        let make = |payment_ids| PaymentCommandMessage::RecordSettlements { payment_ids, batch_id };
        let commands = commands_for_payments(payments.clone(), 8, 77, 1_000, make);
        let mut covered = Vec::new();
        for event in &commands {
            let PaymentCommandMessage::RecordSettlements { payment_ids, .. } =
                PaymentCommandMessage::decode(&event.event_type, &event.payload).unwrap()
            else {
                panic!("not a settlement command")
            };
            assert!(payment_ids.len() <= PAYMENTS_PER_COMMAND_MAX);
            // On its first payment's stream, and so on the partition every one of its payments is on.
            assert_eq!(event.stream_id, payment_ids[0].as_u128());
            let partition = |id: &PaymentId| partition_for(&crate::payment_key(id.as_u128()), 8);
            assert!(payment_ids.iter().all(|id| partition(id) == partition(&payment_ids[0])));
            covered.extend(payment_ids);
        }
        covered.sort();
        assert_eq!(covered, payments, "each payment in one command");
        let ids = |commands: &[NewEvent]| commands.iter().map(|c| c.event_id).collect::<Vec<_>>();
        let unique: std::collections::HashSet<u128> = ids(&commands).into_iter().collect();
        assert_eq!(unique.len(), commands.len());
        // Made again, in another order and with a payment named twice: the same commands.
        let mut shuffled: Vec<PaymentId> = payments.iter().rev().copied().collect();
        shuffled.push(payments[3]);
        let again = commands_for_payments(shuffled, 8, 77, 2_000, make);
        assert_eq!(ids(&commands), ids(&again));
        assert_eq!(
            commands.iter().map(|c| &c.payload).collect::<Vec<_>>(),
            again.iter().map(|c| &c.payload).collect::<Vec<_>>()
        );
        // With one payment more (here the last of its partition), the command that names it is new;
        // the others stay. (One in the middle would renumber the commands after it: repeats, no loss.)
        let mut more = payments.clone();
        more.push(PaymentId::from_u128(51 * 0x9E37_79B9));
        let grown = commands_for_payments(more, 8, 77, 3_000, make);
        let new: Vec<u128> = ids(&grown).into_iter().filter(|id| !unique.contains(id)).collect();
        assert_eq!(new.len(), 1, "only the command that names the new payment is new");
    }

    #[test]
    fn a_command_for_no_payment_or_too_many_is_refused() {
        for count in [0, PAYMENTS_PER_COMMAND_MAX + 1] {
            let payment_ids: Vec<PaymentId> = (0..count as u128).map(PaymentId::from_u128).collect();
            let payload = encode_value(&(payment_ids, BatchId::from_u128(1)));
            assert!(PaymentCommandMessage::decode(RECORD_SETTLEMENTS, &payload).is_err(), "{count} payments");
            assert!(PaymentCommandMessage::decode(RECORD_RECONCILIATIONS, &payload).is_err(), "{count} payments");
        }
    }

    proptest::proptest! {
        /// Whatever the payments (repeated, in any order) and however many partitions: each
        /// payment is named once, by a command of at most four payments of its own partition, on
        /// its first payment's stream; and the same payments in another order make the same
        /// commands.
        #[test]
        fn every_payment_is_named_once_on_its_partition(
            raw in proptest::collection::vec(0u128..40, 1..60),
            partitions in 1u32..12,
        ) {
            let payments: Vec<PaymentId> = raw.iter().map(|n| PaymentId::from_u128(n * 0x9E37_79B9_7F4A_7C15)).collect();
            let batch_id = BatchId::from_u128(5);
            let make = |payment_ids| PaymentCommandMessage::RecordSettlements { payment_ids, batch_id };
            let commands = commands_for_payments(payments.clone(), partitions, 5, 0, make);
            let partition = |id: &PaymentId| partition_for(&crate::payment_key(id.as_u128()), partitions);
            let mut named = Vec::new();
            for event in &commands {
                let Ok(PaymentCommandMessage::RecordSettlements { payment_ids, .. }) =
                    PaymentCommandMessage::decode(&event.event_type, &event.payload)
                else {
                    panic!("not a settlement command")
                };
                proptest::prop_assert!(payment_ids.len() <= PAYMENTS_PER_COMMAND_MAX);
                proptest::prop_assert_eq!(event.stream_id, payment_ids[0].as_u128());
                proptest::prop_assert!(payment_ids.iter().all(|id| partition(id) == partition(&payment_ids[0])));
                named.extend(payment_ids);
            }
            let mut expected = payments.clone();
            expected.sort();
            expected.dedup();
            named.sort();
            proptest::prop_assert_eq!(named, expected);
            let mut reversed = payments;
            reversed.reverse();
            let again = commands_for_payments(reversed, partitions, 5, 0, make);
            let ids = |c: &[NewEvent]| c.iter().map(|e| (e.event_id, e.payload.clone())).collect::<Vec<_>>();
            proptest::prop_assert_eq!(ids(&commands), ids(&again));
        }
    }
}
