//! The same kind of seeded fault schedule as `deterministic_simulation.rs`,
//! but against the whole authorization service: its RocksDB event log, the
//! embedded bus, provider calls as tokio tasks in real time. It checks the
//! same invariants on what the service published to `payments.events`:
//!
//! - every payment ends in exactly one outcome (one `authorized` or one `declined`);
//! - at most one standing authorization per payment across every provider's
//!   ledger — exactly one, at the provider Kassa names, for an authorized payment;
//! - money is conserved: what providers captured is what Kassa captured;
//! - a hard decline is never retried, and only a retryable decline sends a
//!   payment to another provider.
//!
//! The interleaving here depends on threads and the wall clock, so a failing
//! seed (`KASSA_SIM_SEED=N`) reruns the same payments and fault schedule but
//! not the same interleaving. The decisions themselves are replayed bit for
//! bit by the deterministic simulation, which drives this service's own pure
//! core ([`kassa_services::authorization::Process`]) on a virtual clock.

mod common;

use common::{Rng, fault_for};

use kassa_bus::{Bus, BusConfig, EmbeddedBus, TopicSpec};
use kassa_codec::{EventPayload, decode_frame};
use kassa_domain::routing::breaker::BreakerConfig;
use kassa_domain::routing::decline::{RetryAdvice, classify_decline};
use kassa_domain::routing::maintenance::MaintenanceWindow;
use kassa_domain::*;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::{Connector, SimulatedAcquirer, SimulatorConfig};
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::messages::{COMMAND_REJECTED, PaymentCommandMessage};
use kassa_services::routing::{RoutingEngine, RoutingSettings};
use kassa_services::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH};
use kassa_services::vault::CardVault;
use kassa_services::{Clock, SystemClock};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROVIDERS: [&str; 3] = ["acq-alpha", "acq-beta", "acq-gamma"];
const PAYMENTS: usize = 1500;
const WAVE: usize = 100;

fn card_for(rng: &mut Rng) -> &'static str {
    match rng.below(100) {
        0..=4 => "4000000000000002",   // hard decline
        5..=9 => "4000000000009995",   // insufficient funds
        10..=11 => "4000000000000119", // processing error at every provider
        12..=40 => "5555555555554444",
        _ => "4242424242424242",
    }
}

