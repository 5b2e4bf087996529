//! A simulated acquirer: outcomes by test card, latency from a seeded
//! generator, injectable faults, and a ledger of every authorization it holds
//! (which is what tests check for double charges).

use crate::journal::{Journal, JournalError, JournalOp};
use crate::{AttemptStatus, AuthorizeOutcome, AuthorizeRequest, Connector, ProviderError, ReportLine};
use async_trait::async_trait;
use kassa_domain::settlement::EntryKind;
use kassa_domain::{AttemptId, CaptureId, DeclineCategory, Money, PaymentId, RefundId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// A card that meets a processing error at the acquirer named `acq-alpha` only
/// (the first one tried without routing rules) and is approved by any other:
/// a failover that ends in an approval (documented in the README).
pub const FAILS_OVER_CARD: &str = "4000000000000127";

/// The acquirer [`FAILS_OVER_CARD`] fails at.
const FAILS_OVER_AT: &str = "acq-alpha";

/// How the simulator answers, by card number (documented in the README), at
/// any acquirer: [`FAILS_OVER_CARD`] depends on which one, and is not here.
pub fn test_card_outcome(pan_digits: &str) -> Result<AuthorizeOutcome, ProviderError> {
    match pan_digits {
        "4000000000000002" => Ok(AuthorizeOutcome::Declined {
            code: "do_not_honor".into(),
            category: DeclineCategory::Hard,
            merchant_advice_code: None,
        }),
        "4000000000009995" => Ok(AuthorizeOutcome::Declined {
            code: "insufficient_funds".into(),
            category: DeclineCategory::Soft,
            merchant_advice_code: None,
        }),
        // Mastercard: issuer unavailable, but the merchant advice code says never retry.
        "5105105105105100" => Ok(AuthorizeOutcome::Declined {
            code: "issuer_unavailable".into(),
            category: DeclineCategory::Soft,
            merchant_advice_code: Some("03".into()),
        }),
        "4000000000000119" => Err(ProviderError::Unavailable { reason: "processing_error".into() }),
        _ => Ok(AuthorizeOutcome::Approved { authorization_code: String::new() }),
    }
}

/// What a fault does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    /// Refuse the call: the provider did not act (over HTTP, the port refuses connections).
    Down,
    /// Answer a server error before acting.
    Error,
    /// Add `latency_ms` to the call.
    Slow,
    /// Act (record the authorization), then never answer in time: the nastiest real failure.
    TimeoutAfterAccept,
    /// Decline authorizations as `issuer_unavailable` (a soft decline another route may approve).
    SoftDeclineBurst,
}

impl FaultMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultMode::Down => "down",
            FaultMode::Error => "error",
            FaultMode::Slow => "slow",
            FaultMode::TimeoutAfterAccept => "timeout_after_accept",
            FaultMode::SoftDeclineBurst => "soft_decline_burst",
        }
    }
}

/// A fault to inject: a mode, the share of calls it hits, and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub mode: FaultMode,
    /// Calls hit, per mille (1000: every call). `Down` always hits every call.
    pub rate_per_mille: u32,
    /// Extra latency of `Slow`.
    pub latency_ms: u64,
    /// When the fault clears by itself; `None`: when cleared.
    pub until: Option<tokio::time::Instant>,
}

impl Fault {
    /// Every call, until cleared.
    pub fn always(mode: FaultMode) -> Fault {
        Fault { mode, rate_per_mille: 1000, latency_ms: 0, until: None }
    }

    pub fn slow(latency_ms: u64) -> Fault {
        Fault { latency_ms, ..Fault::always(FaultMode::Slow) }
    }

    fn active(&self, now: tokio::time::Instant) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerState {
    Authorized,
    Captured,
    Reversed,
    Refunded,
}

/// One authorization the provider holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub attempt_id: AttemptId,
    pub payment_id: PaymentId,
    pub amount: Money,
    pub authorization_code: String,
    pub state: LedgerState,
    pub captured_minor: i64,
    pub refunded_minor: i64,
}

