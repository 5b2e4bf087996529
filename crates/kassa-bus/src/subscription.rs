//! A consumer's read-ahead on one partition, bounded so a slow consumer
//! holds back fetching instead of growing memory.

use crate::{Bus, BusError, Message};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bounds of a subscription. Units last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// Messages fetched ahead of the consumer, at most.
    pub prefetch_messages_max: usize,
    /// Messages one fetch asks for.
    pub fetch_messages_max: usize,
    /// How long one fetch waits for new messages before asking again.
    pub fetch_wait_ms: u64,
    /// Pause after a failed fetch before the next try.
    pub retry_backoff_ms: u64,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            prefetch_messages_max: 1024,
            fetch_messages_max: 512,
            fetch_wait_ms: 500,
            retry_backoff_ms: 200,
        }
    }
}

/// Messages of one partition from a given offset on, in order.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Message, BusError>>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// Start reading `topic`/`partition` at `from_offset` (the consumer's own
    /// stored position). Must be called on a tokio runtime.
    pub fn start(bus: Arc<dyn Bus>, topic: &str, partition: u32, from_offset: u64, config: SubscriptionConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.prefetch_messages_max.max(1));
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            let mut next = from_offset;
            let wait = Duration::from_millis(config.fetch_wait_ms);
            loop {
                // Ask for no more than there is room for, so the bound holds.
                let room = tx.capacity().max(1).min(config.fetch_messages_max.max(1));
                match bus.fetch(&topic, partition, next, room, wait).await {
                    Ok(messages) => {
                        for message in messages {
                            next = message.offset + 1;
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(BusError::Closed) => return,
                    Err(error) if error.is_fatal() => {
                        tracing::error!(%topic, partition, offset = next, %error, "cannot read on");
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%topic, partition, offset = next, %error, "fetch failed; retrying");
                        if tx.send(Err(error)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(config.retry_backoff_ms)).await;
                    }
                }
            }
        });
        Subscription { rx, task }
    }

    /// The next message, or a fetch error: reading goes on after a passing one,
    /// and ends after a fatal one ([`BusError::is_fatal`]).
    pub async fn recv(&mut self) -> Option<Result<Message, BusError>> {
        self.rx.recv().await
    }

    /// Messages fetched and not yet received: never above `prefetch_messages_max`.
    pub fn buffered(&self) -> usize {
        self.rx.len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}
