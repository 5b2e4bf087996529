//! `kassa up --config FILE`: a TOML file for what flags do not cover.
//! Flags and environment variables win over the file; the file wins over
//! defaults. Unknown keys are refused, so a typo is an error, not a silent default.

use anyhow::Context;
use kassa_domain::Timestamp;
use kassa_domain::routing::maintenance::MaintenanceWindow;
use kassa_services::routing::RoutingSettings;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// Close open settlement batches at the start of every slot of this many seconds from the Unix epoch (0: only when asked).
    pub cutoff_interval_s: Option<u64>,
    /// How long a payment request waits for its outcome before answering 202 (ms).
    pub outcome_wait_ms: Option<u64>,
    /// How long a request with an Idempotency-Key waits to learn whether its key
    /// was free (another ingest instance may hold it) before answering 202 (ms). [default: 5000]
    pub claim_wait_ms: Option<u64>,
    /// Deadline of one provider call (ms).
    pub provider_timeout_ms: Option<u64>,
    /// Accepted requests not yet passed on to the bus, at most; past it new
    /// requests get 503 with Retry-After. [default: 200000]
    pub outbox_events_max: Option<u64>,
    /// Providers, in default routing priority order (default: three simulated
    /// acquirers, acq-alpha, acq-beta, acq-gamma).
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// How `kassa up` reaches the simulated acquirers it runs: `http` (default: on
    /// loopback ports, over the provider protocol, like a real provider) or
    /// `in_process` (direct calls: no HTTP cost, for measuring Kassa alone).
    pub simulator_transport: Option<SimulatorTransport>,
    /// Routing rules, breaker thresholds, health windows, risk checks, BIN countries.
    pub routing: Option<RoutingSettings>,
    /// Maintenance windows: one-off (`start`, `end`) or weekly (`days`, `at`,
    /// `duration_min`, `time_zone`).
    #[serde(default)]
    pub maintenance: Vec<MaintenanceConfig>,
    /// The Kafka cluster, for `--bus kafka` and `kassa kafka …`.
    pub kafka: Option<KafkaSettings>,
}

/// `[kafka]`: how to reach the cluster. Flags win over it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: Option<String>,
    /// librdkafka properties passed through (`security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`, `ssl.ca.location`, …).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Replicas of each topic `kassa kafka init-topics` creates. [default: 1]
    pub replication_factor: Option<i32>,
    /// Create missing topics when `kassa up --bus kafka` starts. [default: false]
    pub create_topics: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulatorTransport {
    #[default]
    Http,
    InProcess,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    pub provider: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// One-off: RFC 3339 date-times.
    pub start: Option<String>,
    pub end: Option<String>,
    /// Weekly: days (`mon` … `sun`), local start time `HH:MM`, length, IANA time zone.
    #[serde(default)]
    pub days: Vec<String>,
    pub at: Option<String>,
    pub duration_min: Option<u32>,
    pub time_zone: Option<String>,
}

/// Weekly windows are expanded this far ahead at start-up.
const WEEKLY_HORIZON_DAYS: i64 = 84;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    #[serde(default = "default_latency_min")]
    pub latency_ms_min: u64,
    #[serde(default = "default_latency_max")]
    pub latency_ms_max: u64,
    /// Fee per capture: basis points of the amount, plus a fixed amount in minor units.
    #[serde(default = "default_fee_bp")]
    pub fee_basis_points: u32,
    #[serde(default = "default_fee_fixed")]
    pub fee_fixed_minor: i64,
    /// Where the provider speaks the provider HTTP protocol (e.g. a `kassa
    /// provider-sim`). Without it, `kassa up` serves a simulated acquirer itself.
    pub url: Option<String>,
}

fn default_latency_min() -> u64 {
    15
}
fn default_latency_max() -> u64 {
    60
}
fn default_fee_bp() -> u32 {
    290
}
fn default_fee_fixed() -> i64 {
    25
}

