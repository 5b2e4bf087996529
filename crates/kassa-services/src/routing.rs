//! The routing engine: the live state the pure routing policy reads.
//!
//! It holds, per provider, the health window, the circuit breaker and the
//! maintenance calendar, plus the rule set, the risk checks and their
//! velocity counters. `decide` snapshots all of it into a
//! [`RoutingInput`] and calls [`route`]; the caller records input and decision
//! as one event. Health changes (breaker transitions, maintenance starting and
//! ending) come out of [`RoutingEngine::take_health_changes`] for the
//! authorization service to record on each provider's health stream.
//!
//! Shared by every authorization partition behind one mutex: each call holds
//! it for a few microseconds.

use kassa_domain::routing::breaker::{Breaker, BreakerConfig, BreakerState};
use kassa_domain::routing::decline::RetryCounter;
use kassa_domain::routing::health::{HealthSnapshot, HealthWindow, OutcomeClass, WindowConfig};
use kassa_domain::routing::maintenance::{MaintenanceConfig, MaintenanceStatus, MaintenanceWindow, maintenance_share};
use kassa_domain::routing::risk::{RiskChecks, RiskConfig, RiskSignals, VelocityCounter};
use kassa_domain::routing::{
    BinTable, PaymentFacts, ProviderView, RoutingDecision, RoutingInput, RoutingOutcome, RuleSet, StandInInput, route,
};
use kassa_domain::{CardBrand, CardToken, Currency, MerchantId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Everything routing is configured with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSettings {
    pub rules: RuleSet,
    pub breaker: BreakerConfig,
    pub health_window: WindowConfig,
    pub maintenance: MaintenanceConfig,
    /// One-off maintenance windows per provider.
    pub maintenance_windows: BTreeMap<String, Vec<MaintenanceWindow>>,
    pub risk: RiskConfig,
    /// Issuing country by BIN prefix.
    pub bin_countries: BTreeMap<String, String>,
    /// Stand-in limits: off unless configured.
    pub stand_in: StandInSettings,
}

/// A merchant's stand-in limits, in minor units of the payment's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandInLimits {
    pub per_payment_max_minor: i64,
    /// Stand-in payments not yet confirmed or overturned, per merchant and currency.
    pub exposure_max_minor: i64,
}

/// Who may be authorized by stand-in: every merchant (`default`) or the ones named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandInSettings {
    pub default: Option<StandInLimits>,
    /// By merchant id (`mer_…`); wins over `default`.
    pub merchants: BTreeMap<String, StandInLimits>,
}

/// What `GET /admin/providers` shows per provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderStatus {
    pub name: String,
    pub breaker: BreakerState,
    pub maintenance: MaintenanceStatus,
    pub share_bp: u32,
    pub health: HealthSnapshot,
    /// Share of the payments routed in the health window that went to this provider.
    pub traffic_share_bp: u32,
    pub upcoming_maintenance: Vec<MaintenanceWindow>,
}

/// A change of a provider's health, recorded on its health stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChange {
    pub provider: String,
    /// `breaker_open`, `breaker_half_open`, `breaker_ramping`, `breaker_closed`,
    /// `maintenance_draining`, `maintenance_started`, `maintenance_ramping`,
    /// `maintenance_ended`, `maintenance_scheduled`.
    pub change: String,
    pub at_ms: i64,
    pub reason: String,
}

#[derive(Debug)]
struct ProviderState {
    window: HealthWindow,
    routed: HealthWindow,
    breaker: Breaker,
    maintenance: Vec<MaintenanceWindow>,
    maintenance_status: MaintenanceStatus,
}

#[derive(Debug)]
struct State {
    rules: Arc<RuleSet>,
    providers: BTreeMap<String, ProviderState>,
    risk: RiskChecks,
    card_velocity: Option<VelocityCounter>,
    merchant_velocity: Option<VelocityCounter>,
    retries: RetryCounter,
    changes: Vec<HealthChange>,
    /// Stand-in amounts outstanding, by merchant and currency.
    exposure: BTreeMap<(MerchantId, Currency), i64>,
}

#[derive(Debug)]
pub struct RoutingEngine {
    settings: RoutingSettings,
    bins: BinTable,
    provider_names: Vec<String>,
    state: Mutex<State>,
}

/// Keys kept per velocity counter and cards kept for retry limits, at most.
const VELOCITY_KEYS_MAX: usize = 200_000;

