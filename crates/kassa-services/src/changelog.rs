//! The changelog: how a partition's state moves between the instances of a
//! service that share an input topic through a consumer group (authorization
//! on `payments.commands`, reconciliation on `settlement.events`).
//!
//! Each partition's commits go first to the same partition of the service's
//! changelog topic — the whole append: events, state writes, the consumed
//! offset — and only then into the instance's own log, recording how far in
//! the changelog it got in the same write. Effects (provider calls) start after
//! both.
//!
//! An instance that is assigned a partition first replays the changelog from
//! the offset it stored (0 if it never owned the partition) into its own log.
//! A partition's streams are written only by its commits, so replaying the
//! commits in order gives every stream the same sequence numbers and event ids
//! the previous owner gave them: consumers drop what the new owner publishes a
//! second time. The local log is a materialization of the changelog, which is
//! also how `--rebuild` works: an empty log replays every partition from the
//! start.
//!
//! Fencing. Taking a partition ends with a *claim* record carrying the next
//! owner epoch, and every commit carries its owner's epoch. Only the owner
//! writes to a partition's changelog, so when a commit does not land right
//! after the owner's previous record, someone else wrote in between: if that
//! is a newer epoch, this instance was expelled from the group while it still
//! ran (a zombie) and stops the partition before the commit has any effect;
//! if it is an older one, it was a zombie's late record. Replays skip records
//! of an epoch older than the latest claim.

use crate::consume::{RangeError, fetch_range, position_write, stored_offset};
use kassa_bus::{Bus, BusError, Record, partition_for};
use kassa_codec::{decode_value, encode_value};
use kassa_eventlog::{AppendRequest, EventLog, LogError, NewEvent, StateWrite, Table};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Format version of a changelog record (the first byte).
const VERSION: u8 = 1;

/// Events replayed into one append, at most.
const RESTORE_EVENTS_PER_APPEND_MAX: usize = 2048;

