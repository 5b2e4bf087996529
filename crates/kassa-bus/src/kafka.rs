//! The bus over a Kafka cluster — Apache Kafka or any Kafka-protocol broker
//! (Redpanda, MSK, Confluent Cloud, tansu) — through librdkafka.
//!
//! Same contract as the embedded bus: a record goes to the partition its key
//! hashes to (Kafka's murmur2, as in [`crate::partition_for`]), `produce`
//! returns once the broker has it (`acks=all`, idempotent producer, so a
//! retried send is written once and in order), and a consumer reads a
//! partition from the offset *it* stored in its own event log. Kafka's group
//! offsets are never the source of truth here.
//!
//! Each partition read gets its own manually assigned librdkafka consumer,
//! created on first fetch and re-positioned when asked for another offset
//! than the one it is at.

use crate::{
    Bus, BusError, Membership, Message, Produced, REVOKE_WAIT_MAX, Rebalance, Record, TopicSpec, partition_for,
};
use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often noted consumer positions are committed as group offsets.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Properties Kassa sets itself because its guarantees rest on them; a
/// configured value that differs is refused.
const REQUIRED: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all"), ("enable.auto.commit", "false")];

/// How to reach the cluster, and the topics Kassa uses. Units last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// librdkafka properties passed through as given (`security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `ssl.ca.location`, …). They win over
    /// Kassa's defaults, except where Kassa's guarantees need a value.
    pub properties: BTreeMap<String, String>,
    /// The topics and their partition counts.
    pub topics: Vec<TopicSpec>,
    /// Replicas of each topic created by [`init_topics`].
    pub replication_factor: i32,
    /// Client id the broker sees (logs, quotas).
    pub client_id: String,
    /// How long a produced record may wait for the broker before the produce
    /// fails (the caller — a relay — retries it).
    pub delivery_timeout_ms: u64,
    /// Deadline of metadata, offset and admin requests.
    pub request_timeout_ms: u64,
    /// This instance's stable name in its consumer groups (Kafka's static
    /// membership, `group.instance.id`): restarted, it takes its place back
    /// at once instead of waiting for the group to notice the old one died.
    pub group_instance_id: Option<String>,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>, topics: Vec<TopicSpec>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
            topics,
            replication_factor: 1,
            client_id: "kassa".into(),
            delivery_timeout_ms: 30_000,
            request_timeout_ms: 10_000,
            group_instance_id: None,
        }
    }

    /// A librdkafka configuration: Kassa's defaults, then the configured
    /// properties, then the values Kassa's guarantees need.
    fn client(&self, defaults: &[(&str, &str)], required: &[(&str, &str)]) -> Result<ClientConfig, BusError> {
        for (key, value) in REQUIRED {
            if let Some(configured) = self.properties.get(*key)
                && configured != value
            {
                return Err(config_error(format!(
                    "property {key:?} = {configured:?} is refused: Kassa's effectively-once delivery needs {value:?}"
                )));
            }
        }
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", &self.client_id);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            if key == "bootstrap.servers" {
                return Err(config_error(format!("set the brokers with `brokers`, not the property {key:?}")));
            }
            config.set(key, value);
        }
        for (key, value) in required {
            config.set(*key, *value);
        }
        Ok(config)
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    fn metadata_client(&self) -> Result<BaseConsumer, BusError> {
        // A consumer never asks the broker to create a topic it looks up.
        let defaults = [("allow.auto.create.topics", "false"), ("group.id", "kassa-metadata")];
        self.client(&defaults, &[("enable.auto.commit", "false")])?
            .create()
            .map_err(|e| broker_error("creating a metadata client", e))
    }
}

fn config_error(reason: String) -> BusError {
    BusError::Broker { context: "Kafka configuration".into(), reason }
}

fn broker_error(context: impl Into<String>, error: KafkaError) -> BusError {
    BusError::Broker { context: context.into(), reason: error.to_string() }
}

