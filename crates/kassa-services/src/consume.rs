//! What every consumer of the bus does the same way: find the position it
//! stored, and take messages in batches.

use kassa_bus::{Bus, BusError, Message, Subscription, SubscriptionConfig};
use kassa_eventlog::{AppendRequest, EventLog, LogError, NewEvent, Table};
use std::sync::Arc;
use tokio::sync::watch;

/// Events in one append, at most (below the log's own per-request bound).
pub const EVENTS_PER_APPEND_MAX: usize = 2048;

/// The next offset (or log position) stored under `key` in the positions
/// table; 0 when none is stored. A read error is an error, never "start over".
pub fn stored_offset(log: &EventLog, key: &[u8]) -> Result<u64, LogError> {
    match log.get(Table::Positions, key)? {
        None => Ok(0),
        Some(bytes) => bytes.as_slice().try_into().map(u64::from_be_bytes).map_err(|_| LogError::BadSnapshot {
            name: String::from_utf8_lossy(key).into_owned(),
            reason: format!("a stored position is 8 bytes, found {}", bytes.len()),
        }),
    }
}

/// The write that stores `next` under `key` in the positions table (read back by [`stored_offset`]).
pub fn position_write(key: Vec<u8>, next: u64) -> kassa_eventlog::StateWrite {
    kassa_eventlog::StateWrite { table: Table::Positions, key, value: Some(next.to_be_bytes().to_vec()) }
}

/// A state-table key: a text prefix and a 128-bit id, big-endian so keys of
/// one prefix sort by id.
pub fn id_key(prefix: &str, id: u128) -> Vec<u8> {
    let mut key = prefix.as_bytes().to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Fetches in a row that find nothing (each waits up to 1 s) before reading a range gives up.
pub const RANGE_EMPTY_FETCHES_MAX: u32 = 30;

/// Why a range of a topic could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{topic} partition {partition} ends at {end} but nothing can be read from {next} on")]
    Stuck { topic: String, partition: u32, next: u64, end: u64 },
}

/// The next messages of `topic`/`partition` in `next..end` (a replay up to an
/// end taken before it began). Waits for them: a fetch that finds nothing is
/// retried, up to [`RANGE_EMPTY_FETCHES_MAX`] in a row, counted in `empty_fetches`.
pub async fn fetch_range(
    bus: &dyn Bus,
    topic: &str,
    partition: u32,
    next: u64,
    end: u64,
    empty_fetches: &mut u32,
) -> Result<Vec<Message>, RangeError> {
    loop {
        let messages = bus.fetch(topic, partition, next, 1024, std::time::Duration::from_secs(1)).await?;
        let messages: Vec<_> = messages.into_iter().filter(|m| m.offset >= next && m.offset < end).collect();
        if !messages.is_empty() {
            *empty_fetches = 0;
            return Ok(messages);
        }
        *empty_fetches += 1;
        if *empty_fetches >= RANGE_EMPTY_FETCHES_MAX {
            return Err(RangeError::Stuck { topic: topic.to_owned(), partition, next, end });
        }
    }
}

/// Subscribe to `topic`/`partition` from the offset stored under `key`.
pub fn resume_subscription(
    log: &EventLog,
    bus: &Arc<dyn Bus>,
    topic: &str,
    partition: u32,
    key: &[u8],
) -> Result<Subscription, LogError> {
    let offset = stored_offset(log, key)?;
    Ok(Subscription::start(Arc::clone(bus), topic, partition, offset, SubscriptionConfig::default()))
}

/// `events` as appends of at most [`EVENTS_PER_APPEND_MAX`] each, in order.
/// Not atomic as a whole: callers make the chunks safe to repeat (consumers
/// drop repeats by event id).
pub fn appends_of(mut events: Vec<NewEvent>) -> Vec<AppendRequest> {
    let mut appends = Vec::new();
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(EVENTS_PER_APPEND_MAX));
        appends.push(AppendRequest { events: std::mem::replace(&mut events, rest), ..Default::default() });
    }
    appends
}

