//! Which declines may be retried elsewhere, by the card schemes' rules.
//!
//! Codes are accepted both as Kassa's names (`issuer_unavailable`) and as
//! ISO 8583 response codes (`91`). The categories follow Visa's decline
//! categories (1: issuer will never approve; 2: cannot approve now; 3: data
//! quality; 4: generic) and Mastercard's merchant advice codes (`03` and `21`:
//! never retry). Only an unavailable issuer or switch is retried with another
//! provider inside the same request: another route can reach the issuer.
//! Insufficient funds and other "try later" answers are final for the request.

use crate::card::{CardBrand, CardToken};
use crate::payment::DeclineCategory;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// What a decline allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryAdvice {
    /// Another provider may succeed now (the issuer or a switch was unreachable).
    RetryElsewhere,
    /// Final for this request; the merchant may retry later within scheme limits.
    RetryLater,
    /// Never retry this card for this payment (Visa category 1, Mastercard MAC 03/21).
    Never,
}

/// A decline read against the scheme rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclineClass {
    pub category: DeclineCategory,
    pub advice: RetryAdvice,
    /// The Visa decline category (1–4) the code falls in.
    pub visa_category: u8,
}

/// Classify a provider's decline code (and Mastercard merchant advice code, if any).
pub fn classify_decline(code: &str, merchant_advice_code: Option<&str>) -> DeclineClass {
    let (visa_category, advice) = match code {
        // Category 1: the issuer will never approve.
        "04"
        | "07"
        | "12"
        | "14"
        | "15"
        | "41"
        | "43"
        | "46"
        | "57"
        | "R0"
        | "R1"
        | "R3"
        | "pickup_card"
        | "invalid_account"
        | "no_such_issuer"
        | "lost_card"
        | "stolen_card"
        | "closed_account"
        | "transaction_not_permitted"
        | "stop_payment" => (1, RetryAdvice::Never),
        // Category 2, reachable elsewhere: the issuer or a switch did not answer.
        "91" | "92" | "96" | "issuer_unavailable" | "switch_unavailable" | "system_malfunction" => {
            (2, RetryAdvice::RetryElsewhere)
        }
        // Category 2: cannot approve now.
        "03" | "19" | "51" | "59" | "61" | "62" | "65" | "75" | "78" | "86" | "93" | "insufficient_funds"
        | "exceeds_limit" | "exceeds_frequency" | "suspected_fraud" | "restricted_card" | "pin_tries_exceeded"
        | "try_again_later" => (2, RetryAdvice::RetryLater),
        // Category 3: data quality — fix the data, do not retry as is.
        "54" | "55" | "82" | "N7" | "expired_card" | "incorrect_pin" | "incorrect_cvc" => (3, RetryAdvice::Never),
        // Category 4: generic (do not honor and the rest) — final for this request.
        _ => (4, RetryAdvice::RetryLater),
    };
    let advice = match merchant_advice_code {
        Some("03" | "21") => RetryAdvice::Never,
        Some("02") if advice == RetryAdvice::RetryElsewhere => RetryAdvice::RetryLater,
        _ => advice,
    };
    let category = match (visa_category, code) {
        (1 | 3, _) | (_, "05" | "do_not_honor") => DeclineCategory::Hard,
        _ if advice == RetryAdvice::Never => DeclineCategory::Hard,
        _ => DeclineCategory::Soft,
    };
    let advice = if category == DeclineCategory::Hard { RetryAdvice::Never } else { advice };
    DeclineClass { category, advice, visa_category }
}

/// The schemes' limits on reattempts of one card: at most `max` within `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryLimit {
    pub max: u32,
    pub window_ms: i64,
}

/// Per brand: Visa allows 15 reattempts in 30 days, Mastercard 10 in 24 hours; others as Mastercard.
pub fn scheme_retry_limit(brand: CardBrand) -> RetryLimit {
    match brand {
        CardBrand::Visa => RetryLimit { max: 15, window_ms: 30 * 86_400_000 },
        _ => RetryLimit { max: 10, window_ms: 86_400_000 },
    }
}