/// Partition counts of the topics on the cluster (`None`: the topic does not exist).
fn topic_partitions(client: &BaseConsumer, config: &KafkaConfig) -> Result<HashMap<String, Option<u32>>, BusError> {
    let mut found = HashMap::new();
    for spec in &config.topics {
        let metadata = client.fetch_metadata(Some(&spec.name), config.request_timeout()).map_err(|e| {
            broker_error(format!("reading the metadata of topic {:?} from {}", spec.name, config.brokers), e)
        })?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == spec.name && t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .filter(|n| *n > 0);
        found.insert(spec.name.clone(), partitions);
    }
    Ok(found)
}

/// What [`init_topics`] did with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicInit {
    Created,
    /// It was there already, with the configured partition count.
    Existed,
}

/// Create Kassa's topics on the cluster (`kassa kafka init-topics`). A topic
/// that exists with another partition count is an error: keys would move.
pub async fn init_topics(config: &KafkaConfig) -> Result<Vec<(String, TopicInit)>, BusError> {
    let admin: AdminClient<DefaultClientContext> =
        config.client(&[], &[])?.create().map_err(|e| broker_error(format!("connecting to {}", config.brokers), e))?;
    let new_topics: Vec<NewTopic<'_>> = config
        .topics
        .iter()
        .map(|spec| {
            let topic =
                NewTopic::new(&spec.name, spec.partitions as i32, TopicReplication::Fixed(config.replication_factor));
            if spec.kept_forever { topic.set("retention.ms", "-1").set("retention.bytes", "-1") } else { topic }
        })
        .collect();
    let options = AdminOptions::new().request_timeout(Some(config.request_timeout()));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| broker_error(format!("creating topics on {}", config.brokers), e))?;
    let mut done = Vec::new();
    for result in results {
        match result {
            Ok(name) => done.push((name, TopicInit::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => done.push((name, TopicInit::Existed)),
            Err((name, code)) => {
                return Err(BusError::Broker { context: format!("creating topic {name:?}"), reason: code.to_string() });
            }
        }
    }
    std::thread::spawn(move || drop(admin));
    // Created topics take a moment to show in the metadata; an existing one
    // must have the configured partition count.
    let deadline = std::time::Instant::now() + config.request_timeout();
    loop {
        let lookup = config.clone();
        let found =
            tokio::task::spawn_blocking(move || topic_partitions(&lookup.metadata_client()?, &lookup))
                .await
                .map_err(|e| BusError::Broker { context: "reading topic metadata".into(), reason: e.to_string() })??;
        let mut missing = false;
        for spec in &config.topics {
            match found.get(&spec.name).copied().flatten() {
                Some(existing) if existing != spec.partitions => {
                    return Err(BusError::PartitionCountChanged {
                        topic: spec.name.clone(),
                        existing,
                        configured: spec.partitions,
                    });
                }
                Some(_) => {}
                None => missing = true,
            }
        }
        if !missing {
            return Ok(done);
        }
        if std::time::Instant::now() > deadline {
            return Err(BusError::Broker {
                context: "creating topics".into(),
                reason: "created topics did not appear in the cluster's metadata in time".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One partition's reader: a consumer assigned to it, and the offset it will read next.
struct Reader {
    consumer: Option<StreamConsumer>,
    /// The offset the consumer reads next ([`UNKNOWN_POSITION`] while a fetch is under way).
    next: u64,
}

/// A reader's position while a fetch is under way: no fetch asks for it, so a
/// fetch that was dropped half-way makes the next one start on a new consumer.
const UNKNOWN_POSITION: u64 = u64::MAX;

impl Drop for Reader {
    fn drop(&mut self) {
        // librdkafka's destroy can block; never on a runtime thread.
        if let Some(consumer) = self.consumer.take() {
            std::thread::spawn(move || drop(consumer));
        }
    }
}

type ReaderSlot = Arc<tokio::sync::Mutex<Reader>>;

/// Consumer positions noted and not committed yet: (group, topic, partition) → next offset.
type Positions = Arc<std::sync::Mutex<BTreeMap<(String, String, u32), u64>>>;

/// Groups this process is a member of, by (group, topic): their members
/// commit the group's offsets themselves (the broker takes a group's offset
/// commits only from its members).
type Members = Arc<std::sync::Mutex<BTreeSet<(String, String)>>>;

/// The bus over a Kafka cluster. Topics must exist ([`init_topics`]).
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
    metadata: Arc<BaseConsumer>,
    partitions: HashMap<String, u32>,
    readers: std::sync::Mutex<HashMap<(String, u32), ReaderSlot>>,
    /// Positions for lag monitoring, committed by a background thread.
    consumed: Positions,
    members: Members,
    stop_committer: Arc<AtomicBool>,
}

impl Drop for KafkaBus {
    fn drop(&mut self) {
        // The committer makes a last pass and exits on its own; never wait on the broker here.
        self.stop_committer.store(true, Ordering::Release);
    }
}

/// Commit the noted positions as each group's offsets, every [`COMMIT_INTERVAL`],
/// until stopped (then once more). Failures only delay monitoring: logged, retried.
fn run_committer(config: KafkaConfig, consumed: Positions, members: Members, stop: Arc<AtomicBool>) {
    let mut clients: HashMap<String, BaseConsumer> = HashMap::new();
    let mut committed: BTreeMap<(String, String, u32), u64> = BTreeMap::new();
    let mut last_error: Option<String> = None;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let noted = consumed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let membered = members.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut by_group: BTreeMap<String, Vec<(String, u32, u64)>> = BTreeMap::new();
        for ((group, topic, partition), next) in noted {
            if membered.contains(&(group.clone(), topic.clone())) {
                continue; // its member commits
            }
            if committed.get(&(group.clone(), topic.clone(), partition)) != Some(&next) {
                by_group.entry(group).or_default().push((topic, partition, next));
            }
        }
        for (group, positions) in by_group {
            let result = (|| {
                if !clients.contains_key(&group) {
                    let client = config
                        .client(&[("group.id", group.as_str())], &REQUIRED[2..])?
                        .create()
                        .map_err(|e| broker_error(format!("creating a client for group {group:?}"), e))?;
                    clients.insert(group.clone(), client);
                }
                let mut list = TopicPartitionList::new();
                for (topic, partition, next) in &positions {
                    list.add_partition_offset(topic, *partition as i32, Offset::Offset(*next as i64))
                        .map_err(|e| broker_error("listing offsets", e))?;
                }
                clients[&group]
                    .commit(&list, CommitMode::Sync)
                    .map_err(|e| broker_error(format!("committing group {group:?}'s offsets"), e))
            })();
            match result {
                Ok(()) => {
                    last_error = None;
                    for (topic, partition, next) in positions {
                        committed.insert((group.clone(), topic, partition), next);
                    }
                }
                Err(error) => {
                    let text = error.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!(%error, "cannot commit consumer positions for lag monitoring; retrying");
                        last_error = Some(text);
                    }
                }
            }
        }
        if stopping {
            return;
        }
        let started = std::time::Instant::now();
        while started.elapsed() < COMMIT_INTERVAL && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A consumer group's position in one partition, against the partition's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: u32,
    /// The group's committed offset (`None`: nothing committed yet).
    pub committed: Option<u64>,
    /// The partition's end offset (high watermark).
    pub end: u64,
}

impl PartitionLag {
    /// Messages not consumed yet.
    pub fn lag(&self) -> u64 {
        self.end.saturating_sub(self.committed.unwrap_or(0))
    }
}

/// A consumer group's lag on a topic, per partition, from the offsets the
/// group committed. Blocking (requests to the broker).
pub fn consumer_lag(config: &KafkaConfig, group: &str, topic: &str) -> Result<Vec<PartitionLag>, BusError> {
    let client: BaseConsumer = config
        .client(&[("group.id", group)], &REQUIRED[2..])?
        .create()
        .map_err(|e| broker_error(format!("creating a client for group {group:?}"), e))?;
    let partitions = topic_partitions(&client, config)?
        .get(topic)
        .copied()
        .flatten()
        .ok_or_else(|| BusError::UnknownTopic { topic: topic.to_owned() })?;
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition as i32);
    }
    let committed = client
        .committed_offsets(list, config.request_timeout())
        .map_err(|e| broker_error(format!("reading group {group:?}'s offsets on {topic:?}"), e))?;
    let mut lags = Vec::new();
    for partition in 0..partitions {
        let (_low, high) = client
            .fetch_watermarks(topic, partition as i32, config.request_timeout())
            .map_err(|e| broker_error(format!("reading the end offset of {topic}/{partition}"), e))?;
        let committed = committed.find_partition(topic, partition as i32).and_then(|p| match p.offset() {
            Offset::Offset(offset) if offset >= 0 => Some(offset as u64),
            _ => None,
        });
        lags.push(PartitionLag { partition, committed, end: high.max(0) as u64 });
    }
    std::thread::spawn(move || drop(client));
    Ok(lags)
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.config.brokers)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Connect, and check that every topic exists with its configured
    /// partition count. Blocks for up to the request timeout per topic.
    pub fn open(config: KafkaConfig) -> Result<Self, BusError> {
        let delivery_timeout = config.delivery_timeout_ms.to_string();
        let producer_defaults = [
            ("linger.ms", "2"),
            ("message.timeout.ms", delivery_timeout.as_str()),
            ("max.in.flight.requests.per.connection", "5"),
        ];
        let producer: FutureProducer = config
            .client(&producer_defaults, &REQUIRED[..2])?
            .create()
            .map_err(|e| broker_error(format!("creating a producer for {}", config.brokers), e))?;
        let metadata = config.metadata_client()?;
        let found = topic_partitions(&metadata, &config)?;
        let mut partitions = HashMap::new();
        for spec in &config.topics {
            match found.get(&spec.name).copied().flatten() {
                None => return Err(BusError::UnknownTopic { topic: spec.name.clone() }),
                Some(existing) if existing != spec.partitions => {
                    return Err(BusError::PartitionCountChanged {
                        topic: spec.name.clone(),
                        existing,
                        configured: spec.partitions,
                    });
                }
                Some(existing) => {
                    partitions.insert(spec.name.clone(), existing);
                }
            }
        }
        let consumed: Positions = Arc::default();
        let members: Members = Arc::default();
        let stop_committer = Arc::new(AtomicBool::new(false));
        let (committer_config, committer_positions, committer_members, committer_stop) =
            (config.clone(), Arc::clone(&consumed), Arc::clone(&members), Arc::clone(&stop_committer));
        std::thread::Builder::new()
            .name("kassa-kafka-commit".into())
            .spawn(move || run_committer(committer_config, committer_positions, committer_members, committer_stop))
            .map_err(|e| BusError::Broker { context: "starting the offset committer".into(), reason: e.to_string() })?;
        Ok(KafkaBus {
            config,
            producer,
            metadata: Arc::new(metadata),
            partitions,
            readers: std::sync::Mutex::new(HashMap::new()),
            consumed,
            members,
            stop_committer,
        })
    }

    fn partitions_of(&self, topic: &str) -> Result<u32, BusError> {
        self.partitions.get(topic).copied().ok_or_else(|| BusError::UnknownTopic { topic: topic.to_owned() })
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<(), BusError> {
        let partitions = self.partitions_of(topic)?;
        if partition >= partitions {
            return Err(BusError::NoSuchPartition { topic: topic.to_owned(), partition, partitions });
        }
        Ok(())
    }

    fn reader(&self, topic: &str, partition: u32) -> ReaderSlot {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            readers
                .entry((topic.to_owned(), partition))
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Reader { consumer: None, next: 0 }))),
        )
    }

    fn new_consumer(&self) -> Result<StreamConsumer, BusError> {
        let defaults = [
            // Offsets live in each service's own log; the group id only names the client.
            ("group.id", "kassa-reader"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            // A stored offset the broker no longer has is an error, never a silent jump.
            ("auto.offset.reset", "error"),
            ("fetch.wait.max.ms", "50"),
            ("queued.max.messages.kbytes", "8192"),
        ];
        self.config
            .client(&defaults, &REQUIRED[2..])?
            .create()
            .map_err(|e| broker_error(format!("creating a consumer for {}", self.config.brokers), e))
    }
}