/// Latency bounds and the generator's seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatorConfig {
    pub latency_ms_min: u64,
    pub latency_ms_max: u64,
    pub seed: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig { latency_ms_min: 15, latency_ms_max: 60, seed: 1 }
    }
}

#[derive(Debug, Default)]
struct Inner {
    ledger: HashMap<AttemptId, LedgerEntry>,
    /// Captures and refunds applied, by their ids: a retry is applied once.
    captures_applied: std::collections::HashSet<CaptureId>,
    /// What it will report as settled, by capture or refund id.
    settled_lines: HashMap<u128, ReportLine>,
    refunds_applied: std::collections::HashSet<RefundId>,
    /// Attempts reversed before they were seen: refused if they arrive late.
    reversed_unseen: std::collections::HashSet<AttemptId>,
    declined: HashMap<AttemptId, (String, DeclineCategory)>,
    fault: Option<Fault>,
    rng: u64,
    /// Protocol calls answered (for load tests: is traffic reaching it?).
    calls: u64,
    codes_issued: u64,
    /// Where each change goes before it is made, if the ledger outlives the process.
    journal: Option<Journal>,
}

impl Inner {
    /// Whether `op` can be made now; if not, why the provider refuses it. The
    /// live calls and the journal's replay check the same way.
    fn check(&self, op: &JournalOp) -> Result<(), String> {
        let amount = match op {
            JournalOp::Approved { amount, .. }
            | JournalOp::Captured { amount, .. }
            | JournalOp::Refunded { amount, .. } => Some(amount),
            JournalOp::Declined { .. } | JournalOp::Reversed { .. } => None,
        };
        if amount.is_some_and(|amount| amount.minor <= 0) {
            return Err("an amount is above zero".into());
        }
        match op {
            JournalOp::Approved { attempt_id, .. } | JournalOp::Declined { attempt_id, .. } => {
                if self.ledger.contains_key(attempt_id)
                    || self.declined.contains_key(attempt_id)
                    || self.reversed_unseen.contains(attempt_id)
                {
                    return Err("the attempt was answered already".into());
                }
            }
            JournalOp::Captured { attempt_id, capture_id, amount } => {
                if self.captures_applied.contains(capture_id) {
                    return Err("the capture was applied already".into());
                }
                let entry = self.ledger.get(attempt_id).ok_or("unknown attempt")?;
                if entry.state == LedgerState::Reversed || entry.amount.currency != amount.currency {
                    return Err("nothing held to capture".into());
                }
                if entry.captured_minor.checked_add(amount.minor).is_none_or(|total| total > entry.amount.minor) {
                    return Err("capture exceeds the authorized amount".into());
                }
            }
            JournalOp::Reversed { attempt_id } => {
                if self.ledger.get(attempt_id).is_some_and(|entry| entry.captured_minor > 0) {
                    return Err("captured: refund instead".into());
                }
            }
            JournalOp::Refunded { attempt_id, refund_id, amount } => {
                if self.refunds_applied.contains(refund_id) {
                    return Err("the refund was applied already".into());
                }
                let entry = self.ledger.get(attempt_id).ok_or("unknown attempt")?;
                if entry.amount.currency != amount.currency {
                    return Err("nothing captured in that currency".into());
                }
                if entry.refunded_minor.checked_add(amount.minor).is_none_or(|total| total > entry.captured_minor) {
                    return Err("refund exceeds the captured amount".into());
                }
            }
        }
        Ok(())
    }

