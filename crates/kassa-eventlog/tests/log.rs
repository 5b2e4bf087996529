//! The event log against real RocksDB in temporary directories.

use kassa_codec::{Envelope, decode_frame, encode_frame};
use kassa_eventlog::*;
use std::collections::HashMap;
use std::sync::Arc;

fn event(id: u128, stream: u128, ts: i64) -> NewEvent {
    NewEvent {
        event_id: id,
        event_type: "test.happened".into(),
        stream_id: stream,
        timestamp_ms: ts,
        causation_id: Some(id + 1_000_000),
        correlation_id: None,
        payload: format!("payload-{id}").into_bytes(),
    }
}

fn small_chunks() -> LogConfig {
    // Small chunks so tests cross chunk boundaries often.
    LogConfig { chunk_events_max: 7, ..LogConfig::default() }
}

fn append(log: &EventLog, events: Vec<NewEvent>) -> Appended {
    log.append_blocking(AppendRequest { events, ..Default::default() }).unwrap()
}

#[test]
fn append_read_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path(), small_chunks()).unwrap();
        assert_eq!(log.head_position(), 0);
        let mut id = 0;
        for batch in 0..50 {
            let events = (0..batch % 9 + 1)
                .map(|_| {
                    id += 1;
                    event(id, id % 5, 1000 + id as i64)
                })
                .collect();
            let appended = append(&log, events);
            assert_eq!(appended.last_position, id as u64);
        }
        let all = log.read_from(1, usize::MAX).unwrap();
        assert_eq!(all.len(), id as usize);
        for (index, e) in all.iter().enumerate() {
            assert_eq!(e.position, index as u64 + 1);
            assert_eq!(e.event_id, index as u128 + 1);
            assert_eq!(e.payload, format!("payload-{}", index + 1).into_bytes());
        }
    }
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    let total = log.head_position();
    assert_eq!(log.read_from(1, usize::MAX).unwrap().len() as u64, total);
    // Reads that start mid-chunk and at chunk boundaries.
    for from in 1..=total {
        let page = log.read_from(from, 3).unwrap();
        assert_eq!(page[0].position, from);
    }
    let report = log.verify().unwrap();
    assert_eq!(report.events, total);
    // Appending after reopen continues the chain.
    append(&log, vec![event(9999, 1, 5)]);
    assert_eq!(log.verify().unwrap().events, total + 1);
}

#[test]
fn streams_have_gapless_sequences_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    for id in 1..=60u128 {
        append(&log, vec![event(id, id % 3, 0)]);
    }
    for stream in 0..3u128 {
        let events = log.read_stream(stream, 1, usize::MAX).unwrap();
        assert_eq!(events.len(), 20);
        for (index, e) in events.iter().enumerate() {
            assert_eq!(e.stream_id, stream);
            assert_eq!(e.stream_seq, index as u64 + 1);
        }
        let tail = log.read_stream(stream, 15, 100).unwrap();
        assert_eq!(tail.first().map(|e| e.stream_seq), Some(15));
        assert_eq!(tail.len(), 6);
    }
    assert!(log.read_stream(77, 1, 10).unwrap().is_empty());
}

/// The stream index keeps a run of a stream's events at consecutive positions
/// under one key: reads from any sequence, with any bound, and the stream heads
/// found again after a reopen (the writer's cache empty) are those of one key
/// an event. Seeded: requests of 1-6 events over 5 streams, often runs.
#[test]
fn streams_indexed_in_runs_read_back_from_any_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut model: HashMap<u128, Vec<u128>> = HashMap::new(); // stream -> event ids in order
    let mut id = 0u128;
    {
        let log = EventLog::open(dir.path(), small_chunks()).unwrap();
        for _ in 0..200 {
            let mut events = Vec::new();
            let mut stream = next(5) as u128;
            for _ in 0..next(6) + 1 {
                if next(3) == 0 {
                    stream = next(5) as u128; // else the run goes on
                }
                id += 1;
                model.entry(stream).or_default().push(id);
                events.push(event(id, stream, 0));
            }
            append(&log, events);
        }
    }
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    for (stream, ids) in &model {
        for from in 1..=ids.len() as u64 + 1 {
            for max in [1, 2, 3, 7, usize::MAX] {
                let read = log.read_stream(*stream, from, max).unwrap();
                let expected: Vec<u128> = ids.iter().skip(from as usize - 1).take(max).copied().collect();
                assert_eq!(
                    read.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                    expected,
                    "stream {stream} from {from} max {max}"
                );
                for (offset, e) in read.iter().enumerate() {
                    assert_eq!((e.stream_id, e.stream_seq), (*stream, from + offset as u64));
                }
            }
        }
        // The head found from the index: the next append expecting it is taken, one off is refused.
        let head = ids.len() as u64;
        let stale = AppendRequest {
            events: vec![event(1_000_000 + *stream, *stream, 0)],
            expected: vec![(*stream, ExpectedVersion::Exact(head - 1))],
            ..Default::default()
        };
        assert!(log.append_blocking(stale).is_err(), "stream {stream}: a stale version was taken");
        let current = AppendRequest {
            events: vec![event(2_000_000 + *stream, *stream, 0), event(3_000_000 + *stream, *stream, 0)],
            expected: vec![(*stream, ExpectedVersion::Exact(head))],
            ..Default::default()
        };
        log.append_blocking(current).unwrap();
        let tail = log.read_stream(*stream, head, 10).unwrap();
        assert_eq!(tail.iter().map(|e| e.stream_seq).collect::<Vec<_>>(), [head, head + 1, head + 2]);
    }
    assert_eq!(log.verify().unwrap().events, id as u64 + 2 * model.len() as u64);
}

