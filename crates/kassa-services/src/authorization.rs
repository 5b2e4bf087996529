//! The authorization service: the single writer of every payment's event
//! stream after ingest accepted it.
//!
//! One actor per partition of `payments.commands` owns the payments hashed to
//! it, so no two tasks ever decide for the same payment. Its inputs are bus
//! commands and the results of provider calls it started; each batch of
//! inputs is decided by the pure core and written — events, payment records,
//! the consumed offset — in one append. Provider calls start only after that
//! append is durable, so a crash never loses the fact that an attempt was made.
//!
//! Each attempt goes where the routing engine ([`crate::routing`]) says, and
//! the decision is recorded with all its inputs (`routing.decided`, on the
//! payment's routing stream). A refused connection, a 503 or an open breaker
//! fails over to the next candidate within the same request; a decline fails
//! over only where the scheme rules say another route can succeed. A timeout
//! is an *unknown* outcome, resolved by a status inquiry (or a reversal)
//! before any other provider is tried, so at most one authorization per
//! payment ever stands.

use crate::consume::{id_key, resume_subscription};
use crate::messages::{COMMAND_REJECTED, CommandRejected, PaymentCommandMessage};
use crate::relay::{RelayConfig, run_relay};
use crate::routing::{RoutingEngine, RoutingSettings};
use crate::runtime::{Clock, derived_id};
use crate::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH};
use crate::vault::CardVault;
use kassa_bus::{Bus, Message};
use kassa_codec::{EventPayload, decode_frame, decode_value, encode_value};
use kassa_domain::routing::decline::{RetryAdvice, classify_decline};
use kassa_domain::routing::health::OutcomeClass;
use kassa_domain::routing::{PaymentFacts, RoutingDecision, RoutingInput, RoutingOutcome};
use kassa_domain::{
    AttemptId, AuthorizationResult, CaptureId, DeclineCategory, MerchantId, Money, PaymentCommand, PaymentEvent,
    PaymentId, PaymentState, RefundId, Rejection, RequestPayment, Stage, apply, decide,
};
use kassa_eventlog::{AppendRequest, EventLog, NewEvent, StateWrite, Table};
use kassa_providers::{AttemptStatus, AuthorizeOutcome, AuthorizeRequest, Connector, ProviderError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Bounds of the authorization service. Units last.
#[derive(Debug, Clone)]
pub struct AuthorizationConfig {
    /// Deadline of one provider call.
    pub provider_timeout_ms: u64,
    /// Inputs decided and written in one append, at most.
    pub batch_inputs_max: usize,
    /// Status inquiries of an unknown attempt before it is reversed.
    pub inquiries_max: u32,
    /// Pause before retrying a failed inquiry, reversal, capture or refund.
    pub retry_backoff_ms: u64,
    /// Payment records kept in memory per partition (the rest are read from disk).
    pub cached_payments_max: usize,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        AuthorizationConfig {
            provider_timeout_ms: 1500,
            batch_inputs_max: 512,
            inquiries_max: 5,
            retry_backoff_ms: 250,
            cached_payments_max: 100_000,
        }
    }
}

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
    fn is_active(&self) -> bool {
        matches!(self.state.stage, Stage::Requested | Stage::Authorizing)
            || self.state.stand_in_pending()
            || !self.pending.is_empty()
    }

    /// Card data is still needed: an authorization (or a stand-in's forward) is to come.
    fn needs_card(&self) -> bool {
        matches!(self.state.stage, Stage::Requested | Stage::Authorizing) || self.state.stand_in_pending()
    }
}