    /// Make a change [`Inner::check`] allowed.
    fn apply(&mut self, op: JournalOp) {
        match op {
            JournalOp::Approved { attempt_id, payment_id, amount, authorization_code } => {
                self.codes_issued += 1;
                let entry = LedgerEntry {
                    attempt_id,
                    payment_id,
                    amount,
                    authorization_code,
                    state: LedgerState::Authorized,
                    captured_minor: 0,
                    refunded_minor: 0,
                };
                self.ledger.insert(attempt_id, entry);
            }
            JournalOp::Declined { attempt_id, code, category } => {
                self.declined.insert(attempt_id, (code, category));
            }
            JournalOp::Captured { attempt_id, capture_id, amount } => {
                if let Some(entry) = self.ledger.get_mut(&attempt_id) {
                    entry.captured_minor += amount.minor;
                    entry.state = LedgerState::Captured;
                }
                self.captures_applied.insert(capture_id);
                let line = ReportLine { entry_id: capture_id.as_u128(), kind: EntryKind::Capture, amount };
                self.settled_lines.insert(capture_id.as_u128(), line);
            }
            JournalOp::Reversed { attempt_id } => match self.ledger.get_mut(&attempt_id) {
                Some(entry) => entry.state = LedgerState::Reversed,
                None => {
                    self.reversed_unseen.insert(attempt_id);
                }
            },
            JournalOp::Refunded { attempt_id, refund_id, amount } => {
                if let Some(entry) = self.ledger.get_mut(&attempt_id) {
                    entry.refunded_minor += amount.minor;
                    if entry.refunded_minor == entry.captured_minor {
                        entry.state = LedgerState::Refunded;
                    }
                }
                self.refunds_applied.insert(refund_id);
                let line = ReportLine { entry_id: refund_id.as_u128(), kind: EntryKind::Refund, amount };
                self.settled_lines.insert(refund_id.as_u128(), line);
            }
        }
    }

    /// Check, journal, then make a change: refused as the provider would be, or
    /// `Unavailable` when the journal cannot take it (nothing was changed).
    fn change(&mut self, name: &str, op: JournalOp) -> Result<(), ProviderError> {
        self.check(&op).map_err(refused)?;
        if let Some(journal) = self.journal.as_mut() {
            journal.append(&op).map_err(|error| {
                tracing::error!(provider = name, %error, "simulated acquirer cannot record a change; refusing it");
                ProviderError::Unavailable { reason: format!("{name} cannot record the change: {error}") }
            })?;
        }
        self.apply(op);
        Ok(())
    }
}

/// An in-process simulated acquirer.
#[derive(Debug)]
pub struct SimulatedAcquirer {
    name: String,
    config: SimulatorConfig,
    inner: Mutex<Inner>,
    /// Bumped on every fault change, so an HTTP server can close or reopen its port.
    fault_changed: tokio::sync::watch::Sender<u64>,
}

