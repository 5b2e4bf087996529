//! What the authorization service decides for one payment, without I/O.
//!
//! Each input — a command from the bus, the result of a provider call it
//! started, a wake-up — is decided here against the payment's record, the
//! routing engine and an injected time, into a [`Batch`]: changed records,
//! events to append, and provider calls ([`Effect`]s) to start once the batch
//! is durable. The service ([`super::AuthorizationService`]) only reads and
//! writes the log and makes the calls; a simulation can drive this same code
//! on a virtual clock, and replays a seed exactly.

use super::AuthorizationConfig;
use crate::messages::{COMMAND_REJECTED, CommandRejected, DUPLICATE_REQUEST, DuplicateRequest, PaymentCommandMessage};
use crate::routing::RoutingEngine;
use crate::runtime::derived_id;
use kassa_codec::{CodecError, EventPayload};
use kassa_domain::routing::decline::{RetryAdvice, classify_decline};
use kassa_domain::routing::health::OutcomeClass;
use kassa_domain::routing::{PaymentFacts, RoutingDecision, RoutingInput, RoutingOutcome};
use kassa_domain::{
    AttemptId, AuthorizationResult, CaptureId, DeclineCategory, MerchantId, Money, PaymentCommand, PaymentEvent,
    PaymentId, PaymentState, RefundId, Rejection, RequestPayment, Stage, Timestamp, apply, decide,
};
use kassa_eventlog::NewEvent;
use kassa_providers::{AttemptStatus, AuthorizeOutcome, ProviderError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Event type of a routing decision as Kassa wrote it before 2026-12-01 (JSON
/// payload: [`RoutingDecided`]); still read.
pub const ROUTING_DECIDED: &str = "routing.decided";
/// Event type of a routing decision: the same [`RoutingDecided`] in
/// MessagePack (rmp-serde: a struct is an array of its fields in order), a
/// fifth of the JSON's size. Read it with [`decode_routing_decided`].
pub const ROUTING_DECIDED_PACKED: &str = "routing.decided.msgpack";

/// The routing decision an event of either type records; `None` for an event
/// of another type, an error naming what is wrong for one that does not decode.
pub fn decode_routing_decided(event_type: &str, payload: &[u8]) -> Option<Result<RoutingDecided, CodecError>> {
    let bad = |reason: String| CodecError::BadPayload { event_type: event_type.to_owned(), reason };
    match event_type {
        ROUTING_DECIDED_PACKED => Some(rmp_serde::from_slice(payload).map_err(|e| bad(e.to_string()))),
        ROUTING_DECIDED => Some(serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))),
        _ => None,
    }
}

/// A routing decision's payload, as [`ROUTING_DECIDED_PACKED`] records it.
pub fn encode_routing_decided(decided: &RoutingDecided) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec(decided).map_err(|e| e.to_string())
}

/// Pause before forwarding a stand-in payment again when no provider can take it.
pub const STAND_IN_RETRY_MS: u64 = 1000;

/// A provider call the payment still owes: recorded before it is made, removed when acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderOp {
    Capture { capture_id: CaptureId, attempt_id: AttemptId, provider: String, amount: Money },
    Reverse { attempt_id: AttemptId, provider: String },
    Refund { refund_id: RefundId, attempt_id: AttemptId, provider: String, amount: Money },
}

impl ProviderOp {
    fn id(&self) -> u128 {
        match self {
            ProviderOp::Capture { capture_id, .. } => capture_id.as_u128(),
            ProviderOp::Reverse { attempt_id, .. } => attempt_id.as_u128(),
            ProviderOp::Refund { refund_id, .. } => refund_id.as_u128(),
        }
    }
}

/// What the service keeps per payment, next to its event stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    pub state: PaymentState,
    pub pending: Vec<ProviderOp>,
    /// Failed status inquiries of the attempt in flight.
    pub inquiries: u32,
    /// Events written to the payment's stream: event ids derive from it, so
    /// they are unique per payment and the same on every replay.
    pub events_written: u64,
}

impl PaymentRecord {
    /// Work is left: an attempt to start or resolve, a stand-in to forward, or a provider call owed.
    pub fn is_active(&self) -> bool {
        matches!(self.state.stage, Stage::Requested | Stage::Authorizing)
            || self.state.stand_in_pending()
            || !self.pending.is_empty()
    }

