//! A simulated acquirer: outcomes by test card, latency from a seeded
//! generator, injectable faults, and a ledger of every authorization it holds
//! (which is what tests check for double charges).

use crate::{AttemptStatus, AuthorizeOutcome, AuthorizeRequest, Connector, ProviderError, ReportLine};
use async_trait::async_trait;
use kassa_domain::settlement::EntryKind;
use kassa_domain::{AttemptId, CaptureId, DeclineCategory, Money, PaymentId, RefundId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How the simulator answers, by card number (documented in the README).
pub fn test_card_outcome(pan_digits: &str) -> Result<AuthorizeOutcome, ProviderError> {
    match pan_digits {
        "4000000000000002" => {
            Ok(AuthorizeOutcome::Declined { code: "do_not_honor".into(), category: DeclineCategory::Hard })
        }
        "4000000000009995" => {
            Ok(AuthorizeOutcome::Declined { code: "insufficient_funds".into(), category: DeclineCategory::Soft })
        }
        "4000000000000119" => Err(ProviderError::Unavailable { reason: "processing_error".into() }),
        _ => Ok(AuthorizeOutcome::Approved { authorization_code: String::new() }),
    }
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refuse every call: the provider did not act.
    Down,
    /// Record the authorization, then never answer in time: the nastiest real failure.
    TimeoutAfterAccept,
    /// Add this much latency to every call.
    Slow { extra_ms: u64 },
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
    codes_issued: u64,
}

/// An in-process simulated acquirer.
#[derive(Debug)]
pub struct SimulatedAcquirer {
    name: String,
    config: SimulatorConfig,
    inner: Mutex<Inner>,
}

impl SimulatedAcquirer {
    pub fn new(name: impl Into<String>, config: SimulatorConfig) -> Self {
        let inner = Inner { rng: config.seed.max(1), ..Inner::default() };
        SimulatedAcquirer { name: name.into(), config, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicked holder cannot leave the ledger half-written: every update is one statement.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Every authorization this provider holds, in attempt order.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        let mut entries: Vec<_> = self.lock().ledger.values().cloned().collect();
        entries.sort_by_key(|e| e.attempt_id);
        entries
    }

    /// Latency for the next call: uniform in the configured range (xorshift64*).
    fn latency(&self) -> (Duration, Option<Fault>) {
        let mut inner = self.lock();
        let mut x = inner.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        inner.rng = x;
        let span = self.config.latency_ms_max.saturating_sub(self.config.latency_ms_min) + 1;
        let mut ms = self.config.latency_ms_min + x.wrapping_mul(0x2545_F491_4F6C_DD1D) % span;
        if let Some(Fault::Slow { extra_ms }) = inner.fault {
            ms += extra_ms;
        }
        (Duration::from_millis(ms), inner.fault)
    }

    /// Sleep the call's latency; past the deadline the caller sees a timeout.
    async fn respond(&self, deadline: Duration) -> Result<Option<Fault>, ProviderError> {
        let (latency, fault) = self.latency();
        if fault == Some(Fault::Down) {
            return Err(ProviderError::Unavailable { reason: format!("{} refused the connection", self.name) });
        }
        if latency > deadline {
            tokio::time::sleep(deadline).await;
            return Err(ProviderError::Timeout { deadline_ms: deadline.as_millis() as u64 });
        }
        tokio::time::sleep(latency).await;
        Ok(fault)
    }
}

fn refused(reason: impl Into<String>) -> ProviderError {
    ProviderError::Refused { reason: reason.into() }
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
        let outcome = {
            let mut inner = self.lock();
            // Idempotent by attempt id: a retried request gets the first answer.
            if inner.reversed_unseen.contains(&request.attempt_id) {
                Err(ProviderError::Unavailable { reason: "attempt was reversed before it arrived".into() })
            } else if let Some(entry) = inner.ledger.get(&request.attempt_id) {
                Ok(AuthorizeOutcome::Approved { authorization_code: entry.authorization_code.clone() })
            } else if let Some((code, category)) = inner.declined.get(&request.attempt_id) {
                Ok(AuthorizeOutcome::Declined { code: code.clone(), category: *category })
            } else {
                match test_card_outcome(&request.card.pan.expose_digits()) {
                    Ok(AuthorizeOutcome::Approved { .. }) => {
                        inner.codes_issued += 1;
                        let authorization_code = format!("{:06}", inner.codes_issued % 1_000_000);
                        inner.ledger.insert(
                            request.attempt_id,
                            LedgerEntry {
                                attempt_id: request.attempt_id,
                                payment_id: request.payment_id,
                                amount: request.amount,
                                authorization_code: authorization_code.clone(),
                                state: LedgerState::Authorized,
                                captured_minor: 0,
                                refunded_minor: 0,
                            },
                        );
                        Ok(AuthorizeOutcome::Approved { authorization_code })
                    }
                    Ok(AuthorizeOutcome::Declined { code, category }) => {
                        inner.declined.insert(request.attempt_id, (code.clone(), category));
                        Ok(AuthorizeOutcome::Declined { code, category })
                    }
                    Err(error) => Err(error),
                }
            }
        };
        if fault == Some(Fault::TimeoutAfterAccept) {
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
        let mut inner = self.lock();
        if inner.captures_applied.contains(&capture_id) {
            return Ok(());
        }
        let entry = inner.ledger.get_mut(&attempt_id).ok_or_else(|| refused("unknown attempt"))?;
        if entry.state == LedgerState::Reversed || entry.amount.currency != amount.currency {
            return Err(refused("nothing held to capture"));
        }
        if entry.captured_minor + amount.minor > entry.amount.minor {
            return Err(refused("capture exceeds the authorized amount"));
        }
        entry.captured_minor += amount.minor;
        entry.state = LedgerState::Captured;
        inner.captures_applied.insert(capture_id);
        let line = ReportLine { entry_id: capture_id.as_u128(), kind: EntryKind::Capture, amount };
        inner.settled_lines.insert(capture_id.as_u128(), line);
        Ok(())
    }

    async fn reverse(&self, attempt_id: AttemptId, deadline: Duration) -> Result<(), ProviderError> {
        self.respond(deadline).await?;
        let mut inner = self.lock();
        match inner.ledger.get_mut(&attempt_id) {
            Some(entry) if entry.captured_minor > 0 => Err(refused("captured: refund instead")),
            Some(entry) => {
                entry.state = LedgerState::Reversed;
                Ok(())
            }
            None => {
                inner.reversed_unseen.insert(attempt_id);
                Ok(())
            }
        }
    }

    async fn refund(
        &self,
        attempt_id: AttemptId,
        refund_id: RefundId,
        amount: Money,
        deadline: Duration,
    ) -> Result<(), ProviderError> {
        self.respond(deadline).await?;
        let mut inner = self.lock();
        if inner.refunds_applied.contains(&refund_id) {
            return Ok(());
        }
        let entry = inner.ledger.get_mut(&attempt_id).ok_or_else(|| refused("unknown attempt"))?;
        if entry.refunded_minor + amount.minor > entry.captured_minor {
            return Err(refused("refund exceeds the captured amount"));
        }
        entry.refunded_minor += amount.minor;
        if entry.refunded_minor == entry.captured_minor {
            entry.state = LedgerState::Refunded;
        }
        inner.refunds_applied.insert(refund_id);
        let line = ReportLine { entry_id: refund_id.as_u128(), kind: EntryKind::Refund, amount };
        inner.settled_lines.insert(refund_id.as_u128(), line);
        Ok(())
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
        let inner = self.lock();
        Ok(match (inner.ledger.get(&attempt_id), inner.declined.get(&attempt_id)) {
            (Some(entry), _) if entry.state == LedgerState::Reversed => AttemptStatus::Reversed,
            (Some(entry), _) => AttemptStatus::Authorized { authorization_code: entry.authorization_code.clone() },
            (None, Some((code, category))) => AttemptStatus::Declined { code: code.clone(), category: *category },
            (None, None) => AttemptStatus::NotFound,
        })
    }
}