#[test]
fn expected_versions_guard_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    let write = |key: &str| StateWrite { table: Table::State, key: key.into(), value: Some(b"v".to_vec()) };
    let first = AppendRequest {
        events: vec![event(1, 42, 0)],
        expected: vec![(42, ExpectedVersion::NoStream)],
        writes: vec![write("first")],
        ..Default::default()
    };
    log.append_blocking(first.clone()).unwrap();
    let again = AppendRequest { writes: vec![write("second")], ..first };
    let error = log.append_blocking(again).unwrap_err();
    assert!(matches!(error, LogError::Conflict { stream_id: 42, actual: 1, .. }), "{error}");
    // The refused append wrote nothing: neither its events nor its state.
    assert_eq!(log.head_position(), 1);
    assert_eq!(log.get(Table::State, b"second").unwrap(), None);
    assert_eq!(log.get(Table::State, b"first").unwrap(), Some(b"v".to_vec()));
    let exact = AppendRequest {
        events: vec![event(2, 42, 0)],
        expected: vec![(42, ExpectedVersion::Exact(1))],
        ..Default::default()
    };
    log.append_blocking(exact).unwrap();
}

/// Derived appends (not synced for their own sake) land in order with the synced
/// ones, all or nothing, and are there after a reopen; one carrying events is an
/// ordinary append: its events get positions and are read back.
#[test]
fn derived_appends_land_in_order_with_the_synced_ones() {
    let dir = tempfile::tempdir().unwrap();
    let write = |key: &str, value: u8| StateWrite { table: Table::State, key: key.into(), value: Some(vec![value]) };
    let derived =
        |writes: Vec<StateWrite>| AppendRequest { writes, durability: Durability::Derived, ..Default::default() };
    {
        let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
        log.append_blocking(derived(vec![write("view", 1), write("offset", 1)])).unwrap();
        let synced =
            AppendRequest { events: vec![event(1, 7, 0)], writes: vec![write("record", 1)], ..Default::default() };
        assert_eq!(log.append_blocking(synced).unwrap().last_position, 1);
        let with_events = AppendRequest { events: vec![event(2, 7, 0)], ..derived(vec![write("record", 2)]) };
        assert_eq!(log.append_blocking(with_events).unwrap().last_position, 2);
        log.append_blocking(derived(vec![write("view", 2), write("offset", 2)])).unwrap();
        assert_eq!(log.get(Table::State, b"view").unwrap(), Some(vec![2]));
    }
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    for (key, value) in [("view", 2), ("offset", 2), ("record", 2)] {
        assert_eq!(log.get(Table::State, key.as_bytes()).unwrap(), Some(vec![value]), "{key}");
    }
    let events = log.read_stream(7, 1, 10).unwrap();
    assert_eq!(events.iter().map(|e| (e.event_id, e.position)).collect::<Vec<_>>(), [(1, 1), (2, 2)]);
    assert_eq!(log.verify().unwrap().events, 2);
}

