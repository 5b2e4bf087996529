//! The payment lifecycle as a state machine over commands and events.
//!
//! ```text
//! New ─Request→ Requested ─StartAuthorization→ Authorizing ─┬─Approved→ Authorized ─Capture→ Captured ─Settle→ Settled ─Reconcile→ Reconciled
//!                  │  ▲                                      ├─Declined→ Declined (terminal)      │  Void→ Voided (terminal)
//!                  │  └──Failed / Reversed / AttemptDeclined──┤                                   Refund (≤ captured) in Captured, Settled, Reconciled
//!                  └─Decline→ Declined                       └─Unknown→ Authorizing (outcome unknown: inquire, or reverse)
//! ```
//!
//! `decide` checks a command against the state and returns the events that
//! record its outcome, or a typed [`Rejection`]; it never mutates. `apply`
//! folds one event into the state; events are facts, so an event that breaks
//! an invariant is a bug and `apply` panics (the service restarts and replays).

use crate::card::CardSummary;
use crate::id::{AttemptId, BatchId, CaptureId, MerchantId, PaymentId, RefundId, ReportId};
use crate::money::Money;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The authorization code a stand-in authorization carries until a provider confirms it.
pub const STAND_IN_CODE: &str = "stand_in";

/// Where a payment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// No event yet: the payment does not exist.
    #[default]
    New,
    Requested,
    /// An authorization attempt is in flight; its outcome is not yet known.
    Authorizing,
    Authorized,
    Declined,
    Voided,
    Captured,
    Settled,
    Reconciled,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::New => "new",
            Stage::Requested => "requested",
            Stage::Authorizing => "authorizing",
            Stage::Authorized => "authorized",
            Stage::Declined => "declined",
            Stage::Voided => "voided",
            Stage::Captured => "captured",
            Stage::Settled => "settled",
            Stage::Reconciled => "reconciled",
        }
    }

    /// No command can move a payment out of a terminal stage.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Declined | Stage::Voided)
    }
}

/// The status a merchant sees: the stage folded with the amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Processing,
    Authorized,
    Captured,
    Declined,
    Voided,
    /// Everything captured has been refunded.
    Refunded,
}

/// Whether a decline may be retried with another provider. Persisted by
/// variant index: never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineCategory {
    /// Final: stolen card, invalid account, do not honor. Never retried.
    Hard,
    /// The issuer might approve later or elsewhere (insufficient funds, issuer unavailable).
    Soft,
}

