//! `kassa up --config FILE`: a TOML file for what flags do not cover.
//! Flags and environment variables win over the file; the file wins over
//! defaults. Unknown keys are refused, so a typo is an error, not a silent default.

use anyhow::Context;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// Close open settlement batches this often (seconds; 0: only when asked).
    pub cutoff_interval_s: Option<u64>,
    /// How long a payment request waits for its outcome before answering 202 (ms).
    pub outcome_wait_ms: Option<u64>,
    /// Deadline of one provider call (ms).
    pub provider_timeout_ms: Option<u64>,
    /// Simulated acquirers, in routing priority order (default: acq-alpha, acq-beta, acq-gamma).
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
}

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
        if let Some(wait) = self.outcome_wait_ms {
            anyhow::ensure!(wait <= 60_000, "outcome_wait_ms {wait} is over a minute");
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
            })
            .collect()
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
            ("listen = [", "listen"),
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        assert_eq!(parse("").unwrap().providers().len(), 3);
    }
}
