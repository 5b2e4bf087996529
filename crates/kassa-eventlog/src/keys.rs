//! Key layouts. Big-endian integers so RocksDB's byte order is numeric order.

pub const CF_LOG: &str = "log";
pub const CF_STREAMS: &str = "streams";
pub const CF_TIME: &str = "time";
pub const CF_STATE: &str = "state";
pub const CF_POSITIONS: &str = "positions";
pub const CF_IDEMPOTENCY: &str = "idempotency";
pub const CF_SNAPSHOTS: &str = "snapshots";
pub const CF_META: &str = "meta";

pub const ALL_CFS: &[&str] =
    &[CF_LOG, CF_STREAMS, CF_TIME, CF_STATE, CF_POSITIONS, CF_IDEMPOTENCY, CF_SNAPSHOTS, CF_META];

/// `meta` key of the durable head: position u64 BE ++ hash.
pub const META_HEAD: &[u8] = b"head";

/// A chunk of the log is keyed by the position of its first event.
pub fn chunk_key(first_position: u64) -> [u8; 8] {
    first_position.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Stream index: stream id ++ the first stream sequence of a run → the run's
/// first log position, and (when the run has more than one event) its length.
/// A run is events of one stream at consecutive positions: one key for the
/// events a request appends to a stream together, not one per event.
pub fn stream_key(stream_id: u128, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&stream_id.to_be_bytes());
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Time index: timestamp (sign-flipped so negative times sort first) ++ first position of a chunk.
pub fn time_key(timestamp_ms: i64, first_position: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&((timestamp_ms as u64) ^ (1 << 63)).to_be_bytes());
    key[8..].copy_from_slice(&first_position.to_be_bytes());
    key
}

pub fn time_key_position(key: &[u8]) -> Option<u64> {
    decode_u64(key.get(8..16)?)
}

/// A stream index value: the run's first position, then its length if over one
/// (a value of 8 bytes is a run of one: the form every entry had before runs).
pub fn stream_run_value(position: u64, events: u32) -> Vec<u8> {
    let mut value = position.to_be_bytes().to_vec();
    if events > 1 {
        value.extend_from_slice(&events.to_be_bytes());
    }
    value
}

/// The run a stream index value names: its first position and its length.
pub fn decode_stream_run(value: &[u8]) -> Option<(u64, u32)> {
    match value.len() {
        8 => Some((decode_u64(value)?, 1)),
        12 => {
            let events = u32::from_be_bytes(value[8..].try_into().ok()?);
            (events > 1).then_some((decode_u64(&value[..8])?, events))
        }
        _ => None,
    }
}
