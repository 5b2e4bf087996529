//! The outbox relay: a service's own log is its outbox. The relay publishes
//! the log's events to a topic in order and stores how far it got in the same
//! log, so a crash of the process re-publishes at most the last batch, a
//! crash of the machine what went out since the log's last synced append
//! (the position is a `Durability::Derived` write; consumers drop duplicates
//! by event id or stream sequence), and it never skips one.

use crate::payment_key;
use kassa_bus::{Bus, Record};
use kassa_codec::encode_frame;
use kassa_eventlog::{AppendRequest, Durability, EventLog, StateWrite, Table};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Bounds of a relay. Units last.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    pub batch_events_max: usize,
    pub retry_backoff_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig { batch_events_max: 2048, retry_backoff_ms: 200 }
    }
}

fn position_key(topic: &str) -> Vec<u8> {
    format!("relay/{topic}").into_bytes()
}

/// The write that records `position` as the last one published to `topic`.
fn relayed_write(topic: &str, position: u64) -> StateWrite {
    StateWrite { table: Table::Positions, key: position_key(topic), value: Some(position.to_be_bytes().to_vec()) }
}

/// The last log position published to `topic` (0: none).
pub fn relayed_position(log: &EventLog, topic: &str) -> Result<u64, kassa_eventlog::LogError> {
    crate::consume::stored_offset(log, &position_key(topic))
}

/// The record that publishes one event, if `route` sends its type anywhere;
/// `frame` gives its bytes (only then).
fn record_for(
    route: fn(&str) -> Option<&'static str>,
    event_type: &str,
    stream_id: u128,
    timestamp_ms: i64,
    frame: impl FnOnce() -> Vec<u8>,
) -> Option<Record> {
    let topic = route(event_type)?;
    Some(Record { topic: topic.to_owned(), key: payment_key(stream_id), payload: frame(), timestamp_ms })
}

/// Publish each event of `log` to the topic `route` names for its event type
/// (none: not published), until `stop` turns true. One pass over the log serves every
/// topic; the relay's position is stored under `name`.
pub async fn run_relay(
    log: Arc<EventLog>,
    bus: Arc<dyn Bus>,
    name: &'static str,
    route: fn(&str) -> Option<&'static str>,
    config: RelayConfig,
    mut stop: watch::Receiver<bool>,
) {
    let topic = name;
    let mut head = log.watch_head();
    let mut position = match relayed_position(&log, topic) {
        Ok(position) => position,
        Err(error) => {
            tracing::error!(%topic, %error, "relay cannot read its position; stopping (the service must restart)");
            return;
        }
    };
    loop {
        if *stop.borrow() {
            return;
        }
        if *head.borrow_and_update() <= position {
            tokio::select! {
                _ = head.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let from = position + 1;
        let max = config.batch_events_max.max(1);
        // What was just written is in memory: read right here (one batch at most),
        // with no disk read and no hop to a blocking thread, and each frame to
        // publish is published as stored — the encoding of its envelope — with no
        // copy of what is not.
        let recent = log.follow_recent_frames(from, max, |frame, e| {
            (e.position, record_for(route, e.event_type, e.stream_id, e.timestamp_ms, || frame.to_vec()))
        });
        let batch = match recent {
            Some(read) => Ok(read),
            None => {
                let log = Arc::clone(&log);
                tokio::task::spawn_blocking(move || {
                    let envelopes = log.read_from(from, max)?;
                    Ok(envelopes
                        .iter()
                        .map(|e| {
                            (
                                e.position,
                                record_for(route, &e.event_type, e.stream_id, e.timestamp_ms, || encode_frame(e)),
                            )
                        })
                        .collect())
                })
                .await
            }
        };
        let read: Vec<(u64, Option<Record>)> = match batch {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => {
                tracing::error!(%topic, %error, "relay cannot read its log; stopping (the service must restart)");
                return;
            }
            Err(error) => {
                tracing::error!(%topic, %error, "relay read task failed");
                return;
            }
        };
        let Some(last) = read.last().map(|(position, _)| *position) else { continue };
        let records: Vec<Record> = read.into_iter().filter_map(|(_, record)| record).collect();
        if !records.is_empty()
            && let Err(error) = bus.produce(records).await
        {
            tracing::warn!(%topic, %error, "relay cannot publish; retrying");
            tokio::time::sleep(Duration::from_millis(config.retry_backoff_ms)).await;
            continue;
        }
        let write = relayed_write(topic, last);
        // Lost in a crash of the machine, the relay publishes again from an earlier
        // position (consumers drop what they have seen): not synced for its own sake.
        let append = AppendRequest { writes: vec![write], durability: Durability::Derived, ..Default::default() };
        if let Err(error) = log.append(append).await {
            tracing::error!(%topic, %error, "relay cannot store its position; stopping");
            return;
        }
        position = last;
    }
}
