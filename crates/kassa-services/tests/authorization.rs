//! The authorization service over the real embedded bus and RocksDB logs,
//! with simulated acquirers: outcomes, failover, unknown outcomes, and
//! provider calls owed after capture/void/refund.

mod common;

use kassa_bus::{BusConfig, EmbeddedBus, TopicSpec};
use kassa_codec::Envelope;
use kassa_domain::routing::breaker::BreakerConfig;
use kassa_domain::*;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::{Connector, Fault, FaultMode, LedgerState, SimulatedAcquirer, SimulatorConfig};
use kassa_services::SystemClock;
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::messages::{COMMAND_REJECTED, CommandRejected, PaymentCommandMessage};
use kassa_services::routing::{RoutingEngine, RoutingSettings, StandInLimits, StandInSettings};
use kassa_services::seal::CardSeal;
use kassa_services::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH};
use kassa_services::vault::CardVault;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

struct World {
    _dir: tempfile::TempDir,
    bus: Arc<EmbeddedBus>,
    vault: Arc<CardVault>,
    sims: Vec<Arc<SimulatedAcquirer>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next_id: u128,
}

fn retry_open<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> T {
    for _ in 0..100 {
        match open() {
            Ok(value) => return value,
            Err(error) if error.to_string().contains("LOCK") => std::thread::sleep(Duration::from_millis(20)),
            Err(error) => panic!("open failed: {error}"),
        }
    }
    panic!("still locked after 2 s");
}

/// The card key this authorization service opens sealed cards with.
const CARD_KEY: [u8; 32] = [9; 32];

fn topics() -> Vec<TopicSpec> {
    vec![TopicSpec::new(PAYMENT_COMMANDS, 2), TopicSpec::new(PAYMENT_EVENTS, 2), TopicSpec::new(PROVIDER_HEALTH, 2)]
}

impl World {
    fn start(dir: tempfile::TempDir, sims: Vec<Arc<SimulatedAcquirer>>, vault: Arc<CardVault>) -> World {
        World::start_routed(dir, sims, vault, RoutingSettings::default())
    }

    fn start_routed(
        dir: tempfile::TempDir,
        sims: Vec<Arc<SimulatedAcquirer>>,
        vault: Arc<CardVault>,
        settings: RoutingSettings,
    ) -> World {
        let config = AuthorizationConfig { provider_timeout_ms: 300, retry_backoff_ms: 20, ..Default::default() };
        World::start_configured(dir, sims, vault, settings, config)
    }

    fn start_configured(
        dir: tempfile::TempDir,
        sims: Vec<Arc<SimulatedAcquirer>>,
        vault: Arc<CardVault>,
        settings: RoutingSettings,
        config: AuthorizationConfig,
    ) -> World {
        World::start_clocked(dir, sims, vault, settings, config, Arc::new(SystemClock))
    }

