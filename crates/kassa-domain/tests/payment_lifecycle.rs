//! Given/when/then scenarios for every transition and rejection of the payment
//! lifecycle, and property tests over random command sequences.

use kassa_domain::payment::InFlight;
use kassa_domain::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const NOW: Timestamp = Timestamp(1_795_651_200_000);

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::from_code("EUR").unwrap())
}

fn card() -> CardSummary {
    CardDetails::parse("4242424242424242", 12, 2030, "123", NOW).unwrap().summarize(b"test-key")
}

fn requested(amount: i64, capture: bool) -> PaymentEvent {
    PaymentEvent::Requested(PaymentRequested {
        payment_id: PaymentId::from_u128(1),
        merchant_id: MerchantId::from_u128(2),
        amount: eur(amount),
        card: card(),
        capture,
        reference: Some("order-1001".into()),
        metadata: BTreeMap::new(),
        requested_at: NOW,
    })
}

fn request_command(amount: i64, capture: bool) -> PaymentCommand {
    PaymentCommand::Request(RequestPayment {
        payment_id: PaymentId::from_u128(1),
        merchant_id: MerchantId::from_u128(2),
        amount: eur(amount),
        card: card(),
        capture,
        reference: Some("order-1001".into()),
        metadata: BTreeMap::new(),
    })
}

const ATT: AttemptId = AttemptId(Id128(10));
const ATT2: AttemptId = AttemptId(Id128(11));

fn started(attempt: AttemptId) -> PaymentEvent {
    PaymentEvent::AuthorizationStarted { attempt_id: attempt, provider: "acq-alpha".into() }
}

fn authorized(amount: i64) -> PaymentEvent {
    PaymentEvent::Authorized {
        attempt_id: ATT,
        provider: "acq-alpha".into(),
        authorization_code: "A1".into(),
        amount: eur(amount),
    }
}

fn captured(amount: i64) -> PaymentEvent {
    PaymentEvent::Captured { capture_id: CaptureId::from_u128(20), amount: eur(amount) }
}

/// The one helper every scenario goes through: given events, when a command,
/// then these events (which must also apply cleanly) or this rejection.
struct Scenario {
    state: PaymentState,
}

fn given(events: &[PaymentEvent]) -> Scenario {
    Scenario { state: PaymentState::from_events(events) }
}

impl Scenario {
    fn when(self, command: PaymentCommand) -> Outcome {
        let result = decide(&self.state, command, NOW);
        Outcome { state: self.state, result }
    }
}

struct Outcome {
    state: PaymentState,
    result: Result<Vec<PaymentEvent>, Rejection>,
}

impl Outcome {
    fn then(self, expected: &[PaymentEvent]) -> PaymentState {
        let events = self.result.unwrap_or_else(|r| panic!("expected events, got rejection: {r}"));
        assert_eq!(events, expected);
        let mut state = self.state;
        for event in &events {
            apply(&mut state, event);
        }
        state
    }

    fn then_reject(self, expected: Rejection) {
        assert_eq!(self.result, Err(expected));
    }
}

#[test]
fn request_creates_the_payment() {
    let state = given(&[]).when(request_command(1999, true)).then(&[requested(1999, true)]);
    assert_eq!(state.stage, Stage::Requested);
    assert_eq!(state.status(), Some(PaymentStatus::Processing));
}

#[test]
fn request_twice_is_rejected() {
    given(&[requested(1999, true)]).when(request_command(1999, true)).then_reject(Rejection::PaymentAlreadyExists);
}

#[test]
fn request_of_zero_or_negative_is_rejected() {
    given(&[]).when(request_command(0, true)).then_reject(Rejection::AmountNotPositive { amount: 0 });
    given(&[]).when(request_command(-5, true)).then_reject(Rejection::AmountNotPositive { amount: -5 });
}

#[test]
fn commands_on_a_missing_payment_are_not_found() {
    given(&[]).when(PaymentCommand::Void).then_reject(Rejection::PaymentNotFound);
}

#[test]
fn start_authorization_puts_an_attempt_in_flight() {
    let state = given(&[requested(1999, false)])
        .when(PaymentCommand::StartAuthorization { attempt_id: ATT, provider: "acq-alpha".into() })
        .then(&[started(ATT)]);
    assert_eq!(state.stage, Stage::Authorizing);
    assert_eq!(state.in_flight.attempt_id, Some(ATT));
}

