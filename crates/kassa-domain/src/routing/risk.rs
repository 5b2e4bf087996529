//! Risk checks that run before routing. A decline for risk names the rule
//! that fired. Checks are a trait, so a merchant's own can sit beside the
//! built-ins; what a check sees is plain data (the payment's facts and the
//! velocity counts observed), recorded in the routing decision for replay.

use super::PaymentFacts;
use crate::card::CardToken;
use crate::currency::Currency;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

/// Counts observed before the payment, within each velocity window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskSignals {
    pub card_payments_in_window: u32,
    pub merchant_payments_in_window: u32,
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskResult {
    pub check: String,
    pub fired: bool,
    pub reason: Option<String>,
}

/// A risk rule. Pure: same facts and signals, same verdict.
pub trait RiskCheck: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    /// `Some(reason)` when the payment must be declined.
    fn check(&self, facts: &PaymentFacts, signals: &RiskSignals) -> Option<String>;
}

#[derive(Debug)]
struct AmountLimit {
    max_minor: BTreeMap<Currency, i64>,
}

impl RiskCheck for AmountLimit {
    fn name(&self) -> &str {
        "amount_limit"
    }
    fn check(&self, facts: &PaymentFacts, _: &RiskSignals) -> Option<String> {
        let max = *self.max_minor.get(&facts.amount.currency)?;
        (facts.amount.minor > max).then(|| format!("amount {} is over the limit of {max} minor units", facts.amount))
    }
}

#[derive(Debug)]
struct BinCountryBlock {
    countries: Vec<String>,
}

impl RiskCheck for BinCountryBlock {
    fn name(&self) -> &str {
        "bin_country_block"
    }
    fn check(&self, facts: &PaymentFacts, _: &RiskSignals) -> Option<String> {
        let country = facts.bin_country.as_deref()?;
        self.countries.iter().any(|c| c == country).then(|| format!("cards issued in {country} are blocked"))
    }
}

#[derive(Debug)]
struct CardTokenBlock {
    tokens: Vec<CardToken>,
}

impl RiskCheck for CardTokenBlock {
    fn name(&self) -> &str {
        "card_block"
    }
    fn check(&self, facts: &PaymentFacts, _: &RiskSignals) -> Option<String> {
        self.tokens.contains(&facts.card_token).then(|| "the card is on the block list".to_owned())
    }
}

#[derive(Debug)]
struct CardVelocity {
    limit: VelocityLimit,
}

impl RiskCheck for CardVelocity {
    fn name(&self) -> &str {
        "card_velocity"
    }
    fn check(&self, _: &PaymentFacts, signals: &RiskSignals) -> Option<String> {
        (signals.card_payments_in_window >= self.limit.max).then(|| {
            format!(
                "the card already made {} payments within {} ms",
                signals.card_payments_in_window, self.limit.window_ms
            )
        })
    }
}

#[derive(Debug)]
struct MerchantVelocity {
    limit: VelocityLimit,
}

impl RiskCheck for MerchantVelocity {
    fn name(&self) -> &str {
        "merchant_velocity"
    }
    fn check(&self, _: &PaymentFacts, signals: &RiskSignals) -> Option<String> {
        (signals.merchant_payments_in_window >= self.limit.max).then(|| {
            format!(
                "the merchant already took {} payments within {} ms",
                signals.merchant_payments_in_window, self.limit.window_ms
            )
        })
    }
}

/// At most `max` payments within `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VelocityLimit {
    pub max: u32,
    pub window_ms: i64,
}

/// The built-in checks, as configured. Everything is off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RiskConfig {
    /// Largest amount per currency code, in minor units.
    pub amount_max_minor: BTreeMap<String, i64>,
    /// ISO 3166 alpha-2 codes of issuing countries to refuse.
    pub blocked_bin_countries: Vec<String>,
    /// Card tokens (`tok_` + 32 hex digits) to refuse.
    pub blocked_cards: Vec<String>,
    pub card_velocity: Option<VelocityLimit>,
    pub merchant_velocity: Option<VelocityLimit>,
}

