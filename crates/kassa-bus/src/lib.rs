//! The bus between Kassa's services: topics split into partitions, each an
//! ordered, durable sequence of messages addressed by offset.
//!
//! Delivery is at-least-once: a consumer reads from the offset *it* stored,
//! and stores its next offset in its own event log in the same write as the
//! state and events the messages produced (`kassa-eventlog`'s `Table::Positions`).
//! A crash between processing and that write redelivers; the write makes
//! processing effectively-once. The bus never tracks consumer positions itself.
//!
//! [`EmbeddedBus`] keeps topics in a local RocksDB with group commit;
//! [`KafkaBus`] keeps them on a Kafka cluster, behind the same [`Bus`] trait.

mod embedded;
mod group;
mod kafka;
mod partitioner;
mod subscription;

pub use embedded::{BusConfig, EmbeddedBus};
pub use group::{Coordinator, Membership, REVOKE_WAIT_MAX, Rebalance, range_assignment};
pub use kafka::{KafkaBus, KafkaConfig, PartitionLag, TopicInit, consumer_lag, init_topics};
pub use partitioner::{murmur2, partition_for};
pub use subscription::{Subscription, SubscriptionConfig};

use async_trait::async_trait;
use std::time::Duration;

/// A topic and its partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    /// Never delete old messages (retention off): a topic that is replayed from its start.
    pub kept_forever: bool,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        TopicSpec { name: name.into(), partitions, kept_forever: false }
    }

    /// A topic replayed from its start, so the cluster must never delete from it.
    pub fn kept_forever(name: impl Into<String>, partitions: u32) -> Self {
        TopicSpec { kept_forever: true, ..TopicSpec::new(name, partitions) }
    }
}

/// A message to produce. The key picks the partition (same key, same
/// partition, so one payment's messages stay in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub timestamp_ms: i64,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub timestamp_ms: i64,
}

/// Where a produced message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: u32,
    pub offset: u64,
}

/// Operating failures of the bus. Each names the topic/partition/offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("unknown topic {topic:?}; known topics are created at start-up")]
    UnknownTopic { topic: String },
    #[error("partition {partition} of topic {topic:?} does not exist (it has {partitions})")]
    NoSuchPartition { topic: String, partition: u32, partitions: u32 },
    #[error(
        "topic {topic:?} exists with {existing} partitions, configuration says {configured}; partition counts cannot change in place"
    )]
    PartitionCountChanged { topic: String, existing: u32, configured: u32 },
    #[error("bus storage ({context}): {reason}")]
    Storage { context: String, reason: String },
    #[error("corrupt message at {topic:?}/{partition}@{offset}: {reason}")]
    Corrupt { topic: String, partition: u32, offset: u64, reason: String },
    #[error("bus is overloaded: the produce queue is full; retry shortly")]
    Overloaded,
    #[error("the bus is closed")]
    Closed,
    #[error("Kafka broker ({context}): {reason}")]
    Broker { context: String, reason: String },
    /// A record larger than the broker or the topic takes: retrying cannot help.
    #[error("a record of {bytes} bytes is larger than {topic:?} takes ({reason})")]
    TooLarge { topic: String, bytes: usize, reason: String },
    /// The consumer's stored position is not on the broker: the messages it
    /// had not read yet were deleted (retention), or the topic was deleted and
    /// created again. Retrying cannot help, and skipping would lose them.
    #[error(
        "offset {offset} of {topic:?}/{partition} is not on the broker ({reason}): the messages from there on were \
         deleted, or the topic was created anew; this consumer cannot resume where it stopped"
    )]
    OffsetGone { topic: String, partition: u32, offset: u64, reason: String },
}

impl BusError {
    /// Whether reading on (or producing again) can never succeed, so the
    /// consumer must stop rather than retry.
    pub fn is_fatal(&self) -> bool {
        matches!(self, BusError::TooLarge { .. } | BusError::OffsetGone { .. } | BusError::Corrupt { .. })
    }
}

/// The bus seen by a service.
#[async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug + 'static {
    /// Partition count of a topic.
    fn partitions(&self, topic: &str) -> Result<u32, BusError>;

    /// Produce records; returns when all are durable, in order.
    async fn produce(&self, records: Vec<Record>) -> Result<Vec<Produced>, BusError>;

    /// Up to `max` messages of one partition from `from_offset` on. Waits up
    /// to `wait` for the first one when none is there yet.
    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from_offset: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Message>, BusError>;

    /// The offset the next message of a partition will get (its length).
    fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, BusError>;

    /// Note how far consumer `group` got in a partition (the next offset it
    /// will read), once that position is written in the consumer's own log.
    /// For lag monitoring only — positions are never read back from the bus:
    /// [`KafkaBus`] commits them as the group's offsets in the background, so
    /// any Kafka tool shows the lag; the embedded bus has nothing to show it to.
    fn note_consumed(&self, group: &str, topic: &str, partition: u32, next_offset: u64) {
        let _ = (group, topic, partition, next_offset);
    }

    /// Join consumer group `group` on `topic`: its partitions are shared
    /// among the group's members, each owned by one member at a time (see
    /// [`Rebalance`]). Dropping the membership leaves the group. By default
    /// this member is the only one and owns every partition.
    fn join_group(&self, group: &str, topic: &str) -> Result<Membership, BusError> {
        Ok(Membership::sole(group, self.partitions(topic)?))
    }
}
