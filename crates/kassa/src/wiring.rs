//! What `kassa up` and the single-service commands (`kassa ingest|authorize|
//! settle|reconcile`) build the same way: logs, secrets, providers, routing,
//! each service's settings, the HTTP listener and the shutdown sequence.

use crate::config::{Config, SimulatorTransport};
use anyhow::Context;
use kassa_domain::settlement::FeeSchedule;
use kassa_eventlog::{EventLog, LogConfig};
use kassa_providers::http_sim::{protocol_router, serve};
use kassa_providers::{Connector, HttpConnector, SimulatedAcquirer, SimulatorConfig};
use kassa_services::authorization::AuthorizationConfig;
use kassa_services::ingest::IngestConfig;
use kassa_services::routing::RoutingEngine;
use kassa_services::seal::{CARD_KEY_BYTES, CardSeal};
use kassa_services::settlement::SettlementConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The config file, or the defaults.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    }
}

/// A service's log settings. Settlement's and reconciliation's groups linger 3 ms under load (not the
/// default 250 µs) for more requests to write and sync with the first: they are off a payment's path (no
/// payment's client waits on them; an operator's cut-off does, for a few ms more), and each sync costs
/// about 0.1 ms of CPU on a virtual machine, so at 20,000 payments/s this halves their syncs. Ingest and
/// authorization keep the default: a client waits on each of their syncs, and a longer linger there costs
/// more in latency (and so in requests a second at a given concurrency) than it saves in CPU. Only under
/// load: after a group of one request the next is written at once, so after a busy spell at most one lone
/// request waits out the linger (`GroupCommitConfig::linger_us`).
pub fn log_config(service: &str) -> LogConfig {
    let mut config = LogConfig::default();
    if matches!(service, "settlement" | "reconciliation") {
        config.group.linger_us = 3_000;
    }
    config
}

/// Open (or create) a service's event log under the data directory.
pub fn open_log(dir: &Path, service: &str) -> anyhow::Result<Arc<EventLog>> {
    let path = dir.join(service);
    let log = EventLog::open(&path, log_config(service))
        .with_context(|| format!("opening the {service} event log at {}", path.display()))?;
    tracing::info!(service, path = %path.display(), head = log.head_position(), "event log open");
    Ok(Arc::new(log))
}

/// Read a secret file, or create it with `bytes` fresh random bytes (mode 0600).
pub fn secret_file(path: &Path, bytes: usize) -> anyhow::Result<Vec<u8>> {
    if path.exists() {
        return read_secret(path, bytes);
    }
    let key: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    write_private(path, &key)?;
    Ok(key)
}

/// Read a secret file that must exist and hold `bytes` bytes.
pub fn read_secret(path: &Path, bytes: usize) -> anyhow::Result<Vec<u8>> {
    let key = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(key.len() == bytes, "{} should hold {bytes} bytes; delete it to make a new one", path.display());
    Ok(key)
}

/// Create a file only its owner can read, and make it durable.
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

/// The key that seals card data between ingest and authorization. `create`:
/// make it when missing (ingest, `kassa up`); otherwise it must exist (an
/// authorizer must open what ingest sealed, so it cannot invent its own).
pub fn card_seal(path: &Path, create: bool) -> anyhow::Result<Arc<CardSeal>> {
    let key = if create {
        secret_file(path, CARD_KEY_BYTES)?
    } else {
        anyhow::ensure!(
            path.exists(),
            "no card key at {}: copy the card.key of the ingest instances there (or pass --card-key FILE)",
            path.display()
        );
        read_secret(path, CARD_KEY_BYTES)?
    };
    Ok(Arc::new(CardSeal::new(&key).with_context(|| format!("the card key {}", path.display()))?))
}

