//! Card data. A full card number (PAN) lives only in [`Pan`], whose `Debug`
//! masks it and which is not `Serialize`: it cannot reach an event, a log line
//! or the disk by accident. Accepting a card reduces it at once to a
//! [`CardSummary`]: token, BIN, last four, brand and expiry.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Persisted by variant index: append new brands at the end, never reorder
/// (kassa-codec's golden tests check the indexes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardBrand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    DinersClub,
    UnionPay,
    Maestro,
    Unknown,
}

impl CardBrand {
    pub fn as_str(self) -> &'static str {
        match self {
            CardBrand::Visa => "visa",
            CardBrand::Mastercard => "mastercard",
            CardBrand::Amex => "amex",
            CardBrand::Discover => "discover",
            CardBrand::Jcb => "jcb",
            CardBrand::DinersClub => "diners_club",
            CardBrand::UnionPay => "unionpay",
            CardBrand::Maestro => "maestro",
            CardBrand::Unknown => "unknown",
        }
    }

    /// The brand named by [`CardBrand::as_str`]'s text.
    pub fn from_name(name: &str) -> Option<CardBrand> {
        use CardBrand::*;
        [Visa, Mastercard, Amex, Discover, Jcb, DinersClub, UnionPay, Maestro, Unknown]
            .into_iter()
            .find(|b| b.as_str() == name)
    }

    /// The brand from the leading digits (IIN ranges as published by the schemes).
    pub fn from_digits(digits: &[u8]) -> CardBrand {
        let prefix = |n: usize| -> u32 { digits.iter().take(n).fold(0u32, |acc, d| acc * 10 + u32::from(*d)) };
        let (p1, p2, p3, p4, p6) = (prefix(1), prefix(2), prefix(3), prefix(4), prefix(6));
        match () {
            _ if p1 == 4 => CardBrand::Visa,
            _ if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) => CardBrand::Mastercard,
            _ if p2 == 34 || p2 == 37 => CardBrand::Amex,
            _ if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 => CardBrand::Discover,
            _ if (622_126..=622_925).contains(&p6) => CardBrand::Discover,
            _ if (3528..=3589).contains(&p4) => CardBrand::Jcb,
            _ if (300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39 => CardBrand::DinersClub,
            _ if p2 == 62 => CardBrand::UnionPay,
            _ if p2 == 50 || (56..=58).contains(&p2) || p2 == 67 => CardBrand::Maestro,
            _ => CardBrand::Unknown,
        }
    }

    fn lengths(self) -> std::ops::RangeInclusive<usize> {
        match self {
            CardBrand::Visa => 13..=19,
            CardBrand::Mastercard => 16..=16,
            CardBrand::Amex => 15..=15,
            CardBrand::DinersClub => 14..=19,
            _ => 12..=19,
        }
    }
}

/// Why a card was refused. The message never contains the number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("card number must contain only digits (spaces and dashes are allowed between groups)")]
    NotDigits,
    #[error("card number has {length} digits; a {brand} card has {expected}")]
    WrongLength { length: usize, brand: &'static str, expected: String },
    #[error("card number fails the Luhn check: it was mistyped")]
    LuhnFailed,
    #[error("expiry month {month} is not 1-12")]
    BadExpiryMonth { month: u8 },
    #[error("expiry year {year} is not a four-digit year")]
    BadExpiryYear { year: u16 },
    #[error("card expired at the end of {month:02}/{year}")]
    Expired { month: u8, year: u16 },
    #[error("cvc must be 3 or 4 digits")]
    BadCvc,
}

/// A full card number. Never serialized, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Pan {
    digits: Vec<u8>,
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({}…{})", self.bin(), self.last4())
    }
}