/// Wait for the next message, then take whatever else is already fetched, up
/// to `max`. `Ok(None)` when `stop` turns true or the subscription ends; an
/// error only when reading cannot go on ([`BusError::is_fatal`]): passing
/// failures are logged and the subscription retries.
pub async fn next_batch(
    subscription: &mut Subscription,
    max: usize,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Vec<Message>>, BusError> {
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return Ok(None),
            message = subscription.recv() => match message {
                Some(message) => message,
                None => return Ok(None),
            },
        };
        let mut messages = match first {
            Ok(message) => vec![message],
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "fetch failed; the subscription retries");
                continue;
            }
        };
        while subscription.buffered() > 0 && messages.len() < max {
            match subscription.recv().await {
                Some(Ok(message)) => messages.push(message),
                _ => break,
            }
        }
        return Ok(Some(messages));
    }
}

/// Follow `topic`/`partition` from the offset stored under `key`, handing each
/// batch (up to `max` messages) to `each`, until `stop` turns true (`Ok`), or
/// the stored offset cannot be read, reading cannot go on, or `each` fails
/// (`Err`, with the reason).
pub async fn follow<F, Fut>(
    log: &EventLog,
    bus: &Arc<dyn Bus>,
    (topic, partition, key): (&str, u32, &[u8]),
    max: usize,
    mut stop: watch::Receiver<bool>,
    mut each: F,
) -> Result<(), String>
where
    F: FnMut(Vec<Message>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut subscription = resume_subscription(log, bus, topic, partition, key)
        .map_err(|error| format!("cannot read the position in {topic}/{partition}: {error}"))?;
    while let Some(messages) = next_batch(&mut subscription, max, &mut stop).await.map_err(|e| e.to_string())? {
        each(messages).await?;
    }
    Ok(())
}

/// The partitions a group member owns now, shared with whoever reports them
/// (`GET /admin/partitions`).
pub type Owned = std::sync::Mutex<std::collections::BTreeSet<u32>>;

/// How a partition's task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionEnd {
    /// Told to stop, or failed in a way a fresh start may mend: started
    /// again while the partition is still assigned here.
    Again,
    /// Another member owns the partition now (this one was fenced): not
    /// started again until the group assigns it here anew. Starting it
    /// sooner would claim it back and fence the rightful owner.
    TakenOver,
    /// It cannot go on here at all: every task stops and the service ends
    /// (the process exits with this reason) rather than retry forever.
    Fatal(String),
}

/// One partition's task: its stop signal and its handle.
type RunningPartition = (watch::Sender<bool>, tokio::task::JoinHandle<PartitionEnd>);

