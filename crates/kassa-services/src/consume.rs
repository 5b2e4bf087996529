//! What every consumer of the bus does the same way: find the position it
//! stored, and take messages in batches.

use kassa_bus::{Message, Subscription};
use kassa_eventlog::{EventLog, LogError, Table};
use tokio::sync::watch;

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

/// Wait for the next message, then take whatever else is already fetched, up
/// to `max`. `None` when `stop` turns true or the subscription ends.
pub async fn next_batch(
    subscription: &mut Subscription,
    max: usize,
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<Message>> {
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return None,
            message = subscription.recv() => message?,
        };
        let mut messages = match first {
            Ok(message) => vec![message],
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
        return Some(messages);
    }
}
