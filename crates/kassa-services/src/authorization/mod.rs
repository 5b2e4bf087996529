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

mod process;

pub use process::{
    Batch, Dispatch, Effect, EffectResult, PaymentRecord, Process, ProviderOp, ROUTING_DECIDED, ROUTING_DECIDED_PACKED,
    RoutingDecided, STAND_IN_RETRY_MS, decode_routing_decided, encode_routing_decided, routing_stream,
};

use crate::changelog;
use crate::consume::{PartitionEnd, id_key, resume_subscription};
use crate::messages::PaymentCommandMessage;
use crate::relay::{RelayConfig, run_relay};
use crate::routing::{RoutingEngine, RoutingSettings};
use crate::runtime::{Clock, ExpiryClock, derived_id};
use crate::seal::CardSeal;
use crate::topics::{AUTHORIZATION_CHANGELOG, AUTHORIZATION_GROUP, PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH};
use crate::vault::CardVault;
use kassa_bus::{Bus, Membership, Message, partition_for};
use kassa_codec::{decode_frame_ref, decode_value, encode_value};
use kassa_domain::{PaymentId, ReportId, Stage};
use kassa_eventlog::{AppendRequest, EventLog, NewEvent, StateWrite, Table};
use kassa_providers::{AuthorizeRequest, Connector, ProviderError};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Share `payments.commands` with other instances of the service: each
    /// partition's commits go first to `authorization.changelog`, so the
    /// instance the group gives a partition to next restores its state
    /// from there. Off: this instance is the only one.
    pub changelog: bool,
    /// How long a revoked partition waits for its provider calls under way
    /// before it is handed over (the rest are resolved by its next owner).
    pub handoff_wait_ms: u64,
    /// How long an `Idempotency-Key` claim is kept (at least: 24 h by
    /// default), and how often each partition looks for older ones to drop.
    pub claim_keep_ms: u64,
    pub claim_prune_interval_ms: u64,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        AuthorizationConfig {
            provider_timeout_ms: 1500,
            batch_inputs_max: 512,
            inquiries_max: 5,
            retry_backoff_ms: 250,
            cached_payments_max: 100_000,
            changelog: false,
            handoff_wait_ms: 5_000,
            claim_keep_ms: 24 * 3_600_000,
            claim_prune_interval_ms: 60_000,
        }
    }
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
    /// Opens the cards ingest sealed (`command.card_sealed`) into the vault.
    seal: Option<Arc<CardSeal>>,
    /// Partitions of `payments.commands` with an actor running here.
    owned: crate::consume::Owned,
}

pub const ROUTING_RULES_CHANGED: &str = "routing.rules_changed";
/// Inputs per commit with the changelog (a commit with its routing decisions is a few KB per payment).
const CHANGELOG_BATCH_INPUTS_MAX: usize = 128;
const RULES_KEY: &[u8] = b"routing/rules";
/// Event type of a provider health change (JSON payload: [`crate::routing::HealthChange`]).
pub const PROVIDER_HEALTH_CHANGED: &str = "provider.health_changed";

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

/// A card still needed, kept sealed (as ingest sealed it) so a restarted
/// authorizer can open it again: a failover or a stand-in's forward after a
/// restart still has card data. Deleted when the payment no longer needs it.
fn sealed_card_key(payment_id: PaymentId) -> Vec<u8> {
    id_key("card/", payment_id.as_u128())
}

fn seen_key(event_id: u128) -> Vec<u8> {
    id_key("seen/", event_id)
}

/// A reconciliation that came before its payment's settlement: (report, command id).
fn held_reconciliation_key(payment_id: PaymentId) -> Vec<u8> {
    id_key("held-reconciliation/", payment_id.as_u128())
}

/// Which payment holds a merchant's `Idempotency-Key` (by the key's hash):
/// `(payment id, the request's fingerprint, when it was claimed in ms)`.
fn idempotency_claim_key(merchant_id: kassa_domain::MerchantId, key_hash: &[u8; 32]) -> Vec<u8> {
    let mut key = id_key("idempotency/", merchant_id.as_u128());
    key.extend_from_slice(key_hash);
    key
}

/// Which command holds a merchant's `Idempotency-Key` on a partition (a
/// capture, void or refund made with it):
/// `(command id, the request's fingerprint, when it was claimed in ms)`.
/// Under the partition: one key may be claimed on every partition, and an
/// instance's log holds the state of each partition it has owned.
fn command_key_claim_key(partition: u32, merchant_id: kassa_domain::MerchantId, key_hash: &[u8; 32]) -> Vec<u8> {
    let mut key = id_key(&format!("command-key/{partition:05}/"), merchant_id.as_u128());
    key.extend_from_slice(key_hash);
    key
}

/// The claims of a partition by when they were made, to drop the old ones:
/// the prefix, then the time (big-endian ms), then the claim's key.
fn claims_by_time_prefix(partition: u32) -> Vec<u8> {
    format!("idempotency-at/{partition:05}/").into_bytes()
}

/// The partition's [`ExpiryClock`] reading: stored with each claim, each pass
/// that drops claims, and every 1/24 of the keep time while claims wait.
fn expiry_clock_key(partition: u32) -> Vec<u8> {
    format!("expiry-clock/{partition:05}").into_bytes()
}

/// Claims dropped per pass at most (a pass is one commit).
const CLAIMS_PRUNED_PER_PASS: usize = 1_000;