#[test]
fn a_log_opened_to_count_says_what_rocksdb_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = EventLog::open(dir.path().join("quiet"), LogConfig::default()).unwrap();
    assert_eq!(quiet.write_counts(), None);
    let log =
        EventLog::open(dir.path().join("counted"), LogConfig { statistics: true, ..LogConfig::default() }).unwrap();
    let before = log.write_counts().unwrap();
    let write = StateWrite { table: Table::State, key: b"k".to_vec(), value: Some(b"v".to_vec()) };
    let request =
        AppendRequest { events: vec![event(1, 7, 0), event(2, 7, 0)], writes: vec![write], ..Default::default() };
    log.append_blocking(request).unwrap();
    let after = log.write_counts().unwrap();
    // One chunk, one stream index entry (a run of two), a time index entry, the head and the table write.
    assert!(after.keys >= before.keys + 5, "{before:?} -> {after:?}");
    assert!(after.wal_syncs > before.wal_syncs && after.wal_bytes > before.wal_bytes, "{before:?} -> {after:?}");
}

#[test]
fn the_last_key_in_a_range_is_found_from_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    let writes = ["a/1", "b/1", "b/3", "b/7", "c"]
        .iter()
        .map(|k| StateWrite { table: Table::State, key: k.as_bytes().to_vec(), value: Some(k.as_bytes().to_vec()) })
        .collect();
    log.append_blocking(AppendRequest { writes, ..Default::default() }).unwrap();
    let last = |from: &str, until: &str| {
        log.last_in_range(Table::State, from.as_bytes(), until.as_bytes()).unwrap().map(|(k, _)| k)
    };
    assert_eq!(last("b/", "b0"), Some(b"b/7".to_vec()));
    assert_eq!(last("b/", "b/7"), Some(b"b/3".to_vec()), "the end is not in the range");
    assert_eq!(last("b/4", "b/7"), None);
    assert_eq!(last("d", "e"), None);
    assert_eq!(last("", "a"), None, "before every key");
    assert_eq!(last("", "zzz"), Some(b"c".to_vec()));
}

#[test]
fn state_positions_and_idempotency_are_written_with_the_events() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
        let request = AppendRequest {
            events: vec![event(1, 1, 0)],
            writes: vec![
                StateWrite { table: Table::State, key: b"pay/1".to_vec(), value: Some(b"captured".to_vec()) },
                StateWrite {
                    table: Table::Positions,
                    key: b"payments.commands/0".to_vec(),
                    value: Some(7u64.to_be_bytes().to_vec()),
                },
                StateWrite { table: Table::Idempotency, key: b"mer/key-1".to_vec(), value: Some(b"{}".to_vec()) },
            ],
            ..Default::default()
        };
        log.append_blocking(request).unwrap();
        log.append_blocking(AppendRequest {
            writes: vec![StateWrite { table: Table::State, key: b"pay/1".to_vec(), value: None }],
            ..Default::default()
        })
        .unwrap();
    }
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.get(Table::State, b"pay/1").unwrap(), None, "deleted by the second append");
    assert_eq!(log.get(Table::Positions, b"payments.commands/0").unwrap(), Some(7u64.to_be_bytes().to_vec()));
    assert_eq!(log.scan(Table::Idempotency, b"mer/").unwrap().len(), 1);
}

#[test]
fn time_range_reads_with_clamped_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    for id in 1..=100u128 {
        append(&log, vec![event(id, 1, id as i64 * 10)]);
    }
    // An event stamped in the past is recorded at the log's current time.
    append(&log, vec![event(101, 1, 5)]);
    let all = log.read_from(1, usize::MAX).unwrap();
    assert!(all.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
    assert_eq!(all[100].timestamp_ms, 1000);

    let range = log.read_time_range(255, 505, usize::MAX).unwrap();
    let times: Vec<i64> = range.iter().map(|e| e.timestamp_ms).collect();
    assert_eq!(times, (26..=50).map(|i| i * 10).collect::<Vec<_>>());
    assert!(log.read_time_range(-100, 0, 10).unwrap().is_empty());
    assert_eq!(log.read_time_range(990, 2000, 10).unwrap().len(), 3);
}

