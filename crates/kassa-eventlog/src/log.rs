//! The event log: appends through group commit, verified reads.

use crate::LogError;
use crate::chunk::{decode_at, decode_ref_at, decode_verified, frames, push_frame};
use crate::group_commit::{GroupCommitConfig, GroupCommitter, GroupWriter, Replier};
use crate::keys::*;
use kassa_codec::{Envelope, EnvelopeRef, GENESIS_HASH, Hash, frame_hash};
use rocksdb::{ColumnFamilyDescriptor, DB, DBRawIterator, Options, WriteBatch, WriteOptions};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Bounds and switches of one event log. Units last.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub group: GroupCommitConfig,
    /// fsync every group before answering. Off only for tests and throwaway benchmarks.
    pub sync: bool,
    /// Events stored under one RocksDB key.
    pub chunk_events_max: usize,
    /// Events one append request may carry.
    pub request_events_max: usize,
    /// Stream heads kept in memory (the rest are looked up on disk).
    pub stream_heads_cached_max: usize,
    /// RocksDB memtable size, for each column family. 16 MiB: under a minute of
    /// sustained HTTP load, 64 MiB held ~25% more memory and took 4–26% fewer
    /// requests a second a pair (deeper skip lists to insert into); the bench,
    /// shorter, shows no clear difference (BENCHMARKS.md, session 14).
    pub write_buffer_bytes: usize,
    /// Bytes of the newest durable chunks kept in memory for followers of the
    /// head (`follow_from`), so a relay reads what was just written without
    /// going back to RocksDB.
    pub recent_bytes_max: usize,
    /// Count what RocksDB writes ([`EventLog::write_counts`]): for benchmarks;
    /// it costs a little on every write.
    pub statistics: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            group: GroupCommitConfig::default(),
            sync: true,
            chunk_events_max: 128,
            request_events_max: 4096,
            stream_heads_cached_max: 1 << 20,
            write_buffer_bytes: 16 << 20,
            recent_bytes_max: 8 << 20,
            statistics: false,
        }
    }
}

/// An event to append. The log assigns position, stream sequence and chain link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_id: u128,
    pub event_type: String,
    pub stream_id: u128,
    /// Injected time; the log keeps timestamps non-decreasing by raising a
    /// time earlier than the previous record's to that record's time.
    pub timestamp_ms: i64,
    pub causation_id: Option<u128>,
    pub correlation_id: Option<u128>,
    pub payload: Vec<u8>,
}

/// What a stream must look like for an append to go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    Any,
    NoStream,
    /// The stream's last sequence number.
    Exact(u64),
}

/// The service's own tables, written in the same batch as the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Projections and other derived state.
    State,
    /// Consumed input positions (topic/partition → next offset).
    Positions,
    /// Idempotency records (key → stored response).
    Idempotency,
}

impl Table {
    fn cf(self) -> &'static str {
        match self {
            Table::State => CF_STATE,
            Table::Positions => CF_POSITIONS,
            Table::Idempotency => CF_IDEMPOTENCY,
        }
    }
}

/// A put (`Some`) or delete (`None`) in one of the service's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    pub table: Table,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// One atomic append: all of it is durable, or none of it.
#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    pub events: Vec<NewEvent>,
    pub expected: Vec<(u128, ExpectedVersion)>,
    pub writes: Vec<StateWrite>,
    pub durability: Durability,
}

/// When an append is on the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Synced before its caller hears back (with its group, one fsync).
    #[default]
    Synced,
    /// State derived from elsewhere that its writer can rebuild — a read model
    /// of a topic with the offset it has read to, a relay's position: written in
    /// order with every other append, all or nothing, but not synced for its own
    /// sake. A crash of the process loses none of it (the write is in the
    /// kernel's hands); a crash of the machine may lose it, and never without
    /// everything appended after it (the next synced append syncs it too), so
    /// the state and its offset go back together and the writer reads again.
    /// An append with events is always synced.
    Derived,
}

impl AppendRequest {
    /// Whether its group must be synced before anyone hears back.
    fn needs_sync(&self) -> bool {
        self.durability == Durability::Synced || !self.events.is_empty()
    }
}

/// Where an append landed. `first_position > last_position` when it carried no events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_position: u64,
    pub last_position: u64,
}

/// A key and its value from one of the service's tables.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Result of a full verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: u64,
    pub head_position: u64,
    pub head_hash: Hash,
}