/// A payment that claimed a key another held: it is never requested.
fn duplicate_key(payment_id: PaymentId) -> Vec<u8> {
    id_key("duplicate/", payment_id.as_u128())
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
            seal: None,
            owned: std::sync::Mutex::default(),
        }
    }

    /// Open sealed cards from ingest with this key (ingest may run in another process).
    pub fn with_card_seal(mut self, seal: Arc<CardSeal>) -> Self {
        self.seal = Some(seal);
        self
    }

    /// Route with this engine instead of the default (every provider in order).
    pub fn with_routing(mut self, routing: Arc<RoutingEngine>) -> Self {
        self.routing = routing;
        self
    }

    /// Inputs decided in one commit. With the changelog, a commit is one
    /// Kafka record: kept well under the usual 1 MB message limit.
    fn batch_inputs_max(&self) -> usize {
        let max = self.config.batch_inputs_max.max(1);
        if self.config.changelog { max.min(CHANGELOG_BATCH_INPUTS_MAX) } else { max }
    }

    /// How much of [`Self::batch_inputs_max`] a message takes: a command for
    /// several payments as many as it may name (with the changelog, where a
    /// commit is one Kafka record, whose size follows the records changed);
    /// any other message, one.
    fn input_weight(&self, message: &Message) -> usize {
        if !self.config.changelog {
            return 1;
        }
        match kassa_codec::decode_frame_ref(&message.payload).map(|envelope| envelope.event_type) {
            Ok(crate::messages::RECORD_SETTLEMENTS | crate::messages::RECORD_RECONCILIATIONS) => {
                crate::messages::PAYMENTS_PER_COMMAND_MAX
            }
            _ => 1,
        }
    }

    /// The partitions of `payments.commands` this instance owns now.
    pub fn partitions_owned(&self) -> Vec<u32> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
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
            .append(AppendRequest { events: vec![event], writes: vec![write], ..Default::default() })
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

    /// Commands published to `payments.commands` and not decided here yet, over
    /// all partitions (the consumer lag). Reads the bus's end offsets: blocking.
    pub fn input_lag(&self, bus: &dyn Bus) -> Result<u64, String> {
        let mut lag = 0;
        for partition in 0..bus.partitions(PAYMENT_COMMANDS).map_err(|e| e.to_string())? {
            let end = bus.end_offset(PAYMENT_COMMANDS, partition).map_err(|e| e.to_string())?;
            let done = crate::consume::stored_offset(&self.log, &offset_key(partition)).map_err(|e| e.to_string())?;
            lag += end.saturating_sub(done);
        }
        Ok(lag)
    }

    /// A payment's routing decisions, oldest first. One that does not decode
    /// is an error naming its position, never left out.
    pub fn routing_decisions(&self, payment_id: PaymentId) -> Result<Vec<RoutingDecided>, kassa_eventlog::LogError> {
        let envelopes = self.log.read_stream(routing_stream(payment_id), 1, 10_000)?;
        envelopes
            .iter()
            .filter_map(|e| {
                let decided = decode_routing_decided(&e.event_type, &e.payload)?;
                Some(decided.map_err(|source| kassa_eventlog::LogError::Corrupt { position: e.position, source }))
            })
            .collect()
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

    /// Join the service's consumer group on `payments.commands` and run one
    /// actor per partition this instance is given; start the relay that
    /// publishes the service's events to `payments.events`.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Result<Vec<JoinHandle<()>>, kassa_bus::BusError> {
        if let Err(error) = self.restore_routing() {
            tracing::error!(%error, "cannot restore routing changes made through the API; using the configured ones");
        }
        if self.config.changelog {
            let (commands, changelog) =
                (self.bus.partitions(PAYMENT_COMMANDS)?, self.bus.partitions(AUTHORIZATION_CHANGELOG)?);
            if commands != changelog {
                return Err(kassa_bus::BusError::PartitionCountChanged {
                    topic: AUTHORIZATION_CHANGELOG.to_owned(),
                    existing: changelog,
                    configured: commands,
                });
            }
        }
        // Without the changelog, state cannot move: this instance owns every partition.
        let membership = if self.config.changelog {
            self.bus.join_group(AUTHORIZATION_GROUP, PAYMENT_COMMANDS)?
        } else {
            Membership::sole(AUTHORIZATION_GROUP, self.bus.partitions(PAYMENT_COMMANDS)?)
        };
        let mut tasks = vec![tokio::spawn(Arc::clone(self).run_membership(membership, stop.clone()))];
        tasks.push(tokio::spawn(Arc::clone(self).run_health(stop.clone())));
        tasks.push(tokio::spawn(run_relay(
            Arc::clone(&self.log),
            Arc::clone(&self.bus),
            PAYMENT_EVENTS,
            |t| {
                if t.starts_with("payment.") {
                    Some(PAYMENT_EVENTS)
                } else {
                    (t == PROVIDER_HEALTH_CHANGED).then_some(PROVIDER_HEALTH)
                }
            },
            RelayConfig::default(),
            stop,
        )));
        Ok(tasks)
    }

    /// Start and stop partition actors as the group assigns and revokes
    /// partitions; on stop, stop them all and wait for them.
    async fn run_membership(self: Arc<Self>, membership: Membership, stop: watch::Receiver<bool>) {
        let service = Arc::clone(&self);
        crate::consume::run_partitions(membership, stop, &self.owned, move |partition, owner, stop| {
            let service = Arc::clone(&service);
            tokio::spawn(async move { service.run_partition(partition, owner, stop).await })
        })
        .await;
    }

    async fn run_partition(
        self: Arc<Self>,
        partition: u32,
        owner: String,
        stop: watch::Receiver<bool>,
    ) -> PartitionEnd {
        let end = Arc::clone(&self).run_partition_actor(partition, owner, stop).await;
        if self.config.changelog {
            // The partition may move on: its cards stay sealed in the log and on the
            // changelog, and leave this memory (a restart here reopens what it needs).
            let partitions = self.bus.partitions(PAYMENT_COMMANDS).unwrap_or(1);
            let forgotten = self
                .vault
                .forget(|payment_id| partition_for(&crate::payment_key(payment_id.as_u128()), partitions) == partition);
            tracing::debug!(partition, forgotten, "the partition's cards left memory");
        }
        end
    }

    async fn run_partition_actor(
        self: Arc<Self>,
        partition: u32,
        owner: String,
        mut stop: watch::Receiver<bool>,
    ) -> PartitionEnd {
        let mut ownership = None;
        if self.config.changelog {
            // Whatever other instances (or this one, before a crash) committed for this partition, then a claim.
            let (log, bus) = (&self.log, self.bus.as_ref());
            match changelog::take_partition(
                log,
                bus,
                AUTHORIZATION_CHANGELOG,
                partition,
                &owner,
                &stop,
                "authorization",
            )
            .await
            {
                Ok((taken, _)) => ownership = Some(taken),
                Err(end) => return end,
            }
        }
        let partitions = match self.bus.partitions(PAYMENT_COMMANDS) {
            Ok(partitions) => partitions,
            Err(error) => {
                tracing::error!(partition, %error, "cannot read how many partitions {PAYMENT_COMMANDS} has; partition stopped");
                return PartitionEnd::Again;
            }
        };
        let (effects_tx, mut effects_rx) = mpsc::channel::<EffectResult>(4096);
        let mut actor = PartitionActor {
            service: Arc::clone(&self),
            partition,
            partitions,
            cache: HashMap::new(),
            effects_tx,
            dispatch: Dispatch::default(),
            sealed_cards: Vec::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            ownership,
            stop: stop.clone(),
            expiry: None,
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
                return PartitionEnd::Again;
            }
        }
        for &payment_id in &resume {
            if let Err(error) = actor.restore_card(payment_id) {
                tracing::error!(partition, %error, "cannot read a stored card; partition stopped");
                return PartitionEnd::Again;
            }
        }
        if !resume.is_empty() {
            tracing::info!(partition, payments = resume.len(), "resuming payments with work left");
            if let Err(error) = actor.resume(resume).await {
                tracing::error!(partition, %error, "resuming failed; partition stopped");
                return PartitionEnd::Again;
            }
        }
        let subscription =
            resume_subscription(&self.log, &self.bus, PAYMENT_COMMANDS, partition, &offset_key(partition));
        let mut subscription = match subscription {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::error!(partition, %error, "cannot read the stored offset; partition stopped");
                return PartitionEnd::Again;
            }
        };
        let mut prune = tokio::time::interval(Duration::from_millis(self.config.claim_prune_interval_ms.max(1)));
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut messages = Vec::new();
            let mut results = Vec::new();
            let mut pruning = false;
            tokio::select! {
                _ = stop.changed() => {
                    actor.hand_over(&mut effects_rx).await;
                    return PartitionEnd::Again;
                }
                _ = prune.tick() => pruning = true,
                message = subscription.recv() => match message {
                    Some(Ok(message)) => messages.push(message),
                    Some(Err(error)) if error.is_fatal() => return PartitionEnd::Fatal(error.to_string()),
                    Some(Err(error)) => { tracing::warn!(partition, %error, "fetch failed"); continue; }
                    None => return PartitionEnd::Again,
                },
                result = effects_rx.recv() => match result {
                    Some(result) => results.push(result),
                    None => return PartitionEnd::Again,
                },
            }
            // Take whatever else is ready, up to the batch bound (a command for several
            // payments weighs as many).
            let mut weight = messages.iter().map(|m| self.input_weight(m)).sum::<usize>() + results.len();
            while !pruning && weight < self.batch_inputs_max() {
                if subscription.buffered() > 0 {
                    match subscription.recv().await {
                        Some(Ok(message)) => {
                            weight += self.input_weight(&message);
                            messages.push(message);
                        }
                        _ => break,
                    }
                } else if let Ok(result) = effects_rx.try_recv() {
                    weight += 1;
                    results.push(result);
                } else {
                    break;
                }
            }
            let done = if pruning {
                // A full pass: the next one comes at once, between inputs, until the backlog is gone.
                actor.prune_claims().await.map(|full| {
                    if full {
                        prune.reset_immediately();
                    }
                })
            } else {
                actor.process(messages, results).await
            };
            match done {
                Ok(()) => {}
                Err(ActorError::Stopped) => return PartitionEnd::Again,
                Err(ActorError::Fenced(fenced)) => {
                    tracing::warn!(partition, %fenced, "another instance owns this partition now; stopped it here");
                    return PartitionEnd::TakenOver;
                }
                // A fresh start reloads the partition's state from the log.
                Err(ActorError::Log(error @ kassa_eventlog::LogError::Conflict { .. })) => {
                    tracing::error!(partition, %error, "authorization partition failed; starting it again");
                    return PartitionEnd::Again;
                }
                // Its log refuses writes or reads: starting the partition again here cannot help.
                Err(ActorError::Log(error)) => return PartitionEnd::Fatal(error.to_string()),
            }
        }
    }
}

