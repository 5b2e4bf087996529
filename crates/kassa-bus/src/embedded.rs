//! The embedded bus: topics in a local RocksDB, written with group commit.
//!
//! Key: topic index u32 BE ++ partition u32 BE ++ offset u64 BE.
//! Value: crc32c u32 LE (over the rest) ++ timestamp i64 LE ++ key length u32 LE ++ key ++ payload.

use crate::{Bus, BusError, Coordinator, Membership, Message, Produced, Record, TopicSpec, partition_for};
use async_trait::async_trait;
use kassa_eventlog::GroupCommitConfig;
use kassa_eventlog::group_commit::{GroupCommitter, GroupWriter, Replier};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const CF_MESSAGES: &str = "messages";
const CF_TOPICS: &str = "topics";

/// Bounds of the embedded bus. Units last.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub topics: Vec<TopicSpec>,
    pub group: GroupCommitConfig,
    /// fsync every group before acknowledging a produce.
    pub sync: bool,
    /// Messages one fetch returns at most.
    pub fetch_messages_max: usize,
    /// Count what RocksDB writes ([`EmbeddedBus::write_counts`]): for benchmarks.
    pub statistics: bool,
}

impl BusConfig {
    pub fn new(topics: Vec<TopicSpec>) -> Self {
        // No linger: the bus syncs on its writer thread, so the next group gathers while it
        // syncs, and every hop of a payment waits for its produce.
        let group = GroupCommitConfig { linger_us: 0, ..GroupCommitConfig::default() };
        BusConfig { topics, group, sync: true, fetch_messages_max: 4096, statistics: false }
    }
}

struct Topic {
    index: u32,
    /// Per partition: the next offset, published after each durable write.
    heads: Vec<watch::Sender<u64>>,
}

/// The durable, single-process bus. Share it behind an `Arc`.
pub struct EmbeddedBus {
    db: Arc<DB>,
    path: PathBuf,
    topics: Arc<HashMap<String, Topic>>,
    committer: GroupCommitter<BusWriter>,
    config: BusConfig,
    /// Consumer groups of the services sharing this bus in this process.
    groups: Coordinator,
    /// The options the bus was opened with, when they count ([`BusConfig::statistics`]).
    counted: Option<Options>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus").field("path", &self.path).field("topics", &self.config.topics).finish()
    }
}

fn storage(context: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> BusError {
    let context = context.into();
    move |e| BusError::Storage { context, reason: e.into_string() }
}

fn message_key(topic: u32, partition: u32, offset: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&topic.to_be_bytes());
    key[4..8].copy_from_slice(&partition.to_be_bytes());
    key[8..].copy_from_slice(&offset.to_be_bytes());
    key
}

fn encode_value(timestamp_ms: i64, key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + key.len() + payload.len());
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&timestamp_ms.to_le_bytes());
    value.extend_from_slice(&(key.len() as u32).to_le_bytes());
    value.extend_from_slice(key);
    value.extend_from_slice(payload);
    let crc = crc32c::crc32c(&value[4..]);
    value[..4].copy_from_slice(&crc.to_le_bytes());
    value
}

fn decode_value(value: &[u8]) -> Result<(i64, Vec<u8>, Vec<u8>), String> {
    if value.len() < 16 {
        return Err(format!("{} bytes is shorter than the 16-byte header", value.len()));
    }
    let stored = u32::from_le_bytes(value[..4].try_into().map_err(|_| "header")?);
    if crc32c::crc32c(&value[4..]) != stored {
        return Err("checksum mismatch".into());
    }
    let timestamp_ms = i64::from_le_bytes(value[4..12].try_into().map_err(|_| "header")?);
    let key_len = u32::from_le_bytes(value[12..16].try_into().map_err(|_| "header")?) as usize;
    let key = value.get(16..16 + key_len).ok_or("key runs past the end")?.to_vec();
    Ok((timestamp_ms, key, value[16 + key_len..].to_vec()))
}

