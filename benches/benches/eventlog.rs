//! Event log throughput on this machine, with durability on.
//!
//! `cargo bench -p kassa-benches --bench eventlog`
//! Environment: KASSA_BENCH_EVENTS (default 1,000,000), KASSA_BENCH_THREADS (4),
//! KASSA_BENCH_EVENTS_PER_APPEND (16), KASSA_BENCH_IN_FLIGHT (128 appends per thread),
//! KASSA_BENCH_DIR (a directory on the disk to measure; default: the system temp dir).

// Floats only format the figures this prints; no money is computed here.
#![allow(clippy::float_arithmetic)]

use kassa_benches::new_event;
use kassa_eventlog::{AppendRequest, Appended, EventLog, LogConfig, LogError, Pending};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let events_total = if quick { 20_000 } else { env("KASSA_BENCH_EVENTS", 1_000_000) };
    let threads = env("KASSA_BENCH_THREADS", 4);
    let per_append = env("KASSA_BENCH_EVENTS_PER_APPEND", 16);
    let in_flight = env("KASSA_BENCH_IN_FLIGHT", 128) as usize;
    let dir = match std::env::var_os("KASSA_BENCH_DIR") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");

    let log = Arc::new(EventLog::open(dir.path(), LogConfig::default()).expect("open log"));
    println!(
        "event log benchmark: {events_total} events, {threads} appender threads, {per_append} events per append, {in_flight} appends in flight per thread, fsync on"
    );

    // Pre-build the events so the measurement is the log, not the fixture.
    let appends_per_thread = events_total / threads / per_append;
    let prepared: Vec<Vec<AppendRequest>> = (0..threads)
        .map(|t| {
            (0..appends_per_thread)
                .map(|a| {
                    let base = (t * appends_per_thread + a) * per_append;
                    AppendRequest { events: (base..base + per_append).map(new_event).collect(), ..Default::default() }
                })
                .collect()
        })
        .collect();

    let started = Instant::now();
    let workers: Vec<_> = prepared
        .into_iter()
        .map(|requests| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(requests.len());
                let mut pending: VecDeque<(Instant, Pending<Result<Appended, LogError>>)> = VecDeque::new();
                for request in requests {
                    if pending.len() >= in_flight {
                        let (at, p) = pending.pop_front().expect("non-empty");
                        p.wait().expect("writer").expect("append");
                        latencies.push(at.elapsed());
                    }
                    let at = Instant::now();
                    pending.push_back((at, log.append_pipelined(request).expect("queue")));
                }
                for (at, p) in pending {
                    p.wait().expect("writer").expect("append");
                    latencies.push(at.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();
    let elapsed = started.elapsed();
    let appended = log.head_position();
    let stats = log.commit_stats();
    let groups = stats.groups.load(Ordering::Relaxed).max(1);
    latencies.sort_unstable();
    println!(
        "append (durable):  {:>10.0} events/s  {appended} events in {:.2}s  {groups} fsynced groups, {:.0} events/group",
        appended as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        stats.weight.load(Ordering::Relaxed) as f64 / groups as f64,
    );
    println!(
        "time to durable:   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms (per append of {per_append} events, queueing included)",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    // Replay: every event decoded, checksum and hash-chain verified, one thread.
    for round in 0..2 {
        let started = Instant::now();
        let mut count = 0u64;
        let mut bytes = 0usize;
        for envelope in log.iter_from(1) {
            let envelope = envelope.expect("verified read");
            bytes += envelope.payload.len();
            count += 1;
        }
        let elapsed = started.elapsed();
        assert_eq!(count, appended);
        println!(
            "verified replay {}: {:>10.0} events/s  ({count} events, {:.1} MB payload, {:.2}s, 1 thread)",
            if round == 0 { "(cold)" } else { "(warm)" },
            count as f64 / elapsed.as_secs_f64(),
            bytes as f64 / 1e6,
            elapsed.as_secs_f64()
        );
    }
}
