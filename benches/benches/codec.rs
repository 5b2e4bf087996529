//! Micro-benchmarks of the hot per-event work: encode, decode+verify, decide.
//! `cargo bench -p kassa-benches --bench codec`

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use kassa_benches::{new_event, payment_requested};
use kassa_codec::{Envelope, EventPayload, decode_frame, encode_frame, frame_hash};
use kassa_domain::{PaymentCommand, PaymentEvent, PaymentState, Timestamp, decide};

fn envelope() -> Envelope {
    let event = new_event(42);
    Envelope {
        event_id: event.event_id,
        event_type: event.event_type,
        stream_id: event.stream_id,
        stream_seq: 1,
        position: 42,
        timestamp_ms: event.timestamp_ms,
        causation_id: event.causation_id,
        correlation_id: event.correlation_id,
        payload: event.payload,
        prev_hash: [7; 32],
    }
}

fn codec(c: &mut Criterion) {
    let envelope = envelope();
    let frame = encode_frame(&envelope);
    c.bench_function("encode_frame (payment.requested)", |b| b.iter(|| encode_frame(black_box(&envelope))));
    c.bench_function("decode_frame + crc", |b| b.iter(|| decode_frame(black_box(&frame)).unwrap()));
    c.bench_function("frame_hash (sha256)", |b| b.iter(|| frame_hash(black_box(&frame))));
    let payload = envelope.payload.clone();
    c.bench_function("decode payload (payment.requested)", |b| {
        b.iter(|| PaymentEvent::decode_payload("payment.requested", black_box(&payload)).unwrap())
    });
    let PaymentEvent::Requested(requested) = payment_requested(1) else { unreachable!() };
    let command = PaymentCommand::Request(kassa_domain::RequestPayment {
        payment_id: requested.payment_id,
        merchant_id: requested.merchant_id,
        amount: requested.amount,
        card: requested.card,
        capture: true,
        reference: requested.reference,
        metadata: requested.metadata,
    });
    let state = PaymentState::default();
    c.bench_function("decide (request payment)", |b| {
        b.iter(|| decide(black_box(&state), black_box(command.clone()), Timestamp(0)).unwrap())
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
