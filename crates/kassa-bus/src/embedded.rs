//! The embedded bus: topics in a local RocksDB, written with group commit.
//!
//! A partition's messages are stored in chunks: the messages one produce group
//! writes to one partition (consecutive offsets) share one RocksDB key, so the
//! per-key cost (a skip-list insert, an index entry) is paid once a chunk, not
//! once a message — the bus was the store with the most keys a payment.
//!
//! Chunk key: topic index u32 BE ++ partition u32 BE ++ first offset u64 BE ++ `0x02`.
//! Chunk value: message count u32 LE, then per message its length u32 LE and the message.
//!
//! A message: crc32c u32 LE (over the rest) ++ timestamp i64 LE ++ key length u32 LE ++ key ++ payload.
//!
//! Buses written before chunks keep one message per key: the 16-byte key
//! (topic ++ partition ++ offset) with the message as its value. Both read the
//! same way, so a bus written by an older version opens and reads as it was;
//! an older version cannot read chunks, so do not roll back past this one.

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

/// The marker that ends a chunk's key (a 16-byte key is one message, the older layout).
const CHUNK_MARKER: u8 = 0x02;
/// A message (its 16-byte header, key and payload) is at most this long: its length is a `u32`.
const MESSAGE_BYTES_MAX: usize = u32::MAX as usize;
/// A chunk holds at most this many messages…
const CHUNK_MESSAGES_MAX: usize = 1024;
/// …and ends once it holds this many bytes.
const CHUNK_BYTES_MAX: usize = 1 << 20;

fn chunk_key(topic: u32, partition: u32, first: u64) -> [u8; 17] {
    let mut key = [CHUNK_MARKER; 17];
    key[..16].copy_from_slice(&message_key(topic, partition, first));
    key
}

/// Appends one message, framed with its length, to `chunk`.
fn encode_message(chunk: &mut Vec<u8>, timestamp_ms: i64, key: &[u8], payload: &[u8]) {
    let length = u32::try_from(16 + key.len() + payload.len()).expect("checked by validate");
    chunk.extend_from_slice(&length.to_le_bytes());
    let start = chunk.len();
    chunk.extend_from_slice(&[0; 4]);
    chunk.extend_from_slice(&timestamp_ms.to_le_bytes());
    chunk.extend_from_slice(&(key.len() as u32).to_le_bytes());
    chunk.extend_from_slice(key);
    chunk.extend_from_slice(payload);
    let crc = crc32c::crc32c(&chunk[start + 4..]);
    chunk[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// One stored entry of a partition: its first offset and its messages, each
/// still encoded (checked and decoded by [`decode_message`] when read).
struct Entry<'a> {
    first: u64,
    messages: Vec<&'a [u8]>,
}

impl<'a> Entry<'a> {
    fn new(first: u64, messages: Vec<&'a [u8]>) -> Result<Entry<'a>, (u64, String)> {
        match first.checked_add(messages.len() as u64) {
            Some(_) => Ok(Entry { first, messages }),
            None => Err((first, format!("{} messages from offset {first} run past the last offset", messages.len()))),
        }
    }

    /// The offset after its last message.
    fn end(&self) -> u64 {
        self.first + self.messages.len() as u64
    }
}

/// Reads the entry stored under `key` (`prefix` is its topic and partition):
/// `Ok(None)` when the key is not that partition's.
fn decode_entry<'a>(prefix: &[u8], key: &[u8], value: &'a [u8]) -> Result<Option<Entry<'a>>, (u64, String)> {
    if !key.starts_with(prefix) {
        return Ok(None);
    }
    let Some(first) = key.get(8..16) else {
        return Err((0, format!("a key of {} bytes is shorter than the 16 of an entry", key.len())));
    };
    let first = u64::from_be_bytes(first.try_into().expect("8 bytes"));
    match &key[16..] {
        [] => return Entry::new(first, vec![value]).map(Some),
        [CHUNK_MARKER] => {}
        other => return Err((first, format!("a key ends in {} unknown bytes", other.len()))),
    }
    let bad = |reason: String| (first, reason);
    let count = value.get(..4).ok_or_else(|| bad("a chunk shorter than its count".into()))?;
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
    if count == 0 || count > value.len() / 4 {
        return Err(bad(format!("a chunk of {} bytes cannot hold {count} messages", value.len())));
    }
    let mut messages = Vec::with_capacity(count);
    let mut at = 4;
    for index in 0..count {
        let length =
            value.get(at..at + 4).ok_or_else(|| bad(format!("the chunk ends before message {index} of {count}")))?;
        let length = u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize;
        let message = (at + 4)
            .checked_add(length)
            .and_then(|end| value.get(at + 4..end))
            .ok_or_else(|| bad(format!("message {index} of {count} runs past the chunk's end")))?;
        messages.push(message);
        at += 4 + length;
    }
    if at != value.len() {
        return Err(bad(format!("{} bytes follow the chunk's last message", value.len() - at)));
    }
    Entry::new(first, messages).map(Some)
}

