//! `kassa up`: the services in one process — over the embedded durable bus,
//! or a Kafka cluster with `--bus kafka` — with three simulated acquirers,
//! serving the payments API.

use crate::config::{Config, SimulatorTransport};
use crate::kafka_cmd::{BusKind, KafkaArgs};
use anyhow::Context;
use clap::Args;
use kassa_bus::{Bus, BusConfig, EmbeddedBus, KafkaBus, TopicSpec};
use kassa_domain::settlement::FeeSchedule;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::http_sim::{control_router, protocol_router, serve};
use kassa_providers::{Connector, HttpConnector, SimulatedAcquirer, SimulatorConfig};
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::ingest::{IngestConfig, IngestService};
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationService};
use kassa_services::routing::RoutingEngine;
use kassa_services::seal::{CARD_KEY_BYTES, CardSeal};
use kassa_services::settlement::{SettlementConfig, SettlementService};
use kassa_services::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH, SETTLEMENT_EVENTS};
use kassa_services::vault::CardVault;
use kassa_services::{Clock, SystemClock};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Simulated acquirers, in routing priority order.
pub const PROVIDERS: [&str; 3] = ["acq-alpha", "acq-beta", "acq-gamma"];
/// Partitions of each topic: the unit of parallelism of every service.
pub const PARTITIONS: u32 = 8;
/// The file in the data directory naming the address a running `kassa up` listens on.
pub const ADDRESS_FILE: &str = "kassa.addr";
/// Cards accepted and waiting for authorization, at most (503 beyond).
pub const CARDS_WAITING_MAX: usize = 100_000;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where all state lives (event logs, the bus, keys). Created if missing. [default: ./kassa-data]
    #[arg(long, env = "KASSA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the HTTP API listens on. [default: 127.0.0.1:8080]
    #[arg(long, env = "KASSA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Close open settlement batches this often, in seconds (0: only on `POST /admin/settlement/cutoff`). [default: 3600]
    #[arg(long, env = "KASSA_CUTOFF_INTERVAL_S")]
    pub cutoff_interval_s: Option<u64>,
    /// A TOML file with settings flags do not cover (providers, fees, timeouts); flags win over it.
    /// See README.md for its keys.
    #[arg(long, env = "KASSA_CONFIG")]
    pub config: Option<PathBuf>,
    /// The bus the services talk through: `embedded` (a durable log in the data
    /// directory) or `kafka` (a cluster at `--brokers`; topics from `kassa kafka init-topics`).
    #[arg(long, env = "KASSA_BUS", value_enum, default_value_t = BusKind::Embedded)]
    pub bus: BusKind,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Kassa's topics and their partition counts.
pub fn topics() -> Vec<TopicSpec> {
    vec![
        TopicSpec::new(PAYMENT_COMMANDS, PARTITIONS),
        TopicSpec::new(PAYMENT_EVENTS, PARTITIONS),
        TopicSpec::new(SETTLEMENT_EVENTS, PARTITIONS),
        TopicSpec::new(PROVIDER_HEALTH, PARTITIONS),
    ]
}

/// Open the bus the flags name.
fn open_bus(args: &UpArgs, config: &Config, dir: &Path) -> anyhow::Result<Arc<dyn Bus>> {
    match args.bus {
        BusKind::Embedded => {
            let bus_path = dir.join("bus");
            let bus = EmbeddedBus::open(&bus_path, BusConfig::new(topics()))
                .with_context(|| format!("opening the embedded bus at {}", bus_path.display()))?;
            Ok(Arc::new(bus))
        }
        BusKind::Kafka => {
            let kafka = args.kafka.config(config, topics())?;
            if config.kafka.as_ref().and_then(|k| k.create_topics).unwrap_or(false) {
                let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
                runtime.block_on(crate::kafka_cmd::init_topics(&kafka))?;
            }
            let brokers = kafka.brokers.clone();
            let bus = KafkaBus::open(kafka).with_context(|| {
                format!("connecting to Kafka at {brokers} (create the topics with `kassa kafka init-topics --brokers {brokers}`)")
            })?;
            tracing::info!(%brokers, "Kafka bus open");
            Ok(Arc::new(bus))
        }
    }
}