/// The checks to run, built from a [`RiskConfig`] plus any of the caller's own.
#[derive(Debug, Default)]
pub struct RiskChecks {
    checks: Vec<Box<dyn RiskCheck>>,
    pub card_velocity_window_ms: Option<i64>,
    pub merchant_velocity_window_ms: Option<i64>,
}

fn parse_token(text: &str) -> Option<CardToken> {
    let hex = text.strip_prefix("tok_")?;
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(CardToken(bytes))
}

impl RiskConfig {
    /// Validate and build. The error says which entry is wrong.
    pub fn build(&self) -> Result<RiskChecks, String> {
        let mut checks: Vec<Box<dyn RiskCheck>> = Vec::new();
        if !self.amount_max_minor.is_empty() {
            let mut max_minor = BTreeMap::new();
            for (code, &max) in &self.amount_max_minor {
                let currency = Currency::from_code(code)
                    .map_err(|_| format!("risk.amount_max_minor: {code:?} is not an ISO 4217 currency code"))?;
                if max <= 0 {
                    return Err(format!("risk.amount_max_minor.{code}: must be positive, got {max}"));
                }
                max_minor.insert(currency, max);
            }
            checks.push(Box::new(AmountLimit { max_minor }));
        }
        if !self.blocked_bin_countries.is_empty() {
            for country in &self.blocked_bin_countries {
                if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!(
                        "risk.blocked_bin_countries: {country:?} is not an ISO 3166 alpha-2 code (two capitals)"
                    ));
                }
            }
            checks.push(Box::new(BinCountryBlock { countries: self.blocked_bin_countries.clone() }));
        }
        if !self.blocked_cards.is_empty() {
            let tokens = self
                .blocked_cards
                .iter()
                .map(|t| parse_token(t).ok_or_else(|| format!("risk.blocked_cards: {t:?} is not tok_ + 32 hex digits")))
                .collect::<Result<Vec<_>, _>>()?;
            checks.push(Box::new(CardTokenBlock { tokens }));
        }
        let velocity = |name: &str, limit: &Option<VelocityLimit>| -> Result<Option<VelocityLimit>, String> {
            match limit {
                Some(l) if l.max == 0 || l.window_ms <= 0 => {
                    Err(format!("risk.{name}: max and window_ms must be positive, got {} and {}", l.max, l.window_ms))
                }
                other => Ok(*other),
            }
        };
        let card_velocity = velocity("card_velocity", &self.card_velocity)?;
        let merchant_velocity = velocity("merchant_velocity", &self.merchant_velocity)?;
        if let Some(limit) = card_velocity {
            checks.push(Box::new(CardVelocity { limit }));
        }
        if let Some(limit) = merchant_velocity {
            checks.push(Box::new(MerchantVelocity { limit }));
        }
        Ok(RiskChecks {
            checks,
            card_velocity_window_ms: card_velocity.map(|l| l.window_ms),
            merchant_velocity_window_ms: merchant_velocity.map(|l| l.window_ms),
        })
    }
}

impl RiskChecks {
    /// Add a check of the caller's own.
    pub fn push(&mut self, check: Box<dyn RiskCheck>) {
        self.checks.push(check);
    }

    /// Run every check; the verdicts in order.
    pub fn assess(&self, facts: &PaymentFacts, signals: &RiskSignals) -> Vec<RiskResult> {
        self.checks
            .iter()
            .map(|check| {
                let reason = check.check(facts, signals);
                RiskResult { check: check.name().to_owned(), fired: reason.is_some(), reason }
            })
            .collect()
    }
}

/// Events per key within a sliding window, for velocity. Memory is bounded:
/// at most `keys_max` keys (the one seen longest ago goes first), and each
/// key's list is pruned to the window on every touch.
#[derive(Debug, Clone)]
pub struct VelocityCounter {
    window_ms: i64,
    keys_max: usize,
    times: HashMap<u128, VecDeque<i64>>,
    order: VecDeque<u128>,
}

impl VelocityCounter {
    pub fn new(window_ms: i64, keys_max: usize) -> Self {
        VelocityCounter { window_ms, keys_max: keys_max.max(1), times: HashMap::new(), order: VecDeque::new() }
    }