impl Pan {
    /// Validate digits, length for the brand, and the Luhn check digit.
    pub fn parse(text: &str) -> Result<Pan, CardError> {
        let mut digits = Vec::with_capacity(19);
        for c in text.chars() {
            match c {
                '0'..='9' => digits.push(c as u8 - b'0'),
                ' ' | '-' => {}
                _ => return Err(CardError::NotDigits),
            }
        }
        if digits.is_empty() {
            return Err(CardError::NotDigits);
        }
        let brand = CardBrand::from_digits(&digits);
        let lengths = brand.lengths();
        if !lengths.contains(&digits.len()) {
            let expected = if lengths.start() == lengths.end() {
                format!("{}", lengths.start())
            } else {
                format!("{} to {}", lengths.start(), lengths.end())
            };
            return Err(CardError::WrongLength { length: digits.len(), brand: brand.as_str(), expected });
        }
        if !luhn_valid(&digits) {
            return Err(CardError::LuhnFailed);
        }
        Ok(Pan { digits })
    }

    pub fn brand(&self) -> CardBrand {
        CardBrand::from_digits(&self.digits)
    }

    /// First six digits: the issuer identification number.
    pub fn bin(&self) -> String {
        self.digits.iter().take(6).map(|d| char::from(b'0' + d)).collect()
    }

    pub fn last4(&self) -> String {
        let start = self.digits.len().saturating_sub(4);
        self.digits[start..].iter().map(|d| char::from(b'0' + d)).collect()
    }

    /// Expose the digits, for the one place that must send them on (a provider
    /// connector). Named so every call site is easy to find in review.
    pub fn expose_digits(&self) -> String {
        self.digits.iter().map(|d| char::from(b'0' + d)).collect()
    }

    /// A keyed, irreversible token: HMAC-SHA256(key, PAN), first 16 bytes.
    /// The same card under the same key gives the same token, so velocity and
    /// block lists work without keeping the number.
    pub fn tokenize(&self, key: &[u8]) -> CardToken {
        let mac = hmac_sha256(key, &self.digits);
        let mut token = [0u8; 16];
        token.copy_from_slice(&mac[..16]);
        CardToken(token)
    }
}

fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if !i.is_multiple_of(2) {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut key_block = [0u8; BLOCK];
    if key.len() > BLOCK {
        key_block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        key_block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = key_block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = key_block.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(message).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
}

/// An irreversible stand-in for a card number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CardToken(pub [u8; 16]);

impl fmt::Debug for CardToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tok_")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for CardToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Card expiry: valid through the last day of the month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub month: u8,
    pub year: u16,
}

impl Expiry {
    pub fn new(month: u8, year: u16) -> Result<Expiry, CardError> {
        if !(1..=12).contains(&month) {
            return Err(CardError::BadExpiryMonth { month });
        }
        if !(1000..=9999).contains(&year) {
            return Err(CardError::BadExpiryYear { year });
        }
        Ok(Expiry { month, year })
    }

    pub fn is_expired(self, now: Timestamp) -> bool {
        let (year, month, _) = now.civil_date();
        (i64::from(self.year), self.month) < (year, month)
    }
}

/// Everything Kassa keeps about a card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardSummary {
    pub token: CardToken,
    pub brand: CardBrand,
    pub bin: String,
    pub last4: String,
    pub expiry: Expiry,
}

/// A card as the customer typed it. Only in memory, only for as long as it
/// takes to summarize it and send it to a provider.
#[derive(Clone)]
pub struct CardDetails {
    pub pan: Pan,
    pub expiry: Expiry,
    cvc: String,
}

impl fmt::Debug for CardDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardDetails")
            .field("pan", &self.pan)
            .field("expiry", &self.expiry)
            .field("cvc", &"***")
            .finish()
    }
}