#[test]
fn concurrent_appenders_get_unique_gapless_positions() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EventLog::open(dir.path(), small_chunks()).unwrap());
    let threads: Vec<_> = (0..8u128)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..200u128)
                    .map(|i| {
                        let id = t * 1000 + i;
                        (append(&log, vec![event(id, t, 0)]).last_position, id)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<(u64, u128)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    acked.sort_unstable();
    assert_eq!(acked.len(), 1600);
    let all = log.read_from(1, usize::MAX).unwrap();
    for ((position, id), e) in acked.iter().zip(&all) {
        assert_eq!(e.position, *position);
        assert_eq!(e.event_id, *id);
    }
    // Each thread's stream got its own gapless sequence, in its own order.
    for t in 0..8u128 {
        let stream = log.read_stream(t, 1, usize::MAX).unwrap();
        let ids: Vec<u128> = stream.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, (0..200).map(|i| t * 1000 + i).collect::<Vec<_>>());
    }
    log.verify().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EventLog::open(dir.path(), LogConfig::default()).unwrap());
    let tasks: Vec<_> = (0..32u128)
        .map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                log.append(AppendRequest { events: vec![event(i, i, 0)], ..Default::default() }).await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(log.head_position(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_appends_are_written_in_the_order_queued() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    // Many appends in flight from one task, of varied sizes and mixed durability.
    let mut queued = Vec::new();
    let mut expected = Vec::new();
    for i in 0..200u128 {
        let events: Vec<NewEvent> = (0..(i % 5)).map(|k| event(i * 10 + k, i % 7, 0)).collect();
        expected.extend(events.iter().map(|e| e.event_id));
        let durability = if i % 3 == 0 { Durability::Derived } else { Durability::Synced };
        queued.push(log.enqueue(AppendRequest { events, durability, ..Default::default() }).await.unwrap());
    }
    let mut last = 0;
    for reply in queued {
        let appended = reply.recv().await.unwrap().unwrap();
        assert!(appended.last_position >= last, "an append queued later was written earlier");
        last = appended.last_position;
    }
    let written: Vec<u128> = log.read_from(1, 10_000).unwrap().iter().map(|e| e.event_id).collect();
    assert_eq!(written, expected);
}

#[test]
fn oversized_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { request_events_max: 3, ..LogConfig::default() };
    let log = EventLog::open(dir.path(), config).unwrap();
    let error =
        log.append_blocking(AppendRequest { events: (0..4).map(|i| event(i, 0, 0)).collect(), ..Default::default() });
    assert_eq!(error.unwrap_err(), LogError::TooLarge { events: 4, max: 3 });
    assert_eq!(log.head_position(), 0);
}

/// The log's RocksDB opened directly (the log itself closed), to write what it never would.
fn raw_db(dir: &std::path::Path) -> rocksdb::DB {
    let cfs = ["log", "streams", "time", "state", "positions", "idempotency", "snapshots", "meta"];
    rocksdb::DB::open_cf(&rocksdb::Options::default(), dir, cfs).unwrap()
}

/// Rewrite stored chunks directly in RocksDB, as corruption or an attacker would.
fn tamper(dir: &std::path::Path, edit: impl FnOnce(&mut HashMap<u64, Vec<u8>>)) {
    let db = raw_db(dir);
    let log_cf = db.cf_handle("log").unwrap();
    let mut chunks: HashMap<u64, Vec<u8>> = db
        .iterator_cf(log_cf, rocksdb::IteratorMode::Start)
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (u64::from_be_bytes(k[..8].try_into().unwrap()), v.to_vec())
        })
        .collect();
    let before: Vec<u64> = chunks.keys().copied().collect();
    edit(&mut chunks);
    for key in before {
        if !chunks.contains_key(&key) {
            db.delete_cf(log_cf, key.to_be_bytes()).unwrap();
        }
    }
    for (key, value) in chunks {
        db.put_cf(log_cf, key.to_be_bytes(), value).unwrap();
    }
}

fn frames(chunk: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    out
}

fn chunk_of(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut chunk = Vec::new();
    for frame in frames {
        chunk.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        chunk.extend_from_slice(frame);
    }
    chunk
}

fn filled_log(dir: &std::path::Path) {
    let log = EventLog::open(dir, small_chunks()).unwrap();
    // One append, so the chunks are full: positions 1, 8, 15, 22 and 29 start one.
    append(&log, (1..=30u128).map(|id| event(id, id % 2, 0)).collect());
}

#[test]
fn a_flipped_byte_is_detected_and_names_the_position() {
    let dir = tempfile::tempdir().unwrap();
    filled_log(dir.path());
    // Chunk keys are the first position: 1, 8, 15, 22, 29 with 7 per chunk.
    tamper(dir.path(), |chunks| {
        let chunk = chunks.get_mut(&15).unwrap();
        let len = chunk.len();
        chunk[len / 2] ^= 0x01;
    });
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    let error = log.verify().unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, LogError::Corrupt { position: 15..=21, .. } | LogError::BadChunk { position: 15..=21, .. }),
        "{text}"
    );
    assert!(text.contains("position"), "{text}");
    // Reads before the damage still work; reads across it fail, never silently.
    assert_eq!(log.read_from(1, 14).unwrap().len(), 14);
    assert!(log.read_from(1, 30).is_err());
    assert!(log.read_stream(0, 1, 100).is_err());
}

