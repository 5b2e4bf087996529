//! Kassa's durable event log, one per service, in RocksDB.
//!
//! * Appends go through [`group_commit`]: many appends share one `WriteBatch`
//!   and one sync; a caller hears "durable" only after its sync.
//! * Events, the state they produced and the input positions they consumed are
//!   written in the same `WriteBatch`, so a crash never leaves them disagreeing.
//! * Every record is a checksummed frame in a hash chain (see `kassa-codec`);
//!   every read verifies both, and corruption is an error naming the position.
//!
//! Column families: `log` (chunks of frames by first position), `streams`
//! (stream id + the first sequence of a run of the stream's events at
//! consecutive positions → its first position and length), `time` (chunk start time → position),
//! `state`, `positions`, `idempotency` (the service's own tables, written
//! atomically with events), `snapshots` (projection snapshots), `meta` (the
//! durable head, to detect a truncated log).

mod chunk;
pub mod group_commit;
mod keys;
mod log;
mod projection;

pub use group_commit::{GroupCommitConfig, GroupCommitStats, Pending, WriterStopped};
pub use kassa_codec::{Envelope, Hash};
pub use log::{
    AppendRequest, Appended, Durability, EventLog, ExpectedVersion, KeyValue, LogConfig, LogIter, NewEvent, StateWrite,
    Table, VerifyReport, WriteCounts,
};
pub use projection::{Projection, Recovered, recover};

use kassa_codec::CodecError;

/// Everything that can go wrong in the log. Each names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("event log storage ({context}): {reason}")]
    Storage { context: String, reason: String },
    #[error("corrupt record at log position {position}: {source}")]
    Corrupt {
        position: u64,
        #[source]
        source: CodecError,
    },
    #[error("corrupt chunk at log position {position}: {reason}")]
    BadChunk { position: u64, reason: String },
    #[error(
        "hash chain broken at log position {position}: the record does not link to the one before it (tampered or reordered)"
    )]
    ChainBroken { position: u64 },
    #[error("gap in the log: expected position {expected}, found {found}")]
    Gap { expected: u64, found: u64 },
    #[error("log truncated: its head record says position {recorded}, but the log ends at {found}")]
    Truncated { recorded: u64, found: u64 },
    #[error("stream {stream_id:#x} is at version {actual}, the append expected {expected}")]
    Conflict { stream_id: u128, expected: String, actual: u64 },
    #[error("append of {events} events is over the {max}-event limit of one request")]
    TooLarge { events: usize, max: usize },
    #[error("corrupt snapshot {name:?}: {reason}")]
    BadSnapshot { name: String, reason: String },
    #[error("the event log is closed")]
    Closed,
}

impl LogError {
    pub(crate) fn storage(context: impl Into<String>, error: rocksdb::Error) -> Self {
        LogError::Storage { context: context.into(), reason: error.into_string() }
    }
}

impl From<WriterStopped> for LogError {
    fn from(_: WriterStopped) -> Self {
        LogError::Closed
    }
}
