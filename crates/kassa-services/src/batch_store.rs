//! How a settlement batch is kept in a service's state table: a small header
//! (the batch without its entries) rewritten on change, and one key per entry
//! written once. Rewriting a whole batch on every change made a batch of n
//! entries cost O(n²) bytes.

use crate::consume::id_key;
use kassa_codec::{decode_value, encode_value};
use kassa_domain::BatchId;
use kassa_domain::settlement::{BatchState, SettlementEntry};
use kassa_eventlog::{EventLog, LogError, StateWrite, Table};

fn header_key(batch_id: BatchId) -> Vec<u8> {
    id_key("batch/", batch_id.as_u128())
}

fn entries_prefix(batch_id: BatchId) -> Vec<u8> {
    id_key("batch-entry/", batch_id.as_u128())
}

/// The writes that store `batch`, whose entries since the last store are `new_entries`.
pub fn batch_writes(batch: &BatchState, new_entries: &[SettlementEntry]) -> Vec<StateWrite> {
    let Some(batch_id) = batch.batch_id else { return Vec::new() };
    let header = BatchState {
        batch_id: batch.batch_id,
        key: batch.key.clone(),
        opened_at: batch.opened_at,
        entries: Vec::new(),
        entry_ids: Default::default(),
        captured_minor: batch.captured_minor,
        refunded_minor: batch.refunded_minor,
        closed: batch.closed,
    };
    let mut writes =
        vec![StateWrite { table: Table::State, key: header_key(batch_id), value: Some(encode_value(&header)) }];
    for entry in new_entries {
        let mut key = entries_prefix(batch_id);
        key.extend_from_slice(&entry.entry_id.to_be_bytes());
        writes.push(StateWrite { table: Table::State, key, value: Some(encode_value(entry)) });
    }
    writes
}

/// A stored batch without its entries (its key, totals and state).
pub fn load_header(log: &EventLog, batch_id: BatchId) -> Result<Option<BatchState>, LogError> {
    let Some(bytes) = log.get(Table::State, &header_key(batch_id))? else { return Ok(None) };
    decode_value(&bytes, "batch")
        .map(Some)
        .map_err(|e| LogError::BadSnapshot { name: format!("batch {batch_id}"), reason: e.to_string() })
}

/// A stored batch with all its entries.
pub fn load_batch(log: &EventLog, batch_id: BatchId) -> Result<Option<BatchState>, LogError> {
    let Some(mut batch) = load_header(log, batch_id)? else { return Ok(None) };
    for (_, value) in log.scan(Table::State, &entries_prefix(batch_id))? {
        let entry: SettlementEntry = decode_value(&value, "batch entry")
            .map_err(|e| LogError::BadSnapshot { name: format!("batch {batch_id}"), reason: e.to_string() })?;
        batch.entry_ids.insert(entry.entry_id);
        batch.entries.push(entry);
    }
    Ok(Some(batch))
}