/// Stream ids are random or time-ordered 128-bit numbers made by Kassa (never
/// chosen by a caller), so a fold and a multiply hash them well — SipHash
/// showed up in profiles of the append path.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, value: u128) {
        self.0 = ((value as u64) ^ ((value >> 64) as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u128, V, BuildHasherDefault<IdHasher>>;

#[derive(Debug, Clone, Copy)]
struct Head {
    position: u64,
    hash: Hash,
    timestamp_ms: i64,
}

/// A RocksDB event log with group commit. Cheap to share behind an `Arc`.
pub struct EventLog {
    db: Arc<DB>,
    path: PathBuf,
    committer: GroupCommitter<LogWriter>,
    durable_position: Arc<watch::Sender<u64>>,
    recent: Arc<Mutex<Recent>>,
    config: LogConfig,
    /// The options the log was opened with, when they count ([`LogConfig::statistics`]).
    counted: Option<Options>,
}

/// What RocksDB wrote for a store since it was opened: keys (each event log
/// chunk, index entry and table write is one), WAL syncs and WAL bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounts {
    pub keys: u64,
    pub wal_syncs: u64,
    pub wal_bytes: u64,
}

impl WriteCounts {
    /// The counts of RocksDB options opened with statistics on.
    pub fn of(options: &Options) -> WriteCounts {
        use rocksdb::statistics::Ticker;
        WriteCounts {
            keys: options.get_ticker_count(Ticker::NumberKeysWritten),
            wal_syncs: options.get_ticker_count(Ticker::WalFileSynced),
            wal_bytes: options.get_ticker_count(Ticker::WalFileBytes),
        }
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("path", &self.path)
            .field("durable_position", &*self.durable_position.borrow())
            .finish()
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}

impl EventLog {
    /// Open (creating if missing) the log at `path`, and check its tail.
    pub fn open(path: impl AsRef<Path>, config: LogConfig) -> Result<EventLog, LogError> {
        let path = path.as_ref().to_path_buf();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_background_jobs(2);
        options.set_write_buffer_size(config.write_buffer_bytes);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        if config.statistics {
            options.enable_statistics();
        }
        let descriptors = ALL_CFS.iter().map(|name| {
            let mut cf_options = Options::default();
            cf_options.set_write_buffer_size(config.write_buffer_bytes);
            cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if *name == CF_STREAMS || *name == CF_IDEMPOTENCY || *name == CF_STATE {
                // Point lookups of keys that mostly do not exist (new streams,
                // new idempotency keys): let bloom filters answer them.
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                cf_options.set_block_based_table_factory(&table);
                cf_options.set_memtable_prefix_bloom_ratio(0.05);
                cf_options.set_memtable_whole_key_filtering(true);
            }
            ColumnFamilyDescriptor::new(*name, cf_options)
        });
        let db = DB::open_cf_descriptors(&options, &path, descriptors)
            .map_err(|e| LogError::storage(format!("opening {}", path.display()), e))?;
        let db = Arc::new(db);
        let head = read_head(&db)?;
        let durable_position = Arc::new(watch::channel(head.position).0);
        let failed = Arc::new(Mutex::new(None));
        let recent =
            Arc::new(Mutex::new(Recent { chunks: VecDeque::new(), bytes: 0, bytes_max: config.recent_bytes_max }));
        // One group in the sync thread's hands, one being built: the pipeline depth.
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel(1);
        let sync_thread = {
            let (db, durable_position, failed) = (Arc::clone(&db), Arc::clone(&durable_position), Arc::clone(&failed));
            let recent = Arc::clone(&recent);
            let sync = config.sync;
            std::thread::Builder::new()
                .name("kassa-log-sync".into())
                .spawn(move || run_sync(db, sync_rx, sync, durable_position, recent, failed))
                .map_err(|e| LogError::Storage {
                    context: "spawning the log sync thread".into(),
                    reason: e.to_string(),
                })?
        };
        let writer = LogWriter {
            db: Arc::clone(&db),
            head,
            stream_heads: IdMap::default(),
            config: config.clone(),
            sync_tx: Some(sync_tx),
            sync_thread: Some(sync_thread),
            failed,
            chunk_buffer: Vec::new(),
        };
        let committer = GroupCommitter::spawn("kassa-log-writer", writer, config.group)
            .map_err(|e| LogError::Storage { context: "spawning the log writer".into(), reason: e.to_string() })?;
        let counted = config.statistics.then_some(options);
        Ok(EventLog { db, path, committer, durable_position, recent, config, counted })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What RocksDB has written for this log (with [`LogConfig::statistics`] on).
    pub fn write_counts(&self) -> Option<WriteCounts> {
        self.counted.as_ref().map(WriteCounts::of)
    }

    /// Append and wait until durable (a [`Durability::Derived`] append: until written).
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, LogError> {
        self.check_size(&request)?;
        self.committer.submit(request).await?
    }

    /// Queue an append (waiting while the queue is full) and return its reply
    /// to await later. Appends are written in the order they were queued, and
    /// a crash keeps a prefix of them: a caller can keep several in flight,
    /// sharing syncs, where it would otherwise wait for each in turn.
    pub async fn enqueue(
        &self,
        request: AppendRequest,
    ) -> Result<crate::Pending<Result<Appended, LogError>>, LogError> {
        self.check_size(&request)?;
        Ok(self.committer.enqueue(request).await?)
    }

    /// Queue an append without waiting for it (blocks only while the queue is full).
    pub fn append_pipelined(
        &self,
        request: AppendRequest,
    ) -> Result<crate::Pending<Result<Appended, LogError>>, LogError> {
        self.check_size(&request)?;
        Ok(self.committer.submit_blocking(request)?)
    }

    /// Queue an append only if the write queue has room now; `Ok(None)` when
    /// it is full (the caller sheds load: 429/503 rather than waiting).
    pub fn try_append(
        &self,
        request: AppendRequest,
    ) -> Result<Option<crate::Pending<Result<Appended, LogError>>>, LogError> {
        self.check_size(&request)?;
        match self.committer.try_submit(request) {
            Ok(pending) => Ok(Some(pending)),
            Err(crate::group_commit::TrySubmitError::Full) => Ok(None),
            Err(crate::group_commit::TrySubmitError::Stopped) => Err(LogError::Closed),
        }
    }

    /// Append and block until durable (or written: [`Durability::Derived`]). Not for async runtime threads.
    pub fn append_blocking(&self, request: AppendRequest) -> Result<Appended, LogError> {
        self.append_pipelined(request)?.wait()?
    }

    fn check_size(&self, request: &AppendRequest) -> Result<(), LogError> {
        if request.events.len() > self.config.request_events_max {
            return Err(LogError::TooLarge { events: request.events.len(), max: self.config.request_events_max });
        }
        Ok(())
    }

    /// Group-commit counters (groups, requests, events).
    pub fn commit_stats(&self) -> &crate::GroupCommitStats {
        self.committer.stats()
    }

    /// The last durable position (0 for an empty log).
    pub fn head_position(&self) -> u64 {
        *self.durable_position.borrow()
    }

    /// Watch the durable head: changes after every durable group. For relays
    /// and readers that follow the log.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.durable_position.subscribe()
    }

    /// Verified events from `from_position` (1-based) on, in order.
    pub fn iter_from(&self, from_position: u64) -> LogIter<'_> {
        LogIter {
            log: self,
            iter: None,
            from_position: from_position.max(1),
            buffered: VecDeque::new(),
            next_chunk: None,
            anchor: GENESIS_HASH,
            done: false,
        }
    }

    /// Up to `max` verified events from `from_position` on.
    pub fn read_from(&self, from_position: u64, max: usize) -> Result<Vec<Envelope>, LogError> {
        self.iter_from(from_position).take(max).collect()
    }

    /// Up to `max` events from `from_position` on, for a follower of the head
    /// (a relay). Events this process wrote recently come from memory, each
    /// frame checked by its checksum and position (they were never read back
    /// from disk, so their chain links are the ones the writer made); older
    /// ones are read from disk and verified as by `read_from`.
    pub fn follow_from(&self, from_position: u64, max: usize) -> Result<Vec<Envelope>, LogError> {
        self.follow_recent(from_position, max).unwrap_or_else(|| self.read_from(from_position, max))
    }

    /// [`Self::follow_from`] when `from_position` is still in memory (no disk
    /// read, so an async caller need not move to a blocking thread); `None` when not.
    pub fn follow_recent(&self, from_position: u64, max: usize) -> Option<Result<Vec<Envelope>, LogError>> {
        self.follow_recent_frames(from_position, max, |_, envelope| envelope.to_owned())
    }

    /// [`Self::follow_recent`] without copying the events out: `each` is given
    /// every frame from `from_position` (at most `max`) as it is stored, with its
    /// fields borrowed, its checksum and position checked; what it returns is
    /// collected. A relay publishes the stored frame itself this way.
    pub fn follow_recent_frames<T>(
        &self,
        from_position: u64,
        max: usize,
        mut each: impl FnMut(&[u8], &EnvelopeRef<'_>) -> T,
    ) -> Option<Result<Vec<T>, LogError>> {
        let from = from_position.max(1);
        let chunks = self.recent.lock().unwrap_or_else(|e| e.into_inner()).covering(from, max)?;
        let mut out = Vec::new();
        for chunk in &chunks {
            let frames = match frames(&chunk.bytes, chunk.first_position) {
                Ok(frames) => frames,
                Err(error) => return Some(Err(error)),
            };
            for (index, frame) in frames.into_iter().enumerate() {
                let position = chunk.first_position + index as u64;
                if position < from {
                    continue;
                }
                if out.len() >= max {
                    return Some(Ok(out));
                }
                match decode_ref_at(frame, position) {
                    Ok(envelope) => out.push(each(frame, &envelope)),
                    Err(error) => return Some(Err(error)),
                }
            }
        }
        Some(Ok(out))
    }

    /// Up to `max` verified events of one stream, from sequence `from_seq` (1-based).
    pub fn read_stream(&self, stream_id: u128, from_seq: u64, max: usize) -> Result<Vec<Envelope>, LogError> {
        let from_seq = from_seq.max(1);
        let streams = cf(&self.db, CF_STREAMS);
        let mut iter = self.db.raw_iterator_cf(streams);
        // The run that holds `from_seq` may start before it.
        iter.seek_for_prev(stream_key(stream_id, from_seq));
        if !iter.valid() || iter.key().is_none_or(|key| key.len() != 24 || key[..16] != stream_id.to_be_bytes()) {
            iter.status().map_err(|e| LogError::storage("reading the stream index", e))?;
            iter.seek(stream_key(stream_id, from_seq));
        }
        let mut positions = Vec::new();
        while iter.valid() && positions.len() < max {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if key.len() != 24 || key[..16] != stream_id.to_be_bytes() {
                break;
            }
            let first_seq = decode_u64(&key[16..]).unwrap_or(0);
            let (position, events) = index_run(value)?;
            for offset in 0..u64::from(events) {
                if positions.len() >= max {
                    break;
                }
                if first_seq + offset >= from_seq {
                    positions.push((position + offset, first_seq + offset));
                }
            }
            iter.next();
        }
        iter.status().map_err(|e| LogError::storage("reading the stream index", e))?;
        let mut out = Vec::with_capacity(positions.len());
        let mut cached: Option<(u64, Vec<(Envelope, Hash)>)> = None;
        for (position, seq) in positions {
            let hit = matches!(&cached, Some((first, events)) if position >= *first && position < first + events.len() as u64);
            if !hit {
                cached = Some(self.verified_chunk_at(position)?);
            }
            let (first, events) = cached.as_ref().expect("filled above");
            let envelope = events[(position - first) as usize].0.clone();
            if envelope.stream_id != stream_id || envelope.stream_seq != seq {
                return Err(LogError::BadChunk {
                    position,
                    reason: format!(
                        "stream index entry for {stream_id:032x} sequence {seq} points at {:032x} sequence {}",
                        envelope.stream_id, envelope.stream_seq
                    ),
                });
            }
            out.push(envelope);
        }
        Ok(out)
    }

    /// Up to `max` verified events with `from_ms <= timestamp < to_ms`.
    pub fn read_time_range(&self, from_ms: i64, to_ms: i64, max: usize) -> Result<Vec<Envelope>, LogError> {
        let time = cf(&self.db, CF_TIME);
        let mut iter = self.db.raw_iterator_cf(time);
        // The last chunk that starts before `from_ms` may hold events at or after it.
        iter.seek_for_prev(time_key(from_ms, 0));
        let start = if iter.valid() { iter.key().and_then(time_key_position).unwrap_or(1) } else { 1 };
        iter.status().map_err(|e| LogError::storage("reading the time index", e))?;
        let mut out = Vec::new();
        for envelope in self.iter_from(start) {
            let envelope = envelope?;
            if envelope.timestamp_ms >= to_ms || out.len() >= max {
                break;
            }
            if envelope.timestamp_ms >= from_ms {
                out.push(envelope);
            }
        }
        Ok(out)
    }

    /// The chunk holding `position`, verified from the record before it.
    fn verified_chunk_at(&self, position: u64) -> Result<(u64, Vec<(Envelope, Hash)>), LogError> {
        let log = cf(&self.db, CF_LOG);
        let mut iter = self.db.raw_iterator_cf(log);
        iter.seek_for_prev(chunk_key(position));
        let (first, bytes) = current_chunk(&iter, position)?;
        let anchor = self.anchor_before(first)?;
        Ok((first, decode_verified(&bytes, first, anchor)?))
    }

    /// The hash of the record at `first_position - 1` (genesis before position 1).
    fn anchor_before(&self, first_position: u64) -> Result<Hash, LogError> {
        if first_position <= 1 {
            return Ok(GENESIS_HASH);
        }
        let log = cf(&self.db, CF_LOG);
        let mut iter = self.db.raw_iterator_cf(log);
        iter.seek_for_prev(chunk_key(first_position - 1));
        let (first, bytes) = current_chunk(&iter, first_position - 1)?;
        last_frame_hash(&bytes, first, first_position - 1)
    }

    /// Read and verify the whole log: checksums, positions, chain, head record.
    pub fn verify(&self) -> Result<VerifyReport, LogError> {
        let mut events = 0;
        for envelope in self.iter_from(1) {
            envelope?;
            events += 1;
        }
        let head = read_head(&self.db)?;
        if head.position != events {
            return Err(LogError::Truncated { recorded: head.position, found: events });
        }
        Ok(VerifyReport { events, head_position: head.position, head_hash: head.hash })
    }

    /// Write memtables out to table files, so the next open replays less WAL.
    pub fn flush(&self) -> Result<(), LogError> {
        let handles: Vec<_> = ALL_CFS.iter().map(|name| cf(&self.db, name)).collect();
        self.db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default()).map_err(|e| LogError::storage("flushing", e))
    }

    /// Read a value from one of the service's tables.
    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        self.db
            .get_cf(cf(&self.db, table.cf()), key)
            .map_err(|e| LogError::storage(format!("reading {}", table.cf()), e))
    }

    /// Every key/value in a table whose key starts with `prefix`, in key order.
    pub fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<KeyValue>, LogError> {
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, table.cf()));
        iter.seek(prefix);
        let mut out = Vec::new();
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
            iter.next();
        }
        iter.status().map_err(|e| LogError::storage(format!("scanning {}", table.cf()), e))?;
        Ok(out)
    }

    /// Up to `limit` key/values of a table with `from <= key < until`, in key order.
    pub fn scan_range(&self, table: Table, from: &[u8], until: &[u8], limit: usize) -> Result<Vec<KeyValue>, LogError> {
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, table.cf()));
        iter.seek(from);
        let mut out = Vec::new();
        while iter.valid() && out.len() < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if key >= until {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
            iter.next();
        }
        iter.status().map_err(|e| LogError::storage(format!("scanning {}", table.cf()), e))?;
        Ok(out)
    }

    /// The last key/value of a table with `from <= key < until`, if any (one seek, backwards).
    pub fn last_in_range(&self, table: Table, from: &[u8], until: &[u8]) -> Result<Option<KeyValue>, LogError> {
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, table.cf()));
        iter.seek_for_prev(until);
        // `seek_for_prev` lands on `until` itself when it exists: step before it.
        if iter.key() == Some(until) {
            iter.prev();
        }
        let found = match (iter.key(), iter.value()) {
            (Some(key), Some(value)) if key >= from && key < until => Some((key.to_vec(), value.to_vec())),
            _ => None,
        };
        iter.status().map_err(|e| LogError::storage(format!("scanning {}", table.cf()), e))?;
        Ok(found)
    }

    /// Store a projection snapshot taken at `position`. Snapshots are derived
    /// data: losing one only means a longer replay.
    pub fn save_snapshot(&self, name: &str, position: u64, bytes: &[u8]) -> Result<(), LogError> {
        let mut value = Vec::with_capacity(bytes.len() + 12);
        value.extend_from_slice(&position.to_be_bytes());
        value.extend_from_slice(bytes);
        let crc = crc32c::crc32c(&value);
        value.extend_from_slice(&crc.to_le_bytes());
        let mut options = WriteOptions::default();
        options.set_sync(self.config.sync);
        self.db
            .put_cf_opt(cf(&self.db, CF_SNAPSHOTS), name.as_bytes(), value, &options)
            .map_err(|e| LogError::storage(format!("saving snapshot {name}"), e))
    }

    /// The latest snapshot of `name`: (position, bytes), checksum verified.
    pub fn load_snapshot(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        let Some(value) = self
            .db
            .get_cf(cf(&self.db, CF_SNAPSHOTS), name.as_bytes())
            .map_err(|e| LogError::storage(format!("loading snapshot {name}"), e))?
        else {
            return Ok(None);
        };
        let bad = |reason: &str| LogError::BadSnapshot { name: name.to_owned(), reason: reason.to_owned() };
        if value.len() < 12 {
            return Err(bad("shorter than its header"));
        }
        let (covered, crc) = value.split_at(value.len() - 4);
        if crc32c::crc32c(covered).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let position = decode_u64(&covered[..8]).ok_or_else(|| bad("bad position"))?;
        if position > self.head_position() {
            return Err(bad("taken at a position past the end of the log"));
        }
        Ok(Some((position, covered[8..].to_vec())))
    }
}