#[test]
fn a_rewritten_record_with_a_valid_checksum_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    filled_log(dir.path());
    tamper(dir.path(), |chunks| {
        let chunk = chunks.get_mut(&8).unwrap();
        let mut frames = frames(chunk);
        let mut envelope: Envelope = decode_frame(&frames[2]).unwrap();
        envelope.payload = b"a different amount".to_vec();
        frames[2] = encode_frame(&envelope); // a fresh, valid CRC
        *chunk = chunk_of(&frames);
    });
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    assert_eq!(log.verify().unwrap_err(), LogError::ChainBroken { position: 11 });
}

#[test]
fn a_dropped_chunk_is_a_gap_and_a_dropped_tail_is_truncation() {
    let dir = tempfile::tempdir().unwrap();
    filled_log(dir.path());
    tamper(dir.path(), |chunks| {
        chunks.remove(&8);
    });
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    assert_eq!(log.verify().unwrap_err(), LogError::Gap { expected: 8, found: 15 });
    drop(log);

    let dir = tempfile::tempdir().unwrap();
    filled_log(dir.path());
    tamper(dir.path(), |chunks| {
        chunks.remove(&29);
    });
    let error = EventLog::open(dir.path(), small_chunks()).unwrap_err();
    assert_eq!(error, LogError::Truncated { recorded: 30, found: 28 });
}

#[derive(Default, Debug, PartialEq)]
struct CountPerStream {
    counts: std::collections::BTreeMap<u128, u64>,
}

impl Projection for CountPerStream {
    fn apply(&mut self, envelope: &Envelope) -> Result<(), LogError> {
        *self.counts.entry(envelope.stream_id).or_default() += 1;
        Ok(())
    }
    fn to_snapshot(&self) -> Vec<u8> {
        kassa_codec::encode_value(&self.counts.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>())
    }
    fn from_snapshot(bytes: &[u8]) -> Result<Self, String> {
        let pairs: Vec<(u128, u64)> = kassa_codec::decode_value(bytes, "snapshot").map_err(|e| e.to_string())?;
        Ok(CountPerStream { counts: pairs.into_iter().collect() })
    }
}

#[test]
fn recovery_starts_from_the_snapshot_and_replays_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), small_chunks()).unwrap();
    for id in 1..=40u128 {
        append(&log, vec![event(id, id % 4, 0)]);
    }
    let full: Recovered<CountPerStream> = recover(&log, "counts").unwrap();
    assert_eq!(full.events_replayed, 40);
    assert_eq!(full.snapshot_position, None);
    log.save_snapshot("counts", full.position, &full.projection.to_snapshot()).unwrap();
    for id in 41..=50u128 {
        append(&log, vec![event(id, id % 4, 0)]);
    }
    let resumed: Recovered<CountPerStream> = recover(&log, "counts").unwrap();
    assert_eq!(resumed.snapshot_position, Some(40));
    assert_eq!(resumed.events_replayed, 10);
    assert_eq!(resumed.position, 50);
    let from_zero = {
        let mut p = CountPerStream::default();
        for e in log.read_from(1, usize::MAX).unwrap() {
            p.apply(&e).unwrap();
        }
        p
    };
    assert_eq!(resumed.projection, from_zero);

    // A snapshot that does not decode is skipped, not trusted.
    log.save_snapshot("counts", 50, b"\xff\xff garbage").unwrap();
    let fallback: Recovered<CountPerStream> = recover(&log, "counts").unwrap();
    assert_eq!(fallback.snapshot_position, None);
    assert_eq!(fallback.projection, from_zero);
    // A snapshot claiming a position past the log's end is refused.
    log.save_snapshot("future", 51, b"").unwrap();
    assert!(matches!(log.load_snapshot("future"), Err(LogError::BadSnapshot { .. })));
}

#[test]
fn opening_something_that_is_not_a_log_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"hello").unwrap();
    let error = EventLog::open(&file, LogConfig::default()).unwrap_err();
    assert!(error.to_string().contains("opening"), "{error}");
}

