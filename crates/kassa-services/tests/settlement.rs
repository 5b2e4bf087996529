//! Settlement batching over the real bus and logs: captures and refunds land
//! in one batch per provider, merchant and currency; a cut-off closes it with
//! exact totals and records every captured payment settled once. Then the
//! disks of settlement and reconciliation are lost, and both rebuild from the
//! topics (settlement from `settlement.changelog`): the same batches, the same
//! report, nothing settled twice. And two settlement instances share the
//! batch keys through a consumer group: a key's batches move with its
//! partition, and each entry is batched and settled once.

mod common;

use kassa_bus::{Bus, BusConfig, EmbeddedBus, TopicSpec};
use kassa_codec::{EventPayload, decode_frame};
use kassa_domain::settlement::EntryKind;
use kassa_domain::*;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::{Connector, SimulatedAcquirer, SimulatorConfig};
use kassa_services::SystemClock;
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::messages::PaymentCommandMessage;
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationService};
use kassa_services::settlement::{SettlementConfig, SettlementService};
use kassa_services::topics::{
    PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH, SETTLEMENT_CHANGELOG, SETTLEMENT_ENTRIES, SETTLEMENT_EVENTS,
};
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
        TopicSpec::new(SETTLEMENT_ENTRIES, 2),
        TopicSpec::new(SETTLEMENT_CHANGELOG, 2),
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
    let config = SettlementConfig { cutoff_interval_ms: 0, changelog: true, ..SettlementConfig::default() };
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

    let cutoff = settlement.cutoff().await.unwrap();
    assert!(cutoff.complete, "one instance owns every partition");
    let closed = cutoff.closed;
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
    assert!(settlement.cutoff().await.unwrap().closed.is_empty());

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

    // The disks of settlement and reconciliation are lost: both rebuild from the topics,
    // settlement's batches from settlement.changelog.
    let log = Arc::new(EventLog::open(dir.path().join("settlement-rebuilt"), LogConfig::default()).unwrap());
    let config = SettlementConfig { cutoff_interval_ms: 0, changelog: true, ..SettlementConfig::default() };
    let settlement = Arc::new(SettlementService::new(log, bus.clone(), Arc::new(SystemClock), config));
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
    let mut rebuilt = Vec::new();
    for _ in 0..500 {
        rebuilt = settlement.batches(merchant, 10).unwrap();
        if rebuilt == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rebuilt, before, "the rebuilt batches differ");

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
    let closed_again = settlement.cutoff().await.unwrap().closed;
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

/// Publish a payment's event on `payments.events` as authorization's relay does.
async fn publish_payment_event(bus: &EmbeddedBus, payment_id: PaymentId, seq: u64, event: &PaymentEvent) {
    let envelope = kassa_codec::Envelope {
        event_id: payment_id.as_u128() ^ u128::from(seq) << 100,
        event_type: event.event_type().to_owned(),
        stream_id: payment_id.as_u128(),
        stream_seq: seq,
        position: seq,
        timestamp_ms: 1_795_651_200_000,
        causation_id: None,
        correlation_id: None,
        payload: event.encode_payload(),
        prev_hash: [0; 32],
    };
    let record = kassa_bus::Record {
        topic: PAYMENT_EVENTS.into(),
        key: kassa_services::payment_key(payment_id.as_u128()),
        payload: kassa_codec::encode_frame(&envelope),
        timestamp_ms: 0,
    };
    bus.produce(vec![record]).await.unwrap();
}

/// Payment `i`: requested by one of six merchants, authorized by one of two
/// providers, captured; every fifth also refunded in part. Sent twice when
/// `twice` (a relay that repeated itself): settlement drops the copies.
async fn pay_and_capture(bus: &EmbeddedBus, i: u128, twice: bool) -> (PaymentId, i64, i64) {
    let eur = |m| Money::new(m, Currency::from_code("EUR").unwrap());
    let payment_id = PaymentId::from_parts(1_795_651_200_000, 1_000 + i);
    let amount = 1_000 + i as i64;
    let card = CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
    let mut events = vec![
        PaymentEvent::Requested(PaymentRequested {
            payment_id,
            merchant_id: MerchantId::from_u128(10 + i % 6),
            amount: eur(amount),
            card: card.summarize(b"k"),
            capture: true,
            reference: None,
            metadata: BTreeMap::new(),
            requested_at: Timestamp(1_795_651_200_000),
        }),
        PaymentEvent::Authorized {
            attempt_id: AttemptId::from_u128(i),
            provider: if i.is_multiple_of(2) { "acq-alpha" } else { "acq-beta" }.into(),
            authorization_code: "A1".into(),
            amount: eur(amount),
        },
        PaymentEvent::Captured { capture_id: CaptureId::from_u128(5_000 + i), amount: eur(amount) },
    ];
    if i % 7 == 3 {
        // Authorized by stand-in, then confirmed by a provider: batched under that provider.
        events[1] = PaymentEvent::AuthorizedByStandIn { amount: eur(amount) };
        let confirmed = PaymentEvent::StandInConfirmed {
            attempt_id: AttemptId::from_u128(i),
            provider: "acq-gamma".into(),
            authorization_code: "S1".into(),
        };
        events.insert(2, confirmed);
    }
    let refunded = if i.is_multiple_of(5) { 100 } else { 0 };
    if refunded > 0 {
        events.push(PaymentEvent::Refunded { refund_id: RefundId::from_u128(9_000 + i), amount: eur(refunded) });
    }
    for _ in 0..if twice { 2 } else { 1 } {
        for (seq, event) in events.iter().enumerate() {
            publish_payment_event(bus, payment_id, seq as u64 + 1, event).await;
        }
    }
    (payment_id, amount, refunded)
}