impl EmbeddedBus {
    /// Open (creating if missing) the bus at `path` with the configured topics.
    pub fn open(path: impl AsRef<Path>, config: BusConfig) -> Result<EmbeddedBus, BusError> {
        let path = path.as_ref().to_path_buf();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_background_jobs(2);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        if config.statistics {
            options.enable_statistics();
        }
        let cfs = [CF_MESSAGES, CF_TOPICS].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db =
            DB::open_cf_descriptors(&options, &path, cfs).map_err(storage(format!("opening {}", path.display())))?;
        let db = Arc::new(db);
        let topics_cf = db.cf_handle(CF_TOPICS).expect("created at open");
        let messages_cf = db.cf_handle(CF_MESSAGES).expect("created at open");

        let mut registry: HashMap<String, (u32, u32)> = HashMap::new();
        let mut iter = db.raw_iterator_cf(topics_cf);
        iter.seek_to_first();
        while let (Some(name), Some(value)) = (iter.key(), iter.value()) {
            let name = String::from_utf8(name.to_vec()).map_err(|_| BusError::Storage {
                context: "reading the topic registry".into(),
                reason: "topic name is not UTF-8".into(),
            })?;
            let (Some(index), Some(partitions)) = (value.get(..4), value.get(4..8)) else {
                return Err(BusError::Storage {
                    context: format!("topic {name:?}"),
                    reason: "malformed registry entry".into(),
                });
            };
            let index = u32::from_be_bytes(index.try_into().expect("4 bytes"));
            registry.insert(name, (index, u32::from_be_bytes(partitions.try_into().expect("4 bytes"))));
            iter.next();
        }
        iter.status().map_err(storage("reading the topic registry"))?;
        drop(iter);

        let mut topics = HashMap::new();
        for spec in &config.topics {
            if spec.partitions == 0 {
                return Err(BusError::NoSuchPartition { topic: spec.name.clone(), partition: 0, partitions: 0 });
            }
            let index = match registry.get(&spec.name) {
                Some(&(_, existing)) if existing != spec.partitions => {
                    return Err(BusError::PartitionCountChanged {
                        topic: spec.name.clone(),
                        existing,
                        configured: spec.partitions,
                    });
                }
                Some(&(index, _)) => index,
                None => {
                    let index = registry.values().map(|(i, _)| i + 1).max().unwrap_or(0);
                    let mut value = index.to_be_bytes().to_vec();
                    value.extend_from_slice(&spec.partitions.to_be_bytes());
                    let mut write = WriteOptions::default();
                    write.set_sync(config.sync);
                    db.put_cf_opt(topics_cf, spec.name.as_bytes(), value, &write)
                        .map_err(storage(format!("registering topic {:?}", spec.name)))?;
                    registry.insert(spec.name.clone(), (index, spec.partitions));
                    index
                }
            };
            let mut heads = Vec::new();
            for partition in 0..spec.partitions {
                let mut iter = db.raw_iterator_cf(messages_cf);
                iter.seek_for_prev(message_key(index, partition, u64::MAX));
                let next = match iter.key() {
                    Some(key) if key.len() == 16 && key[..8] == message_key(index, partition, 0)[..8] => {
                        u64::from_be_bytes(key[8..].try_into().expect("8 bytes")) + 1
                    }
                    _ => 0,
                };
                iter.status().map_err(storage(format!("reading the end of {}/{partition}", spec.name)))?;
                heads.push(watch::channel(next).0);
            }
            topics.insert(spec.name.clone(), Topic { index, heads });
        }
        let topics = Arc::new(topics);
        let writer =
            BusWriter { db: Arc::clone(&db), topics: Arc::clone(&topics), sync: config.sync, next: HashMap::new() };
        let committer = GroupCommitter::spawn("kassa-bus-writer", writer, config.group)
            .map_err(|e| BusError::Storage { context: "spawning the bus writer".into(), reason: e.to_string() })?;
        let counted = config.statistics.then_some(options);
        Ok(EmbeddedBus { db, path, topics, committer, config, groups: Coordinator::default(), counted })
    }

    /// What RocksDB has written for the bus (with [`BusConfig::statistics`] on).
    pub fn write_counts(&self) -> Option<kassa_eventlog::WriteCounts> {
        self.counted.as_ref().map(kassa_eventlog::WriteCounts::of)
    }

    fn topic(&self, name: &str) -> Result<&Topic, BusError> {
        self.topics.get(name).ok_or_else(|| BusError::UnknownTopic { topic: name.to_owned() })
    }

    fn head(&self, topic: &str, partition: u32) -> Result<&watch::Sender<u64>, BusError> {
        let t = self.topic(topic)?;
        t.heads.get(partition as usize).ok_or(BusError::NoSuchPartition {
            topic: topic.to_owned(),
            partition,
            partitions: t.heads.len() as u32,
        })
    }

    /// Produce without waiting for the queue: `Overloaded` when it is full.
    pub fn try_produce(&self, records: Vec<Record>) -> Result<kassa_eventlog::Pending<ProduceReply>, BusError> {
        self.validate(&records)?;
        self.committer.try_submit(records).map_err(|full| match full {
            kassa_eventlog::group_commit::TrySubmitError::Full => BusError::Overloaded,
            kassa_eventlog::group_commit::TrySubmitError::Stopped => BusError::Closed,
        })
    }

    fn validate(&self, records: &[Record]) -> Result<(), BusError> {
        for record in records {
            self.topic(&record.topic)?;
        }
        Ok(())
    }

