//! `kassa ingest|authorize|settle|reconcile`: one service per process, over a
//! Kafka cluster. Each instance keeps its own event log in its data directory;
//! they share only the topics, the card key (ingest seals, authorization
//! opens) and the providers' URLs.

use crate::kafka_cmd::{BusKind, KafkaArgs};
use crate::wiring;
use anyhow::Context;
use clap::Args;
use kassa_bus::Bus;
use kassa_services::authorization::{AuthorizationConfig, AuthorizationService};
use kassa_services::ingest::IngestService;
use kassa_services::reconciliation::{ReconciliationConfig, ReconciliationService};
use kassa_services::settlement::{SettlementConfig, SettlementService};
use kassa_services::vault::CardVault;
use kassa_services::{Clock, SystemClock};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which service a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingest,
    Authorize,
    Settle,
    Reconcile,
}

impl Service {
    /// The service's event log, under the data directory.
    fn log_name(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Authorize => "authorization",
            Service::Settle => "settlement",
            Service::Reconcile => "reconciliation",
        }
    }

    fn command(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Authorize => "authorize",
            Service::Settle => "settle",
            Service::Reconcile => "reconcile",
        }
    }
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    /// Where this instance keeps its event log and keys; one per instance. Created if missing. [default: ./kassa-data]
    #[arg(long, env = "KASSA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of this instance's HTTP API: for ingest the payments API [default: 127.0.0.1:8080];
    /// for the others their operator API (health, routing, batches, reports), served only when given.
    #[arg(long, env = "KASSA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A TOML file (providers with their URLs, fees, timeouts, `[kafka]`); see README.md.
    #[arg(long, env = "KASSA_CONFIG")]
    pub config: Option<PathBuf>,
    /// The bus: only `kafka` can join services in separate processes.
    #[arg(long, env = "KASSA_BUS", value_enum, default_value_t = BusKind::Kafka)]
    pub bus: BusKind,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The card key shared by ingest (seals) and authorization (opens). Ingest
    /// creates it when missing; an authorizer needs a copy. [default: DATA_DIR/card.key]
    #[arg(long, env = "KASSA_CARD_KEY_FILE")]
    pub card_key: Option<PathBuf>,
    /// (ingest) The key card tokens and idempotency claims are made with: every ingest instance of a
    /// deployment needs the same one (a copy of the first's). Created when missing. [default: DATA_DIR/token.key]
    #[arg(long, env = "KASSA_TOKEN_KEY_FILE")]
    pub token_key: Option<PathBuf>,
    /// The operator token for `/admin/…`; created when missing. [default: DATA_DIR/admin.token]
    #[arg(long, env = "KASSA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// (settle) Close open settlement batches at the start of every slot of this many seconds, counted from the
    /// Unix epoch (3600: on the hour, UTC; 0: only when asked); give every settler the same. [default: 3600]
    #[arg(long, env = "KASSA_CUTOFF_INTERVAL_S")]
    pub cutoff_interval_s: Option<u64>,
    /// Rebuild this instance's state from the topics, for a lost or suspect disk. Its event log is
    /// moved aside (to DATA_DIR/SERVICE.before-rebuild-UNIXTIME, kept for inspection). ingest reads
    /// `merchants` and `payments.events` from the start (refused while its outbox holds what the bus
    /// has not taken); authorize replays each partition the group gives it from
    /// `authorization.changelog`; settle replays each partition the group gives it from
    /// `settlement.changelog`, and reads `payments.events` from the start; reconcile replays each
    /// partition the group gives it from `reconciliation.changelog`.
    #[arg(long)]
    pub rebuild: bool,
}