async fn simulate(seed: u64) -> Result<(), String> {
    let mut rng = Rng::seeded(seed);
    let dir = tempfile::tempdir().unwrap();
    let topics = vec![
        TopicSpec::new(PAYMENT_COMMANDS, 4),
        TopicSpec::new(PAYMENT_EVENTS, 4),
        TopicSpec::new(PROVIDER_HEALTH, 1),
    ];
    let bus = Arc::new(EmbeddedBus::open(dir.path().join("bus"), BusConfig::new(topics)).unwrap());
    let log = Arc::new(EventLog::open(dir.path().join("authorization"), LogConfig::default()).unwrap());
    let sims: Vec<Arc<SimulatedAcquirer>> = PROVIDERS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let config = SimulatorConfig { latency_ms_min: 1, latency_ms_max: 8, seed: seed + i as u64 };
            Arc::new(SimulatedAcquirer::new(*name, config))
        })
        .collect();
    let names: Vec<String> = PROVIDERS.map(String::from).to_vec();
    let settings = RoutingSettings {
        breaker: BreakerConfig { min_calls: 10, open_ms: 300, ramp_ms: 1_000, window_ms: 2_000, ..Default::default() },
        ..RoutingSettings::default()
    };
    let routing = Arc::new(RoutingEngine::new(settings, &names).unwrap());
    let vault = Arc::new(CardVault::new(100_000));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let service = Arc::new(
        AuthorizationService::new(
            log,
            bus.clone(),
            sims.iter().map(|s| Arc::clone(s) as Arc<dyn Connector>).collect(),
            Arc::clone(&vault),
            Arc::clone(&clock),
            AuthorizationConfig {
                provider_timeout_ms: 150,
                retry_backoff_ms: 20,
                inquiries_max: 3,
                ..Default::default()
            },
        )
        .with_routing(Arc::clone(&routing)),
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let tasks = service.spawn(stop_rx).unwrap();

    let mut payments: Vec<(PaymentId, &'static str, i64)> = Vec::new();
    for n in 0..PAYMENTS {
        if n % WAVE == 0 {
            // The schedule: a new fault (or none) on one provider, sometimes a maintenance window.
            let provider = rng.below(3) as usize;
            sims[provider].set_fault(fault_for(&mut rng));
            if rng.below(5) == 0 {
                let now = clock.now().unix_ms();
                let window = MaintenanceWindow { start_ms: now, end_ms: now + 300, reason: "simulated".into() };
                routing.add_maintenance(PROVIDERS[rng.below(3) as usize], window, clock.now()).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let number = card_for(&mut rng);
        let amount = 100 + rng.below(100_000) as i64;
        let payment_id = PaymentId::from_parts(1_795_651_200_000, u128::from(seed << 32 | n as u64));
        let card = CardDetails::parse(number, 12, 2030, "123", Timestamp(1_795_651_200_000)).unwrap();
        let summary = card.summarize(b"sim");
        vault.put(payment_id, card).unwrap();
        let message = PaymentCommandMessage::Requested(PaymentRequested {
            payment_id,
            merchant_id: MerchantId::from_u128(1 + rng.below(5) as u128),
            amount: Money::new(amount, Currency::from_code("EUR").unwrap()),
            card: summary,
            capture: true,
            reference: None,
            metadata: BTreeMap::new(),
            requested_at: Timestamp(1_795_651_200_000),
        });
        common::send_command(bus.as_ref(), payment_id.as_u128() ^ 0xC0FFEE, message).await;
        payments.push((payment_id, number, amount));
        if n % WAVE == WAVE - 1 {
            // The wave meets the faults scheduled for it, however fast this machine
            // is: the next wave's faults wait until this wave's payments are decided.
            wait_for_outcomes(&bus, &payments[n + 1 - WAVE..]).await;
        }
    }
    for sim in &sims {
        sim.set_fault(None);
    }

    // Wait for every payment to reach an outcome and every owed call to land.
    let started = Instant::now();
    let published = loop {
        let published = published(&bus).await;
        let states = &published.states;
        let open = payments
            .iter()
            .filter(|(id, _, _)| {
                states.get(id).is_none_or(|s| matches!(s.stage, Stage::New | Stage::Requested | Stage::Authorizing))
            })
            .count();
        let captured_at_providers: i64 = sims.iter().flat_map(|s| s.ledger()).map(|e| e.captured_minor).sum();
        let captured_by_kassa: i64 = states.values().map(|s| s.captured_minor).sum();
        if open == 0 && captured_at_providers == captured_by_kassa {
            break published;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let stuck: Vec<String> = payments
                .iter()
                .filter(|(id, _, _)| {
                    states.get(id).is_none_or(|s| matches!(s.stage, Stage::New | Stage::Requested | Stage::Authorizing))
                })
                .take(3)
                .map(|(id, number, _)| format!("{id} ({number}): {:?}", published.streams.get(id)))
                .collect();
            return Err(format!(
                "{open} payments without an outcome, or captures still owed ({captured_at_providers} at providers, \
                 {captured_by_kassa} by Kassa) after 90 s; some: {stuck:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }

    let (states, streams) = (&published.states, &published.streams);
    let standing = common::standing(sims.iter().map(|sim| sim.as_ref()));
    let mut outcomes = [0usize; 2];
    for (id, number, amount) in &payments {
        let state = &states[id];
        let events = &streams[id];
        let types: Vec<&str> = events.iter().map(String::as_str).collect();
        let holds = standing.get(id).map(Vec::as_slice).unwrap_or_default();
        let captured = common::check_payment(*id, number, *amount, state, &types, holds)?;
        outcomes[if captured { 0 } else { 1 }] += 1;
    }
    for (id, codes) in &published.retried_codes {
        for code in codes {
            if classify_decline(code, None).advice != RetryAdvice::RetryElsewhere {
                return Err(format!("payment {id} was retried elsewhere after a {code} decline"));
            }
        }
    }
    let mut declines: BTreeMap<&str, usize> = BTreeMap::new();
    for state in states.values() {
        if let Some(code) = &state.decline_code {
            *declines.entry(code.as_str()).or_default() += 1;
        }
    }
    eprintln!("seed {seed}: {} authorized, {} declined of {PAYMENTS}: {declines:?}", outcomes[0], outcomes[1]);
    // In real time, how many find a provider depends on the machine's load (a slow
    // call trips a breaker): about 1,000 of 1,500 on an idle machine, 739 seen
    // while a build ran. The exact invariants are in deterministic_simulation.rs;
    // this bound only catches routing that gives up.
    if outcomes[0] < PAYMENTS / 3 {
        return Err(format!(
            "only {} of {PAYMENTS} authorized (declines: {declines:?}): routing around faults is not working",
            outcomes[0]
        ));
    }
    Ok(())
}

/// Wait until `payments` have outcomes on `payments.events`, or stop getting
/// them (some wait for a provider to recover: a stand-in, an unclear
/// timeout), for at most 5 s.
async fn wait_for_outcomes(bus: &EmbeddedBus, payments: &[(PaymentId, &str, i64)]) {
    let started = Instant::now();
    let (mut open_before, mut progressed) = (usize::MAX, Instant::now());
    loop {
        let states = published(bus).await.states;
        let open = payments
            .iter()
            .filter(|(id, _, _)| {
                states.get(id).is_none_or(|s| matches!(s.stage, Stage::New | Stage::Requested | Stage::Authorizing))
            })
            .count();
        if open < open_before {
            (open_before, progressed) = (open, Instant::now());
        }
        if open == 0 || progressed.elapsed() > Duration::from_millis(300) || started.elapsed() > Duration::from_secs(5)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `payments.events` says: every payment's state and event types, and
/// the codes of the declines that sent a payment on to another provider.
#[derive(Default)]
struct Published {
    states: HashMap<PaymentId, PaymentState>,
    streams: HashMap<PaymentId, Vec<String>>,
    retried_codes: HashMap<PaymentId, Vec<String>>,
}

async fn published(bus: &EmbeddedBus) -> Published {
    let mut out = Published::default();
    let mut seen = std::collections::HashSet::new();
    for partition in 0..4 {
        let mut offset = 0;
        loop {
            let batch = bus.fetch(PAYMENT_EVENTS, partition, offset, 5000, Duration::ZERO).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for message in batch {
                offset = message.offset + 1;
                let envelope = decode_frame(&message.payload).unwrap();
                if envelope.event_type == COMMAND_REJECTED || !seen.insert(envelope.event_id) {
                    continue;
                }
                let id = PaymentId::from_u128(envelope.stream_id);
                let event = PaymentEvent::decode_payload(&envelope.event_type, &envelope.payload).unwrap();
                apply(out.states.entry(id).or_default(), &event);
                if let PaymentEvent::AttemptDeclined { code, .. } = &event {
                    out.retried_codes.entry(id).or_default().push(code.clone());
                }
                out.streams.entry(id).or_default().push(envelope.event_type);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_under_random_faults_on_every_seed() {
    let seeds: Vec<u64> = match std::env::var("KASSA_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("KASSA_SIM_SEED is a number")],
        Err(_) => vec![1],
    };
    for seed in seeds {
        if let Err(broken) = simulate(seed).await {
            panic!(
                "seed {seed} broke an invariant: {broken}\nreplay: KASSA_SIM_SEED={seed} cargo test --test routing_simulation"
            );
        }
    }
}