#[derive(Debug)]
enum Effect {
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

#[derive(Debug)]
enum EffectResult {
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

/// A provider call with a hard stop a little past its deadline, in case a
/// connector ignores the deadline it was given: past it, the outcome is unknown.
async fn bounded<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let deadline_ms = deadline.as_millis() as u64;
    tokio::time::timeout(deadline + Duration::from_millis(500), call)
        .await
        .unwrap_or(Err(ProviderError::Timeout { deadline_ms }))
}

/// The service. Share it behind an `Arc` and call [`AuthorizationService::spawn`].
#[derive(Debug)]
pub struct AuthorizationService {
    log: Arc<EventLog>,
    bus: Arc<dyn Bus>,
    providers: Vec<Arc<dyn Connector>>,
    vault: Arc<CardVault>,
    clock: Arc<dyn Clock>,
    config: AuthorizationConfig,
    routing: Arc<RoutingEngine>,
    rules_lock: tokio::sync::Mutex<()>,
}

/// Pause before forwarding a stand-in payment again when no provider can take it.
const STAND_IN_RETRY_MS: u64 = 1000;

/// Event type of a routing decision (JSON payload: [`RoutingDecided`]).
pub const ROUTING_DECIDED: &str = "routing.decided";
/// Event type of a rule set replaced through the API (JSON payload: the rule set).
pub const ROUTING_RULES_CHANGED: &str = "routing.rules_changed";
const RULES_KEY: &[u8] = b"routing/rules";
/// Event type of a provider health change (JSON payload: [`crate::routing::HealthChange`]).
pub const PROVIDER_HEALTH_CHANGED: &str = "provider.health_changed";

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

/// The stream a provider's health changes are recorded on.
pub fn health_stream(provider: &str) -> u128 {
    derived_id(0, &format!("provider-health/{provider}"), 0)
}

fn record_key(payment_id: PaymentId) -> Vec<u8> {
    id_key("payment/", payment_id.as_u128())
}

fn active_key(partition: u32, payment_id: PaymentId) -> Vec<u8> {
    id_key(&format!("active/{partition:05}/"), payment_id.as_u128())
}

fn seen_key(event_id: u128) -> Vec<u8> {
    id_key("seen/", event_id)
}

fn offset_key(partition: u32) -> Vec<u8> {
    format!("{PAYMENT_COMMANDS}/{partition}").into_bytes()
}

impl AuthorizationService {
    pub fn new(
        log: Arc<EventLog>,
        bus: Arc<dyn Bus>,
        providers: Vec<Arc<dyn Connector>>,
        vault: Arc<CardVault>,
        clock: Arc<dyn Clock>,
        config: AuthorizationConfig,
    ) -> Self {
        let names: Vec<String> = providers.iter().map(|p| p.name().to_owned()).collect();
        let routing = Arc::new(
            RoutingEngine::new(RoutingSettings::default(), &names).expect("default routing settings are valid"),
        );
        AuthorizationService {
            log,
            bus,
            providers,
            vault,
            clock,
            config,
            routing,
            rules_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Route with this engine instead of the default (every provider in order).
    pub fn with_routing(mut self, routing: Arc<RoutingEngine>) -> Self {
        self.routing = routing;
        self
    }

    pub fn routing(&self) -> &Arc<RoutingEngine> {
        &self.routing
    }

    /// Replace the routing rules: recorded (`routing.rules_changed`) and kept
    /// across restarts, in effect for the next decision. Returns the new version.
    pub async fn set_rules(&self, rules: kassa_domain::routing::RuleSet) -> Result<u64, String> {
        // One change at a time: prepared, made durable, then put in force.
        let _one_at_a_time = self.rules_lock.lock().await;
        let rules = self.routing.prepare_rules(rules)?;
        let version = rules.version;
        let json = serde_json::to_vec(&rules).map_err(|e| e.to_string())?;
        let event = NewEvent {
            event_id: derived_id(0, "routing-rules", version),
            event_type: ROUTING_RULES_CHANGED.to_owned(),
            stream_id: derived_id(0, "routing-rules", 0),
            timestamp_ms: self.clock.now().unix_ms(),
            causation_id: None,
            correlation_id: None,
            payload: json.clone(),
        };
        let write = StateWrite { table: Table::State, key: RULES_KEY.to_vec(), value: Some(json) };
        self.log
            .append(AppendRequest { events: vec![event], expected: Vec::new(), writes: vec![write] })
            .await
            .map_err(|e| format!("recording the rules: {e}"))?;
        self.routing.install_rules(rules);
        Ok(version)
    }

    /// Add a maintenance window to a provider's calendar, kept across restarts.
    pub async fn add_maintenance(
        &self,
        provider: &str,
        window: kassa_domain::routing::maintenance::MaintenanceWindow,
    ) -> Result<(), String> {
        self.routing.add_maintenance(provider, window.clone(), self.clock.now())?;
        let key = format!("maintenance/{provider}/{:020}", window.start_ms).into_bytes();
        let json = serde_json::to_vec(&window).map_err(|e| e.to_string())?;
        let write = StateWrite { table: Table::State, key, value: Some(json) };
        self.log
            .append(AppendRequest { writes: vec![write], ..Default::default() })
            .await
            .map(drop)
            .map_err(|e| format!("recording the maintenance window: {e}"))
    }

    /// Put back what operators changed through the API before a restart.
    fn restore_routing(&self) -> Result<(), String> {
        if let Some(json) = self.log.get(Table::State, RULES_KEY).map_err(|e| e.to_string())? {
            let rules: kassa_domain::routing::RuleSet =
                serde_json::from_slice(&json).map_err(|e| format!("stored routing rules: {e}"))?;
            if rules.version > self.routing.rules().version {
                self.routing.set_rules(rules)?;
            }
        }
        let now = self.clock.now();
        for (key, json) in self.log.scan(Table::State, b"maintenance/").map_err(|e| e.to_string())? {
            let text = String::from_utf8_lossy(&key);
            let provider = text.split('/').nth(1).unwrap_or_default().to_owned();
            let window: kassa_domain::routing::maintenance::MaintenanceWindow =
                serde_json::from_slice(&json).map_err(|e| format!("stored maintenance window {text}: {e}"))?;
            if window.end_ms > now.unix_ms()
                && let Err(error) = self.routing.add_maintenance(&provider, window, now)
            {
                tracing::warn!(%provider, %error, "a stored maintenance window no longer applies");
            }
        }
        Ok(())
    }

    /// A payment's routing decisions, oldest first.
    pub fn routing_decisions(&self, payment_id: PaymentId) -> Result<Vec<RoutingDecided>, kassa_eventlog::LogError> {
        let envelopes = self.log.read_stream(routing_stream(payment_id), 1, 10_000)?;
        Ok(envelopes
            .iter()
            .filter(|e| e.event_type == ROUTING_DECIDED)
            .filter_map(|e| serde_json::from_slice(&e.payload).ok())
            .collect())
    }

    /// Record health changes on each provider's stream, and let time-driven
    /// ones (breakers half-opening, maintenance windows) happen.
    async fn run_health(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = interval.tick() => {}
            }
            let now = self.clock.now();
            self.routing.tick(now);
            let changes = self.routing.take_health_changes();
            if changes.is_empty() {
                continue;
            }
            let events = changes
                .iter()
                .map(|change| NewEvent {
                    event_id: rand::random::<u128>(),
                    event_type: PROVIDER_HEALTH_CHANGED.to_owned(),
                    stream_id: health_stream(&change.provider),
                    timestamp_ms: change.at_ms,
                    causation_id: None,
                    correlation_id: None,
                    payload: serde_json::to_vec(change).unwrap_or_default(),
                })
                .collect();
            if let Err(error) = self.log.append(AppendRequest { events, ..Default::default() }).await {
                tracing::error!(%error, "cannot record provider health changes");
            }
        }
    }

