//! Two reconciliation instances sharing `settlement.events` through a consumer
//! group, over the real embedded bus (its in-process group coordinator) and
//! RocksDB logs. The second joins after the first reconciled half the
//! batches: the partitions that move take their reports with them through
//! `reconciliation.changelog` (none is made again), every batch gets one
//! report from its partition's owner, and each capture is recorded reconciled
//! under one command id.

mod common;

use kassa_bus::{Bus, BusConfig, EmbeddedBus, TopicSpec, partition_for};
use kassa_codec::decode_frame;
use kassa_domain::settlement::{BatchEvent, BatchKey, BatchTotals, EntryKind, SettlementEntry};
use kassa_domain::*;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::{AuthorizeRequest, Connector, SimulatedAcquirer, SimulatorConfig};
use kassa_services::messages::PaymentCommandMessage;
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationReport, ReconciliationService};
use kassa_services::topics::{PAYMENT_COMMANDS, RECONCILIATION_CHANGELOG, SETTLEMENT_EVENTS};
use kassa_services::{SystemClock, payment_key};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const PARTITIONS: u32 = 4;
const BATCHES: u64 = 8;
const ENTRIES: u64 = 5;
const MERCHANT: u128 = 9;

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::from_code("EUR").unwrap())
}

fn open_bus(dir: &std::path::Path) -> Arc<EmbeddedBus> {
    let topics = [SETTLEMENT_EVENTS, RECONCILIATION_CHANGELOG, PAYMENT_COMMANDS]
        .iter()
        .map(|t| TopicSpec::new(*t, PARTITIONS))
        .collect();
    Arc::new(EmbeddedBus::open(dir.join("bus"), BusConfig::new(topics)).unwrap())
}

