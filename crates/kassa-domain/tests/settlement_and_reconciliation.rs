//! Settlement batches conserve money; reconciliation puts every line of both
//! sides in exactly one category.

use kassa_domain::reconciliation::{ReportLine, reconcile};
use kassa_domain::settlement::*;
use kassa_domain::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const NOW: Timestamp = Timestamp(1_795_651_200_000);

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::from_code("EUR").unwrap())
}

fn key() -> BatchKey {
    BatchKey {
        provider: "acq-alpha".into(),
        merchant_id: MerchantId::from_u128(1),
        currency: Currency::from_code("EUR").unwrap(),
    }
}

fn entry(id: u128, kind: EntryKind, amount: Money) -> SettlementEntry {
    SettlementEntry { entry_id: id, payment_id: PaymentId::from_u128(id), kind, amount }
}

const FEES: FeeSchedule = FeeSchedule { capture_basis_points: 290, capture_fixed_minor: 25 };

fn run(state: &mut BatchState, command: BatchCommand) -> Result<Vec<BatchEvent>, BatchRejection> {
    let events = decide_batch(state, command, NOW)?;
    for event in &events {
        apply_batch(state, event);
    }
    Ok(events)
}

fn open() -> BatchState {
    let mut state = BatchState::default();
    run(&mut state, BatchCommand::Open { batch_id: BatchId::from_u128(9), key: key() }).unwrap();
    state
}

#[test]
fn fees_round_half_up_in_integers() {
    assert_eq!(FEES.capture_fee(1999), Ok(58 + 25)); // 57.971 → 58
    assert_eq!(FeeSchedule { capture_basis_points: 50, capture_fixed_minor: 0 }.capture_fee(100), Ok(1)); // 0.5 → 1
    assert_eq!(FeeSchedule { capture_basis_points: 49, capture_fixed_minor: 0 }.capture_fee(100), Ok(0));
    assert!(
        FeeSchedule { capture_basis_points: u32::MAX, capture_fixed_minor: i64::MAX }.capture_fee(i64::MAX).is_err()
    );
}

#[test]
fn a_closed_batch_has_exact_totals_and_takes_nothing_more() {
    let mut state = open();
    run(&mut state, BatchCommand::Add { entry: entry(1, EntryKind::Capture, eur(1999)) }).unwrap();
    run(&mut state, BatchCommand::Add { entry: entry(2, EntryKind::Capture, eur(1000)) }).unwrap();
    run(&mut state, BatchCommand::Add { entry: entry(3, EntryKind::Refund, eur(500)) }).unwrap();
    let events = run(&mut state, BatchCommand::Close { fees: FEES }).unwrap();
    let BatchEvent::Closed { totals, .. } = &events[0] else { panic!("{events:?}") };
    assert_eq!(totals.captured, eur(2999));
    assert_eq!(totals.refunded, eur(500));
    assert_eq!(totals.fees, eur(83 + 54)); // (58+25) + (29+25)
    assert_eq!(totals.net, eur(2999 - 500 - 137));
    assert_eq!(totals.entries, 3);
    assert_eq!(
        run(&mut state, BatchCommand::Add { entry: entry(4, EntryKind::Capture, eur(1)) }),
        Err(BatchRejection::Closed)
    );
    assert_eq!(run(&mut state, BatchCommand::Close { fees: FEES }), Err(BatchRejection::Closed));
}

#[test]
fn bad_entries_are_refused() {
    let mut state = open();
    run(&mut state, BatchCommand::Add { entry: entry(1, EntryKind::Capture, eur(10)) }).unwrap();
    assert_eq!(
        run(&mut state, BatchCommand::Add { entry: entry(1, EntryKind::Capture, eur(10)) }),
        Err(BatchRejection::DuplicateEntry { entry_id: 1 })
    );
    assert_eq!(
        run(&mut state, BatchCommand::Add { entry: entry(2, EntryKind::Capture, eur(0)) }),
        Err(BatchRejection::AmountNotPositive { amount: 0 })
    );
    let usd = Money::new(10, Currency::from_code("USD").unwrap());
    assert!(matches!(
        run(&mut state, BatchCommand::Add { entry: entry(3, EntryKind::Capture, usd) }),
        Err(BatchRejection::CurrencyMismatch { .. })
    ));
    assert_eq!(
        run(&mut state, BatchCommand::Add { entry: entry(4, EntryKind::Capture, eur(i64::MAX)) }),
        Err(BatchRejection::Overflow(MoneyError::Overflow))
    );
    assert_eq!(run(&mut open(), BatchCommand::Close { fees: FEES }), Err(BatchRejection::Empty));
    assert_eq!(
        run(&mut BatchState::default(), BatchCommand::Add { entry: entry(1, EntryKind::Capture, eur(1)) }),
        Err(BatchRejection::NotFound)
    );
}

