//! Routing + risk decision time in process: the engine's `decide` (risk checks
//! with velocity counters, rule selection, provider views with breakers and
//! maintenance, the pure `route`) for three providers and a realistic rule set.
//! Criterion gives the mean; the percentile pass after it prints p50/p99/p99.9
//! of single decisions. `cargo bench -p kassa-benches --bench routing`
#![allow(clippy::float_arithmetic)] // reporting only

use criterion::{Criterion, black_box};
use kassa_domain::routing::health::OutcomeClass;
use kassa_domain::routing::risk::{RiskConfig, VelocityLimit};
use kassa_domain::routing::{Candidate, PaymentFacts, Rule, RuleMatch, RuleSet};
use kassa_domain::{CardBrand, CardToken, Currency, MerchantId, Money, PaymentId, Timestamp};
use kassa_services::routing::{RoutingEngine, RoutingSettings};
use std::time::Instant;

fn engine() -> RoutingEngine {
    let candidate = |provider: &str, priority: u32, weight: u32| Candidate {
        provider: provider.into(),
        priority,
        weight,
        cost_bp: 0,
    };
    let rules = RuleSet {
        version: 1,
        rules: vec![
            Rule {
                name: "big-usd".into(),
                when: RuleMatch {
                    currencies: vec!["USD".into()],
                    amount_min_minor: Some(100_000),
                    ..RuleMatch::default()
                },
                candidates: vec![candidate("acq-gamma", 0, 1), candidate("acq-alpha", 1, 1)],
            },
            Rule {
                name: "eur-visa-split".into(),
                when: RuleMatch { currencies: vec!["EUR".into()], brands: vec!["visa".into()], ..RuleMatch::default() },
                candidates: vec![
                    candidate("acq-alpha", 0, 3),
                    candidate("acq-beta", 0, 1),
                    candidate("acq-gamma", 1, 1),
                ],
            },
        ],
        fallback: vec![candidate("acq-alpha", 0, 1), candidate("acq-beta", 1, 1), candidate("acq-gamma", 2, 1)],
    };
    let settings = RoutingSettings {
        rules,
        risk: RiskConfig {
            amount_max_minor: [("EUR".to_owned(), 10_000_000)].into(),
            blocked_bin_countries: vec!["KP".into()],
            card_velocity: Some(VelocityLimit { max: 1_000_000, window_ms: 60_000 }),
            merchant_velocity: Some(VelocityLimit { max: 100_000_000, window_ms: 1_000 }),
            ..RiskConfig::default()
        },
        bin_countries: [("424242".to_owned(), "US".to_owned())].into(),
        ..RoutingSettings::default()
    };
    let names: Vec<String> = ["acq-alpha", "acq-beta", "acq-gamma"].map(String::from).to_vec();
    let engine = RoutingEngine::new(settings, &names).expect("valid settings");
    // Some health history, so windows and percentiles have work to do.
    for i in 0..3_000i64 {
        let class = if i % 50 == 0 { OutcomeClass::Error } else { OutcomeClass::Approved };
        engine.record_call(&names[(i % 3) as usize], class, 20 + (i % 40) as u32, Timestamp(1_795_651_200_000 + i));
    }
    engine
}

fn facts(i: u64) -> PaymentFacts {
    PaymentFacts {
        payment_id: PaymentId::from_u128(u128::from(i) * 7919),
        merchant_id: MerchantId::from_u128(u128::from(i % 50)),
        amount: Money::new(1_000 + (i % 5_000) as i64, Currency::from_code("EUR").unwrap()),
        brand: CardBrand::Visa,
        bin: "424242".into(),
        bin_country: Some("US".into()),
        card_token: CardToken((u128::from(i % 10_000)).to_be_bytes()),
    }
}

fn main() {
    let engine = engine();
    let now = Timestamp(1_795_651_203_000);
    let mut criterion = Criterion::default().configure_from_args();
    let mut i = 0u64;
    criterion.bench_function("routing decide (risk + rules + 3 providers)", |b| {
        b.iter(|| {
            i += 1;
            black_box(engine.decide(facts(i), Vec::new(), false, now))
        })
    });
    criterion.bench_function("routing decide, failover (one provider tried)", |b| {
        b.iter(|| {
            i += 1;
            black_box(engine.decide(facts(i), vec!["acq-alpha".into()], false, now))
        })
    });
    criterion.final_summary();

    // Percentiles of single decisions (each timed on its own).
    let mut samples: Vec<u64> = (0..200_000u64)
        .map(|n| {
            let facts = facts(1_000_000 + n);
            let started = Instant::now();
            black_box(engine.decide(facts, Vec::new(), false, now));
            started.elapsed().as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    let at = |per_mille: usize| samples[(samples.len() * per_mille / 1000).min(samples.len() - 1)];
    println!(
        "routing decide, single decisions: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs (target p99 < 50 µs)",
        at(500) as f64 / 1000.0,
        at(990) as f64 / 1000.0,
        at(999) as f64 / 1000.0
    );
}