/// The chunk an iterator stands on, checked to cover `position`.
fn current_chunk(iter: &DBRawIterator<'_>, position: u64) -> Result<(u64, Vec<u8>), LogError> {
    iter.status().map_err(|e| LogError::storage("reading the log", e))?;
    let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
        return Err(LogError::Gap { expected: position, found: 0 });
    };
    let first = decode_u64(key).ok_or_else(|| LogError::BadChunk { position, reason: "malformed chunk key".into() })?;
    Ok((first, value.to_vec()))
}

/// Hash of the last frame of a chunk, checking that it is at `expected`.
fn last_frame_hash(chunk: &[u8], first: u64, expected: u64) -> Result<Hash, LogError> {
    let frames = frames(chunk, first)?;
    let last_position = first + frames.len() as u64 - 1;
    if last_position != expected {
        return Err(LogError::Gap { expected: expected + 1, found: last_position + 1 });
    }
    let frame = frames[frames.len() - 1];
    decode_at(frame, expected)?;
    Ok(frame_hash(frame))
}

/// Find the durable head at open: the last chunk's last record, checked
/// against the head record written with every group.
fn read_head(db: &DB) -> Result<Head, LogError> {
    let mut iter = db.raw_iterator_cf(cf(db, CF_LOG));
    iter.seek_to_last();
    let found = if iter.valid() {
        let (first, bytes) = current_chunk(&iter, 0)?;
        let anchor_free = frames(&bytes, first)?;
        let last = anchor_free[anchor_free.len() - 1];
        let position = first + anchor_free.len() as u64 - 1;
        let envelope = decode_at(last, position)?;
        Head { position, hash: frame_hash(last), timestamp_ms: envelope.timestamp_ms }
    } else {
        iter.status().map_err(|e| LogError::storage("reading the log tail", e))?;
        Head { position: 0, hash: GENESIS_HASH, timestamp_ms: i64::MIN }
    };
    let recorded =
        db.get_cf(cf(db, CF_META), META_HEAD).map_err(|e| LogError::storage("reading the head record", e))?;
    if let Some(recorded) = recorded {
        let position = recorded.get(..8).and_then(decode_u64).unwrap_or(u64::MAX);
        if position != found.position {
            return Err(LogError::Truncated { recorded: position, found: found.position });
        }
        if recorded.get(8..40) != Some(&found.hash[..]) {
            // Same length, different last record: it was rewritten.
            return Err(LogError::ChainBroken { position });
        }
    } else if found.position != 0 {
        return Err(LogError::Truncated { recorded: 0, found: found.position });
    }
    Ok(found)
}