proptest! {
    /// Whatever is thrown at a batch, its closing totals are exactly the
    /// accepted entries: money in equals money out plus fees.
    #[test]
    fn batches_conserve_money(adds in prop::collection::vec((0u128..40, any::<bool>(), -10i64..100_000), 1..60)) {
        let mut state = open();
        let mut accepted = Vec::new();
        for (id, is_capture, minor) in adds {
            let kind = if is_capture { EntryKind::Capture } else { EntryKind::Refund };
            if run(&mut state, BatchCommand::Add { entry: entry(id, kind, eur(minor)) }).is_ok() {
                accepted.push((kind, minor));
            }
        }
        prop_assume!(!accepted.is_empty());
        let events = run(&mut state, BatchCommand::Close { fees: FEES }).unwrap();
        let BatchEvent::Closed { totals, .. } = &events[0] else { unreachable!() };
        let captured: i64 = accepted.iter().filter(|a| a.0 == EntryKind::Capture).map(|a| a.1).sum();
        let refunded: i64 = accepted.iter().filter(|a| a.0 == EntryKind::Refund).map(|a| a.1).sum();
        let fees: i64 = accepted.iter().filter(|a| a.0 == EntryKind::Capture).map(|a| FEES.capture_fee(a.1).unwrap()).sum();
        prop_assert_eq!(totals.captured.minor, captured);
        prop_assert_eq!(totals.refunded.minor, refunded);
        prop_assert_eq!(totals.fees.minor, fees);
        prop_assert_eq!(totals.net.minor + totals.fees.minor + totals.refunded.minor, totals.captured.minor);
        let ids: BTreeSet<u128> = state.entries.iter().map(|e| e.entry_id).collect();
        prop_assert_eq!(ids.len(), state.entries.len(), "an entry is in the batch twice");
    }

    /// Every batch entry lands in exactly one of matched / missing / mismatch,
    /// every report line in exactly one of matched / mismatch / unexpected.
    #[test]
    fn reconciliation_partitions_both_sides(
        amounts in prop::collection::vec(1i64..10_000, 0..40),
        edits in prop::collection::vec((0usize..40, 0u8..4), 0..20),
        extra in prop::collection::vec((100u128..120, 1i64..500), 0..5),
    ) {
        let entries: Vec<SettlementEntry> =
            amounts.iter().enumerate().map(|(i, a)| entry(i as u128, EntryKind::Capture, eur(*a))).collect();
        let mut report: Vec<ReportLine> =
            entries.iter().map(|e| ReportLine { entry_id: e.entry_id, kind: e.kind, amount: e.amount }).collect();
        for (index, edit) in edits {
            if report.is_empty() { break; }
            let index = index % report.len();
            match edit {
                0 => { report.remove(index); }
                1 => report[index].amount = eur(report[index].amount.minor + 1),
                2 => report[index].kind = EntryKind::Refund,
                _ => { let dup = report[index].clone(); report.push(dup); }
            }
        }
        report.extend(extra.iter().map(|(id, a)| ReportLine { entry_id: *id, kind: EntryKind::Capture, amount: eur(*a) }));
        let result = reconcile(&entries, &report);
        prop_assert_eq!(result.matched.len() + result.missing.len() + result.amount_mismatch.len(), entries.len());
        prop_assert_eq!(result.matched.len() + result.amount_mismatch.len() + result.unexpected.len(), report.len());
        if report.len() == entries.len() && report.iter().zip(&entries).all(|(r, e)| r.amount == e.amount && r.kind == e.kind && r.entry_id == e.entry_id) {
            prop_assert!(result.is_clean());
        }
    }
}

#[test]
fn reconciliation_names_each_discrepancy() {
    let entries = vec![
        entry(1, EntryKind::Capture, eur(100)),
        entry(2, EntryKind::Capture, eur(200)),
        entry(3, EntryKind::Refund, eur(50)),
    ];
    let report = vec![
        ReportLine { entry_id: 1, kind: EntryKind::Capture, amount: eur(100) },
        ReportLine { entry_id: 2, kind: EntryKind::Capture, amount: eur(199) },
        ReportLine { entry_id: 7, kind: EntryKind::Capture, amount: eur(5) },
    ];
    let result = reconcile(&entries, &report);
    assert_eq!(result.matched.len(), 1);
    assert_eq!(result.amount_mismatch[0].entry.entry_id, 2);
    assert_eq!(result.amount_mismatch[0].reported.amount, eur(199));
    assert_eq!(result.missing[0].entry_id, 3);
    assert_eq!(result.unexpected[0].entry_id, 7);
    assert!(!result.is_clean());
}