struct PartitionActor {
    service: Arc<AuthorizationService>,
    partition: u32,
    /// Of `payments.commands`.
    partitions: u32,
    cache: HashMap<PaymentId, PaymentRecord>,
    effects_tx: mpsc::Sender<EffectResult>,
    dispatch: Dispatch,
    /// Sealed cards taken in this batch, written with it.
    sealed_cards: Vec<(PaymentId, Vec<u8>)>,
    /// Provider calls started and not answered yet (timers are not counted).
    in_flight: Arc<AtomicUsize>,
    /// This instance's claim on the partition's changelog (with `changelog` on).
    ownership: Option<changelog::Ownership>,
    stop: watch::Receiver<bool>,
    /// The clock claims are stamped and aged by (from its first use here on),
    /// with the last reading stored.
    expiry: Option<(ExpiryClock, i64)>,
}

#[derive(Debug, thiserror::Error)]
enum ActorError {
    #[error(transparent)]
    Log(#[from] kassa_eventlog::LogError),
    /// Another instance owns the partition now: stop it, with no effect.
    #[error(transparent)]
    Fenced(#[from] changelog::Fenced),
    /// Stopped while a commit's fate on the changelog is unknown: stop here too.
    #[error("stopped while the changelog was unreachable")]
    Stopped,
}

impl PartitionActor {
    fn load(&mut self, batch: &mut Batch, payment_id: PaymentId) -> Result<PaymentRecord, ActorError> {
        if let Some(record) = batch.records.get(&payment_id) {
            return Ok(record.clone());
        }
        // Taken out, not copied: a batch that keeps it (`batch.records`) puts it back
        // once committed, one that drops it leaves it to be read from the log next
        // time, and a failed commit ends this actor and its cache with it.
        let record = match self.cache.remove(&payment_id) {
            Some(record) => record,
            None => self.stored_record(payment_id)?.unwrap_or_default(),
        };
        batch.stored_active.insert(payment_id, record.is_active());
        Ok(record)
    }

    /// The payment's record as stored in the log, if it has one.
    fn stored_record(&self, payment_id: PaymentId) -> Result<Option<PaymentRecord>, ActorError> {
        let Some(bytes) = self.service.log.get(Table::State, &record_key(payment_id))? else { return Ok(None) };
        let record = decode_value(&bytes, "payment record").map_err(|e| kassa_eventlog::LogError::BadChunk {
            position: 0,
            reason: format!("payment record {payment_id}: {e}"),
        })?;
        Ok(Some(record))
    }

    /// Whether a card delivered for this payment is one it no longer needs:
    /// its request was decided and no authorization (nor a stand-in's forward)
    /// is to come, or it is a duplicate of another payment's key and never
    /// becomes a payment. So a card delivered again is told by its payment,
    /// with no `seen/` marker. A payment with no record yet, or one still
    /// deciding, needs it (held again, it changes nothing).
    fn card_no_longer_needed(&self, batch: &Batch, payment_id: PaymentId) -> Result<bool, ActorError> {
        let stored;
        let record = match batch.records.get(&payment_id).or_else(|| self.cache.get(&payment_id)) {
            Some(record) => record,
            None => match self.stored_record(payment_id)? {
                Some(record) => {
                    stored = record;
                    &stored
                }
                None => return Ok(false),
            },
        };
        if record.state.request.is_some() {
            return Ok(!record.needs_card());
        }
        // No request yet (a command refused before it came leaves a record too):
        // only a duplicate never gets one.
        self.is_duplicate(batch, payment_id)
    }

    /// Put a sealed card into the vault, unless it is there already (ingest in
    /// this process put it there). Whether the vault now holds it. A card that
    /// does not open is logged; its payment is then declined
    /// `card_data_unavailable`, the same as one whose card was never sent.
    fn hold_card(&mut self, payment_id: PaymentId, sealed: &[u8]) -> bool {
        let vault = &self.service.vault;
        if vault.contains(payment_id) {
            return true;
        }
        let Some(seal) = &self.service.seal else {
            tracing::error!(%payment_id, "a sealed card arrived but no card key is configured; it cannot be opened");
            return false;
        };
        match seal.open(payment_id, sealed) {
            Ok(card) => match vault.put(payment_id, card) {
                Ok(()) => true,
                Err(full) => {
                    tracing::error!(%payment_id, %full, "no room for a sealed card");
                    false
                }
            },
            Err(error) => {
                tracing::error!(%payment_id, %error, "a sealed card does not open");
                false
            }
        }
    }

    /// After a restart: open the sealed card a payment with work left still needs.
    fn restore_card(&mut self, payment_id: PaymentId) -> Result<(), ActorError> {
        if self.service.vault.contains(payment_id) {
            return Ok(());
        }
        if let Some(sealed) = self.service.log.get(Table::State, &sealed_card_key(payment_id))? {
            self.hold_card(payment_id, &sealed);
        }
        Ok(())
    }

    /// The pure decisions, at the service clock's time.
    fn decide<T>(&self, f: impl FnOnce(&Process<'_>) -> T) -> T {
        let vault = &self.service.vault;
        let card_held = |payment_id| vault.contains(payment_id);
        let process = Process {
            routing: &self.service.routing,
            config: &self.service.config,
            now: self.service.clock.now(),
            card_held: &card_held,
        };
        f(&process)
    }

    /// The partition is taken away (or the service stops): record the
    /// answers of the calls under way, for a bounded time. Calls that follow
    /// from them (a capture after an approval, a failover) still start, but no
    /// timer does, and nothing waits for them past the bound. What is left is
    /// resumed by the partition's next owner, as after a crash.
    async fn hand_over(&mut self, effects_rx: &mut mpsc::Receiver<EffectResult>) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.service.config.handoff_wait_ms);
        loop {
            // Read before draining: at zero, every result has been sent, so the drain sees it.
            let idle = self.in_flight.load(Ordering::Acquire) == 0;
            let mut results = Vec::new();
            while let Ok(result) = effects_rx.try_recv() {
                results.push(result);
            }
            if results.is_empty() {
                if idle {
                    break;
                }
                match tokio::time::timeout_at(deadline, effects_rx.recv()).await {
                    Ok(Some(result)) => results.push(result),
                    _ => break,
                }
            }
            // A timer that fired is left to the next owner's resume.
            results.retain(|r| !matches!(r, EffectResult::Woken { .. }));
            if results.is_empty() {
                continue;
            }
            if let Err(error) = self.process(Vec::new(), results).await {
                tracing::error!(partition = self.partition, %error, "recording answers while handing over failed");
                break;
            }
        }
        let left = self.in_flight.load(Ordering::Acquire);
        if left > 0 {
            tracing::info!(partition = self.partition, left, "handed over with calls still under way");
        }
    }

    async fn resume(&mut self, payments: Vec<PaymentId>) -> Result<(), ActorError> {
        // In chunks, so no single append exceeds the log's per-request bound.
        let chunk = self.service.batch_inputs_max();
        for payments in payments.chunks(chunk) {
            let mut batch = Batch::default();
            for &payment_id in payments {
                let record = self.load(&mut batch, payment_id)?;
                // Its marker is written again as the record says: one left behind is cleared here.
                batch.stored_active.remove(&payment_id);
                self.decide(|process| process.resume(&mut batch, record, payment_id));
            }
            self.commit(batch, None).await?;
        }
        Ok(())
    }

    async fn process(&mut self, messages: Vec<Message>, results: Vec<EffectResult>) -> Result<(), ActorError> {
        let mut batch = Batch::default();
        let mut last_offset = None;
        for message in messages {
            last_offset = Some(message.offset);
            let envelope = match decode_frame_ref(&message.payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::error!(partition = self.partition, offset = message.offset, %error, "undecodable command skipped");
                    continue;
                }
            };
            let command = match PaymentCommandMessage::decode(envelope.event_type, envelope.payload) {
                Ok(command) => command,
                Err(error) => {
                    tracing::error!(offset = message.offset, %error, "unknown command skipped");
                    continue;
                }
            };
            // A payment's request and its card need no `seen/` marker: the payment
            // tells a second delivery (its request, see `card_no_longer_needed`).
            let told_by_payment =
                matches!(command, PaymentCommandMessage::Requested(_) | PaymentCommandMessage::CardSealed { .. });
            if !told_by_payment {
                if batch.seen.contains(&envelope.event_id)
                    || self.service.log.get(Table::State, &seen_key(envelope.event_id))?.is_some()
                {
                    continue; // a duplicate delivery
                }
                batch.seen.insert(envelope.event_id);
            }
            let payment_id = command.payment_id();
            if PaymentId::from_u128(envelope.stream_id) != payment_id {
                tracing::error!(offset = message.offset, "command names another payment than its stream; skipped");
                continue;
            }
            if let Some(singles) = self.one_by_one(&command, message.offset) {
                // Settlements and reconciliations, for one payment or several of this partition.
                for single in singles {
                    self.record_settled_or_reconciled(&mut batch, single, envelope.event_id)?;
                }
                continue;
            }
            if let PaymentCommandMessage::CardSealed { sealed, .. } = command {
                if self.card_no_longer_needed(&batch, payment_id)? {
                    continue; // a second delivery: the payment has its card, or needs it no more
                }
                if self.hold_card(payment_id, &sealed) {
                    self.sealed_cards.push((payment_id, sealed));
                }
                continue;
            }
            if let PaymentCommandMessage::ClaimIdempotencyKey { merchant_id, key_hash, fingerprint, .. } = &command {
                self.claim(&mut batch, payment_id, *merchant_id, key_hash, fingerprint, envelope.event_id)?;
                continue;
            }
            if let PaymentCommandMessage::ClaimCommandKey { merchant_id, key_hash, fingerprint, command_id, .. } =
                &command
            {
                self.claim_command_key(&mut batch, payment_id, *merchant_id, key_hash, fingerprint, *command_id)?;
                continue;
            }
            if matches!(command, PaymentCommandMessage::Requested(_)) && self.is_duplicate(&batch, payment_id)? {
                continue; // its key is another payment's: it never becomes a payment
            }
            if matches!(command, PaymentCommandMessage::Requested(_)) {
                // Its card may have come to the partition's previous owner: the
                // changelog brought it here sealed, but not into this vault.
                self.restore_card(payment_id)?;
            }
            let record = self.load(&mut batch, payment_id)?;
            if matches!(command, PaymentCommandMessage::Requested(_)) && record.state.request.is_some() {
                // A second delivery (a duplicate of another payment's key was dropped above).
                self.cache.insert(payment_id, record);
                continue;
            }
            self.decide(|process| process.command(&mut batch, record, command, envelope.event_id));
        }
        for result in results {
            self.dispatch.completed(&result);
            let record = self.load(&mut batch, result.payment_id())?;
            self.decide(|process| process.result(&mut batch, record, result));
        }
        self.commit(batch, last_offset).await
    }