/// Reattempts per card after a decline, for the scheme limits. Memory is
/// bounded by `cards_max`: the card seen longest ago is forgotten first.
#[derive(Debug, Clone, Default)]
pub struct RetryCounter {
    retries: HashMap<CardToken, VecDeque<i64>>,
    order: VecDeque<CardToken>,
    cards_max: usize,
}

impl RetryCounter {
    pub fn new(cards_max: usize) -> Self {
        RetryCounter { retries: HashMap::new(), order: VecDeque::new(), cards_max: cards_max.max(1) }
    }

    /// Reattempts of `card` within the brand's window ending at `now_ms`.
    pub fn count(&self, card: &CardToken, brand: CardBrand, now_ms: i64) -> u32 {
        let limit = scheme_retry_limit(brand);
        self.retries.get(card).map_or(0, |times| times.iter().filter(|&&t| t > now_ms - limit.window_ms).count() as u32)
    }

    /// Whether one more reattempt stays within the brand's limit.
    pub fn allows(&self, card: &CardToken, brand: CardBrand, now_ms: i64) -> bool {
        self.count(card, brand, now_ms) < scheme_retry_limit(brand).max
    }

    pub fn record(&mut self, card: CardToken, brand: CardBrand, now_ms: i64) {
        let limit = scheme_retry_limit(brand);
        if !self.retries.contains_key(&card) {
            if self.retries.len() >= self.cards_max
                && let Some(oldest) = self.order.pop_front()
            {
                self.retries.remove(&oldest);
            }
            self.order.push_back(card);
        }
        let times = self.retries.entry(card).or_default();
        times.retain(|&t| t > now_ms - limit.window_ms);
        times.push_back(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_declines_are_never_retried() {
        for code in ["do_not_honor", "05", "stolen_card", "43", "invalid_account", "14", "lost_card", "expired_card"] {
            let class = classify_decline(code, None);
            assert_eq!(class.category, DeclineCategory::Hard, "{code}");
            assert_eq!(class.advice, RetryAdvice::Never, "{code}");
        }
    }

    #[test]
    fn only_an_unreachable_issuer_is_retried_elsewhere() {
        for code in ["issuer_unavailable", "91", "switch_unavailable", "92", "96"] {
            assert_eq!(classify_decline(code, None).advice, RetryAdvice::RetryElsewhere, "{code}");
        }
        for code in ["insufficient_funds", "51", "exceeds_limit", "61", "something_new"] {
            let class = classify_decline(code, None);
            assert_eq!((class.category, class.advice), (DeclineCategory::Soft, RetryAdvice::RetryLater), "{code}");
        }
    }

    #[test]
    fn mastercard_advice_codes_override() {
        assert_eq!(classify_decline("91", Some("03")).advice, RetryAdvice::Never);
        assert_eq!(classify_decline("91", Some("21")).category, DeclineCategory::Hard);
        assert_eq!(classify_decline("91", Some("02")).advice, RetryAdvice::RetryLater);
        assert_eq!(classify_decline("91", Some("01")).advice, RetryAdvice::RetryElsewhere);
    }

    #[test]
    fn retry_limits_per_card_and_brand() {
        let card = CardToken([7; 16]);
        let mut counter = RetryCounter::new(10);
        for i in 0..10 {
            assert!(counter.allows(&card, CardBrand::Mastercard, i));
            counter.record(card, CardBrand::Mastercard, i);
        }
        assert!(!counter.allows(&card, CardBrand::Mastercard, 10), "11th within 24 h");
        assert!(counter.allows(&card, CardBrand::Mastercard, 86_400_000 + 10), "the window moved on");
        assert!(counter.allows(&CardToken([8; 16]), CardBrand::Mastercard, 10), "per card");
    }

    #[test]
    fn memory_is_bounded() {
        let mut counter = RetryCounter::new(2);
        for n in 0..5u8 {
            counter.record(CardToken([n; 16]), CardBrand::Visa, 0);
        }
        assert_eq!(counter.retries.len(), 2);
        assert_eq!(counter.count(&CardToken([4; 16]), CardBrand::Visa, 0), 1);
        assert_eq!(counter.count(&CardToken([0; 16]), CardBrand::Visa, 0), 0);
    }
}
