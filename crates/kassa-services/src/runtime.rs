//! Time and ids for the shell: the core takes them as arguments.

use kassa_domain::Timestamp;
use kassa_eventlog::{EventLog, LogError, StateWrite, Table};
use sha2::{Digest, Sha256};

/// Where the services read "now".
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Timestamp(ms)
    }
}

/// The clock that stamps the guards against a second charge (idempotency
/// claims and records) and decides when they have been kept long enough. It
/// counts only time this process measured on its monotonic clock, from the
/// last stored reading (the first time: the wall clock), so a guard's age is
/// the difference of two readings of one clock and never more than the time
/// between them (as the monotonic clock counts it, which NTP may slew by a
/// fraction), whatever the wall clock does — running ahead, set back.
/// Time while no process ran is not counted: after an outage, guards are kept
/// longer by that much, never shorter. Store a reading with what it stamped.
#[derive(Debug)]
pub struct ExpiryClock {
    base_ms: i64,
    since: std::time::Instant,
}

impl ExpiryClock {
    /// Resume from the last stored reading. With none (the first start, or
    /// stamps made by the wall clock before this clock existed): the wall
    /// clock, but not past the newest stamp there is — a wall clock running
    /// ahead at that moment must not age what was stamped before.
    pub fn resume(stored_ms: Option<i64>, newest_stamp_ms: Option<i64>, wall_ms: i64) -> ExpiryClock {
        let base_ms = stored_ms.unwrap_or_else(|| newest_stamp_ms.map_or(wall_ms, |newest| newest.min(wall_ms)));
        ExpiryClock { base_ms, since: std::time::Instant::now() }
    }

    /// The reading now: never less than an earlier one.
    pub fn now(&self) -> i64 {
        let measured = i64::try_from(self.since.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base_ms.saturating_add(measured)
    }

    /// The stored form of a reading.
    pub fn encode(now_ms: i64) -> Vec<u8> {
        now_ms.to_be_bytes().to_vec()
    }

    /// The write that stores a reading under `key` (in the state table).
    pub fn stored(key: &[u8], now_ms: i64) -> StateWrite {
        StateWrite { table: Table::State, key: key.to_vec(), value: Some(ExpiryClock::encode(now_ms)) }
    }

    /// The newest stamp of a time index (keys: `prefix`, then the stamp as 8
    /// big-endian bytes, then anything), if it has an entry: one backward seek.
    pub fn newest_stamp(log: &EventLog, prefix: &[u8]) -> Result<Option<i64>, LogError> {
        let mut until = prefix.to_vec();
        if let Some(last) = until.last_mut() {
            *last += 1; // just past every key under the prefix (it ends in '/')
        }
        let newest = log.last_in_range(Table::State, prefix, &until)?;
        Ok(newest.and_then(|(key, _)| {
            let stamp: [u8; 8] = key.get(prefix.len()..prefix.len() + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(stamp) as i64)
        }))
    }

    /// A stored reading (`None` when absent or not 8 bytes).
    pub fn decode(bytes: Option<&[u8]>) -> Option<i64> {
        Some(i64::from_be_bytes(bytes?.try_into().ok()?))
    }
}

/// Fresh random ids (ULID layout via the typed id constructors).
#[derive(Debug, Default)]
pub struct IdSource;

impl IdSource {
    pub fn random(&self) -> u128 {
        rand::random::<u128>()
    }
}

/// A deterministic id derived from a cause: the same cause gives the same id
/// on every replay, so consumers can drop duplicates by id.
pub fn derived_id(cause: u128, label: &str, index: u64) -> u128 {
    let mut hasher = Sha256::new();
    hasher.update(cause.to_be_bytes());
    hasher.update(label.as_bytes());
    hasher.update(index.to_be_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_clock_counts_measured_time_from_its_stored_reading() {
        let start = 1_795_651_200_000;
        let fresh = ExpiryClock::resume(None, None, start);
        let first = fresh.now();
        assert!((start..start + 60_000).contains(&first), "starts at the wall clock: {first}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let later = fresh.now();
        assert!(later >= first + 20 && later < first + 60_000, "advances with measured time: {}", later - first);
        // Resumed from a stored reading, whatever the wall clock says (two days ahead, or behind).
        for wall in [start + 2 * 86_400_000, start - 86_400_000] {
            let resumed = ExpiryClock::resume(Some(later), Some(start), wall).now();
            assert!((later..later + 60_000).contains(&resumed), "took the wall clock's word: {resumed}");
        }
        // Nothing stored yet, stamps made by the wall clock before: not past the newest of them.
        let upgraded = ExpiryClock::resume(None, Some(start), start + 2 * 86_400_000).now();
        assert!((start..start + 60_000).contains(&upgraded), "aged the old stamps by a clock ahead: {upgraded}");
        let behind = ExpiryClock::resume(None, Some(start), start - 1_000).now();
        assert!((start - 1_000..start + 59_000).contains(&behind), "{behind}");
        assert_eq!(ExpiryClock::decode(Some(&ExpiryClock::encode(start))), Some(start));
        assert_eq!(ExpiryClock::decode(Some(b"short")), None);
        assert_eq!(ExpiryClock::decode(None), None);
    }
}