/// What a provider said about one authorization attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthorizationResult {
    Approved {
        authorization_code: String,
    },
    Declined {
        code: String,
        category: DeclineCategory,
    },
    /// The provider certainly did not authorize (refused connection, 5xx before
    /// acceptance): another provider may be tried.
    Failed {
        reason: String,
    },
    /// No answer in time: the provider may have authorized. Not a failure.
    Unknown {
        reason: String,
    },
    /// A soft decline the scheme rules allow retrying with another provider
    /// (the issuer or a switch was unreachable, and the card's retry limit holds).
    RetryableDecline {
        code: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPayment {
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    pub card: CardSummary,
    /// Capture in full as soon as authorized.
    pub capture: bool,
    pub reference: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Everything that can be asked of a payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentCommand {
    Request(RequestPayment),
    StartAuthorization {
        attempt_id: AttemptId,
        provider: String,
    },
    RecordAuthorizationResult {
        attempt_id: AttemptId,
        result: AuthorizationResult,
    },
    /// Give up on an attempt whose outcome is unknown: it was reversed at the provider.
    ReverseAuthorization {
        attempt_id: AttemptId,
    },
    /// Authorize on Kassa's own authority while no provider can be reached
    /// (stand-in); the payment is forwarded for a real authorization later.
    StandIn,
    /// Give up forwarding a stand-in authorization without a provider's answer
    /// (the card data is gone): the stand-in is overturned.
    AbandonStandIn {
        code: String,
    },
    /// Decline without a provider answer (risk, no provider available).
    Decline {
        code: String,
        category: DeclineCategory,
    },
    Capture {
        capture_id: CaptureId,
        amount: Money,
    },
    Void,
    Refund {
        refund_id: RefundId,
        amount: Money,
    },
    RecordSettlement {
        batch_id: BatchId,
    },
    RecordReconciliation {
        report_id: ReportId,
    },
}

impl PaymentCommand {
    pub fn name(&self) -> &'static str {
        match self {
            PaymentCommand::Request(_) => "request",
            PaymentCommand::StartAuthorization { .. } => "start_authorization",
            PaymentCommand::RecordAuthorizationResult { .. } => "record_authorization_result",
            PaymentCommand::ReverseAuthorization { .. } => "reverse_authorization",
            PaymentCommand::Decline { .. } => "decline",
            PaymentCommand::StandIn => "stand_in",
            PaymentCommand::AbandonStandIn { .. } => "abandon_stand_in",
            PaymentCommand::Capture { .. } => "capture",
            PaymentCommand::Void => "void",
            PaymentCommand::Refund { .. } => "refund",
            PaymentCommand::RecordSettlement { .. } => "record_settlement",
            PaymentCommand::RecordReconciliation { .. } => "record_reconciliation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequested {
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    pub card: CardSummary,
    pub capture: bool,
    pub reference: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub requested_at: Timestamp,
}

/// Everything that can happen to a payment. Variant and field layout are a
/// compatibility boundary: they are replayed years later (see kassa-codec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentEvent {
    Requested(PaymentRequested),
    AuthorizationStarted {
        attempt_id: AttemptId,
        provider: String,
    },
    Authorized {
        attempt_id: AttemptId,
        provider: String,
        authorization_code: String,
        amount: Money,
    },
    Declined {
        attempt_id: Option<AttemptId>,
        provider: Option<String>,
        code: String,
        category: DeclineCategory,
    },
    AuthorizationFailed {
        attempt_id: AttemptId,
        provider: String,
        reason: String,
    },
    /// Declined, but another provider may approve: the payment goes back to be routed again.
    AttemptDeclined {
        attempt_id: AttemptId,
        provider: String,
        code: String,
    },
    AuthorizationOutcomeUnknown {
        attempt_id: AttemptId,
        provider: String,
        reason: String,
    },
    AuthorizationReversed {
        attempt_id: AttemptId,
        provider: String,
    },
    Captured {
        capture_id: CaptureId,
        amount: Money,
    },
    Voided {
        amount: Money,
    },
    Refunded {
        refund_id: RefundId,
        amount: Money,
    },
    Settled {
        batch_id: BatchId,
    },
    Reconciled {
        report_id: ReportId,
    },
    /// Authorized by Kassa's stand-in while no provider could be reached; to be forwarded.
    AuthorizedByStandIn {
        amount: Money,
    },
    /// A provider authorized the forwarded stand-in payment.
    StandInConfirmed {
        attempt_id: AttemptId,
        provider: String,
        authorization_code: String,
    },
    /// The forwarded stand-in payment was declined (or could not be forwarded): the stand-in is overturned.
    StandInDeclined {
        attempt_id: Option<AttemptId>,
        provider: Option<String>,
        code: String,
    },
}

/// Why a command was refused. Each says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("payment already exists")]
    PaymentAlreadyExists,
    #[error("payment not found")]
    PaymentNotFound,
    #[error("amount must be a positive number of minor units, got {amount}")]
    AmountNotPositive { amount: i64 },
    #[error("amount is in {got} but the payment is in {expected}")]
    CurrencyMismatch { expected: crate::Currency, got: crate::Currency },
    #[error("cannot {command} a payment that is {stage}", stage = stage.as_str())]
    IllegalTransition { stage: Stage, command: &'static str },
    #[error("authorization attempt {attempt_id} is not the one in flight")]
    AttemptNotInFlight { attempt_id: AttemptId },
    #[error("authorization attempt {attempt_id} has a known outcome; only an unknown outcome is reversed")]
    AttemptOutcomeKnown { attempt_id: AttemptId },
    #[error("the payment was authorized by stand-in and awaits a provider's authorization; retry later")]
    StandInPending,
    #[error("capture of {requested} exceeds the {capturable} still capturable")]
    CaptureExceedsAuthorized { requested: Money, capturable: Money },
    #[error("refund of {requested} exceeds the {refundable} still refundable")]
    RefundExceedsCaptured { requested: Money, refundable: Money },
    /// A capture of a payment captured in full, a refund of one refunded in full.
    #[error("nothing is left to {command}: the payment is {done} in full")]
    NothingLeft { command: &'static str, done: &'static str },
}

/// The attempt in flight, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InFlight {
    pub attempt_id: Option<AttemptId>,
    pub provider: String,
    /// The provider did not answer in time: it may have authorized.
    pub outcome_unknown: bool,
}

/// A payment's state, rebuilt from its events.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PaymentState {
    pub stage: Stage,
    pub request: Option<PaymentRequested>,
    pub in_flight: InFlight,
    /// Attempts made, in order, with the provider of each.
    pub attempts: Vec<(AttemptId, String)>,
    pub provider: Option<String>,
    pub authorization_code: Option<String>,
    pub decline_code: Option<String>,
    pub authorized_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub batch_id: Option<BatchId>,
    pub report_id: Option<ReportId>,
}

