//! Time and ids for the shell: the core takes them as arguments.

use kassa_domain::Timestamp;
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