    /// A settlement or reconciliation command as one command for each
    /// payment it names, leaving out (and logging) any that is not this
    /// partition's: another actor owns that payment. `None` for any other
    /// command.
    fn one_by_one(&self, command: &PaymentCommandMessage, offset: u64) -> Option<Vec<PaymentCommandMessage>> {
        let singles: Vec<PaymentCommandMessage> = match command {
            PaymentCommandMessage::RecordSettlement { .. } | PaymentCommandMessage::RecordReconciliation { .. } => {
                vec![command.clone()]
            }
            PaymentCommandMessage::RecordSettlements { payment_ids, batch_id } => payment_ids
                .iter()
                .map(|&payment_id| PaymentCommandMessage::RecordSettlement { payment_id, batch_id: *batch_id })
                .collect(),
            PaymentCommandMessage::RecordReconciliations { payment_ids, report_id } => payment_ids
                .iter()
                .map(|&payment_id| PaymentCommandMessage::RecordReconciliation { payment_id, report_id: *report_id })
                .collect(),
            _ => return None,
        };
        Some(
            singles
                .into_iter()
                .filter(|single| {
                    let payment_id = single.payment_id();
                    let key = crate::payment_key(payment_id.as_u128());
                    let ours = partition_for(&key, self.partitions) == self.partition;
                    if !ours {
                        tracing::error!(partition = self.partition, offset, %payment_id,
                            "a command names a payment of another partition; that payment skipped");
                    }
                    ours
                })
                .collect(),
        )
    }

