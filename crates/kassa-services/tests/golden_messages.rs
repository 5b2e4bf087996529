//! Golden files for the messages services exchange that are not domain events:
//! commands on `payments.commands`, refusals, reconciliation reports. They are
//! replayed and re-consumed later like events, so today's code must keep
//! decoding them. Add a file for a new type (never rewrite one) with
//! `KASSA_BLESS_GOLDEN=1 cargo test -p kassa-services --test golden_messages`.

use kassa_codec::{decode_value, encode_value};
use kassa_domain::settlement::{BatchKey, EntryKind, SettlementEntry};
use kassa_domain::{BatchId, CaptureId, Currency, MerchantId, Money, PaymentId, RefundId, ReportId, Timestamp};
use kassa_services::authorization::{
    ROUTING_DECIDED, ROUTING_DECIDED_PACKED, decode_routing_decided, encode_routing_decided,
};
use kassa_services::messages::{
    CommandRejected, DUPLICATE_REQUEST, DuplicateRequest, PaymentCommandMessage, SettlementInput,
};
use kassa_services::reconciliation::REPORT_RECORDED;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    // Where cargo runs the test from (a binary built in another checkout that
    // shares the target directory would carry that checkout's path).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    PathBuf::from(manifest_dir).join("../../tests/golden/v1")
}

fn check(name: &str, bytes: Vec<u8>) -> Vec<u8> {
    let path = golden_dir().join(format!("{name}.payload.bin"));
    if std::env::var_os("KASSA_BLESS_GOLDEN").is_some() && !path.exists() {
        std::fs::write(&path, &bytes).unwrap();
    }
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("golden file {} is missing ({e})", path.display()));
    assert_eq!(stored, bytes, "the encoding of {name} drifted");
    stored
}

#[test]
fn command_payloads_still_decode() {
    let payment_id = PaymentId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_00AA);
    let messages = [
        PaymentCommandMessage::CardSealed { payment_id, sealed: vec![1, 0xAB, 0xCD, 0xEF] },
        PaymentCommandMessage::Capture { payment_id, capture_id: CaptureId::from_u128(7), amount_minor: Some(600) },
        PaymentCommandMessage::Void { payment_id },
        PaymentCommandMessage::Refund { payment_id, refund_id: RefundId::from_u128(8), amount_minor: None },
        PaymentCommandMessage::RecordSettlement { payment_id, batch_id: BatchId::from_u128(9) },
        PaymentCommandMessage::RecordReconciliation { payment_id, report_id: ReportId::from_u128(10) },
        PaymentCommandMessage::RecordSettlements {
            payment_ids: vec![payment_id, PaymentId::from_u128(0xBB)],
            batch_id: BatchId::from_u128(9),
        },
        PaymentCommandMessage::RecordReconciliations {
            payment_ids: vec![payment_id, PaymentId::from_u128(0xBB)],
            report_id: ReportId::from_u128(10),
        },
        PaymentCommandMessage::ClaimIdempotencyKey {
            payment_id,
            merchant_id: MerchantId::from_u128(11),
            key_hash: [0x5A; 32],
            fingerprint: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        },
        PaymentCommandMessage::ClaimCommandKey {
            payment_id,
            merchant_id: MerchantId::from_u128(11),
            key_hash: [0x5B; 32],
            fingerprint: "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752".into(),
            command_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        },
    ];
    for message in messages {
        let stored = check(message.event_type(), message.encode_payload());
        assert_eq!(PaymentCommandMessage::decode(message.event_type(), &stored).unwrap(), message);
    }
}

#[test]
fn refusals_and_reports_still_decode() {
    let rejected = CommandRejected {
        command_id: 42,
        code: "amount_too_large".into(),
        message: "refund of 7.00 EUR exceeds the 6.00 EUR still refundable".into(),
    };
    let stored = check("payment.command_rejected", rejected.encode_payload());
    assert_eq!(CommandRejected::decode(&stored).unwrap(), rejected);

    let duplicate = DuplicateRequest { original: PaymentId::from_u128(12), same_request: true };
    let stored = check(DUPLICATE_REQUEST, duplicate.encode_payload());
    assert_eq!(DuplicateRequest::decode(&stored).unwrap(), duplicate);

    let summary = (ReportId::from_u128(10), BatchId::from_u128(9), 3u64, 1u64, 0u64, 2u64);
    let stored = check(REPORT_RECORDED, encode_value(&summary));
    let decoded: (ReportId, BatchId, u64, u64, u64, u64) = decode_value(&stored, REPORT_RECORDED).unwrap();
    assert_eq!(decoded, summary);
}

#[test]
fn settlement_inputs_still_decode() {
    let eur = Currency::from_code("EUR").unwrap();
    let inputs = [
        SettlementInput::EntryPending {
            key: BatchKey { provider: "acq-alpha".into(), merchant_id: MerchantId::from_u128(11), currency: eur },
            entry: SettlementEntry {
                entry_id: 13,
                payment_id: PaymentId::from_u128(0x0193_0000_0000_0000_0000_0000_0000_00AA),
                kind: EntryKind::Capture,
                amount: Money::new(1999, eur),
            },
        },
        SettlementInput::CutoffRequested {
            cutoff_id: 14,
            slot: Some(1_795_651_200_000),
            requested_at: Timestamp(1_795_651_200_000),
        },
    ];
    for input in inputs {
        let stored = check(input.event_type(), input.encode_payload());
        assert_eq!(SettlementInput::decode(input.event_type(), &stored).unwrap(), input);
    }
}

#[test]
fn routing_decisions_still_decode() {
    // A first attempt's decision over three providers, as the JSON type recorded it: still read.
    let json = std::fs::read(golden_dir().join("routing.decided.json")).unwrap();
    let decided = decode_routing_decided(ROUTING_DECIDED, &json).unwrap().unwrap();
    // The packed type holds the same value, in bytes that do not drift.
    let stored = check(ROUTING_DECIDED_PACKED, encode_routing_decided(&decided).unwrap());
    assert_eq!(decode_routing_decided(ROUTING_DECIDED_PACKED, &stored).unwrap().unwrap(), decided);
    assert!(stored.len() * 4 < json.len(), "packed {} bytes against {} in JSON", stored.len(), json.len());
    // What an auditor checks: the decision follows from its inputs.
    assert_eq!(kassa_domain::routing::route(&decided.input), decided.decision);
    // Bytes that are not a decision are an error that says so, never a guess.
    let error = decode_routing_decided(ROUTING_DECIDED_PACKED, &stored[..stored.len() / 2]).unwrap().unwrap_err();
    assert!(error.to_string().contains(ROUTING_DECIDED_PACKED), "{error}");
}
