//! Merchant API keys and idempotency fingerprints.
//!
//! A key is `sk_` and 40 hex digits (160 random bits, given by the caller:
//! this crate reads no randomness). Kassa stores only its SHA-256, and finds
//! the merchant by that hash, so a stored key cannot be used and a lookup
//! leaks nothing through timing.

use sha2::{Digest, Sha256};
use std::fmt;

/// A merchant's secret API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

/// Why an `Authorization` header was refused. Shown to callers as 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    NotBearer,
    Malformed,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(sk_…{})", &self.0[self.0.len() - 4..])
    }
}

impl ApiKey {
    pub fn from_random(bytes: [u8; 20]) -> ApiKey {
        ApiKey(format!("sk_{}", hex::encode(bytes)))
    }

    /// Parse a key as typed; refuses anything but `sk_` + 40 lower-case hex digits.
    pub fn parse(text: &str) -> Result<ApiKey, KeyError> {
        let body = text.strip_prefix("sk_").ok_or(KeyError::Malformed)?;
        if body.len() != 40 || !body.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(KeyError::Malformed);
        }
        Ok(ApiKey(text.to_owned()))
    }

    /// From an `Authorization: Bearer sk_…` header value.
    pub fn from_authorization(header: Option<&str>) -> Result<ApiKey, KeyError> {
        let header = header.ok_or(KeyError::Missing)?;
        let token = header.strip_prefix("Bearer ").ok_or(KeyError::NotBearer)?;
        ApiKey::parse(token.trim())
    }

    /// The text, to show once when the key is created.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// What is stored: SHA-256 of the key, hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }
}

/// The fingerprint of a request, to tell a replay (same key, same request)
/// from a reuse of an Idempotency-Key for a different request.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), body] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_never_print() {
        let key = ApiKey::from_random([0xab; 20]);
        assert_eq!(key.reveal().len(), 43);
        assert_eq!(ApiKey::parse(key.reveal()), Ok(key.clone()));
        assert!(!format!("{key:?}").contains(&key.reveal()[3..20]));
        assert_eq!(key.hash_hex().len(), 64);
        assert_ne!(key.hash_hex(), ApiKey::from_random([0xac; 20]).hash_hex());
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = format!("Bearer {}", ApiKey::from_random([1; 20]).reveal());
        assert!(ApiKey::from_authorization(Some(&good)).is_ok());
        assert_eq!(ApiKey::from_authorization(None), Err(KeyError::Missing));
        assert_eq!(ApiKey::from_authorization(Some("Basic abc")), Err(KeyError::NotBearer));
        assert_eq!(ApiKey::from_authorization(Some("Bearer sk_123")), Err(KeyError::Malformed));
        assert_eq!(
            ApiKey::from_authorization(Some("Bearer pk_0101010101010101010101010101010101010101")),
            Err(KeyError::Malformed)
        );
        let upper = format!("Bearer sk_{}", "A".repeat(40));
        assert_eq!(ApiKey::from_authorization(Some(&upper)), Err(KeyError::Malformed));
    }

    #[test]
    fn fingerprints_separate_the_parts() {
        assert_eq!(fingerprint("POST", "/v1/payments", b"{}"), fingerprint("POST", "/v1/payments", b"{}"));
        assert_ne!(fingerprint("POST", "/v1/payments", b"{}"), fingerprint("POST", "/v1/payments", b"{ }"));
        assert_ne!(fingerprint("POST", "/v1/a", b"b"), fingerprint("POST", "/v1/ab", b""));
    }
}
