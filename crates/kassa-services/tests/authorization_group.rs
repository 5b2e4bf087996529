//! Several authorization instances sharing `payments.commands` through a
//! consumer group, over the real embedded bus (its in-process group
//! coordinator) and RocksDB logs: a second instance joins mid-load, the
//! partitions move with their state through `authorization.changelog`, and
//! no payment is lost, decided twice or authorized twice. Then a log rebuilt
//! from the changelog alone equals what the owners hold.

mod common;

use kassa_bus::{Bus, BusConfig, EmbeddedBus, TopicSpec, partition_for};
use kassa_domain::*;
use kassa_eventlog::{AppendRequest, EventLog, LogConfig, NewEvent, StateWrite, Table};
use kassa_providers::{Connector, LedgerState, SimulatedAcquirer, SimulatorConfig};
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::changelog;
use kassa_services::messages::PaymentCommandMessage;
use kassa_services::payment_key;
use kassa_services::seal::CardSeal;
use kassa_services::topics::{AUTHORIZATION_CHANGELOG, PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH};
use kassa_services::vault::CardVault;
use kassa_services::{SystemClock, routing::RoutingEngine, routing::RoutingSettings};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const PARTITIONS: u32 = 4;
const CARD_KEY: [u8; 32] = [5; 32];

fn topics() -> Vec<TopicSpec> {
    [PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH, AUTHORIZATION_CHANGELOG]
        .iter()
        .map(|t| TopicSpec::new(*t, PARTITIONS))
        .collect()
}

struct Instance {
    log: Arc<EventLog>,
    vault: Arc<CardVault>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start(dir: &std::path::Path, name: &str, bus: &Arc<EmbeddedBus>, sims: &[Arc<SimulatedAcquirer>]) -> Instance {
    let log = Arc::new(EventLog::open(dir.join(name), LogConfig::default()).unwrap());
    // Each instance has its own memory: cards reach it sealed, through the bus or the changelog.
    let vault = Arc::new(CardVault::new(10_000));
    let providers: Vec<Arc<dyn Connector>> = sims.iter().map(|s| Arc::clone(s) as Arc<dyn Connector>).collect();
    let names: Vec<String> = sims.iter().map(|s| s.name().to_owned()).collect();
    let config = AuthorizationConfig {
        provider_timeout_ms: 500,
        retry_backoff_ms: 20,
        changelog: true,
        handoff_wait_ms: 2_000,
        ..Default::default()
    };
    let service = Arc::new(
        AuthorizationService::new(
            Arc::clone(&log),
            bus.clone(),
            providers,
            Arc::clone(&vault),
            Arc::new(SystemClock),
            config,
        )
        .with_routing(Arc::new(RoutingEngine::new(RoutingSettings::default(), &names).unwrap()))
        .with_card_seal(Arc::new(CardSeal::new(&CARD_KEY).unwrap())),
    );
    let (stop, stop_rx) = watch::channel(false);
    let tasks = service.spawn(stop_rx).unwrap();
    Instance { log, vault, stop, tasks }
}

impl Instance {
    async fn stop(self) -> Arc<EventLog> {
        self.stop.send(true).unwrap();
        for task in self.tasks {
            let _ = task.await;
        }
        self.log
    }