/// One message (as [`encode_message`] writes it, without its length): timestamp, key, payload.
fn decode_message(message: &[u8]) -> Result<(i64, Vec<u8>, Vec<u8>), String> {
    if message.len() < 16 {
        return Err(format!("{} bytes is shorter than the 16-byte header", message.len()));
    }
    let stored = u32::from_le_bytes(message[..4].try_into().map_err(|_| "header")?);
    if crc32c::crc32c(&message[4..]) != stored {
        return Err("checksum mismatch".into());
    }
    let timestamp_ms = i64::from_le_bytes(message[4..12].try_into().map_err(|_| "header")?);
    let key_len = u32::from_le_bytes(message[12..16].try_into().map_err(|_| "header")?) as usize;
    let key = message.get(16..16 + key_len).ok_or("key runs past the end")?.to_vec();
    Ok((timestamp_ms, key, message[16 + key_len..].to_vec()))
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
                iter.seek_for_prev(chunk_key(index, partition, u64::MAX));
                iter.status().map_err(storage(format!("reading the end of {}/{partition}", spec.name)))?;
                let prefix = &message_key(index, partition, 0)[..8];
                let next = match (iter.key(), iter.value()) {
                    (Some(key), Some(value)) => match decode_entry(prefix, key, value) {
                        Ok(Some(entry)) => entry.end(),
                        Ok(None) => 0,
                        Err((offset, reason)) => {
                            return Err(BusError::Corrupt { topic: spec.name.clone(), partition, offset, reason });
                        }
                    },
                    _ => 0,
                };
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
            let bytes = record.key.len().saturating_add(record.payload.len()).saturating_add(16);
            if bytes > MESSAGE_BYTES_MAX {
                return Err(BusError::TooLarge {
                    topic: record.topic.clone(),
                    bytes,
                    reason: format!("the embedded bus stores a message of at most {MESSAGE_BYTES_MAX} bytes"),
                });
            }
        }
        Ok(())
    }

    fn read(&self, topic: &str, partition: u32, from_offset: u64, max: usize) -> Result<Vec<Message>, BusError> {
        let index = self.topic(topic)?.index;
        let messages_cf = self.db.cf_handle(CF_MESSAGES).expect("created at open");
        let mut iter = self.db.raw_iterator_cf(messages_cf);
        let prefix = &message_key(index, partition, 0)[..8];
        // The entry holding `from_offset` starts at or before it: the last key at or
        // before its chunk key. (A partition's first entry starts at offset 0.)
        iter.seek_for_prev(chunk_key(index, partition, from_offset));
        if !iter.key().is_some_and(|key| key.starts_with(prefix)) {
            iter.seek(message_key(index, partition, 0));
        }
        let mut out = Vec::new();
        let mut expected = from_offset;
        while out.len() < max {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            let corrupt =
                |offset: u64, reason: String| BusError::Corrupt { topic: topic.to_owned(), partition, offset, reason };
            let entry = match decode_entry(prefix, key, value) {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err((offset, reason)) => return Err(corrupt(offset, reason)),
            };
            if out.is_empty() && entry.end() <= expected {
                // An entry before the one holding `from_offset`.
                iter.next();
                continue;
            }
            // The first entry read holds `from_offset`; each one after starts where the last ended.
            let in_place = if out.is_empty() { entry.first <= expected } else { entry.first == expected };
            if !in_place {
                let reason = format!("expected offset {expected}: the partition has a gap or an overlap");
                return Err(corrupt(entry.first, reason));
            }
            let skip = (expected - entry.first) as usize;
            for message in entry.messages.into_iter().skip(skip) {
                if out.len() == max {
                    break;
                }
                let (timestamp_ms, key, payload) =
                    decode_message(message).map_err(|reason| corrupt(expected, reason))?;
                out.push(Message { topic: topic.to_owned(), partition, offset: expected, key, payload, timestamp_ms });
                expected += 1;
            }
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
        let mut puts: Vec<(u32, u32, u64, &Record)> = Vec::new();
        self.next.clear();
        for records in group.iter() {
            if let Some(record) = records.iter().find(|record| !self.topics.contains_key(&record.topic)) {
                // Validated before queueing; unreachable unless topics change under us.
                replies.push(Err(BusError::UnknownTopic { topic: record.topic.clone() }));
                continue;
            }
            let mut produced = Vec::with_capacity(records.len());
            for record in records {
                let topic = &self.topics[&record.topic];
                let partition = partition_for(&record.key, topic.heads.len() as u32);
                let next = self
                    .next
                    .entry((topic.index, partition))
                    .or_insert_with(|| *topic.heads[partition as usize].borrow());
                produced.push(Produced { partition, offset: *next });
                *next += 1;
            }
            for (record, at) in records.iter().zip(&produced) {
                puts.push((self.topics[&record.topic].index, at.partition, at.offset, record));
            }
            replies.push(Ok(produced));
        }
        // A partition's messages of this group have consecutive offsets: sorted by
        // topic, partition and offset, each run is cut into chunks, one key each.
        // In key order, too: RocksDB inserts each key into the memtable's skip list
        // from where the previous one landed.
        puts.sort_unstable_by_key(|&(topic, partition, offset, _)| (topic, partition, offset));
        let mut chunk: Vec<u8> = Vec::new();
        let mut chunk_start: Option<(u32, u32, u64)> = None;
        let mut count = 0u32;
        let flush = |batch: &mut WriteBatch, chunk: &mut Vec<u8>, start: (u32, u32, u64), count: u32| {
            chunk[..4].copy_from_slice(&count.to_le_bytes());
            batch.put_cf(messages_cf, chunk_key(start.0, start.1, start.2), &chunk[..]);
            chunk.clear();
        };
        for (topic, partition, offset, record) in &puts {
            let continues = chunk_start
                .is_some_and(|(t, p, first)| t == *topic && p == *partition && first + u64::from(count) == *offset)
                && (count as usize) < CHUNK_MESSAGES_MAX
                && chunk.len() < CHUNK_BYTES_MAX;
            if !continues {
                if let Some(start) = chunk_start {
                    flush(&mut batch, &mut chunk, start, count);
                }
                chunk_start = Some((*topic, *partition, *offset));
                count = 0;
                chunk.extend_from_slice(&[0; 4]);
            }
            encode_message(&mut chunk, record.timestamp_ms, &record.key, &record.payload);
            count += 1;
        }
        if let Some(start) = chunk_start {
            flush(&mut batch, &mut chunk, start, count);
        }
        drop(puts);
        group.clear();
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topics() -> Vec<TopicSpec> {
        vec![TopicSpec::new("t", 2), TopicSpec::new("u", 1)]
    }

    fn record(key: &str, n: usize) -> Record {
        Record { topic: "t".into(), key: key.into(), payload: format!("m{n}").into_bytes(), timestamp_ms: n as i64 }
    }

    /// A key that lands on `partition` of a two-partition topic.
    fn key_on(partition: u32) -> String {
        (0..).map(|i| format!("k{i}")).find(|key| partition_for(key.as_bytes(), 2) == partition).unwrap()
    }

    /// Every message of `partition`, read from each offset in turn with several bounds.
    fn check_reads(bus: &EmbeddedBus, partition: u32, expected: &[Record]) {
        let end = expected.len() as u64;
        assert_eq!(bus.end_offset("t", partition).unwrap(), end);
        let step = (end / 200).max(1);
        for from in (0..end).step_by(step as usize).chain(end.saturating_sub(3)..end) {
            for max in [1, 3, 700, usize::MAX] {
                let read = bus.read("t", partition, from, max).unwrap();
                let want = (end - from).min(max as u64) as usize;
                assert_eq!(read.len(), want, "from {from}, at most {max}");
                for (message, offset) in read.iter().zip(from..) {
                    let record = &expected[offset as usize];
                    assert_eq!(message.offset, offset);
                    assert_eq!(message.partition, partition);
                    assert_eq!(message.key, record.key, "offset {offset}");
                    assert_eq!(message.payload, record.payload, "offset {offset}");
                    assert_eq!(message.timestamp_ms, record.timestamp_ms, "offset {offset}");
                }
            }
        }
        assert!(bus.read("t", partition, end, 10).unwrap().is_empty());
    }

    /// The first offsets of the stored entries of `partition` of topic "t", and whether each is a chunk.
    fn entries(bus: &EmbeddedBus, partition: u32) -> Vec<(u64, bool)> {
        let cf = bus.db.cf_handle(CF_MESSAGES).unwrap();
        bus.db
            .prefix_iterator_cf(cf, &message_key(0, partition, 0)[..8])
            .map(|item| item.unwrap().0)
            .take_while(|key| key[..8] == message_key(0, partition, 0)[..8])
            .map(|key| (u64::from_be_bytes(key[8..16].try_into().unwrap()), key.len() == 17))
            .collect()
    }

    #[tokio::test]
    async fn chunks_are_cut_by_count_and_size_and_read_back_from_every_offset_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key_on(0), key_on(1));
        let mut expected: [Vec<Record>; 2] = Default::default();
        let big = |n: usize| Record { payload: vec![n as u8; 300 << 10], ..record(&b, n) };
        {
            let bus = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap();
            let mut n = 0;
            let mut next = |key: &str| {
                n += 1;
                record(key, n)
            };
            let groups: Vec<Vec<Record>> = vec![
                vec![next(&a)],
                (0..5).map(|i| next(if i % 2 == 0 { &a } else { &b })).collect(),
                // One partition's run past two chunks' message bound: cut at 1,024 and 2,048.
                (0..2 * CHUNK_MESSAGES_MAX + 10).map(|_| next(&a)).collect(),
                // Five messages of 300 KiB: a chunk ends once it holds 1 MiB, so after four.
                (0..5).map(big).collect(),
                vec![next(&b)],
            ];
            for records in groups {
                let produced = bus.produce(records.clone()).await.unwrap();
                for (record, at) in records.into_iter().zip(produced) {
                    assert_eq!(at.offset, expected[at.partition as usize].len() as u64, "gapless offsets");
                    expected[at.partition as usize].push(record);
                }
            }
            // A group's messages for other topics or partitions are chunks of their own.
            bus.produce(vec![Record { topic: "u".into(), ..record(&a, 0) }]).await.unwrap();
            for partition in 0..2 {
                check_reads(&bus, partition, &expected[partition as usize]);
            }
        }
        let bus = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap();
        for partition in 0..2 {
            check_reads(&bus, partition, &expected[partition as usize]);
        }
        let chunk = |first| (first, true);
        let m = CHUNK_MESSAGES_MAX as u64;
        assert_eq!(entries(&bus, 0), vec![chunk(0), chunk(1), chunk(4), chunk(4 + m), chunk(4 + 2 * m)]);
        assert_eq!(entries(&bus, 1), vec![chunk(0), chunk(2), chunk(6), chunk(7)]);
        assert_eq!(bus.read("u", 0, 0, 10).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_bus_written_one_message_a_key_reads_and_grows_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let old_key = key_on(1);
        let mut expected: Vec<Record> = (0..5).map(|n| record(&old_key, n)).collect();
        {
            // The older layout, written by hand: messages 0..5 of partition 1, one a key.
            let bus = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap();
            let cf = bus.db.cf_handle(CF_MESSAGES).unwrap();
            for (offset, record) in expected.iter().enumerate() {
                let mut chunk = Vec::new();
                encode_message(&mut chunk, record.timestamp_ms, &record.key, &record.payload);
                bus.db.put_cf(cf, message_key(0, 1, offset as u64), &chunk[4..]).unwrap();
            }
        }
        let bus = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap();
        check_reads(&bus, 1, &expected);
        check_reads(&bus, 0, &[]);
        let records: Vec<Record> = (5..9).map(|n| record(&old_key, n)).collect();
        let produced = bus.produce(records.clone()).await.unwrap();
        assert_eq!(produced.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![5, 6, 7, 8]);
        expected.extend(records);
        check_reads(&bus, 1, &expected);
        drop(bus);
        let bus = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap();
        check_reads(&bus, 1, &expected);
        assert_eq!(entries(&bus, 1), vec![(0, false), (1, false), (2, false), (3, false), (4, false), (5, true)]);
    }

    #[tokio::test]
    async fn a_damaged_or_overlapping_chunk_is_an_error_naming_its_offset_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap();
        let key = key_on(0);
        bus.produce((0..4).map(|n| record(&key, n)).collect()).await.unwrap();
        let cf = bus.db.cf_handle(CF_MESSAGES).unwrap();
        let first_chunk = chunk_key(0, 0, 0);
        let good = bus.db.get_cf(cf, first_chunk).unwrap().unwrap();
        let read_with = |value: &[u8]| {
            bus.db.put_cf(cf, first_chunk, value).unwrap();
            bus.read("t", 0, 0, 10)
        };
        // A flipped payload byte of the fourth message (offset 3): the read fails there.
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let error = read_with(&flipped).unwrap_err();
        assert!(
            matches!(&error, BusError::Corrupt { offset: 3, reason, .. } if reason.contains("checksum")),
            "{error}"
        );
        for cut in [0, 3, 5, 20, good.len() - 1] {
            let error = read_with(&good[..cut]).unwrap_err();
            assert!(matches!(error, BusError::Corrupt { offset: 0, .. }), "cut at {cut}: {error}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(read_with(&longer).unwrap_err(), BusError::Corrupt { offset: 0, .. }));
        read_with(&good).unwrap();

        // A second chunk whose offsets overlap the first's: an error, not a message skipped or read twice.
        bus.db.put_cf(cf, chunk_key(0, 0, 2), &good).unwrap();
        let error = bus.read("t", 0, 0, 10).unwrap_err();
        assert!(matches!(&error, BusError::Corrupt { offset: 2, reason, .. } if reason.contains("overlap")), "{error}");
        // A chunk after a gap.
        bus.db.delete_cf(cf, chunk_key(0, 0, 2)).unwrap();
        bus.db.put_cf(cf, chunk_key(0, 0, 6), &good).unwrap();
        let error = bus.read("t", 0, 0, 10).unwrap_err();
        assert!(matches!(&error, BusError::Corrupt { offset: 6, reason, .. } if reason.contains("gap")), "{error}");
        // A key too short for an entry.
        bus.db.put_cf(cf, &message_key(0, 0, 0)[..12], b"x").unwrap();
        assert!(matches!(bus.read("t", 0, 0, 10).unwrap_err(), BusError::Corrupt { .. }));
        // A last offset past u64::MAX: an error at open, not a wrapped head.
        bus.db.put_cf(cf, chunk_key(0, 1, u64::MAX - 1), &good).unwrap();
        drop(bus);
        let error = EmbeddedBus::open(dir.path(), BusConfig::new(topics())).unwrap_err();
        assert!(matches!(&error, BusError::Corrupt { partition: 1, reason, .. } if reason.contains("past")), "{error}");
    }

    /// A valid chunk of `count` messages, then `edits` applied: (position, new byte) and a cut.
    fn damaged_chunk(count: usize, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
        let mut chunk = (count as u32).to_le_bytes().to_vec();
        for n in 0..count {
            encode_message(&mut chunk, n as i64, b"key", format!("payload {n}").as_bytes());
        }
        for &(at, byte) in edits {
            let len = chunk.len();
            chunk[at % len] = byte;
        }
        let keep = chunk.len() - cut % (chunk.len() + 1);
        chunk.truncate(keep);
        chunk
    }

    proptest! {
        #[test]
        fn any_stored_chunk_decodes_to_messages_or_an_error(
            count in 0usize..5,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in 0usize..8,
            first in prop_oneof![Just(0u64), Just(u64::MAX - 2), any::<u64>()],
        ) {
            let prefix = &message_key(0, 0, 0)[..8];
            let value = damaged_chunk(count, &edits, if cut < 4 { 0 } else { cut });
            let intact = edits.is_empty() && cut < 4;
            match decode_entry(prefix, &chunk_key(0, 0, first), &value) {
                Ok(Some(entry)) => {
                    prop_assert!(entry.first == first);
                    let decoded: Vec<_> = entry.messages.into_iter().map(decode_message).collect();
                    if intact {
                        prop_assert_eq!(decoded.len(), count);
                        prop_assert!(decoded.iter().all(Result::is_ok));
                    }
                }
                Ok(None) => prop_assert!(false, "a key with the partition's prefix is its entry"),
                Err(_) => prop_assert!(!intact || count == 0 || first.checked_add(count as u64).is_none()),
            }
        }
    }
}