/// The operator token: read from `path`, or made from a secret in `dir` and
/// written to `path` when it does not exist yet.
pub fn admin_token(dir: &Path, path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let token = text.trim().to_owned();
        anyhow::ensure!(!token.is_empty(), "the operator token file {} is empty", path.display());
        return Ok(token);
    }
    let token = format!("at_{}", hex::encode(secret_file(&dir.join("admin.secret"), 20)?));
    write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// How providers are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderReach<'a> {
    /// A provider without a URL is a simulated acquirer this process runs (`kassa up`),
    /// its ledger journaled in `journals/<name>.journal` so it outlives a restart.
    SimulateMissing { journals: &'a Path },
    /// Every provider needs a URL: services in separate processes must see the
    /// same providers (authorization's calls, reconciliation's ledgers).
    UrlsOnly,
}

/// The providers of the config, as connectors, with the simulators this
/// process serves (their serving tasks are pushed onto `tasks`).
pub async fn providers(
    config: &Config,
    reach: ProviderReach<'_>,
    stop: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<(Vec<Arc<dyn Connector>>, Vec<Arc<SimulatedAcquirer>>)> {
    let mut providers: Vec<Arc<dyn Connector>> = Vec::new();
    let mut simulators = Vec::new();
    for (i, p) in config.providers().iter().enumerate() {
        let url = match (&p.url, reach) {
            (Some(url), _) => url.clone(),
            (None, ProviderReach::UrlsOnly) => anyhow::bail!(
                "provider {:?} has no url: services in separate processes reach providers over HTTP \
                 (give each [[providers]] entry a url, e.g. of a `kassa provider-sim`)",
                p.name
            ),
            (None, ProviderReach::SimulateMissing { journals }) => {
                let simulator = SimulatorConfig {
                    latency_ms_min: p.latency_ms_min,
                    latency_ms_max: p.latency_ms_max,
                    seed: i as u64 + 1,
                };
                std::fs::create_dir_all(journals).with_context(|| format!("creating {}", journals.display()))?;
                // The name is a file name: config validation allows letters, digits, '-' and '_' only.
                let journal = journals.join(format!("{}.journal", p.name));
                let sim =
                    SimulatedAcquirer::new(p.name.clone(), simulator).with_journal(&journal).map_err(|e| match e {
                        kassa_providers::JournalError::Damaged { .. } => {
                            anyhow::anyhow!("{e} (move the file away to start that simulator empty)")
                        }
                        e => anyhow::anyhow!("{e}"),
                    })?;
                let sim = Arc::new(sim);
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
                let (sim_for_task, router, stop) = (Arc::clone(&sim), protocol_router(Arc::clone(&sim)), stop.clone());
                let mut stopping = stop.clone();
                let name = p.name.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(error) = serve(sim_for_task, listener, router, stop).await {
                        // A simulated provider that is gone is a provider outage (routing goes
                        // around it), not a reason to stop Kassa: this task ends with the others.
                        tracing::error!(provider = %name, %error, "simulated acquirer stopped");
                        let _ = stopping.wait_for(|stop| *stop).await;
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
    Ok((providers, simulators))
}

/// The routing engine over the config's providers and routing settings.
pub fn routing(config: &Config) -> anyhow::Result<Arc<RoutingEngine>> {
    let names: Vec<String> = config.providers().iter().map(|p| p.name.clone()).collect();
    Ok(Arc::new(
        RoutingEngine::new(config.routing_settings()?, &names).map_err(|e| anyhow::anyhow!("routing settings: {e}"))?,
    ))
}

pub fn ingest_config(config: &Config, token_key: Vec<u8>) -> IngestConfig {
    let defaults = IngestConfig::default();
    IngestConfig {
        token_key,
        outcome_wait_ms: config.outcome_wait_ms.unwrap_or(defaults.outcome_wait_ms),
        claim_wait_ms: config.claim_wait_ms.unwrap_or(defaults.claim_wait_ms),
        outbox_events_max: config.outbox_events_max.unwrap_or(defaults.outbox_events_max),
        ..defaults
    }
}

pub fn authorization_config(config: &Config) -> AuthorizationConfig {
    let defaults = AuthorizationConfig::default();
    AuthorizationConfig {
        provider_timeout_ms: config.provider_timeout_ms.unwrap_or(defaults.provider_timeout_ms),
        ..defaults
    }
}

pub fn settlement_config(config: &Config, cutoff_interval_s: u64) -> SettlementConfig {
    let fees: HashMap<String, FeeSchedule> = config
        .providers()
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                FeeSchedule { capture_basis_points: p.fee_basis_points, capture_fixed_minor: p.fee_fixed_minor },
            )
        })
        .collect();
    SettlementConfig { cutoff_interval_ms: cutoff_interval_s.saturating_mul(1000), fees, ..SettlementConfig::default() }
}

/// Bind the HTTP listener and note its address in `DIR/kassa.addr` (where
/// `kassa merchant create` and tests find a running instance).
pub async fn bind(listen: SocketAddr, dir: &Path) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}; is another kassa running there?"))?;
    let address = listener.local_addr()?; // the real port when asked for port 0
    let path = dir.join(crate::up::ADDRESS_FILE);
    std::fs::write(&path, address.to_string()).with_context(|| format!("writing {}", path.display()))?;
    Ok(listener)
}

