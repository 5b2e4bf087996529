//! Scenario tests: given health, rules and risk → the decision.

use super::breaker::BreakerState;
use super::maintenance::MaintenanceStatus;
use super::risk::RiskResult;
use super::*;

fn facts(payment: u128, minor: i64) -> PaymentFacts {
    PaymentFacts {
        payment_id: PaymentId::from_u128(payment),
        merchant_id: MerchantId::from_u128(7),
        amount: Money::new(minor, Currency::from_code("EUR").unwrap()),
        brand: CardBrand::Visa,
        bin: "424242".into(),
        bin_country: Some("US".into()),
        card_token: CardToken([1; 16]),
    }
}

fn candidate(provider: &str, priority: u32, weight: u32) -> Candidate {
    Candidate { provider: provider.into(), priority, weight, cost_bp: 0 }
}

fn healthy(name: &str) -> ProviderView {
    ProviderView {
        name: name.into(),
        share_bp: 10_000,
        breaker: BreakerState::Closed,
        maintenance: MaintenanceStatus::None,
        health: HealthSnapshot::default(),
        available_again_ms: None,
    }
}

fn open(name: &str, again: i64) -> ProviderView {
    ProviderView {
        share_bp: 0,
        breaker: BreakerState::Open { since_ms: 0 },
        available_again_ms: Some(again),
        ..healthy(name)
    }
}

fn input(payment: u128, candidates: Vec<Candidate>, providers: Vec<ProviderView>) -> RoutingInput {
    RoutingInput {
        facts: facts(payment, 1_000),
        rule_set_version: 1,
        rule: None,
        candidates,
        providers,
        tried: Vec::new(),
        risk: Vec::new(),
        stand_in: StandInInput::default(),
        now_ms: 0,
    }
}

fn chosen(decision: &RoutingDecision) -> Option<&str> {
    match &decision.outcome {
        RoutingOutcome::Route { provider, .. } => Some(provider),
        _ => None,
    }
}

#[test]
fn priority_first() {
    let d = route(&input(1, vec![candidate("b", 2, 1), candidate("a", 1, 1)], vec![healthy("a"), healthy("b")]));
    assert_eq!(chosen(&d), Some("a"));
}

#[test]
fn weights_split_volume_deterministically() {
    let candidates = vec![candidate("a", 0, 3), candidate("b", 0, 1)];
    let providers = vec![healthy("a"), healthy("b")];
    let mut a = 0;
    for payment in 0..4_000u128 {
        let decision = route(&input(payment, candidates.clone(), providers.clone()));
        assert_eq!(
            decision,
            route(&input(payment, candidates.clone(), providers.clone())),
            "same input, same decision"
        );
        if chosen(&decision) == Some("a") {
            a += 1;
        }
    }
    assert!((2_850..=3_150).contains(&a), "a got {a} of 4000 with weight 3:1");
}

#[test]
fn failover_skips_tried_and_open_providers() {
    let mut i = input(
        1,
        vec![candidate("a", 0, 1), candidate("b", 1, 1), candidate("c", 2, 1)],
        vec![healthy("a"), open("b", 9_000), healthy("c")],
    );
    i.tried = vec!["a".into()];
    let d = route(&i);
    assert_eq!(chosen(&d), Some("c"));
    assert_eq!(
        d.outcome,
        RoutingOutcome::Route { provider: "c".into(), reason: "failover to the next candidate".into() }
    );
    let skips: Vec<_> = d.considered.iter().map(|v| v.skipped).collect();
    assert_eq!(skips, [Some(Skip::AlreadyTried), Some(Skip::BreakerOpen), None]);
}

#[test]
fn every_candidate_tried_is_exhausted() {
    let mut i = input(1, vec![candidate("a", 0, 1)], vec![healthy("a")]);
    i.tried = vec!["a".into()];
    assert_eq!(route(&i).outcome, RoutingOutcome::Exhausted);
}

#[test]
fn maintenance_means_no_traffic_and_a_retry_after() {
    let mut in_maintenance = open("a", 60_000);
    in_maintenance.breaker = BreakerState::Closed;
    in_maintenance.maintenance = MaintenanceStatus::InMaintenance { ends_ms: 60_000 };
    let mut i = input(1, vec![candidate("a", 0, 1), candidate("b", 1, 1)], vec![in_maintenance, open("b", 20_000)]);
    i.now_ms = 10_000;
    let d = route(&i);
    assert_eq!(d.outcome, RoutingOutcome::ProvidersUnavailable { retry_after_ms: 10_000 });
    assert_eq!(d.considered[0].skipped, Some(Skip::InMaintenance));
}

#[test]
fn reduced_share_admits_about_its_share_and_falls_back_when_alone() {
    let mut probing = healthy("a");
    probing.share_bp = 1_000;
    probing.breaker = BreakerState::HalfOpen { since_ms: 0, successes: 0 };
    let mut to_a = 0;
    for payment in 0..10_000u128 {
        let d = route(&input(
            payment,
            vec![candidate("a", 0, 1), candidate("b", 1, 1)],
            vec![probing.clone(), healthy("b")],
        ));
        if chosen(&d) == Some("a") {
            to_a += 1;
        }
    }
    assert!((850..=1_150).contains(&to_a), "half-open provider got {to_a} of 10000 at a 10% share");
    // Alone, a throttled provider is used rather than failing the payment.
    let alone = route(&input(3, vec![candidate("a", 0, 1)], vec![ProviderView { share_bp: 1, ..probing }]));
    assert_eq!(chosen(&alone), Some("a"));
}