/// The writer thread's side: positions, stream sequences and the chain.
///
/// Pipelined in two threads: this one (the sequencer) assigns positions,
/// encodes, hashes and builds the `WriteBatch` of the next group while the
/// sync thread writes and fsyncs the previous one. A failed write poisons the
/// log: the sequencer has already built on top of it, so every later append
/// fails too, and nothing past the last durable group is ever acknowledged.
/// So does a stream index that cannot be read while building a group: appends
/// queued in order then never land with one before them missing.
struct LogWriter {
    db: Arc<DB>,
    head: Head,
    stream_heads: IdMap<u64>,
    config: LogConfig,
    sync_tx: Option<std::sync::mpsc::SyncSender<SyncJob>>,
    sync_thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<LogError>>>,
    /// The chunk buffer, kept from group to group so it does not grow again each time.
    chunk_buffer: Vec<u8>,
}

type AppendReply = Result<Appended, LogError>;

/// A built group on its way to the disk.
struct SyncJob {
    batch: WriteBatch,
    /// Whether any append of the group must be synced ([`Durability`]).
    sync: bool,
    /// The group's chunks, for `Recent` once the group is durable.
    chunks: Vec<RecentChunk>,
    replies: Vec<(Replier<AppendReply>, AppendReply)>,
    head_position: u64,
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.sync_tx.take();
        if let Some(thread) = self.sync_thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_sync(
    db: Arc<DB>,
    jobs: std::sync::mpsc::Receiver<SyncJob>,
    sync: bool,
    durable_position: Arc<watch::Sender<u64>>,
    recent: Arc<Mutex<Recent>>,
    failed: Arc<Mutex<Option<LogError>>>,
) {
    let mut synced = WriteOptions::default();
    synced.set_sync(sync);
    let unsynced = WriteOptions::default();
    for job in jobs {
        let poisoned = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let options = if job.sync { &synced } else { &unsynced };
        let outcome = match poisoned {
            Some(error) => Err(error),
            None => db.write_opt(job.batch, options).map_err(|error| {
                let reason = error.into_string();
                tracing::error!(%reason, "event log group write failed; refusing further appends");
                let error = LogError::Storage {
                    context: "writing a group; the log refuses appends until the service restarts".into(),
                    reason,
                };
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.clone());
                error
            }),
        };
        match outcome {
            Ok(()) => {
                recent.lock().unwrap_or_else(|e| e.into_inner()).push(job.chunks);
                durable_position.send_replace(job.head_position);
                for (replier, reply) in job.replies {
                    replier.send(reply);
                }
            }
            Err(error) => {
                for (replier, _) in job.replies {
                    replier.send(Err(error.clone()));
                }
            }
        }
    }
}

