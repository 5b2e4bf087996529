//! 128-bit, time-ordered ids with typed wrappers and a stable text form.
//!
//! Layout (ULID): 48 bits of milliseconds since the Unix epoch, then 80 random
//! bits. Both parts are arguments: the core reads no clock and no randomness.
//! Text form: `<prefix>_<26 Crockford base32 chars>`, e.g. `pay_01JD3X…`;
//! text sorts the same way as the number.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Why a text id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id {text:?} should start with \"{expected}_\"")]
    WrongPrefix { text: String, expected: &'static str },
    #[error("id {text:?} should have 26 base32 characters after the prefix")]
    WrongLength { text: String },
    #[error("id {text:?} has a character that is not Crockford base32")]
    BadCharacter { text: String },
    #[error("id {text:?} is larger than 128 bits")]
    Overflow { text: String },
}

/// The raw 128-bit id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id128(pub u128);

impl Id128 {
    /// Build from a millisecond timestamp and 80 random bits (higher bits of
    /// `random` are ignored).
    pub fn from_parts(unix_ms: u64, random: u128) -> Self {
        let ms = u128::from(unix_ms & 0xFFFF_FFFF_FFFF);
        let rand = random & ((1u128 << 80) - 1);
        Id128((ms << 80) | rand)
    }

    pub fn unix_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Id128(u128::from_be_bytes(bytes))
    }

    /// The 26-character base32 body of the text form.
    pub fn encode_base32(self) -> [u8; 26] {
        let mut out = [0u8; 26];
        let mut value = self.0;
        for slot in out.iter_mut().rev() {
            *slot = CROCKFORD[(value & 31) as usize];
            value >>= 5;
        }
        out
    }

    pub fn decode_base32(text: &str) -> Result<Self, IdError> {
        if text.len() != 26 {
            return Err(IdError::WrongLength { text: text.to_owned() });
        }
        let mut value: u128 = 0;
        for (index, byte) in text.bytes().enumerate() {
            let digit = match byte.to_ascii_uppercase() {
                b @ b'0'..=b'9' => b - b'0',
                b'O' => 0,
                b'I' | b'L' => 1,
                b => match CROCKFORD.iter().position(|&c| c == b) {
                    Some(p) => p as u8,
                    None => return Err(IdError::BadCharacter { text: text.to_owned() }),
                },
            };
            // 26 chars carry 130 bits; the first may only hold 3 of them.
            if index == 0 && digit > 7 {
                return Err(IdError::Overflow { text: text.to_owned() });
            }
            value = (value << 5) | u128::from(digit);
        }
        Ok(Id128(value))
    }
}

impl fmt::Debug for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self.encode_base32();
        f.write_str(std::str::from_utf8(&body).unwrap_or("?"))
    }
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Id128);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn from_parts(unix_ms: u64, random: u128) -> Self {
                $name(Id128::from_parts(unix_ms, random))
            }

            pub fn as_u128(self) -> u128 {
                self.0 .0
            }

            pub fn from_u128(raw: u128) -> Self {
                $name(Id128(raw))
            }

            pub fn parse(text: &str) -> Result<Self, IdError> {
                let body = text
                    .strip_prefix($prefix)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .ok_or_else(|| IdError::WrongPrefix { text: text.to_owned(), expected: $prefix })?;
                Id128::decode_base32(body).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let body = self.0.encode_base32();
                write!(f, "{}_{}", $prefix, std::str::from_utf8(&body).unwrap_or("?"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::parse(s)
            }
        }

        // Persisted as the raw number: compact in bincode, and the prefix is
        // implied by the field's type.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    serializer.serialize_u128(self.as_u128())
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let text = String::deserialize(deserializer)?;
                    $name::parse(&text).map_err(serde::de::Error::custom)
                } else {
                    u128::deserialize(deserializer).map($name::from_u128)
                }
            }
        }
    };
}

typed_id!(/** A payment. */ PaymentId, "pay");
typed_id!(/** A merchant. */ MerchantId, "mer");
typed_id!(/** A refund of (part of) a payment. */ RefundId, "re");
typed_id!(/** A capture of (part of) a payment. */ CaptureId, "cap");
typed_id!(/** One authorization attempt at one provider; the provider sees it. */ AttemptId, "att");
typed_id!(/** A settlement batch. */ BatchId, "bat");
typed_id!(/** A reconciliation report. */ ReportId, "rpt");
typed_id!(/** An event in the log. */ EventId, "evt");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_form_is_prefixed_and_stable() {
        let id = PaymentId::from_parts(1_700_000_000_000, 0x1234_5678_9abc_def0_1234);
        let text = id.to_string();
        assert!(text.starts_with("pay_"));
        assert_eq!(text.len(), 4 + 26);
        assert_eq!(PaymentId::parse(&text), Ok(id));
        assert_eq!(id.0.unix_ms(), 1_700_000_000_000);
        assert_eq!(PaymentId::from_u128(0).to_string(), "pay_00000000000000000000000000");
        assert_eq!(RefundId::from_u128(u128::MAX).to_string(), "re_7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
    }

    #[test]
    fn bad_text_is_refused_with_a_reason() {
        assert!(matches!(PaymentId::parse("re_00000000000000000000000000"), Err(IdError::WrongPrefix { .. })));
        assert!(matches!(PaymentId::parse("pay_123"), Err(IdError::WrongLength { .. })));
        assert!(matches!(PaymentId::parse("pay_0000000000000000000000000U"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(PaymentId::parse("pay_80000000000000000000000000"), Err(IdError::Overflow { .. })));
        assert!(PaymentId::parse("pay_0000000000000000000000000é").is_err());
    }

    proptest! {
        #[test]
        fn text_round_trips_and_sorts_like_the_number(a: u128, b: u128) {
            let (x, y) = (PaymentId::from_u128(a), PaymentId::from_u128(b));
            prop_assert_eq!(PaymentId::parse(&x.to_string()).unwrap(), x);
            prop_assert_eq!(x.to_string().cmp(&y.to_string()), a.cmp(&b));
        }

        #[test]
        fn ids_order_by_time(ms_a in 0u64..(1 << 48), ms_b in 0u64..(1 << 48), r: u128) {
            let (x, y) = (Id128::from_parts(ms_a, r), Id128::from_parts(ms_b, r));
            prop_assert_eq!(x.cmp(&y), ms_a.cmp(&ms_b));
        }
    }
}