struct Settler {
    service: Arc<SettlementService>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Settler {
    fn start(dir: &std::path::Path, name: &str, bus: &Arc<EmbeddedBus>, changelog: bool) -> Result<Settler, String> {
        let log = Arc::new(EventLog::open(dir.join(name), LogConfig::default()).unwrap());
        let config = SettlementConfig { cutoff_interval_ms: 0, changelog, ..SettlementConfig::default() };
        let service = Arc::new(SettlementService::new(log, bus.clone(), Arc::new(SystemClock), config));
        let (stop, stop_rx) = watch::channel(false);
        let tasks = service.spawn(stop_rx).map_err(|e| e.to_string())?;
        Ok(Settler { service, stop, tasks })
    }

    /// Every batch this instance holds, of the six merchants.
    fn batches(&self) -> Vec<kassa_domain::settlement::BatchState> {
        (10..16).flat_map(|m| self.service.batches(MerchantId::from_u128(m), 1000).unwrap()).collect()
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The batches two instances hold, each once by id (a closed copy wins over a
/// stale open one left behind by a partition that moved).
fn merged(instances: &[&Settler]) -> BTreeMap<BatchId, kassa_domain::settlement::BatchState> {
    let mut out: BTreeMap<BatchId, kassa_domain::settlement::BatchState> = BTreeMap::new();
    for batch in instances.iter().flat_map(|i| i.batches()) {
        let id = batch.batch_id.unwrap();
        if out
            .get(&id)
            .is_none_or(|b| b.closed.is_none() && (batch.closed.is_some() || batch.entries.len() > b.entries.len()))
        {
            out.insert(id, batch);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_batch_keys_and_settle_each_entry_once() {
    const PARTITIONS: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let topics = [PAYMENT_COMMANDS, PAYMENT_EVENTS, SETTLEMENT_EVENTS, SETTLEMENT_ENTRIES, SETTLEMENT_CHANGELOG]
        .iter()
        .map(|t| TopicSpec::new(*t, PARTITIONS))
        .collect();
    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics)).unwrap());

    // A log whose batches were made without the changelog cannot join the group.
    let alone = Settler::start(dir.path(), "alone", &bus, false).unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..20 {
        let (payment_id, amount, refunded) = pay_and_capture(&bus, i, false).await;
        expected.insert(payment_id, (amount, refunded));
    }
    let entries =
        |e: &BTreeMap<PaymentId, (i64, i64)>| e.values().map(|(_, r)| if *r > 0 { 2 } else { 1 }).sum::<usize>();
    for _ in 0..500 {
        if alone.batches().iter().map(|b| b.entries.len()).sum::<usize>() == entries(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(alone.batches().iter().map(|b| b.entries.len()).sum::<usize>(), entries(&expected));
    alone.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = Settler::start(dir.path(), "alone", &bus, true).err().expect("an unshared log is refused");
    assert!(refused.contains("settlement.changelog"), "{refused}");

    // The first instance of the group, on a new log, takes those batches from settlement.events
    // (its feed sends the twenty payments' entries again, from the start: none is batched twice).
    let a = Settler::start(dir.path(), "a", &bus, true).unwrap();
    for _ in 0..500 {
        if a.batches().iter().map(|b| b.entries.len()).sum::<usize>() == entries(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = a.service.cutoff().await.unwrap();
    assert!(first.complete && !first.closed.is_empty(), "{first:?}");
    // A second joins: some keys move to it with their batches, and it reads its share of
    // payments.events from the start, sending the first twenty's entries again: their
    // batches are closed, and they are batched no second time.
    let b = Settler::start(dir.path(), "b", &bus, true).unwrap();
    for _ in 0..1000 {
        let (owned_a, owned_b) = (a.service.partitions_owned(), b.service.partitions_owned());
        if !owned_b.is_empty() && owned_a.len() + owned_b.len() == PARTITIONS as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (owned_a, owned_b) = (a.service.partitions_owned(), b.service.partitions_owned());
    assert!(!owned_a.is_empty() && !owned_b.is_empty(), "the partitions did not split: {owned_a:?} / {owned_b:?}");
    // Twenty more, each sent twice, and the first twenty again.
    for i in 20..40 {
        let (payment_id, amount, refunded) = pay_and_capture(&bus, i, true).await;
        expected.insert(payment_id, (amount, refunded));
    }
    for i in 0..20 {
        pay_and_capture(&bus, i, false).await;
    }
    let held = || merged(&[&a, &b]).values().map(|b| b.entries.len()).sum::<usize>();
    for _ in 0..1000 {
        if held() >= entries(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A cut-off asked of one instance closes every batch: its own partitions answer it,
    // the other's close when their owner reads the request.
    let cutoff = a.service.cutoff().await.unwrap();
    assert!(!cutoff.complete, "a owns only some partitions");
    let mut batches = merged(&[&a, &b]);
    for _ in 0..500 {
        if batches.values().all(|b| b.closed.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        batches = merged(&[&a, &b]);
    }
    assert!(cutoff.closed.iter().all(|id| batches.contains_key(id)));
    let mut seen: BTreeMap<PaymentId, (i64, i64)> = BTreeMap::new();
    for batch in batches.values() {
        let (totals, _) = batch.closed.unwrap_or_else(|| panic!("a batch stayed open: {batch:?}"));
        assert_eq!(totals.net.minor + totals.fees.minor + totals.refunded.minor, totals.captured.minor);
        let key = batch.key.clone().unwrap();
        for entry in &batch.entries {
            let (amount, refunded) = expected[&entry.payment_id];
            let i = entry.payment_id.as_u128() & 0xffff;
            assert_eq!(key.merchant_id, MerchantId::from_u128(10 + (i - 1_000) % 6), "{entry:?} in {key:?}");
            assert_eq!(key.provider == "acq-gamma", (i - 1_000) % 7 == 3, "{entry:?} in {key:?}");
            let slot = seen.entry(entry.payment_id).or_default();
            match entry.kind {
                EntryKind::Capture => {
                    assert_eq!((slot.0, entry.amount.minor), (0, amount), "captured twice: {entry:?}");
                    slot.0 = amount;
                }
                EntryKind::Refund => {
                    assert_eq!((slot.1, entry.amount.minor), (0, refunded), "refunded twice: {entry:?}");
                    slot.1 = refunded;
                }
            }
        }
    }
    assert_eq!(seen, expected, "every capture and refund batched exactly once");

    // Each captured payment is recorded settled once, in the batch that holds it.
    let mut settled: BTreeMap<PaymentId, BTreeMap<u128, BatchId>> = BTreeMap::new();
    for _ in 0..500 {
        settled.clear();
        for partition in 0..PARTITIONS {
            for message in bus.fetch(PAYMENT_COMMANDS, partition, 0, 10_000, Duration::ZERO).await.unwrap() {
                let envelope = decode_frame(&message.payload).unwrap();
                if let Ok(PaymentCommandMessage::RecordSettlements { payment_ids, batch_id }) =
                    PaymentCommandMessage::decode(&envelope.event_type, &envelope.payload)
                {
                    for payment_id in payment_ids {
                        settled.entry(payment_id).or_default().insert(envelope.event_id, batch_id);
                    }
                }
            }
        }
        if settled.len() == expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(settled.len(), expected.len());
    for (payment_id, commands) in &settled {
        assert_eq!(commands.len(), 1, "{payment_id} settled under several command ids: {commands:?}");
        let batch_id = commands.values().next().unwrap();
        assert!(batches[batch_id].entries.iter().any(|e| e.payment_id == *payment_id));
    }
    // What reconciliation sees on settlement.events (once the relays have published it all):
    // every entry in one batch, every batch closed.
    let mut published = (BTreeMap::new(), std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for _ in 0..500 {
        published = settlement_events(&bus, PARTITIONS).await;
        let (batch_of, opened, closed) = &published;
        if batch_of.len() >= entries(&expected) && opened == closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (batch_of, opened, closed) = published;
    assert_eq!(batch_of.len(), entries(&expected));
    for (entry, batches) in &batch_of {
        assert_eq!(batches.len(), 1, "entry {entry} is in several batches: {batches:?}");
    }
    assert_eq!(opened, closed, "a batch stayed open");
    a.stop().await;
    b.stop().await;
}

/// What `settlement.events` holds: each entry's batches, the batches opened, the batches closed.
async fn settlement_events(
    bus: &EmbeddedBus,
    partitions: u32,
) -> (
    BTreeMap<u128, std::collections::BTreeSet<u128>>,
    std::collections::BTreeSet<u128>,
    std::collections::BTreeSet<u128>,
) {
    use kassa_domain::settlement::BatchEvent;
    let mut batch_of: BTreeMap<u128, std::collections::BTreeSet<u128>> = BTreeMap::new();
    let (mut opened, mut closed) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for partition in 0..partitions {
        for message in bus.fetch(SETTLEMENT_EVENTS, partition, 0, 100_000, Duration::ZERO).await.unwrap() {
            let envelope = decode_frame(&message.payload).unwrap();
            match BatchEvent::decode_payload(&envelope.event_type, &envelope.payload).unwrap() {
                BatchEvent::Opened { .. } => {
                    opened.insert(envelope.stream_id);
                }
                BatchEvent::EntryAdded { entry } => {
                    batch_of.entry(entry.entry_id).or_default().insert(envelope.stream_id);
                }
                BatchEvent::Closed { .. } => {
                    closed.insert(envelope.stream_id);
                }
            }
        }
    }
    (batch_of, opened, closed)
}
