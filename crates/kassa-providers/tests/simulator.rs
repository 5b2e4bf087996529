//! The simulated acquirer's contract: outcomes by test card, idempotent
//! attempts, and faults that behave like the real ones.

use kassa_domain::*;
use kassa_providers::*;
use std::time::Duration;

const NOW: Timestamp = Timestamp(1_795_651_200_000);
const DEADLINE: Duration = Duration::from_millis(2000);

fn request(attempt: u128, number: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        attempt_id: AttemptId::from_u128(attempt),
        payment_id: PaymentId::from_u128(attempt + 1000),
        merchant_id: MerchantId::from_u128(1),
        amount: Money::new(1999, Currency::from_code("EUR").unwrap()),
        card: CardDetails::parse(number, 12, 2030, "123", NOW).unwrap(),
    }
}

fn sim() -> SimulatedAcquirer {
    SimulatedAcquirer::new("acq-alpha", SimulatorConfig::default())
}

#[tokio::test(start_paused = true)]
async fn test_cards_answer_as_documented() {
    let sim = sim();
    assert!(matches!(
        sim.authorize(request(1, "4242424242424242"), DEADLINE).await,
        Ok(AuthorizeOutcome::Approved { .. })
    ));
    assert!(matches!(
        sim.authorize(request(2, "5555555555554444"), DEADLINE).await,
        Ok(AuthorizeOutcome::Approved { .. })
    ));
    assert_eq!(
        sim.authorize(request(3, "4000000000000002"), DEADLINE).await,
        Ok(AuthorizeOutcome::Declined {
            code: "do_not_honor".into(),
            category: DeclineCategory::Hard,
            merchant_advice_code: None
        })
    );
    assert_eq!(
        sim.authorize(request(4, "4000000000009995"), DEADLINE).await,
        Ok(AuthorizeOutcome::Declined {
            code: "insufficient_funds".into(),
            category: DeclineCategory::Soft,
            merchant_advice_code: None
        })
    );
    assert!(matches!(
        sim.authorize(request(5, "4000000000000119"), DEADLINE).await,
        Err(ProviderError::Unavailable { .. })
    ));
    assert_eq!(sim.ledger().len(), 2, "only approvals hold money");
    // The failover card: a processing error at acq-alpha only.
    assert!(matches!(
        sim.authorize(request(6, FAILS_OVER_CARD), DEADLINE).await,
        Err(ProviderError::Unavailable { .. })
    ));
    let beta = SimulatedAcquirer::new("acq-beta", SimulatorConfig::default());
    assert!(matches!(
        beta.authorize(request(6, FAILS_OVER_CARD), DEADLINE).await,
        Ok(AuthorizeOutcome::Approved { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_retried_attempt_is_authorized_once() {
    let sim = sim();
    let first = sim.authorize(request(1, "4242424242424242"), DEADLINE).await.unwrap();
    let again = sim.authorize(request(1, "4242424242424242"), DEADLINE).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(sim.ledger().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_after_accept_holds_money_that_inquiry_finds_and_reversal_releases() {
    let sim = sim();
    sim.set_fault(Some(Fault::always(FaultMode::TimeoutAfterAccept)));
    let answer = sim.authorize(request(1, "4242424242424242"), DEADLINE).await;
    assert_eq!(answer, Err(ProviderError::Timeout { deadline_ms: 2000 }));
    assert_eq!(sim.ledger()[0].state, LedgerState::Authorized, "the provider acted");
    sim.set_fault(None);
    let attempt = AttemptId::from_u128(1);
    assert!(matches!(sim.inquire(attempt, DEADLINE).await, Ok(AttemptStatus::Authorized { .. })));
    sim.reverse(attempt, DEADLINE).await.unwrap();
    assert_eq!(sim.inquire(attempt, DEADLINE).await, Ok(AttemptStatus::Reversed));
    assert_eq!(sim.inquire(AttemptId::from_u128(9), DEADLINE).await, Ok(AttemptStatus::NotFound));
    // Reversing an attempt never seen makes a late arrival of it refused.
    sim.reverse(AttemptId::from_u128(9), DEADLINE).await.unwrap();
    assert!(matches!(
        sim.authorize(request(9, "4242424242424242"), DEADLINE).await,
        Err(ProviderError::Unavailable { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn down_refuses_without_acting_and_slow_misses_deadlines() {
    let sim = sim();
    sim.set_fault(Some(Fault::always(FaultMode::Down)));
    assert!(matches!(
        sim.authorize(request(1, "4242424242424242"), DEADLINE).await,
        Err(ProviderError::Unavailable { .. })
    ));
    assert!(sim.ledger().is_empty());
    sim.set_fault(Some(Fault::slow(5000)));
    assert_eq!(
        sim.authorize(request(2, "4242424242424242"), DEADLINE).await,
        Err(ProviderError::Timeout { deadline_ms: 2000 })
    );
    assert!(sim.ledger().is_empty(), "a slow provider that missed the deadline did not get the request through");
}

#[tokio::test(start_paused = true)]
async fn captures_and_refunds_stay_within_what_is_held() {
    let sim = sim();
    sim.authorize(request(1, "4242424242424242"), DEADLINE).await.unwrap();
    let attempt = AttemptId::from_u128(1);
    let eur = |m| Money::new(m, Currency::from_code("EUR").unwrap());
    sim.capture(attempt, CaptureId::from_u128(11), eur(1000), DEADLINE).await.unwrap();
    // A retried capture (same id) is applied once; a new one over the amount is refused.
    sim.capture(attempt, CaptureId::from_u128(11), eur(1000), DEADLINE).await.unwrap();
    assert!(matches!(
        sim.capture(attempt, CaptureId::from_u128(12), eur(1000), DEADLINE).await,
        Err(ProviderError::Refused { .. })
    ));
    sim.refund(attempt, RefundId::from_u128(1), eur(400), DEADLINE).await.unwrap();
    sim.refund(attempt, RefundId::from_u128(1), eur(400), DEADLINE).await.unwrap();
    assert!(matches!(
        sim.refund(attempt, RefundId::from_u128(2), eur(601), DEADLINE).await,
        Err(ProviderError::Refused { .. })
    ));
    assert!(matches!(sim.reverse(attempt, DEADLINE).await, Err(ProviderError::Refused { .. })));
    // The settlement report lists what the provider recorded, once per id.
    let report = sim.settlement_report(&[11, 1, 99], DEADLINE).await.unwrap();
    assert_eq!(report.len(), 2, "id 99 was never captured or refunded");
    assert_eq!((report[0].entry_id, report[0].amount), (11, eur(1000)));
    assert_eq!((report[1].entry_id, report[1].amount), (1, eur(400)));
    let entry = &sim.ledger()[0];
    assert_eq!((entry.captured_minor, entry.refunded_minor), (1000, 400));
}

/// A journal whose simulator is gone: what a restarted one reads back.
fn journaled(path: &std::path::Path) -> SimulatedAcquirer {
    sim().with_journal(path).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_journaled_ledger_outlives_the_simulator_and_keeps_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acq-alpha.journal");
    let eur = Currency::from_code("EUR").unwrap();
    let (capture, refund) = (CaptureId::from_u128(77), RefundId::from_u128(88));
    let before = {
        let sim = journaled(&path);
        let Ok(AuthorizeOutcome::Approved { authorization_code }) =
            sim.authorize_now(&request(1, "4242424242424242"), None)
        else {
            panic!("approved")
        };
        assert_eq!(authorization_code, "000001");
        sim.authorize_now(&request(2, "4000000000000002"), None).unwrap();
        sim.capture_now(AttemptId::from_u128(1), capture, Money::new(1500, eur)).unwrap();
        sim.refund_now(AttemptId::from_u128(1), refund, Money::new(500, eur)).unwrap();
        sim.reverse_now(AttemptId::from_u128(3)).unwrap(); // not seen yet
        sim.ledger()
    };
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 5, "one line a change: {text}");
    assert!(!text.contains("4242424242424242"), "no card number in the journal");

    let sim = journaled(&path);
    assert_eq!(sim.ledger(), before);
    // The same answers as before: the approval, the decline, the reversal of an attempt not seen.
    assert_eq!(
        sim.inquire_now(AttemptId::from_u128(1)),
        AttemptStatus::Authorized { authorization_code: "000001".into() }
    );
    assert!(matches!(sim.inquire_now(AttemptId::from_u128(2)), AttemptStatus::Declined { .. }));
    assert!(matches!(sim.authorize_now(&request(3, "4242424242424242"), None), Err(ProviderError::Unavailable { .. })));
    // A capture sent again is applied once; what it settled is still reported.
    sim.capture_now(AttemptId::from_u128(1), capture, Money::new(1500, eur)).unwrap();
    assert_eq!(sim.ledger()[0].captured_minor, 1500);
    let lines = sim.settlement_report(&[capture.as_u128(), refund.as_u128()], DEADLINE).await.unwrap();
    assert_eq!(lines.len(), 2);
    // Codes go on from where they were.
    assert_eq!(
        sim.authorize_now(&request(4, "4242424242424242"), None),
        Ok(AuthorizeOutcome::Approved { authorization_code: "000002".into() })
    );
}

#[test]
fn a_last_line_cut_short_is_dropped_and_a_damaged_one_refused_by_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let acq = journaled(&path);
        acq.authorize_now(&request(1, "4242424242424242"), None).unwrap();
        acq.authorize_now(&request(2, "4242424242424242"), None).unwrap();
    }
    let whole = std::fs::read(&path).unwrap();
    // A crash mid-append: the change was never made, and the journal goes on after it.
    let mut cut = whole.clone();
    cut.extend_from_slice(b"0badf00d {\"op\":\"rev");
    std::fs::write(&path, &cut).unwrap();
    let acq = journaled(&path);
    assert_eq!(acq.ledger().len(), 2);
    acq.reverse_now(AttemptId::from_u128(2)).unwrap();
    drop(acq);
    assert_eq!(journaled(&path).ledger()[1].state, LedgerState::Reversed);

    // A damaged line that is not the last: refused, naming it.
    let mut damaged = whole.clone();
    let second = whole.iter().position(|&b| b == b'\n').unwrap() + 12;
    damaged[second] ^= 0x01;
    std::fs::write(&path, &damaged).unwrap();
    let error = sim().with_journal(&path).unwrap_err().to_string();
    assert!(error.contains("line 2") && error.contains("checksum"), "{error}");

    // A line that checks out but that the ledger cannot take (a capture of an attempt never held).
    let op = JournalOp::Captured {
        attempt_id: AttemptId::from_u128(9),
        capture_id: CaptureId::from_u128(1),
        amount: Money::new(100, Currency::from_code("EUR").unwrap()),
    };
    let mut unknown = whole.clone();
    unknown.extend_from_slice(&op.encode());
    std::fs::write(&path, &unknown).unwrap();
    let error = sim().with_journal(&path).unwrap_err().to_string();
    assert!(error.contains("line 3") && error.contains("unknown attempt"), "{error}");

    // Lines that are not journal changes at all.
    for bad in [&b"hello\n"[..], b"00000000 {}\n", b"zzzzzzzz {\"op\":\"reversed\"}\n"] {
        let mut garbage = whole.clone();
        garbage.extend_from_slice(bad);
        std::fs::write(&path, &garbage).unwrap();
        let error = sim().with_journal(&path).unwrap_err().to_string();
        assert!(error.contains("line 3"), "{error}");
    }
    assert!(JournalOp::decode(b"\xff\xfe").is_err());
}
