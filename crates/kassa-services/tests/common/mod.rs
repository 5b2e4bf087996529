//! Helpers shared by the service tests.
#![allow(dead_code)]

use kassa_bus::{Bus, Record};
use kassa_codec::{Envelope, encode_frame};
use kassa_services::messages::PaymentCommandMessage;
use kassa_services::payment_key;
use kassa_services::topics::PAYMENT_COMMANDS;

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