    /// Payments with events in this instance's log.
    fn payments_decided(&self) -> usize {
        self.log.scan(Table::State, b"payment/").unwrap().len()
    }
}

fn payment_id_of(n: u64) -> PaymentId {
    PaymentId::from_parts(1_795_651_200_000 + n, u128::from(n) * 7919 + 13)
}

fn test_card() -> CardDetails {
    CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap()
}

/// Payment `n`'s first command, as ingest sends it: its card, sealed.
async fn send_card(bus: &EmbeddedBus, n: u64, seal: &CardSeal) -> PaymentId {
    let payment_id = payment_id_of(n);
    let sealed = seal.seal(payment_id, &test_card());
    common::send_command(bus, u128::from(n) << 64 | 1, PaymentCommandMessage::CardSealed { payment_id, sealed }).await;
    payment_id
}

/// Payment `n`'s second command: the request to authorize and capture it.
async fn send_request(bus: &EmbeddedBus, n: u64) {
    let request = PaymentRequested {
        payment_id: payment_id_of(n),
        merchant_id: MerchantId::from_u128(1),
        amount: Money::new(1000 + n as i64, Currency::from_code("EUR").unwrap()),
        card: test_card().summarize(b"k"),
        capture: true,
        reference: None,
        metadata: BTreeMap::new(),
        requested_at: Timestamp(1_795_651_200_000),
    };
    common::send_command(bus, u128::from(n) << 64 | 2, PaymentCommandMessage::Requested(request)).await;
}

async fn pay(bus: &EmbeddedBus, n: u64, seal: &CardSeal) -> PaymentId {
    let payment_id = send_card(bus, n, seal).await;
    send_request(bus, n).await;
    payment_id
}

/// Wait up to `seconds` for `ready`.
async fn wait_for(seconds: u64, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "waited {seconds} s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_authorizer_joins_mid_load_and_nothing_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics())).unwrap());
    let sims: Vec<Arc<SimulatedAcquirer>> = ["acq-alpha", "acq-beta", "acq-gamma"]
        .iter()
        .map(|n| {
            Arc::new(SimulatedAcquirer::new(*n, SimulatorConfig { latency_ms_min: 5, latency_ms_max: 30, seed: 3 }))
        })
        .collect();
    let seal = CardSeal::new(&CARD_KEY).unwrap();

    let first = start(dir.path(), "authorization-1", &bus, &sims);
    let mut payments = Vec::new();
    for n in 0..150 {
        payments.push(pay(&bus, n, &seal).await);
    }
    // The second instance joins while the first is busy: half the partitions move to it.
    let second = start(dir.path(), "authorization-2", &bus, &sims);
    for n in 150..300 {
        payments.push(pay(&bus, n, &seal).await);
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Every payment gets its outcome: authorized and captured (the test card approves).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = common::published(bus.as_ref(), PARTITIONS).await;
        let done = payments
            .iter()
            .filter(|p| events.get(p).is_some_and(|e| common::state_of(e).stage == Stage::Captured))
            .count();
        if done == payments.len() {
            break events;
        }
        if tokio::time::Instant::now() >= deadline {
            let stuck: Vec<_> = payments
                .iter()
                .map(|p| (p, events.get(p).map(|e| common::state_of(e)).unwrap_or_default()))
                .filter(|(_, state)| state.stage != Stage::Captured)
                .map(|(p, state)| format!("{p}: {:?} {:?}", state.stage, state.decline_code))
                .collect();
            panic!("only {done} of {} payments captured; the others: {stuck:?}", payments.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    for payment_id in &payments {
        let published = &events[payment_id];
        // One history: a sequence number never names two different events.
        let mut by_seq: HashMap<u64, u128> = HashMap::new();
        for envelope in published {
            let id = *by_seq.entry(envelope.stream_seq).or_insert(envelope.event_id);
            assert_eq!(id, envelope.event_id, "{payment_id}: seq {} names two events", envelope.stream_seq);
        }
        let state = common::state_of(published);
        assert_eq!(state.stage, Stage::Captured, "{payment_id}");
        // Authorized once, at one provider, across every acquirer's ledger.
        let held: Vec<_> = sims
            .iter()
            .flat_map(|s| s.ledger())
            .filter(|e| e.payment_id == *payment_id && e.state != LedgerState::Reversed)
            .collect();
        assert_eq!(held.len(), 1, "{payment_id} stands at {} providers", held.len());
        assert_eq!(held[0].captured_minor, state.captured_minor, "{payment_id}");
    }
    // The work split: each instance decided payments.
    let (decided_first, decided_second) = (first.payments_decided(), second.payments_decided());
    assert!(decided_second > 0, "the second instance took no partition");
    assert!(decided_first > 0);

    // Partitions moved with their state: payments the first instance started, the second holds too.
    let moved = payments
        .iter()
        .filter(|p| {
            let key = kassa_services::consume::id_key("payment/", p.as_u128());
            first.log.get(Table::State, &key).unwrap().is_some()
                && second.log.get(Table::State, &key).unwrap().is_some()
        })
        .count();
    assert!(moved > 0, "no payment moved between the instances");

    let first_log = first.stop().await;
    let second_log = second.stop().await;

    // Rebuild from the changelog alone: the same payment records as the partitions' last owners hold.
    let rebuilt = EventLog::open(dir.path().join("rebuilt"), LogConfig::default()).unwrap();
    for partition in 0..PARTITIONS {
        changelog::restore(&rebuilt, bus.as_ref(), AUTHORIZATION_CHANGELOG, partition).await.unwrap();
        // Restoring again finds nothing new.
        assert_eq!(
            changelog::restore(&rebuilt, bus.as_ref(), AUTHORIZATION_CHANGELOG, partition).await.unwrap().replayed,
            0
        );
    }
    // The range assignor: the first member (lower id) keeps the lower half.
    let owner = |payment_id: &PaymentId| {
        let partition = partition_for(&payment_key(payment_id.as_u128()), PARTITIONS);
        if partition < PARTITIONS / 2 { &first_log } else { &second_log }
    };
    let mut compared = 0;
    for payment_id in &payments {
        let key = kassa_services::consume::id_key("payment/", payment_id.as_u128());
        let expected = owner(payment_id).get(Table::State, &key).unwrap();
        assert!(expected.is_some(), "{payment_id}: its owner has no record");
        assert_eq!(rebuilt.get(Table::State, &key).unwrap(), expected, "{payment_id}: rebuilt record differs");
        let routing = kassa_services::authorization::routing_stream(*payment_id);
        let from_owner: Vec<_> = owner(payment_id)
            .read_stream(payment_id.as_u128(), 1, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        let from_rebuilt: Vec<_> =
            rebuilt.read_stream(payment_id.as_u128(), 1, 100).unwrap().into_iter().map(|e| e.event_id).collect();
        assert_eq!(from_rebuilt, from_owner, "{payment_id}: rebuilt stream differs");
        assert_eq!(
            rebuilt.read_stream(routing, 1, 100).unwrap().len(),
            owner(payment_id).read_stream(routing, 1, 100).unwrap().len()
        );
        compared += 1;
    }
    assert_eq!(compared, 300);
}

/// A card reaches the first owner of its partition, the partition moves, and
/// the request reaches the next owner: that owner opens the card the
/// changelog brought it, instead of declining the payment for want of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_that_came_before_its_partition_moved_is_still_used() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics())).unwrap());
    let sims: Vec<Arc<SimulatedAcquirer>> = ["acq-alpha", "acq-beta", "acq-gamma"]
        .iter()
        .map(|n| {
            Arc::new(SimulatedAcquirer::new(*n, SimulatorConfig { latency_ms_min: 1, latency_ms_max: 5, seed: 5 }))
        })
        .collect();
    let seal = CardSeal::new(&CARD_KEY).unwrap();
    let first = start(dir.path(), "authorization-1", &bus, &sims);

    // A payment of the upper half, which the second member will take.
    let n = (0..).find(|n| partition_for(&payment_key(payment_id_of(*n).as_u128()), PARTITIONS) >= PARTITIONS / 2);
    let n = n.unwrap();
    let partition = partition_for(&payment_key(payment_id_of(n).as_u128()), PARTITIONS);
    let payment_id = send_card(&bus, n, &seal).await;
    let card_key = kassa_services::consume::id_key("card/", payment_id.as_u128());
    wait_for(10, "the first owner to keep the sealed card", || {
        first.log.get(Table::State, &card_key).unwrap().is_some()
    })
    .await;

    let second = start(dir.path(), "authorization-2", &bus, &sims);
    let claimed = format!("{AUTHORIZATION_CHANGELOG}/{partition}/epoch").into_bytes();
    wait_for(10, "the second member to claim the partition", || {
        second.log.get(Table::Positions, &claimed).unwrap().is_some()
    })
    .await;
    assert!(!first.vault.contains(payment_id), "the first owner still holds a card of a partition it gave away");
    send_request(&bus, n).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let state = loop {
        let events = common::published(bus.as_ref(), PARTITIONS).await;
        let state = events.get(&payment_id).map(|e| common::state_of(e)).unwrap_or_default();
        if matches!(state.stage, Stage::Captured | Stage::Declined | Stage::Voided)
            || tokio::time::Instant::now() > deadline
        {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(state.stage, Stage::Captured, "{payment_id}: {state:?}");
    let record = kassa_services::consume::id_key("payment/", payment_id.as_u128());
    assert!(first.log.get(Table::State, &record).unwrap().is_none(), "the first owner decided the payment");
    first.stop().await;
    second.stop().await;
}

/// A commit that writes event `n` on stream 42 and sets key `k` to `n`.
fn commit(n: u8) -> AppendRequest {
    AppendRequest {
        events: vec![NewEvent {
            event_id: u128::from(n),
            event_type: "payment.test".into(),
            stream_id: 42,
            timestamp_ms: 0,
            causation_id: None,
            correlation_id: None,
            payload: vec![n],
        }],
        expected: Vec::new(),
        writes: vec![StateWrite { table: Table::State, key: b"k".to_vec(), value: Some(vec![n]) }],
        ..Default::default()
    }
}

#[tokio::test]
async fn an_owner_taken_over_is_fenced_and_its_late_commit_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let bus = EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics())).unwrap();
    let (_stop_tx, stop) = watch::channel(false);
    let open = |name: &str| EventLog::open(dir.path().join(name), LogConfig::default()).unwrap();
    let (first_log, second_log) = (open("first"), open("second"));

    let (mut first, _) =
        changelog::take(&first_log, &bus, AUTHORIZATION_CHANGELOG, 0, "first", &stop).await.unwrap().unwrap();
    assert_eq!(first.epoch, 1);
    assert!(first.publish(&bus, &commit(1), 0, &stop).await.unwrap().is_some());
    first.confirm(&bus).await.expect("nobody else wrote: still the owner");

    // The group gives the partition to another instance while the first still runs.
    let (mut second, restored) =
        changelog::take(&second_log, &bus, AUTHORIZATION_CHANGELOG, 0, "second", &stop).await.unwrap().unwrap();
    assert_eq!((second.epoch, restored.replayed), (2, 1));
    assert_eq!(second_log.get(Table::State, b"k").unwrap(), Some(vec![1]));

    // Before calls that follow from a batch writing nothing, the first checks its hold: taken over.
    first.confirm(&bus).await.expect_err("the first owner confirmed after a takeover");
    second.confirm(&bus).await.expect("the new owner holds the partition");
    // The first's next commit lands after the claim: it learns it was taken over, and must not act on it.
    match first.publish(&bus, &commit(2), 0, &stop).await {
        Err(changelog::Fenced::TakenOver { ours: 1, newer: 2, .. }) => {}
        other => panic!("expected the first owner fenced, got {other:?}"),
    }
    // The new owner goes on past the stale record.
    assert!(second.publish(&bus, &commit(3), 0, &stop).await.unwrap().is_some());
    // A commit sent twice (the first send failed unclearly but reached the broker): it lands twice.
    let twice = kassa_bus::Record {
        topic: AUTHORIZATION_CHANGELOG.into(),
        key: changelog::partition_key(0, PARTITIONS),
        payload: changelog::encode(2, 2, None, &commit(4)),
        timestamp_ms: 0,
    };
    bus.produce(vec![twice]).await.unwrap();
    assert!(second.publish(&bus, &commit(4), 0, &stop).await.unwrap().is_some(), "its own earlier copy is no takeover");

    // A replay keeps the owners' commits, once each, and skips the stale one.
    let rebuilt = open("rebuilt");
    let restored = changelog::restore(&rebuilt, &bus, AUTHORIZATION_CHANGELOG, 0).await.unwrap();
    assert_eq!((restored.replayed, restored.epoch), (3, 2));
    let ids: Vec<u128> = rebuilt.read_stream(42, 1, 10).unwrap().iter().map(|e| e.event_id).collect();
    assert_eq!(ids, vec![1, 3, 4]);
    assert_eq!(rebuilt.get(Table::State, b"k").unwrap(), Some(vec![4]));
}
