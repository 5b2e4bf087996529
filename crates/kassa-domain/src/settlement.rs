//! Settlement batching: captured and refunded amounts grouped per provider,
//! merchant and currency, closed at a cut-off with totals and fees.
//!
//! A batch is an aggregate with its own `decide`/`apply`. Money is conserved:
//! `net = captured − refunded − fees`, every sum checked, and each entry (one
//! capture or one refund) belongs to at most one batch — the service keeps an
//! index of batched entry ids and refuses a second add; the batch refuses a
//! duplicate within itself.

use crate::id::{BatchId, MerchantId, PaymentId};
use crate::money::{Money, MoneyError};
use crate::{Currency, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What an entry moves: money to the merchant (capture) or back (refund).
/// Persisted by variant index: never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Capture,
    Refund,
}

/// One capture or refund to settle. `entry_id` is the capture's or refund's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementEntry {
    pub entry_id: u128,
    pub payment_id: PaymentId,
    pub kind: EntryKind,
    /// Always positive; `kind` gives the direction.
    pub amount: Money,
}

/// Which batch an entry goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BatchKey {
    pub provider: String,
    pub merchant_id: MerchantId,
    pub currency: Currency,
}

/// A provider's fees: basis points of each capture plus a fixed amount per capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeSchedule {
    pub capture_basis_points: u32,
    pub capture_fixed_minor: i64,
}

impl FeeSchedule {
    /// The fee on one capture, rounded half up to the minor unit. Integer only.
    pub fn capture_fee(self, amount_minor: i64) -> Result<i64, MoneyError> {
        let proportional = (i128::from(amount_minor) * i128::from(self.capture_basis_points) + 5_000) / 10_000;
        let fee = proportional.checked_add(i128::from(self.capture_fixed_minor)).ok_or(MoneyError::Overflow)?;
        i64::try_from(fee).map_err(|_| MoneyError::Overflow)
    }
}