#[test]
fn a_second_attempt_while_one_is_in_flight_is_rejected() {
    given(&[requested(1999, false), started(ATT)])
        .when(PaymentCommand::StartAuthorization { attempt_id: ATT2, provider: "acq-beta".into() })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Authorizing, command: "start_authorization" });
}

#[test]
fn approval_without_auto_capture_authorizes() {
    let state = given(&[requested(1999, false), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Approved { authorization_code: "A1".into() },
        })
        .then(&[authorized(1999)]);
    assert_eq!(state.status(), Some(PaymentStatus::Authorized));
    assert_eq!(state.in_flight, InFlight::default());
}

#[test]
fn approval_with_auto_capture_captures_in_full() {
    let state = given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Approved { authorization_code: "A1".into() },
        })
        .then(&[
            authorized(1999),
            PaymentEvent::Captured { capture_id: CaptureId::from_u128(ATT.as_u128()), amount: eur(1999) },
        ]);
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
}

#[test]
fn result_for_another_attempt_is_rejected() {
    given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT2,
            result: AuthorizationResult::Approved { authorization_code: "A1".into() },
        })
        .then_reject(Rejection::AttemptNotInFlight { attempt_id: ATT2 });
}

#[test]
fn decline_is_terminal() {
    let decline = PaymentEvent::Declined {
        attempt_id: Some(ATT),
        provider: Some("acq-alpha".into()),
        code: "do_not_honor".into(),
        category: DeclineCategory::Hard,
    };
    let state = given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Declined { code: "do_not_honor".into(), category: DeclineCategory::Hard },
        })
        .then(std::slice::from_ref(&decline));
    assert_eq!(state.status(), Some(PaymentStatus::Declined));
    given(&[requested(1999, true), started(ATT), decline])
        .when(PaymentCommand::StartAuthorization { attempt_id: ATT2, provider: "acq-beta".into() })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Declined, command: "start_authorization" });
}

#[test]
fn failure_returns_to_requested_so_another_provider_can_be_tried() {
    let failed =
        PaymentEvent::AuthorizationFailed { attempt_id: ATT, provider: "acq-alpha".into(), reason: "503".into() };
    given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Failed { reason: "503".into() },
        })
        .then(std::slice::from_ref(&failed));
    let state = given(&[requested(1999, true), started(ATT), failed])
        .when(PaymentCommand::StartAuthorization { attempt_id: ATT2, provider: "acq-beta".into() })
        .then(&[PaymentEvent::AuthorizationStarted { attempt_id: ATT2, provider: "acq-beta".into() }]);
    assert_eq!(state.attempts.len(), 2);
}

#[test]
fn a_retryable_decline_goes_back_to_be_routed_and_remembers_the_code() {
    let declined = PaymentEvent::AttemptDeclined {
        attempt_id: ATT,
        provider: "acq-alpha".into(),
        code: "issuer_unavailable".into(),
    };
    let state = given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::RetryableDecline { code: "issuer_unavailable".into() },
        })
        .then(std::slice::from_ref(&declined));
    assert_eq!(state.stage, Stage::Requested);
    assert_eq!(state.decline_code.as_deref(), Some("issuer_unavailable"));
    given(&[requested(1999, true), started(ATT), declined])
        .when(PaymentCommand::StartAuthorization { attempt_id: ATT2, provider: "acq-beta".into() })
        .then(&[PaymentEvent::AuthorizationStarted { attempt_id: ATT2, provider: "acq-beta".into() }]);
}

#[test]
fn unknown_outcome_keeps_the_attempt_in_flight_until_resolved() {
    let unknown = PaymentEvent::AuthorizationOutcomeUnknown {
        attempt_id: ATT,
        provider: "acq-alpha".into(),
        reason: "timeout".into(),
    };
    let state = given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Unknown { reason: "timeout".into() },
        })
        .then(std::slice::from_ref(&unknown));
    assert_eq!(state.stage, Stage::Authorizing);
    assert!(state.in_flight.outcome_unknown);
    // No other provider while the outcome is unknown.
    given(&[requested(1999, true), started(ATT), unknown.clone()])
        .when(PaymentCommand::StartAuthorization { attempt_id: ATT2, provider: "acq-beta".into() })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Authorizing, command: "start_authorization" });
    // A status inquiry that finds the authorization uses it.
    given(&[requested(1999, false), started(ATT), unknown.clone()])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Approved { authorization_code: "A1".into() },
        })
        .then(&[authorized(1999)]);
    // Or it is reversed, and only then may another provider be tried.
    let state = given(&[requested(1999, true), started(ATT), unknown])
        .when(PaymentCommand::ReverseAuthorization { attempt_id: ATT })
        .then(&[PaymentEvent::AuthorizationReversed { attempt_id: ATT, provider: "acq-alpha".into() }]);
    assert_eq!(state.stage, Stage::Requested);
}