#[test]
fn damage_to_the_table_files_on_disk_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path(), small_chunks()).unwrap();
        append(&log, (1..=1000u128).map(|id| event(id, id % 5, 0)).collect());
        append(&log, (1001..=2000u128).map(|id| event(id, id % 5, 0)).collect());
        log.flush().unwrap();
    }
    let mut damaged = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sst") {
            let mut bytes = std::fs::read(&path).unwrap();
            if bytes.len() > 4096 {
                // Inside the data blocks, well before the index and footer.
                let at = bytes.len() / 3;
                for b in &mut bytes[at..at + 16] {
                    *b ^= 0x5a;
                }
                std::fs::write(&path, bytes).unwrap();
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0, "no table file to damage");
    match EventLog::open(dir.path(), small_chunks()) {
        Err(error) => assert!(!error.to_string().is_empty()),
        Ok(log) => {
            let error = log.verify().expect_err("damaged table files must not verify");
            assert!(!error.to_string().is_empty());
        }
    }
}

#[test]
fn followers_read_recent_events_from_memory_exactly_as_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    // Small chunks and a small memory: reads cross chunk boundaries and fall
    // back to disk once the chunk holding their start is evicted.
    let config = LogConfig { chunk_events_max: 7, recent_bytes_max: 3_000, ..LogConfig::default() };
    let log = EventLog::open(dir.path(), config.clone()).unwrap();
    let mut id = 0u128;
    for batch in 0..60u64 {
        let events = (0..batch % 11 + 1)
            .map(|_| {
                id += 1;
                event(id, id % 4, 1000 + id as i64)
            })
            .collect();
        append(&log, events);
        let head = log.head_position();
        for from in [1, head.saturating_sub(30), head.saturating_sub(9), head.saturating_sub(1), head, head + 1] {
            for max in [1, 5, 64] {
                let from_disk = log.read_from(from, max).unwrap();
                assert_eq!(log.follow_from(from, max).unwrap(), from_disk, "from {from} max {max}");
                // The frames as stored are the encoding of the envelopes read from disk
                // (what a relay publishes without decoding and encoding again).
                if let Some(frames) = log.follow_recent_frames(from, max, |frame, e| (frame.to_vec(), e.to_owned())) {
                    let frames = frames.unwrap();
                    let expected: Vec<_> = from_disk.iter().map(|e| (encode_frame(e), e.clone())).collect();
                    assert_eq!(frames, expected, "frames from {from} max {max}");
                }
            }
        }
    }
    // A reopened log has nothing in memory: followers read from disk.
    drop(log);
    let log = EventLog::open(dir.path(), config).unwrap();
    assert_eq!(log.follow_from(1, usize::MAX).unwrap(), log.read_from(1, usize::MAX).unwrap());
    assert_eq!(log.follow_from(1, usize::MAX).unwrap().len() as u128, id);
}

#[test]
fn of_two_writes_to_one_key_in_an_append_the_later_lands() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    let write = |key: &str, value: Option<&str>| StateWrite {
        table: Table::State,
        key: key.as_bytes().to_vec(),
        value: value.map(|v| v.as_bytes().to_vec()),
    };
    let writes = vec![
        write("b", Some("first")),
        write("a", Some("kept")),
        write("b", Some("second")),
        write("c", Some("put")),
        write("c", None),
    ];
    log.append_blocking(AppendRequest { writes, ..Default::default() }).unwrap();
    assert_eq!(log.get(Table::State, b"a").unwrap(), Some(b"kept".to_vec()));
    assert_eq!(log.get(Table::State, b"b").unwrap(), Some(b"second".to_vec()));
    assert_eq!(log.get(Table::State, b"c").unwrap(), None);
}

#[test]
fn an_unreadable_stream_index_refuses_that_append_and_every_later_one() {
    // Appends queued in order (a settlement close behind its commands) rely on it: one
    // refused for a storage error must not let a later one land without it.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
        append(&log, vec![event(1, 7, 0), event(2, 7, 0)]);
    }
    {
        let db = raw_db(dir.path());
        let mut key = 7u128.to_be_bytes().to_vec();
        key.extend_from_slice(&1u64.to_be_bytes());
        db.put_cf(db.cf_handle("streams").unwrap(), key, [1, 2, 3]).unwrap();
    }
    let log = EventLog::open(dir.path(), LogConfig::default()).unwrap();
    let refused = log.append_blocking(AppendRequest { events: vec![event(3, 7, 0)], ..Default::default() });
    assert!(matches!(refused, Err(LogError::BadChunk { .. })), "{refused:?}");
    let later = log.append_blocking(AppendRequest { events: vec![event(4, 8, 0)], ..Default::default() });
    assert!(later.is_err(), "an append after the refused one landed: {later:?}");
    assert_eq!(log.head_position(), 2);
}