/// Run one task per partition `membership` gives this member: `start(partition,
/// member_id, stop)` on assignment; on revocation, stop those tasks and wait for
/// them before handing the partitions back. A task that ended by itself (an
/// error) while its partition is still assigned is started again every 2 s, so
/// no partition stays unowned ([`PartitionEnd::Again`]); one that was taken
/// over waits for the next assignment ([`PartitionEnd::TakenOver`]); one that
/// cannot go on ([`PartitionEnd::Fatal`]) stops every task and this returns,
/// ending the service. On `stop`, stop them all and wait.
pub async fn run_partitions<F>(
    mut membership: kassa_bus::Membership,
    mut stop: watch::Receiver<bool>,
    owned: &Owned,
    start: F,
) where
    F: Fn(u32, String, watch::Receiver<bool>) -> tokio::task::JoinHandle<PartitionEnd>,
{
    let member_id = membership.member_id.clone();
    let launch = |partition: u32| {
        let (partition_stop, partition_stop_rx) = watch::channel(false);
        (partition_stop, start(partition, member_id.clone(), partition_stop_rx))
    };
    let set_owned = |running: &std::collections::HashMap<u32, RunningPartition>| {
        *owned.lock().unwrap_or_else(|e| e.into_inner()) = running.keys().copied().collect();
    };
    let mut running: std::collections::HashMap<u32, RunningPartition> = std::collections::HashMap::new();
    let mut check = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        let change = tokio::select! {
            _ = stop.changed() => break,
            change = membership.changes.recv() => change,
            _ = check.tick() => {
                let ended: Vec<u32> =
                    running.iter().filter(|(_, (_, task))| task.is_finished()).map(|(p, _)| *p).collect();
                let mut fatal = None;
                for partition in ended {
                    let Some((_, task)) = running.remove(&partition) else { continue };
                    match task.await {
                        Ok(PartitionEnd::Fatal(reason)) => {
                            tracing::error!(partition, %reason, "a partition cannot go on here; stopping the service");
                            fatal = Some(reason);
                        }
                        Ok(PartitionEnd::TakenOver) => {
                            tracing::warn!(partition, "another member took the partition over; waiting for the group");
                        }
                        Ok(PartitionEnd::Again) | Err(_) => {
                            tracing::warn!(partition, "the partition's task stopped; taking the partition again");
                            running.insert(partition, launch(partition));
                        }
                    }
                }
                set_owned(&running);
                if fatal.is_some() {
                    break;
                }
                continue;
            }
        };
        match change {
            None => break,
            Some(kassa_bus::Rebalance::Assigned(partitions)) => {
                tracing::info!(member = %member_id, ?partitions, "partitions assigned");
                for partition in partitions {
                    if running.get(&partition).is_none_or(|(_, task)| task.is_finished()) {
                        running.insert(partition, launch(partition));
                    }
                }
                set_owned(&running);
            }
            Some(kassa_bus::Rebalance::Revoked { partitions, done }) => {
                tracing::info!(member = %member_id, ?partitions, "partitions revoked; handing them over");
                let stopping = partitions.iter().filter_map(|p| running.remove(p)).collect();
                set_owned(&running);
                stop_partitions(stopping).await;
                drop(done);
            }
        }
    }
    owned.lock().unwrap_or_else(|e| e.into_inner()).clear();
    stop_partitions(running.into_values().collect()).await;
}

/// Tell the tasks to stop (hand their partitions over), then wait for them all.
async fn stop_partitions(partitions: Vec<RunningPartition>) {
    for (partition_stop, _) in &partitions {
        let _ = partition_stop.send(true);
    }
    for (_, task) in partitions {
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A partition that ended by itself is started again while assigned,
    /// unless another member took it over: that one waits for the group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_taken_over_is_not_started_again_until_assigned_anew() {
        let starts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (stop_tx, stop) = watch::channel(false);
        let owned = Arc::new(Owned::default());
        let counted = Arc::clone(&starts);
        let (owned_by_group, group_stop) = (Arc::clone(&owned), stop.clone());
        let group = tokio::spawn(async move {
            let membership = kassa_bus::Membership::sole("g", 2);
            run_partitions(membership, group_stop, &owned_by_group, move |partition, _owner, _stop| {
                counted[partition as usize].fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move { if partition == 0 { PartitionEnd::TakenOver } else { PartitionEnd::Again } })
            })
            .await
        });
        // The check runs every 2 s: long enough for two of them.
        tokio::time::sleep(std::time::Duration::from_millis(4_500)).await;
        assert_eq!(starts[0].load(Ordering::SeqCst), 1, "a partition taken over was claimed back");
        assert!(starts[1].load(Ordering::SeqCst) >= 2, "a partition that stopped was not started again");
        assert!(!owned.lock().unwrap().contains(&0));
        stop_tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), group).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_that_cannot_go_on_ends_the_member() {
        let (_stop_tx, stop) = watch::channel(false);
        let owned = Owned::default();
        let membership = kassa_bus::Membership::sole("g", 3);
        let ended = run_partitions(membership, stop, &owned, |partition, _owner, mut stop| {
            tokio::spawn(async move {
                if partition == 1 {
                    return PartitionEnd::Fatal("its log is corrupt".into());
                }
                let _ = stop.changed().await;
                PartitionEnd::Again
            })
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), ended).await.expect("the member ended");
        assert!(owned.lock().unwrap().is_empty());
    }
}
