//! The Kafka bus against a real Kafka-protocol broker (tansu), started per test.

#[path = "../../../tests/support/tansu.rs"]
mod tansu;

use kassa_bus::{Bus, BusError, KafkaBus, KafkaConfig, Record, TopicInit, TopicSpec, init_topics, partition_for};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tansu::Tansu;

fn config(tansu: &Tansu, topics: &[(&str, u32)]) -> KafkaConfig {
    let topics = topics.iter().map(|(name, partitions)| TopicSpec::new(*name, *partitions)).collect();
    let mut config = KafkaConfig::new(tansu.brokers(), topics);
    config.request_timeout_ms = 5_000;
    config.delivery_timeout_ms = 20_000;
    config
}

fn record(topic: &str, key: &str, payload: String) -> Record {
    Record {
        topic: topic.into(),
        key: key.as_bytes().to_vec(),
        payload: payload.into_bytes(),
        timestamp_ms: 1_700_000_000_000,
    }
}

/// librdkafka's clients can block while they shut down: never on a runtime thread.
async fn close(bus: Arc<KafkaBus>) {
    tokio::task::spawn_blocking(move || drop(bus)).await.unwrap();
}

/// Everything in a partition from `from` on.
async fn read_all(bus: &KafkaBus, topic: &str, partition: u32, from: u64) -> Vec<kassa_bus::Message> {
    let mut out = Vec::new();
    let mut next = from;
    // Right after a broker restart the client may still be reconnecting: a
    // watermark query can time out then, and is asked again (bounded).
    let mut attempts = 0;
    let end = loop {
        match bus.end_offset(topic, partition) {
            Ok(end) => break end,
            Err(error) if attempts < 5 => {
                attempts += 1;
                eprintln!("{topic}/{partition}: {error}; asking again");
            }
            Err(error) => panic!("{topic}/{partition}: {error}"),
        }
    };
    while next < end {
        let batch = bus.fetch(topic, partition, next, 100, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "{topic}/{partition}: nothing at {next} though the end is {end}");
        for message in batch {
            assert_eq!(message.offset, next, "offsets are dense and in order");
            next += 1;
            out.push(message);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_keep_their_key_order_and_land_where_the_key_hashes() {
    let tansu = Tansu::start();
    let config = config(&tansu, &[("payments", 4)]);
    let created = init_topics(&config).await.unwrap();
    assert_eq!(created, vec![("payments".to_owned(), TopicInit::Created)]);
    let bus = Arc::new(KafkaBus::open(config.clone()).unwrap());
    assert_eq!(bus.partitions("payments").unwrap(), 4);

    let keys = ["pay_a", "pay_b", "pay_c", "pay_d", "pay_e", "pay_f", "pay_g"];
    let mut records = Vec::new();
    for n in 0..700 {
        let key = keys[n % keys.len()];
        records.push(record("payments", key, format!("{key}/{n}")));
    }
    let produced = bus.produce(records.clone()).await.unwrap();
    assert_eq!(produced.len(), records.len());
    for (record, produced) in records.iter().zip(&produced) {
        assert_eq!(produced.partition, partition_for(&record.key, 4), "Kafka's murmur2 partitioner, as embedded");
    }

    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut total = 0;
    for partition in 0..4 {
        for message in read_all(&bus, "payments", partition, 0).await {
            let text = String::from_utf8(message.payload).unwrap();
            let (key, n) = text.split_once('/').unwrap();
            assert_eq!(message.key, key.as_bytes());
            assert_eq!(message.partition, partition);
            assert_eq!(message.timestamp_ms, 1_700_000_000_000);
            seen.entry(key.to_owned()).or_default().push(n.parse().unwrap());
            total += 1;
        }
    }
    assert_eq!(total, 700);
    for (key, ns) in &seen {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{key}'s records are out of order");
        assert_eq!(ns.len(), 100);
    }

    // Creating again changes nothing.
    assert_eq!(init_topics(&config).await.unwrap(), vec![("payments".to_owned(), TopicInit::Existed)]);
    close(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_starts_anywhere_goes_back_and_waits_for_new_records() {
    let tansu = Tansu::start();
    let config = config(&tansu, &[("events", 1)]);
    init_topics(&config).await.unwrap();
    let bus = Arc::new(KafkaBus::open(config).unwrap());
    let records = (0..50).map(|n| record("events", "k", format!("{n}"))).collect();
    bus.produce(records).await.unwrap();
    assert_eq!(bus.end_offset("events", 0).unwrap(), 50);

    let from_middle = bus.fetch("events", 0, 30, 5, Duration::from_secs(5)).await.unwrap();
    assert_eq!(from_middle.first().map(|m| m.offset), Some(30));
    assert!(from_middle.len() <= 5, "at most what was asked for");
    // Back to an earlier offset (a consumer restarting from its stored position).
    let again = bus.fetch("events", 0, 10, 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![10]);
    assert_eq!(read_all(&bus, "events", 0, 11).await.len(), 39);

    // At the end: waits, then answers empty.
    let started = std::time::Instant::now();
    assert!(bus.fetch("events", 0, 50, 10, Duration::from_millis(300)).await.unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
    // A record produced while a fetch waits is returned by it.
    let waiting = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move { bus.fetch("events", 0, 50, 10, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    bus.produce(vec![record("events", "k", "late".into())]).await.unwrap();
    let late = waiting.await.unwrap().unwrap();
    assert_eq!(late.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"late".to_vec()]);
    close(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_wrong_partition_counts_and_unsafe_properties_are_refused() {
    let tansu = Tansu::start();
    match KafkaBus::open(config(&tansu, &[("nowhere", 2)])) {
        Err(BusError::UnknownTopic { topic }) => assert_eq!(topic, "nowhere"),
        other => panic!("a missing topic: {other:?}"),
    }
    init_topics(&config(&tansu, &[("payments", 2)])).await.unwrap();
    let changed = config(&tansu, &[("payments", 3)]);
    for result in [KafkaBus::open(changed.clone()).map(drop), init_topics(&changed).await.map(drop)] {
        match result {
            Err(BusError::PartitionCountChanged { topic, existing: 2, configured: 3 }) => assert_eq!(topic, "payments"),
            other => panic!("a changed partition count: {other:?}"),
        }
    }
    let mut unsafe_config = config(&tansu, &[("payments", 2)]);
    unsafe_config.properties.insert("enable.idempotence".into(), "false".into());
    let error = KafkaBus::open(unsafe_config).unwrap_err().to_string();
    assert!(error.contains("enable.idempotence"), "{error}");

    let bus = Arc::new(KafkaBus::open(config(&tansu, &[("payments", 2)])).unwrap());
    assert!(matches!(bus.fetch("payments", 2, 0, 1, Duration::ZERO).await, Err(BusError::NoSuchPartition { .. })));
    assert!(matches!(bus.produce(vec![record("other", "k", "x".into())]).await, Err(BusError::UnknownTopic { .. })));
    close(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_broker_restart_and_producing_resumes() {
    let mut tansu = Tansu::start();
    let config = config(&tansu, &[("payments", 2)]);
    init_topics(&config).await.unwrap();
    let bus = Arc::new(KafkaBus::open(config).unwrap());
    let first: Vec<Record> = (0..20).map(|n| record("payments", &format!("k{n}"), format!("before/{n}"))).collect();
    bus.produce(first).await.unwrap();

    tansu.stop();
    // Produced while the broker is down: delivered once it is back.
    let during = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move {
            let records = (0..20).map(|n| record("payments", &format!("k{n}"), format!("during/{n}"))).collect();
            bus.produce(records).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    tansu.resume();
    during.await.unwrap().expect("delivered after the broker came back");

    let mut payloads = Vec::new();
    for partition in 0..2 {
        payloads.extend(read_all(&bus, "payments", partition, 0).await.into_iter().map(|m| m.payload));
    }
    assert_eq!(payloads.len(), 40, "every record once: {}", tansu.log().lines().count());
    close(bus).await;
}