impl Config {
    /// Read and check a config file; errors name the file, the line and the key.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        config.check().with_context(|| format!("config file {}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for provider in &self.providers {
            anyhow::ensure!(
                !provider.name.is_empty()
                    && provider.name.len() <= 64
                    && provider.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "provider name {:?} must be 1 to 64 letters, digits, '-' or '_'",
                provider.name
            );
            anyhow::ensure!(names.insert(provider.name.clone()), "provider {:?} is listed twice", provider.name);
            anyhow::ensure!(
                provider.latency_ms_min <= provider.latency_ms_max,
                "provider {:?}: latency_ms_min {} is above latency_ms_max {}",
                provider.name,
                provider.latency_ms_min,
                provider.latency_ms_max
            );
            anyhow::ensure!(
                provider.fee_basis_points <= 10_000,
                "provider {:?}: fee_basis_points is over 100%",
                provider.name
            );
            anyhow::ensure!(provider.fee_fixed_minor >= 0, "provider {:?}: fee_fixed_minor is negative", provider.name);
        }
        for provider in &self.providers {
            if let Some(url) = &provider.url {
                anyhow::ensure!(
                    url.starts_with("http://") || url.starts_with("https://"),
                    "provider {:?}: url {url:?} must start with http:// or https://",
                    provider.name
                );
            }
        }
        let names: Vec<String> = self.providers().iter().map(|p| p.name.clone()).collect();
        for m in &self.maintenance {
            anyhow::ensure!(names.contains(&m.provider), "maintenance: unknown provider {:?}", m.provider);
            m.windows(0).with_context(|| format!("maintenance for provider {:?}", m.provider))?;
        }
        kassa_services::routing::RoutingEngine::new(self.routing_settings()?, &names)
            .map_err(|e| anyhow::anyhow!("routing: {e}"))?;
        if let Some(wait) = self.outcome_wait_ms {
            anyhow::ensure!(wait <= 60_000, "outcome_wait_ms {wait} is over a minute");
        }
        if let Some(wait) = self.claim_wait_ms {
            anyhow::ensure!(wait <= 60_000, "claim_wait_ms {wait} is over a minute");
        }
        if let Some(max) = self.outbox_events_max {
            anyhow::ensure!(max >= 1, "outbox_events_max must be at least 1");
        }
        if let Some(timeout) = self.provider_timeout_ms {
            anyhow::ensure!((1..=60_000).contains(&timeout), "provider_timeout_ms {timeout} must be 1 to 60000");
        }
        Ok(())
    }

    /// The providers to run: the file's, or the three defaults.
    pub fn providers(&self) -> Vec<ProviderConfig> {
        if !self.providers.is_empty() {
            return self.providers.clone();
        }
        crate::up::PROVIDERS
            .iter()
            .map(|name| ProviderConfig {
                name: (*name).to_owned(),
                latency_ms_min: default_latency_min(),
                latency_ms_max: default_latency_max(),
                fee_basis_points: default_fee_bp(),
                fee_fixed_minor: default_fee_fixed(),
                url: None,
            })
            .collect()
    }

    /// Routing settings with the maintenance calendar expanded into windows.
    pub fn routing_settings(&self) -> anyhow::Result<RoutingSettings> {
        let mut settings = self.routing.clone().unwrap_or_default();
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for m in &self.maintenance {
            let windows = m.windows(now_ms).with_context(|| format!("maintenance for provider {:?}", m.provider))?;
            settings.maintenance_windows.entry(m.provider.clone()).or_default().extend(windows);
        }
        Ok(settings)
    }
}