    /// Start one actor per partition of `payments.commands`, and the relay
    /// that publishes the service's events to `payments.events`.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Result<Vec<JoinHandle<()>>, kassa_bus::BusError> {
        if let Err(error) = self.restore_routing() {
            tracing::error!(%error, "cannot restore routing changes made through the API; using the configured ones");
        }
        let partitions = self.bus.partitions(PAYMENT_COMMANDS)?;
        let mut tasks = Vec::new();
        for partition in 0..partitions {
            let service = Arc::clone(self);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move { service.run_partition(partition, stop).await }));
        }
        tasks.push(tokio::spawn(Arc::clone(self).run_health(stop.clone())));
        tasks.push(tokio::spawn(run_relay(
            Arc::clone(&self.log),
            Arc::clone(&self.bus),
            PAYMENT_EVENTS,
            |e| {
                if e.event_type.starts_with("payment.") {
                    Some(PAYMENT_EVENTS)
                } else {
                    (e.event_type == PROVIDER_HEALTH_CHANGED).then_some(PROVIDER_HEALTH)
                }
            },
            RelayConfig::default(),
            stop,
        )));
        Ok(tasks)
    }

    async fn run_partition(self: Arc<Self>, partition: u32, mut stop: watch::Receiver<bool>) {
        let (effects_tx, mut effects_rx) = mpsc::channel::<EffectResult>(4096);
        let mut actor = PartitionActor {
            service: Arc::clone(&self),
            partition,
            cache: HashMap::new(),
            effects_tx,
            ops_in_flight: HashSet::new(),
        };
        // Resume every payment that had work left when the service stopped.
        let mut resume = Vec::new();
        match self.log.scan(Table::State, format!("active/{partition:05}/").as_bytes()) {
            Ok(entries) => {
                for (key, _) in entries {
                    if let Some(bytes) = key.get(key.len() - 16..).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                        resume.push(PaymentId::from_u128(u128::from_be_bytes(bytes)));
                    }
                }
            }
            Err(error) => {
                tracing::error!(partition, %error, "cannot scan active payments; partition stopped");
                return;
            }
        }
        if !resume.is_empty() {
            tracing::info!(partition, payments = resume.len(), "resuming payments with work left");
            if let Err(error) = actor.resume(resume).await {
                tracing::error!(partition, %error, "resuming failed; partition stopped");
                return;
            }
        }
        let subscription =
            resume_subscription(&self.log, &self.bus, PAYMENT_COMMANDS, partition, &offset_key(partition));
        let mut subscription = match subscription {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::error!(partition, %error, "cannot read the stored offset; partition stopped");
                return;
            }
        };
        loop {
            let mut messages = Vec::new();
            let mut results = Vec::new();
            tokio::select! {
                _ = stop.changed() => return,
                message = subscription.recv() => match message {
                    Some(Ok(message)) => messages.push(message),
                    Some(Err(error)) => { tracing::warn!(partition, %error, "fetch failed"); continue; }
                    None => return,
                },
                result = effects_rx.recv() => match result {
                    Some(result) => results.push(result),
                    None => return,
                },
            }
            // Take whatever else is ready, up to the batch bound.
            while messages.len() + results.len() < self.config.batch_inputs_max {
                if subscription.buffered() > 0 {
                    match subscription.recv().await {
                        Some(Ok(message)) => messages.push(message),
                        _ => break,
                    }
                } else if let Ok(result) = effects_rx.try_recv() {
                    results.push(result);
                } else {
                    break;
                }
            }
            if let Err(error) = actor.process(messages, results).await {
                tracing::error!(partition, %error, "authorization partition failed; stopping it (restart to recover)");
                return;
            }
        }
    }
}