    /// Record a payment settled or reconciled. The two come from different
    /// services over different relays, so a reconciliation can arrive before
    /// the settlement of the batch it reconciles: it is held (under
    /// `held-reconciliation/`) and recorded right after that settlement,
    /// never refused for coming early.
    fn record_settled_or_reconciled(
        &mut self,
        batch: &mut Batch,
        command: PaymentCommandMessage,
        cause: u128,
    ) -> Result<(), ActorError> {
        let payment_id = command.payment_id();
        let record = self.load(batch, payment_id)?;
        match command {
            PaymentCommandMessage::RecordReconciliation { report_id, .. } if record.state.stage == Stage::Captured => {
                batch.claims.insert(held_reconciliation_key(payment_id), Some(encode_value(&(report_id, cause))));
                batch.records.insert(payment_id, record);
            }
            PaymentCommandMessage::RecordSettlement { .. } => {
                self.decide(|process| process.command(batch, record, command, cause));
                let settled = batch.records.get(&payment_id).is_some_and(|r| r.state.stage == Stage::Settled);
                let key = held_reconciliation_key(payment_id);
                let held: Option<(ReportId, u128)> =
                    if settled { self.held_claim(batch, &key, "held reconciliation")? } else { None };
                if let Some((report_id, held_cause)) = held {
                    batch.claims.insert(key, None);
                    let record = self.load(batch, payment_id)?;
                    let reconciled = PaymentCommandMessage::RecordReconciliation { payment_id, report_id };
                    self.decide(|process| process.command(batch, record, reconciled, held_cause));
                }
            }
            command => self.decide(|process| process.command(batch, record, command, cause)),
        }
        Ok(())
    }

