//! Settlement batching over the real bus and logs: captures and refunds land
//! in one batch per provider, merchant and currency; a cut-off closes it with
//! exact totals and records every captured payment settled once. Then the
//! disks of settlement and reconciliation are lost, and both rebuild from the
//! topics: the same batches, the same report, nothing settled twice.

mod common;

use kassa_bus::{Bus, BusConfig, EmbeddedBus, TopicSpec, partition_for};
use kassa_codec::{EventPayload, decode_frame};
use kassa_domain::settlement::{BatchEvent, BatchKey, BatchTotals, EntryKind, SettlementEntry};
use kassa_domain::*;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::{Connector, SimulatedAcquirer, SimulatorConfig};
use kassa_services::SystemClock;
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::messages::PaymentCommandMessage;
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationService};
use kassa_services::settlement::{SettlementConfig, SettlementService};
use kassa_services::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH, SETTLEMENT_EVENTS};
use kassa_services::vault::CardVault;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const MERCHANT: u128 = 1;

async fn send(bus: &EmbeddedBus, id: u128, message: PaymentCommandMessage) {
    common::send_command(bus, id, message).await;
}

async fn stage_of(bus: &EmbeddedBus, payment_id: PaymentId) -> PaymentState {
    let mut state = PaymentState::default();
    for partition in 0..2 {
        let messages = bus.fetch(PAYMENT_EVENTS, partition, 0, 10_000, Duration::ZERO).await.unwrap();
        let mut seen = 0;
        for message in messages {
            let envelope = decode_frame(&message.payload).unwrap();
            if envelope.stream_id != payment_id.as_u128() || envelope.stream_seq <= seen {
                continue;
            }
            seen = envelope.stream_seq;
            if let Ok(event) = PaymentEvent::decode_payload(&envelope.event_type, &envelope.payload) {
                apply(&mut state, &event);
            }
        }
    }
    state
}

