//! The embedded bus against real RocksDB.

use kassa_bus::*;
use kassa_eventlog::{AppendRequest, EventLog, LogConfig, NewEvent, StateWrite, Table};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn topics() -> Vec<TopicSpec> {
    vec![TopicSpec::new("payments", 4), TopicSpec::new("other", 1)]
}

fn open(dir: &std::path::Path) -> Arc<EmbeddedBus> {
    Arc::new(EmbeddedBus::open(dir, BusConfig::new(topics())).unwrap())
}

fn record(key: &str, payload: String) -> Record {
    Record { topic: "payments".into(), key: key.as_bytes().to_vec(), payload: payload.into_bytes(), timestamp_ms: 7 }
}

async fn drain(bus: &dyn Bus, topic: &str, partition: u32, from: u64) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        let batch = bus.fetch(topic, partition, from + out.len() as u64, 100, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_messages_keep_their_order_within_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let bus = Arc::clone(&bus);
            tokio::spawn(async move {
                for seq in 0..100 {
                    let key = format!("pay_{}", (p * 100 + seq) % 10);
                    bus.produce(vec![record(&key, format!("{p}:{seq}"))]).await.unwrap();
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    let mut total = 0;
    for partition in 0..4 {
        let messages = drain(bus.as_ref(), "payments", partition, 0).await;
        total += messages.len();
        for (index, m) in messages.iter().enumerate() {
            assert_eq!(m.offset, index as u64, "offsets are gapless");
            assert_eq!(m.partition, partition);
            assert_eq!(partition_for(&m.key, 4), partition, "the key decides the partition");
        }
        // Per key and producer, sequence numbers only grow.
        let mut last: HashMap<(Vec<u8>, String), i32> = HashMap::new();
        for m in &messages {
            let text = String::from_utf8(m.payload.clone()).unwrap();
            let (producer, seq) = text.split_once(':').unwrap();
            let seq: i32 = seq.parse().unwrap();
            let prev = last.insert((m.key.clone(), producer.to_owned()), seq);
            assert!(prev.is_none_or(|p| p < seq), "out of order in partition {partition}");
        }
        assert_eq!(bus.end_offset("payments", partition).unwrap(), messages.len() as u64);
    }
    assert_eq!(total, 400);
}

#[tokio::test]
async fn messages_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let produced = {
        let bus = open(dir.path());
        bus.produce((0..50).map(|i| record(&format!("k{i}"), format!("m{i}"))).collect()).await.unwrap()
    };
    let bus = open(dir.path());
    for at in produced {
        let message = bus.fetch("payments", at.partition, at.offset, 1, Duration::ZERO).await.unwrap();
        assert_eq!(message.len(), 1);
        assert_eq!(message[0].offset, at.offset);
    }
    // New messages continue after the stored ones.
    let next = bus.produce(vec![record("k0", "again".into())]).await.unwrap()[0];
    assert!(next.offset > 0);
}

#[tokio::test]
async fn fetch_waits_for_new_messages_and_times_out_empty() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    assert!(bus.fetch("other", 0, 0, 10, Duration::from_millis(20)).await.unwrap().is_empty());
    let waiter = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move { bus.fetch("other", 0, 0, 10, Duration::from_secs(30)).await })
    };
    tokio::task::yield_now().await;
    bus.produce(vec![Record { topic: "other".into(), key: vec![], payload: b"hi".to_vec(), timestamp_ms: 1 }])
        .await
        .unwrap();
    let messages = waiter.await.unwrap().unwrap();
    assert_eq!(messages[0].payload, b"hi");
}

#[tokio::test]
async fn bad_topics_and_partitions_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let error = bus.produce(vec![Record { topic: "nope".into(), key: vec![], payload: vec![], timestamp_ms: 0 }]).await;
    assert_eq!(error.unwrap_err(), BusError::UnknownTopic { topic: "nope".into() });
    let error = bus.fetch("payments", 9, 0, 1, Duration::ZERO).await.unwrap_err();
    assert_eq!(error, BusError::NoSuchPartition { topic: "payments".into(), partition: 9, partitions: 4 });
    drop(bus);
    let changed = EmbeddedBus::open(dir.path(), BusConfig::new(vec![TopicSpec::new("payments", 8)])).unwrap_err();
    assert_eq!(changed, BusError::PartitionCountChanged { topic: "payments".into(), existing: 4, configured: 8 });
}

