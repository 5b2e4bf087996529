//! Shared fixtures for Kassa's benchmarks: realistic events.

use kassa_codec::EventPayload;
use kassa_domain::*;
use kassa_eventlog::NewEvent;
use std::collections::BTreeMap;

/// A `payment.requested` event as the ingest service would write it.
pub fn payment_requested(i: u64) -> PaymentEvent {
    let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000))
        .expect("test card")
        .summarize(b"bench-key");
    PaymentEvent::Requested(PaymentRequested {
        payment_id: PaymentId::from_parts(1_795_651_200_000 + i, u128::from(i) * 7919),
        merchant_id: MerchantId::from_parts(1_795_651_200_000, 42),
        amount: Money::new(1999 + (i % 1000) as i64, Currency::from_code("EUR").expect("EUR")),
        card,
        capture: true,
        reference: Some(format!("order-{i}")),
        metadata: BTreeMap::new(),
        requested_at: Timestamp(1_795_651_200_000 + i as i64),
    })
}

pub fn new_event(i: u64) -> NewEvent {
    let event = payment_requested(i);
    NewEvent {
        event_id: u128::from(i) << 64 | 1,
        event_type: event.event_type().to_owned(),
        stream_id: u128::from(i),
        timestamp_ms: 1_795_651_200_000 + i as i64,
        causation_id: Some(u128::from(i)),
        correlation_id: Some(u128::from(i)),
        payload: event.encode_payload(),
    }
}