/// Tell the services to stop and wait for them (each flushes what it holds).
pub async fn stop_all(stop: watch::Sender<bool>, tasks: Vec<JoinHandle<()>>) {
    tracing::info!("shutting down: stopping services, flushing event logs");
    let _ = stop.send(true);
    for task in tasks {
        if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
            tracing::warn!("a service task did not stop within 10 s");
        }
    }
}

/// What stops a running Kassa: a signal, or a service task that ended on its own.
pub struct StopSignal {
    /// Resolves on SIGTERM or Ctrl-C, or when one of the watched tasks ends.
    pub stopped: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    /// Whether a task ended on its own (then Kassa exits non-zero).
    pub task_ended: Arc<std::sync::atomic::AtomicBool>,
}

/// Resolves on SIGTERM or Ctrl-C — or when one of `tasks` ends by itself. A
/// service task ends early only on an error it cannot recover from in place
/// (its log refused a write, its stored position cannot be read, its consumer
/// group is gone). Kassa then stops as a whole and exits non-zero, so its
/// supervisor restarts it and every service resumes from its log, rather than
/// answering on with one service stopped.
pub fn stop_signal(tasks: &[JoinHandle<()>]) -> StopSignal {
    let handles: Vec<tokio::task::AbortHandle> = tasks.iter().map(JoinHandle::abort_handle).collect();
    let task_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&task_ended);
    let stopped = Box::pin(async move {
        let ended = async {
            loop {
                if handles.iter().any(tokio::task::AbortHandle::is_finished) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        tokio::select! {
            () = shutdown_signal() => {}
            () = ended => {
                tracing::error!("a service stopped on an error (logged above); stopping Kassa so that it restarts");
                flag.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    });
    StopSignal { stopped, task_ended }
}

/// After [`stop_all`]: an error if a task had ended by itself.
pub fn check_stopped(signal_flag: &std::sync::atomic::AtomicBool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !signal_flag.load(std::sync::atomic::Ordering::Acquire),
        "a service stopped on an error (see the log above); Kassa stopped the others and exits so it can be \
         restarted: every service resumes from its event log"
    );
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_by_itself_stops_kassa_and_is_an_error() {
        let running = tokio::spawn(std::future::pending::<()>());
        let signal = stop_signal(std::slice::from_ref(&running));
        // Nothing ended: still running.
        let mut stopped = signal.stopped;
        assert!(tokio::time::timeout(Duration::from_millis(600), &mut stopped).await.is_err());
        check_stopped(&signal.task_ended).unwrap();

        let ended = tokio::spawn(async {});
        let signal = stop_signal(&[running, ended]);
        tokio::time::timeout(Duration::from_secs(5), signal.stopped).await.expect("stopped when a task ended");
        let error = check_stopped(&signal.task_ended).unwrap_err().to_string();
        assert!(error.contains("stopped on an error"), "{error}");
    }
}