#[test]
fn a_fired_risk_check_declines_naming_it() {
    let mut i = input(1, vec![candidate("a", 0, 1)], vec![healthy("a")]);
    i.risk = vec![
        RiskResult { check: "amount_limit".into(), fired: false, reason: None },
        RiskResult { check: "card_velocity".into(), fired: true, reason: Some("too many".into()) },
    ];
    assert_eq!(
        route(&i).outcome,
        RoutingOutcome::DeclineForRisk { check: "card_velocity".into(), reason: "too many".into() }
    );
}

#[test]
fn stand_in_only_within_limits_and_only_before_any_attempt() {
    let mut i = input(1, vec![candidate("a", 0, 1)], vec![open("a", 5_000)]);
    i.stand_in =
        StandInInput { enabled: true, per_payment_max_minor: 5_000, exposure_max_minor: 10_000, exposure_minor: 0 };
    assert_eq!(route(&i).outcome, RoutingOutcome::StandIn);
    i.stand_in.exposure_minor = 9_500;
    assert!(matches!(route(&i).outcome, RoutingOutcome::ProvidersUnavailable { .. }), "over total exposure");
    i.stand_in.exposure_minor = 0;
    i.facts.amount.minor = 5_001;
    assert!(matches!(route(&i).outcome, RoutingOutcome::ProvidersUnavailable { .. }), "over the per-payment limit");
    i.stand_in.enabled = false;
    i.facts.amount.minor = 10;
    assert!(matches!(route(&i).outcome, RoutingOutcome::ProvidersUnavailable { .. }), "off unless configured");
}

#[test]
fn unknown_provider_in_candidates_is_skipped() {
    let d = route(&input(1, vec![candidate("ghost", 0, 1), candidate("a", 1, 1)], vec![healthy("a")]));
    assert_eq!(chosen(&d), Some("a"));
    assert_eq!(d.considered[0].skipped, Some(Skip::NotConfigured));
}

#[test]
fn rules_match_on_merchant_currency_brand_country_and_amount() {
    let rules = RuleSet {
        version: 3,
        rules: vec![
            Rule {
                name: "big-eur-visa-us".into(),
                when: RuleMatch {
                    currencies: vec!["EUR".into()],
                    brands: vec!["visa".into()],
                    bin_countries: vec!["US".into()],
                    amount_min_minor: Some(10_000),
                    ..RuleMatch::default()
                },
                candidates: vec![candidate("b", 0, 1)],
            },
            Rule {
                name: "merchant-7".into(),
                when: RuleMatch { merchants: vec![MerchantId::from_u128(7).to_string()], ..RuleMatch::default() },
                candidates: vec![candidate("c", 0, 1)],
            },
        ],
        fallback: vec![candidate("a", 0, 1)],
    };
    rules.validate(&["a", "b", "c"]).unwrap();
    assert_eq!(rules.select(&facts(1, 20_000)).0, Some("big-eur-visa-us"));
    assert_eq!(rules.select(&facts(1, 500)).0, Some("merchant-7"));
    let mut other = facts(1, 500);
    other.merchant_id = MerchantId::from_u128(8);
    assert_eq!(rules.select(&other), (None, &rules.fallback[..]));
}

#[test]
fn invalid_rules_are_refused_with_the_rule_and_field() {
    let bad = |rule: Rule| RuleSet { version: 1, rules: vec![rule], fallback: vec![candidate("a", 0, 1)] };
    let rule =
        |when: RuleMatch, provider: &str| Rule { name: "r".into(), when, candidates: vec![candidate(provider, 0, 1)] };
    let err = bad(rule(RuleMatch::default(), "zzz")).validate(&["a"]).unwrap_err();
    assert!(err.contains("\"r\"") && err.contains("zzz"), "{err}");
    let err = bad(rule(RuleMatch { currencies: vec!["EURO".into()], ..RuleMatch::default() }, "a")).validate(&["a"]);
    assert!(err.unwrap_err().contains("ISO 4217"));
    let err = bad(rule(RuleMatch { brands: vec!["vissa".into()], ..RuleMatch::default() }, "a")).validate(&["a"]);
    assert!(err.unwrap_err().contains("brand"));
    let band = RuleMatch { amount_min_minor: Some(5), amount_max_minor: Some(1), ..RuleMatch::default() };
    assert!(bad(rule(band, "a")).validate(&["a"]).unwrap_err().contains("amount_min_minor"));
    let empty = RuleSet { version: 1, rules: vec![], fallback: vec![] };
    assert!(empty.validate(&["a"]).unwrap_err().contains("fallback"));
}

#[test]
fn bin_table_longest_prefix() {
    let table = BinTable { prefixes: [("4".into(), "GB".into()), ("424242".into(), "US".into())].into() };
    assert_eq!(table.country("424242"), Some("US"));
    assert_eq!(table.country("411111"), Some("GB"));
    assert_eq!(table.country("511111"), None);
}

#[test]
fn a_recorded_decision_replays_from_its_input() {
    let i = input(42, vec![candidate("a", 0, 2), candidate("b", 0, 1)], vec![healthy("a"), open("b", 1)]);
    let decision = route(&i);
    let recorded = serde_json::to_string(&(&i, &decision)).unwrap();
    let (replayed_input, recorded_decision): (RoutingInput, RoutingDecision) = serde_json::from_str(&recorded).unwrap();
    assert_eq!(route(&replayed_input), recorded_decision);
}