fn to_message(topic: &str, partition: u32, message: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    Message {
        topic: topic.to_owned(),
        partition,
        offset: message.offset().max(0) as u64,
        key: message.key().unwrap_or_default().to_vec(),
        payload: message.payload().unwrap_or_default().to_vec(),
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
    }
}

#[async_trait]
impl Bus for KafkaBus {
    fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        self.partitions_of(topic)
    }

    async fn produce(&self, records: Vec<Record>) -> Result<Vec<Produced>, BusError> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in &records {
            let partition = partition_for(&record.key, self.partitions_of(&record.topic)?);
            let mut next = FutureRecord::to(&record.topic)
                .partition(partition as i32)
                .key(&record.key)
                .payload(&record.payload)
                .timestamp(record.timestamp_ms);
            loop {
                match self.producer.send_result(next) {
                    Ok(delivery) => {
                        deliveries.push((partition, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: let it drain.
                        next = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                        return Err(BusError::TooLarge {
                            topic: record.topic.clone(),
                            bytes: record.payload.len(),
                            reason: "over the producer's message.max.bytes".into(),
                        });
                    }
                    Err((error, _)) => {
                        return Err(broker_error(format!("producing to {}/{partition}", record.topic), error));
                    }
                }
            }
        }
        let mut produced = Vec::with_capacity(deliveries.len());
        for (partition, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(delivery)) => produced.push(Produced { partition, offset: delivery.offset.max(0) as u64 }),
                Ok(Err((error, message))) => {
                    if matches!(
                        error,
                        KafkaError::MessageProduction(
                            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
                        )
                    ) {
                        return Err(BusError::TooLarge {
                            topic: message.topic().to_owned(),
                            bytes: message.payload().map_or(0, <[u8]>::len),
                            reason: error.to_string(),
                        });
                    }
                    let context = format!("delivering to {}/{partition}", message.topic());
                    return Err(broker_error(context, error));
                }
                Err(_canceled) => return Err(BusError::Closed),
            }
        }
        Ok(produced)
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from_offset: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Message>, BusError> {
        self.check_partition(topic, partition)?;
        let slot = self.reader(topic, partition);
        let mut reader = slot.lock().await;
        if reader.consumer.is_none() || reader.next != from_offset {
            // A consumer is assigned once, never re-assigned: librdkafka 2.12 can abort on an
            // assignment change while the previous one is still stopping (confluentinc/librdkafka#5573,
            // seen here while the broker was down). Another offset gets a new consumer.
            if let Some(old) = reader.consumer.take() {
                std::thread::spawn(move || drop(old));
            }
            reader.consumer = Some(self.new_consumer()?);
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(topic, partition as i32, Offset::Offset(from_offset as i64))
                .map_err(|e| broker_error(format!("positioning {topic}/{partition}@{from_offset}"), e))?;
            let consumer = reader.consumer.as_ref().expect("created above");
            consumer.assign(&assignment).map_err(|e| broker_error(format!("assigning {topic}/{partition}"), e))?;
            reader.next = from_offset;
        }
        // Until this fetch returns, the consumer's position counts as unknown: after a fetch that
        // was dropped half-way (its subscription stopped), the next one starts on a new consumer
        // at the offset it asks for rather than trust where the old one stands.
        reader.next = UNKNOWN_POSITION;
        let consumer = reader.consumer.as_ref().expect("created above");
        let mut messages = Vec::new();
        let context = |e: KafkaError| match e.rdkafka_error_code() {
            // `auto.offset.reset=error`: the position is before the first or past the last message.
            Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
                BusError::OffsetGone { topic: topic.to_owned(), partition, offset: from_offset, reason: e.to_string() }
            }
            _ => broker_error(format!("reading {topic}/{partition}@{from_offset}"), e),
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Err(_waited) => {
                reader.next = from_offset;
                return Ok(messages);
            }
            Ok(Err(error)) => return Err(context(error)),
            Ok(Ok(message)) => messages.push(to_message(topic, partition, &message)),
        }
        // Whatever else is already here, without waiting.
        while messages.len() < max.max(1) {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(message)) => messages.push(to_message(topic, partition, &message)),
                Ok(Err(error)) => return Err(context(error)),
                Err(_none_ready) => break,
            }
        }
        // Only what was asked for: a message before the offset (none should be) is dropped.
        messages.retain(|m| m.offset >= from_offset);
        reader.next = messages.last().map_or(from_offset, |last| last.offset + 1);
        Ok(messages)
    }

    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, BusError> {
        self.check_partition(topic, partition)?;
        let (_low, high) = self
            .metadata
            .fetch_watermarks(topic, partition as i32, self.config.request_timeout())
            .map_err(|e| broker_error(format!("reading the end offset of {topic}/{partition}"), e))?;
        Ok(high.max(0) as u64)
    }

    fn note_consumed(&self, group: &str, topic: &str, partition: u32, next_offset: u64) {
        let mut consumed = self.consumed.lock().unwrap_or_else(|e| e.into_inner());
        let position = consumed.entry((group.to_owned(), topic.to_owned(), partition)).or_insert(0);
        *position = (*position).max(next_offset);
    }

    fn join_group(&self, group: &str, topic: &str) -> Result<Membership, BusError> {
        self.partitions_of(topic)?;
        let (tx, changes) = tokio::sync::mpsc::unbounded_channel();
        let context = MemberContext { topic: topic.to_owned(), changes: tx };
        let defaults = [
            ("group.id", group),
            ("enable.partition.eof", "false"),
            ("auto.offset.reset", "earliest"),
            // Eager rebalancing: a partition moves only after its owner handed it back.
            ("partition.assignment.strategy", "range"),
            ("session.timeout.ms", "10000"),
            // Also the rebalance timeout: how long a rebalance waits for a member
            // that stopped answering (killed) before going on without it. Above
            // the longest hand-over (`REVOKE_WAIT_MAX`, spent inside `poll`).
            ("max.poll.interval.ms", "25000"),
        ];
        let mut required = REQUIRED[2..].to_vec();
        if let Some(id) = &self.config.group_instance_id {
            required.push(("group.instance.id", id.as_str()));
        }
        let consumer: BaseConsumer<MemberContext> = self
            .config
            .client(&defaults, &required)?
            .create_with_context(context)
            .map_err(|e| broker_error(format!("joining group {group:?}"), e))?;
        consumer.subscribe(&[topic]).map_err(|e| broker_error(format!("joining group {group:?} on {topic:?}"), e))?;
        let member_id = match &self.config.group_instance_id {
            Some(id) => format!("{group}@{id}"),
            None => format!("{group}@{}", self.config.client_id),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let key = (group.to_owned(), topic.to_owned());
        self.members.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone());
        let (thread_stop, consumed, members) =
            (Arc::clone(&stop), Arc::clone(&self.consumed), Arc::clone(&self.members));
        std::thread::Builder::new()
            .name("kassa-kafka-group".into())
            .spawn(move || run_member(consumer, key, consumed, members, thread_stop))
            .map_err(|e| BusError::Broker { context: "starting a group member".into(), reason: e.to_string() })?;
        Ok(Membership { member_id, changes, _leave: Box::new(LeaveOnDrop(stop)) })
    }
}

