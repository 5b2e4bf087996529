//! `kassa bench`: the pipeline benchmark. Drives payments through all four
//! stages in one process — ingest and authorization (each call waits for its
//! outcome), then settlement batching and reconciliation — over durable logs,
//! the embedded bus (or a Kafka cluster with `--bus kafka`) and simulated
//! acquirers, and reports payments/s, latency percentiles and, over Kafka,
//! the consumer lag.

use crate::kafka_cmd::{BusKind, KafkaArgs};
use anyhow::Context;
use clap::Args;
use kassa_bus::{Bus, BusConfig, EmbeddedBus, KafkaBus};
use kassa_domain::PaymentId;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::{Connector, Fault, FaultMode, SimulatedAcquirer, SimulatorConfig};
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::ingest::{IngestConfig, IngestService};
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationService};
use kassa_services::seal::{CARD_KEY_BYTES, CardSeal};
use kassa_services::settlement::{SettlementConfig, SettlementService};
use kassa_services::vault::CardVault;
use kassa_services::{Clock, SystemClock};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Payments to drive through the pipeline.
    #[arg(long, default_value_t = 20_000)]
    pub payments: u64,
    /// Payments in flight at once (concurrent API calls).
    #[arg(long, default_value_t = 2048)]
    pub concurrency: u64,
    /// Simulated acquirer latency, lower bound (ms).
    #[arg(long, default_value_t = 15)]
    pub latency_ms_min: u64,
    /// Simulated acquirer latency, upper bound (ms).
    #[arg(long, default_value_t = 60)]
    pub latency_ms_max: u64,
    /// Where the logs go (a fresh temporary directory by default: put it on the disk you want to measure).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Take this simulated acquirer down for the whole run (failover cost: compare with none).
    #[arg(long)]
    pub down: Option<String>,
    /// The bus: `embedded`, or `kafka` (`--brokers`; the topics must exist and be empty:
    /// scripts/bench-kafka.sh starts a fresh tansu broker for the run).
    #[arg(long, value_enum, default_value_t = BusKind::Embedded)]
    pub bus: BusKind,
    /// Also print what RocksDB wrote per payment in each store (keys, WAL syncs, WAL bytes).
    /// Counting costs a little on every write: leave it off for the throughput figure.
    #[arg(long)]
    pub write_counts: bool,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// CPU time this process has used so far (user + system), from
/// `/proc/self/stat`; `None` where that is not readable (not Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    // Clock ticks are 1/100 s in Linux's ABI (USER_HZ).
    Some(Duration::from_millis((ticks(14)? + ticks(15)?) * 10))
}

fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * per_mille) / 1000]
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(down) = &args.down {
        anyhow::ensure!(
            crate::up::PROVIDERS.contains(&down.as_str()),
            "--down {down:?}: not one of {}",
            crate::up::PROVIDERS.join(", ")
        );
    }
    let kafka = match args.bus {
        BusKind::Kafka => Some(args.kafka.config(&crate::config::Config::default(), crate::up::topics())?),
        BusKind::Embedded => None,
    };
    let temp = tempfile::tempdir()?;
    let dir = args.data_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        // Each log as `kassa up` opens it.
        let open = |service: &str| -> anyhow::Result<Arc<EventLog>> {
            let config = LogConfig { statistics: args.write_counts, ..crate::wiring::log_config(service) };
            Ok(Arc::new(EventLog::open(dir.join(service), config)?))
        };
        let ingest_log = open("ingest")?;
        let authorization_log = open("authorization")?;
        let settlement_log = open("settlement")?;
        let reconciliation_log = open("reconciliation")?;
        let mut embedded = None;
        let (bus, kafka_bus): (Arc<dyn Bus>, Option<Arc<KafkaBus>>) = match kafka {
            Some(config) => {
                let bus = Arc::new(tokio::task::spawn_blocking(move || KafkaBus::open(config)).await??);
                (Arc::clone(&bus) as Arc<dyn Bus>, Some(bus))
            }
            None => {
                let config = BusConfig { statistics: args.write_counts, ..BusConfig::new(crate::up::topics()) };
                let bus = Arc::new(EmbeddedBus::open(dir.join("bus"), config)?);
                embedded = Some(Arc::clone(&bus));
                (bus as Arc<dyn Bus>, None)
            }
        };
        let bus_name = if kafka_bus.is_some() { "Kafka bus" } else { "embedded bus" };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let vault = Arc::new(CardVault::new(crate::up::CARDS_WAITING_MAX));
        let providers: Vec<Arc<dyn Connector>> = crate::up::PROVIDERS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let config =
                    SimulatorConfig { latency_ms_min: args.latency_ms_min, latency_ms_max: args.latency_ms_max, seed: i as u64 + 1 };
                let sim = SimulatedAcquirer::new(*name, config);
                if args.down.as_deref() == Some(*name) {
                    sim.set_fault(Some(Fault::always(FaultMode::Down)));
                }
                Arc::new(sim) as Arc<dyn Connector>
            })
            .collect();
        // Wait for each outcome (no 202 cut-off), so latency is time to the final answer.
        let config = IngestConfig { outcome_wait_ms: 60_000, ..IngestConfig::default() };
        // Cards are sealed for authorization as in `kassa up`.
        let seal = Arc::new(CardSeal::new(&rand::random::<[u8; CARD_KEY_BYTES]>())?);
        let ingest = Arc::new(
            IngestService::new(Arc::clone(&ingest_log), Arc::clone(&bus), Arc::clone(&vault), Arc::clone(&clock), config)
                .with_card_seal(Arc::clone(&seal)),
        );
        let authorization = Arc::new(AuthorizationService::new(
            Arc::clone(&authorization_log),
            Arc::clone(&bus),
            providers.clone(),
            vault,
            clock,
            AuthorizationConfig::default(),
        )
        .with_card_seal(seal));
        let settlement = Arc::new(SettlementService::new(
            Arc::clone(&settlement_log),
            Arc::clone(&bus),
            Arc::new(SystemClock),
            SettlementConfig { cutoff_interval_ms: 0, ..SettlementConfig::default() },
        ));
        let reconciliation = Arc::new(ReconciliationService::new(
            Arc::clone(&reconciliation_log),
            Arc::clone(&bus),
            providers,
            Arc::new(SystemClock),
            // The last captures may still be on their way to the acquirer (15-60 ms) when their batch
            // closes: its report is asked for again every 10 ms (for up to half a second) while lines
            // are missing, as a reconciler would every second or so for a day's batch.
            ReconciliationConfig { retry_delay_ms: 10, report_attempts_max: 50, ..ReconciliationConfig::default() },
        ));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = ingest.spawn(stop_rx.clone())?;
        tasks.extend(authorization.spawn(stop_rx.clone())?);
        tasks.extend(settlement.spawn(stop_rx.clone())?);
        tasks.extend(reconciliation.spawn(stop_rx)?);
        let (merchant, _) = ingest.create_merchant("bench").await.map_err(|e| anyhow::anyhow!("{e}"))?;

        println!(
            "pipeline benchmark: {} payments, {} in flight, acquirer latency {}-{} ms, durable logs (fsync), {bus_name}, {} partitions",
            args.payments, args.concurrency, args.latency_ms_min, args.latency_ms_max, crate::up::PARTITIONS
        );
        let started = Instant::now();
        let cpu_at_start = process_cpu();
        // Over Kafka: sample how far authorization's input lags behind what ingest published.
        let max_lag = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lag_sampler = kafka_bus.clone().map(|bus| {
            let (authorization, max_lag) = (Arc::clone(&authorization), Arc::clone(&max_lag));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let (bus, authorization) = (Arc::clone(&bus), Arc::clone(&authorization));
                    let lag = tokio::task::spawn_blocking(move || authorization.input_lag(bus.as_ref())).await;
                    if let Ok(Ok(lag)) = lag {
                        max_lag.fetch_max(lag, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        });
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let (ingest, next) = (Arc::clone(&ingest), Arc::clone(&next));
                let total = args.payments;
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut outcomes = [0u64; 3];
                    let mut captured_minor = 0i64;
                    let mut captured_ids = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= total {
                            return (latencies, outcomes, captured_minor, captured_ids);
                        }
                        let card = if i % 10 == 9 { "4000000000000002" } else { "4242424242424242" };
                        let body = format!(
                            r#"{{"amount": {}, "currency": "EUR", "card": {{"number": "{card}", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}}}"#,
                            100 + i % 5000
                        );
                        let at = Instant::now();
                        let answer = ingest.create_payment(merchant, None, body.as_bytes()).await;
                        latencies.push(at.elapsed());
                        match answer.as_ref().map(|a| a.body["status"].as_str().unwrap_or("").to_owned()) {
                            Ok(status) if status == "captured" => {
                                outcomes[0] += 1;
                                captured_minor += (100 + i % 5000) as i64;
                                let id = answer.as_ref().ok().and_then(|a| a.body["id"].as_str());
                                captured_ids.extend(id.and_then(|id| PaymentId::parse(id).ok()));
                            }
                            Ok(status) if status == "declined" => outcomes[1] += 1,
                            other => {
                                tracing::warn!(payment = i, ?other, "payment ended neither captured nor declined");
                                outcomes[2] += 1
                            }
                        }
                    }
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut outcomes = [0u64; 3];
        let mut captured_minor = 0i64;
        let mut captured_ids = Vec::new();
        for worker in workers {
            let (l, o, c, ids) = worker.await?;
            captured_minor += c;
            captured_ids.extend(ids);
            latencies.extend(l);
            for k in 0..3 {
                outcomes[k] += o[k];
            }
        }
        let elapsed = started.elapsed();
        if let Some(sampler) = lag_sampler {
            sampler.abort();
            println!(
                "consumer lag (payments.commands → authorization, sampled every 250 ms): max {} commands",
                max_lag.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        latencies.sort_unstable();
        let ms = |d: Duration| d.as_micros() as u64 / 1000;
        println!(
            "end to end: {} payments/s  ({} payments in {} ms; captured {}, declined {}, other {})",
            args.payments * 1000 / (elapsed.as_millis() as u64).max(1),
            args.payments,
            elapsed.as_millis(),
            outcomes[0],
            outcomes[1],
            outcomes[2]
        );
        println!(
            "latency to outcome: p50 {} ms  p99 {} ms  p999 {} ms  max {} ms",
            ms(percentile(&latencies, 500)),
            ms(percentile(&latencies, 990)),
            ms(percentile(&latencies, 999)),
            ms(*latencies.last().unwrap_or(&Duration::ZERO))
        );
        // Stages three and four: batch everything captured, close, reconcile.
        let captured_entries = outcomes[0];
        // All batched once the batches' totals add up to what was captured, read from their
        // headers (every 5 ms, cheaply).
        let settle_started = Instant::now();
        let mut batched_minor = 0i64;
        while outcomes[2] == 0
            && batched_minor < captured_minor
            && settle_started.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            batched_minor = settlement.batch_headers(merchant, 10_000)?.iter().map(|b| b.captured_minor).sum();
        }
        let batched_after = settle_started.elapsed();
        let closed = settlement.cutoff().await?.closed;
        let closed_after = settle_started.elapsed();
        let mut reconciled = 0u64;
        let mut clean = true;
        while reconciled < captured_entries && settle_started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let reports = reconciliation.reports(merchant, 10_000)?;
            reconciled = reports.iter().map(|r| r.result.matched.len() as u64).sum();
            clean = reports.iter().all(|r| r.result.is_clean());
        }
        let (total, tail, cpu_at_end) = (started.elapsed(), settle_started.elapsed(), process_cpu());
        // Counted once it is all over (outside the figures): a full read of every entry.
        let batched: u64 = settlement.batches(merchant, 10_000)?.iter().map(|b| b.entries.len() as u64).sum();
        println!(
            "settlement + reconciliation: {batched} entries in {} batches, {reconciled} lines matched{}, {} ms after the last outcome \
             (all batched at {} ms, closed at {} ms)",
            closed.len(),
            if clean { ", no discrepancy" } else { ", DISCREPANCIES (see the reports)" },
            tail.as_millis(),
            batched_after.as_millis(),
            closed_after.as_millis()
        );
        println!(
            "through all four stages: {} payments/s  ({} payments authorized, captured, batched and reconciled in {} ms)",
            args.payments * 1000 / (total.as_millis() as u64).max(1),
            args.payments,
            total.as_millis()
        );
        if let (Some(before), Some(after)) = (cpu_at_start, cpu_at_end) {
            let used = after.saturating_sub(before);
            let cores_x100 = used.as_millis() * 100 / total.as_millis().max(1);
            println!(
                "CPU used: {} ms (user + system, all threads) over those {} ms: {} µs a payment, {}.{:02} cores",
                used.as_millis(),
                total.as_millis(),
                used.as_micros() as u64 / args.payments.max(1),
                cores_x100 / 100,
                cores_x100 % 100
            );
        }
        if args.write_counts {
            let stores = [
                ("ingest", ingest_log.write_counts()),
                ("authorization", authorization_log.write_counts()),
                ("settlement", settlement_log.write_counts()),
                ("reconciliation", reconciliation_log.write_counts()),
                ("bus", embedded.as_ref().and_then(|bus| bus.write_counts())),
            ];
            let n = args.payments.max(1);
            let tenths = |count: u64| format!("{}.{}", count / n, count * 10 / n % 10);
            println!("RocksDB writes, since each store was opened: keys and WAL bytes a payment, WAL syncs in all");
            for (store, counts) in stores {
                if let Some(c) = counts {
                    println!(
                        "  {store:<15} {:>6} keys {:>7} bytes {:>7} syncs",
                        tenths(c.keys),
                        c.wal_bytes / n,
                        c.wal_syncs
                    );
                }
            }
        }
        // Outside the figures: every captured payment is recorded settled and reconciled on its own
        // history (the commands that do it may still have been on their way when the clock stopped).
        let recorded = |payment_id: PaymentId| {
            ingest.payment_events(merchant, payment_id).is_ok_and(|events| {
                events["data"].as_array().is_some_and(|data| {
                    data.iter().any(|e| e["type"] == "payment.reconciled")
                        && data.iter().any(|e| e["type"] == "payment.settled")
                })
            })
        };
        let waited = Instant::now();
        let mut unrecorded = captured_ids.clone();
        while !unrecorded.is_empty() && waited.elapsed() < Duration::from_secs(60) {
            unrecorded.retain(|id| !recorded(*id));
            if !unrecorded.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        println!(
            "recorded settled and reconciled on their payments: {} of {} captures",
            captured_ids.len() - unrecorded.len(),
            outcomes[0]
        );
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        // A figure from a run that lost or mismatched payments is no figure.
        anyhow::ensure!(outcomes[2] == 0, "{} payments ended neither captured nor declined", outcomes[2]);
        anyhow::ensure!(
            batched == captured_entries && batched_minor == captured_minor && reconciled == captured_entries,
            "of {captured_entries} captures ({captured_minor} minor units), {batched} were batched ({batched_minor}) \
             and {reconciled} reconciled"
        );
        anyhow::ensure!(clean, "reconciliation found discrepancies (see the reports)");
        anyhow::ensure!(
            unrecorded.is_empty() && captured_ids.len() as u64 == outcomes[0],
            "{} captured payments not recorded settled and reconciled (first: {:?})",
            outcomes[0] - (captured_ids.len() - unrecorded.len()) as u64,
            unrecorded.first()
        );
        anyhow::Ok(())
    })
    .context("pipeline benchmark")?;
    drop(runtime);
    Ok(())
}
