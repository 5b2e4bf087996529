//! Group commit: many callers' writes share one write and one sync.
//!
//! Callers hand requests to a bounded queue; one named writer thread takes
//! everything queued (up to `batch_events_max`, waiting up to `linger_us` for
//! more), writes the group as one unit, and only then answers each caller.
//! While a sync is running the next group gathers in the queue, so the group
//! size grows with load by itself: on a disk whose fsync costs 2–3 ms this is
//! what turns hundreds of syncs per second into hundreds of thousands of
//! durable appends. The queue bound is the backpressure: a full queue makes
//! callers wait (async) or block (sync) instead of growing memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Bounds of a group committer. Units last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitConfig {
    /// Stop gathering a group once it holds this much weight (events).
    pub batch_events_max: usize,
    /// After the first request of a group, wait at most this long for more —
    /// only under load (the previous group held more than one request): after a
    /// group of one, the next request is written at once. (Resetting that after
    /// an idle spell was tried: it lingered too seldom under load, BENCHMARKS.md.)
    /// 0 means: take what is queued now and write. A short wait makes fewer,
    /// larger groups under load: each sync costs kernel CPU (the write-back,
    /// the disk's notification), and on a disk whose sync takes ~0.2 ms, groups
    /// formed only while a sync runs are small.
    pub linger_us: u64,
    /// Requests waiting for the writer; beyond this, callers wait.
    pub queue_requests_max: usize,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig { batch_events_max: 8192, linger_us: 250, queue_requests_max: 4096 }
    }
}

/// What the writer thread does with a group.
pub trait GroupWriter: Send + 'static {
    type Request: Send + 'static;
    type Reply: Send + 'static;
    /// How much of `batch_events_max` a request uses.
    fn weight(request: &Self::Request) -> usize;
    /// Write the group as one unit, and answer each request through its
    /// [`Replier`] (same order as `group`) once its outcome is final — which
    /// may be later, from another thread, when the sync is pipelined.
    fn write_group(&mut self, group: &mut Vec<Self::Request>, replies: Vec<Replier<Self::Reply>>);
}

/// The way back to one caller.
#[derive(Debug)]
pub struct Replier<R>(oneshot::Sender<R>);

impl<R> Replier<R> {
    /// Answer the caller. A caller that stopped waiting is not an error.
    pub fn send(self, reply: R) {
        let _ = self.0.send(reply);
    }
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    pub groups: AtomicU64,
    pub requests: AtomicU64,
    pub weight: AtomicU64,
}

type Queued<W> = (<W as GroupWriter>::Request, Replier<<W as GroupWriter>::Reply>);

/// The committer has stopped (its writer thread ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the writer has stopped")]
pub struct WriterStopped;

/// Why a request could not be queued at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrySubmitError {
    #[error("the write queue is full")]
    Full,
    #[error("the writer has stopped")]
    Stopped,
}

/// An answer that arrives once the request's group is written.
#[derive(Debug)]
pub struct Pending<R>(oneshot::Receiver<R>);

impl<R> Pending<R> {
    /// Block until the reply arrives. Not for use on an async runtime thread.
    pub fn wait(self) -> Result<R, WriterStopped> {
        self.0.blocking_recv().map_err(|_| WriterStopped)
    }

    /// Await the reply.
    pub async fn recv(self) -> Result<R, WriterStopped> {
        self.0.await.map_err(|_| WriterStopped)
    }
}

/// A writer thread and the queue in front of it.
pub struct GroupCommitter<W: GroupWriter> {
    tx: Option<mpsc::Sender<Queued<W>>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<GroupCommitStats>,
}

impl<W: GroupWriter> std::fmt::Debug for GroupCommitter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommitter").field("stats", &self.stats).finish()
    }
}

impl<W: GroupWriter> GroupCommitter<W> {
    pub fn spawn(name: &str, writer: W, config: GroupCommitConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(config.queue_requests_max.max(1));
        let stats = Arc::new(GroupCommitStats::default());
        let thread_stats = Arc::clone(&stats);
        let thread =
            std::thread::Builder::new().name(name.to_owned()).spawn(move || run(writer, rx, config, &thread_stats))?;
        Ok(GroupCommitter { tx: Some(tx), thread: Some(thread), stats })
    }

    fn sender(&self) -> Result<&mpsc::Sender<Queued<W>>, WriterStopped> {
        self.tx.as_ref().ok_or(WriterStopped)
    }

    /// Queue a request (waiting while the queue is full) and await its reply.
    pub async fn submit(&self, request: W::Request) -> Result<W::Reply, WriterStopped> {
        self.enqueue(request).await?.recv().await
    }

