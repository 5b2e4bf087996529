//! The Kafka bus against librdkafka's in-process mock cluster: fast checks of
//! the adapter that need no broker process (the full behaviour is tested
//! against tansu in `kafka.rs`). librdkafka clients are closed off the
//! runtime's threads: their destroy can block.

use kassa_bus::{Bus, BusError, KafkaBus, KafkaConfig, Rebalance, Record, TopicSpec, partition_for};
use rdkafka::mocking::MockCluster;
use std::sync::Arc;
use std::time::Duration;

fn bus(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>, instance: Option<&str>) -> Arc<KafkaBus> {
    let mut config = KafkaConfig::new(cluster.bootstrap_servers(), vec![TopicSpec::new("t", 4)]);
    config.request_timeout_ms = 5_000;
    config.group_instance_id = instance.map(str::to_owned);
    Arc::new(KafkaBus::open(config).unwrap())
}

async fn close(bus: Arc<KafkaBus>) {
    tokio::task::spawn_blocking(move || drop(bus)).await.unwrap();
}

async fn next(changes: &mut tokio::sync::mpsc::UnboundedReceiver<Rebalance>) -> Rebalance {
    tokio::time::timeout(Duration::from_secs(60), changes.recv())
        .await
        .expect("a rebalance within 60 s")
        .expect("the membership is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_to_their_keys_partition_and_read_back() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 4, 1).unwrap();
    let bus = bus(&cluster, None);
    let record = Record { topic: "t".into(), key: b"pay-1".to_vec(), payload: b"hello".to_vec(), timestamp_ms: 7 };
    let produced = bus.produce(vec![record]).await.unwrap();
    let partition = partition_for(b"pay-1", 4);
    assert_eq!(produced[0].partition, partition);
    assert_eq!(bus.end_offset("t", partition).unwrap(), produced[0].offset + 1);
    let messages = bus.fetch("t", partition, produced[0].offset, 10, Duration::from_secs(10)).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!((messages[0].key.as_slice(), messages[0].payload.as_slice()), (&b"pay-1"[..], &b"hello"[..]));
    assert!(matches!(
        bus.fetch("t", 9, 0, 10, Duration::ZERO).await,
        Err(BusError::NoSuchPartition { partition: 9, partitions: 4, .. })
    ));
    assert!(matches!(bus.join_group("g", "nope"), Err(BusError::UnknownTopic { .. })));
    close(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_gets_its_share_only_after_the_first_handed_it_back() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 4, 1).unwrap();
    let (first_bus, second_bus) = (bus(&cluster, Some("first")), bus(&cluster, Some("second")));

    let mut first = first_bus.join_group("g", "t").unwrap();
    let mut owned: Vec<u32> = Vec::new();
    while owned.len() < 4 {
        match next(&mut first.changes).await {
            Rebalance::Assigned(partitions) => owned.extend(partitions),
            Rebalance::Revoked { partitions, .. } => owned.retain(|p| !partitions.contains(p)),
        }
    }
    owned.sort_unstable();
    assert_eq!(owned, vec![0, 1, 2, 3]);

    let mut second = second_bus.join_group("g", "t").unwrap();
    // Eager rebalancing: the first member is asked for everything back and holds the group until it answers.
    let done = match next(&mut first.changes).await {
        Rebalance::Revoked { partitions, done } => {
            assert_eq!(partitions.len(), 4);
            done
        }
        other => panic!("expected a revocation, got {other:?}"),
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(500), second.changes.recv()).await.is_err(),
        "the second member was given partitions the first had not handed back"
    );
    drop(done);
    let shares = [next(&mut first.changes).await, next(&mut second.changes).await];
    let mut all = Vec::new();
    for share in shares {
        match share {
            Rebalance::Assigned(partitions) => {
                assert_eq!(partitions.len(), 2, "{partitions:?}");
                all.extend(partitions);
            }
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2, 3]);

    drop((first, second));
    close(first_bus).await;
    close(second_bus).await;
}

/// A fetch dropped half-way (its subscription stopped while it waited or
/// read) may already have taken messages from the consumer. The next fetch
/// from the same offset still gets every message, in order, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_cut_short_loses_no_message() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 4, 1).unwrap();
    let bus = bus(&cluster, None);
    let partition = partition_for(b"k", 4);
    let mut next = 0;
    let mut seen = Vec::new();
    for n in 0..60u32 {
        let record =
            Record { topic: "t".into(), key: b"k".to_vec(), payload: n.to_be_bytes().to_vec(), timestamp_ms: 0 };
        bus.produce(vec![record.clone(), record]).await.unwrap();
        // Cut the fetch short at varying points: before, while or after it takes messages.
        let cut = Duration::from_micros(u64::from(n % 10) * 300);
        if let Ok(Ok(messages)) =
            tokio::time::timeout(cut, bus.fetch("t", partition, next, 1, Duration::from_secs(5))).await
        {
            for message in messages {
                assert_eq!(message.offset, next, "a message was skipped");
                next += 1;
                seen.push(message.offset);
            }
        }
    }
    // Then read the rest, whole.
    let end = bus.end_offset("t", partition).unwrap();
    while next < end {
        for message in bus.fetch("t", partition, next, 100, Duration::from_secs(5)).await.unwrap() {
            assert_eq!(message.offset, next, "a message was skipped");
            next += 1;
            seen.push(message.offset);
        }
    }
    assert_eq!(seen, (0..end).collect::<Vec<_>>());
    close(bus).await;
}

/// A stored position the broker does not have (the topic was emptied by
/// retention, or deleted and created again) stops the subscription with an
/// error that says so, instead of a warning and a retry every 200 ms forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_broker_does_not_have_stops_the_subscription() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 4, 1).unwrap();
    let bus = bus(&cluster, None);
    let record = Record { topic: "t".into(), key: b"pay-1".to_vec(), payload: b"x".to_vec(), timestamp_ms: 7 };
    let partition = bus.produce(vec![record]).await.unwrap()[0].partition;
    let shared: Arc<dyn Bus> = bus.clone();
    // The log says it read 1,000 messages of a partition that holds one.
    let mut subscription =
        kassa_bus::Subscription::start(shared, "t", partition, 1_000, kassa_bus::SubscriptionConfig::default());
    let first = tokio::time::timeout(Duration::from_secs(30), subscription.recv()).await.expect("an answer in 30 s");
    match first {
        Some(Err(error @ BusError::OffsetGone { offset: 1_000, .. })) => {
            assert!(error.is_fatal());
            assert!(error.to_string().contains("cannot resume"), "{error}");
        }
        other => panic!("expected OffsetGone at 1000, got {other:?}"),
    }
    let after = tokio::time::timeout(Duration::from_secs(5), subscription.recv()).await.expect("the end in 5 s");
    assert!(after.is_none(), "the subscription read on after a fatal error: {after:?}");
    drop(subscription);
    close(bus).await;
}
