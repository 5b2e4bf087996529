//! `kassa up`: every service in one process over the embedded log.
//!
//! Today this opens the per-service event logs and the embedded bus, checks
//! them, and serves the health endpoint; the services themselves and the
//! payments API are wired in here as they land (see the issues).

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Args;
use kassa_bus::{BusConfig, EmbeddedBus, TopicSpec};
use kassa_eventlog::{EventLog, LogConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// The services, each with its own event log under the data directory.
pub const SERVICES: [&str; 4] = ["ingest", "authorization", "settlement", "reconciliation"];

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where all state lives (event logs and the bus). Created if missing.
    #[arg(long, default_value = "./kassa-data", env = "KASSA_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address the HTTP API listens on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "KASSA_LISTEN")]
    pub listen: SocketAddr,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let mut logs = Vec::new();
    for service in SERVICES {
        let path = args.data_dir.join(service);
        let log = EventLog::open(&path, LogConfig::default())
            .with_context(|| format!("opening the {service} event log at {}", path.display()))?;
        tracing::info!(service, path = %path.display(), head = log.head_position(), "event log open");
        logs.push(Arc::new(log));
    }
    let topics = vec![
        TopicSpec::new("payments.commands", 8),
        TopicSpec::new("payments.events", 8),
        TopicSpec::new("settlement.events", 4),
    ];
    let bus_path = args.data_dir.join("bus");
    let bus = EmbeddedBus::open(&bus_path, BusConfig::new(topics))
        .with_context(|| format!("opening the embedded bus at {}", bus_path.display()))?;
    let bus = Arc::new(bus);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kassa-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let app = Router::new().route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}; is another kassa running there?", args.listen))?;
        tracing::info!(listen = %args.listen, data_dir = %args.data_dir.display(), "kassa is up");
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.context("serving HTTP")?;
        tracing::info!("shutting down: flushing event logs");
        drop(bus);
        drop(logs);
        anyhow::Ok(())
    })
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
