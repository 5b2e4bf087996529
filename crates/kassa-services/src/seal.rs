//! Card data on its way from ingest to authorization, sealed.
//!
//! Ingest and authorization may run in different processes, so the card
//! cannot stay in one process's memory ([`crate::vault::CardVault`]). Ingest
//! seals it (AES-256-GCM, a fresh random nonce each time, the payment id as
//! associated data so a sealed card opens only for its own payment) and
//! records it as a `command.card` message just before the payment's request;
//! authorization opens it into its vault. The card is never in clear outside
//! memory: the ingest log and `payments.commands` hold only the sealed bytes,
//! and whoever holds them without the key learns nothing.
//!
//! Sealed form (version 1): `0x01`, 12-byte nonce, ciphertext with its 16-byte
//! tag. The plaintext is `PAN|MM|YYYY|CVC` in ASCII.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use kassa_domain::{CardDetails, PaymentId};

const VERSION: u8 = 1;
const NONCE_BYTES: usize = 12;
/// Bytes of a card key.
pub const CARD_KEY_BYTES: usize = 32;

/// Why sealed card data did not open. Says nothing about the card.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a card key is {CARD_KEY_BYTES} bytes, this one is {0}")]
    BadKey(usize),
    #[error("sealed card data of version {0} (this build reads version {VERSION})")]
    UnknownVersion(u8),
    #[error("sealed card data is too short ({0} bytes)")]
    Truncated(usize),
    #[error("sealed card data does not open: another key, another payment, or altered bytes")]
    DoesNotOpen,
    #[error("sealed card data opened but does not hold a valid card")]
    NotACard,
}

/// Seals and opens card data with one key. Share the key between the ingest
/// and authorization processes (`card.key` in the data directory for `kassa up`).
pub struct CardSeal {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for CardSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardSeal { key: *** }")
    }
}

impl CardSeal {
    pub fn new(key: &[u8]) -> Result<Self, SealError> {
        let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::BadKey(key.len()))?;
        Ok(CardSeal { cipher })
    }

    /// The card, sealed for `payment_id`.
    pub fn seal(&self, payment_id: PaymentId, card: &CardDetails) -> Vec<u8> {
        let plaintext = format!(
            "{}|{:02}|{:04}|{}",
            card.pan.expose_digits(),
            card.expiry.month,
            card.expiry.year,
            card.expose_cvc()
        );
        let nonce_bytes: [u8; NONCE_BYTES] = rand::random();
        let aad = payment_id.as_u128().to_be_bytes();
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), Payload { msg: plaintext.as_bytes(), aad: &aad })
            .expect("AES-GCM encrypts any message shorter than 64 GiB");
        let mut sealed = Vec::with_capacity(1 + NONCE_BYTES + ciphertext.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Open card data sealed for `payment_id`.
    pub fn open(&self, payment_id: PaymentId, sealed: &[u8]) -> Result<CardDetails, SealError> {
        match sealed.first() {
            None => return Err(SealError::Truncated(0)),
            Some(&VERSION) => {}
            Some(&other) => return Err(SealError::UnknownVersion(other)),
        }
        if sealed.len() < 1 + NONCE_BYTES + 16 {
            return Err(SealError::Truncated(sealed.len()));
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_BYTES);
        let aad = payment_id.as_u128().to_be_bytes();
        let plaintext = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map_err(|_| SealError::DoesNotOpen)?;
        let text = std::str::from_utf8(&plaintext).map_err(|_| SealError::NotACard)?;
        let mut parts = text.split('|');
        let (Some(number), Some(month), Some(year), Some(cvc), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::NotACard);
        };
        let month: u8 = month.parse().map_err(|_| SealError::NotACard)?;
        let year: u16 = year.parse().map_err(|_| SealError::NotACard)?;
        // Validated as accepted; whether it has expired since is the issuer's call.
        CardDetails::restore(number, month, year, cvc).map_err(|_| SealError::NotACard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kassa_domain::Timestamp;

    fn card() -> CardDetails {
        CardDetails::parse("4242424242424242", 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap()
    }

    #[test]
    fn a_sealed_card_opens_for_its_payment_only_and_never_shows_in_clear() {
        let seal = CardSeal::new(&[7; 32]).unwrap();
        let payment = PaymentId::from_u128(1);
        let sealed = seal.seal(payment, &card());
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("4242") && !text.contains("123"), "no part of the card in clear");
        let opened = seal.open(payment, &sealed).unwrap();
        assert_eq!(opened.pan.expose_digits(), "4242424242424242");
        assert_eq!((opened.expiry.month, opened.expiry.year, opened.expose_cvc()), (12, 2030, "123"));
        assert_ne!(sealed, seal.seal(payment, &card()), "a fresh nonce each time");

        assert_eq!(seal.open(PaymentId::from_u128(2), &sealed).unwrap_err(), SealError::DoesNotOpen);
        let other_key = CardSeal::new(&[8; 32]).unwrap();
        assert_eq!(other_key.open(payment, &sealed).unwrap_err(), SealError::DoesNotOpen);
        for at in [1, 13, sealed.len() - 1] {
            let mut altered = sealed.clone();
            altered[at] ^= 1;
            assert_eq!(seal.open(payment, &altered).unwrap_err(), SealError::DoesNotOpen, "byte {at}");
        }
        assert_eq!(seal.open(payment, &sealed[..20]).unwrap_err(), SealError::Truncated(20));
        assert_eq!(seal.open(payment, &[]).unwrap_err(), SealError::Truncated(0));
        let mut future = sealed.clone();
        future[0] = 9;
        assert_eq!(seal.open(payment, &future).unwrap_err(), SealError::UnknownVersion(9));
        assert_eq!(CardSeal::new(&[1; 16]).unwrap_err(), SealError::BadKey(16));
    }

    #[test]
    fn sealed_bytes_that_are_not_a_card_are_refused() {
        let seal = CardSeal::new(&[7; 32]).unwrap();
        let payment = PaymentId::from_u128(1);
        let aad = payment.as_u128().to_be_bytes();
        for plaintext in ["4242424242424242|12|2030", "4242424242424241|12|2030|123", "x|y|z|w", "a|b|c|d|e"] {
            let nonce = [3u8; NONCE_BYTES];
            let ciphertext = seal
                .cipher
                .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext.as_bytes(), aad: &aad })
                .unwrap();
            let mut sealed = vec![VERSION];
            sealed.extend_from_slice(&nonce);
            sealed.extend_from_slice(&ciphertext);
            assert_eq!(seal.open(payment, &sealed).unwrap_err(), SealError::NotACard, "{plaintext}");
        }
    }
}