impl PaymentState {
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a PaymentEvent>) -> Self {
        let mut state = PaymentState::default();
        for event in events {
            apply(&mut state, event);
        }
        state
    }

    fn currency(&self) -> Option<crate::Currency> {
        self.request.as_ref().map(|r| r.amount.currency)
    }

    fn money(&self, minor: i64) -> Money {
        Money::new(minor, self.currency().expect("a requested payment has a currency"))
    }

    pub fn amount_authorized(&self) -> Option<Money> {
        self.currency().map(|c| Money::new(self.authorized_minor, c))
    }

    pub fn amount_captured(&self) -> Option<Money> {
        self.currency().map(|c| Money::new(self.captured_minor, c))
    }

    pub fn amount_refunded(&self) -> Option<Money> {
        self.currency().map(|c| Money::new(self.refunded_minor, c))
    }

    /// Authorized by stand-in, not yet confirmed or overturned by a provider.
    pub fn stand_in_pending(&self) -> bool {
        self.stage == Stage::Authorized && self.provider.is_none()
    }

    /// What the merchant sees.
    pub fn status(&self) -> Option<PaymentStatus> {
        Some(match self.stage {
            Stage::New => return None,
            Stage::Requested | Stage::Authorizing => PaymentStatus::Processing,
            Stage::Authorized => PaymentStatus::Authorized,
            Stage::Declined => PaymentStatus::Declined,
            Stage::Voided => PaymentStatus::Voided,
            Stage::Captured | Stage::Settled | Stage::Reconciled => {
                if self.refunded_minor == self.captured_minor {
                    PaymentStatus::Refunded
                } else {
                    PaymentStatus::Captured
                }
            }
        })
    }

    /// The invariants every state must keep. Checked after every `apply`.
    pub fn check_invariants(&self) -> Result<(), String> {
        let requested = self.request.as_ref().map_or(0, |r| r.amount.minor);
        if !(0 <= self.refunded_minor
            && self.refunded_minor <= self.captured_minor
            && self.captured_minor <= self.authorized_minor
            && self.authorized_minor <= requested)
        {
            return Err(format!(
                "amounts out of order: refunded {} captured {} authorized {} requested {requested}",
                self.refunded_minor, self.captured_minor, self.authorized_minor
            ));
        }
        // An attempt is in flight while authorizing, and may be while a stand-in is forwarded.
        let in_flight = self.in_flight.attempt_id.is_some();
        if (self.stage == Stage::Authorizing && !in_flight)
            || (in_flight && self.stage != Stage::Authorizing && !self.stand_in_pending())
        {
            return Err(format!("stage {:?} with in-flight attempt {:?}", self.stage, self.in_flight.attempt_id));
        }
        if self.stage == Stage::Declined && (self.authorized_minor != 0 || self.authorization_code.is_some()) {
            return Err("declined payment has an authorization".into());
        }
        if matches!(self.stage, Stage::Captured | Stage::Settled | Stage::Reconciled) && self.captured_minor == 0 {
            return Err(format!("stage {:?} with nothing captured", self.stage));
        }
        Ok(())
    }
}

fn positive_in(state: &PaymentState, amount: Money) -> Result<(), Rejection> {
    let expected = state.currency().ok_or(Rejection::PaymentNotFound)?;
    if amount.currency != expected {
        return Err(Rejection::CurrencyMismatch { expected, got: amount.currency });
    }
    if amount.minor <= 0 {
        return Err(Rejection::AmountNotPositive { amount: amount.minor });
    }
    Ok(())
}