    /// Let a payment claim its merchant's `Idempotency-Key`: the first claim
    /// holds it; a later one by another payment records a duplicate request on
    /// that payment's stream (the same request, or a different one refused), and
    /// the payment is never requested. Claims of one key always reach this
    /// partition: ingest puts the payment there.
    fn claim(
        &mut self,
        batch: &mut Batch,
        payment_id: PaymentId,
        merchant_id: kassa_domain::MerchantId,
        key_hash: &[u8; 32],
        fingerprint: &str,
        cause: u128,
    ) -> Result<(), ActorError> {
        let key = idempotency_claim_key(merchant_id, key_hash);
        let held: Option<(PaymentId, String, i64)> = self.held_claim(batch, &key, "idempotency claim")?;
        match held {
            None => self.store_claim(batch, key, |claimed_at| encode_value(&(payment_id, fingerprint, claimed_at)))?,
            Some((original, ..)) if original == payment_id => {} // the same claim again
            Some(_) if self.is_duplicate(batch, payment_id)? => {} // answered already
            Some((original, first_fingerprint, _)) => {
                let record = self.load(batch, payment_id)?;
                if record.state.request.is_some() {
                    // Its request came first (never so from ingest): it is a payment; leave it one.
                    tracing::error!(%payment_id, %original, "a claim came after its payment's request; ignored");
                    return Ok(());
                }
                batch.claims.insert(duplicate_key(payment_id), Some(encode_value(&original)));
                // Its card will never be used: out of memory and off the disk, whatever
                // held it (this batch, an earlier one, or a restore after a restart).
                self.service.vault.remove(payment_id);
                self.sealed_cards.retain(|(id, _)| *id != payment_id);
                batch.claims.insert(sealed_card_key(payment_id), None);
                let same_request = first_fingerprint == fingerprint;
                self.decide(|process| {
                    process.duplicate_request(batch, record, payment_id, original, same_request, cause)
                });
            }
        }
        Ok(())
    }

    /// Let a capture, void or refund claim its merchant's `Idempotency-Key`
    /// (its claim comes just before it, on the payment's stream). The first
    /// command holds the key; the same request again has the same command id.
    /// A different command under a held key — or under a key that made a
    /// payment on this partition — is refused, and marked seen so that it is
    /// dropped when it arrives: the key was reused for another request, which
    /// an ingest instance that never saw the key cannot tell by itself.
    /// Claims meet only on the payment's partition: a key reused on a payment
    /// of another partition is not caught here.
    fn claim_command_key(
        &mut self,
        batch: &mut Batch,
        payment_id: PaymentId,
        merchant_id: kassa_domain::MerchantId,
        key_hash: &[u8; 32],
        fingerprint: &str,
        command_id: u128,
    ) -> Result<(), ActorError> {
        let key = command_key_claim_key(self.partition, merchant_id, key_hash);
        let held: Option<(u128, String, i64)> = self.held_claim(batch, &key, "command key claim")?;
        // A key that made a payment is that request's too — known here when this is the
        // key's partition (where its claims meet); a copy of another partition's claim, left
        // in this log by a partition owned before, is not this partition's to go by.
        let payment_claim = idempotency_claim_key(merchant_id, key_hash);
        let keys_partition = self.service.bus.partitions(PAYMENT_COMMANDS).ok().map(|n| partition_for(key_hash, n));
        let made_a_payment = keys_partition == Some(self.partition)
            && self.held_claim::<(PaymentId, String, i64)>(batch, &payment_claim, "idempotency claim")?.is_some();
        match held {
            None if !made_a_payment => {
                self.store_claim(batch, key, |claimed_at| encode_value(&(command_id, fingerprint, claimed_at)))?;
            }
            Some((holder, ..)) if holder == command_id => {} // the same request again
            _ => {
                if batch.seen.contains(&command_id)
                    || self.service.log.get(Table::State, &seen_key(command_id))?.is_some()
                {
                    return Ok(()); // carried out or refused already
                }
                batch.seen.insert(command_id);
                let record = self.load(batch, payment_id)?;
                self.decide(|process| process.refuse_reused_key(batch, record, payment_id, command_id));
            }
        }
        Ok(())
    }