    /// Events of `key` within the window ending at `now_ms`: a binary search,
    /// since each key's times are kept in order.
    pub fn count(&self, key: u128, now_ms: i64) -> u32 {
        self.times.get(&key).map_or(0, |t| {
            let first_inside = t.partition_point(|&at| at <= now_ms - self.window_ms);
            let after_now = t.partition_point(|&at| at <= now_ms);
            (after_now - first_inside) as u32
        })
    }

    pub fn record(&mut self, key: u128, now_ms: i64) {
        if !self.times.contains_key(&key) {
            if self.times.len() >= self.keys_max
                && let Some(oldest) = self.order.pop_front()
            {
                self.times.remove(&oldest);
            }
            self.order.push_back(key);
        }
        let times = self.times.entry(key).or_default();
        while times.front().is_some_and(|&at| at <= now_ms - self.window_ms) {
            times.pop_front();
        }
        // Kept in order even if the clock steps back, so `count` can binary-search.
        let at = times.back().map_or(now_ms, |&last| last.max(now_ms));
        times.push_back(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CardBrand, MerchantId, Money, PaymentId};

    fn facts(minor: i64, country: &str) -> PaymentFacts {
        PaymentFacts {
            payment_id: PaymentId::from_u128(1),
            merchant_id: MerchantId::from_u128(2),
            amount: Money::new(minor, Currency::from_code("EUR").unwrap()),
            brand: CardBrand::Visa,
            bin: "424242".into(),
            bin_country: Some(country.into()),
            card_token: CardToken([9; 16]),
        }
    }

    fn config() -> RiskConfig {
        RiskConfig {
            amount_max_minor: [("EUR".to_owned(), 100_000)].into(),
            blocked_bin_countries: vec!["KP".into()],
            blocked_cards: vec![format!("tok_{}", "09".repeat(16))],
            card_velocity: Some(VelocityLimit { max: 3, window_ms: 60_000 }),
            merchant_velocity: Some(VelocityLimit { max: 1000, window_ms: 1_000 }),
        }
    }

    fn fired(results: &[RiskResult]) -> Vec<&str> {
        results.iter().filter(|r| r.fired).map(|r| r.check.as_str()).collect()
    }

    #[test]
    fn each_rule_fires_on_its_own_input_and_says_why() {
        let checks = config().build().unwrap();
        let quiet = RiskSignals::default();
        assert_eq!(fired(&checks.assess(&facts(100_001, "DE"), &quiet)), ["amount_limit", "card_block"]);
        assert_eq!(fired(&checks.assess(&facts(5, "KP"), &quiet)), ["bin_country_block", "card_block"]);
        let busy = RiskSignals { card_payments_in_window: 3, merchant_payments_in_window: 0 };
        let results = checks.assess(&facts(5, "DE"), &busy);
        assert!(fired(&results).contains(&"card_velocity"));
        let reason = results.iter().find(|r| r.check == "card_velocity").unwrap().reason.clone().unwrap();
        assert_eq!(reason, "the card already made 3 payments within 60000 ms");
    }

    #[test]
    fn bad_config_is_refused_with_the_entry() {
        let mut bad = config();
        bad.amount_max_minor = [("EURO".to_owned(), 1)].into();
        assert!(bad.build().unwrap_err().contains("\"EURO\""));
        let mut bad = config();
        bad.blocked_cards = vec!["4242424242424242".into()];
        assert!(bad.build().unwrap_err().contains("tok_"));
        let mut bad = config();
        bad.blocked_bin_countries = vec!["usa".into()];
        assert!(bad.build().unwrap_err().contains("alpha-2"));
        let mut bad = config();
        bad.card_velocity = Some(VelocityLimit { max: 0, window_ms: 1 });
        assert!(bad.build().is_err());
    }

    #[test]
    fn velocity_counts_within_the_window_and_stays_bounded() {
        let mut counter = VelocityCounter::new(1_000, 2);
        counter.record(1, 0);
        counter.record(1, 500);
        assert_eq!(counter.count(1, 999), 2);
        assert_eq!(counter.count(1, 1_000), 1, "the event at 0 left the window");
        counter.record(2, 0);
        counter.record(3, 0);
        assert_eq!(counter.count(1, 600), 0, "key 1 was forgotten to keep two keys");
    }
}
