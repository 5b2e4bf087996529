//! Reconciliation: what a provider reports it settled, matched against what
//! Kassa batched. A pure function over both lists; every line of each side
//! ends up in exactly one category.

use crate::Money;
use crate::settlement::{EntryKind, SettlementEntry};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One line of a provider's settlement report, already parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportLine {
    /// The capture or refund id Kassa sent the provider.
    pub entry_id: u128,
    pub kind: EntryKind,
    pub amount: Money,
}

/// A Kassa entry and the report line that disagrees with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub entry: SettlementEntry,
    pub reported: ReportLine,
}

/// The outcome of matching one batch against one report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reconciliation {
    /// In both, with the same kind and amount.
    pub matched: Vec<SettlementEntry>,
    /// Batched by Kassa, absent from the report.
    pub missing: Vec<SettlementEntry>,
    /// In both, but the amount (or currency, or kind) differs.
    pub amount_mismatch: Vec<Mismatch>,
    /// In the report, unknown to the batch (or reported twice).
    pub unexpected: Vec<ReportLine>,
}

impl Reconciliation {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.amount_mismatch.is_empty() && self.unexpected.is_empty()
    }
}

/// Match a batch's entries against a provider's report lines.
pub fn reconcile(entries: &[SettlementEntry], report: &[ReportLine]) -> Reconciliation {
    let mut reported: BTreeMap<u128, &ReportLine> = BTreeMap::new();
    let mut result = Reconciliation::default();
    for line in report {
        if reported.insert(line.entry_id, line).is_some() {
            // A second line for the same entry: the first is matched below, this one is extra.
            result.unexpected.push(line.clone());
        }
    }
    for entry in entries {
        match reported.remove(&entry.entry_id) {
            None => result.missing.push(entry.clone()),
            Some(line) if line.amount == entry.amount && line.kind == entry.kind => result.matched.push(entry.clone()),
            Some(line) => result.amount_mismatch.push(Mismatch { entry: entry.clone(), reported: line.clone() }),
        }
    }
    result.unexpected.extend(reported.into_values().cloned());
    result
}