struct PartitionActor {
    service: Arc<AuthorizationService>,
    partition: u32,
    cache: HashMap<PaymentId, PaymentRecord>,
    effects_tx: mpsc::Sender<EffectResult>,
    /// Payments with a provider call (capture, void, refund) under way: one at
    /// a time per payment, in the order owed, or a refund could reach the
    /// provider before the capture it refunds.
    ops_in_flight: HashSet<PaymentId>,
}

/// One batch being decided: changed records, events and effects, written together.
#[derive(Default)]
struct Batch {
    records: BTreeMap<PaymentId, PaymentRecord>,
    events: Vec<NewEvent>,
    writes: Vec<StateWrite>,
    effects: Vec<Effect>,
    seen: HashSet<u128>,
}

type ActorError = kassa_eventlog::LogError;

impl PartitionActor {
    fn load(&mut self, batch: &mut Batch, payment_id: PaymentId) -> Result<PaymentRecord, ActorError> {
        if let Some(record) = batch.records.get(&payment_id).or_else(|| self.cache.get(&payment_id)) {
            return Ok(record.clone());
        }
        Ok(match self.service.log.get(Table::State, &record_key(payment_id))? {
            Some(bytes) => decode_value(&bytes, "payment record").map_err(|e| ActorError::BadChunk {
                position: 0,
                reason: format!("payment record {payment_id}: {e}"),
            })?,
            None => PaymentRecord::default(),
        })
    }

    fn now(&self) -> kassa_domain::Timestamp {
        self.service.clock.now()
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
        let events = decide(&record.state, command, self.now())?;
        for event in &events {
            apply(&mut record.state, event);
            record.events_written += 1;
            batch.events.push(NewEvent {
                event_id: derived_id(payment_id.as_u128(), "event", record.events_written),
                event_type: event.event_type().to_owned(),
                stream_id: payment_id.as_u128(),
                timestamp_ms: self.now().unix_ms(),
                causation_id: Some(cause),
                correlation_id: Some(payment_id.as_u128()),
                payload: event.encode_payload(),
            });
        }
        Ok(events)
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
        record.events_written += 1;
        batch.events.push(NewEvent {
            event_id: derived_id(payment_id.as_u128(), "event", record.events_written),
            event_type: COMMAND_REJECTED.to_owned(),
            stream_id: payment_id.as_u128(),
            timestamp_ms: self.now().unix_ms(),
            causation_id: Some(command_id),
            correlation_id: Some(payment_id.as_u128()),
            payload: rejected.encode_payload(),
        });
    }

