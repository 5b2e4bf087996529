//! Helpers shared by the service tests.
#![allow(dead_code)]

use kassa_bus::{Bus, Record};
use kassa_codec::{Envelope, EventPayload, decode_frame, encode_frame};
use kassa_domain::{PaymentEvent, PaymentId, PaymentState, apply};
use kassa_services::messages::{COMMAND_REJECTED, PaymentCommandMessage};
use kassa_services::payment_key;
use kassa_services::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Every event published on `payments.events` (of `partitions` partitions), per payment, in order.
pub async fn published(bus: &dyn Bus, partitions: u32) -> HashMap<PaymentId, Vec<Envelope>> {
    let mut out: HashMap<PaymentId, Vec<Envelope>> = HashMap::new();
    for partition in 0..partitions {
        let mut offset = 0;
        loop {
            let batch = bus.fetch(PAYMENT_EVENTS, partition, offset, 4096, Duration::ZERO).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for message in batch {
                offset = message.offset + 1;
                let envelope = decode_frame(&message.payload).unwrap();
                out.entry(PaymentId::from_u128(envelope.stream_id)).or_default().push(envelope);
            }
        }
    }
    out
}

/// A payment's state from its published events, each event once (by id, as consumers do).
pub fn state_of(events: &[Envelope]) -> PaymentState {
    let mut state = PaymentState::default();
    let mut seen = HashSet::new();
    for envelope in events {
        if envelope.event_type == COMMAND_REJECTED || !seen.insert(envelope.event_id) {
            continue;
        }
        apply(&mut state, &PaymentEvent::decode_payload(&envelope.event_type, &envelope.payload).unwrap());
    }
    state
}

/// Put a command on `payments.commands` as ingest's relay would: a frame
/// keyed by its payment, with `event_id` as the command's id.
pub async fn send_command(bus: &dyn Bus, event_id: u128, message: PaymentCommandMessage) {
    let envelope = Envelope {
        event_id,
        event_type: message.event_type().to_owned(),
        stream_id: message.payment_id().as_u128(),
        stream_seq: 1,
        position: 1,
        timestamp_ms: 0,
        causation_id: None,
        correlation_id: None,
        payload: message.encode_payload(),
        prev_hash: [0; 32],
    };
    let record = Record {
        topic: PAYMENT_COMMANDS.into(),
        key: payment_key(envelope.stream_id),
        payload: encode_frame(&envelope),
        timestamp_ms: 0,
    };
    bus.produce(vec![record]).await.unwrap();
}

/// Put a batch event on `settlement.events` as settlement's relay does (keyed by its batch).
pub async fn publish_batch_event(
    bus: &dyn Bus,
    batch_id: kassa_domain::BatchId,
    seq: u64,
    event: &kassa_domain::settlement::BatchEvent,
) {
    let envelope = Envelope {
        event_id: batch_id.as_u128() ^ u128::from(seq),
        event_type: event.event_type().to_owned(),
        stream_id: batch_id.as_u128(),
        stream_seq: seq,
        position: seq,
        timestamp_ms: 0,
        causation_id: None,
        correlation_id: None,
        payload: event.encode_payload(),
        prev_hash: [0; 32],
    };
    let record = Record {
        topic: kassa_services::topics::SETTLEMENT_EVENTS.into(),
        key: payment_key(batch_id.as_u128()),
        payload: encode_frame(&envelope),
        timestamp_ms: 0,
    };
    bus.produce(vec![record]).await.unwrap();
}

/// xorshift64*: a simulation's only source of choices.
pub struct Rng(pub u64);

impl Rng {
    /// A generator for a seed (never zero inside).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A fault for the schedule (or none): any mode, hitting a quarter, half or all of the calls.
pub fn fault_for(rng: &mut Rng) -> Option<kassa_providers::Fault> {
    use kassa_providers::{Fault, FaultMode};
    let mode = match rng.below(7) {
        0 => FaultMode::Down,
        1 => FaultMode::Error,
        2 => FaultMode::Slow,
        3 => FaultMode::TimeoutAfterAccept,
        4 => FaultMode::SoftDeclineBurst,
        _ => return None,
    };
    let rate_per_mille = [250, 500, 1000][rng.below(3) as usize];
    Some(Fault { mode, rate_per_mille, latency_ms: 400, until: None })
}

/// What the providers' ledgers hold (not reversed), per payment: (provider, amount held, amount captured).
pub fn standing<'a>(
    sims: impl IntoIterator<Item = &'a kassa_providers::SimulatedAcquirer>,
) -> std::collections::HashMap<kassa_domain::PaymentId, Vec<(String, i64, i64)>> {
    let mut standing: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
    for sim in sims {
        for entry in sim.ledger() {
            if entry.state != kassa_providers::LedgerState::Reversed {
                standing.entry(entry.payment_id).or_default().push((
                    sim.name().to_owned(),
                    entry.amount.minor,
                    entry.captured_minor,
                ));
            }
        }
    }
    standing
}

/// The end-state invariants of one simulated payment (card `number`,
/// `amount`), from its state, its event types in order and what the ledgers
/// hold for it: one outcome; an authorized payment held once, at the provider
/// Kassa names, captured in full; a declined one held nowhere; a hard-decline
/// card declined; nothing tried after a final decline. `Ok(true)`: captured.
pub fn check_payment(
    id: kassa_domain::PaymentId,
    number: &str,
    amount: i64,
    state: &kassa_domain::PaymentState,
    types: &[&str],
    holds: &[(String, i64, i64)],
) -> Result<bool, String> {
    use kassa_domain::Stage;
    let finals = types.iter().filter(|t| **t == "payment.authorized" || **t == "payment.declined").count();
    if finals != 1 {
        return Err(format!("payment {id} has {finals} outcomes: {types:?}"));
    }
    let captured = match state.stage {
        Stage::Captured => {
            if holds.len() != 1 {
                return Err(format!("authorized payment {id} stands at {} providers: {holds:?}", holds.len()));
            }
            let (provider, held, captured) = &holds[0];
            if Some(provider) != state.provider.as_ref() || *held != amount || *captured != amount {
                return Err(format!("payment {id}: Kassa says {:?} {amount}, the ledger {holds:?}", state.provider));
            }
            true
        }
        Stage::Declined => {
            if !holds.is_empty() {
                return Err(format!("declined payment {id} still holds money: {holds:?}"));
            }
            false
        }
        other => return Err(format!("payment {id} ended {other:?}: {types:?}")),
    };
    if number == "4000000000000002" && state.stage != Stage::Declined {
        return Err(format!("hard-decline card payment {id} ended {:?}", state.stage));
    }
    // After a final decline nothing else is tried.
    if let Some(at) = types.iter().position(|t| *t == "payment.declined")
        && types[at + 1..].iter().any(|t| t.starts_with("payment.authorization"))
    {
        return Err(format!("payment {id} was retried after a final decline: {types:?}"));
    }
    Ok(captured)
}
