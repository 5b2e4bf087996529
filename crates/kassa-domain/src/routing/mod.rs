//! The routing policy: which provider gets an authorization attempt.
//!
//! [`route`] is a pure function of a [`RoutingInput`]: the payment's facts,
//! the candidates the rule set gave, every provider's live view (traffic
//! share, breaker, maintenance, health), the providers already tried, the
//! risk verdicts and the stand-in limits. The service records the input and
//! the outcome as one event, so an auditor can run `route` on the recorded
//! input and must get the recorded outcome.
//!
//! Order of candidates: by `priority` (lower first); among equal priorities,
//! a weighted draw seeded by the payment id splits volume by `weight`, and
//! the rest follow by `cost_bp`, then name. A candidate whose share is below
//! 100% (breaker half-open or ramping, maintenance draining or ramping) is
//! admitted for a payment when a hash of the payment id and the provider
//! falls under its share; a candidate with no share (breaker open, in
//! maintenance) is never used. If only throttled candidates are left, the
//! first of them is used rather than failing the payment.

pub mod breaker;
pub mod decline;
pub mod health;
pub mod maintenance;
pub mod risk;

use crate::card::{CardBrand, CardToken};
use crate::currency::Currency;
use crate::id::{MerchantId, PaymentId};
use crate::money::Money;
use breaker::BreakerState;
use health::HealthSnapshot;
use maintenance::MaintenanceStatus;
use risk::RiskResult;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What routing and risk know about a payment. No card number: the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFacts {
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    pub brand: CardBrand,
    pub bin: String,
    pub bin_country: Option<String>,
    pub card_token: CardToken,
}

/// Issuing country by BIN prefix (longest prefix wins).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinTable {
    pub prefixes: BTreeMap<String, String>,
}

impl BinTable {
    pub fn country(&self, bin: &str) -> Option<&str> {
        (1..=bin.len()).rev().find_map(|n| self.prefixes.get(&bin[..n]).map(String::as_str))
    }
}

/// One provider a rule offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub provider: String,
    /// Lower is tried first.
    #[serde(default)]
    pub priority: u32,
    /// Share of volume among candidates of equal priority.
    #[serde(default = "one")]
    pub weight: u32,
    /// What the provider costs, in basis points of the amount.
    #[serde(default)]
    pub cost_bp: u32,
}

fn one() -> u32 {
    1
}

/// Which payments a rule applies to. An empty list matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleMatch {
    /// Merchant ids (`mer_…`).
    pub merchants: Vec<String>,
    /// ISO 4217 codes.
    pub currencies: Vec<String>,
    /// Card brands (`visa`, `mastercard`, …).
    pub brands: Vec<String>,
    /// Issuing countries (ISO 3166 alpha-2).
    pub bin_countries: Vec<String>,
    /// Amount band in minor units, inclusive.
    pub amount_min_minor: Option<i64>,
    pub amount_max_minor: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub when: RuleMatch,
    pub candidates: Vec<Candidate>,
}

/// A versioned rule set: the first rule that matches gives the candidates;
/// when none does, `fallback` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleSet {
    pub version: u64,
    pub rules: Vec<Rule>,
    pub fallback: Vec<Candidate>,
}

impl RuleMatch {
    fn matches(&self, facts: &PaymentFacts) -> bool {
        let any_or = |list: &[String], value: &str| list.is_empty() || list.iter().any(|v| v == value);
        any_or(&self.merchants, &facts.merchant_id.to_string())
            && any_or(&self.currencies, facts.amount.currency.code())
            && any_or(&self.brands, facts.brand.as_str())
            && (self.bin_countries.is_empty()
                || facts.bin_country.as_deref().is_some_and(|c| self.bin_countries.iter().any(|v| v == c)))
            && self.amount_min_minor.is_none_or(|min| facts.amount.minor >= min)
            && self.amount_max_minor.is_none_or(|max| facts.amount.minor <= max)
    }
}