    /// A claim as held: written in this batch, or stored (`what` names it in an error).
    fn held_claim<T: serde::de::DeserializeOwned>(
        &self,
        batch: &Batch,
        key: &[u8],
        what: &str,
    ) -> Result<Option<T>, ActorError> {
        let held = match batch.claims.get(key) {
            Some(value) => value.clone(),
            None => self.service.log.get(Table::State, key)?,
        };
        let Some(bytes) = held else { return Ok(None) };
        let claim = decode_value(&bytes, what)
            .map_err(|e| kassa_eventlog::LogError::BadChunk { position: 0, reason: format!("{what}: {e}") })?;
        Ok(Some(claim))
    }

    /// Store a claim under `key`, stamped by the partition's [`ExpiryClock`]
    /// (`value` is given the stamp), with its entry in the partition's time index.
    fn store_claim(
        &mut self,
        batch: &mut Batch,
        key: Vec<u8>,
        value: impl FnOnce(i64) -> Vec<u8>,
    ) -> Result<(), ActorError> {
        let claimed_at = self.expiry_now(batch)?;
        let mut by_time = claims_by_time_prefix(self.partition);
        by_time.extend_from_slice(&(claimed_at.max(0) as u64).to_be_bytes());
        by_time.extend_from_slice(&key);
        batch.claims.insert(by_time, Some(Vec::new()));
        batch.claims.insert(key, Some(value(claimed_at)));
        Ok(())
    }

    /// Drop the claims older than `claim_keep_ms` (up to a bound per pass), in
    /// one commit, so they leave the changelog's state too. The key is then
    /// free: a request made with it again is a new payment.
    /// Whether the pass was full (more may be due: the next pass comes at once).
    /// Claims are stamped and aged by the partition's [`ExpiryClock`] (its
    /// reading stored with what it stamps, and moved with the partition): a
    /// wall clock running ahead or set back drops no claim early.
    async fn prune_claims(&mut self) -> Result<bool, ActorError> {
        let prefix = claims_by_time_prefix(self.partition);
        let mut batch = Batch::default();
        let stored_before = self.expiry()?.1;
        let now = self.expiry_now(&mut batch)?;
        let keep_ms = self.service.config.claim_keep_ms as i64;
        let cutoff = now.saturating_sub(keep_ms);
        let mut until = prefix.clone();
        until.extend_from_slice(&(cutoff.max(0) as u64).to_be_bytes());
        let old = self.service.log.scan_range(Table::State, &prefix, &until, CLAIMS_PRUNED_PER_PASS)?;
        if old.is_empty() {
            // While claims wait, store the reading now and then (every 1/24 of the keep
            // time): a restart or a move resumes from it and loses little measured time.
            // With no claim waiting there is nothing to keep: the reading is taken as
            // stored (no seek each pass), and the next claim stores it.
            let lagging = now.saturating_sub(stored_before) >= (keep_ms / 24).max(1);
            if !lagging {
                if let Some((_, stored)) = &mut self.expiry {
                    *stored = stored_before;
                }
            } else if self.newest_claim_stamp()?.is_some() {
                self.commit(batch, None).await?;
            }
            return Ok(false);
        }
        let full = old.len() == CLAIMS_PRUNED_PER_PASS;
        for (by_time, _) in old {
            if let Some(claim) = by_time.get(prefix.len() + 8..) {
                batch.claims.insert(claim.to_vec(), None);
            }
            batch.claims.insert(by_time, None);
        }
        tracing::debug!(
            partition = self.partition,
            dropped = batch.claims.len().saturating_sub(1) / 2,
            "old idempotency claims dropped"
        );
        self.commit(batch, None).await?;
        Ok(full)
    }

    /// The partition's [`ExpiryClock`] reading (resumed from the stored one the
    /// first time), stored with `batch`.
    fn expiry_now(&mut self, batch: &mut Batch) -> Result<i64, ActorError> {
        let expiry = self.expiry()?;
        let now = expiry.0.now();
        expiry.1 = now;
        batch.claims.insert(expiry_clock_key(self.partition), Some(ExpiryClock::encode(now)));
        Ok(now)
    }

    /// The partition's [`ExpiryClock`] and its last stored reading, resumed on first use.
    fn expiry(&mut self) -> Result<&mut (ExpiryClock, i64), ActorError> {
        if self.expiry.is_none() {
            let stored = self.service.log.get(Table::State, &expiry_clock_key(self.partition))?;
            let stored = ExpiryClock::decode(stored.as_deref());
            let newest = self.newest_claim_stamp()?;
            let clock = ExpiryClock::resume(stored, newest, self.service.clock.now().unix_ms());
            let stored = stored.unwrap_or_else(|| clock.now());
            self.expiry = Some((clock, stored));
        }
        Ok(self.expiry.as_mut().expect("set above"))
    }