pub fn run(service: Service, args: ServiceArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.bus == BusKind::Kafka,
        "`kassa {}` runs one service and talks to the others over Kafka: pass --bus kafka --brokers HOST:PORT \
         (the embedded bus lives inside one process: run all four with `kassa up`)",
        service.command()
    );
    let config = wiring::load_config(args.config.as_deref())?;
    let dir = args.data_dir.clone().or(config.data_dir.clone()).unwrap_or_else(|| PathBuf::from("./kassa-data"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    if args.rebuild {
        let current = dir.join(service.log_name());
        if service == Service::Ingest && current.exists() {
            outbox_is_empty(&current)?;
        }
        if current.exists() {
            let unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let aside = dir.join(format!("{}.before-rebuild-{unix_s}", service.log_name()));
            std::fs::rename(&current, &aside)
                .with_context(|| format!("moving {} aside to {}", current.display(), aside.display()))?;
            println!("rebuild: the old log is kept at {}", aside.display());
        }
    }
    let log = wiring::open_log(&dir, service.log_name())?;
    // A stable name in the consumer group, kept in the data directory: restarted
    // (also after a crash), this instance takes its partitions back at once.
    let instance_id = wiring::secret_file(&dir.join("instance.id"), 8)?;
    let instance_id = format!("{}-{}", service.command(), hex::encode(instance_id));
    let bus: Arc<dyn Bus> = crate::kafka_cmd::open_bus_as(&args.kafka, &config, Some(instance_id))?;
    let admin_token =
        wiring::admin_token(&dir, &args.admin_token_file.clone().unwrap_or_else(|| dir.join("admin.token")))?;
    let card_key = args.card_key.clone().unwrap_or_else(|| dir.join("card.key"));
    let listen = match service {
        Service::Ingest => {
            Some(args.listen.or(config.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))))
        }
        _ => args.listen,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kassa-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        let ready = Arc::new(AtomicBool::new(false));
        let app = match service {
            Service::Ingest => {
                let token_key = args.token_key.clone().unwrap_or_else(|| dir.join("token.key"));
                let token_key = wiring::secret_file(&token_key, 32)?;
                let ingest = Arc::new(
                    IngestService::new(
                        log,
                        bus,
                        Arc::new(CardVault::new(1)),
                        Arc::clone(&clock),
                        wiring::ingest_config(&config, token_key),
                    )
                    .sealing_only(wiring::card_seal(&card_key, true)?),
                );
                tasks.extend(ingest.spawn(stop_rx.clone())?);
                crate::up::demo_merchant(&ingest, &dir).await?;
                kassa_services::http::router(ingest, None, None, Arc::clone(&ready), &admin_token)
            }
            Service::Authorize => {
                let seal = wiring::card_seal(&card_key, false)?;
                let (providers, _) =
                    wiring::providers(&config, wiring::ProviderReach::UrlsOnly, &stop_rx, &mut tasks).await?;
                let authorization = Arc::new(
                    AuthorizationService::new(
                        log,
                        bus,
                        providers,
                        Arc::new(CardVault::new(crate::up::CARDS_WAITING_MAX)),
                        Arc::clone(&clock),
                        // Separate processes: instances share the partitions, state moves through the changelog.
                        AuthorizationConfig { changelog: true, ..wiring::authorization_config(&config) },
                    )
                    .with_routing(wiring::routing(&config)?)
                    .with_card_seal(seal),
                );
                tasks.extend(authorization.spawn(stop_rx.clone())?);
                kassa_services::http::operator_router(None, None, Arc::clone(&ready), &admin_token)
                    .merge(kassa_services::http::routing_router(authorization, clock, &admin_token))
                    .method_not_allowed_fallback(kassa_services::http::method_not_allowed)
            }
            Service::Settle => {
                let cutoff_interval_s = args.cutoff_interval_s.or(config.cutoff_interval_s).unwrap_or(3600);
                let settlement = Arc::new(SettlementService::new(
                    log,
                    bus,
                    clock,
                    // Separate processes: instances share the partitions, batches move through the changelog.
                    SettlementConfig { changelog: true, ..wiring::settlement_config(&config, cutoff_interval_s) },
                ));
                tasks.extend(settlement.spawn(stop_rx.clone())?);
                kassa_services::http::operator_router(Some(settlement), None, Arc::clone(&ready), &admin_token)
            }
            Service::Reconcile => {
                let (providers, _) =
                    wiring::providers(&config, wiring::ProviderReach::UrlsOnly, &stop_rx, &mut tasks).await?;
                let reconciliation =
                    // Separate processes: instances share the partitions, state moves through the changelog.
                    Arc::new(ReconciliationService::new(
                        log,
                        bus,
                        providers,
                        clock,
                        ReconciliationConfig { changelog: true, ..ReconciliationConfig::default() },
                    ));
                tasks.extend(reconciliation.spawn(stop_rx.clone())?);
                kassa_services::http::operator_router(None, Some(reconciliation), Arc::clone(&ready), &admin_token)
            }
        };
        let name = service.command();
        let signal = wiring::stop_signal(&tasks);
        match listen {
            Some(listen) => {
                let listener = wiring::bind(listen, &dir).await?;
                let listen = listener.local_addr()?;
                ready.store(true, Ordering::Release);
                tracing::info!(service = name, %listen, data_dir = %dir.display(), "kassa service is up");
                println!("kassa {name} is up on http://{listen}");
                axum::serve(listener, app).with_graceful_shutdown(signal.stopped).await.context("serving HTTP")?;
            }
            None => {
                tracing::info!(service = name, data_dir = %dir.display(), "kassa service is up");
                println!("kassa {name} is up (no HTTP API; pass --listen for its operator API)");
                signal.stopped.await;
            }
        }
        wiring::stop_all(stop_tx, tasks).await;
        wiring::check_stopped(&signal.task_ended)
    })?;
    drop(runtime);
    tracing::info!("stopped");
    Ok(())
}

/// An ingest log is its outbox: what it accepted and has not passed on to the
/// bus yet is on no topic, and a rebuild would lose it. Refuse then.
fn outbox_is_empty(path: &std::path::Path) -> anyhow::Result<()> {
    let log = kassa_eventlog::EventLog::open(path, kassa_eventlog::LogConfig::default()).with_context(|| {
        format!(
            "opening the old ingest log {} to check that everything it accepted is on the bus; if that log is \
             lost, move it aside yourself and start again with --rebuild (requests it accepted and had not \
             passed on are lost with it)",
            path.display()
        )
    })?;
    let relayed = kassa_services::relay::relayed_position(&log, kassa_services::topics::PAYMENT_COMMANDS)?;
    let waiting = log.head_position().saturating_sub(relayed);
    anyhow::ensure!(
        waiting == 0,
        "--rebuild refused: {waiting} events this ingest log accepted (payments, commands or merchants) are not on \
         the bus yet, and a rebuild would lose them; start `kassa ingest` without --rebuild until they are \
         passed on (the broker must be up), then rebuild"
    );
    Ok(())
}