impl LogWriter {
    fn stream_head(&self, overlay: &IdMap<u64>, stream_id: u128) -> Result<u64, LogError> {
        if let Some(seq) = overlay.get(&stream_id).or_else(|| self.stream_heads.get(&stream_id)) {
            return Ok(*seq);
        }
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, CF_STREAMS));
        iter.seek_for_prev(stream_key(stream_id, u64::MAX));
        let seq = match (iter.key(), iter.value()) {
            (Some(key), Some(value)) if key.len() == 24 && key[..16] == stream_id.to_be_bytes() => {
                let first_seq = decode_u64(&key[16..]).unwrap_or(0);
                let (_, events) = index_run(value)?;
                first_seq + u64::from(events) - 1
            }
            _ => 0,
        };
        iter.status().map_err(|e| LogError::storage("reading the stream index", e))?;
        Ok(seq)
    }

    /// Look up, in one batched read, the heads of the streams this group
    /// touches that are not cached. Most are new streams (a new payment), and
    /// a point lookup of their first key — answered by the memtable and table
    /// bloom filters — is far cheaper than a seek per event.
    fn prefetch_stream_heads(&mut self, group: &[AppendRequest]) -> Result<(), LogError> {
        let mut missing: Vec<u128> = group
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.stream_id).chain(r.expected.iter().map(|(s, _)| *s)))
            .filter(|s| !self.stream_heads.contains_key(s))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let keys: Vec<[u8; 24]> = missing.iter().map(|s| stream_key(*s, 1)).collect();
        let found = self.db.batched_multi_get_cf(cf(&self.db, CF_STREAMS), &keys, true);
        for (stream_id, result) in missing.into_iter().zip(found) {
            match result.map_err(|e| LogError::storage("looking up stream heads", e))? {
                None => {
                    self.stream_heads.insert(stream_id, 0);
                }
                Some(_) => {
                    // An existing stream that fell out of the cache: find its head.
                    let head = self.stream_head(&IdMap::default(), stream_id)?;
                    self.stream_heads.insert(stream_id, head);
                }
            }
        }
        Ok(())
    }

    fn check_expected(&self, overlay: &IdMap<u64>, request: &AppendRequest) -> Result<(), LogError> {
        for &(stream_id, expected) in &request.expected {
            let actual = self.stream_head(overlay, stream_id)?;
            let ok = match expected {
                ExpectedVersion::Any => true,
                ExpectedVersion::NoStream => actual == 0,
                ExpectedVersion::Exact(seq) => actual == seq,
            };
            if !ok {
                return Err(LogError::Conflict { stream_id, expected: format!("{expected:?}"), actual });
            }
        }
        Ok(())
    }
}