    /// Card data is still needed: an authorization (or a stand-in's forward) is to come.
    pub fn needs_card(&self) -> bool {
        matches!(self.state.stage, Stage::Requested | Stage::Authorizing) || self.state.stand_in_pending()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Authorize {
        payment_id: PaymentId,
        attempt_id: AttemptId,
        provider: String,
        merchant_id: MerchantId,
        amount: Money,
    },
    Inquire {
        payment_id: PaymentId,
        attempt_id: AttemptId,
        provider: String,
        delay_ms: u64,
    },
    Reverse {
        payment_id: PaymentId,
        attempt_id: AttemptId,
        provider: String,
        delay_ms: u64,
    },
    Op {
        payment_id: PaymentId,
        op: ProviderOp,
        delay_ms: u64,
    },
    /// Try forwarding a stand-in payment again after a pause.
    Wake {
        payment_id: PaymentId,
        delay_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EffectResult {
    Authorized {
        payment_id: PaymentId,
        attempt_id: AttemptId,
        provider: String,
        latency_ms: u32,
        result: Result<AuthorizeOutcome, ProviderError>,
    },
    Inquired {
        payment_id: PaymentId,
        attempt_id: AttemptId,
        result: Result<AttemptStatus, ProviderError>,
    },
    Reversed {
        payment_id: PaymentId,
        attempt_id: AttemptId,
        result: Result<(), ProviderError>,
    },
    OpDone {
        payment_id: PaymentId,
        op: ProviderOp,
        result: Result<(), ProviderError>,
    },
    Woken {
        payment_id: PaymentId,
    },
}

/// A routing decision with everything it was made from: run
/// [`kassa_domain::routing::route`] on `input` and you get `decision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingDecided {
    pub attempt: u64,
    pub input: RoutingInput,
    pub decision: RoutingDecision,
}

/// The stream a payment's routing decisions are recorded on.
pub fn routing_stream(payment_id: PaymentId) -> u128 {
    derived_id(payment_id.as_u128(), "routing-stream", 0)
}

/// One batch being decided: changed records, events and effects, written together.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records changed, by payment.
    pub records: BTreeMap<PaymentId, PaymentRecord>,
    /// Events to append: on payments' streams and their routing streams.
    pub events: Vec<NewEvent>,
    /// Provider calls and wake-ups to start once the batch is durable.
    pub effects: Vec<Effect>,
    /// Ids of the command envelopes decided (a duplicate delivery is dropped by id).
    pub seen: HashSet<u128>,
    /// Idempotency claims and duplicate markers to write (or, `None`, delete), by state key.
    pub claims: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Whether each payment loaded for this batch was active as stored: its
    /// `active` marker is written only when that changes.
    pub stored_active: HashMap<PaymentId, bool>,
}

/// Decides inputs for payments: the routing engine, the bounds, the time of
/// the decision, and whether the card data of a payment is still held.
pub struct Process<'a> {
    pub routing: &'a RoutingEngine,
    pub config: &'a AuthorizationConfig,
    pub now: Timestamp,
    pub card_held: &'a dyn Fn(PaymentId) -> bool,
}

impl std::fmt::Debug for Process<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("now", &self.now).finish_non_exhaustive()
    }
}

