//! `kassa provider-sim`: one simulated acquirer as its own process, speaking
//! the provider HTTP protocol, with its fault-injection control API.

use anyhow::Context;
use clap::Args;
use kassa_providers::http_sim::{control_router, protocol_router, serve};
use kassa_providers::{SimulatedAcquirer, SimulatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct SimArgs {
    /// The provider's name (what routing rules and `/sim/{name}/…` call it).
    #[arg(long)]
    pub name: String,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,
    /// Address of the control API (`/sim/{name}/faults`, `/sim/{name}/ledger`). It has its
    /// own port so that it still answers while the provider is `down` (its port closed).
    #[arg(long, default_value = "127.0.0.1:7201")]
    pub control_listen: SocketAddr,
    /// File holding the operator token for `/sim/{name}/faults` and `/sim/{name}/ledger`
    /// (e.g. the `admin.token` a `kassa up` wrote). Without it a token is made and printed.
    #[arg(long, env = "KASSA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    #[arg(long, default_value_t = 15)]
    pub latency_ms_min: u64,
    #[arg(long, default_value_t = 60)]
    pub latency_ms_max: u64,
    /// Seed of the latency generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the ledger (what it authorized, declined, captured, refunded, reversed) in this file, so a
    /// restarted simulator still reports and answers for it. Without it the ledger lives in
    /// memory only.
    #[arg(long)]
    pub journal: Option<PathBuf>,
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.name.is_empty() && args.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--name {:?} must be letters, digits, '-' or '_'",
        args.name
    );
    anyhow::ensure!(args.latency_ms_min <= args.latency_ms_max, "--latency-ms-min is above --latency-ms-max");
    let token = match &args.admin_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let token = text.trim().to_owned();
            anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
            token
        }
        None => {
            let token = format!("at_{}", hex::encode(rand::random::<[u8; 20]>()));
            println!("operator token for /sim/{}/…: {token}", args.name);
            token
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        let config = SimulatorConfig {
            latency_ms_min: args.latency_ms_min,
            latency_ms_max: args.latency_ms_max,
            seed: args.seed,
        };
        let sim = SimulatedAcquirer::new(args.name.clone(), config);
        let sim = match &args.journal {
            Some(path) => sim.with_journal(path).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => sim,
        };
        let sim = Arc::new(sim);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}; is something else there?", args.listen))?;
        let control = tokio::net::TcpListener::bind(args.control_listen)
            .await
            .with_context(|| format!("binding {}; is something else there?", args.control_listen))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        println!(
            "provider simulator {} on http://{} (control API on http://{})",
            args.name,
            listener.local_addr()?,
            control.local_addr()?
        );
        let control_app = control_router(vec![Arc::clone(&sim)], &token)
            .method_not_allowed_fallback(kassa_services::http::method_not_allowed);
        let mut stop_control = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_control.changed().await;
            };
            if let Err(error) = axum::serve(control, control_app).with_graceful_shutdown(shutdown).await {
                tracing::error!(%error, "control API stopped");
            }
        });
        let router = protocol_router(Arc::clone(&sim));
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop_tx.send(true);
        });
        serve(sim, listener, router, stop_rx).await.context("serving")?;
        anyhow::Ok(())
    })
}
