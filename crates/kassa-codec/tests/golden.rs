//! Golden files: one encoded envelope per event type, committed under the
//! workspace's `tests/golden/`. Today's code must decode every one of them to
//! the value below; a change that breaks old events fails here.
//!
//! To add a golden file for a new event type (never to rewrite an old one):
//! `KASSA_BLESS_GOLDEN=1 cargo test -p kassa-codec --test golden`.

use kassa_codec::{Envelope, EventPayload, decode_frame, encode_frame};
use kassa_domain::settlement::{BatchEvent, BatchKey, BatchTotals, EntryKind, SettlementEntry};
use kassa_domain::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    // Where cargo runs the test from (a binary built in another checkout that
    // shares the target directory would carry that checkout's path).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    PathBuf::from(manifest_dir).join("../../tests/golden/v1")
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::from_code("EUR").unwrap())
}

fn samples() -> Vec<PaymentEvent> {
    let card = CardSummary {
        token: CardToken([0xAB; 16]),
        brand: CardBrand::Visa,
        bin: "424242".into(),
        last4: "4242".into(),
        expiry: Expiry { month: 12, year: 2030 },
    };
    let attempt = AttemptId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_0001);
    let mut metadata = BTreeMap::new();
    metadata.insert("order".to_owned(), "1001".to_owned());
    vec![
        PaymentEvent::Requested(PaymentRequested {
            payment_id: PaymentId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_00AA),
            merchant_id: MerchantId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_00BB),
            amount: Money::new(1250, Currency::from_code("BHD").unwrap()),
            card,
            capture: true,
            reference: Some("order-1001".into()),
            metadata,
            requested_at: Timestamp(1_795_651_200_000),
        }),
        PaymentEvent::AuthorizationStarted { attempt_id: attempt, provider: "acq-alpha".into() },
        PaymentEvent::Authorized {
            attempt_id: attempt,
            provider: "acq-alpha".into(),
            authorization_code: "A1B2C3".into(),
            amount: eur(1999),
        },
        PaymentEvent::Declined {
            attempt_id: Some(attempt),
            provider: Some("acq-beta".into()),
            code: "do_not_honor".into(),
            category: DeclineCategory::Hard,
        },
        PaymentEvent::AuthorizationFailed {
            attempt_id: attempt,
            provider: "acq-gamma".into(),
            reason: "http 503".into(),
        },
        PaymentEvent::AuthorizationOutcomeUnknown {
            attempt_id: attempt,
            provider: "acq-alpha".into(),
            reason: "no answer in 2000 ms".into(),
        },
        PaymentEvent::AuthorizationReversed { attempt_id: attempt, provider: "acq-alpha".into() },
        PaymentEvent::Captured { capture_id: CaptureId::from_u128(77), amount: eur(1000) },
        PaymentEvent::Voided { amount: Money::new(500, Currency::from_code("JPY").unwrap()) },
        PaymentEvent::Refunded { refund_id: RefundId::from_u128(88), amount: eur(250) },
        PaymentEvent::Settled { batch_id: BatchId::from_u128(99) },
        PaymentEvent::Reconciled { report_id: ReportId::from_u128(111) },
        PaymentEvent::AttemptDeclined {
            attempt_id: attempt,
            provider: "acq-beta".into(),
            code: "issuer_unavailable".into(),
        },
        PaymentEvent::AuthorizedByStandIn { amount: eur(1999) },
        PaymentEvent::StandInConfirmed {
            attempt_id: attempt,
            provider: "acq-gamma".into(),
            authorization_code: "Z9Y8X7".into(),
        },
        PaymentEvent::StandInDeclined { attempt_id: None, provider: None, code: "card_data_unavailable".into() },
    ]
}

fn envelope_for<E: EventPayload>(index: usize, event: &E) -> Envelope {
    Envelope {
        event_id: 0x0193_0000_0000_0000_0000_0000_0001_0000 + index as u128,
        event_type: event.event_type().to_owned(),
        stream_id: 0x0193_0000_0000_0000_0000_0000_0000_00AA,
        stream_seq: index as u64 + 1,
        position: index as u64 + 1000,
        timestamp_ms: 1_795_651_200_000 + index as i64,
        causation_id: Some(42),
        correlation_id: if index.is_multiple_of(2) { Some(43) } else { None },
        payload: event.encode_payload(),
        prev_hash: [index as u8; 32],
    }
}