/// The largest chunk buffer a writer keeps from one group to the next.
const CHUNK_BUFFER_KEPT_MAX: usize = 4 << 20;

struct ChunkBuilder {
    first_position: u64,
    first_timestamp_ms: i64,
    events: usize,
    bytes: Vec<u8>,
    /// The chunks built so far, kept for `Recent`.
    done: Vec<RecentChunk>,
}

impl ChunkBuilder {
    fn flush(&mut self, db: &DB, batch: &mut WriteBatch) {
        if self.events == 0 {
            return;
        }
        batch.put_cf(cf(db, CF_LOG), chunk_key(self.first_position), &self.bytes);
        batch.put_cf(cf(db, CF_TIME), time_key(self.first_timestamp_ms, self.first_position), []);
        // An exact copy for `Recent` (its budget counts these bytes); the buffer is used again.
        let bytes: Arc<[u8]> = Arc::from(&self.bytes[..]);
        self.bytes.clear();
        self.done.push(RecentChunk { first_position: self.first_position, events: self.events as u64, bytes });
        self.events = 0;
    }
}

/// A durable chunk still held in memory.
#[derive(Clone)]
struct RecentChunk {
    first_position: u64,
    events: u64,
    bytes: Arc<[u8]>,
}

/// The newest durable chunks, oldest first, contiguous, at most `bytes_max` of them.
struct Recent {
    chunks: VecDeque<RecentChunk>,
    bytes: usize,
    bytes_max: usize,
}