#[test]
fn reversing_an_attempt_with_a_known_outcome_is_rejected() {
    given(&[requested(1999, true), started(ATT)])
        .when(PaymentCommand::ReverseAuthorization { attempt_id: ATT })
        .then_reject(Rejection::AttemptOutcomeKnown { attempt_id: ATT });
}

#[test]
fn decline_without_provider_from_requested() {
    given(&[requested(1999, true)])
        .when(PaymentCommand::Decline { code: "providers_unavailable".into(), category: DeclineCategory::Soft })
        .then(&[PaymentEvent::Declined {
            attempt_id: None,
            provider: None,
            code: "providers_unavailable".into(),
            category: DeclineCategory::Soft,
        }]);
}

#[test]
fn partial_captures_up_to_the_authorized_amount() {
    let base = [requested(1000, false), started(ATT), authorized(1000)];
    let cap = |minor| PaymentCommand::Capture { capture_id: CaptureId::from_u128(20), amount: eur(minor) };
    let state = given(&base).when(cap(400)).then(&[captured(400)]);
    assert_eq!(state.captured_minor, 400);
    let mut events = base.to_vec();
    events.push(captured(400));
    given(&events).when(cap(600)).then(&[captured(600)]);
    let mut full = events.clone();
    full.push(captured(600));
    given(&full).when(cap(1)).then_reject(Rejection::NothingLeft { command: "capture", done: "captured" });
    given(&events)
        .when(cap(601))
        .then_reject(Rejection::CaptureExceedsAuthorized { requested: eur(601), capturable: eur(600) });
    given(&events).when(cap(0)).then_reject(Rejection::AmountNotPositive { amount: 0 });
    given(&events)
        .when(PaymentCommand::Capture {
            capture_id: CaptureId::from_u128(20),
            amount: Money::new(5, Currency::from_code("USD").unwrap()),
        })
        .then_reject(Rejection::CurrencyMismatch {
            expected: Currency::from_code("EUR").unwrap(),
            got: Currency::from_code("USD").unwrap(),
        });
}

#[test]
fn capture_before_authorization_is_rejected() {
    given(&[requested(1000, false)])
        .when(PaymentCommand::Capture { capture_id: CaptureId::from_u128(20), amount: eur(1) })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Requested, command: "capture" });
}

#[test]
fn void_only_before_capture() {
    let base = [requested(1000, false), started(ATT), authorized(1000)];
    let state = given(&base).when(PaymentCommand::Void).then(&[PaymentEvent::Voided { amount: eur(1000) }]);
    assert_eq!(state.status(), Some(PaymentStatus::Voided));
    let mut events = base.to_vec();
    events.push(captured(10));
    given(&events)
        .when(PaymentCommand::Void)
        .then_reject(Rejection::IllegalTransition { stage: Stage::Captured, command: "void" });
}

#[test]
fn refunds_never_exceed_captured() {
    let base = [requested(1000, false), started(ATT), authorized(1000), captured(700)];
    let refund = |minor| PaymentCommand::Refund { refund_id: RefundId::from_u128(30), amount: eur(minor) };
    let refunded = |minor| PaymentEvent::Refunded { refund_id: RefundId::from_u128(30), amount: eur(minor) };
    let state = given(&base).when(refund(200)).then(&[refunded(200)]);
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
    let mut events = base.to_vec();
    events.push(refunded(200));
    given(&events)
        .when(refund(501))
        .then_reject(Rejection::RefundExceedsCaptured { requested: eur(501), refundable: eur(500) });
    let state = given(&events).when(refund(500)).then(&[refunded(500)]);
    assert_eq!(state.status(), Some(PaymentStatus::Refunded));
    // Refunded in full: nothing is left, whatever the amount (a conflict, not a bad amount).
    events.push(refunded(500));
    given(&events).when(refund(1)).then_reject(Rejection::NothingLeft { command: "refund", done: "refunded" });
}

#[test]
fn refund_before_capture_is_rejected() {
    given(&[requested(1000, false), started(ATT), authorized(1000)])
        .when(PaymentCommand::Refund { refund_id: RefundId::from_u128(30), amount: eur(1) })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Authorized, command: "refund" });
}