    /// Turn a command message into a domain command, filling defaults from the state.
    fn to_command(message: PaymentCommandMessage, state: &PaymentState) -> PaymentCommand {
        let money = |minor: Option<i64>, default: i64| {
            let currency = state.request.as_ref().map(|r| r.amount.currency);
            currency.map_or(Money::new(0, kassa_domain::Currency::from_code("EUR").expect("EUR")), |c| {
                Money::new(minor.unwrap_or(default), c)
            })
        };
        match message {
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
            PaymentCommandMessage::RecordReconciliation { report_id, .. } => {
                PaymentCommand::RecordReconciliation { report_id }
            }
        }
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
        let command = if self.service.vault.get(payment_id).is_none() {
            if forwarding {
                PaymentCommand::AbandonStandIn { code: "card_data_unavailable".into() }
            } else {
                decline("card_data_unavailable".into(), DeclineCategory::Soft)
            }
        } else {
            let routing = &self.service.routing;
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
            let (input, decision) = routing.decide(facts, tried, forwarding, self.now());
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
            self.service.routing.release_stand_in(request.merchant_id, request.amount);
        }
    }

    /// Queue a routing decision as an event on the payment's routing stream.
    fn record_decision(&self, batch: &mut Batch, payment_id: PaymentId, cause: u128, decided: RoutingDecided) {
        let attempt = decided.attempt;
        let payload = match serde_json::to_vec(&decided) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%payment_id, %error, "cannot encode a routing decision");
                return;
            }
        };
        batch.events.push(NewEvent {
            // One decision per attempt number: unique per payment, the same on every replay.
            event_id: derived_id(payment_id.as_u128(), "routing", attempt),
            event_type: ROUTING_DECIDED.to_owned(),
            stream_id: routing_stream(payment_id),
            timestamp_ms: self.now().unix_ms(),
            causation_id: Some(cause),
            correlation_id: Some(payment_id.as_u128()),
            payload,
        });
    }

    fn apply_result(&self, batch: &mut Batch, record: &mut PaymentRecord, result: EffectResult) {
        let delay_ms = self.service.config.retry_backoff_ms;
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
                self.service.routing.record_call(&provider, class, latency_ms, self.now());
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
                            && record.state.request.as_ref().is_some_and(|r| {
                                self.service.routing.allow_retry(r.card.token, r.card.brand, self.now())
                            });
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
                        if record.inquiries >= self.service.config.inquiries_max {
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

    async fn resume(&mut self, payments: Vec<PaymentId>) -> Result<(), ActorError> {
        // In chunks, so no single append exceeds the log's per-request bound.
        let chunk = self.service.config.batch_inputs_max.max(1);
        for payments in payments.chunks(chunk) {
            self.resume_chunk(payments).await?;
        }
        Ok(())
    }

    async fn resume_chunk(&mut self, payments: &[PaymentId]) -> Result<(), ActorError> {
        let mut batch = Batch::default();
        for &payment_id in payments {
            let mut record = self.load(&mut batch, payment_id)?;
            if record.state.stand_in_pending()
                && let Some(request) = &record.state.request
            {
                self.service.routing.restore_stand_in(request.merchant_id, request.amount);
            }
            let in_flight = record.state.in_flight.attempt_id.is_some();
            match record.state.stage {
                Stage::Requested => self.advance(&mut batch, &mut record, payment_id),
                _ if record.state.stand_in_pending() && !in_flight => self.advance(&mut batch, &mut record, payment_id),
                _ if in_flight => {
                    // The call may or may not have reached the provider: its outcome is unknown, ask it.
                    if let Some(attempt_id) = record.state.in_flight.attempt_id {
                        let provider = record.state.in_flight.provider.clone();
                        if !record.state.in_flight.outcome_unknown {
                            let unknown = PaymentCommand::RecordAuthorizationResult {
                                attempt_id,
                                result: AuthorizationResult::Unknown {
                                    reason: "service restarted during the call".into(),
                                },
                            };
                            if let Err(rejection) =
                                self.run(&mut batch, &mut record, payment_id, unknown, attempt_id.as_u128())
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
        self.commit(batch, None).await
    }

    async fn process(&mut self, messages: Vec<Message>, results: Vec<EffectResult>) -> Result<(), ActorError> {
        let mut batch = Batch::default();
        let mut last_offset = None;
        for message in messages {
            last_offset = Some(message.offset);
            let envelope = match decode_frame(&message.payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::error!(partition = self.partition, offset = message.offset, %error, "undecodable command skipped");
                    continue;
                }
            };
            if batch.seen.contains(&envelope.event_id)
                || self.service.log.get(Table::State, &seen_key(envelope.event_id))?.is_some()
            {
                continue; // a duplicate delivery
            }
            batch.seen.insert(envelope.event_id);
            let command = match PaymentCommandMessage::decode(&envelope.event_type, &envelope.payload) {
                Ok(command) => command,
                Err(error) => {
                    tracing::error!(offset = message.offset, %error, "unknown command skipped");
                    continue;
                }
            };
            let payment_id = command.payment_id();
            if PaymentId::from_u128(envelope.stream_id) != payment_id {
                tracing::error!(offset = message.offset, "command names another payment than its stream; skipped");
                continue;
            }
            let mut record = self.load(&mut batch, payment_id)?;
            let domain_command = Self::to_command(command, &record.state);
            match self.run(&mut batch, &mut record, payment_id, domain_command, envelope.event_id) {
                Ok(events) => {
                    for op in Self::owe_provider_calls(&mut record, &events) {
                        batch.effects.push(Effect::Op { payment_id, op, delay_ms: 0 });
                    }
                    self.advance(&mut batch, &mut record, payment_id);
                }
                Err(Rejection::PaymentAlreadyExists) => {} // a re-published request
                Err(rejection) => self.reject(&mut batch, &mut record, payment_id, envelope.event_id, &rejection),
            }
            batch.records.insert(payment_id, record);
        }
        for result in results {
            let payment_id = match &result {
                EffectResult::Authorized { payment_id, .. }
                | EffectResult::Inquired { payment_id, .. }
                | EffectResult::Reversed { payment_id, .. }
                | EffectResult::OpDone { payment_id, .. }
                | EffectResult::Woken { payment_id } => *payment_id,
            };
            if matches!(result, EffectResult::OpDone { .. }) {
                self.ops_in_flight.remove(&payment_id);
            }
            let mut record = self.load(&mut batch, payment_id)?;
            self.apply_result(&mut batch, &mut record, result);
        }
        self.commit(batch, last_offset).await
    }

    /// Write the batch in one append, then start its effects.
    async fn commit(&mut self, mut batch: Batch, last_offset: Option<u64>) -> Result<(), ActorError> {
        for (payment_id, record) in &batch.records {
            batch.writes.push(StateWrite {
                table: Table::State,
                key: record_key(*payment_id),
                value: Some(encode_value(record)),
            });
            let active = active_key(self.partition, *payment_id);
            batch.writes.push(StateWrite {
                table: Table::State,
                key: active,
                value: record.is_active().then(Vec::new),
            });
            if !record.needs_card() {
                self.service.vault.remove(*payment_id);
            }
        }
        for event_id in &batch.seen {
            batch.writes.push(StateWrite { table: Table::State, key: seen_key(*event_id), value: Some(Vec::new()) });
        }
        if let Some(offset) = last_offset {
            batch.writes.push(StateWrite {
                table: Table::Positions,
                key: offset_key(self.partition),
                value: Some((offset + 1).to_be_bytes().to_vec()),
            });
        }
        if batch.events.is_empty() && batch.writes.is_empty() {
            return Ok(());
        }
        self.service
            .log
            .append(AppendRequest {
                events: std::mem::take(&mut batch.events),
                expected: Vec::new(),
                writes: batch.writes,
            })
            .await?;
        if self.cache.len() > self.service.config.cached_payments_max {
            self.cache.clear();
        }
        self.cache.extend(batch.records);
        for effect in batch.effects {
            if let Effect::Op { payment_id, .. } = &effect
                && !self.ops_in_flight.insert(*payment_id)
            {
                continue; // started when the call under way completes
            }
            self.start(effect);
        }
        Ok(())
    }

    fn provider(&self, name: &str) -> Option<Arc<dyn Connector>> {
        self.service.providers.iter().find(|p| p.name() == name).cloned()
    }

    /// Run one provider call in its own task; its result comes back as an input.
    fn start(&self, effect: Effect) {
        let tx = self.effects_tx.clone();
        if let Effect::Wake { payment_id, delay_ms } = effect {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let _ = tx.send(EffectResult::Woken { payment_id }).await;
            });
            return;
        }
        let deadline = Duration::from_millis(self.service.config.provider_timeout_ms);
        let vault = Arc::clone(&self.service.vault);
        let provider_name = match &effect {
            Effect::Authorize { provider, .. }
            | Effect::Inquire { provider, .. }
            | Effect::Reverse { provider, .. } => provider.clone(),
            Effect::Op { op, .. } => match op {
                ProviderOp::Capture { provider, .. }
                | ProviderOp::Reverse { provider, .. }
                | ProviderOp::Refund { provider, .. } => provider.clone(),
            },
            Effect::Wake { .. } => return, // handled above
        };
        let Some(connector) = self.provider(&provider_name) else {
            // Not configured (any more): answer as a provider that is down, so nothing waits forever.
            tracing::error!(provider = %provider_name, "no connector for provider; call not made");
            let unavailable =
                || ProviderError::Unavailable { reason: format!("provider {provider_name} is not configured") };
            let result = match effect {
                Effect::Wake { payment_id, .. } => EffectResult::Woken { payment_id },
                Effect::Authorize { payment_id, attempt_id, provider, .. } => EffectResult::Authorized {
                    payment_id,
                    attempt_id,
                    provider,
                    latency_ms: 0,
                    result: Err(unavailable()),
                },
                Effect::Inquire { payment_id, attempt_id, .. } => {
                    EffectResult::Inquired { payment_id, attempt_id, result: Err(unavailable()) }
                }
                Effect::Reverse { payment_id, attempt_id, .. } => {
                    EffectResult::Reversed { payment_id, attempt_id, result: Err(unavailable()) }
                }
                Effect::Op { payment_id, op, .. } => {
                    EffectResult::OpDone { payment_id, op, result: Err(unavailable()) }
                }
            };
            let tx = self.effects_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                let _ = tx.send(result).await;
            });
            return;
        };
        tokio::spawn(async move {
            let result = match effect {
                Effect::Wake { payment_id, .. } => EffectResult::Woken { payment_id },
                Effect::Authorize { payment_id, attempt_id, merchant_id, amount, provider } => {
                    let started = std::time::Instant::now();
                    let result = match vault.get(payment_id) {
                        Some(card) => {
                            let request = AuthorizeRequest { attempt_id, payment_id, merchant_id, amount, card };
                            bounded(deadline, connector.authorize(request, deadline)).await
                        }
                        // Gone (another path finished the payment): the provider was not called.
                        None => Err(ProviderError::Unavailable { reason: "card data no longer held".into() }),
                    };
                    let latency_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
                    EffectResult::Authorized { payment_id, attempt_id, provider, latency_ms, result }
                }
                Effect::Inquire { payment_id, attempt_id, delay_ms, .. } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    EffectResult::Inquired {
                        payment_id,
                        attempt_id,
                        result: bounded(deadline, connector.inquire(attempt_id, deadline)).await,
                    }
                }
                Effect::Reverse { payment_id, attempt_id, delay_ms, .. } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    EffectResult::Reversed {
                        payment_id,
                        attempt_id,
                        result: bounded(deadline, connector.reverse(attempt_id, deadline)).await,
                    }
                }
                Effect::Op { payment_id, op, delay_ms } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let result = match &op {
                        ProviderOp::Capture { attempt_id, capture_id, amount, .. } => {
                            bounded(deadline, connector.capture(*attempt_id, *capture_id, *amount, deadline)).await
                        }
                        ProviderOp::Reverse { attempt_id, .. } => {
                            bounded(deadline, connector.reverse(*attempt_id, deadline)).await
                        }
                        ProviderOp::Refund { refund_id, attempt_id, amount, .. } => {
                            bounded(deadline, connector.refund(*attempt_id, *refund_id, *amount, deadline)).await
                        }
                    };
                    EffectResult::OpDone { payment_id, op, result }
                }
            };
            let _ = tx.send(result).await;
        });
    }
}