impl SimulatedAcquirer {
    pub fn new(name: impl Into<String>, config: SimulatorConfig) -> Self {
        let inner = Inner { rng: config.seed.max(1), ..Inner::default() };
        SimulatedAcquirer {
            name: name.into(),
            config,
            inner: Mutex::new(inner),
            fault_changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Keep the ledger in a journal at `path` (created if missing): read back
    /// what it holds, and write every change there before making it. Refused
    /// when a line other than a last one cut short does not check out.
    pub fn with_journal(self, path: impl AsRef<std::path::Path>) -> Result<Self, JournalError> {
        let (journal, ops) = Journal::open(path)?;
        {
            let mut inner = self.lock();
            for (i, op) in ops.into_iter().enumerate() {
                inner.check(&op).map_err(|reason| JournalError::Damaged {
                    path: journal.path().to_path_buf(),
                    line: i + 1,
                    reason: format!("a change the ledger refuses: {reason}"),
                })?;
                inner.apply(op);
            }
            inner.journal = Some(journal);
        }
        Ok(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicked holder cannot leave the ledger half-written: a change is checked, journaled, then
        // applied by code that does not panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
        self.fault_changed.send_modify(|n| *n += 1);
    }

    /// The fault in force now (an expired one is none).
    pub fn fault(&self) -> Option<Fault> {
        self.lock().fault.filter(|f| f.active(tokio::time::Instant::now()))
    }

    /// Whether the provider refuses connections now.
    pub fn is_down(&self) -> bool {
        self.fault().is_some_and(|f| f.mode == FaultMode::Down)
    }

    /// Wait until the provider is down (`true`) or up (`false`): on a change,
    /// or when a timed fault runs out.
    pub async fn wait_down(&self, down: bool) {
        let mut changed = self.fault_changed.subscribe();
        loop {
            if self.is_down() == down {
                return;
            }
            let until = self.fault().and_then(|f| f.until);
            tokio::select! {
                _ = changed.changed() => {}
                _ = async {
                    match until {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// Protocol calls answered so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Every authorization this provider holds, in attempt order.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        let mut entries: Vec<_> = self.lock().ledger.values().cloned().collect();
        entries.sort_by_key(|e| e.attempt_id);
        entries
    }

    fn next_random(inner: &mut Inner) -> u64 {
        let mut x = inner.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        inner.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// How the next call plays out, drawn when it starts: latency uniform in
    /// the configured range (xorshift64*), and the fault that hits it, if any.
    /// The async [`Connector`] calls sleep through the plan and then act; a
    /// simulation on a virtual clock schedules the same plan itself.
    pub fn plan_call(&self, deadline: Duration) -> CallPlan {
        let mut inner = self.lock();
        inner.calls += 1;
        let span = self.config.latency_ms_max.saturating_sub(self.config.latency_ms_min) + 1;
        let mut ms = self.config.latency_ms_min + Self::next_random(&mut inner) % span;
        let fault = inner.fault.filter(|f| f.active(tokio::time::Instant::now()));
        let hit = match fault {
            Some(f)
                if f.mode == FaultMode::Down || Self::next_random(&mut inner) % 1000 < u64::from(f.rate_per_mille) =>
            {
                if f.mode == FaultMode::Slow {
                    ms += f.latency_ms;
                }
                Some(f.mode)
            }
            _ => None,
        };
        let latency = Duration::from_millis(ms);
        match hit {
            Some(FaultMode::Down) => CallPlan::Refused,
            Some(FaultMode::Error) => CallPlan::ServerError { after: latency.min(deadline) },
            _ if latency > deadline => CallPlan::TooSlow { after: deadline },
            // Acts, then its answer never arrives in time (authorizations only).
            Some(FaultMode::TimeoutAfterAccept) => {
                CallPlan::ActSilently { after: latency, timeout_after: latency + deadline }
            }
            fault => CallPlan::Act { after: latency, fault },
        }
    }

    /// Sleep through the call's plan; `Ok` means the provider acts now.
    async fn respond(&self, deadline: Duration) -> Result<Option<FaultMode>, ProviderError> {
        let plan = self.plan_call(deadline);
        if let Some(after) = plan.answer_after() {
            tokio::time::sleep(after).await;
        }
        match plan {
            CallPlan::Act { fault, .. } => Ok(fault),
            CallPlan::ActSilently { .. } => Ok(Some(FaultMode::TimeoutAfterAccept)),
            plan => Err(plan.failure(&self.name, deadline).expect("a plan that does not act fails")),
        }
    }
}

/// How one call to a simulated provider plays out in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallPlan {
    /// The connection is refused at once: the provider did not act.
    Refused,
    /// A server error (503) after `after`: the provider did not act.
    ServerError { after: Duration },
    /// No answer by the deadline, and the provider did not act.
    TooSlow { after: Duration },
    /// The provider acts after `after` and answers then (a `Slow` or
    /// `SoftDeclineBurst` fault may have hit the call).
    Act { after: Duration, fault: Option<FaultMode> },
    /// The provider acts after `after`, but the caller sees a timeout at
    /// `timeout_after` (`TimeoutAfterAccept`; other calls than authorizations answer at `after`).
    ActSilently { after: Duration, timeout_after: Duration },
}

impl CallPlan {
    /// When the caller hears back, if the provider does not act first (`None`: at once).
    fn answer_after(&self) -> Option<Duration> {
        match *self {
            CallPlan::Refused => None,
            CallPlan::ServerError { after }
            | CallPlan::TooSlow { after }
            | CallPlan::Act { after, .. }
            | CallPlan::ActSilently { after, .. } => Some(after),
        }
    }

    /// The error the caller sees when the provider does not act.
    pub fn failure(&self, provider: &str, deadline: Duration) -> Option<ProviderError> {
        match self {
            CallPlan::Refused => {
                Some(ProviderError::Unavailable { reason: format!("{provider} refused the connection") })
            }
            CallPlan::ServerError { .. } => {
                Some(ProviderError::Unavailable { reason: format!("{provider} answered 503") })
            }
            CallPlan::TooSlow { .. } => Some(ProviderError::Timeout { deadline_ms: deadline.as_millis() as u64 }),
            CallPlan::Act { .. } | CallPlan::ActSilently { .. } => None,
        }
    }
}

fn refused(reason: impl Into<String>) -> ProviderError {
    ProviderError::Refused { reason: reason.into() }
}

impl SimulatedAcquirer {
    /// Act on an authorization (when its [`CallPlan`] says the provider acts).
    /// Idempotent by attempt id: a retried request gets the first answer.
    pub fn authorize_now(
        &self,
        request: &AuthorizeRequest,
        fault: Option<FaultMode>,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        let mut inner = self.lock();
        if inner.reversed_unseen.contains(&request.attempt_id) {
            Err(ProviderError::Unavailable { reason: "attempt was reversed before it arrived".into() })
        } else if let Some(entry) = inner.ledger.get(&request.attempt_id) {
            Ok(AuthorizeOutcome::Approved { authorization_code: entry.authorization_code.clone() })
        } else if let Some((code, category)) = inner.declined.get(&request.attempt_id) {
            Ok(AuthorizeOutcome::Declined { code: code.clone(), category: *category, merchant_advice_code: None })
        } else {
            let outcome = if fault == Some(FaultMode::SoftDeclineBurst) {
                AuthorizeOutcome::Declined {
                    code: "issuer_unavailable".to_owned(),
                    category: DeclineCategory::Soft,
                    merchant_advice_code: None,
                }
            } else {
                let digits = request.card.pan.expose_digits();
                if digits == FAILS_OVER_CARD && self.name == FAILS_OVER_AT {
                    return Err(ProviderError::Unavailable { reason: "processing_error".into() });
                }
                test_card_outcome(&digits)?
            };
            let attempt_id = request.attempt_id;
            let (op, outcome) = match outcome {
                AuthorizeOutcome::Approved { .. } => {
                    let authorization_code = format!("{:06}", (inner.codes_issued + 1) % 1_000_000);
                    let (payment_id, amount) = (request.payment_id, request.amount);
                    let op = JournalOp::Approved {
                        attempt_id,
                        payment_id,
                        amount,
                        authorization_code: authorization_code.clone(),
                    };
                    (op, AuthorizeOutcome::Approved { authorization_code })
                }
                AuthorizeOutcome::Declined { code, category, merchant_advice_code } => (
                    JournalOp::Declined { attempt_id, code: code.clone(), category },
                    AuthorizeOutcome::Declined { code, category, merchant_advice_code },
                ),
            };
            inner.change(&self.name, op)?;
            Ok(outcome)
        }
    }

    /// Act on a capture; applied once per capture id.
    pub fn capture_now(
        &self,
        attempt_id: AttemptId,
        capture_id: CaptureId,
        amount: Money,
    ) -> Result<(), ProviderError> {
        let mut inner = self.lock();
        if inner.captures_applied.contains(&capture_id) {
            return Ok(());
        }
        inner.change(&self.name, JournalOp::Captured { attempt_id, capture_id, amount })
    }

    /// Act on a reversal; an attempt not seen yet is refused if it arrives later.
    pub fn reverse_now(&self, attempt_id: AttemptId) -> Result<(), ProviderError> {
        let mut inner = self.lock();
        let done = match inner.ledger.get(&attempt_id) {
            Some(entry) => entry.state == LedgerState::Reversed,
            None => inner.reversed_unseen.contains(&attempt_id),
        };
        if done {
            return Ok(()); // a reversal sent again: nothing to change, nothing to journal
        }
        inner.change(&self.name, JournalOp::Reversed { attempt_id })
    }

    /// Act on a refund; applied once per refund id.
    pub fn refund_now(&self, attempt_id: AttemptId, refund_id: RefundId, amount: Money) -> Result<(), ProviderError> {
        let mut inner = self.lock();
        if inner.refunds_applied.contains(&refund_id) {
            return Ok(());
        }
        inner.change(&self.name, JournalOp::Refunded { attempt_id, refund_id, amount })
    }

    /// What the provider knows of an attempt now.
    pub fn inquire_now(&self, attempt_id: AttemptId) -> AttemptStatus {
        let inner = self.lock();
        match (inner.ledger.get(&attempt_id), inner.declined.get(&attempt_id)) {
            (Some(entry), _) if entry.state == LedgerState::Reversed => AttemptStatus::Reversed,
            (Some(entry), _) => AttemptStatus::Authorized { authorization_code: entry.authorization_code.clone() },
            (None, Some((code, category))) => AttemptStatus::Declined { code: code.clone(), category: *category },
            (None, None) => AttemptStatus::NotFound,
        }
    }
}

#[async_trait]
impl Connector for SimulatedAcquirer {
    fn name(&self) -> &str {
        &self.name
    }

    async fn authorize(
        &self,
        request: AuthorizeRequest,
        deadline: Duration,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        let fault = self.respond(deadline).await?;
        let outcome = self.authorize_now(&request, fault);
        if fault == Some(FaultMode::TimeoutAfterAccept) {
            // Acted, but the answer never arrives in time.
            tokio::time::sleep(deadline).await;
            return Err(ProviderError::Timeout { deadline_ms: deadline.as_millis() as u64 });
        }
        outcome
    }

    async fn capture(
        &self,
        attempt_id: AttemptId,
        capture_id: CaptureId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError> {
        self.respond(deadline).await?;
        self.capture_now(attempt_id, capture_id, amount)
    }

    async fn reverse(&self, attempt_id: AttemptId, deadline: Duration) -> Result<(), ProviderError> {
        self.respond(deadline).await?;
        self.reverse_now(attempt_id)
    }

    async fn refund(
        &self,
        attempt_id: AttemptId,
        refund_id: RefundId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError> {
        self.respond(deadline).await?;
        self.refund_now(attempt_id, refund_id, amount)
    }

    async fn settlement_report(
        &self,
        entry_ids: &[u128],
        deadline: Duration,
    ) -> Result<Vec<ReportLine>, ProviderError> {
        self.respond(deadline).await?;
        let inner = self.lock();
        Ok(entry_ids.iter().filter_map(|id| inner.settled_lines.get(id).cloned()).collect())
    }

    async fn inquire(&self, attempt_id: AttemptId, deadline: Duration) -> Result<AttemptStatus, ProviderError> {
        self.respond(deadline).await?;
        Ok(self.inquire_now(attempt_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_the_journal_cannot_take_is_not_made_and_the_provider_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let sim = SimulatedAcquirer::new("acq-alpha", SimulatorConfig::default()).with_journal(&path).unwrap();
        sim.lock().journal = Some(Journal::read_only(&path));
        // `Unavailable`: the provider certainly did not act (another may be tried).
        assert!(matches!(sim.reverse_now(AttemptId::from_u128(1)), Err(ProviderError::Unavailable { .. })));
        assert!(sim.lock().reversed_unseen.is_empty(), "nothing changed");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "nothing written");
    }
}