async fn until(bus: &EmbeddedBus, payment_id: PaymentId, done: impl Fn(&PaymentState) -> bool) -> PaymentState {
    for _ in 0..1000 {
        let state = stage_of(bus, payment_id).await;
        if done(&state) {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{payment_id}: {:?}", stage_of(bus, payment_id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutoff_closes_exact_batches_and_settles_each_payment_once() {
    let dir = tempfile::tempdir().unwrap();
    let topics = vec![
        TopicSpec::new(PAYMENT_COMMANDS, 2),
        TopicSpec::new(PAYMENT_EVENTS, 2),
        TopicSpec::new(SETTLEMENT_EVENTS, 2),
        TopicSpec::new(PROVIDER_HEALTH, 2),
    ];
    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics)).unwrap());
    let vault = Arc::new(CardVault::new(100));
    let sim = Arc::new(SimulatedAcquirer::new(
        "acq-alpha",
        SimulatorConfig { latency_ms_min: 1, latency_ms_max: 3, seed: 3 },
    ));
    let providers: Vec<Arc<dyn Connector>> = vec![Arc::clone(&sim) as Arc<dyn Connector>];
    let authorization = Arc::new(AuthorizationService::new(
        Arc::new(EventLog::open(dir.path().join("authorization"), LogConfig::default()).unwrap()),
        bus.clone(),
        providers.clone(),
        Arc::clone(&vault),
        Arc::new(SystemClock),
        AuthorizationConfig::default(),
    ));
    let config = SettlementConfig { cutoff_interval_ms: 0, ..SettlementConfig::default() };
    let settlement = Arc::new(SettlementService::new(
        Arc::new(EventLog::open(dir.path().join("settlement"), LogConfig::default()).unwrap()),
        bus.clone(),
        Arc::new(SystemClock),
        config,
    ));
    let reconciliation = Arc::new(ReconciliationService::new(
        Arc::new(EventLog::open(dir.path().join("reconciliation"), LogConfig::default()).unwrap()),
        bus.clone(),
        providers,
        Arc::new(SystemClock),
        ReconciliationConfig { retry_delay_ms: 50, ..ReconciliationConfig::default() },
    ));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = authorization.spawn(stop_rx.clone()).unwrap();
    tasks.extend(settlement.spawn(stop_rx.clone()).unwrap());
    tasks.extend(reconciliation.spawn(stop_rx).unwrap());

    let eur = |m| Money::new(m, Currency::from_code("EUR").unwrap());
    let mut payments = Vec::new();
    for (i, amount) in [1999i64, 1000, 500].into_iter().enumerate() {
        let payment_id = PaymentId::from_parts(1_795_651_200_000, i as u128 + 1);
        let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        let summary = card.summarize(b"k");
        vault.put(payment_id, card).unwrap();
        send(
            &bus,
            100 + i as u128,
            PaymentCommandMessage::Requested(PaymentRequested {
                payment_id,
                merchant_id: MerchantId::from_u128(MERCHANT),
                amount: eur(amount),
                card: summary,
                capture: true,
                reference: None,
                metadata: BTreeMap::new(),
                requested_at: Timestamp(1_795_651_200_000),
            }),
        )
        .await;
        payments.push(payment_id);
    }
    for payment in &payments {
        until(&bus, *payment, |s| s.stage == Stage::Captured).await;
    }
    send(
        &bus,
        200,
        PaymentCommandMessage::Refund {
            payment_id: payments[1],
            refund_id: RefundId::from_u128(5),
            amount_minor: Some(300),
        },
    )
    .await;
    until(&bus, payments[1], |s| s.refunded_minor == 300).await;

    // Wait until settlement has batched all four entries.
    let mut batch = None;
    for _ in 0..500 {
        let batches = settlement.batches(MerchantId::from_u128(MERCHANT), 10).unwrap();
        if batches.len() == 1 && batches[0].entries.len() == 4 {
            batch = Some(batches[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let batch = batch.expect("one open batch with four entries");
    assert_eq!(batch.captured_minor, 3499);
    assert_eq!(batch.refunded_minor, 300);
    assert_eq!(batch.entries.iter().filter(|e| e.kind == EntryKind::Refund).count(), 1);

    let closed = settlement.cutoff().await.unwrap();
    assert_eq!(closed.len(), 1);
    let batch = settlement.batch(closed[0]).unwrap().unwrap();
    let (totals, _) = batch.closed.expect("closed");
    // 2.9% + 0.25 per capture, rounded half up: 58+25, 29+25, 15+25.
    assert_eq!(totals.fees, eur(177));
    assert_eq!(totals.net, eur(3499 - 300 - 177));
    assert_eq!(
        totals.net.minor + totals.fees.minor + totals.refunded.minor,
        totals.captured.minor,
        "money is conserved"
    );
    for payment in &payments {
        // Settled — or already reconciled, which follows settlement.
        let state = until(&bus, *payment, |s| matches!(s.stage, Stage::Settled | Stage::Reconciled)).await;
        assert_eq!(state.batch_id, Some(closed[0]));
    }
    // A second cut-off has nothing open: nothing is settled twice.
    assert!(settlement.cutoff().await.unwrap().is_empty());

    // Reconciliation asks the provider for its report on the batch: every line matches.
    let mut report = None;
    for _ in 0..500 {
        if let Some(found) = reconciliation.reports(MerchantId::from_u128(MERCHANT), 10).unwrap().into_iter().next() {
            report = Some(found);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = report.expect("a reconciliation report for the closed batch");
    assert_eq!(report.batch_id, closed[0]);
    assert!(report.result.is_clean(), "{:?}", report.result);
    assert_eq!(report.result.matched.len(), 4);
    for payment in &payments {
        let state = until(&bus, *payment, |s| s.stage == Stage::Reconciled).await;
        assert_eq!(state.report_id, Some(report.report_id));
    }

    // A fourth payment's capture waits in an open batch.
    let pay = |i: u128, amount: i64| {
        let payment_id = PaymentId::from_parts(1_795_651_200_000, i);
        let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        let summary = card.summarize(b"k");
        vault.put(payment_id, card).unwrap();
        let request = PaymentCommandMessage::Requested(PaymentRequested {
            payment_id,
            merchant_id: MerchantId::from_u128(MERCHANT),
            amount: eur(amount),
            card: summary,
            capture: true,
            reference: None,
            metadata: BTreeMap::new(),
            requested_at: Timestamp(1_795_651_200_000),
        });
        (payment_id, request)
    };
    let (fourth, request) = pay(4, 700);
    send(&bus, 104, request).await;
    until(&bus, fourth, |s| s.stage == Stage::Captured).await;
    let merchant = MerchantId::from_u128(MERCHANT);
    let before = loop {
        let batches = settlement.batches(merchant, 10).unwrap();
        if batches.len() == 2 && batches.iter().any(|b| b.is_open() && b.entries.len() == 1) {
            break batches;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.send(true).unwrap();
    for task in tasks {
        let _ = task.await;
    }
    drop((authorization, settlement, reconciliation));

    // The disks of settlement and reconciliation are lost: both rebuild from the topics.
    let log = Arc::new(EventLog::open(dir.path().join("settlement-rebuilt"), LogConfig::default()).unwrap());
    let rebuilt = SettlementService::rebuild(&log, bus.as_ref()).await.unwrap();
    assert_eq!((rebuilt.batches, rebuilt.open), (2, 1), "{rebuilt:?}");
    assert!(SettlementService::rebuild(&log, bus.as_ref()).await.unwrap_err().to_string().contains("not empty"));
    let config = SettlementConfig { cutoff_interval_ms: 0, ..SettlementConfig::default() };
    let settlement = Arc::new(SettlementService::new(log, bus.clone(), Arc::new(SystemClock), config));
    assert_eq!(settlement.batches(merchant, 10).unwrap(), before, "the rebuilt batches differ");
    let reconciliation = Arc::new(ReconciliationService::new(
        Arc::new(EventLog::open(dir.path().join("reconciliation-rebuilt"), LogConfig::default()).unwrap()),
        bus.clone(),
        vec![Arc::clone(&sim) as Arc<dyn Connector>],
        Arc::new(SystemClock),
        ReconciliationConfig { retry_delay_ms: 50, ..ReconciliationConfig::default() },
    ));
    // Its stopped readers let go of the log a moment later.
    let mut authorization_log = EventLog::open(dir.path().join("authorization"), LogConfig::default());
    for _ in 0..100 {
        if authorization_log.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        authorization_log = EventLog::open(dir.path().join("authorization"), LogConfig::default());
    }
    let authorization = Arc::new(AuthorizationService::new(
        Arc::new(authorization_log.unwrap()),
        bus.clone(),
        vec![Arc::clone(&sim) as Arc<dyn Connector>],
        Arc::clone(&vault),
        Arc::new(SystemClock),
        AuthorizationConfig::default(),
    ));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = authorization.spawn(stop_rx.clone()).unwrap();
    tasks.extend(settlement.spawn(stop_rx.clone()).unwrap());
    tasks.extend(reconciliation.spawn(stop_rx).unwrap());

    // Reconciliation, replaying settlement.events, makes the same report again.
    let mut again = None;
    for _ in 0..500 {
        if let Some(found) = reconciliation.reports(merchant, 10).unwrap().into_iter().next() {
            again = Some(found);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let again = again.expect("the report made again");
    assert_eq!((again.report_id, &again.result), (report.report_id, &report.result));

    // A fifth capture joins the open batch; the cut-off settles the fourth and fifth, once.
    let (fifth, request) = pay(5, 800);
    send(&bus, 105, request).await;
    until(&bus, fifth, |s| s.stage == Stage::Captured).await;
    for _ in 0..500 {
        if settlement.batches(merchant, 10).unwrap().iter().any(|b| b.is_open() && b.entries.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = settlement.batches(merchant, 10).unwrap();
    assert_eq!(after.len(), 2, "a replay of payments.events opened a batch: {after:?}");
    assert_eq!(after.iter().find(|b| !b.is_open()), before.iter().find(|b| !b.is_open()));
    let open = after.iter().find(|b| b.is_open()).expect("the open batch");
    let mut in_open: Vec<PaymentId> = open.entries.iter().map(|e| e.payment_id).collect();
    in_open.sort();
    assert_eq!(in_open, vec![fourth, fifth], "batched twice: {open:?}");
    assert_eq!(open.captured_minor, 700 + 800);
    let closed_again = settlement.cutoff().await.unwrap();
    assert_eq!(closed_again.len(), 1);
    for payment in [fourth, fifth] {
        let state = until(&bus, payment, |s| matches!(s.stage, Stage::Settled | Stage::Reconciled)).await;
        assert_eq!(state.batch_id, Some(closed_again[0]));
    }
    for payment in &payments {
        assert_eq!(stage_of(&bus, *payment).await.batch_id, Some(closed[0]), "{payment} settled twice");
    }
    stop.send(true).unwrap();
    for task in tasks {
        let _ = task.await;
    }
}

/// Two batches of one key on different partitions: the open one is read
/// first, then the older one opens and closes. The rebuild keeps the open one
/// open (a cut-off closes it), and makes the older one's settlement commands again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_the_open_batch_of_a_key_whose_batches_are_on_two_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let topics = vec![
        TopicSpec::new(PAYMENT_COMMANDS, 2),
        TopicSpec::new(PAYMENT_EVENTS, 2),
        TopicSpec::new(SETTLEMENT_EVENTS, 2),
    ];
    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics)).unwrap());
    let eur = |m| Money::new(m, Currency::from_code("EUR").unwrap());
    let on = |partition: u32, from: u64| {
        (from..)
            .map(|n| BatchId::from_parts(1_795_651_200_000 + n, 7))
            .find(|b| partition_for(&kassa_services::payment_key(b.as_u128()), 2) == partition)
            .unwrap()
    };
    // The older, closed batch on partition 1; the newer, open one on partition 0 (read first).
    let (older, newer) = (on(1, 0), on(0, 1_000));
    assert!(older < newer);
    let key = BatchKey {
        provider: "acq-alpha".into(),
        merchant_id: MerchantId::from_u128(MERCHANT),
        currency: eur(0).currency,
    };
    let entry = |id: u128, amount| SettlementEntry {
        entry_id: id,
        payment_id: PaymentId::from_u128(id),
        kind: EntryKind::Capture,
        amount: eur(amount),
    };
    let opened = |batch_id| BatchEvent::Opened { batch_id, key: key.clone(), opened_at: Timestamp(1) };
    common::publish_batch_event(bus.as_ref(), newer, 1, &opened(newer)).await;
    common::publish_batch_event(bus.as_ref(), newer, 2, &BatchEvent::EntryAdded { entry: entry(2, 700) }).await;
    common::publish_batch_event(bus.as_ref(), older, 1, &opened(older)).await;
    common::publish_batch_event(bus.as_ref(), older, 2, &BatchEvent::EntryAdded { entry: entry(1, 500) }).await;
    let totals = BatchTotals { captured: eur(500), refunded: eur(0), fees: eur(40), net: eur(460), entries: 1 };
    common::publish_batch_event(bus.as_ref(), older, 3, &BatchEvent::Closed { totals, closed_at: Timestamp(2) }).await;
    // A copy re-published by the relay after a crash changes nothing.
    common::publish_batch_event(bus.as_ref(), older, 3, &BatchEvent::Closed { totals, closed_at: Timestamp(2) }).await;

    let log = Arc::new(EventLog::open(dir.path().join("settlement"), LogConfig::default()).unwrap());
    let rebuilt = SettlementService::rebuild(&log, bus.as_ref()).await.unwrap();
    assert_eq!((rebuilt.batches, rebuilt.open), (2, 1), "{rebuilt:?}");
    assert!(!SettlementService::rebuild_unfinished(&log).unwrap());
    let config = SettlementConfig { cutoff_interval_ms: 0, ..SettlementConfig::default() };
    let settlement = Arc::new(SettlementService::new(log, bus.clone(), Arc::new(SystemClock), config));
    let (stop, stop_rx) = watch::channel(false);
    let tasks = settlement.spawn(stop_rx).unwrap();
    assert_eq!(settlement.cutoff().await.unwrap(), vec![newer], "the open batch closes at the cut-off");

    // Settlement commands for both batches' captures reach payments.commands.
    let mut commanded = Vec::new();
    for _ in 0..500 {
        commanded.clear();
        for partition in 0..2 {
            for message in bus.fetch(PAYMENT_COMMANDS, partition, 0, 100, Duration::ZERO).await.unwrap() {
                let envelope = decode_frame(&message.payload).unwrap();
                if let Ok(PaymentCommandMessage::RecordSettlement { payment_id, batch_id }) =
                    PaymentCommandMessage::decode(&envelope.event_type, &envelope.payload)
                {
                    commanded.push((payment_id.as_u128(), batch_id));
                }
            }
        }
        if commanded.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    commanded.sort();
    assert_eq!(commanded, vec![(1, older), (2, newer)]);
    stop.send(true).unwrap();
    for task in tasks {
        let _ = task.await;
    }
}