#[derive(Debug, Serialize, Deserialize)]
struct ChangelogEvent {
    event_id: u128,
    event_type: String,
    stream_id: u128,
    timestamp_ms: i64,
    causation_id: Option<u128>,
    correlation_id: Option<u128>,
    payload: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChangelogWrite {
    /// 0 state, 1 positions, 2 idempotency.
    table: u8,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChangelogRecord {
    /// The epoch of the owner that wrote it.
    epoch: u64,
    /// The owner's commit number within its epoch (its claim is 0). A commit
    /// sent again after an unclear failure has the same number: replays apply it once.
    seq: u64,
    /// A claim (the owner's name) starts `epoch`; it carries no change.
    claim: Option<String>,
    events: Vec<ChangelogEvent>,
    writes: Vec<ChangelogWrite>,
}

/// A record read back from the changelog.
#[derive(Debug)]
pub struct Decoded {
    pub epoch: u64,
    pub seq: u64,
    pub claim: Option<String>,
    pub request: AppendRequest,
}

/// Where an instance stored how far it replayed a partition's changelog.
pub fn offset_key(topic: &str, partition: u32) -> Vec<u8> {
    format!("{topic}/{partition}").into_bytes()
}

/// Where an instance stored the latest owner epoch it replayed.
fn epoch_key(topic: &str, partition: u32) -> Vec<u8> {
    format!("{topic}/{partition}/epoch").into_bytes()
}

fn epoch_write(topic: &str, partition: u32, epoch: u64) -> StateWrite {
    position_write(epoch_key(topic, partition), epoch)
}

/// Where an instance stored the number of the last commit of that epoch it applied.
fn seq_key(topic: &str, partition: u32) -> Vec<u8> {
    format!("{topic}/{partition}/seq").into_bytes()
}

fn seq_write(topic: &str, partition: u32, seq: u64) -> StateWrite {
    position_write(seq_key(topic, partition), seq)
}

/// The write that records a replayed (or produced) changelog offset.
pub fn offset_write(topic: &str, partition: u32, next_offset: u64) -> StateWrite {
    position_write(offset_key(topic, partition), next_offset)
}

/// A record key that Kafka's partitioner sends to `partition` (of `partitions`).
pub fn partition_key(partition: u32, partitions: u32) -> Vec<u8> {
    (0u64..)
        .map(|n| format!("partition-{partition}-{n}").into_bytes())
        .find(|key| partition_for(key, partitions) == partition)
        .expect("murmur2 reaches every partition")
}

/// Encode an append as a changelog record of owner epoch `epoch` (with
/// `claim`, a claim of that epoch by the named owner).
pub fn encode(epoch: u64, seq: u64, claim: Option<&str>, request: &AppendRequest) -> Vec<u8> {
    let record = ChangelogRecord {
        epoch,
        seq,
        claim: claim.map(str::to_owned),
        events: request
            .events
            .iter()
            .map(|e| ChangelogEvent {
                event_id: e.event_id,
                event_type: e.event_type.clone(),
                stream_id: e.stream_id,
                timestamp_ms: e.timestamp_ms,
                causation_id: e.causation_id,
                correlation_id: e.correlation_id,
                payload: e.payload.clone(),
            })
            .collect(),
        writes: request
            .writes
            .iter()
            .map(|w| ChangelogWrite {
                table: match w.table {
                    Table::State => 0,
                    Table::Positions => 1,
                    Table::Idempotency => 2,
                },
                key: w.key.clone(),
                value: w.value.clone(),
            })
            .collect(),
    };
    let mut bytes = vec![VERSION];
    bytes.extend_from_slice(&encode_value(&record));
    bytes
}

/// Decode a changelog record back into its epoch and the append it was made from.
pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    match bytes.split_first() {
        Some((&VERSION, body)) => {
            let record: ChangelogRecord = decode_value(body, "changelog record").map_err(|e| e.to_string())?;
            let mut writes = Vec::with_capacity(record.writes.len());
            for w in record.writes {
                let table = match w.table {
                    0 => Table::State,
                    1 => Table::Positions,
                    2 => Table::Idempotency,
                    other => return Err(format!("unknown table {other}")),
                };
                writes.push(StateWrite { table, key: w.key, value: w.value });
            }
            let events = record
                .events
                .into_iter()
                .map(|e| NewEvent {
                    event_id: e.event_id,
                    event_type: e.event_type,
                    stream_id: e.stream_id,
                    timestamp_ms: e.timestamp_ms,
                    causation_id: e.causation_id,
                    correlation_id: e.correlation_id,
                    payload: e.payload,
                })
                .collect();
            let request = AppendRequest { events, writes, ..Default::default() };
            Ok(Decoded { epoch: record.epoch, seq: record.seq, claim: record.claim, request })
        }
        Some((version, _)) => Err(format!("unknown changelog record version {version}")),
        None => Err("empty changelog record".into()),
    }
}

/// Why a partition could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading the changelog: {0}")]
    Bus(#[from] BusError),
    #[error("writing the restored state: {0}")]
    Log(#[from] LogError),
    #[error("changelog record {partition}@{offset} is unreadable ({reason}); the partition cannot be restored")]
    Corrupt { partition: u32, offset: u64, reason: String },
    #[error(transparent)]
    Range(#[from] RangeError),
}

/// How far a replay got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Records replayed (stale ones skipped are not counted).
    pub replayed: u64,
    /// The changelog offset after the last record read.
    pub next: u64,
    /// The latest owner epoch seen.
    pub epoch: u64,
}

/// The next records of `partition` in `next..end`, decoded, with their offsets.
async fn read_records(
    bus: &dyn Bus,
    topic: &str,
    partition: u32,
    next: u64,
    end: u64,
    empty_fetches: &mut u32,
) -> Result<Vec<(u64, Decoded)>, RestoreError> {
    let messages = fetch_range(bus, topic, partition, next, end, empty_fetches).await?;
    messages
        .into_iter()
        .map(|m| {
            let record =
                decode(&m.payload).map_err(|reason| RestoreError::Corrupt { partition, offset: m.offset, reason })?;
            Ok((m.offset, record))
        })
        .collect()
}

/// Replay `partition`'s changelog into `log`, from the offset stored there to
/// the changelog's end as it is now, skipping records of stale owners.
pub async fn restore(log: &EventLog, bus: &dyn Bus, topic: &str, partition: u32) -> Result<Restored, RestoreError> {
    let mut next = stored_offset(log, &offset_key(topic, partition))?;
    let mut epoch = stored_offset(log, &epoch_key(topic, partition))?;
    let mut seq = stored_offset(log, &seq_key(topic, partition))?;
    let end = bus.end_offset(topic, partition)?;
    let mut replayed = 0;
    let mut empty_fetches = 0;
    while next < end {
        let records = read_records(bus, topic, partition, next, end, &mut empty_fetches).await?;
        let mut combined = AppendRequest::default();
        for (offset, record) in records {
            next = offset + 1;
            if record.epoch > epoch {
                epoch = record.epoch;
                seq = 0;
                combined.writes.push(epoch_write(topic, partition, epoch));
                combined.writes.push(seq_write(topic, partition, seq));
            }
            if record.claim.is_none() {
                if record.epoch == epoch && record.seq > seq {
                    if combined.events.len() + record.request.events.len() > RESTORE_EVENTS_PER_APPEND_MAX {
                        log.append(std::mem::take(&mut combined)).await?;
                    }
                    seq = record.seq;
                    combined.events.extend(record.request.events);
                    combined.writes.extend(record.request.writes);
                    combined.writes.push(seq_write(topic, partition, seq));
                    replayed += 1;
                } else if record.epoch == epoch {
                    let again = record.seq;
                    tracing::debug!(partition, offset, again, "skipping a commit sent twice");
                } else {
                    let stale = record.epoch;
                    tracing::warn!(partition, offset, stale, epoch, "skipping a record of a stale owner");
                }
            }
            combined.writes.push(offset_write(topic, partition, next));
        }
        if !combined.events.is_empty() || !combined.writes.is_empty() {
            log.append(combined).await?;
        }
    }
    Ok(Restored { replayed, next, epoch })
}

/// Why [`commit_in_order`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// Stopped while a commit's fate on the changelog was unknown.
    #[error("stopped while the changelog was unreachable")]
    Stopped,
}

/// Make appends durable in their order: each goes on the changelog first
/// (with `ownership`; one produce after another), then into the log's queue,
/// and the log's replies are awaited at the end, so they share syncs. The log
/// writes queued appends in order, a crash keeps a prefix of them, and a
/// failed write makes the log refuse every later one: as safe as waiting for
/// each in turn. Not for appends with stream expectations (`expected`): a
/// conflict fails that append alone, and the ones queued after it would land.
pub async fn commit_in_order(
    log: &EventLog,
    bus: &dyn Bus,
    mut ownership: Option<&mut Ownership>,
    requests: Vec<AppendRequest>,
    timestamp_ms: i64,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), CommitError> {
    debug_assert!(requests.iter().all(|r| r.expected.is_empty()), "commit_in_order takes no stream expectations");
    let mut queued = Vec::with_capacity(requests.len());
    for mut request in requests {
        if let Some(ownership) = ownership.as_deref_mut() {
            let writes = ownership.publish(bus, &request, timestamp_ms, stop).await?.ok_or(CommitError::Stopped)?;
            request.writes.extend(writes);
        }
        queued.push(log.enqueue(request).await?);
    }
    for reply in queued {
        reply.recv().await.map_err(LogError::from)??;
    }
    Ok(())
}

/// Why an owner may not commit.
#[derive(Debug, thiserror::Error)]
pub enum Fenced {
    #[error("partition {partition} was taken over (owner epoch {newer} after this instance's {ours})")]
    TakenOver { partition: u32, ours: u64, newer: u64 },
    #[error("cannot check the changelog of partition {partition}: {reason}")]
    Unchecked { partition: u32, reason: String },
}

/// This instance's hold on one partition's changelog.
#[derive(Debug)]
pub struct Ownership {
    /// The changelog topic.
    topic: &'static str,
    partition: u32,
    key: Vec<u8>,
    /// This owner's epoch.
    pub epoch: u64,
    /// Offset of this owner's last record (its claim, then its commits).
    last_offset: u64,
    /// Number of this owner's last commit.
    seq: u64,
}

/// Produce one record to the partition's changelog; its offset. Retries until
/// the broker takes it, or `stop` turns true (then `None`).
async fn produce(
    bus: &dyn Bus,
    topic: &str,
    partition: u32,
    key: &[u8],
    payload: Vec<u8>,
    timestamp_ms: i64,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Option<u64> {
    let mut backoff_ms = 50;
    loop {
        let record = Record { topic: topic.to_owned(), key: key.to_vec(), payload: payload.clone(), timestamp_ms };
        match bus.produce(vec![record]).await {
            Ok(produced) if produced.first().map(|p| p.partition) == Some(partition) => {
                return produced.first().map(|p| p.offset);
            }
            Ok(produced) => {
                tracing::error!(partition, ?produced, "changelog record landed in another partition; not used");
                return None;
            }
            Err(error @ BusError::TooLarge { .. }) => {
                // Retrying cannot help: stop the partition, loudly (the commit has had no effect).
                tracing::error!(partition, %error, "a commit is too large for the changelog; the partition stops");
                return None;
            }
            Err(error) => {
                tracing::warn!(partition, %error, "cannot write the changelog; retrying");
                if *stop.borrow() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(2000);
            }
        }
    }
}

/// Take `partition` over: replay its changelog, then claim the next owner
/// epoch. The claim must land right after what was replayed; if another
/// writer got in between, replay and claim again. `None`: stopped first.
pub async fn take(
    log: &EventLog,
    bus: &dyn Bus,
    topic: &'static str,
    partition: u32,
    owner: &str,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<(Ownership, Restored)>, RestoreError> {
    let partitions = bus.partitions(topic)?;
    let key = partition_key(partition, partitions);
    let mut replayed = 0;
    loop {
        let restored = restore(log, bus, topic, partition).await?;
        replayed += restored.replayed;
        let epoch = restored.epoch + 1;
        if *stop.borrow() {
            return Ok(None);
        }
        let claim = encode(epoch, 0, Some(owner), &AppendRequest::default());
        let Some(offset) = produce(bus, topic, partition, &key, claim, 0, stop).await else { return Ok(None) };
        if offset == restored.next {
            let writes = vec![
                offset_write(topic, partition, offset + 1),
                epoch_write(topic, partition, epoch),
                seq_write(topic, partition, 0),
            ];
            log.append(AppendRequest { writes, ..Default::default() }).await?;
            let ownership = Ownership { topic, partition, key, epoch, last_offset: offset, seq: 0 };
            return Ok(Some((ownership, Restored { replayed, next: offset + 1, epoch })));
        }
        tracing::warn!(partition, offset, expected = restored.next, "another writer on the changelog; claiming again");
        if *stop.borrow() {
            return Ok(None);
        }
    }
}

/// [`take`] for a partition task: the ownership, or how the task ends —
/// stopped or failed first ([`PartitionEnd::Again`]: the group's next
/// assignment, or the 2 s check, tries again), or a corrupt changelog
/// ([`PartitionEnd::Fatal`]: replaying it again cannot help). `service` names
/// the service in the logs.
pub async fn take_partition(
    log: &EventLog,
    bus: &dyn Bus,
    topic: &'static str,
    partition: u32,
    owner: &str,
    stop: &tokio::sync::watch::Receiver<bool>,
    service: &str,
) -> Result<(Ownership, Restored), crate::consume::PartitionEnd> {
    use crate::consume::PartitionEnd;
    match take(log, bus, topic, partition, owner, stop).await {
        // Revoked meanwhile: the next owner claims anew.
        Ok(Some(_)) if *stop.borrow() => Err(PartitionEnd::Again),
        Ok(Some((taken, restored))) => {
            let (replayed, epoch) = (restored.replayed, taken.epoch);
            tracing::info!(service, partition, replayed, epoch, "partition taken from the changelog");
            Ok((taken, restored))
        }
        Ok(None) => Err(PartitionEnd::Again),
        Err(error @ RestoreError::Corrupt { .. }) => Err(PartitionEnd::Fatal(error.to_string())),
        Err(error) => {
            tracing::error!(service, partition, %error, "cannot restore the partition; not taking it");
            Err(PartitionEnd::Again)
        }
    }
}

impl Ownership {
    /// Put a commit on the changelog. Returns the writes that record it in the
    /// local append (the changelog offset and commit number). `Ok(None)`:
    /// stopped while the broker was away — the commit may or may not be on the
    /// changelog, so the caller must stop too (its next owner, or this
    /// instance's next take, replays it if it is). An error: this instance no
    /// longer owns the partition — the commit must have no effect.
    pub async fn publish(
        &mut self,
        bus: &dyn Bus,
        request: &AppendRequest,
        timestamp_ms: i64,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Vec<StateWrite>>, Fenced> {
        let seq = self.seq + 1;
        let payload = encode(self.epoch, seq, None, request);
        let Some(offset) = produce(bus, self.topic, self.partition, &self.key, payload, timestamp_ms, stop).await
        else {
            return Ok(None);
        };
        if offset != self.last_offset + 1 {
            self.check_between(bus, offset, Some(seq)).await?;
        }
        self.last_offset = offset;
        self.seq = seq;
        Ok(Some(vec![offset_write(self.topic, self.partition, offset + 1), seq_write(self.topic, self.partition, seq)]))
    }

    /// Check, without writing, that no newer owner has claimed the partition
    /// since this owner's last record: before provider calls that follow from
    /// a batch that records nothing (a reversal sent again), which no commit
    /// would fence.
    pub async fn confirm(&self, bus: &dyn Bus) -> Result<(), Fenced> {
        let end = bus
            .end_offset(self.topic, self.partition)
            .map_err(|e| Fenced::Unchecked { partition: self.partition, reason: e.to_string() })?;
        self.check_between(bus, end, None).await
    }

    /// What was written between this owner's last record and `offset`: a newer
    /// owner's claim fences this one; a stale owner's records are skipped by
    /// replays. With `commit`, that commit of this owner (sent before an
    /// unclear failure) is the only record of its epoch allowed there.
    async fn check_between(&self, bus: &dyn Bus, offset: u64, commit: Option<u64>) -> Result<(), Fenced> {
        let partition = self.partition;
        let unchecked = |reason: String| Fenced::Unchecked { partition, reason };
        let mut next = self.last_offset + 1;
        let mut empty_fetches = 0;
        while next < offset {
            let records = read_records(bus, self.topic, partition, next, offset, &mut empty_fetches)
                .await
                .map_err(|e| unchecked(e.to_string()))?;
            for (at, record) in records {
                if record.epoch > self.epoch {
                    return Err(Fenced::TakenOver { partition, ours: self.epoch, newer: record.epoch });
                }
                if let Some(seq) = commit
                    && record.epoch == self.epoch
                    && (record.claim.is_some() || record.seq != seq)
                {
                    return Err(unchecked(format!("an unexpected record of this owner's epoch at {at}")));
                }
                next = at + 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_to_the_append_it_was_made_from() {
        let request = AppendRequest {
            events: vec![NewEvent {
                event_id: 1 << 100,
                event_type: "payment.authorized".into(),
                stream_id: 7,
                timestamp_ms: -3,
                causation_id: Some(9),
                correlation_id: None,
                payload: vec![1, 2, 3],
            }],
            expected: Vec::new(),
            writes: vec![
                StateWrite { table: Table::State, key: b"a".to_vec(), value: Some(vec![4]) },
                StateWrite { table: Table::Positions, key: b"b".to_vec(), value: None },
                StateWrite { table: Table::Idempotency, key: b"c".to_vec(), value: Some(Vec::new()) },
            ],
            ..Default::default()
        };
        let decoded = decode(&encode(3, 5, None, &request)).unwrap();
        assert_eq!((decoded.epoch, decoded.seq, decoded.claim), (3, 5, None));
        assert_eq!(decoded.request.events, request.events);
        assert_eq!(decoded.request.writes, request.writes);
        let claim = decode(&encode(4, 0, Some("me"), &AppendRequest::default())).unwrap();
        assert_eq!((claim.epoch, claim.claim.as_deref()), (4, Some("me")));
    }

    #[test]
    fn bad_records_are_errors_that_say_why() {
        assert!(decode(&[]).unwrap_err().contains("empty"));
        assert!(decode(&[9, 1, 2]).unwrap_err().contains("version 9"));
        let mut bytes = encode(1, 1, None, &AppendRequest::default());
        bytes.push(0);
        assert!(decode(&bytes).unwrap_err().contains("trailing"));
        assert!(decode(&[VERSION, 0xff, 0xff]).is_err());
    }

    #[test]
    fn partition_keys_land_on_their_partition() {
        for partitions in [1, 2, 8, 13] {
            for partition in 0..partitions {
                assert_eq!(partition_for(&partition_key(partition, partitions), partitions), partition);
            }
        }
    }
}