/// Decide what a command does to a payment at `now`.
pub fn decide(state: &PaymentState, command: PaymentCommand, now: Timestamp) -> Result<Vec<PaymentEvent>, Rejection> {
    use PaymentCommand as C;
    use PaymentEvent as E;
    let command_name = command.name();
    let illegal = || Rejection::IllegalTransition { stage: state.stage, command: command_name };

    if state.stage == Stage::New && !matches!(command, C::Request(_)) {
        return Err(Rejection::PaymentNotFound);
    }
    match command {
        C::Request(request) => {
            if state.stage != Stage::New {
                return Err(Rejection::PaymentAlreadyExists);
            }
            if request.amount.minor <= 0 {
                return Err(Rejection::AmountNotPositive { amount: request.amount.minor });
            }
            Ok(vec![E::Requested(PaymentRequested {
                payment_id: request.payment_id,
                merchant_id: request.merchant_id,
                amount: request.amount,
                card: request.card,
                capture: request.capture,
                reference: request.reference,
                metadata: request.metadata,
                requested_at: now,
            })])
        }
        C::StartAuthorization { attempt_id, provider } => {
            if state.stage == Stage::Requested || (state.stand_in_pending() && state.in_flight.attempt_id.is_none()) {
                Ok(vec![E::AuthorizationStarted { attempt_id, provider }])
            } else {
                Err(illegal())
            }
        }
        C::StandIn => match state.stage {
            Stage::Requested => {
                let request = state.request.as_ref().ok_or(Rejection::PaymentNotFound)?;
                Ok(vec![E::AuthorizedByStandIn { amount: request.amount }])
            }
            _ => Err(illegal()),
        },
        C::AbandonStandIn { code } => {
            if state.stand_in_pending() && state.in_flight.attempt_id.is_none() {
                Ok(vec![E::StandInDeclined { attempt_id: None, provider: None, code }])
            } else {
                Err(illegal())
            }
        }
        C::RecordAuthorizationResult { attempt_id, result } => {
            if state.stage != Stage::Authorizing && !state.stand_in_pending() {
                return Err(illegal());
            }
            if state.in_flight.attempt_id != Some(attempt_id) {
                return Err(Rejection::AttemptNotInFlight { attempt_id });
            }
            let provider = state.in_flight.provider.clone();
            let request = state.request.as_ref().ok_or(Rejection::PaymentNotFound)?;
            if state.stand_in_pending() {
                // The forwarded authorization of a stand-in payment.
                return Ok(match result {
                    AuthorizationResult::Approved { authorization_code } => {
                        let mut events = vec![E::StandInConfirmed { attempt_id, provider, authorization_code }];
                        if request.capture {
                            // Captured only once a provider holds the authorization.
                            events.push(E::Captured {
                                capture_id: CaptureId::from_u128(attempt_id.as_u128()),
                                amount: request.amount,
                            });
                        }
                        events
                    }
                    AuthorizationResult::Declined { code, .. } => {
                        vec![E::StandInDeclined { attempt_id: Some(attempt_id), provider: Some(provider), code }]
                    }
                    AuthorizationResult::Failed { reason } => {
                        vec![E::AuthorizationFailed { attempt_id, provider, reason }]
                    }
                    AuthorizationResult::Unknown { reason } => {
                        vec![E::AuthorizationOutcomeUnknown { attempt_id, provider, reason }]
                    }
                    AuthorizationResult::RetryableDecline { code } => {
                        vec![E::AttemptDeclined { attempt_id, provider, code }]
                    }
                });
            }
            Ok(match result {
                AuthorizationResult::Approved { authorization_code } => {
                    let mut events =
                        vec![E::Authorized { attempt_id, provider, authorization_code, amount: request.amount }];
                    if request.capture {
                        // The automatic capture's id is the attempt's: unique, and
                        // the same on every replay.
                        events.push(E::Captured {
                            capture_id: CaptureId::from_u128(attempt_id.as_u128()),
                            amount: request.amount,
                        });
                    }
                    events
                }
                AuthorizationResult::Declined { code, category } => {
                    vec![E::Declined { attempt_id: Some(attempt_id), provider: Some(provider), code, category }]
                }
                AuthorizationResult::Failed { reason } => vec![E::AuthorizationFailed { attempt_id, provider, reason }],
                AuthorizationResult::Unknown { reason } => {
                    vec![E::AuthorizationOutcomeUnknown { attempt_id, provider, reason }]
                }
                AuthorizationResult::RetryableDecline { code } => {
                    vec![E::AttemptDeclined { attempt_id, provider, code }]
                }
            })
        }
        C::ReverseAuthorization { attempt_id } => {
            if state.stage != Stage::Authorizing && !state.stand_in_pending() {
                return Err(illegal());
            }
            if state.in_flight.attempt_id != Some(attempt_id) {
                return Err(Rejection::AttemptNotInFlight { attempt_id });
            }
            if !state.in_flight.outcome_unknown {
                return Err(Rejection::AttemptOutcomeKnown { attempt_id });
            }
            Ok(vec![E::AuthorizationReversed { attempt_id, provider: state.in_flight.provider.clone() }])
        }
        C::Decline { code, category } => match state.stage {
            Stage::Requested => Ok(vec![E::Declined { attempt_id: None, provider: None, code, category }]),
            _ => Err(illegal()),
        },
        C::Capture { .. } | C::Void | C::Refund { .. } if state.stand_in_pending() => Err(Rejection::StandInPending),
        C::Capture { capture_id, amount } => {
            if !matches!(state.stage, Stage::Authorized | Stage::Captured) {
                return Err(illegal());
            }
            let capturable = state.authorized_minor - state.captured_minor;
            if capturable == 0 {
                return Err(Rejection::NothingLeft { command: command_name, done: "captured" });
            }
            positive_in(state, amount)?;
            if amount.minor > capturable {
                return Err(Rejection::CaptureExceedsAuthorized {
                    requested: amount,
                    capturable: state.money(capturable),
                });
            }
            Ok(vec![E::Captured { capture_id, amount }])
        }
        C::Void => match state.stage {
            Stage::Authorized => Ok(vec![E::Voided { amount: state.money(state.authorized_minor) }]),
            _ => Err(illegal()),
        },
        C::Refund { refund_id, amount } => {
            if !matches!(state.stage, Stage::Captured | Stage::Settled | Stage::Reconciled) {
                return Err(illegal());
            }
            let refundable = state.captured_minor - state.refunded_minor;
            if refundable == 0 {
                return Err(Rejection::NothingLeft { command: command_name, done: "refunded" });
            }
            positive_in(state, amount)?;
            if amount.minor > refundable {
                return Err(Rejection::RefundExceedsCaptured {
                    requested: amount,
                    refundable: state.money(refundable),
                });
            }
            Ok(vec![E::Refunded { refund_id, amount }])
        }
        // Recorded already in this batch (or report): the same fact again changes nothing.
        C::RecordSettlement { batch_id } if state.batch_id == Some(batch_id) => Ok(Vec::new()),
        C::RecordSettlement { batch_id } => match state.stage {
            Stage::Captured => Ok(vec![E::Settled { batch_id }]),
            _ => Err(illegal()),
        },
        C::RecordReconciliation { report_id } if state.report_id == Some(report_id) => Ok(Vec::new()),
        C::RecordReconciliation { report_id } => match state.stage {
            Stage::Settled => Ok(vec![E::Reconciled { report_id }]),
            _ => Err(illegal()),
        },
    }
}