/// Sets its flag when dropped: the member's thread then leaves the group.
struct LeaveOnDrop(Arc<AtomicBool>);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A group member's callbacks: they run on the member's own thread, inside `poll`.
struct MemberContext {
    topic: String,
    changes: tokio::sync::mpsc::UnboundedSender<Rebalance>,
}

impl ClientContext for MemberContext {}

/// The partitions of `topic` in a list.
fn partitions_in(list: &TopicPartitionList, topic: &str) -> Vec<u32> {
    list.elements_for_topic(topic).iter().map(|e| e.partition().max(0) as u32).collect()
}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        let rdkafka::consumer::Rebalance::Revoke(list) = rebalance else { return };
        let partitions = partitions_in(list, &self.topic);
        if partitions.is_empty() {
            return;
        }
        // Hold the rebalance until the service handed the partitions back.
        let (done, mut handed_back) = tokio::sync::oneshot::channel();
        if self.changes.send(Rebalance::Revoked { partitions: partitions.clone(), done }).is_err() {
            return;
        }
        let started = std::time::Instant::now();
        while matches!(handed_back.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)) {
            if started.elapsed() > REVOKE_WAIT_MAX {
                tracing::warn!(?partitions, "revoked partitions not handed back in time; letting the group go on");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        match rebalance {
            rdkafka::consumer::Rebalance::Assign(list) => {
                // The member only holds the assignment; the service reads through its own readers.
                if let Err(error) = consumer.pause(list) {
                    tracing::warn!(%error, "cannot pause the group member's partitions");
                }
                let partitions = partitions_in(list, &self.topic);
                if !partitions.is_empty() {
                    let _ = self.changes.send(Rebalance::Assigned(partitions));
                }
            }
            rdkafka::consumer::Rebalance::Error(error) => tracing::warn!(%error, "group rebalance failed"),
            rdkafka::consumer::Rebalance::Revoke(_) => {}
        }
    }
}