impl Recent {
    fn push(&mut self, chunks: Vec<RecentChunk>) {
        for chunk in chunks {
            self.bytes += chunk.bytes.len();
            self.chunks.push_back(chunk);
        }
        while self.bytes > self.bytes_max
            && let Some(old) = self.chunks.pop_front()
        {
            self.bytes -= old.bytes.len();
        }
    }

    /// The chunks holding `from` and the events after it (enough for `max`),
    /// or `None` when `from` is not in memory.
    fn covering(&self, from: u64, max: usize) -> Option<Vec<RecentChunk>> {
        let first = self.chunks.front()?.first_position;
        let back = self.chunks.back()?;
        if from < first || from >= back.first_position + back.events {
            return None;
        }
        let start = self.chunks.partition_point(|c| c.first_position + c.events <= from);
        let mut out = Vec::new();
        let mut events = 0u64;
        for chunk in self.chunks.range(start..) {
            events += chunk.first_position + chunk.events - from.max(chunk.first_position);
            out.push(chunk.clone());
            if events >= max as u64 {
                break;
            }
        }
        Some(out)
    }
}

impl GroupWriter for LogWriter {
    type Request = AppendRequest;
    type Reply = Result<Appended, LogError>;

    fn weight(request: &AppendRequest) -> usize {
        request.events.len().max(1)
    }

    fn write_group(&mut self, group: &mut Vec<AppendRequest>, repliers: Vec<Replier<AppendReply>>) {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sync = group.iter().any(AppendRequest::needs_sync);
        let built = match failed {
            Some(error) => Err(error),
            None => self.prefetch_stream_heads(group).map(|()| self.build(group)),
        };
        let (batch, replies, head_position, chunks) = match built {
            Ok(built) => built,
            Err(error) => {
                // The stream index could not be read: refuse every later append too, as after a
                // failed write, so that appends queued in order (`commit_in_order`) never land
                // with one before them missing.
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                if failed.is_none() {
                    tracing::error!(%error, "event log could not read its stream index; refusing further appends");
                    *failed = Some(error.clone());
                }
                drop(failed);
                for replier in repliers {
                    replier.send(Err(error.clone()));
                }
                group.clear();
                return;
            }
        };
        let replies = repliers.into_iter().zip(replies).collect();
        let job = SyncJob { batch, sync, chunks, replies, head_position };
        if let Some(sync_tx) = &self.sync_tx
            && let Err(std::sync::mpsc::SendError(job)) = sync_tx.send(job)
        {
            for (replier, _) in job.replies {
                replier.send(Err(LogError::Closed));
            }
        }
    }
}

/// A stream index value as the run it names: its first position and length.
fn index_run(value: &[u8]) -> Result<(u64, u32), LogError> {
    decode_stream_run(value).ok_or_else(|| LogError::BadChunk {
        position: 0,
        reason: format!("stream index entry of {} bytes is not a position and a length", value.len()),
    })
}

/// Events of one stream at consecutive positions, indexed by one entry.
struct IndexRun {
    stream_id: u128,
    first_seq: u64,
    first_position: u64,
    events: u32,
}

impl IndexRun {
    fn extends_to(&self, stream_id: u128, seq: u64, position: u64) -> bool {
        self.stream_id == stream_id
            && self.events < u32::MAX
            && self.first_seq + u64::from(self.events) == seq
            && self.first_position + u64::from(self.events) == position
    }
}