struct Instance {
    service: Arc<ReconciliationService>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start(dir: &std::path::Path, name: &str, bus: &Arc<EmbeddedBus>, sim: &Arc<SimulatedAcquirer>) -> Instance {
    let log = Arc::new(EventLog::open(dir.join(name), LogConfig::default()).unwrap());
    let config =
        ReconciliationConfig { report_attempts_max: 1, retry_delay_ms: 10, changelog: true, ..Default::default() };
    let providers = vec![Arc::clone(sim) as Arc<dyn Connector>];
    let service = Arc::new(ReconciliationService::new(log, bus.clone(), providers, Arc::new(SystemClock), config));
    let (stop, stop_rx) = watch::channel(false);
    let tasks = service.spawn(stop_rx).unwrap();
    Instance { service, stop, tasks }
}

impl Instance {
    fn reports(&self) -> BTreeMap<BatchId, ReconciliationReport> {
        let reports = self.service.reports(MerchantId::from_u128(MERCHANT), 1000).unwrap();
        reports.into_iter().map(|r| (r.batch_id, r)).collect()
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Batch `b` of the test: `ENTRIES` captures the acquirer holds, opened and closed.
async fn settle_batch(bus: &EmbeddedBus, sim: &SimulatedAcquirer, b: u64) -> BatchId {
    let batch_id = BatchId::from_parts(1_795_651_200_000 + b, u128::from(b) * 7_919 + 1);
    let key = BatchKey {
        provider: "acq-alpha".into(),
        merchant_id: MerchantId::from_u128(MERCHANT),
        currency: eur(0).currency,
    };
    common::publish_batch_event(bus, batch_id, 1, &BatchEvent::Opened { batch_id, key, opened_at: Timestamp(1) }).await;
    let deadline = Duration::from_secs(5);
    let mut captured = 0;
    for e in 0..ENTRIES {
        let n = u128::from(b * ENTRIES + e + 1);
        let (payment_id, attempt_id, capture_id) =
            (PaymentId::from_u128(n), AttemptId::from_u128(n << 8), CaptureId::from_u128(n << 16));
        let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        let amount = eur(100 + n as i64);
        let request =
            AuthorizeRequest { attempt_id, payment_id, merchant_id: MerchantId::from_u128(MERCHANT), amount, card };
        sim.authorize(request, deadline).await.unwrap();
        sim.capture(attempt_id, capture_id, amount, deadline).await.unwrap();
        let entry = SettlementEntry { entry_id: capture_id.as_u128(), payment_id, kind: EntryKind::Capture, amount };
        common::publish_batch_event(bus, batch_id, 2 + e, &BatchEvent::EntryAdded { entry }).await;
        captured += amount.minor;
    }
    let totals =
        BatchTotals { captured: eur(captured), refunded: eur(0), fees: eur(0), net: eur(captured), entries: ENTRIES };
    common::publish_batch_event(
        bus,
        batch_id,
        2 + ENTRIES,
        &BatchEvent::Closed { totals, closed_at: Timestamp(1_795_651_300_000) },
    )
    .await;
    batch_id
}

/// Wait up to 30 s for `ready`.
async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "waited 30 s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reconciler_joins_and_the_reports_move_with_their_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open_bus(dir.path());
    let sim = Arc::new(SimulatedAcquirer::new(
        "acq-alpha",
        SimulatorConfig { latency_ms_min: 1, latency_ms_max: 2, seed: 4 },
    ));
    let partition_of = |batch_id: &BatchId| partition_for(&payment_key(batch_id.as_u128()), PARTITIONS);

    let first = start(dir.path(), "reconciliation-1", &bus, &sim);
    let mut batches = Vec::new();
    for b in 0..BATCHES / 2 {
        batches.push(settle_batch(&bus, &sim, b).await);
    }
    wait_for("the first half reconciled", || first.reports().len() == batches.len()).await;
    let before_move = first.reports();

    let second = start(dir.path(), "reconciliation-2", &bus, &sim);
    wait_for("the partitions to split", || {
        first.service.partitions_owned().len() == 2 && second.service.partitions_owned().len() == 2
    })
    .await;
    for b in BATCHES / 2..BATCHES {
        batches.push(settle_batch(&bus, &sim, b).await);
    }
    let owner = |batch_id: &BatchId| {
        if first.service.partitions_owned().contains(&partition_of(batch_id)) { &first } else { &second }
    };
    wait_for("every batch reconciled by its partition's owner", || {
        batches.iter().all(|b| owner(b).reports().contains_key(b))
    })
    .await;

    // Every report is clean: the acquirer holds every capture.
    for batch_id in &batches {
        let report = &owner(batch_id).reports()[batch_id];
        assert!(report.result.is_clean(), "{batch_id}: {:?}", report.result);
        assert_eq!(report.result.matched.len() as u64, ENTRIES);
    }
    // Reports made before a move came along with the partition, not made again.
    let moved: Vec<_> =
        before_move.keys().filter(|b| second.service.partitions_owned().contains(&partition_of(b))).collect();
    assert!(!moved.is_empty(), "no reconciled batch moved: pick other batch ids");
    for batch_id in moved {
        let there = &second.reports()[batch_id];
        let made = &before_move[batch_id];
        assert_eq!((there.report_id, there.created_at), (made.report_id, made.created_at), "{batch_id} made again");
    }

    // Each capture recorded reconciled under one command id (repeats carry the same id).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let commands = loop {
        let mut commands: BTreeMap<PaymentId, BTreeSet<u128>> = BTreeMap::new();
        for partition in 0..PARTITIONS {
            for message in bus.fetch(PAYMENT_COMMANDS, partition, 0, 10_000, Duration::ZERO).await.unwrap() {
                let envelope = decode_frame(&message.payload).unwrap();
                if let Ok(PaymentCommandMessage::RecordReconciliations { payment_ids, .. }) =
                    PaymentCommandMessage::decode(&envelope.event_type, &envelope.payload)
                {
                    for payment_id in payment_ids {
                        commands.entry(payment_id).or_default().insert(envelope.event_id);
                    }
                }
            }
        }
        if commands.len() as u64 == BATCHES * ENTRIES || tokio::time::Instant::now() > deadline {
            break commands;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(commands.len() as u64, BATCHES * ENTRIES, "a capture without its command");
    assert!(commands.values().all(|ids| ids.len() == 1), "a capture under two command ids: {commands:?}");
    first.stop().await;
    second.stop().await;
}

/// A log that followed `settlement.events` before the changelog existed: the
/// first claim would leave the changelog without that state, so the service
/// stops (and with it the process) and says what to do, instead of going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_from_before_the_changelog_stops_the_service_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open_bus(dir.path());
    let sim = Arc::new(SimulatedAcquirer::new(
        "acq-alpha",
        SimulatorConfig { latency_ms_min: 1, latency_ms_max: 2, seed: 4 },
    ));
    {
        let log = EventLog::open(dir.path().join("reconciliation-old"), LogConfig::default()).unwrap();
        let followed = kassa_eventlog::StateWrite {
            table: kassa_eventlog::Table::Positions,
            key: format!("{SETTLEMENT_EVENTS}/0").into_bytes(),
            value: Some(5u64.to_be_bytes().to_vec()),
        };
        log.append(kassa_eventlog::AppendRequest { writes: vec![followed], ..Default::default() }).await.unwrap();
    }
    let old = start(dir.path(), "reconciliation-old", &bus, &sim);
    // The group member's task (the first) ends by itself: the binary then exits 1.
    wait_for("the service to stop", || old.tasks[0].is_finished()).await;
    old.stop().await;
}