    /// Queue a request (waiting while the queue is full); the reply comes
    /// later. Requests are written in the order they were queued.
    pub async fn enqueue(&self, request: W::Request) -> Result<Pending<W::Reply>, WriterStopped> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.sender()?.send((request, Replier(reply_tx))).await.map_err(|_| WriterStopped)?;
        Ok(Pending(reply_rx))
    }

    /// Queue a request, blocking while the queue is full; the reply comes later.
    /// Lets one thread keep many requests in flight.
    pub fn submit_blocking(&self, request: W::Request) -> Result<Pending<W::Reply>, WriterStopped> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.sender()?.blocking_send((request, Replier(reply_tx))).map_err(|_| WriterStopped)?;
        Ok(Pending(reply_rx))
    }

    /// Queue a request only if there is room now: for callers that would
    /// rather shed load (answer "overloaded") than wait.
    pub fn try_submit(&self, request: W::Request) -> Result<Pending<W::Reply>, TrySubmitError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sender = self.tx.as_ref().ok_or(TrySubmitError::Stopped)?;
        sender.try_send((request, Replier(reply_tx))).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TrySubmitError::Full,
            mpsc::error::TrySendError::Closed(_) => TrySubmitError::Stopped,
        })?;
        Ok(Pending(reply_rx))
    }

    pub fn stats(&self) -> &GroupCommitStats {
        &self.stats
    }
}

impl<W: GroupWriter> Drop for GroupCommitter<W> {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued, then stop.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<W: GroupWriter>(
    mut writer: W,
    mut rx: mpsc::Receiver<Queued<W>>,
    config: GroupCommitConfig,
    stats: &GroupCommitStats,
) {
    let linger = Duration::from_micros(config.linger_us);
    let mut group = Vec::new();
    let mut replies = Vec::new();
    // Linger only under load: after a group of one request, the next is written at once.
    let mut loaded = false;
    while let Some((request, reply)) = rx.blocking_recv() {
        let mut weight = W::weight(&request);
        group.push(request);
        replies.push(reply);
        let deadline = Instant::now() + if loaded { linger } else { Duration::ZERO };
        while weight < config.batch_events_max {
            match rx.try_recv() {
                Ok((request, reply)) => {
                    weight += W::weight(&request);
                    group.push(request);
                    replies.push(reply);
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    // One sleep for the rest of the linger (not a poll): each wake-up costs a switch.
                    std::thread::sleep(deadline - now);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        loaded = group.len() > 1;
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(group.len() as u64, Ordering::Relaxed);
        stats.weight.fetch_add(weight as u64, Ordering::Relaxed);
        writer.write_group(&mut group, std::mem::take(&mut replies));
        group.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;

    /// A writer that holds each group until the test lets it go.
    struct GatedWriter {
        gate: std_mpsc::Receiver<()>,
        seen: std_mpsc::Sender<usize>,
    }

    impl GroupWriter for GatedWriter {
        type Request = u32;
        type Reply = u32;
        fn weight(_: &u32) -> usize {
            1
        }
        fn write_group(&mut self, group: &mut Vec<u32>, replies: Vec<Replier<u32>>) {
            let _ = self.seen.send(group.len());
            let _ = self.gate.recv();
            for (request, reply) in group.drain(..).zip(replies) {
                reply.send(request * 10);
            }
        }
    }

    #[test]
    fn a_full_queue_pushes_back_and_groups_form_while_the_writer_is_busy() {
        let (gate_tx, gate_rx) = std_mpsc::channel();
        let (seen_tx, seen_rx) = std_mpsc::channel();
        let config = GroupCommitConfig { batch_events_max: 100, linger_us: 0, queue_requests_max: 4 };
        let committer =
            GroupCommitter::spawn("test-writer", GatedWriter { gate: gate_rx, seen: seen_tx }, config).unwrap();
        let first = committer.submit_blocking(1).unwrap();
        assert_eq!(seen_rx.recv().unwrap(), 1, "the writer took the first request alone");
        // The writer is busy: four requests fit in the queue, the fifth is refused.
        let queued: Vec<_> = (2..=5).map(|r| committer.try_submit(r).unwrap()).collect();
        assert_eq!(committer.try_submit(6).unwrap_err(), TrySubmitError::Full);
        gate_tx.send(()).unwrap();
        assert_eq!(first.wait(), Ok(10));
        assert_eq!(seen_rx.recv().unwrap(), 4, "the four queued requests share one group");
        gate_tx.send(()).unwrap();
        let replies: Vec<_> = queued.into_iter().map(|p| p.wait().unwrap()).collect();
        assert_eq!(replies, vec![20, 30, 40, 50]);
        assert_eq!(committer.stats().groups.load(Ordering::Relaxed), 2);
        drop(gate_tx);
    }

    #[test]
    fn a_lone_request_is_written_at_once_whatever_the_linger() {
        let (gate_tx, gate_rx) = std_mpsc::channel();
        let (seen_tx, seen_rx) = std_mpsc::channel();
        // An hour's linger: only a writer that lingers under load alone answers here.
        let config = GroupCommitConfig { batch_events_max: 100, linger_us: 3_600_000_000, queue_requests_max: 4 };
        let committer =
            GroupCommitter::spawn("test-writer", GatedWriter { gate: gate_rx, seen: seen_tx }, config).unwrap();
        gate_tx.send(()).unwrap();
        let lone = committer.submit_blocking(7).unwrap();
        if seen_rx.recv_timeout(std::time::Duration::from_secs(60)) != Ok(1) {
            std::mem::forget(committer); // its writer sleeps out the hour: do not join it
            panic!("a lone request waited for the linger");
        }
        assert_eq!(lone.wait(), Ok(70));
        drop(gate_tx);
    }
}