impl RuleSet {
    /// Check every rule against the providers that exist. The error names the rule and field.
    pub fn validate(&self, providers: &[&str]) -> Result<(), String> {
        let check_candidates = |at: &str, candidates: &[Candidate]| -> Result<(), String> {
            if candidates.is_empty() {
                return Err(format!("{at}: needs at least one candidate"));
            }
            for c in candidates {
                if !providers.contains(&c.provider.as_str()) {
                    return Err(format!("{at}: unknown provider {:?} (known: {})", c.provider, providers.join(", ")));
                }
                if c.weight == 0 {
                    return Err(format!("{at}: provider {:?} has weight 0; remove it instead", c.provider));
                }
            }
            Ok(())
        };
        check_candidates("routing.fallback", &self.fallback)?;
        for rule in &self.rules {
            let at = format!("routing rule {:?}", rule.name);
            check_candidates(&at, &rule.candidates)?;
            for code in &rule.when.currencies {
                Currency::from_code(code).map_err(|_| format!("{at}: {code:?} is not an ISO 4217 code"))?;
            }
            for brand in &rule.when.brands {
                if CardBrand::from_name(brand).is_none() {
                    return Err(format!("{at}: unknown card brand {brand:?}"));
                }
            }
            for merchant in &rule.when.merchants {
                if merchant.parse::<MerchantId>().is_err() {
                    return Err(format!("{at}: {merchant:?} is not a merchant id (mer_…)"));
                }
            }
            if let (Some(min), Some(max)) = (rule.when.amount_min_minor, rule.when.amount_max_minor)
                && min > max
            {
                return Err(format!("{at}: amount_min_minor {min} is above amount_max_minor {max}"));
            }
        }
        Ok(())
    }

    /// The rule that applies (its name, or `None` for the fallback) and its candidates.
    pub fn select(&self, facts: &PaymentFacts) -> (Option<&str>, &[Candidate]) {
        match self.rules.iter().find(|rule| rule.when.matches(facts)) {
            Some(rule) => (Some(rule.name.as_str()), &rule.candidates),
            None => (None, &self.fallback),
        }
    }
}

/// A provider as routing sees it at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderView {
    pub name: String,
    /// Share of traffic offered, basis points: the smaller of breaker and maintenance shares.
    pub share_bp: u32,
    pub breaker: BreakerState,
    pub maintenance: MaintenanceStatus,
    pub health: HealthSnapshot,
    /// When the provider will next take traffic, if it takes none now.
    pub available_again_ms: Option<i64>,
}

/// A merchant's stand-in limits and its exposure now (minor units of the payment's currency).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandInInput {
    pub enabled: bool,
    pub per_payment_max_minor: i64,
    pub exposure_max_minor: i64,
    pub exposure_minor: i64,
}

/// Everything a decision depends on. Recorded with the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingInput {
    pub facts: PaymentFacts,
    pub rule_set_version: u64,
    pub rule: Option<String>,
    pub candidates: Vec<Candidate>,
    pub providers: Vec<ProviderView>,
    /// Providers already tried for this payment, in order.
    pub tried: Vec<String>,
    /// Verdicts of the risk checks (run before the first attempt only).
    pub risk: Vec<RiskResult>,
    pub stand_in: StandInInput,
    pub now_ms: i64,
}

/// Why a candidate was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    AlreadyTried,
    BreakerOpen,
    InMaintenance,
    /// Not admitted by its reduced share (half-open, ramping, draining).
    Throttled,
    NotConfigured,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateVerdict {
    pub provider: String,
    pub skipped: Option<Skip>,
}

/// What to do with the payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RoutingOutcome {
    Route {
        provider: String,
        reason: String,
    },
    /// A risk check fired: decline, naming it.
    DeclineForRisk {
        check: String,
        reason: String,
    },
    /// No provider can take it now, and stand-in does not apply.
    ProvidersUnavailable {
        retry_after_ms: i64,
    },
    /// Every candidate was tried.
    Exhausted,
    /// Answer `authorized` on Kassa's own authority; forward when a provider recovers.
    StandIn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingDecision {
    pub outcome: RoutingOutcome,
    /// Each candidate in the order considered, with why it was passed over.
    pub considered: Vec<CandidateVerdict>,
}