#[test]
fn every_event_type_has_a_sample() {
    let mut names: Vec<&str> = samples().iter().map(|e| e.event_type()).collect();
    names.sort_unstable();
    let mut all = PaymentEvent::EVENT_TYPES.to_vec();
    all.sort_unstable();
    assert_eq!(names, all);
}

fn check_golden<E: EventPayload + PartialEq + std::fmt::Debug>(samples: &[E], offset: usize) {
    let bless = std::env::var_os("KASSA_BLESS_GOLDEN").is_some();
    for (index, event) in samples.iter().enumerate() {
        let path = golden_dir().join(format!("{}.bin", event.event_type()));
        let expected = envelope_for(index + offset, event);
        if bless && !path.exists() {
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&path, encode_frame(&expected)).unwrap();
        }
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("golden file {} is missing ({e}); see this file's docs", path.display()));
        let envelope = decode_frame(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(envelope, expected, "{}", path.display());
        let decoded = E::decode_payload(&envelope.event_type, &envelope.payload).unwrap();
        assert_eq!(&decoded, event);
        // The writer still produces the same bytes for format version 1.
        assert_eq!(encode_frame(&expected), bytes, "encoding of {} drifted", path.display());
    }
}

#[test]
fn golden_files_still_decode() {
    check_golden(&samples(), 0);
    check_golden(&batch_samples(), 100);
}

fn batch_samples() -> Vec<BatchEvent> {
    let key = BatchKey {
        provider: "acq-alpha".into(),
        merchant_id: MerchantId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_00BB),
        currency: Currency::from_code("EUR").unwrap(),
    };
    vec![
        BatchEvent::Opened { batch_id: BatchId::from_u128(99), key, opened_at: Timestamp(1_795_651_200_000) },
        BatchEvent::EntryAdded {
            entry: SettlementEntry {
                entry_id: 77,
                payment_id: PaymentId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_00AA),
                kind: EntryKind::Refund,
                amount: eur(250),
            },
        },
        BatchEvent::Closed {
            totals: BatchTotals { captured: eur(2999), refunded: eur(500), fees: eur(137), net: eur(2362), entries: 3 },
            closed_at: Timestamp(1_795_654_800_000),
        },
    ]
}

#[test]
fn every_batch_event_type_has_a_sample() {
    let names: Vec<&str> = batch_samples().iter().map(|e| e.event_type()).collect();
    assert_eq!(names, BatchEvent::EVENT_TYPES);
}

#[test]
fn persisted_enum_indexes_are_stable() {
    use kassa_codec::encode_value;
    let brands = [
        CardBrand::Visa,
        CardBrand::Mastercard,
        CardBrand::Amex,
        CardBrand::Discover,
        CardBrand::Jcb,
        CardBrand::DinersClub,
        CardBrand::UnionPay,
        CardBrand::Maestro,
        CardBrand::Unknown,
    ];
    for (index, brand) in brands.iter().enumerate() {
        assert_eq!(encode_value(brand), vec![index as u8], "{brand:?}");
    }
    assert_eq!(encode_value(&EntryKind::Capture), vec![0]);
    assert_eq!(encode_value(&EntryKind::Refund), vec![1]);
    assert_eq!(encode_value(&DeclineCategory::Hard), vec![0]);
    assert_eq!(encode_value(&DeclineCategory::Soft), vec![1]);
}

#[test]
fn unknown_event_types_are_a_clear_error() {
    let err = PaymentEvent::decode_payload("payment.teleported", &[]).unwrap_err();
    assert!(err.to_string().contains("unknown event type"), "{err}");
}

proptest! {
    #[test]
    fn garbage_payloads_never_panic(index in 0usize..12, bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = PaymentEvent::decode_payload(PaymentEvent::EVENT_TYPES[index], &bytes);
    }

    #[test]
    fn truncated_payloads_are_errors(index in 0usize..12, cut in 1usize..8) {
        let event = &samples()[index];
        let payload = event.encode_payload();
        let cut = cut.min(payload.len());
        prop_assert!(PaymentEvent::decode_payload(event.event_type(), &payload[..payload.len() - cut]).is_err());
    }
}
