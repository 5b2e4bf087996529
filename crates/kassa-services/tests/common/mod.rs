//! Helpers shared by the service tests.

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
