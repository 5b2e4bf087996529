//! The changelog: how a partition of authorization moves between instances.
//!
//! When several authorizers share `payments.commands` through a consumer
//! group, each partition's commits go first to the same partition of
//! `authorization.changelog` — the whole append: events, payment records,
//! `seen/` markers, sealed cards, the commands offset — and only then into the
//! instance's own log, recording how far in the changelog it got in the same
//! write. Provider calls start after both.
//!
//! An instance that is assigned a partition first replays the changelog from
//! the offset it stored (0 if it never owned the partition) into its own log.
//! A partition's streams (its payments and their routing streams) are written
//! only through its commits, so replaying the commits in order gives every
//! stream the same sequence numbers and event ids the previous owner gave
//! them: consumers of `payments.events` drop what the new owner publishes a
//! second time. The local log is a materialization of the changelog, which
//! is also how `--rebuild` works: an empty log replays every partition from
//! the start.

use crate::consume::stored_offset;
use crate::topics::AUTHORIZATION_CHANGELOG;
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
    events: Vec<ChangelogEvent>,
    writes: Vec<ChangelogWrite>,
}

/// Where an instance stored how far it replayed a partition's changelog.
pub fn offset_key(partition: u32) -> Vec<u8> {
    format!("{AUTHORIZATION_CHANGELOG}/{partition}").into_bytes()
}

/// The write that records a replayed (or produced) changelog offset.
pub fn offset_write(partition: u32, next_offset: u64) -> StateWrite {
    StateWrite { table: Table::Positions, key: offset_key(partition), value: Some(next_offset.to_be_bytes().to_vec()) }
}

/// A record key that Kafka's partitioner sends to `partition` (of `partitions`).
pub fn partition_key(partition: u32, partitions: u32) -> Vec<u8> {
    (0u64..)
        .map(|n| format!("partition-{partition}-{n}").into_bytes())
        .find(|key| partition_for(key, partitions) == partition)
        .expect("murmur2 reaches every partition")
}

/// Encode an append as a changelog record.
pub fn encode(request: &AppendRequest) -> Vec<u8> {
    let record = ChangelogRecord {
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

/// Decode a changelog record back into the append it was made from.
pub fn decode(bytes: &[u8]) -> Result<AppendRequest, String> {
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
            Ok(AppendRequest { events, expected: Vec::new(), writes })
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
}

/// Replay `partition`'s changelog into `log`, from the offset stored there to
/// the changelog's end as it is now. Returns how many records were replayed.
pub async fn restore(log: &EventLog, bus: &dyn Bus, partition: u32) -> Result<u64, RestoreError> {
    let mut next = stored_offset(log, &offset_key(partition))?;
    let end = bus.end_offset(AUTHORIZATION_CHANGELOG, partition)?;
    let mut replayed = 0;
    while next < end {
        let messages = bus.fetch(AUTHORIZATION_CHANGELOG, partition, next, 1024, Duration::from_secs(1)).await?;
        let mut combined = AppendRequest::default();
        for message in messages {
            if message.offset < next {
                continue;
            }
            let request = decode(&message.payload).map_err(|reason| RestoreError::Corrupt {
                partition,
                offset: message.offset,
                reason,
            })?;
            if combined.events.len() + request.events.len() > RESTORE_EVENTS_PER_APPEND_MAX {
                log.append(std::mem::take(&mut combined)).await?;
            }
            combined.events.extend(request.events);
            combined.writes.extend(request.writes);
            combined.writes.push(offset_write(partition, message.offset + 1));
            next = message.offset + 1;
            replayed += 1;
        }
        if !combined.events.is_empty() || !combined.writes.is_empty() {
            log.append(combined).await?;
        }
    }
    Ok(replayed)
}

/// Put an append on the partition's changelog; returns its offset. Retries
/// until the broker takes it or `stop` turns true (then `None`).
pub async fn publish(
    bus: &dyn Bus,
    partition: u32,
    key: &[u8],
    request: &AppendRequest,
    timestamp_ms: i64,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Option<u64> {
    let payload = encode(request);
    let mut backoff_ms = 50;
    loop {
        let record = Record {
            topic: AUTHORIZATION_CHANGELOG.to_owned(),
            key: key.to_vec(),
            payload: payload.clone(),
            timestamp_ms,
        };
        match bus.produce(vec![record]).await {
            Ok(produced) if produced.first().map(|p| p.partition) == Some(partition) => {
                return produced.first().map(|p| p.offset);
            }
            Ok(produced) => {
                tracing::error!(partition, ?produced, "changelog record landed in another partition; not used");
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
        };
        let decoded = decode(&encode(&request)).unwrap();
        assert_eq!(decoded.events, request.events);
        assert_eq!(decoded.writes, request.writes);
    }

    #[test]
    fn bad_records_are_errors_that_say_why() {
        assert!(decode(&[]).unwrap_err().contains("empty"));
        assert!(decode(&[9, 1, 2]).unwrap_err().contains("version 9"));
        let mut bytes = encode(&AppendRequest::default());
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