impl LogWriter {
    /// Sequence a group: positions, stream sequences, chain links, one batch.
    fn build(&mut self, group: &mut Vec<AppendRequest>) -> (WriteBatch, Vec<AppendReply>, u64, Vec<RecentChunk>) {
        let db = Arc::clone(&self.db);
        let mut batch = WriteBatch::default();
        let mut head = self.head;
        let mut overlay: IdMap<u64> = IdMap::default();
        let mut replies = Vec::with_capacity(group.len());
        let mut chunk = ChunkBuilder {
            first_position: 0,
            first_timestamp_ms: 0,
            events: 0,
            bytes: std::mem::take(&mut self.chunk_buffer),
            done: Vec::new(),
        };
        // Index entries and table writes are put in key order, per column family:
        // RocksDB inserts each into its memtable's skip list starting from where
        // the previous insert landed, so sorted random keys (payment ids) cost
        // far fewer comparisons than the same keys in arrival order.
        let mut index: Vec<IndexRun> = Vec::new();
        let mut writes: Vec<StateWrite> = Vec::new();
        for request in group.drain(..) {
            if let Err(error) = self.check_expected(&overlay, &request) {
                replies.push(Err(error));
                continue;
            }
            let first_position = head.position + 1;
            for event in request.events {
                // Prefetched: every stream of the group is cached or in the overlay.
                let seq = overlay.get(&event.stream_id).or_else(|| self.stream_heads.get(&event.stream_id)).copied();
                let seq = seq.expect("stream heads are prefetched for the whole group") + 1;
                overlay.insert(event.stream_id, seq);
                head.position += 1;
                head.timestamp_ms = head.timestamp_ms.max(event.timestamp_ms);
                let envelope = Envelope {
                    event_id: event.event_id,
                    event_type: event.event_type,
                    stream_id: event.stream_id,
                    stream_seq: seq,
                    position: head.position,
                    timestamp_ms: head.timestamp_ms,
                    causation_id: event.causation_id,
                    correlation_id: event.correlation_id,
                    payload: event.payload,
                    prev_hash: head.hash,
                };
                if chunk.events == 0 {
                    chunk.first_position = head.position;
                    chunk.first_timestamp_ms = head.timestamp_ms;
                }
                head.hash = push_frame(&mut chunk.bytes, &envelope);
                chunk.events += 1;
                match index.last_mut() {
                    // The next event of the run before: one index entry for both.
                    Some(run) if run.extends_to(event.stream_id, seq, head.position) => run.events += 1,
                    _ => index.push(IndexRun {
                        stream_id: event.stream_id,
                        first_seq: seq,
                        first_position: head.position,
                        events: 1,
                    }),
                }
                if chunk.events >= self.config.chunk_events_max {
                    chunk.flush(&db, &mut batch);
                }
            }
            writes.extend(request.writes);
            replies.push(Ok(Appended { first_position, last_position: head.position }));
        }
        chunk.flush(&db, &mut batch);
        index.sort_unstable_by_key(|run| (run.stream_id, run.first_seq));
        let streams = cf(&db, CF_STREAMS);
        for run in index {
            batch.put_cf(
                streams,
                stream_key(run.stream_id, run.first_seq),
                stream_run_value(run.first_position, run.events),
            );
        }
        // Stable: of two writes to one key in a group, the later still lands last.
        writes.sort_by(|a, b| (a.table as u8, &a.key).cmp(&(b.table as u8, &b.key)));
        for write in writes {
            let table = cf(&db, write.table.cf());
            match write.value {
                Some(value) => batch.put_cf(table, write.key, value),
                None => batch.delete_cf(table, write.key),
            }
        }
        let mut head_record = head.position.to_be_bytes().to_vec();
        head_record.extend_from_slice(&head.hash);
        batch.put_cf(cf(&db, CF_META), META_HEAD, head_record);
        // From here on the sequencer builds on this group; if its write
        // fails, the log is poisoned (see `run_sync`), so this is safe.
        self.head = head;
        if self.stream_heads.len() + overlay.len() > self.config.stream_heads_cached_max {
            self.stream_heads.clear();
        }
        self.stream_heads.extend(overlay);
        // Kept for the next group unless a group of large events grew it past what is worth holding.
        if chunk.bytes.capacity() <= CHUNK_BUFFER_KEPT_MAX {
            self.chunk_buffer = chunk.bytes;
        }
        (batch, replies, head.position, chunk.done)
    }
}

/// Iterator over verified events in position order. Yields an error (and then
/// stops) at the first record that fails its checksum, position or chain.
pub struct LogIter<'a> {
    log: &'a EventLog,
    iter: Option<DBRawIterator<'a>>,
    from_position: u64,
    buffered: VecDeque<Envelope>,
    next_chunk: Option<u64>,
    anchor: Hash,
    done: bool,
}

impl std::fmt::Debug for LogIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogIter").field("next_chunk", &self.next_chunk).field("done", &self.done).finish()
    }
}

impl LogIter<'_> {
    fn load_next_chunk(&mut self) -> Result<bool, LogError> {
        let log = self.log;
        match self.iter.as_mut() {
            Some(iter) => iter.next(),
            None => {
                let mut iter = log.db.raw_iterator_cf(cf(&log.db, CF_LOG));
                iter.seek_for_prev(chunk_key(self.from_position));
                if !iter.valid() {
                    iter.seek_to_first();
                }
                self.iter = Some(iter);
            }
        }
        let iter = self.iter.as_ref().expect("set above");
        if !iter.valid() {
            iter.status().map_err(|e| LogError::storage("reading the log", e))?;
            return Ok(false);
        }
        let (first, bytes) = current_chunk(iter, self.next_chunk.unwrap_or(1))?;
        match self.next_chunk {
            Some(expected) if expected != first => return Err(LogError::Gap { expected, found: first }),
            Some(_) => {}
            None => self.anchor = log.anchor_before(first)?,
        }
        let events = decode_verified(&bytes, first, self.anchor)?;
        self.next_chunk = Some(first + events.len() as u64);
        if let Some((_, hash)) = events.last() {
            self.anchor = *hash;
        }
        let from = self.from_position;
        self.buffered.extend(events.into_iter().map(|(e, _)| e).filter(|e| e.position >= from));
        Ok(true)
    }
}

impl Iterator for LogIter<'_> {
    type Item = Result<Envelope, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(envelope) = self.buffered.pop_front() {
                return Some(Ok(envelope));
            }
            if self.done {
                return None;
            }
            match self.load_next_chunk() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_group_of_derived_appends_without_events_goes_unsynced() {
        let event = NewEvent {
            event_id: 1,
            event_type: "t".into(),
            stream_id: 1,
            timestamp_ms: 0,
            causation_id: None,
            correlation_id: None,
            payload: Vec::new(),
        };
        let derived = AppendRequest { durability: Durability::Derived, ..Default::default() };
        let derived_with_events = AppendRequest { events: vec![event], ..derived.clone() };
        assert!(!derived.needs_sync());
        assert!(derived_with_events.needs_sync());
        assert!(AppendRequest::default().needs_sync());
    }
}