#[test]
fn settle_then_reconcile_then_refund() {
    let base = [requested(1000, true), started(ATT), authorized(1000), captured(1000)];
    let batch = BatchId::from_u128(40);
    let state = given(&base)
        .when(PaymentCommand::RecordSettlement { batch_id: batch })
        .then(&[PaymentEvent::Settled { batch_id: batch }]);
    assert_eq!(state.stage, Stage::Settled);
    let mut events = base.to_vec();
    events.push(PaymentEvent::Settled { batch_id: batch });
    // The same batch again (a close made again) changes nothing; another batch is refused.
    given(&events).when(PaymentCommand::RecordSettlement { batch_id: batch }).then(&[]);
    given(&events)
        .when(PaymentCommand::RecordSettlement { batch_id: BatchId::from_u128(41) })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Settled, command: "record_settlement" });
    let report = ReportId::from_u128(50);
    given(&events)
        .when(PaymentCommand::RecordReconciliation { report_id: report })
        .then(&[PaymentEvent::Reconciled { report_id: report }]);
    events.push(PaymentEvent::Reconciled { report_id: report });
    given(&events).when(PaymentCommand::RecordReconciliation { report_id: report }).then(&[]);
    given(&events)
        .when(PaymentCommand::RecordReconciliation { report_id: ReportId::from_u128(51) })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Reconciled, command: "record_reconciliation" });
    given(&events)
        .when(PaymentCommand::Refund { refund_id: RefundId::from_u128(30), amount: eur(1000) })
        .then(&[PaymentEvent::Refunded { refund_id: RefundId::from_u128(30), amount: eur(1000) }]);
}

#[test]
fn reconcile_before_settlement_is_rejected() {
    given(&[requested(1000, true), started(ATT), authorized(1000), captured(1000)])
        .when(PaymentCommand::RecordReconciliation { report_id: ReportId::from_u128(50) })
        .then_reject(Rejection::IllegalTransition { stage: Stage::Captured, command: "record_reconciliation" });
}

#[test]
#[should_panic(expected = "cannot follow")]
fn apply_refuses_an_impossible_event() {
    PaymentState::from_events(&[requested(1000, true), captured(5)]);
}

#[test]
fn rejections_say_what_was_wrong() {
    let text = Rejection::IllegalTransition { stage: Stage::Voided, command: "capture" }.to_string();
    assert_eq!(text, "cannot capture a payment that is voided");
    let text = Rejection::RefundExceedsCaptured { requested: eur(501), refundable: eur(500) }.to_string();
    assert_eq!(text, "refund of 5.01 EUR exceeds the 5.00 EUR still refundable");
}