/// Read a secret file, or create it with `bytes` fresh random bytes (mode 0600).
fn secret_file(path: &Path, bytes: usize) -> anyhow::Result<Vec<u8>> {
    if path.exists() {
        let key = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            key.len() == bytes,
            "{} should hold {bytes} bytes; delete it to make a new one",
            path.display()
        );
        return Ok(key);
    }
    let key: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    write_private(path, &key)?;
    Ok(key)
}

pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let data_dir = args.data_dir.clone().or(config.data_dir.clone()).unwrap_or_else(|| PathBuf::from("./kassa-data"));
    let listen = args.listen.or(config.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let cutoff_interval_s = args.cutoff_interval_s.or(config.cutoff_interval_s).unwrap_or(3600);
    let dir = &data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    let open_log = |service: &str| -> anyhow::Result<Arc<EventLog>> {
        let path = dir.join(service);
        let log = EventLog::open(&path, LogConfig::default())
            .with_context(|| format!("opening the {service} event log at {}", path.display()))?;
        tracing::info!(service, path = %path.display(), head = log.head_position(), "event log open");
        Ok(Arc::new(log))
    };
    let ingest_log = open_log("ingest")?;
    let authorization_log = open_log("authorization")?;
    let settlement_log = open_log("settlement")?;
    let reconciliation_log = open_log("reconciliation")?;
    let bus = open_bus(&args, &config, dir)?;
    let token_key = secret_file(&dir.join("token.key"), 32)?;
    // Seals card data on its way from ingest to authorization (the ingest log and the bus hold it sealed only).
    let card_seal = Arc::new(
        CardSeal::new(&secret_file(&dir.join("card.key"), CARD_KEY_BYTES)?).context("the card key (card.key)")?,
    );
    let admin_token = format!("at_{}", hex::encode(secret_file(&dir.join("admin.secret"), 20)?));
    let admin_token_path = dir.join("admin.token");
    if !admin_token_path.exists() {
        write_private(&admin_token_path, format!("{admin_token}\n").as_bytes())?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kassa-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let vault = Arc::new(CardVault::new(CARDS_WAITING_MAX));
        let provider_configs = config.providers();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Every provider is reached over HTTP: the configured URL, or a
        // simulated acquirer this process serves on a loopback port.
        let mut providers: Vec<Arc<dyn Connector>> = Vec::new();
        let mut simulators = Vec::new();
        let mut tasks = Vec::new();
        for (i, p) in provider_configs.iter().enumerate() {
            let url = match &p.url {
                Some(url) => url.clone(),
                None => {
                    let simulator = SimulatorConfig {
                        latency_ms_min: p.latency_ms_min,
                        latency_ms_max: p.latency_ms_max,
                        seed: i as u64 + 1,
                    };
                    let sim = Arc::new(SimulatedAcquirer::new(p.name.clone(), simulator));
                    if config.simulator_transport.unwrap_or_default() == SimulatorTransport::InProcess {
                        providers.push(Arc::clone(&sim) as Arc<dyn Connector>);
                        simulators.push(sim);
                        continue;
                    }
                    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                        .await
                        .with_context(|| format!("binding a loopback port for simulator {}", p.name))?;
                    let url = format!("http://{}", listener.local_addr()?);
                    tracing::info!(provider = %p.name, %url, "simulated acquirer serving");
                    let (sim_for_task, router, stop) =
                        (Arc::clone(&sim), protocol_router(Arc::clone(&sim)), stop_rx.clone());
                    let name = p.name.clone();
                    tasks.push(tokio::spawn(async move {
                        if let Err(error) = serve(sim_for_task, listener, router, stop).await {
                            tracing::error!(provider = %name, %error, "simulated acquirer stopped");
                        }
                    }));
                    simulators.push(sim);
                    url
                }
            };
            let connector =
                HttpConnector::new(p.name.clone(), url).map_err(|e| anyhow::anyhow!("provider {}: {e}", p.name))?;
            providers.push(Arc::new(connector));
        }
        let names: Vec<String> = provider_configs.iter().map(|p| p.name.clone()).collect();
        let routing = Arc::new(
            RoutingEngine::new(config.routing_settings()?, &names)
                .map_err(|e| anyhow::anyhow!("routing settings: {e}"))?,
        );
        let fees = provider_configs
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    FeeSchedule { capture_basis_points: p.fee_basis_points, capture_fixed_minor: p.fee_fixed_minor },
                )
            })
            .collect();
        let ingest = Arc::new(
            IngestService::new(
                Arc::clone(&ingest_log),
                Arc::clone(&bus),
                Arc::clone(&vault),
                Arc::clone(&clock),
                IngestConfig {
                    token_key,
                    outcome_wait_ms: config.outcome_wait_ms.unwrap_or(IngestConfig::default().outcome_wait_ms),
                    outbox_events_max: config.outbox_events_max.unwrap_or(IngestConfig::default().outbox_events_max),
                    ..IngestConfig::default()
                },
            )
            .with_card_seal(Arc::clone(&card_seal)),
        );
        let authorization = Arc::new(
            AuthorizationService::new(
                Arc::clone(&authorization_log),
                Arc::clone(&bus),
                providers.clone(),
                vault,
                Arc::clone(&clock),
                AuthorizationConfig {
                    provider_timeout_ms: config
                        .provider_timeout_ms
                        .unwrap_or(AuthorizationConfig::default().provider_timeout_ms),
                    ..AuthorizationConfig::default()
                },
            )
            .with_routing(routing)
            .with_card_seal(card_seal),
        );
        let settlement = Arc::new(SettlementService::new(
            Arc::clone(&settlement_log),
            Arc::clone(&bus),
            Arc::new(SystemClock),
            SettlementConfig {
                cutoff_interval_ms: cutoff_interval_s.saturating_mul(1000),
                fees,
                ..SettlementConfig::default()
            },
        ));
        tasks.extend(ingest.spawn(stop_rx.clone())?);
        tasks.extend(authorization.spawn(stop_rx.clone())?);
        tasks.extend(settlement.spawn(stop_rx.clone())?);
        let reconciliation = Arc::new(ReconciliationService::new(
            Arc::clone(&reconciliation_log),
            Arc::clone(&bus),
            providers,
            Arc::new(SystemClock),
            ReconciliationConfig::default(),
        ));
        tasks.extend(reconciliation.spawn(stop_rx)?);

        let key_path = dir.join("demo-merchant.key");
        if key_path.exists() {
            println!("demo merchant API key: in {}", key_path.display());
        } else {
            let (merchant_id, key) =
                ingest.create_merchant("demo").await.map_err(|e| anyhow::anyhow!("creating the demo merchant: {e}"))?;
            write_private(&key_path, format!("{}\n", key.reveal()).as_bytes())?;
            println!("demo merchant {merchant_id} created; API key: {} (also in {})", key.reveal(), key_path.display());
        }

        let ready = Arc::new(AtomicBool::new(false));
        let app = kassa_services::http::router(
            Arc::clone(&ingest),
            settlement,
            reconciliation,
            Arc::clone(&ready),
            &admin_token,
        )
        .merge(kassa_services::http::routing_router(Arc::clone(&authorization), clock, &admin_token))
        .merge(control_router(simulators, &admin_token));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {}; is another kassa running there?", listen))?;
        let listen = listener.local_addr()?; // the real port when asked for port 0
        // Where `kassa merchant create` (and tests) find this instance.
        std::fs::write(dir.join(ADDRESS_FILE), listen.to_string())
            .with_context(|| format!("writing {}", dir.join(ADDRESS_FILE).display()))?;
        ready.store(true, Ordering::Release);
        tracing::info!(listen = %listen, data_dir = %dir.display(), "kassa is up");
        println!("kassa is up on http://{}", listen);
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.context("serving HTTP")?;

        tracing::info!("shutting down: stopping services, flushing event logs");
        let _ = stop_tx.send(true);
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
                tracing::warn!("a service task did not stop within 10 s");
            }
        }
        anyhow::Ok(())
    })?;
    // Dropping the runtime drops the last handles on the logs and the bus, which
    // joins their writer threads: everything acknowledged is on disk.
    drop(runtime);
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops kassa");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