impl RoutingEngine {
    /// Check the settings against the providers that exist. Errors name the setting.
    pub fn new(settings: RoutingSettings, provider_names: &[String]) -> Result<Self, String> {
        let mut settings = settings;
        if settings.rules.fallback.is_empty() && settings.rules.rules.is_empty() {
            // No rules configured: every provider, in the order given.
            settings.rules.fallback = provider_names
                .iter()
                .enumerate()
                .map(|(i, name)| kassa_domain::routing::Candidate {
                    provider: name.clone(),
                    priority: i as u32,
                    weight: 1,
                    cost_bp: 0,
                })
                .collect();
        }
        let names: Vec<&str> = provider_names.iter().map(String::as_str).collect();
        settings.rules.validate(&names)?;
        for (provider, windows) in &settings.maintenance_windows {
            if !provider_names.contains(provider) {
                return Err(format!("routing.maintenance_windows: unknown provider {provider:?}"));
            }
            for w in windows {
                check_window(w)?;
            }
        }
        for (prefix, country) in &settings.bin_countries {
            if prefix.is_empty() || prefix.len() > 8 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("routing.bin_countries: {prefix:?} is not a BIN prefix (1 to 8 digits)"));
            }
            if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("routing.bin_countries.{prefix}: {country:?} is not an ISO 3166 alpha-2 code"));
            }
        }
        let limits = settings.stand_in.default.iter().chain(settings.stand_in.merchants.values());
        for l in limits {
            if l.per_payment_max_minor <= 0 || l.exposure_max_minor < l.per_payment_max_minor {
                return Err(format!(
                    "routing.stand_in: per_payment_max_minor must be positive and at most exposure_max_minor (got {} and {})",
                    l.per_payment_max_minor, l.exposure_max_minor
                ));
            }
        }
        for merchant in settings.stand_in.merchants.keys() {
            if merchant.parse::<MerchantId>().is_err() {
                return Err(format!("routing.stand_in.merchants: {merchant:?} is not a merchant id (mer_…)"));
            }
        }
        if settings.breaker.min_calls == 0 || settings.breaker.open_ms <= 0 || settings.breaker.window_ms <= 0 {
            return Err("routing.breaker: min_calls, open_ms and window_ms must be positive".into());
        }
        if settings.breaker.failure_rate_open_bp > 10_000 || settings.breaker.probe_share_bp > 10_000 {
            return Err("routing.breaker: rates and shares are basis points, at most 10000".into());
        }
        let risk = settings.risk.build()?;
        let providers = provider_names
            .iter()
            .map(|name| {
                let state = ProviderState {
                    window: HealthWindow::new(settings.health_window),
                    routed: HealthWindow::new(settings.health_window),
                    breaker: Breaker::new(settings.breaker),
                    maintenance: settings.maintenance_windows.get(name).cloned().unwrap_or_default(),
                    maintenance_status: MaintenanceStatus::None,
                };
                (name.clone(), state)
            })
            .collect();
        let state = State {
            rules: Arc::new(settings.rules.clone()),
            providers,
            card_velocity: risk.card_velocity_window_ms.map(|w| VelocityCounter::new(w, VELOCITY_KEYS_MAX)),
            merchant_velocity: risk.merchant_velocity_window_ms.map(|w| VelocityCounter::new(w, VELOCITY_KEYS_MAX)),
            risk,
            retries: RetryCounter::new(VELOCITY_KEYS_MAX),
            changes: Vec::new(),
            exposure: BTreeMap::new(),
        };
        let bins = BinTable { prefixes: settings.bin_countries.clone() };
        Ok(RoutingEngine { settings, bins, provider_names: provider_names.to_vec(), state: Mutex::new(state) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few plain assignments: a panicked holder leaves nothing half-done worth refusing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bin_country(&self, bin: &str) -> Option<String> {
        self.bins.country(bin).map(str::to_owned)
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        Arc::clone(&self.lock().rules)
    }

    /// Check a rule set against the providers and give it a version above the
    /// current one. Nothing changes until [`RoutingEngine::install_rules`].
    pub fn prepare_rules(&self, mut rules: RuleSet) -> Result<RuleSet, String> {
        let names: Vec<&str> = self.provider_names.iter().map(String::as_str).collect();
        rules.validate(&names)?;
        let current = self.lock().rules.version;
        if rules.version <= current {
            rules.version = current + 1;
        }
        Ok(rules)
    }

    /// Put a prepared rule set in force for the next decision (an older version than the one in force is ignored).
    pub fn install_rules(&self, rules: RuleSet) {
        let mut state = self.lock();
        if rules.version > state.rules.version {
            state.rules = Arc::new(rules);
        }
    }

    /// Check, version and install in one step (rules from the configuration or storage).
    pub fn set_rules(&self, rules: RuleSet) -> Result<u64, String> {
        let rules = self.prepare_rules(rules)?;
        let version = rules.version;
        self.install_rules(rules);
        Ok(version)
    }

    /// Add a maintenance window to a provider's calendar.
    pub fn add_maintenance(&self, provider: &str, window: MaintenanceWindow, now: Timestamp) -> Result<(), String> {
        check_window(&window)?;
        let mut state = self.lock();
        let Some(p) = state.providers.get_mut(provider) else {
            return Err(format!("unknown provider {provider:?}"));
        };
        p.maintenance.retain(|w| w.end_ms + self.settings.maintenance.ramp_ms > now.unix_ms());
        p.maintenance.push(window.clone());
        p.maintenance.sort_by_key(|w| w.start_ms);
        state.changes.push(HealthChange {
            provider: provider.to_owned(),
            change: "maintenance_scheduled".into(),
            at_ms: now.unix_ms(),
            reason: format!("{} from {} to {}", window.reason, Timestamp(window.start_ms), Timestamp(window.end_ms)),
        });
        Ok(())
    }

    fn view(&self, name: &str, p: &ProviderState, now: Timestamp) -> ProviderView {
        let (maintenance_share_bp, maintenance) = maintenance_share(&p.maintenance, self.settings.maintenance, now);
        let share_bp = p.breaker.share_bp(now).min(maintenance_share_bp);
        let available_again_ms = (share_bp == 0).then(|| match maintenance {
            MaintenanceStatus::InMaintenance { ends_ms } => ends_ms,
            _ => p.breaker.next_probe_ms().unwrap_or(now.unix_ms() + 5_000),
        });
        ProviderView {
            name: name.to_owned(),
            share_bp,
            breaker: p.breaker.state(),
            maintenance,
            health: p.window.snapshot(now),
            available_again_ms,
        }
    }

    fn stand_in_limits(&self, merchant_id: MerchantId) -> Option<StandInLimits> {
        let merchants = &self.settings.stand_in.merchants;
        merchants.get(&merchant_id.to_string()).copied().or(self.settings.stand_in.default)
    }

    /// A stand-in authorization no longer outstanding (confirmed or overturned).
    pub fn release_stand_in(&self, merchant_id: MerchantId, amount: kassa_domain::Money) {
        let mut state = self.lock();
        if let Some(exposure) = state.exposure.get_mut(&(merchant_id, amount.currency)) {
            *exposure = (*exposure - amount.minor).max(0);
        }
    }

    /// Count a stand-in authorization found outstanding at start-up.
    pub fn restore_stand_in(&self, merchant_id: MerchantId, amount: kassa_domain::Money) {
        *self.lock().exposure.entry((merchant_id, amount.currency)).or_default() += amount.minor;
    }

    /// Decide where a payment's next attempt goes. Risk checks run on the
    /// first decision only, and count the payment for velocity. `forwarding`:
    /// the payment was authorized by stand-in and is being forwarded (no stand-in again).
    pub fn decide(
        &self,
        facts: PaymentFacts,
        tried: Vec<String>,
        forwarding: bool,
        now: Timestamp,
    ) -> (RoutingInput, RoutingDecision) {
        let mut state = self.lock();
        self.tick_locked(&mut state, now);
        let first = tried.is_empty() && !forwarding;
        let risk = if first {
            let now_ms = now.unix_ms();
            let card_key = u128::from_be_bytes(facts.card_token.0);
            let merchant_key = facts.merchant_id.as_u128();
            let signals = RiskSignals {
                card_payments_in_window: state.card_velocity.as_ref().map_or(0, |v| v.count(card_key, now_ms)),
                merchant_payments_in_window: state
                    .merchant_velocity
                    .as_ref()
                    .map_or(0, |v| v.count(merchant_key, now_ms)),
            };
            if let Some(v) = state.card_velocity.as_mut() {
                v.record(card_key, now_ms);
            }
            if let Some(v) = state.merchant_velocity.as_mut() {
                v.record(merchant_key, now_ms);
            }
            state.risk.assess(&facts, &signals)
        } else {
            Vec::new()
        };
        let rules = Arc::clone(&state.rules);
        let (rule, candidates) = rules.select(&facts);
        let providers = candidates
            .iter()
            .filter_map(|c| state.providers.get(&c.provider).map(|p| self.view(&c.provider, p, now)))
            .collect();
        let exposure_key = (facts.merchant_id, facts.amount.currency);
        let stand_in = match self.stand_in_limits(facts.merchant_id) {
            Some(limits) if !forwarding => StandInInput {
                enabled: true,
                per_payment_max_minor: limits.per_payment_max_minor,
                exposure_max_minor: limits.exposure_max_minor,
                exposure_minor: state.exposure.get(&exposure_key).copied().unwrap_or(0),
            },
            _ => StandInInput::default(),
        };
        let input = RoutingInput {
            facts,
            rule_set_version: rules.version,
            rule: rule.map(str::to_owned),
            candidates: candidates.to_vec(),
            providers,
            tried,
            risk,
            stand_in,
            now_ms: now.unix_ms(),
        };
        let decision = route(&input);
        if decision.outcome == RoutingOutcome::StandIn {
            *state.exposure.entry(exposure_key).or_default() += input.facts.amount.minor;
        }
        if let RoutingOutcome::Route { provider, .. } = &decision.outcome
            && let Some(p) = state.providers.get_mut(provider)
        {
            p.routed.record(now, OutcomeClass::Approved, 0);
        }
        (input, decision)
    }

    /// Count one authorization call's outcome for the provider's health and breaker.
    pub fn record_call(&self, provider: &str, class: OutcomeClass, latency_ms: u32, now: Timestamp) {
        let mut state = self.lock();
        let Some(p) = state.providers.get_mut(provider) else { return };
        p.window.record(now, class, latency_ms);
        // Time first (open → half-open), then the outcome in the state that leaves: both are recorded.
        let transitions = [p.breaker.tick(now), p.breaker.on_result(now, class)];
        for transition in transitions.into_iter().flatten() {
            let change = breaker_change(provider, &transition);
            tracing::warn!(provider, change = %change.change, reason = %change.reason, "provider breaker changed");
            state.changes.push(change);
        }
    }

    /// Whether the scheme rules allow one more reattempt of this card; counts it if so.
    pub fn allow_retry(&self, card: CardToken, brand: CardBrand, now: Timestamp) -> bool {
        let mut state = self.lock();
        if state.retries.allows(&card, brand, now.unix_ms()) {
            state.retries.record(card, brand, now.unix_ms());
            true
        } else {
            false
        }
    }

    fn tick_locked(&self, state: &mut State, now: Timestamp) {
        let mut changes = Vec::new();
        for (name, p) in state.providers.iter_mut() {
            if let Some(transition) = p.breaker.tick(now) {
                changes.push(breaker_change(name, &transition));
            }
            let (_, status) = maintenance_share(&p.maintenance, self.settings.maintenance, now);
            if status.name() != p.maintenance_status.name() {
                let change = match status {
                    MaintenanceStatus::None => "maintenance_ended",
                    MaintenanceStatus::Draining { .. } => "maintenance_draining",
                    MaintenanceStatus::InMaintenance { .. } => "maintenance_started",
                    MaintenanceStatus::Ramping { .. } => "maintenance_ramping",
                };
                changes.push(HealthChange {
                    provider: name.clone(),
                    change: change.into(),
                    at_ms: now.unix_ms(),
                    reason: format!("{} → {}", p.maintenance_status.name(), status.name()),
                });
                p.maintenance_status = status;
            }
        }
        state.changes.extend(changes);
    }

    /// Let time-driven changes happen (breakers half-opening, maintenance starting).
    pub fn tick(&self, now: Timestamp) {
        let mut state = self.lock();
        self.tick_locked(&mut state, now);
    }

    /// Health changes since the last call, oldest first.
    pub fn take_health_changes(&self) -> Vec<HealthChange> {
        std::mem::take(&mut self.lock().changes)
    }

    /// Every provider's status, for operators.
    pub fn status(&self, now: Timestamp) -> Vec<ProviderStatus> {
        let state = self.lock();
        let routed_total: u32 = state.providers.values().map(|p| p.routed.snapshot(now).calls).sum();
        state
            .providers
            .iter()
            .map(|(name, p)| {
                let view = self.view(name, p, now);
                let routed = p.routed.snapshot(now).calls;
                ProviderStatus {
                    name: name.clone(),
                    breaker: view.breaker,
                    maintenance: view.maintenance,
                    share_bp: view.share_bp,
                    health: view.health,
                    traffic_share_bp: if routed_total == 0 {
                        0
                    } else {
                        (u64::from(routed) * 10_000 / u64::from(routed_total)) as u32
                    },
                    upcoming_maintenance: p.maintenance.iter().filter(|w| w.end_ms > now.unix_ms()).cloned().collect(),
                }
            })
            .collect()
    }
}

fn check_window(w: &MaintenanceWindow) -> Result<(), String> {
    if w.end_ms <= w.start_ms {
        return Err(format!(
            "maintenance window: end {} is not after start {}",
            Timestamp(w.end_ms),
            Timestamp(w.start_ms)
        ));
    }
    if w.end_ms - w.start_ms > 7 * 86_400_000 {
        return Err("maintenance window: longer than 7 days".into());
    }
    if w.reason.len() > 500 {
        return Err("maintenance window: reason is over 500 bytes".into());
    }
    Ok(())
}

fn breaker_change(provider: &str, transition: &kassa_domain::routing::breaker::BreakerTransition) -> HealthChange {
    HealthChange {
        provider: provider.to_owned(),
        change: format!("breaker_{}", transition.to.name()),
        at_ms: transition.at_ms,
        reason: transition.reason.clone(),
    }
}
