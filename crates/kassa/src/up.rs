//! `kassa up`: the services in one process — over the embedded durable bus,
//! or a Kafka cluster with `--bus kafka` — with three simulated acquirers,
//! serving the payments API.

use crate::config::Config;
use crate::kafka_cmd::{BusKind, KafkaArgs};
use crate::wiring;
use anyhow::Context;
use clap::Args;
use kassa_bus::{Bus, BusConfig, EmbeddedBus, TopicSpec};
use kassa_providers::http_sim::control_router;
use kassa_services::authorization::AuthorizationService;
use kassa_services::ingest::IngestService;
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationService};
use kassa_services::settlement::SettlementService;
use kassa_services::topics::{
    AUTHORIZATION_CHANGELOG, MERCHANTS, PAYMENT_COMMANDS, PAYMENT_EVENTS, PROVIDER_HEALTH, RECONCILIATION_CHANGELOG,
    SETTLEMENT_CHANGELOG, SETTLEMENT_ENTRIES, SETTLEMENT_EVENTS,
};
use kassa_services::vault::CardVault;
use kassa_services::{Clock, SystemClock};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Simulated acquirers, in routing priority order.
pub const PROVIDERS: [&str; 3] = ["acq-alpha", "acq-beta", "acq-gamma"];
/// Partitions of each topic: the unit of parallelism of every service.
pub const PARTITIONS: u32 = 8;
/// The file in the data directory naming the address a running `kassa up` listens on.
pub const ADDRESS_FILE: &str = "kassa.addr";
/// Cards accepted and waiting for authorization, at most (429 `overloaded` beyond).
pub const CARDS_WAITING_MAX: usize = 100_000;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where all state lives (event logs, the bus, keys, the simulators' journals). Created if missing. [default: ./kassa-data]
    #[arg(long, env = "KASSA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the HTTP API listens on. [default: 127.0.0.1:8080]
    #[arg(long, env = "KASSA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Close open settlement batches at the start of every slot of this many seconds, counted from the Unix epoch
    /// (3600: on the hour, UTC; 0: only on `POST /admin/settlement/cutoff`). [default: 3600]
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
        // Read from the start by ingest's and settlement's --rebuild (and a new settlement feed owner):
        // created with retention off.
        TopicSpec::kept_forever(PAYMENT_EVENTS, PARTITIONS),
        // Read from the start by reconciliation and by a settlement partition's first claim.
        TopicSpec::kept_forever(SETTLEMENT_EVENTS, PARTITIONS),
        // Settlement's feed → its batches, keyed by batch key. Read by the batches' owners as they go,
        // never replayed from the start: kept as long as the commands are.
        TopicSpec::new(SETTLEMENT_ENTRIES, PARTITIONS),
        TopicSpec::new(PROVIDER_HEALTH, PARTITIONS),
        // As many partitions as payments.commands: partition p's commits go to partition p.
        // Replayed from the start by a new owner or --rebuild: created with retention off.
        TopicSpec::kept_forever(AUTHORIZATION_CHANGELOG, PARTITIONS),
        // As many partitions as settlement.events, for the same reason.
        TopicSpec::kept_forever(RECONCILIATION_CHANGELOG, PARTITIONS),
        // As many partitions as settlement.entries, for the same reason.
        TopicSpec::kept_forever(SETTLEMENT_CHANGELOG, PARTITIONS),
        // Every ingest instance reads all of it from the start: one partition, kept forever.
        TopicSpec::kept_forever(MERCHANTS, 1),
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
        BusKind::Kafka => crate::kafka_cmd::open_bus(&args.kafka, config),
    }
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let config = wiring::load_config(args.config.as_deref())?;
    let data_dir = args.data_dir.clone().or(config.data_dir.clone()).unwrap_or_else(|| PathBuf::from("./kassa-data"));
    let listen = args.listen.or(config.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let cutoff_interval_s = args.cutoff_interval_s.or(config.cutoff_interval_s).unwrap_or(3600);
    let dir = &data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    let ingest_log = wiring::open_log(dir, "ingest")?;
    let authorization_log = wiring::open_log(dir, "authorization")?;
    let settlement_log = wiring::open_log(dir, "settlement")?;
    let reconciliation_log = wiring::open_log(dir, "reconciliation")?;
    let bus = open_bus(&args, &config, dir)?;
    let token_key = wiring::secret_file(&dir.join("token.key"), 32)?;
    // Seals card data on its way from ingest to authorization (the ingest log and the bus hold it sealed only).
    let card_seal = wiring::card_seal(&dir.join("card.key"), true)?;
    let admin_token = wiring::admin_token(dir, &dir.join("admin.token"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kassa-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let vault = Arc::new(CardVault::new(CARDS_WAITING_MAX));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // Every provider is reached over HTTP: the configured URL, or a
        // simulated acquirer this process serves on a loopback port.
        let journals = dir.join("simulators");
        let (providers, simulators) = wiring::providers(
            &config,
            wiring::ProviderReach::SimulateMissing { journals: &journals },
            &stop_rx,
            &mut tasks,
        )
        .await?;
        let ingest = Arc::new(
            IngestService::new(
                Arc::clone(&ingest_log),
                Arc::clone(&bus),
                Arc::clone(&vault),
                Arc::clone(&clock),
                wiring::ingest_config(&config, token_key),
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
                wiring::authorization_config(&config),
            )
            .with_routing(wiring::routing(&config)?)
            .with_card_seal(card_seal),
        );
        let settlement = Arc::new(SettlementService::new(
            Arc::clone(&settlement_log),
            Arc::clone(&bus),
            Arc::new(SystemClock),
            wiring::settlement_config(&config, cutoff_interval_s),
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

        demo_merchant(&ingest, dir).await?;

        let ready = Arc::new(AtomicBool::new(false));
        let app = kassa_services::http::router(
            Arc::clone(&ingest),
            Some(settlement),
            Some(reconciliation),
            Arc::clone(&ready),
            &admin_token,
        )
        .merge(kassa_services::http::routing_router(Arc::clone(&authorization), clock, &admin_token))
        .merge(control_router(simulators, &admin_token))
        .method_not_allowed_fallback(kassa_services::http::method_not_allowed);
        let listener = wiring::bind(listen, dir).await?;
        let listen = listener.local_addr()?;
        ready.store(true, Ordering::Release);
        tracing::info!(listen = %listen, data_dir = %dir.display(), "kassa is up");
        println!("kassa is up on http://{}", listen);
        let signal = wiring::stop_signal(&tasks);
        axum::serve(listener, app).with_graceful_shutdown(signal.stopped).await.context("serving HTTP")?;
        wiring::stop_all(stop_tx, tasks).await;
        wiring::check_stopped(&signal.task_ended)
    })?;
    // Dropping the runtime drops the last handles on the logs and the bus, which
    // joins their writer threads: everything acknowledged is on disk.
    drop(runtime);
    tracing::info!("stopped");
    Ok(())
}

/// The demo merchant of a fresh data directory; its key goes to `DIR/demo-merchant.key`.
pub async fn demo_merchant(ingest: &IngestService, dir: &Path) -> anyhow::Result<()> {
    let key_path = dir.join("demo-merchant.key");
    if key_path.exists() {
        println!("demo merchant API key: in {}", key_path.display());
    } else {
        let (merchant_id, key) =
            ingest.create_merchant("demo").await.map_err(|e| anyhow::anyhow!("creating the demo merchant: {e}"))?;
        wiring::write_private(&key_path, format!("{}\n", key.reveal()).as_bytes())?;
        println!("demo merchant {merchant_id} created; API key: {} (also in {})", key.reveal(), key_path.display());
    }
    Ok(())
}