/// Keep a member in its group: poll (which runs the rebalance callbacks), and
/// commit the group's noted positions of the partitions it owns, until told to leave.
fn run_member(
    consumer: BaseConsumer<MemberContext>,
    key: (String, String),
    consumed: Positions,
    members: Members,
    stop: Arc<AtomicBool>,
) {
    let (group, topic) = key.clone();
    let mut committed: BTreeMap<u32, u64> = BTreeMap::new();
    let mut last_commit = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        // Partitions are paused: a message here is not expected, and not used.
        let _ = consumer.poll(Duration::from_millis(100));
        if last_commit.elapsed() < COMMIT_INTERVAL {
            continue;
        }
        last_commit = std::time::Instant::now();
        let owned: BTreeSet<u32> = match consumer.assignment() {
            Ok(list) => partitions_in(&list, &topic).into_iter().collect(),
            Err(_) => continue,
        };
        let noted = consumed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut list = TopicPartitionList::new();
        let mut batch = Vec::new();
        for ((g, t, partition), next) in noted {
            if g == group
                && t == topic
                && owned.contains(&partition)
                && committed.get(&partition) != Some(&next)
                && list.add_partition_offset(&topic, partition as i32, Offset::Offset(next as i64)).is_ok()
            {
                batch.push((partition, next));
            }
        }
        if batch.is_empty() {
            continue;
        }
        match consumer.commit(&list, CommitMode::Sync) {
            Ok(()) => committed.extend(batch),
            Err(error) => tracing::debug!(%error, %group, "cannot commit positions for lag monitoring; retrying"),
        }
    }
    members.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    // Leave the group now (the partitions go to the other members), then close.
    consumer.unsubscribe();
    let _ = consumer.poll(Duration::from_millis(100));
    drop(consumer);
}