impl CardDetails {
    /// Validate a card for a payment at `now`: number, expiry (not past), CVC.
    pub fn parse(number: &str, exp_month: u8, exp_year: u16, cvc: &str, now: Timestamp) -> Result<Self, CardError> {
        let pan = Pan::parse(number)?;
        let expiry = Expiry::new(exp_month, exp_year)?;
        if expiry.is_expired(now) {
            return Err(CardError::Expired { month: exp_month, year: exp_year });
        }
        if !(3..=4).contains(&cvc.len()) || !cvc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CardError::BadCvc);
        }
        Ok(CardDetails { pan, expiry, cvc: cvc.to_owned() })
    }

    /// A card accepted earlier, read back (from sealed transport): number,
    /// expiry and CVC are checked again, but not against a date — whether it
    /// has expired since it was accepted is the issuer's call.
    pub fn restore(number: &str, exp_month: u8, exp_year: u16, cvc: &str) -> Result<Self, CardError> {
        CardDetails::parse(number, exp_month, exp_year, cvc, Timestamp(0))
    }

    pub fn expose_cvc(&self) -> &str {
        &self.cvc
    }

    pub fn summarize(&self, token_key: &[u8]) -> CardSummary {
        CardSummary {
            token: self.pan.tokenize(token_key),
            brand: self.pan.brand(),
            bin: self.pan.bin(),
            last4: self.pan.last4(),
            expiry: self.expiry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_795_651_200_000); // 2026-11-26

    #[test]
    fn test_cards_validate_with_brand() {
        for (number, brand) in [
            ("4242424242424242", CardBrand::Visa),
            ("5555555555554444", CardBrand::Mastercard),
            ("2223003122003222", CardBrand::Mastercard),
            ("378282246310005", CardBrand::Amex),
            ("6011111111111117", CardBrand::Discover),
            ("3566002020360505", CardBrand::Jcb),
            ("4000 0000 0000 0002", CardBrand::Visa),
        ] {
            let pan = Pan::parse(number).unwrap_or_else(|e| panic!("{number}: {e}"));
            assert_eq!(pan.brand(), brand, "{number}");
        }
    }

    #[test]
    fn bad_numbers_are_refused() {
        assert_eq!(Pan::parse("4242424242424241"), Err(CardError::LuhnFailed));
        assert_eq!(Pan::parse("4242x42424242424"), Err(CardError::NotDigits));
        assert_eq!(Pan::parse(""), Err(CardError::NotDigits));
        assert!(matches!(Pan::parse("42424242"), Err(CardError::WrongLength { length: 8, .. })));
        assert!(matches!(Pan::parse("37828224631000"), Err(CardError::WrongLength { .. })));
    }

    #[test]
    fn the_number_never_prints() {
        let card = CardDetails::parse("4242424242424242", 12, 2030, "123", NOW).unwrap();
        let debug = format!("{card:?} {:?}", card.summarize(b"k"));
        assert!(!debug.contains("4242424242424242"), "{debug}");
        assert!(!debug.contains("123\""), "{debug}");
        assert!(debug.contains("424242") && debug.contains("4242"));
    }

    #[test]
    fn expiry_is_checked_against_injected_time() {
        assert!(CardDetails::parse("4242424242424242", 11, 2026, "123", NOW).is_ok());
        assert_eq!(
            CardDetails::parse("4242424242424242", 10, 2026, "123", NOW).unwrap_err(),
            CardError::Expired { month: 10, year: 2026 }
        );
        assert_eq!(Expiry::new(13, 2030), Err(CardError::BadExpiryMonth { month: 13 }));
        assert!(CardDetails::parse("4242424242424242", 12, 2030, "12a", NOW).is_err());
    }

    #[test]
    fn tokens_are_keyed_and_stable() {
        let pan = Pan::parse("4242424242424242").unwrap();
        assert_eq!(pan.tokenize(b"a"), pan.tokenize(b"a"));
        assert_ne!(pan.tokenize(b"a"), pan.tokenize(b"b"));
        // RFC 4231 test case 2 keeps the HMAC honest.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(mac[..4], [0x5b, 0xdc, 0xc1, 0x46]);
    }
}