/// Totals of a closed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchTotals {
    pub captured: Money,
    pub refunded: Money,
    pub fees: Money,
    /// What the provider owes the merchant: captured − refunded − fees.
    pub net: Money,
    pub entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchCommand {
    Open { batch_id: BatchId, key: BatchKey },
    Add { entry: SettlementEntry },
    Close { fees: FeeSchedule },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchEvent {
    Opened { batch_id: BatchId, key: BatchKey, opened_at: Timestamp },
    EntryAdded { entry: SettlementEntry },
    Closed { totals: BatchTotals, closed_at: Timestamp },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchRejection {
    #[error("batch already exists")]
    AlreadyOpen,
    #[error("batch not found")]
    NotFound,
    #[error("batch is closed; entries go to the next batch")]
    Closed,
    #[error("entry {entry_id:#x} is already in this batch")]
    DuplicateEntry { entry_id: u128 },
    #[error("entry is in {got} but the batch settles {expected}")]
    CurrencyMismatch { expected: Currency, got: Currency },
    #[error("entry amount must be positive, got {amount}")]
    AmountNotPositive { amount: i64 },
    #[error("cannot close an empty batch")]
    Empty,
    #[error("batch totals overflow: {0}")]
    Overflow(#[from] MoneyError),
}

/// A batch rebuilt from its events.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchState {
    pub batch_id: Option<BatchId>,
    pub key: Option<BatchKey>,
    pub opened_at: Option<Timestamp>,
    pub entries: Vec<SettlementEntry>,
    pub entry_ids: BTreeSet<u128>,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub closed: Option<(BatchTotals, Timestamp)>,
}

impl BatchState {
    pub fn is_open(&self) -> bool {
        self.key.is_some() && self.closed.is_none()
    }

    /// Whether the batch already holds `event`: a copy published again (a
    /// relay repeats what it sent before a crash), to be dropped.
    pub fn holds(&self, event: &BatchEvent) -> bool {
        match event {
            BatchEvent::Opened { .. } => self.key.is_some(),
            BatchEvent::EntryAdded { entry } => self.entry_ids.contains(&entry.entry_id),
            BatchEvent::Closed { .. } => self.closed.is_some(),
        }
    }

    /// Totals as they would be if the batch closed now with `fees`.
    pub fn totals(&self, fees: FeeSchedule) -> Result<BatchTotals, BatchRejection> {
        let key = self.key.as_ref().ok_or(BatchRejection::NotFound)?;
        let currency = key.currency;
        let mut fee_minor: i64 = 0;
        for entry in self.entries.iter().filter(|e| e.kind == EntryKind::Capture) {
            fee_minor = fee_minor.checked_add(fees.capture_fee(entry.amount.minor)?).ok_or(MoneyError::Overflow)?;
        }
        let captured = Money::new(self.captured_minor, currency);
        let refunded = Money::new(self.refunded_minor, currency);
        let fees = Money::new(fee_minor, currency);
        let net = captured.checked_sub(refunded)?.checked_sub(fees)?;
        Ok(BatchTotals { captured, refunded, fees, net, entries: self.entries.len() as u64 })
    }
}

pub fn decide_batch(
    state: &BatchState,
    command: BatchCommand,
    now: Timestamp,
) -> Result<Vec<BatchEvent>, BatchRejection> {
    match command {
        BatchCommand::Open { batch_id, key } => {
            if state.key.is_some() {
                return Err(BatchRejection::AlreadyOpen);
            }
            Ok(vec![BatchEvent::Opened { batch_id, key, opened_at: now }])
        }
        BatchCommand::Add { entry } => {
            let key = state.key.as_ref().ok_or(BatchRejection::NotFound)?;
            if state.closed.is_some() {
                return Err(BatchRejection::Closed);
            }
            if entry.amount.currency != key.currency {
                return Err(BatchRejection::CurrencyMismatch { expected: key.currency, got: entry.amount.currency });
            }
            if entry.amount.minor <= 0 {
                return Err(BatchRejection::AmountNotPositive { amount: entry.amount.minor });
            }
            if state.entry_ids.contains(&entry.entry_id) {
                return Err(BatchRejection::DuplicateEntry { entry_id: entry.entry_id });
            }
            // Refuse now what would overflow at close.
            let (captured, refunded) = match entry.kind {
                EntryKind::Capture => {
                    (state.captured_minor.checked_add(entry.amount.minor), Some(state.refunded_minor))
                }
                EntryKind::Refund => (Some(state.captured_minor), state.refunded_minor.checked_add(entry.amount.minor)),
            };
            let (Some(captured), Some(refunded)) = (captured, refunded) else {
                return Err(BatchRejection::Overflow(MoneyError::Overflow));
            };
            captured.checked_sub(refunded).ok_or(BatchRejection::Overflow(MoneyError::Overflow))?;
            Ok(vec![BatchEvent::EntryAdded { entry }])
        }
        BatchCommand::Close { fees } => {
            if state.key.is_none() {
                return Err(BatchRejection::NotFound);
            }
            if state.closed.is_some() {
                return Err(BatchRejection::Closed);
            }
            if state.entries.is_empty() {
                return Err(BatchRejection::Empty);
            }
            Ok(vec![BatchEvent::Closed { totals: state.totals(fees)?, closed_at: now }])
        }
    }
}

/// Apply an event read from outside (a topic, another service's log) that
/// may not follow `state`: an error says why, and `state` is left unchanged.
pub fn try_apply_batch(state: &mut BatchState, event: &BatchEvent) -> Result<(), String> {
    match event {
        BatchEvent::Opened { .. } if state.key.is_some() => return Err("the batch is opened twice".into()),
        BatchEvent::EntryAdded { .. } | BatchEvent::Closed { .. } if !state.is_open() => {
            return Err("the batch is not open (its opening is missing, or it is closed)".into());
        }
        BatchEvent::EntryAdded { entry } if state.entry_ids.contains(&entry.entry_id) => {
            return Err(format!("entry {:#x} is batched twice", entry.entry_id));
        }
        // The same checks as adding it here: currency, a positive amount, no overflow.
        BatchEvent::EntryAdded { entry } => {
            decide_batch(state, BatchCommand::Add { entry: entry.clone() }, Timestamp(0))
                .map_err(|rejection| format!("entry {:#x}: {rejection}", entry.entry_id))?;
        }
        BatchEvent::Closed { totals, .. } => {
            // The running totals were checked entry by entry as they were added.
            let net =
                state.captured_minor.checked_sub(state.refunded_minor).and_then(|n| n.checked_sub(totals.fees.minor));
            if totals.captured.minor != state.captured_minor
                || totals.refunded.minor != state.refunded_minor
                || net != Some(totals.net.minor)
            {
                return Err("the closing totals are not the batch's entries".into());
            }
        }
        BatchEvent::Opened { .. } => {}
    }
    apply_batch(state, event);
    Ok(())
}

/// # Panics
/// On an event that cannot follow the state (events are facts).
pub fn apply_batch(state: &mut BatchState, event: &BatchEvent) {
    match event {
        BatchEvent::Opened { batch_id, key, opened_at } => {
            assert!(state.key.is_none(), "batch opened twice");
            state.batch_id = Some(*batch_id);
            state.key = Some(key.clone());
            state.opened_at = Some(*opened_at);
        }
        BatchEvent::EntryAdded { entry } => {
            assert!(state.is_open(), "entry added to a batch that is not open");
            assert!(state.entry_ids.insert(entry.entry_id), "entry {:#x} batched twice", entry.entry_id);
            match entry.kind {
                EntryKind::Capture => state.captured_minor += entry.amount.minor,
                EntryKind::Refund => state.refunded_minor += entry.amount.minor,
            }
            state.entries.push(entry.clone());
        }
        BatchEvent::Closed { totals, closed_at } => {
            assert!(state.is_open(), "closing a batch that is not open");
            // Money is conserved: the totals are exactly the entries.
            let captured: i64 =
                state.entries.iter().filter(|e| e.kind == EntryKind::Capture).map(|e| e.amount.minor).sum();
            let refunded: i64 =
                state.entries.iter().filter(|e| e.kind == EntryKind::Refund).map(|e| e.amount.minor).sum();
            assert_eq!(totals.captured.minor, captured, "captured total differs from its entries");
            assert_eq!(totals.refunded.minor, refunded, "refunded total differs from its entries");
            assert_eq!(
                totals.net.minor,
                captured - refunded - totals.fees.minor,
                "net is not captured − refunded − fees"
            );
            state.closed = Some((*totals, *closed_at));
        }
    }
}

#[cfg(test)]
mod try_apply_tests {
    use super::*;
    use crate::{Currency, MerchantId, PaymentId};

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::from_code("EUR").unwrap())
    }

    #[test]
    fn events_that_cannot_follow_are_refused_and_change_nothing() {
        let key =
            BatchKey { provider: "acq-alpha".into(), merchant_id: MerchantId::from_u128(1), currency: eur(0).currency };
        let opened = BatchEvent::Opened { batch_id: BatchId::from_u128(7), key, opened_at: Timestamp(1) };
        let entry = SettlementEntry {
            entry_id: 9,
            payment_id: PaymentId::from_u128(3),
            kind: EntryKind::Capture,
            amount: eur(500),
        };
        let added = BatchEvent::EntryAdded { entry };
        let mut state = BatchState::default();
        assert!(try_apply_batch(&mut state, &added).unwrap_err().contains("not open"));
        assert_eq!(state, BatchState::default());
        try_apply_batch(&mut state, &opened).unwrap();
        assert!(try_apply_batch(&mut state, &opened).unwrap_err().contains("twice"));
        let usd = Money::new(500, Currency::from_code("USD").unwrap());
        let foreign = SettlementEntry {
            entry_id: 10,
            payment_id: PaymentId::from_u128(4),
            kind: EntryKind::Capture,
            amount: usd,
        };
        assert!(try_apply_batch(&mut state, &BatchEvent::EntryAdded { entry: foreign }).is_err());
        let negative = SettlementEntry {
            entry_id: 11,
            payment_id: PaymentId::from_u128(5),
            kind: EntryKind::Refund,
            amount: eur(-1),
        };
        assert!(try_apply_batch(&mut state, &BatchEvent::EntryAdded { entry: negative }).is_err());
        try_apply_batch(&mut state, &added).unwrap();
        assert!(try_apply_batch(&mut state, &added).unwrap_err().contains("batched twice"));
        let totals = |captured| BatchTotals {
            captured: eur(captured),
            refunded: eur(0),
            fees: eur(40),
            net: eur(captured - 40),
            entries: 1,
        };
        let before = state.clone();
        assert!(
            try_apply_batch(&mut state, &BatchEvent::Closed { totals: totals(600), closed_at: Timestamp(2) }).is_err()
        );
        assert_eq!(state, before);
        try_apply_batch(&mut state, &BatchEvent::Closed { totals: totals(500), closed_at: Timestamp(2) }).unwrap();
        assert!(try_apply_batch(&mut state, &added).is_err());
    }
}
