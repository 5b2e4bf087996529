//! Kafka: the flags that reach a cluster, and `kassa kafka init-topics`.

use crate::config::Config;
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kassa_bus::{KafkaConfig, TopicInit, TopicSpec};
use std::path::PathBuf;

/// Which bus the services talk through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum BusKind {
    /// A durable log in the data directory: one machine, nothing to install.
    #[default]
    Embedded,
    /// A Kafka cluster (`--brokers`): any Kafka-protocol broker.
    Kafka,
}

/// How to reach a Kafka cluster. Flags win over the config file's `[kafka]`.
#[derive(Args, Debug, Clone, Default)]
pub struct KafkaArgs {
    /// Kafka bootstrap brokers, `host:port[,host:port…]` (with `--bus kafka`).
    #[arg(long, env = "KASSA_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// A librdkafka property passed through, `KEY=VALUE` (repeat it): e.g.
    /// `security.protocol=SASL_SSL`, `sasl.mechanism=SCRAM-SHA-512`, `ssl.ca.location=/etc/ca.pem`.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
}

impl KafkaArgs {
    /// The cluster settings: flags, then the config file, then defaults.
    pub fn config(&self, file: &Config, topics: Vec<TopicSpec>) -> anyhow::Result<KafkaConfig> {
        let settings = file.kafka.clone().unwrap_or_default();
        let brokers = self.brokers.clone().or(settings.brokers).context(
            "no Kafka brokers: pass --brokers HOST:PORT (or KASSA_KAFKA_BROKERS, or `brokers` under [kafka] in the config file)",
        )?;
        anyhow::ensure!(
            !brokers.trim().is_empty() && brokers.split(',').all(|b| b.trim().rsplit_once(':').is_some()),
            "--brokers {brokers:?} must be HOST:PORT[,HOST:PORT…]"
        );
        let mut config = KafkaConfig::new(brokers, topics);
        config.properties = settings.properties;
        for property in &self.properties {
            let (key, value) =
                property.split_once('=').with_context(|| format!("--kafka-property {property:?} must be KEY=VALUE"))?;
            config.properties.insert(key.trim().to_owned(), value.trim().to_owned());
        }
        if let Some(replicas) = settings.replication_factor {
            anyhow::ensure!((1..=16).contains(&replicas), "[kafka] replication_factor {replicas} must be 1 to 16");
            config.replication_factor = replicas;
        }
        Ok(config)
    }
}

/// Connect to the cluster the flags and config name (creating the topics
/// first when the config says `create_topics = true`).
pub fn open_bus(args: &KafkaArgs, config: &Config) -> anyhow::Result<std::sync::Arc<dyn kassa_bus::Bus>> {
    open_bus_as(args, config, None)
}

/// [`open_bus`], naming this instance in its consumer groups (`group.instance.id`).
pub fn open_bus_as(
    args: &KafkaArgs,
    config: &Config,
    group_instance_id: Option<String>,
) -> anyhow::Result<std::sync::Arc<dyn kassa_bus::Bus>> {
    let mut kafka = args.config(config, crate::up::topics())?;
    kafka.group_instance_id = group_instance_id;
    if config.kafka.as_ref().and_then(|k| k.create_topics).unwrap_or(false) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        runtime.block_on(init_topics(&kafka))?;
    }
    let brokers = kafka.brokers.clone();
    let bus = kassa_bus::KafkaBus::open(kafka).with_context(|| {
        format!(
            "connecting to Kafka at {brokers} (create the topics with `kassa kafka init-topics --brokers {brokers}`)"
        )
    })?;
    tracing::info!(%brokers, "Kafka bus open");
    Ok(std::sync::Arc::new(bus))
}

#[derive(Subcommand, Debug)]
pub enum KafkaCommand {
    /// Create Kassa's topics on the cluster (partitions and replicas as configured).
    /// Topics that exist with the right partition count are left alone.
    InitTopics {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// The config file (for its `[kafka]` section).
        #[arg(long, env = "KASSA_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Each service's consumer lag: messages on its input topic it has not
    /// made durable yet, from the positions the services commit every second.
    Lag {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, env = "KASSA_CONFIG")]
        config: Option<PathBuf>,
        /// Print again every this many seconds, until stopped (0: once).
        #[arg(long, default_value_t = 0)]
        every_s: u64,
    },
}

/// One line per service: its group, input topic, and lag (never-committed partitions count from 0).
fn print_lag(config: &KafkaConfig) -> anyhow::Result<()> {
    let mut line = Vec::new();
    for (group, topic) in kassa_services::topics::CONSUMERS {
        let lags = kassa_bus::consumer_lag(config, group, topic)
            .with_context(|| format!("reading the lag of {group} on {}", config.brokers))?;
        let lag: u64 = lags.iter().map(|p| p.lag()).sum();
        let end: u64 = lags.iter().map(|p| p.end).sum();
        line.push(format!("{group} {topic} lag {lag} of {end}"));
    }
    println!("{}", line.join(" | "));
    Ok(())
}

/// Create the topics; say what was done.
pub async fn init_topics(config: &KafkaConfig) -> anyhow::Result<()> {
    let results = kassa_bus::init_topics(config)
        .await
        .with_context(|| format!("creating Kassa's topics on {}", config.brokers))?;
    for (topic, done) in results {
        let partitions = config.topics.iter().find(|t| t.name == topic).map_or(0, |t| t.partitions);
        let what = match done {
            TopicInit::Created => "created",
            TopicInit::Existed => "exists",
        };
        println!("{topic}: {what} ({partitions} partitions)");
    }
    Ok(())
}

pub fn run(command: KafkaCommand) -> anyhow::Result<()> {
    match command {
        KafkaCommand::InitTopics { kafka, config } => {
            let file = crate::wiring::load_config(config.as_deref())?;
            let config = kafka.config(&file, crate::up::topics())?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(init_topics(&config))
        }
        KafkaCommand::Lag { kafka, config, every_s } => {
            let file = crate::wiring::load_config(config.as_deref())?;
            let config = kafka.config(&file, crate::up::topics())?;
            loop {
                print_lag(&config)?;
                if every_s == 0 {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_secs(every_s));
            }
        }
    }
}