    /// The stamp of the partition's newest claim, if it has any.
    fn newest_claim_stamp(&self) -> Result<Option<i64>, ActorError> {
        Ok(ExpiryClock::newest_stamp(&self.service.log, &claims_by_time_prefix(self.partition))?)
    }

    /// Whether a payment claimed a key another payment holds.
    fn is_duplicate(&self, batch: &Batch, payment_id: PaymentId) -> Result<bool, ActorError> {
        let key = duplicate_key(payment_id);
        Ok(batch.claims.contains_key(&key) || self.service.log.get(Table::State, &key)?.is_some())
    }

    /// Write the batch in one append, then start its effects.
    async fn commit(&mut self, mut batch: Batch, last_offset: Option<u64>) -> Result<(), ActorError> {
        let mut writes = Vec::with_capacity(batch.records.len() * 2 + batch.seen.len() + self.sealed_cards.len() + 1);
        // Cards first: a payment that no longer needs its card in this same batch deletes it below.
        for (payment_id, sealed) in self.sealed_cards.drain(..) {
            writes.push(StateWrite { table: Table::State, key: sealed_card_key(payment_id), value: Some(sealed) });
        }
        for (payment_id, record) in &batch.records {
            writes.push(StateWrite {
                table: Table::State,
                key: record_key(*payment_id),
                value: Some(encode_value(record)),
            });
            // The marker follows the record's activity; unchanged, it is not written again.
            let active = record.is_active();
            if batch.stored_active.get(payment_id) != Some(&active) {
                let key = active_key(self.partition, *payment_id);
                writes.push(StateWrite { table: Table::State, key, value: active.then(Vec::new) });
            }
            if !record.needs_card() && self.service.vault.remove(*payment_id) {
                writes.push(StateWrite { table: Table::State, key: sealed_card_key(*payment_id), value: None });
            }
        }
        for event_id in &batch.seen {
            writes.push(StateWrite { table: Table::State, key: seen_key(*event_id), value: Some(Vec::new()) });
        }
        for (key, value) in std::mem::take(&mut batch.claims) {
            writes.push(StateWrite { table: Table::State, key, value });
        }
        if let Some(offset) = last_offset {
            writes.push(StateWrite {
                table: Table::Positions,
                key: offset_key(self.partition),
                value: Some((offset + 1).to_be_bytes().to_vec()),
            });
        }
        // A batch may record nothing and still start calls (a reversal sent
        // again after a failure changes no state): those start all the same.
        if !batch.events.is_empty() || !writes.is_empty() {
            self.write(std::mem::take(&mut batch.events), writes).await?;
        } else if let Some(ownership) = self.ownership.as_ref().filter(|_| !batch.effects.is_empty()) {
            // No commit to fence this owner: check it still owns the partition first.
            ownership.confirm(self.service.bus.as_ref()).await?;
        }
        if let Some(offset) = last_offset {
            self.service.bus.note_consumed(
                crate::topics::AUTHORIZATION_GROUP,
                PAYMENT_COMMANDS,
                self.partition,
                offset + 1,
            );
        }
        if self.cache.len() > self.service.config.cached_payments_max {
            self.cache.clear();
        }
        self.cache.extend(batch.records);
        for effect in batch.effects {
            // Handing over: calls under way finish their chains, but no timer
            // is set — the next owner's resume picks up what waits on one.
            if *self.stop.borrow() && matches!(effect, Effect::Wake { .. }) {
                continue;
            }
            if self.dispatch.admit(&effect) {
                self.start(effect);
            }
        }
        Ok(())
    }

    /// Make a batch's events and writes durable: on the changelog first (with
    /// it on: whoever owns the partition next has them), then in the local log.
    async fn write(&mut self, events: Vec<NewEvent>, writes: Vec<StateWrite>) -> Result<(), ActorError> {
        let mut request = AppendRequest { events, writes, ..Default::default() };
        if let Some(ownership) = &mut self.ownership {
            let now = self.service.clock.now().unix_ms();
            let Some(writes) = ownership.publish(self.service.bus.as_ref(), &request, now, &self.stop).await? else {
                // Stopping while the broker is away; the commit may be on the changelog, so
                // nothing more happens here: whoever takes the partition next replays it.
                return Err(ActorError::Stopped);
            };
            request.writes.extend(writes);
        }
        self.service.log.append(request).await?;
        Ok(())
    }

    fn provider(&self, name: &str) -> Option<Arc<dyn Connector>> {
        self.service.providers.iter().find(|p| p.name() == name).cloned()
    }

    /// Run one provider call in its own task; its result comes back as an input.
    fn start(&self, effect: Effect) {
        if let Effect::Wake { payment_id, delay_ms } = effect {
            // A timer is not a call under way: a hand-over does not wait for it.
            let tx = self.effects_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let _ = tx.send(EffectResult::Woken { payment_id }).await;
            });
            return;
        }
        let tx = InFlight::new(self.effects_tx.clone(), &self.in_flight);
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
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                tx.send(result).await;
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
            tx.send(result).await;
        });
    }
}

/// A started call's way back to its actor, counted as under way until its
/// result is sent (or the task is dropped).
struct InFlight {
    tx: mpsc::Sender<EffectResult>,
    count: Arc<AtomicUsize>,
}

impl InFlight {
    fn new(tx: mpsc::Sender<EffectResult>, count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight { tx, count: Arc::clone(count) }
    }

    async fn send(self, result: EffectResult) {
        let _ = self.tx.send(result).await;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}