/// Fold one event into the state.
///
/// # Panics
/// On an event that cannot follow the state, or that breaks an invariant:
/// events are facts, so this is a bug or corruption that passed the checksum.
/// Events from outside (another service, over the bus) go through [`try_apply`].
pub fn apply(state: &mut PaymentState, event: &PaymentEvent) {
    if let Err(reason) = try_apply(state, event) {
        panic!("{reason}");
    }
}

/// Fold one event read from outside into the state: an event that cannot
/// follow the state is an error that says why, and changes nothing. (An event
/// that follows but breaks an invariant is an error too, after it was folded.)
pub fn try_apply(state: &mut PaymentState, event: &PaymentEvent) -> Result<(), String> {
    use PaymentEvent as E;
    let bad = |state: &PaymentState| format!("event {event:?} cannot follow stage {:?}", state.stage);
    match event {
        E::Requested(requested) => {
            if state.stage != Stage::New {
                return Err(bad(state));
            }
            state.request = Some(requested.clone());
            state.stage = Stage::Requested;
        }
        E::AuthorizationStarted { attempt_id, provider } => {
            let forwarding = state.stand_in_pending() && state.in_flight.attempt_id.is_none();
            if state.stage != Stage::Requested && !forwarding {
                return Err(bad(state));
            }
            if !forwarding {
                state.stage = Stage::Authorizing;
            }
            state.in_flight =
                InFlight { attempt_id: Some(*attempt_id), provider: provider.clone(), outcome_unknown: false };
            state.attempts.push((*attempt_id, provider.clone()));
        }
        E::Authorized { attempt_id, provider, authorization_code, amount } => {
            if state.stage != Stage::Authorizing || state.in_flight.attempt_id != Some(*attempt_id) {
                return Err(bad(state));
            }
            state.stage = Stage::Authorized;
            state.in_flight = InFlight::default();
            state.provider = Some(provider.clone());
            state.authorization_code = Some(authorization_code.clone());
            state.authorized_minor = amount.minor;
        }
        E::Declined { attempt_id, provider, code, .. } => {
            let from_attempt = state.stage == Stage::Authorizing && state.in_flight.attempt_id == *attempt_id;
            let without_attempt = state.stage == Stage::Requested && attempt_id.is_none();
            if !(from_attempt || without_attempt) {
                return Err(bad(state));
            }
            state.stage = Stage::Declined;
            state.in_flight = InFlight::default();
            state.provider = provider.clone();
            state.decline_code = Some(code.clone());
        }
        E::AuthorizationFailed { attempt_id, .. } | E::AuthorizationReversed { attempt_id, .. } => {
            let forwarding = state.stand_in_pending();
            if !(state.stage == Stage::Authorizing || forwarding) || state.in_flight.attempt_id != Some(*attempt_id) {
                return Err(bad(state));
            }
            if !forwarding {
                state.stage = Stage::Requested;
            }
            state.in_flight = InFlight::default();
        }
        E::AttemptDeclined { attempt_id, code, .. } => {
            let forwarding = state.stand_in_pending();
            if !(state.stage == Stage::Authorizing || forwarding) || state.in_flight.attempt_id != Some(*attempt_id) {
                return Err(bad(state));
            }
            if !forwarding {
                state.stage = Stage::Requested;
            }
            state.in_flight = InFlight::default();
            state.decline_code = Some(code.clone());
        }
        E::AuthorizationOutcomeUnknown { attempt_id, .. } => {
            if !(state.stage == Stage::Authorizing || state.stand_in_pending())
                || state.in_flight.attempt_id != Some(*attempt_id)
            {
                return Err(bad(state));
            }
            state.in_flight.outcome_unknown = true;
        }
        E::AuthorizedByStandIn { amount } => {
            if state.stage != Stage::Requested {
                return Err(bad(state));
            }
            state.stage = Stage::Authorized;
            state.provider = None;
            state.authorization_code = Some(STAND_IN_CODE.to_owned());
            state.authorized_minor = amount.minor;
        }
        E::StandInConfirmed { attempt_id, provider, authorization_code } => {
            if !state.stand_in_pending() || state.in_flight.attempt_id != Some(*attempt_id) {
                return Err(bad(state));
            }
            state.in_flight = InFlight::default();
            state.provider = Some(provider.clone());
            state.authorization_code = Some(authorization_code.clone());
        }
        E::StandInDeclined { attempt_id, provider, code } => {
            if !state.stand_in_pending() || state.in_flight.attempt_id != *attempt_id {
                return Err(bad(state));
            }
            state.stage = Stage::Declined;
            state.in_flight = InFlight::default();
            state.provider = provider.clone();
            state.authorization_code = None;
            state.authorized_minor = 0;
            state.decline_code = Some(code.clone());
        }
        E::Captured { amount, .. } => {
            if !matches!(state.stage, Stage::Authorized | Stage::Captured) {
                return Err(bad(state));
            }
            state.captured_minor += amount.minor;
            state.stage = Stage::Captured;
        }
        E::Voided { .. } => {
            if state.stage != Stage::Authorized {
                return Err(bad(state));
            }
            state.stage = Stage::Voided;
        }
        E::Refunded { amount, .. } => {
            if !matches!(state.stage, Stage::Captured | Stage::Settled | Stage::Reconciled) {
                return Err(bad(state));
            }
            state.refunded_minor += amount.minor;
        }
        E::Settled { batch_id } => {
            if state.stage != Stage::Captured {
                return Err(bad(state));
            }
            state.stage = Stage::Settled;
            state.batch_id = Some(*batch_id);
        }
        E::Reconciled { report_id } => {
            if state.stage != Stage::Settled {
                return Err(bad(state));
            }
            state.stage = Stage::Reconciled;
            state.report_id = Some(*report_id);
        }
    }
    state.check_invariants().map_err(|broken| format!("invariant broken after {event:?}: {broken}"))
}

#[cfg(test)]
mod try_apply_tests {
    use super::*;
    use crate::ReportId;

    #[test]
    fn an_event_that_cannot_follow_is_an_error_and_changes_nothing() {
        let mut state = PaymentState::default();
        let reconciled = PaymentEvent::Reconciled { report_id: ReportId::from_u128(1) };
        let reason = try_apply(&mut state, &reconciled).unwrap_err();
        assert!(reason.contains("cannot follow stage New"), "{reason}");
        assert_eq!(state, PaymentState::default());
    }
}