/// A consumer that keeps a running total per key, and stores its position in
/// its own event log in the same write as its state. A crash before that write
/// redelivers; the write makes the total exact.
struct Consumer {
    log: EventLog,
    totals: HashMap<Vec<u8>, u64>,
}

const POSITION_KEY: &[u8] = b"other/0";

impl Consumer {
    fn open(dir: &std::path::Path) -> Self {
        let log = EventLog::open(dir, LogConfig::default()).unwrap();
        let mut totals = HashMap::new();
        for (key, value) in log.scan(Table::State, b"").unwrap() {
            totals.insert(key, u64::from_be_bytes(value.try_into().unwrap()));
        }
        Consumer { log, totals }
    }

    fn position(&self) -> u64 {
        self.log.get(Table::Positions, POSITION_KEY).unwrap().map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()))
    }

    /// Process a batch in memory; return the write that commits it.
    fn process(&mut self, messages: &[Message]) -> AppendRequest {
        let mut writes = Vec::new();
        let mut events = Vec::new();
        for m in messages {
            let amount: u64 = String::from_utf8(m.payload.clone()).unwrap().parse().unwrap();
            let total = self.totals.entry(m.key.clone()).or_default();
            *total += amount;
            writes.push(StateWrite {
                table: Table::State,
                key: m.key.clone(),
                value: Some(total.to_be_bytes().to_vec()),
            });
            events.push(NewEvent {
                event_id: u128::from(m.offset),
                event_type: "test.counted".into(),
                stream_id: 1,
                timestamp_ms: m.timestamp_ms,
                causation_id: None,
                correlation_id: None,
                payload: m.payload.clone(),
            });
        }
        let next = messages.last().map_or(self.position(), |m| m.offset + 1);
        writes.push(StateWrite {
            table: Table::Positions,
            key: POSITION_KEY.to_vec(),
            value: Some(next.to_be_bytes().to_vec()),
        });
        AppendRequest { events, writes, ..Default::default() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_position_is_stored_redelivers_and_totals_stay_exact() {
    let bus_dir = tempfile::tempdir().unwrap();
    let consumer_dir = tempfile::tempdir().unwrap();
    let bus = open(bus_dir.path());
    let records: Vec<Record> = (1..=100u64)
        .map(|i| Record {
            topic: "other".into(),
            key: format!("k{}", i % 3).into_bytes(),
            payload: i.to_string().into_bytes(),
            timestamp_ms: 0,
        })
        .collect();
    bus.produce(records).await.unwrap();
    let expected: u64 = (1..=100).sum();

    {
        let mut consumer = Consumer::open(consumer_dir.path());
        let first = bus.fetch("other", 0, 0, 40, Duration::ZERO).await.unwrap();
        let commit = consumer.process(&first);
        consumer.log.append(commit).await.unwrap();
        // Processed in memory, then "crashed" before the write.
        let second = bus.fetch("other", 0, 40, 30, Duration::ZERO).await.unwrap();
        let _lost = consumer.process(&second);
    }
    drop(bus);

    let bus = open(bus_dir.path());
    let mut consumer = Consumer::open(consumer_dir.path());
    assert_eq!(consumer.position(), 40, "resumes from the stored position");
    let rest = drain(bus.as_ref(), "other", 0, consumer.position()).await;
    assert_eq!(rest.first().map(|m| m.offset), Some(40), "the unstored messages are redelivered");
    let commit = consumer.process(&rest);
    consumer.log.append(commit).await.unwrap();
    assert_eq!(consumer.totals.values().sum::<u64>(), expected);
    assert_eq!(consumer.position(), 100);
    assert_eq!(consumer.log.head_position(), 100, "each message produced exactly one event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_holds_back_fetching_instead_of_growing_memory() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let records: Vec<Record> = (0..2000)
        .map(|i| Record { topic: "other".into(), key: vec![], payload: vec![i as u8; 64], timestamp_ms: 0 })
        .collect();
    bus.produce(records).await.unwrap();
    let config = SubscriptionConfig { prefetch_messages_max: 16, fetch_messages_max: 8, ..Default::default() };
    let mut subscription = Subscription::start(bus.clone(), "other", 0, 0, config);
    for expected in 0..2000u64 {
        // Give the prefetcher every chance to run ahead.
        if expected % 250 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(subscription.buffered() <= 16, "buffered {} > bound", subscription.buffered());
        let message = subscription.recv().await.unwrap().unwrap();
        assert_eq!(message.offset, expected);
    }
}
