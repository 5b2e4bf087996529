//! The `kassa` binary: configuration, telemetry, signals and wiring. Nothing else.

mod bench_cmd;
mod config;
mod kafka_cmd;
mod log_cmd;
mod merchant_cmd;
mod service_cmd;
mod sim_cmd;
mod up;
mod wiring;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;

/// mimalloc instead of the system allocator: the pipeline allocates and frees
/// many small buffers across threads, where glibc's malloc spent ~17% of the
/// CPU (BENCHMARKS.md). Built without its requests for transparent huge pages
/// (feature `no_thp`): the kernel zeroed a whole 2 MiB page on the first touch
/// of each, ~5% of the pipeline's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "kassa", version, about = "Kassa: an event-sourced payment transaction engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run Kassa: the services in one process over the embedded durable bus (or a Kafka
    /// cluster with `--bus kafka`), three simulated acquirers, and the payments API.
    Up(up::UpArgs),
    /// Inspect and verify a service's event log.
    #[command(subcommand)]
    Log(log_cmd::LogCommand),
    /// Pipeline benchmark: payments through all four services, in process, durable logs.
    Bench(bench_cmd::BenchArgs),
    /// Manage merchants (works whether or not `kassa up` runs on the data directory).
    #[command(subcommand)]
    Merchant(merchant_cmd::MerchantCommand),
    /// One simulated acquirer as its own process, speaking the provider HTTP protocol.
    ProviderSim(sim_cmd::SimArgs),
    /// The ingest service alone (the payments API), over Kafka.
    Ingest(service_cmd::ServiceArgs),
    /// The authorization service alone (provider calls, routing), over Kafka.
    Authorize(service_cmd::ServiceArgs),
    /// The settlement batching service alone, over Kafka.
    Settle(service_cmd::ServiceArgs),
    /// The reconciliation service alone, over Kafka.
    Reconcile(service_cmd::ServiceArgs),
    /// Kafka cluster chores (`init-topics`).
    #[command(subcommand)]
    Kafka(kafka_cmd::KafkaCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KASSA_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Up(args) => up::run(args),
        Command::Log(command) => log_cmd::run(command),
        Command::Merchant(command) => merchant_cmd::run(command),
        Command::Bench(args) => bench_cmd::run(args),
        Command::ProviderSim(args) => sim_cmd::run(args),
        Command::Kafka(command) => kafka_cmd::run(command),
        Command::Ingest(args) => service_cmd::run(service_cmd::Service::Ingest, args),
        Command::Authorize(args) => service_cmd::run(service_cmd::Service::Authorize, args),
        Command::Settle(args) => service_cmd::run(service_cmd::Service::Settle, args),
        Command::Reconcile(args) => service_cmd::run(service_cmd::Service::Reconcile, args),
    }
}