/// A stable 64-bit mix (splitmix64 finalizer). Part of the replay contract: never change it.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn payment_seed(payment_id: PaymentId, salt: u64) -> u64 {
    let id = payment_id.as_u128();
    mix((id as u64) ^ mix((id >> 64) as u64 ^ salt))
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across builds and platforms.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The candidates in the order they are tried for this payment.
pub fn order_candidates(payment_id: PaymentId, candidates: &[Candidate]) -> Vec<Candidate> {
    let mut by_priority: BTreeMap<u32, Vec<Candidate>> = BTreeMap::new();
    for c in candidates {
        by_priority.entry(c.priority).or_default().push(c.clone());
    }
    let mut ordered = Vec::with_capacity(candidates.len());
    for (priority, mut group) in by_priority {
        group.sort_by(|a, b| a.cost_bp.cmp(&b.cost_bp).then_with(|| a.provider.cmp(&b.provider)));
        let mut round = 0u64;
        while !group.is_empty() {
            // Weighted draw without replacement, seeded by the payment.
            let total: u64 = group.iter().map(|c| u64::from(c.weight)).sum();
            let mut ticket = payment_seed(payment_id, u64::from(priority) << 32 | round) % total.max(1);
            let at = group
                .iter()
                .position(|c| {
                    let w = u64::from(c.weight);
                    if ticket < w {
                        true
                    } else {
                        ticket -= w;
                        false
                    }
                })
                .unwrap_or(0);
            ordered.push(group.remove(at));
            round += 1;
        }
    }
    ordered
}

/// Whether a provider with a reduced share takes this payment.
fn admitted(payment_id: PaymentId, provider: &str, share_bp: u32) -> bool {
    share_bp >= 10_000 || payment_seed(payment_id, name_hash(provider)) % 10_000 < u64::from(share_bp)
}

/// Decide. Pure: the same input always gives the same decision.
pub fn route(input: &RoutingInput) -> RoutingDecision {
    if let Some(fired) = input.risk.iter().find(|r| r.fired) {
        return RoutingDecision {
            outcome: RoutingOutcome::DeclineForRisk {
                check: fired.check.clone(),
                reason: fired.reason.clone().unwrap_or_default(),
            },
            considered: Vec::new(),
        };
    }
    let mut considered = Vec::new();
    let mut throttled: Option<String> = None;
    let mut chosen: Option<String> = None;
    let mut available_again: Option<i64> = None;
    let mut untried = 0usize;
    for candidate in order_candidates(input.facts.payment_id, &input.candidates) {
        let name = candidate.provider;
        let skip = if input.tried.contains(&name) {
            Some(Skip::AlreadyTried)
        } else if let Some(view) = input.providers.iter().find(|p| p.name == name) {
            untried += 1;
            if view.share_bp == 0 {
                if let Some(at) = view.available_again_ms {
                    available_again = Some(available_again.map_or(at, |a: i64| a.min(at)));
                }
                Some(if matches!(view.maintenance, MaintenanceStatus::InMaintenance { .. }) {
                    Skip::InMaintenance
                } else {
                    Skip::BreakerOpen
                })
            } else if chosen.is_none() && admitted(input.facts.payment_id, &name, view.share_bp) {
                None
            } else {
                if throttled.is_none() && chosen.is_none() {
                    throttled = Some(name.clone());
                }
                Some(Skip::Throttled)
            }
        } else {
            Some(Skip::NotConfigured)
        };
        if skip.is_none() && chosen.is_none() {
            chosen = Some(name.clone());
        }
        considered.push(CandidateVerdict { provider: name, skipped: skip });
    }
    let outcome = if let Some(provider) = chosen {
        let reason = if input.tried.is_empty() { "first eligible candidate" } else { "failover to the next candidate" };
        RoutingOutcome::Route { provider, reason: reason.to_owned() }
    } else if let Some(provider) = throttled {
        // Only throttled candidates are left: better a recovering provider than none.
        if let Some(v) = considered.iter_mut().find(|v| v.provider == provider) {
            v.skipped = None;
        }
        RoutingOutcome::Route { provider, reason: "only throttled candidates left".to_owned() }
    } else if untried == 0 && !input.tried.is_empty() {
        RoutingOutcome::Exhausted
    } else {
        let s = input.stand_in;
        if input.tried.is_empty()
            && s.enabled
            && input.facts.amount.minor <= s.per_payment_max_minor
            && s.exposure_minor.saturating_add(input.facts.amount.minor) <= s.exposure_max_minor
        {
            RoutingOutcome::StandIn
        } else {
            let retry_after_ms = available_again.map_or(5_000, |at| (at - input.now_ms).clamp(1_000, 300_000));
            RoutingOutcome::ProvidersUnavailable { retry_after_ms }
        }
    };
    RoutingDecision { outcome, considered }
}

#[cfg(test)]
mod tests;