impl Process<'_> {
    /// Decide a command from the bus; `cause` is the id of the envelope it came in.
    pub fn command(&self, batch: &mut Batch, mut record: PaymentRecord, message: PaymentCommandMessage, cause: u128) {
        let payment_id = message.payment_id();
        // Card data (`CardSealed`) is for the service's vault: nothing to decide.
        let Some(command) = Self::to_command(message, &record.state) else { return };
        match self.run(batch, &mut record, payment_id, command, cause) {
            Ok(events) => {
                for op in Self::owe_provider_calls(&mut record, &events) {
                    batch.effects.push(Effect::Op { payment_id, op, delay_ms: 0 });
                }
                self.advance(batch, &mut record, payment_id);
            }
            Err(Rejection::PaymentAlreadyExists) => {} // a re-published request
            Err(rejection) => self.reject(batch, &mut record, payment_id, cause, &rejection),
        }
        batch.records.insert(payment_id, record);
    }

    /// A payment claimed an `Idempotency-Key` that `original` holds: record that
    /// on its stream, where the ingest instance that took it learns it. It
    /// never becomes a payment (its request is dropped).
    pub fn duplicate_request(
        &self,
        batch: &mut Batch,
        mut record: PaymentRecord,
        payment_id: PaymentId,
        original: PaymentId,
        same_request: bool,
        cause: u128,
    ) {
        let payload = DuplicateRequest { original, same_request }.encode_payload();
        self.append_to_stream(batch, &mut record, payment_id, DUPLICATE_REQUEST, cause, payload);
        batch.records.insert(payment_id, record);
    }

    /// Refuse a capture, void or refund whose `Idempotency-Key` another command
    /// holds: the key was reused for a different request. The command is never
    /// carried out (its id is marked seen by the caller).
    pub fn refuse_reused_key(
        &self,
        batch: &mut Batch,
        mut record: PaymentRecord,
        payment_id: PaymentId,
        command_id: u128,
    ) {
        let rejected = CommandRejected {
            command_id,
            code: "idempotency_key_reused".into(),
            message: "this Idempotency-Key was already used for a different request; use a new key for a new request"
                .into(),
        };
        self.append_to_stream(batch, &mut record, payment_id, COMMAND_REJECTED, command_id, rejected.encode_payload());
        batch.records.insert(payment_id, record);
    }

    /// Decide the result of a provider call (or a wake-up) this service started.
    pub fn result(&self, batch: &mut Batch, mut record: PaymentRecord, result: EffectResult) {
        self.apply_result(batch, &mut record, result);
    }

    /// Pick up a payment that had work left when the service stopped.
    pub fn resume(&self, batch: &mut Batch, mut record: PaymentRecord, payment_id: PaymentId) {
        if record.state.stand_in_pending()
            && let Some(request) = &record.state.request
        {
            self.routing.restore_stand_in(request.merchant_id, request.amount);
        }
        let in_flight = record.state.in_flight.attempt_id.is_some();
        match record.state.stage {
            Stage::Requested => self.advance(batch, &mut record, payment_id),
            _ if record.state.stand_in_pending() && !in_flight => self.advance(batch, &mut record, payment_id),
            _ if in_flight => {
                // The call may or may not have reached the provider: its outcome is unknown, ask it.
                if let Some(attempt_id) = record.state.in_flight.attempt_id {
                    let provider = record.state.in_flight.provider.clone();
                    if !record.state.in_flight.outcome_unknown {
                        let unknown = PaymentCommand::RecordAuthorizationResult {
                            attempt_id,
                            result: AuthorizationResult::Unknown { reason: "service restarted during the call".into() },
                        };
                        if let Err(rejection) = self.run(batch, &mut record, payment_id, unknown, attempt_id.as_u128())
                        {
                            tracing::error!(%payment_id, %rejection, "cannot mark an interrupted attempt unknown");
                        }
                    }
                    batch.effects.push(Effect::Inquire { payment_id, attempt_id, provider, delay_ms: 0 });
                }
            }
            _ => {}
        }
        for op in &record.pending {
            batch.effects.push(Effect::Op { payment_id, op: op.clone(), delay_ms: 0 });
        }
        batch.records.insert(payment_id, record);
    }

    /// Decide a command on a record; on success apply and queue the events.
    fn run(
        &self,
        batch: &mut Batch,
        record: &mut PaymentRecord,
        payment_id: PaymentId,
        command: PaymentCommand,
        cause: u128,
    ) -> Result<Vec<PaymentEvent>, Rejection> {
        let events = decide(&record.state, command, self.now)?;
        for event in &events {
            apply(&mut record.state, event);
            self.append_to_stream(batch, record, payment_id, event.event_type(), cause, event.encode_payload());
        }
        Ok(events)
    }

    /// Queue an event on a payment's stream, with the next id of that stream.
    fn append_to_stream(
        &self,
        batch: &mut Batch,
        record: &mut PaymentRecord,
        payment_id: PaymentId,
        event_type: &str,
        cause: u128,
        payload: Vec<u8>,
    ) {
        record.events_written += 1;
        batch.events.push(NewEvent {
            event_id: derived_id(payment_id.as_u128(), "event", record.events_written),
            event_type: event_type.to_owned(),
            stream_id: payment_id.as_u128(),
            timestamp_ms: self.now.unix_ms(),
            causation_id: Some(cause),
            correlation_id: Some(payment_id.as_u128()),
            payload,
        });
    }

    fn reject(
        &self,
        batch: &mut Batch,
        record: &mut PaymentRecord,
        payment_id: PaymentId,
        command_id: u128,
        rejection: &Rejection,
    ) {
        let code = match rejection {
            Rejection::PaymentNotFound => "resource_missing",
            Rejection::CaptureExceedsAuthorized { .. } => "amount_too_large",
            Rejection::RefundExceedsCaptured { .. } => "amount_too_large",
            Rejection::AmountNotPositive { .. } => "amount_too_small",
            Rejection::CurrencyMismatch { .. } => "invalid_currency",
            _ => "payment_state_conflict",
        };
        let rejected = CommandRejected { command_id, code: code.into(), message: rejection.to_string() };
        self.append_to_stream(batch, record, payment_id, COMMAND_REJECTED, command_id, rejected.encode_payload());
    }

    /// Turn a command message into a domain command, filling defaults from the state.
    fn to_command(message: PaymentCommandMessage, state: &PaymentState) -> Option<PaymentCommand> {
        let money = |minor: Option<i64>, default: i64| {
            let currency = state.request.as_ref().map(|r| r.amount.currency);
            currency.map_or(Money::new(0, kassa_domain::Currency::from_code("EUR").expect("EUR")), |c| {
                Money::new(minor.unwrap_or(default), c)
            })
        };
        Some(match message {
            PaymentCommandMessage::Requested(r) => PaymentCommand::Request(RequestPayment {
                payment_id: r.payment_id,
                merchant_id: r.merchant_id,
                amount: r.amount,
                card: r.card,
                capture: r.capture,
                reference: r.reference,
                metadata: r.metadata,
            }),
            PaymentCommandMessage::Capture { capture_id, amount_minor, .. } => PaymentCommand::Capture {
                capture_id,
                amount: money(amount_minor, state.authorized_minor - state.captured_minor),
            },
            PaymentCommandMessage::Void { .. } => PaymentCommand::Void,
            PaymentCommandMessage::Refund { refund_id, amount_minor, .. } => PaymentCommand::Refund {
                refund_id,
                amount: money(amount_minor, state.captured_minor - state.refunded_minor),
            },
            PaymentCommandMessage::RecordSettlement { batch_id, .. } => PaymentCommand::RecordSettlement { batch_id },
            // Commands for several payments are decided one payment at a time (the actor splits them).
            PaymentCommandMessage::CardSealed { .. }
            | PaymentCommandMessage::ClaimIdempotencyKey { .. }
            | PaymentCommandMessage::ClaimCommandKey { .. }
            | PaymentCommandMessage::RecordSettlements { .. }
            | PaymentCommandMessage::RecordReconciliations { .. } => {
                return None;
            }
            PaymentCommandMessage::RecordReconciliation { report_id, .. } => {
                PaymentCommand::RecordReconciliation { report_id }
            }
        })
    }

    /// The provider an attempt went to, and the attempt that holds the authorization.
    fn authorized_attempt(state: &PaymentState) -> Option<(AttemptId, String)> {
        state.provider.as_ref()?;
        state.attempts.last().cloned()
    }

    /// Queue the provider calls that events owe.
    fn owe_provider_calls(record: &mut PaymentRecord, events: &[PaymentEvent]) -> Vec<ProviderOp> {
        let Some((attempt_id, provider)) = Self::authorized_attempt(&record.state) else { return Vec::new() };
        let mut owed = Vec::new();
        for event in events {
            let op = match event {
                PaymentEvent::Captured { capture_id, amount } => ProviderOp::Capture {
                    capture_id: *capture_id,
                    attempt_id,
                    provider: provider.clone(),
                    amount: *amount,
                },
                PaymentEvent::Voided { .. } => ProviderOp::Reverse { attempt_id, provider: provider.clone() },
                PaymentEvent::Refunded { refund_id, amount } => ProviderOp::Refund {
                    refund_id: *refund_id,
                    attempt_id,
                    provider: provider.clone(),
                    amount: *amount,
                },
                _ => continue,
            };
            record.pending.push(op.clone());
            owed.push(op);
        }
        owed
    }

    /// Move a payment on: route its next attempt, or decline when routing says so.
    fn advance(&self, batch: &mut Batch, record: &mut PaymentRecord, payment_id: PaymentId) {
        let forwarding = record.state.stand_in_pending() && record.state.in_flight.attempt_id.is_none();
        if record.state.stage != Stage::Requested && !forwarding {
            return;
        }
        // Only what routing needs: the request's metadata map is not cloned on this path.
        let Some((merchant_id, amount, brand, bin, card_token)) = record
            .state
            .request
            .as_ref()
            .map(|r| (r.merchant_id, r.amount, r.card.brand, r.card.bin.clone(), r.card.token))
        else {
            return;
        };
        let attempt = record.state.attempts.len() as u64;
        let cause = derived_id(payment_id.as_u128(), "attempt", attempt);
        let decline = |code: String, category: DeclineCategory| PaymentCommand::Decline { code, category };
        let command = if !(self.card_held)(payment_id) {
            if forwarding {
                PaymentCommand::AbandonStandIn { code: "card_data_unavailable".into() }
            } else {
                decline("card_data_unavailable".into(), DeclineCategory::Soft)
            }
        } else {
            let routing = &self.routing;
            let facts = PaymentFacts {
                payment_id,
                merchant_id,
                amount,
                brand,
                bin_country: routing.bin_country(&bin),
                bin,
                card_token,
            };
            // A forward starts each round afresh; breakers keep dead providers out.
            let tried =
                if forwarding { Vec::new() } else { record.state.attempts.iter().map(|(_, p)| p.clone()).collect() };
            let (input, decision) = routing.decide(facts, tried, forwarding, self.now);
            let outcome = decision.outcome.clone();
            self.record_decision(batch, payment_id, cause, RoutingDecided { attempt, input, decision });
            match outcome {
                RoutingOutcome::Route { provider, .. } => {
                    let attempt_id = AttemptId::from_u128(cause);
                    batch.effects.push(Effect::Authorize {
                        payment_id,
                        attempt_id,
                        provider: provider.clone(),
                        merchant_id,
                        amount,
                    });
                    PaymentCommand::StartAuthorization { attempt_id, provider }
                }
                // No provider for a stand-in's forward now: try again shortly.
                _ if forwarding => {
                    batch.effects.push(Effect::Wake { payment_id, delay_ms: STAND_IN_RETRY_MS });
                    return;
                }
                RoutingOutcome::StandIn => {
                    batch.effects.push(Effect::Wake { payment_id, delay_ms: STAND_IN_RETRY_MS });
                    PaymentCommand::StandIn
                }
                RoutingOutcome::DeclineForRisk { check, .. } => decline(format!("risk_{check}"), DeclineCategory::Hard),
                RoutingOutcome::Exhausted => decline(
                    record.state.decline_code.clone().unwrap_or_else(|| "providers_unavailable".into()),
                    DeclineCategory::Soft,
                ),
                RoutingOutcome::ProvidersUnavailable { .. } => {
                    decline("providers_unavailable".into(), DeclineCategory::Soft)
                }
            }
        };
        if let Err(rejection) = self.run(batch, record, payment_id, command, cause) {
            tracing::error!(%payment_id, %rejection, "advancing a payment was refused; this is a bug");
        }
    }

    /// A stand-in confirmed or overturned is no longer exposure.
    fn settle_stand_in(&self, record: &PaymentRecord, events: &[PaymentEvent]) {
        let resolved = events
            .iter()
            .any(|e| matches!(e, PaymentEvent::StandInConfirmed { .. } | PaymentEvent::StandInDeclined { .. }));
        if resolved && let Some(request) = &record.state.request {
            self.routing.release_stand_in(request.merchant_id, request.amount);
        }
    }

    /// Queue a routing decision as an event on the payment's routing stream.
    fn record_decision(&self, batch: &mut Batch, payment_id: PaymentId, cause: u128, decided: RoutingDecided) {
        let attempt = decided.attempt;
        let payload = match encode_routing_decided(&decided) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%payment_id, %error, "cannot encode a routing decision");
                return;
            }
        };
        batch.events.push(NewEvent {
            // One decision per attempt number: unique per payment, the same on every replay.
            event_id: derived_id(payment_id.as_u128(), "routing", attempt),
            event_type: ROUTING_DECIDED_PACKED.to_owned(),
            stream_id: routing_stream(payment_id),
            timestamp_ms: self.now.unix_ms(),
            causation_id: Some(cause),
            correlation_id: Some(payment_id.as_u128()),
            payload,
        });
    }

    fn apply_result(&self, batch: &mut Batch, record: &mut PaymentRecord, result: EffectResult) {
        let delay_ms = self.config.retry_backoff_ms;
        let in_flight =
            |record: &PaymentRecord, attempt_id: AttemptId| record.state.in_flight.attempt_id == Some(attempt_id);
        let (payment_id, command) = match result {
            EffectResult::Authorized { payment_id, attempt_id, provider, latency_ms, result } => {
                let class = match &result {
                    Ok(AuthorizeOutcome::Approved { .. }) => OutcomeClass::Approved,
                    Ok(AuthorizeOutcome::Declined { .. }) => OutcomeClass::Declined,
                    Err(ProviderError::Timeout { .. }) => OutcomeClass::Timeout,
                    Err(_) => OutcomeClass::Error,
                };
                self.routing.record_call(&provider, class, latency_ms, self.now);
                if !in_flight(record, attempt_id) {
                    return;
                }
                let result = match result {
                    Ok(AuthorizeOutcome::Approved { authorization_code }) => {
                        AuthorizationResult::Approved { authorization_code }
                    }
                    Ok(AuthorizeOutcome::Declined { code, category, merchant_advice_code }) => {
                        let class = classify_decline(&code, merchant_advice_code.as_deref());
                        let retry = class.advice == RetryAdvice::RetryElsewhere
                            && category == DeclineCategory::Soft
                            && record
                                .state
                                .request
                                .as_ref()
                                .is_some_and(|r| self.routing.allow_retry(r.card.token, r.card.brand, self.now));
                        if retry {
                            AuthorizationResult::RetryableDecline { code }
                        } else {
                            // The scheme rules can only make a decline harder, never softer.
                            let category =
                                if class.category == DeclineCategory::Hard { DeclineCategory::Hard } else { category };
                            AuthorizationResult::Declined { code, category }
                        }
                    }
                    Err(ProviderError::Timeout { deadline_ms }) => {
                        let provider = record.state.in_flight.provider.clone();
                        batch.effects.push(Effect::Inquire { payment_id, attempt_id, provider, delay_ms: 0 });
                        AuthorizationResult::Unknown { reason: format!("no answer within {deadline_ms} ms") }
                    }
                    Err(error) => AuthorizationResult::Failed { reason: error.to_string() },
                };
                (payment_id, PaymentCommand::RecordAuthorizationResult { attempt_id, result })
            }
            EffectResult::Inquired { payment_id, attempt_id, result } => {
                if !in_flight(record, attempt_id) {
                    return;
                }
                let provider = record.state.in_flight.provider.clone();
                let command = match result {
                    Ok(AttemptStatus::Authorized { authorization_code }) => PaymentCommand::RecordAuthorizationResult {
                        attempt_id,
                        result: AuthorizationResult::Approved { authorization_code },
                    },
                    Ok(AttemptStatus::Declined { code, category }) => PaymentCommand::RecordAuthorizationResult {
                        attempt_id,
                        result: AuthorizationResult::Declined { code, category },
                    },
                    // Nothing held at the provider now. The request may still be on its
                    // way there: reverse it first (a late arrival is then refused), and
                    // close the attempt only when the reversal is acknowledged.
                    Ok(AttemptStatus::NotFound | AttemptStatus::Reversed) => {
                        if !record.state.in_flight.outcome_unknown {
                            // The authorize call's own answer is still due; wait for it.
                            return;
                        }
                        batch.effects.push(Effect::Reverse { payment_id, attempt_id, provider, delay_ms: 0 });
                        batch.records.insert(payment_id, record.clone());
                        return;
                    }
                    Err(error) => {
                        record.inquiries += 1;
                        tracing::warn!(%payment_id, %attempt_id, %error, inquiries = record.inquiries, "status inquiry failed");
                        if record.inquiries >= self.config.inquiries_max {
                            batch.effects.push(Effect::Reverse { payment_id, attempt_id, provider, delay_ms });
                        } else {
                            batch.effects.push(Effect::Inquire { payment_id, attempt_id, provider, delay_ms });
                        }
                        batch.records.insert(payment_id, record.clone());
                        return;
                    }
                };
                (payment_id, command)
            }
            EffectResult::Reversed { payment_id, attempt_id, result } => {
                if !in_flight(record, attempt_id) {
                    return;
                }
                if let Err(error) = result {
                    tracing::warn!(%payment_id, %attempt_id, %error, "reversal failed; retrying");
                    let provider = record.state.in_flight.provider.clone();
                    batch.effects.push(Effect::Reverse { payment_id, attempt_id, provider, delay_ms });
                    return;
                }
                if !record.state.in_flight.outcome_unknown {
                    return;
                }
                (payment_id, PaymentCommand::ReverseAuthorization { attempt_id })
            }
            EffectResult::Woken { payment_id } => {
                self.advance(batch, record, payment_id);
                batch.records.insert(payment_id, record.clone());
                return;
            }
            EffectResult::OpDone { payment_id, op, result } => {
                let delay_ms = match result {
                    Ok(()) => {
                        record.pending.retain(|p| p.id() != op.id());
                        0
                    }
                    Err(ProviderError::Refused { reason }) => {
                        tracing::error!(%payment_id, ?op, %reason, "provider refused an owed call; needs an operator");
                        record.pending.retain(|p| p.id() != op.id());
                        0
                    }
                    Err(error) => {
                        tracing::warn!(%payment_id, ?op, %error, "provider call failed; retrying");
                        delay_ms
                    }
                };
                // The next owed call (or the same one again), in order.
                if let Some(next) = record.pending.first() {
                    batch.effects.push(Effect::Op { payment_id, op: next.clone(), delay_ms });
                }
                batch.records.insert(payment_id, record.clone());
                return;
            }
        };
        let cause = record.state.in_flight.attempt_id.map_or(payment_id.as_u128(), AttemptId::as_u128);
        match self.run(batch, record, payment_id, command, cause) {
            Ok(events) => {
                record.inquiries = 0;
                self.settle_stand_in(record, &events);
                for op in Self::owe_provider_calls(record, &events) {
                    batch.effects.push(Effect::Op { payment_id, op, delay_ms: 0 });
                }
                self.advance(batch, record, payment_id);
            }
            Err(rejection) => tracing::warn!(%payment_id, %rejection, "provider result no longer applies"),
        }
        batch.records.insert(payment_id, record.clone());
    }
}

impl EffectResult {
    pub fn payment_id(&self) -> PaymentId {
        match self {
            EffectResult::Authorized { payment_id, .. }
            | EffectResult::Inquired { payment_id, .. }
            | EffectResult::Reversed { payment_id, .. }
            | EffectResult::OpDone { payment_id, .. }
            | EffectResult::Woken { payment_id } => *payment_id,
        }
    }
}

/// Which effects start now. The calls a payment owes its provider (capture,
/// void, refund) go one at a time, in the order owed, or a refund could reach
/// the provider before the capture it refunds; the next starts when the one
/// under way completes.
#[derive(Debug, Default)]
pub struct Dispatch {
    ops_in_flight: HashSet<PaymentId>,
}

impl Dispatch {
    /// Whether `effect` starts now (false: it starts when the call under way completes).
    pub fn admit(&mut self, effect: &Effect) -> bool {
        match effect {
            Effect::Op { payment_id, .. } => self.ops_in_flight.insert(*payment_id),
            _ => true,
        }
    }

    /// Note a completed call, before its result is decided.
    pub fn completed(&mut self, result: &EffectResult) {
        if let EffectResult::OpDone { payment_id, .. } = result {
            self.ops_in_flight.remove(payment_id);
        }
    }
}