    fn start_clocked(
        dir: tempfile::TempDir,
        sims: Vec<Arc<SimulatedAcquirer>>,
        vault: Arc<CardVault>,
        settings: RoutingSettings,
        config: AuthorizationConfig,
        clock: Arc<dyn kassa_services::runtime::Clock>,
    ) -> World {
        // After a stop, aborted read-ahead tasks release their handle on the
        // bus a moment later: retry the open (bounded) while its lock is held.
        let bus = Arc::new(retry_open(|| EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics()))));
        let log = Arc::new(retry_open(|| EventLog::open(dir.path().join("authorization"), LogConfig::default())));
        let providers: Vec<Arc<dyn Connector>> = sims.iter().map(|s| Arc::clone(s) as Arc<dyn Connector>).collect();
        let names: Vec<String> = sims.iter().map(|s| s.name().to_owned()).collect();
        let routing = Arc::new(RoutingEngine::new(settings, &names).unwrap());
        let service = Arc::new(
            AuthorizationService::new(log, bus.clone(), providers, Arc::clone(&vault), clock, config)
                .with_routing(routing)
                .with_card_seal(Arc::new(CardSeal::new(&CARD_KEY).unwrap())),
        );
        let (stop, stop_rx) = watch::channel(false);
        let tasks = service.spawn(stop_rx).unwrap();
        World { _dir: dir, bus, vault, sims, stop, tasks, next_id: 1 }
    }

    fn new() -> World {
        World::routed(RoutingSettings::default())
    }

    fn routed(settings: RoutingSettings) -> World {
        World::start_routed(tempfile::tempdir().unwrap(), sims(), Arc::new(CardVault::new(10_000)), settings)
    }

    async fn stop(self) -> (tempfile::TempDir, Vec<Arc<SimulatedAcquirer>>, Arc<CardVault>) {
        self.stop.send(true).unwrap();
        for task in self.tasks {
            let _ = task.await;
        }
        (self._dir, self.sims, self.vault)
    }

    async fn send(&mut self, message: PaymentCommandMessage) -> u128 {
        self.next_id += 1;
        let event_id = self.next_id << 64;
        common::send_command(self.bus.as_ref(), event_id, message).await;
        event_id
    }

    async fn pay(&mut self, number: &str, amount: i64, capture: bool) -> PaymentId {
        self.next_id += 1;
        let payment_id = PaymentId::from_parts(1_795_651_200_000, self.next_id);
        let card = CardDetails::parse(number, 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        let summary = card.summarize(b"k");
        self.vault.put(payment_id, card).unwrap();
        self.request(payment_id, summary, amount, capture).await
    }

    /// As ingest in another process pays: the card only sealed, before the request; nothing in this vault.
    async fn pay_sealed(&mut self, number: &str, amount: i64, seal: &CardSeal) -> PaymentId {
        self.next_id += 1;
        let payment_id = PaymentId::from_parts(1_795_651_200_000, self.next_id);
        let card = CardDetails::parse(number, 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        let sealed = seal.seal(payment_id, &card);
        self.send(PaymentCommandMessage::CardSealed { payment_id, sealed }).await;
        self.request(payment_id, card.summarize(b"k"), amount, true).await
    }

    async fn request(&mut self, payment_id: PaymentId, summary: CardSummary, amount: i64, capture: bool) -> PaymentId {
        self.send(PaymentCommandMessage::Requested(PaymentRequested {
            payment_id,
            merchant_id: MerchantId::from_u128(1),
            amount: Money::new(amount, Currency::from_code("EUR").unwrap()),
            card: summary,
            capture,
            reference: None,
            metadata: BTreeMap::new(),
            requested_at: Timestamp(1_795_651_200_000),
        }))
        .await;
        payment_id
    }

    /// As ingest pays with an `Idempotency-Key`: the sealed card, the key's
    /// claim (fingerprint `fingerprint`), then the request.
    async fn pay_claimed(&mut self, payment_id: PaymentId, key_hash: [u8; 32], fingerprint: &str, seal: &CardSeal) {
        let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        self.send(PaymentCommandMessage::CardSealed { payment_id, sealed: seal.seal(payment_id, &card) }).await;
        self.send(PaymentCommandMessage::ClaimIdempotencyKey {
            payment_id,
            merchant_id: MerchantId::from_u128(1),
            key_hash,
            fingerprint: fingerprint.into(),
        })
        .await;
        self.request(payment_id, card.summarize(b"k"), 1500, true).await;
    }

    /// Every event published on payments.events, per payment.
    async fn published(&self) -> HashMap<PaymentId, Vec<Envelope>> {
        common::published(self.bus.as_ref(), 2).await
    }

    async fn state(&self, payment_id: PaymentId) -> PaymentState {
        common::state_of(&self.published().await.remove(&payment_id).unwrap_or_default())
    }

    /// Wait until the published state satisfies `done` (bounded: 10 s).
    async fn until(&self, payment_id: PaymentId, done: impl Fn(&PaymentState) -> bool) -> PaymentState {
        for _ in 0..1000 {
            let state = self.state(payment_id).await;
            if done(&state) {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("payment {payment_id} did not get there: {:?}", self.state(payment_id).await);
    }

    fn held(&self, payment_id: PaymentId) -> usize {
        self.sims
            .iter()
            .flat_map(|s| s.ledger())
            .filter(|e| e.payment_id == payment_id && e.state != LedgerState::Reversed)
            .count()
    }
}

/// `n` payment ids on one partition of payments.commands (2 partitions here), from `first` on.
fn ids_on_partition(first: u128, partition: u32, n: usize) -> Vec<PaymentId> {
    (first..)
        .map(|n| PaymentId::from_parts(1_795_651_200_000, n))
        .filter(|id| kassa_bus::partition_for(&id.as_u128().to_be_bytes(), 2) == partition)
        .take(n)
        .collect()
}

fn sims() -> Vec<Arc<SimulatedAcquirer>> {
    ["acq-alpha", "acq-beta", "acq-gamma"]
        .iter()
        .map(|n| {
            Arc::new(SimulatedAcquirer::new(*n, SimulatorConfig { latency_ms_min: 1, latency_ms_max: 5, seed: 7 }))
        })
        .collect()
}

fn settled_outcome(state: &PaymentState) -> bool {
    !matches!(state.stage, Stage::New | Stage::Requested | Stage::Authorizing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_declines_and_failover() {
    let mut world = World::new();
    let approved = world.pay("4242424242424242", 1999, true).await;
    let hard = world.pay("4000000000000002", 1999, true).await;
    let soft = world.pay("4000000000009995", 1999, true).await;
    let error = world.pay("4000000000000119", 1999, true).await;

    let state = world.until(approved, settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
    assert_eq!(state.provider.as_deref(), Some("acq-alpha"));
    let state = world.until(hard, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("do_not_honor"));
    assert_eq!(state.attempts.len(), 1, "a hard decline is never retried elsewhere");
    let state = world.until(soft, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("insufficient_funds"));
    assert_eq!(state.attempts.len(), 1, "insufficient funds is not retried elsewhere");
    let state = world.until(error, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("providers_unavailable"));
    assert_eq!(state.attempts.len(), 3, "a processing error fails over to every provider");

    // The capture reached the provider.
    world.until(approved, |_| true).await;
    for _ in 0..500 {
        if world.sims[0].ledger().iter().any(|e| e.payment_id == approved && e.state == LedgerState::Captured) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(world.sims[0].ledger().iter().any(|e| e.payment_id == approved && e.state == LedgerState::Captured));
    assert!(world.vault.is_empty(), "cards are forgotten once authorized or declined");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_is_routed_around() {
    let mut world = World::new();
    world.sims[0].set_fault(Some(Fault::always(FaultMode::Down)));
    let payment = world.pay("4242424242424242", 500, true).await;
    let state = world.until(payment, settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
    assert_eq!(state.provider.as_deref(), Some("acq-beta"));
    assert_eq!(world.held(payment), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_accept_is_resolved_by_inquiry_never_a_second_charge() {
    let mut world = World::new();
    world.sims[0].set_fault(Some(Fault::always(FaultMode::TimeoutAfterAccept)));
    let payments = [world.pay("4242424242424242", 700, true).await, world.pay("5555555555554444", 800, false).await];
    // The provider recovers while the outcomes are unknown; inquiries find the authorizations.
    tokio::time::sleep(Duration::from_millis(400)).await;
    world.sims[0].set_fault(None);
    for payment in payments {
        let state = world.until(payment, settled_outcome).await;
        assert!(matches!(state.status(), Some(PaymentStatus::Captured | PaymentStatus::Authorized)), "{state:?}");
        assert_eq!(state.provider.as_deref(), Some("acq-alpha"), "the first provider's authorization is used");
        assert_eq!(world.held(payment), 1, "exactly one authorization stands");
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_void_refund_and_refusals() {
    let mut world = World::new();
    let manual = world.pay("4242424242424242", 1000, false).await;
    world.until(manual, |s| s.stage == Stage::Authorized).await;
    world
        .send(PaymentCommandMessage::Capture {
            payment_id: manual,
            capture_id: CaptureId::from_u128(1),
            amount_minor: Some(600),
        })
        .await;
    world.until(manual, |s| s.captured_minor == 600).await;
    world
        .send(PaymentCommandMessage::Refund {
            payment_id: manual,
            refund_id: RefundId::from_u128(2),
            amount_minor: None,
        })
        .await;
    let state = world.until(manual, |s| s.refunded_minor == 600).await;
    assert_eq!(state.status(), Some(PaymentStatus::Refunded));
    // The owed provider calls arrive in order: the capture before the refund of it.
    let mut provider_view = (0, 0);
    for _ in 0..500 {
        if let Some(entry) = world.sims[0].ledger().into_iter().find(|e| e.payment_id == manual) {
            provider_view = (entry.captured_minor, entry.refunded_minor);
            if provider_view == (600, 600) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(provider_view, (600, 600), "the provider captured and refunded what Kassa recorded");
    // Refunding what is refunded in full is refused (a conflict with its state), and the
    // refusal is published for the caller.
    let command = world
        .send(PaymentCommandMessage::Refund {
            payment_id: manual,
            refund_id: RefundId::from_u128(3),
            amount_minor: Some(1),
        })
        .await;
    let mut rejection = None;
    for _ in 0..500 {
        let events = world.published().await.remove(&manual).unwrap_or_default();
        rejection = events
            .iter()
            .find(|e| e.event_type == COMMAND_REJECTED)
            .map(|e| CommandRejected::decode(&e.payload).unwrap());
        if rejection.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rejection = rejection.expect("the refusal is published");
    assert_eq!(rejection.command_id, command);
    assert_eq!(rejection.code, "payment_state_conflict");
    assert!(rejection.message.contains("nothing is left to refund"), "{}", rejection.message);

    let voided = world.pay("4242424242424242", 300, false).await;
    world.until(voided, |s| s.stage == Stage::Authorized).await;
    world.send(PaymentCommandMessage::Void { payment_id: voided }).await;
    world.until(voided, |s| s.stage == Stage::Voided).await;
    for _ in 0..500 {
        if world.held(voided) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(world.held(voided), 0, "the void released the authorization at the provider");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_and_duplicates_are_dropped() {
    let mut world = World::new();
    let first = world.pay("4242424242424242", 100, true).await;
    world.until(first, settled_outcome).await;
    let before = world.published().await[&first].len();
    let (dir, sims, vault) = world.stop().await;

    let mut world = World::start(dir, sims, vault);
    world.next_id = 1000;
    // A re-published request (the ingest relay crashed before storing its position) changes nothing.
    let state = world.state(first).await;
    let request = state.request.clone().unwrap();
    world.send(PaymentCommandMessage::Requested(request)).await;
    let second = world.pay("5555555555554444", 200, true).await;
    world.until(second, settled_outcome).await;
    assert_eq!(world.published().await[&first].len(), before, "no new events for the duplicate");
    assert_eq!(world.held(first), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_and_reconciliation_are_recorded_once() {
    let mut world = World::new();
    let payment = world.pay("4242424242424242", 1000, true).await;
    world.until(payment, |s| s.stage == Stage::Captured).await;
    world.send(PaymentCommandMessage::RecordSettlement { payment_id: payment, batch_id: BatchId::from_u128(7) }).await;
    let state = world.until(payment, |s| s.stage == Stage::Settled).await;
    assert_eq!(state.batch_id, Some(BatchId::from_u128(7)));
    assert_eq!(state.status(), Some(PaymentStatus::Captured), "settled is not a status a merchant sees");
    let twice = world
        .send(PaymentCommandMessage::RecordSettlement { payment_id: payment, batch_id: BatchId::from_u128(8) })
        .await;
    world
        .send(PaymentCommandMessage::RecordReconciliation { payment_id: payment, report_id: ReportId::from_u128(9) })
        .await;
    let state = world.until(payment, |s| s.stage == Stage::Reconciled).await;
    assert_eq!(state.batch_id, Some(BatchId::from_u128(7)), "a payment is settled in one batch only");
    let events = world.published().await.remove(&payment).unwrap();
    let rejected: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == COMMAND_REJECTED)
        .map(|e| CommandRejected::decode(&e.payload).unwrap())
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].command_id, twice);
    world.stop().await;
}

/// Settlement and reconciliation record several payments in one command, all
/// of one partition. A payment of another partition named in it is left to
/// its own actor: this one skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_several_payments_records_those_of_its_partition() {
    let mut world = World::new();
    let mut payments = Vec::new();
    for _ in 0..6 {
        payments.push(world.pay("4242424242424242", 1000, true).await);
    }
    for payment in &payments {
        world.until(*payment, |s| s.stage == Stage::Captured).await;
    }
    let partition = |id: &PaymentId| kassa_bus::partition_for(&id.as_u128().to_be_bytes(), 2);
    let (same, other): (Vec<PaymentId>, Vec<PaymentId>) =
        payments.iter().partition(|id| partition(id) == partition(&payments[0]));
    assert!(same.len() >= 2 && !other.is_empty(), "pick other payment ids");
    let named = vec![same[0], same[1], other[0]];
    let batch_id = BatchId::from_u128(7);
    world.send(PaymentCommandMessage::RecordSettlements { payment_ids: named.clone(), batch_id }).await;
    for payment in &named[..2] {
        let state = world.until(*payment, |s| s.stage == Stage::Settled).await;
        assert_eq!(state.batch_id, Some(batch_id));
    }
    let report_id = ReportId::from_u128(9);
    world.send(PaymentCommandMessage::RecordReconciliations { payment_ids: named[..2].to_vec(), report_id }).await;
    for payment in &named[..2] {
        world.until(*payment, |s| s.stage == Stage::Reconciled).await;
    }
    assert_eq!(world.state(named[2]).await.stage, Stage::Captured, "another partition's payment was recorded");
    world.stop().await;
}

/// Settlement's and reconciliation's commands travel on different relays: a
/// reconciliation may come first. It is held, and recorded right after the
/// settlement — never refused for coming early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_that_overtakes_its_settlement_is_recorded_after_it() {
    let mut world = World::new();
    let payment = world.pay("4242424242424242", 1000, true).await;
    world.until(payment, |s| s.stage == Stage::Captured).await;
    let (batch_id, report_id) = (BatchId::from_u128(7), ReportId::from_u128(9));
    // Both on the payment's partition, in this order: the reconciliation is decided first.
    world.send(PaymentCommandMessage::RecordReconciliations { payment_ids: vec![payment], report_id }).await;
    world.send(PaymentCommandMessage::RecordSettlements { payment_ids: vec![payment], batch_id }).await;
    let state = world.until(payment, |s| s.stage == Stage::Reconciled).await;
    assert_eq!((state.batch_id, state.report_id), (Some(batch_id), Some(report_id)));
    let events = world.published().await.remove(&payment).unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert!(!types.contains(&COMMAND_REJECTED), "{types:?}");
    let settled = types.iter().position(|t| *t == "payment.settled").unwrap();
    assert_eq!(types[settled + 1], "payment.reconciled", "{types:?}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_the_provider_never_saw_is_reversed_before_failing_over() {
    let mut world = World::new();
    world.sims[0].set_fault(Some(Fault::slow(5000)));
    let payment = world.pay("4242424242424242", 900, true).await;
    // Inquiries at a slow provider time out too; once it answers again, it has nothing:
    // the attempt is reversed there (a late arrival would be refused), then beta is tried.
    tokio::time::sleep(Duration::from_millis(700)).await;
    world.sims[0].set_fault(None);
    let state = world.until(payment, settled_outcome).await;
    assert_eq!(state.provider.as_deref(), Some("acq-beta"), "{state:?}");
    assert_eq!(state.attempts.len(), 2);
    assert_eq!(world.held(payment), 1);
    assert!(world.sims[0].ledger().is_empty());
    world.stop().await;
}

/// Inquiries and then a reversal time out while the provider stays slow. The
/// reversal is sent again, alone (it changes nothing Kassa records), until the
/// provider answers; then the payment fails over as above. It never waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_that_times_out_is_sent_again_until_the_provider_answers() {
    let mut world = World::new();
    world.sims[0].set_fault(Some(Fault::slow(5000)));
    let payment = world.pay("4242424242424242", 901, true).await;
    // 300 ms for the call, three inquiries of 300 ms, then reversals of 300 ms each.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert!(world.sims[0].ledger().is_empty());
    world.sims[0].set_fault(None);
    let state = world.until(payment, settled_outcome).await;
    assert_eq!(state.provider.as_deref(), Some("acq-beta"), "{state:?}");
    assert_eq!(world.held(payment), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_issuer_is_retried_elsewhere_unless_the_advice_code_forbids_it() {
    let mut world = World::new();
    world.sims[0].set_fault(Some(Fault::always(FaultMode::SoftDeclineBurst)));
    let retried = world.pay("4242424242424242", 1999, true).await;
    let state = world.until(retried, settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured), "{state:?}");
    assert_eq!(state.provider.as_deref(), Some("acq-beta"), "issuer_unavailable at alpha: beta may reach the issuer");
    assert_eq!(state.attempts.len(), 2);
    assert_eq!(world.held(retried), 1);
    world.sims[0].set_fault(None);

    // Mastercard merchant advice code 03 (do not retry) makes the same decline final.
    let forbidden = world.pay("5105105105105100", 1999, true).await;
    let state = world.until(forbidden, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("issuer_unavailable"));
    assert_eq!(state.attempts.len(), 1, "MAC 03: never retried");
    world.stop().await;
}

/// Stand-in up to 50.00 per payment and 60.00 in all; breakers that open at
/// once and probe again soon, so the tests are quick.
fn stand_in_settings() -> RoutingSettings {
    RoutingSettings {
        stand_in: StandInSettings {
            default: Some(StandInLimits { per_payment_max_minor: 5_000, exposure_max_minor: 6_000 }),
            ..StandInSettings::default()
        },
        breaker: BreakerConfig {
            min_calls: 1,
            open_ms: 200,
            probes_to_close: 1,
            ramp_ms: 200,
            ..BreakerConfig::default()
        },
        ..RoutingSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_in_answers_while_every_provider_is_down_and_forwards_when_one_recovers() {
    let settings = stand_in_settings();
    let mut world = World::routed(settings);
    for sim in &world.sims {
        sim.set_fault(Some(Fault::always(FaultMode::Down)));
    }
    // The first payment opens the breakers (all three refuse): providers unavailable.
    let first = world.pay("4242424242424242", 1000, true).await;
    let state = world.until(first, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("providers_unavailable"), "{state:?}");
    // Breakers open: within limits, stand-in authorizes; beyond the exposure, it does not.
    let stood_in = world.pay("4242424242424242", 4_000, true).await;
    let state = world.until(stood_in, |s| !matches!(s.stage, Stage::New | Stage::Requested)).await;
    assert!(state.stand_in_pending(), "{state:?}");
    assert_eq!((state.status(), state.captured_minor), (Some(PaymentStatus::Authorized), 0));
    let over = world.pay("4242424242424242", 4_000, true).await;
    let state = world.until(over, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("providers_unavailable"), "exposure 8,000 > 6,000: {state:?}");
    assert_eq!(world.held(stood_in), 0, "nothing held anywhere yet");

    // A provider recovers: the stand-in is forwarded, confirmed, then captured.
    world.sims[1].set_fault(None);
    let state = world.until(stood_in, |s| s.status() == Some(PaymentStatus::Captured)).await;
    assert_eq!(state.provider.as_deref(), Some("acq-beta"));
    assert_eq!(world.held(stood_in), 1, "exactly one authorization stands");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_sealed_by_ingest_in_another_process_is_opened_and_authorized() {
    let mut world = World::new();
    let sealed = world.pay_sealed("4242424242424242", 1200, &CardSeal::new(&CARD_KEY).unwrap()).await;
    let state = world.until(sealed, settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured), "{state:?}");
    assert_eq!(world.held(sealed), 1);
    // Sealed with another key: it does not open, and the payment is declined for want of card data.
    let unopened = world.pay_sealed("4242424242424242", 1300, &CardSeal::new(&[1; 32]).unwrap()).await;
    let state = world.until(unopened, settled_outcome).await;
    assert_eq!(state.decline_code.as_deref(), Some("card_data_unavailable"), "{state:?}");
    assert_eq!(world.held(unopened), 0);
    assert!(world.vault.is_empty(), "no card kept once its payment has an outcome");
    world.stop().await;
}

/// A request and its card are told again by their payment, with no `seen/`
/// marker: delivered again once the payment is decided (a relay that crashed
/// before storing its position publishes them again), they change nothing, and
/// the card is neither held nor stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_card_delivered_again_after_the_outcome_change_nothing() {
    let mut world = World::new();
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    let paid = world.pay_sealed("4242424242424242", 1200, &seal).await;
    world.until(paid, settled_outcome).await;
    let declined = world.pay_sealed("4000000000000002", 1300, &seal).await;
    world.until(declined, settled_outcome).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = world.published().await;
    let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
    for payment_id in [paid, declined] {
        let request = world.state(payment_id).await.request.clone().unwrap();
        world.send(PaymentCommandMessage::CardSealed { payment_id, sealed: seal.seal(payment_id, &card) }).await;
        world.send(PaymentCommandMessage::Requested(request)).await;
    }
    // A new payment after them: once it is decided, the two deliveries have been read.
    let after = world.pay_sealed("5555555555554444", 1400, &seal).await;
    world.until(after, settled_outcome).await;
    let published = world.published().await;
    for payment_id in [paid, declined] {
        assert_eq!(published[&payment_id].len(), before[&payment_id].len(), "no new events for {payment_id}");
    }
    assert_eq!((world.held(paid), world.held(declined)), (1, 0));
    assert!(world.vault.is_empty(), "no card held again once its payment has an outcome");
    let (dir, _, _) = world.stop().await;
    let log = retry_open(|| EventLog::open(dir.path().join("authorization"), LogConfig::default()));
    for payment_id in [paid, declined, after] {
        let stored =
            log.get(kassa_eventlog::Table::State, &kassa_services::consume::id_key("card/", payment_id.as_u128()));
        assert!(stored.unwrap().is_none(), "{payment_id}'s sealed card is stored again");
    }
}

/// A command refused before its payment's request came (a capture of a
/// payment not requested yet) leaves a record on the payment: its request and
/// card, coming next, are still the first ones, and the payment is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_refused_command_for_its_payment_is_still_decided() {
    let mut world = World::new();
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    world.next_id += 1;
    let payment_id = PaymentId::from_parts(1_795_651_200_000, world.next_id);
    let capture = world
        .send(PaymentCommandMessage::Capture { payment_id, capture_id: CaptureId::from_u128(7), amount_minor: None })
        .await;
    for _ in 0..500 {
        if world.published().await.contains_key(&payment_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = world.published().await.remove(&payment_id).unwrap_or_default();
    assert_eq!(refused.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), [COMMAND_REJECTED]);
    assert_eq!(CommandRejected::decode(&refused[0].payload).unwrap().command_id, capture);
    let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
    world.send(PaymentCommandMessage::CardSealed { payment_id, sealed: seal.seal(payment_id, &card) }).await;
    world.request(payment_id, card.summarize(b"k"), 1500, true).await;
    let state = world.until(payment_id, settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured), "{state:?}");
    assert_eq!(world.held(payment_id), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_card_still_needed_survives_a_restart_of_the_authorizer() {
    let settings = stand_in_settings();
    let mut world = World::routed(settings.clone());
    for sim in &world.sims {
        sim.set_fault(Some(Fault::always(FaultMode::Down)));
    }
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    let first = world.pay_sealed("4242424242424242", 1000, &seal).await;
    world.until(first, settled_outcome).await; // opens the breakers
    // Stood in while every provider is down: its card is needed for the forward to come.
    let stood_in = world.pay_sealed("4242424242424242", 4_000, &seal).await;
    let state = world.until(stood_in, |s| !matches!(s.stage, Stage::New | Stage::Requested)).await;
    assert!(state.stand_in_pending(), "{state:?}");

    // The authorizer restarts as a new process would: an empty vault.
    let (dir, sims, _vault) = world.stop().await;
    let mut world = World::start_routed(dir, sims, Arc::new(CardVault::new(10_000)), settings);
    world.next_id = 1000;
    world.sims[1].set_fault(None);
    // The card kept sealed in its log is opened again, and the forward authorizes.
    let state = world.until(stood_in, |s| s.status() == Some(PaymentStatus::Captured)).await;
    assert_eq!(state.provider.as_deref(), Some("acq-beta"), "{state:?}");
    assert_eq!(world.held(stood_in), 1, "exactly one authorization stands");
    assert!(world.vault.is_empty(), "no card kept once its payment has an outcome");
    world.stop().await;
}

/// Three requests with one `Idempotency-Key`, as three ingest instances would
/// send them (each claim just before its request, on the key's partition): the
/// first is charged; the second (same request) and third (another request) are
/// answered `payment.duplicate_request` and never reach a provider, and the
/// second's sealed card leaves the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_claimed_three_times_charges_once() {
    use kassa_services::messages::{DUPLICATE_REQUEST, DuplicateRequest};
    let mut world = World::new();
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    // Three payment ids on one partition of payments.commands (2 partitions here).
    let partition_of = |id: PaymentId| kassa_bus::partition_for(&id.as_u128().to_be_bytes(), 2);
    let ids: Vec<PaymentId> = (100..)
        .map(|n| PaymentId::from_parts(1_795_651_200_000, n))
        .filter(|id| partition_of(*id) == 0)
        .take(3)
        .collect();
    let claim = |payment_id, fingerprint: &str| PaymentCommandMessage::ClaimIdempotencyKey {
        payment_id,
        merchant_id: MerchantId::from_u128(1),
        key_hash: [3; 32],
        fingerprint: fingerprint.into(),
    };
    let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
    for (payment_id, fingerprint) in ids.iter().zip(["same", "same", "other"]) {
        world
            .send(PaymentCommandMessage::CardSealed { payment_id: *payment_id, sealed: seal.seal(*payment_id, &card) })
            .await;
        world.send(claim(*payment_id, fingerprint)).await;
        world.request(*payment_id, card.summarize(b"k"), 2500, true).await;
    }
    let state = world.until(ids[0], settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
    let mut published = HashMap::new();
    for _ in 0..500 {
        published = world.published().await;
        if ids[1..].iter().all(|id| published.contains_key(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (payment_id, same_request) in [(ids[1], true), (ids[2], false)] {
        let events = published.get(&payment_id).cloned().unwrap_or_default();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, [DUPLICATE_REQUEST], "{payment_id}");
        let duplicate = DuplicateRequest::decode(&events[0].payload).unwrap();
        assert_eq!(duplicate, DuplicateRequest { original: ids[0], same_request });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((world.held(ids[0]), world.held(ids[1]), world.held(ids[2])), (1, 0, 0));

    // The same claim delivered again changes nothing; the card of a duplicate is gone from the log.
    world.send(claim(ids[1], "same")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(world.published().await.get(&ids[1]).map(Vec::len), Some(1));
    let (dir, _, _) = world.stop().await;
    let log = retry_open(|| EventLog::open(dir.path().join("authorization"), LogConfig::default()));
    let card_key = |id: PaymentId| kassa_services::consume::id_key("card/", id.as_u128());
    for duplicate in &ids[1..] {
        let stored = log.get(kassa_eventlog::Table::State, &card_key(*duplicate)).unwrap();
        assert!(stored.is_none(), "{duplicate}'s sealed card is still stored");
    }
}

/// Refunds made with `Idempotency-Key`s, as ingest instances send them (each
/// command's key claim just before it): the first command under a key holds
/// it; a different request under that key — which an instance that never saw
/// the key cannot tell — is refused `idempotency_key_reused` and never carried
/// out; the same request again changes nothing; another key is a refund of its own;
/// a key that made a payment on the partition is that request's, refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_key_reused_for_another_request_is_refused() {
    let mut world = World::new();
    let payment_id = world.pay("4242424242424242", 5000, true).await;
    let state = world.until(payment_id, settled_outcome).await;
    assert_eq!(state.status(), Some(PaymentStatus::Captured));
    let refund = |n: u128, amount: i64| PaymentCommandMessage::Refund {
        payment_id,
        refund_id: RefundId::from_u128(0xF00 + n),
        amount_minor: Some(amount),
    };
    let claim = |key: u8, fingerprint: &str, command_id: u128| PaymentCommandMessage::ClaimCommandKey {
        payment_id,
        merchant_id: MerchantId::from_u128(1),
        key_hash: [key; 32],
        fingerprint: fingerprint.into(),
        command_id,
    };
    let bus = Arc::clone(&world.bus);
    let keyed = |key: u8, fingerprint: &'static str, n: u128, amount: i64| {
        let bus = Arc::clone(&bus);
        let command_id = (0xC0DE << 64) | n;
        async move {
            common::send_command(bus.as_ref(), (0xC1A1 << 64) | n, claim(key, fingerprint, command_id)).await;
            common::send_command(bus.as_ref(), command_id, refund(n, amount)).await;
            command_id
        }
    };
    keyed(1, "first", 1, 1000).await;
    world.until(payment_id, |s| s.refunded_minor == 1000).await;
    let reused = keyed(1, "second", 2, 700).await;
    keyed(1, "first", 1, 1000).await; // the first request again
    keyed(2, "third", 3, 300).await;
    // A key that made a payment (its claim on this partition, which is the key's), reused
    // for a refund: refused too.
    let on_this_partition = |key: u8| {
        kassa_bus::partition_for(&[key; 32], 2) == kassa_bus::partition_for(&payment_id.as_u128().to_be_bytes(), 2)
    };
    let payment_key = (5..).find(|key| on_this_partition(*key)).unwrap();
    let made_a_payment = PaymentCommandMessage::ClaimIdempotencyKey {
        payment_id,
        merchant_id: MerchantId::from_u128(1),
        key_hash: [payment_key; 32],
        fingerprint: "the payment".into(),
    };
    common::send_command(world.bus.as_ref(), 0xC1A1_0000 << 64, made_a_payment).await;
    let reused_payment_key = keyed(payment_key, "fourth", 4, 100).await;
    // A payment claim of a key whose partition is the other one (as a copy left in this log by
    // a partition owned before would be) is not this partition's to go by: carried out.
    let elsewhere = (5..).find(|key| !on_this_partition(*key)).unwrap();
    let stale = PaymentCommandMessage::ClaimIdempotencyKey {
        payment_id,
        merchant_id: MerchantId::from_u128(1),
        key_hash: [elsewhere; 32],
        fingerprint: "another partition's payment".into(),
    };
    common::send_command(world.bus.as_ref(), 0xC1A1_0001 << 64, stale).await;
    keyed(elsewhere, "fifth", 5, 50).await;
    let state = world.until(payment_id, |s| s.refunded_minor == 1350).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = world.published().await.remove(&payment_id).unwrap_or_default();
    let rejected: Vec<CommandRejected> = events
        .iter()
        .filter(|e| e.event_type == COMMAND_REJECTED)
        .map(|e| CommandRejected::decode(&e.payload).unwrap())
        .collect();
    let refused: Vec<(u128, &str)> = rejected.iter().map(|r| (r.command_id, r.code.as_str())).collect();
    assert_eq!(refused, [(reused, "idempotency_key_reused"), (reused_payment_key, "idempotency_key_reused")]);
    assert_eq!(common::state_of(&events).refunded_minor, 1350, "{state:?}");
    let refunds = events.iter().filter(|e| e.event_type == "payment.refunded").count();
    assert_eq!(refunds, 3);
    world.stop().await;
}

/// A wall clock that can be moved ahead.
#[derive(Debug, Default)]
struct JumpClock(std::sync::atomic::AtomicI64);

impl kassa_services::runtime::Clock for JumpClock {
    fn now(&self) -> Timestamp {
        let Timestamp(wall) = kassa_services::runtime::Clock::now(&SystemClock);
        Timestamp(wall + self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// The wall clock jumps two days ahead after a key was claimed: the claim is
/// not dropped for it (claims are stamped and aged by time this process
/// measured), so the same request again is still the first payment, not a
/// second charge; once it has really been kept its time, it is dropped. (The
/// keep time leaves 2.5 s of margin past the passes after the jump.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jumping_ahead_drops_no_idempotency_claim() {
    let config = AuthorizationConfig {
        provider_timeout_ms: 300,
        retry_backoff_ms: 20,
        claim_keep_ms: 3_000,
        claim_prune_interval_ms: 50,
        ..Default::default()
    };
    let clock = Arc::new(JumpClock::default());
    let vault = Arc::new(CardVault::new(10_000));
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::start_clocked(dir, sims(), vault, RoutingSettings::default(), config, clock.clone());
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    let ids = ids_on_partition(300, 1, 3);
    for (round, payment_id) in ids.iter().enumerate() {
        world.pay_claimed(*payment_id, [6; 32], "same", &seal).await;
        match round {
            0 => {
                let state = world.until(*payment_id, settled_outcome).await;
                assert_eq!(state.status(), Some(PaymentStatus::Captured));
                clock.0.store(2 * 86_400_000, std::sync::atomic::Ordering::SeqCst);
                // Several prune passes with the wall clock two days on.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            1 => {
                // Past the keep time, really: the claim goes, and the key with it.
                tokio::time::sleep(Duration::from_millis(3_000)).await;
            }
            _ => {
                let state = world.until(*payment_id, settled_outcome).await;
                assert_eq!(state.status(), Some(PaymentStatus::Captured), "a payment of its own after the keep time");
            }
        }
    }
    let mut published = HashMap::new();
    for _ in 0..500 {
        published = world.published().await;
        if published.contains_key(&ids[1]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let types: Vec<&str> = published[&ids[1]].iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, [kassa_services::messages::DUPLICATE_REQUEST]);
    assert_eq!((world.held(ids[0]), world.held(ids[1])), (1, 0), "charged twice");
    world.stop().await;
}

/// A claim is kept `claim_keep_ms`, then dropped (with its time index) in a
/// commit of its own: the key is free again, and a request made with it is a
/// new payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_claim_is_dropped_after_its_keep_time() {
    let config = AuthorizationConfig {
        provider_timeout_ms: 300,
        retry_backoff_ms: 20,
        claim_keep_ms: 300,
        claim_prune_interval_ms: 50,
        ..Default::default()
    };
    let vault = Arc::new(CardVault::new(10_000));
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::start_configured(dir, sims(), vault, RoutingSettings::default(), config);
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    let ids = ids_on_partition(200, 1, 2);
    for (round, payment_id) in ids.iter().enumerate() {
        world.pay_claimed(*payment_id, [4; 32], "same", &seal).await;
        let state = world.until(*payment_id, settled_outcome).await;
        assert_eq!(state.status(), Some(PaymentStatus::Captured), "round {round}");
        // Past the keep time and a few prune passes.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(
        (world.held(ids[0]), world.held(ids[1])),
        (1, 1),
        "the second request with the key, after its keep time, is a payment of its own"
    );
    let (dir, _, _) = world.stop().await;
    let log = retry_open(|| EventLog::open(dir.path().join("authorization"), LogConfig::default()));
    let left = log.scan(kassa_eventlog::Table::State, b"idempotency").unwrap();
    assert!(left.is_empty(), "claims left after their keep time: {}", left.len());
}