impl MaintenanceConfig {
    /// The concrete UTC windows this entry stands for (weekly ones up to the horizon).
    fn windows(&self, now_ms: i64) -> anyhow::Result<Vec<MaintenanceWindow>> {
        let reason = self.reason.clone().unwrap_or_else(|| "maintenance".into());
        match (&self.start, &self.end, self.at.as_ref()) {
            (Some(start), Some(end), None) => {
                anyhow::ensure!(
                    self.days.is_empty() && self.time_zone.is_none() && self.duration_min.is_none(),
                    "a one-off window has start and end only; days, at, duration_min and time_zone are for weekly ones"
                );
                let start = Timestamp::parse_rfc3339(start).map_err(|e| anyhow::anyhow!("start: {e}"))?;
                let end = Timestamp::parse_rfc3339(end).map_err(|e| anyhow::anyhow!("end: {e}"))?;
                anyhow::ensure!(end > start, "end {end} is not after start {start}");
                Ok(vec![MaintenanceWindow { start_ms: start.unix_ms(), end_ms: end.unix_ms(), reason }])
            }
            (None, None, Some(at)) => {
                let zone = self.time_zone.as_deref().unwrap_or("UTC");
                let tz = jiff::tz::TimeZone::get(zone)
                    .map_err(|_| anyhow::anyhow!("time_zone {zone:?} is not an IANA time zone (e.g. Europe/Berlin)"))?;
                let (hour, minute) = at
                    .split_once(':')
                    .and_then(|(h, m)| Some((h.parse::<i8>().ok()?, m.parse::<i8>().ok()?)))
                    .filter(|(h, m)| (0..24).contains(h) && (0..60).contains(m))
                    .ok_or_else(|| anyhow::anyhow!("at {at:?} is not a time HH:MM"))?;
                let minutes = self.duration_min.ok_or_else(|| anyhow::anyhow!("a weekly window needs duration_min"))?;
                anyhow::ensure!((1..=7 * 24 * 60).contains(&minutes), "duration_min {minutes} must be 1 to 10080");
                anyhow::ensure!(!self.days.is_empty(), "a weekly window needs days (mon … sun)");
                let mut weekdays = Vec::new();
                for day in &self.days {
                    weekdays.push(match day.as_str() {
                        "mon" => jiff::civil::Weekday::Monday,
                        "tue" => jiff::civil::Weekday::Tuesday,
                        "wed" => jiff::civil::Weekday::Wednesday,
                        "thu" => jiff::civil::Weekday::Thursday,
                        "fri" => jiff::civil::Weekday::Friday,
                        "sat" => jiff::civil::Weekday::Saturday,
                        "sun" => jiff::civil::Weekday::Sunday,
                        other => anyhow::bail!("day {other:?} is not one of mon, tue, wed, thu, fri, sat, sun"),
                    });
                }
                let today = jiff::Timestamp::from_millisecond(now_ms)?.to_zoned(tz.clone()).date();
                let mut windows = Vec::new();
                // From yesterday, so a window that began before start-up and is still running counts.
                let mut date = today.yesterday()?;
                for _ in 0..=WEEKLY_HORIZON_DAYS {
                    if weekdays.contains(&date.weekday()) {
                        let start = date.at(hour, minute, 0, 0).to_zoned(tz.clone())?.timestamp().as_millisecond();
                        let end = start + i64::from(minutes) * 60_000;
                        if end > now_ms {
                            windows.push(MaintenanceWindow { start_ms: start, end_ms: end, reason: reason.clone() });
                        }
                    }
                    date = date.tomorrow()?;
                }
                Ok(windows)
            }
            _ => anyhow::bail!("give either start and end (one-off) or days, at, duration_min and time_zone (weekly)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn a_full_file_parses() {
        let config = parse(
            r#"
            listen = "127.0.0.1:9000"
            cutoff_interval_s = 0
            simulator_transport = "in_process"
            [[providers]]
            name = "acq-north"
            fee_basis_points = 150
            [[providers]]
            name = "acq-south"
            latency_ms_min = 1
            latency_ms_max = 2
            "#,
        )
        .unwrap();
        assert_eq!(config.listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(config.simulator_transport, Some(SimulatorTransport::InProcess));
        assert_eq!(config.providers().len(), 2);
        assert_eq!(config.providers()[0].fee_fixed_minor, 25);
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("lisen = \"127.0.0.1:1\"", "lisen"),
            ("listen = \"nowhere\"", "listen"),
            ("cutoff_interval_s = -1", "cutoff_interval_s"),
            ("[[providers]]\nname = \"a\"\n[[providers]]\nname = \"a\"", "twice"),
            ("[[providers]]\nname = \"a b\"", "must be"),
            ("[[providers]]\nname = \"a\"\nlatency_ms_min = 9\nlatency_ms_max = 1", "above"),
            ("[[providers]]\nname = \"a\"\nfee_basis_points = 20000", "100%"),
            ("provider_timeout_ms = 0", "provider_timeout_ms"),
            ("simulator_transport = \"carrier_pigeon\"", "in_process"),
            ("listen = [", "listen"),
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        assert_eq!(parse("").unwrap().providers().len(), 3);
    }

    #[test]
    fn routing_and_maintenance_parse_and_mistakes_are_named() {
        let config = parse(
            r#"
            [routing.rules]
            version = 4
            fallback = [{ provider = "acq-alpha" }, { provider = "acq-beta", priority = 1 }]
            [[routing.rules.rules]]
            name = "eur-split"
            when = { currencies = ["EUR"], amount_max_minor = 100000 }
            candidates = [{ provider = "acq-alpha", weight = 3 }, { provider = "acq-gamma", weight = 1 }]
            [routing.breaker]
            min_calls = 10
            [routing.risk]
            amount_max_minor = { EUR = 500000 }
            [routing.stand_in]
            default = { per_payment_max_minor = 5000, exposure_max_minor = 100000 }
            [[maintenance]]
            provider = "acq-beta"
            start = "2030-01-01T02:00:00Z"
            end = "2030-01-01T03:00:00Z"
            [[maintenance]]
            provider = "acq-gamma"
            days = ["sun"]
            at = "02:30"
            duration_min = 60
            time_zone = "Europe/Berlin"
            "#,
        )
        .unwrap();
        let settings = config.routing_settings().unwrap();
        assert_eq!(settings.rules.version, 4);
        assert_eq!(settings.maintenance_windows["acq-beta"].len(), 1);
        let weekly = &settings.maintenance_windows["acq-gamma"];
        assert!(weekly.len() >= 11, "12 weeks of Sundays: {}", weekly.len());
        // 02:30 in Berlin is 01:30 UTC in winter and 00:30 UTC in summer.
        for w in weekly {
            let minute_of_day = w.start_ms.rem_euclid(86_400_000) / 60_000;
            assert!(minute_of_day == 90 || minute_of_day == 30, "{}", Timestamp(w.start_ms));
            assert_eq!(w.end_ms - w.start_ms, 3_600_000);
        }
        for (text, says) in [
            ("[routing.rules]\nfallback = [{ provider = \"nobody\" }]", "nobody"),
            ("[routing.breaker]\nmin_calls = 0", "min_calls"),
            ("[routing.risk]\nblocked_bin_countries = [\"usa\"]", "alpha-2"),
            ("[routing]\ncolour = 1", "colour"),
            ("[routing.stand_in]\ndefault = { per_payment_max_minor = 500, exposure_max_minor = 100 }", "stand_in"),
            ("[routing.stand_in.merchants]\nacme = { per_payment_max_minor = 1, exposure_max_minor = 1 }", "acme"),
            (
                "[[maintenance]]\nprovider = \"acq-zeta\"\nstart = \"2030-01-01T02:00:00Z\"\nend = \"2030-01-01T03:00:00Z\"",
                "acq-zeta",
            ),
            (
                "[[maintenance]]\nprovider = \"acq-beta\"\nstart = \"yesterday\"\nend = \"2030-01-01T03:00:00Z\"",
                "RFC 3339",
            ),
            (
                "[[maintenance]]\nprovider = \"acq-beta\"\ndays = [\"sun\"]\nat = \"02:00\"\nduration_min = 5\ntime_zone = \"Mars/Olympus\"",
                "time_zone",
            ),
            (
                "[[maintenance]]\nprovider = \"acq-beta\"\ndays = [\"sunday\"]\nat = \"02:00\"\nduration_min = 5",
                "sunday",
            ),
            ("[[maintenance]]\nprovider = \"acq-beta\"\ndays = [\"sun\"]\nat = \"25:00\"\nduration_min = 5", "HH:MM"),
            ("[[providers]]\nname = \"a\"\nurl = \"ftp://x\"", "http://"),
        ] {
            let error = format!("{:#}", parse(text).expect_err(text));
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