fn command_strategy() -> impl Strategy<Value = PaymentCommand> {
    let attempt = (10u128..13).prop_map(AttemptId::from_u128);
    let amount = (-5i64..1500).prop_map(eur);
    prop_oneof![
        (1i64..1200, any::<bool>()).prop_map(|(a, c)| request_command(a, c)),
        attempt.clone().prop_map(|attempt_id| PaymentCommand::StartAuthorization {
            attempt_id,
            provider: format!("acq-{}", attempt_id.as_u128())
        }),
        (attempt.clone(), 0u8..4).prop_map(|(attempt_id, r)| PaymentCommand::RecordAuthorizationResult {
            attempt_id,
            result: match r {
                0 => AuthorizationResult::Approved { authorization_code: "A".into() },
                1 => AuthorizationResult::Declined { code: "05".into(), category: DeclineCategory::Hard },
                2 => AuthorizationResult::Failed { reason: "503".into() },
                _ => AuthorizationResult::Unknown { reason: "timeout".into() },
            }
        }),
        attempt.prop_map(|attempt_id| PaymentCommand::ReverseAuthorization { attempt_id }),
        Just(PaymentCommand::Decline { code: "risk".into(), category: DeclineCategory::Hard }),
        amount.clone().prop_map(|amount| PaymentCommand::Capture { capture_id: CaptureId::from_u128(1), amount }),
        Just(PaymentCommand::Void),
        amount.prop_map(|amount| PaymentCommand::Refund { refund_id: RefundId::from_u128(1), amount }),
        Just(PaymentCommand::RecordSettlement { batch_id: BatchId::from_u128(1) }),
        Just(PaymentCommand::RecordReconciliation { report_id: ReportId::from_u128(1) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random command sequences never break an invariant, a rejected command
    /// changes nothing, and replaying the emitted events rebuilds the state.
    #[test]
    fn random_commands_keep_invariants_and_replay_exactly(commands in prop::collection::vec(command_strategy(), 1..40)) {
        let mut state = PaymentState::default();
        let mut log = Vec::new();
        let mut authorizations = 0;
        for command in commands {
            let before = state.clone();
            match decide(&state, command, NOW) {
                Ok(events) => {
                    for event in &events {
                        if matches!(event, PaymentEvent::Authorized { .. }) {
                            authorizations += 1;
                        }
                        apply(&mut state, event);
                        prop_assert!(state.check_invariants().is_ok());
                    }
                    log.extend(events);
                }
                Err(_) => prop_assert_eq!(&state, &before),
            }
            let requested = state.request.as_ref().map_or(0, |r| r.amount.minor);
            prop_assert!(0 <= state.refunded_minor);
            prop_assert!(state.refunded_minor <= state.captured_minor);
            prop_assert!(state.captured_minor <= state.authorized_minor);
            prop_assert!(state.authorized_minor <= requested);
            prop_assert!(authorizations <= 1, "authorized twice");
        }
        prop_assert_eq!(PaymentState::from_events(&log), state);
    }
}

#[test]
fn stand_in_authorizes_then_a_provider_confirms_and_only_then_it_is_captured() {
    let stand_in = PaymentEvent::AuthorizedByStandIn { amount: eur(1999) };
    let state = given(&[requested(1999, true)]).when(PaymentCommand::StandIn).then(std::slice::from_ref(&stand_in));
    assert_eq!(state.status(), Some(PaymentStatus::Authorized));
    assert!(state.stand_in_pending());
    assert_eq!(state.captured_minor, 0, "nothing is captured before a provider holds the authorization");
    // Merchant commands wait for the provider.
    for command in
        [PaymentCommand::Void, PaymentCommand::Capture { capture_id: CaptureId::from_u128(5), amount: eur(1) }]
    {
        given(&[requested(1999, true), stand_in.clone()]).when(command).then_reject(Rejection::StandInPending);
    }
    // Forwarded: a failure leaves it pending; an approval confirms and captures.
    let forwarded = PaymentEvent::AuthorizationStarted { attempt_id: ATT, provider: "acq-alpha".into() };
    let failed =
        PaymentEvent::AuthorizationFailed { attempt_id: ATT, provider: "acq-alpha".into(), reason: "503".into() };
    let state = given(&[requested(1999, true), stand_in.clone(), forwarded.clone()])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Failed { reason: "503".into() },
        })
        .then(std::slice::from_ref(&failed));
    assert!(state.stand_in_pending() && state.in_flight.attempt_id.is_none());
    let again = PaymentEvent::AuthorizationStarted { attempt_id: ATT2, provider: "acq-beta".into() };
    let state = given(&[requested(1999, true), stand_in.clone(), forwarded, failed, again])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT2,
            result: AuthorizationResult::Approved { authorization_code: "OK1".into() },
        })
        .then(&[
            PaymentEvent::StandInConfirmed {
                attempt_id: ATT2,
                provider: "acq-beta".into(),
                authorization_code: "OK1".into(),
            },
            PaymentEvent::Captured { capture_id: CaptureId::from_u128(ATT2.as_u128()), amount: eur(1999) },
        ]);
    assert_eq!(state.provider.as_deref(), Some("acq-beta"));
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
}

#[test]
fn a_declined_forward_overturns_the_stand_in() {
    let stand_in = PaymentEvent::AuthorizedByStandIn { amount: eur(1999) };
    let forwarded = PaymentEvent::AuthorizationStarted { attempt_id: ATT, provider: "acq-alpha".into() };
    let state = given(&[requested(1999, false), stand_in.clone(), forwarded])
        .when(PaymentCommand::RecordAuthorizationResult {
            attempt_id: ATT,
            result: AuthorizationResult::Declined { code: "do_not_honor".into(), category: DeclineCategory::Hard },
        })
        .then(&[PaymentEvent::StandInDeclined {
            attempt_id: Some(ATT),
            provider: Some("acq-alpha".into()),
            code: "do_not_honor".into(),
        }]);
    assert_eq!((state.status(), state.authorized_minor), (Some(PaymentStatus::Declined), 0));
    // Without card data there is nothing to forward: abandoned, overturned.
    let state = given(&[requested(1999, false), stand_in])
        .when(PaymentCommand::AbandonStandIn { code: "card_data_unavailable".into() })
        .then(&[PaymentEvent::StandInDeclined {
            attempt_id: None,
            provider: None,
            code: "card_data_unavailable".into(),
        }]);
    assert_eq!(state.stage, Stage::Declined);
}