    fn read(&self, topic: &str, partition: u32, from_offset: u64, max: usize) -> Result<Vec<Message>, BusError> {
        let index = self.topic(topic)?.index;
        let messages_cf = self.db.cf_handle(CF_MESSAGES).expect("created at open");
        let mut iter = self.db.raw_iterator_cf(messages_cf);
        iter.seek(message_key(index, partition, from_offset));
        let prefix = &message_key(index, partition, 0)[..8];
        let mut out = Vec::new();
        let mut expected = from_offset;
        while out.len() < max {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if !key.starts_with(prefix) {
                break;
            }
            let offset = u64::from_be_bytes(key[8..16].try_into().expect("16-byte key"));
            let corrupt = |reason: String| BusError::Corrupt { topic: topic.to_owned(), partition, offset, reason };
            if offset != expected {
                return Err(corrupt(format!("expected offset {expected}: the partition has a gap")));
            }
            let (timestamp_ms, key, payload) = decode_value(value).map_err(corrupt)?;
            out.push(Message { topic: topic.to_owned(), partition, offset, key, payload, timestamp_ms });
            expected += 1;
            iter.next();
        }
        iter.status().map_err(storage(format!("reading {topic}/{partition}")))?;
        Ok(out)
    }
}

/// The writer's answer to one produce request.
pub type ProduceReply = Result<Vec<Produced>, BusError>;

#[async_trait]
impl Bus for EmbeddedBus {
    fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        Ok(self.topic(topic)?.heads.len() as u32)
    }

    async fn produce(&self, records: Vec<Record>) -> Result<Vec<Produced>, BusError> {
        self.validate(&records)?;
        self.committer.submit(records).await.map_err(|_| BusError::Closed)?
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from_offset: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Message>, BusError> {
        let max = max.min(self.config.fetch_messages_max);
        let mut head = self.head(topic, partition)?.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *head.borrow_and_update() > from_offset {
                return self.read(topic, partition, from_offset, max);
            }
            match tokio::time::timeout_at(deadline, head.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(BusError::Closed),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }

    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, BusError> {
        Ok(*self.head(topic, partition)?.borrow())
    }

    fn join_group(&self, group: &str, topic: &str) -> Result<Membership, BusError> {
        let partitions = self.partitions(topic)?;
        Ok(self.groups.join(group, topic, partitions))
    }
}

struct BusWriter {
    db: Arc<DB>,
    topics: Arc<HashMap<String, Topic>>,
    sync: bool,
    /// Next offsets assigned in the group being written.
    next: HashMap<(u32, u32), u64>,
}

impl GroupWriter for BusWriter {
    type Request = Vec<Record>;
    type Reply = ProduceReply;

    fn weight(request: &Vec<Record>) -> usize {
        request.len().max(1)
    }

    fn write_group(&mut self, group: &mut Vec<Vec<Record>>, repliers: Vec<Replier<ProduceReply>>) {
        for (replier, reply) in repliers.into_iter().zip(self.write(group)) {
            replier.send(reply);
        }
    }
}

impl BusWriter {
    fn write(&mut self, group: &mut Vec<Vec<Record>>) -> Vec<ProduceReply> {
        let messages_cf = self.db.cf_handle(CF_MESSAGES).expect("created at open");
        let mut batch = WriteBatch::default();
        let mut replies = Vec::with_capacity(group.len());
        let mut puts: Vec<([u8; 16], Vec<u8>)> = Vec::new();
        self.next.clear();
        for records in group.drain(..) {
            let mut produced = Vec::with_capacity(records.len());
            let mut failed = None;
            for record in &records {
                let Some(topic) = self.topics.get(&record.topic) else {
                    failed = Some(BusError::UnknownTopic { topic: record.topic.clone() });
                    break;
                };
                let partition = partition_for(&record.key, topic.heads.len() as u32);
                let next = self
                    .next
                    .entry((topic.index, partition))
                    .or_insert_with(|| *topic.heads[partition as usize].borrow());
                produced.push(Produced { partition, offset: *next });
                *next += 1;
            }
            if let Some(error) = failed {
                // Validated before queueing; unreachable unless topics change under us.
                replies.push(Err(error));
                continue;
            }
            for (record, at) in records.iter().zip(&produced) {
                let index = self.topics[&record.topic].index;
                puts.push((
                    message_key(index, at.partition, at.offset),
                    encode_value(record.timestamp_ms, &record.key, &record.payload),
                ));
            }
            replies.push(Ok(produced));
        }
        // In key order: RocksDB inserts each key into the memtable's skip list
        // from where the previous one landed, so a partition's run costs little.
        puts.sort_unstable_by_key(|(key, _)| *key);
        for (key, value) in puts {
            batch.put_cf(messages_cf, key, value);
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.sync);
        if let Err(error) = self.db.write_opt(batch, &options) {
            let error = BusError::Storage { context: "writing a produce group".into(), reason: error.into_string() };
            tracing::error!(%error, "bus group write failed; nothing in the group was acknowledged");
            return replies.into_iter().map(|_| Err(error.clone())).collect();
        }
        for topic in self.topics.values() {
            for (partition, head) in topic.heads.iter().enumerate() {
                if let Some(&next) = self.next.get(&(topic.index, partition as u32)) {
                    head.send_replace(next);
                }
            }
        }
        replies
    }
}
