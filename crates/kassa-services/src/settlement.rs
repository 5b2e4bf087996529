//! The settlement batching service.
//!
//! It follows `payments.events`: every capture and refund becomes an entry in
//! the open batch of its provider, merchant and currency. At a cut-off (on a
//! schedule, or asked by an operator) every open batch closes with its totals
//! and fees, and each captured payment in it is recorded settled — a
//! `command.record_settlement` its relay publishes to `payments.commands`.
//!
//! One actor owns every batch (batches span payment partitions): the
//! partitions' messages are merged into its single input, and each input
//! batch is decided by the pure rules (`kassa_domain::settlement`) and written
//! with the consumed offsets in one append.

use crate::batch_store::{batch_writes, load_batch};
use crate::consume::{
    EVENTS_PER_APPEND_MAX, RangeError, append_in_chunks, fetch_range, follow, id_key, position_write,
};
use crate::messages::PaymentCommandMessage;
use crate::relay::{RelayConfig, relayed_write, run_relay};
use crate::runtime::{Clock, derived_id};
use crate::topics::{PAYMENT_COMMANDS, PAYMENT_EVENTS, SETTLEMENT_EVENTS};
use kassa_bus::{Bus, Message};
use kassa_codec::{EventPayload, decode_frame, decode_value, encode_value};
use kassa_domain::settlement::{
    BatchCommand, BatchEvent, BatchKey, BatchState, EntryKind, FeeSchedule, SettlementEntry, apply_batch, decide_batch,
    try_apply_batch,
};
use kassa_domain::{BatchId, Currency, MerchantId, PaymentEvent, PaymentId};
use kassa_eventlog::{AppendRequest, EventLog, LogError, NewEvent, StateWrite, Table};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Bounds and rules of settlement. Units last.
#[derive(Debug, Clone)]
pub struct SettlementConfig {
    /// Close every open batch this often (0: only when an operator asks).
    pub cutoff_interval_ms: u64,
    /// Fees per provider; `default_fees` for the others.
    pub fees: HashMap<String, FeeSchedule>,
    pub default_fees: FeeSchedule,
    /// Messages decided and written in one append, at most.
    pub batch_inputs_max: usize,
}

impl Default for SettlementConfig {
    fn default() -> Self {
        SettlementConfig {
            cutoff_interval_ms: 60_000,
            fees: HashMap::new(),
            default_fees: FeeSchedule { capture_basis_points: 290, capture_fixed_minor: 25 },
            batch_inputs_max: 1024,
        }
    }
}

/// What settlement needs to know of a payment before its captures arrive.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PaymentInfo {
    merchant_id: Option<MerchantId>,
    currency: Option<Currency>,
    provider: Option<String>,
    /// Stream sequence applied last: drops re-published events.
    applied_seq: u64,
}

enum Input {
    Messages(u32, Vec<Message>),
    Cutoff(Option<oneshot::Sender<Result<Vec<BatchId>, LogError>>>),
}

/// The service; share behind an `Arc`.
#[derive(Debug)]
pub struct SettlementService {
    log: Arc<EventLog>,
    bus: Arc<dyn Bus>,
    clock: Arc<dyn Clock>,
    config: SettlementConfig,
    inputs: mpsc::Sender<Input>,
    receiver: std::sync::Mutex<Option<mpsc::Receiver<Input>>>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Messages(partition, messages) => write!(f, "Messages({partition}, {})", messages.len()),
            Input::Cutoff(_) => write!(f, "Cutoff"),
        }
    }
}

fn open_key(key: &BatchKey) -> Vec<u8> {
    let mut bytes = b"open/".to_vec();
    bytes.extend_from_slice(&encode_value(key));
    bytes
}

fn merchant_batches_key(merchant_id: MerchantId, batch_id: BatchId) -> Vec<u8> {
    let mut key = format!("merchant-batches/{merchant_id}/").into_bytes();
    key.extend_from_slice(&(u128::MAX - batch_id.as_u128()).to_be_bytes());
    key
}

fn offset_key(partition: u32) -> Vec<u8> {
    format!("{PAYMENT_EVENTS}/{partition}").into_bytes()
}

impl SettlementService {
    pub fn new(log: Arc<EventLog>, bus: Arc<dyn Bus>, clock: Arc<dyn Clock>, config: SettlementConfig) -> Self {
        let (inputs, receiver) = mpsc::channel(64);
        SettlementService { log, bus, clock, config, inputs, receiver: std::sync::Mutex::new(Some(receiver)) }
    }

    /// Start the actor, one reader per partition of `payments.events`, the
    /// cut-off timer, and the relay of settlement commands.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Result<Vec<JoinHandle<()>>, kassa_bus::BusError> {
        let receiver = self.receiver.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut receiver) = receiver else { return Ok(Vec::new()) };
        let mut tasks = Vec::new();
        for partition in 0..self.bus.partitions(PAYMENT_EVENTS)? {
            let service = Arc::clone(self);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let at = (PAYMENT_EVENTS, partition, offset_key(partition));
                let max = service.config.batch_inputs_max;
                let followed = follow(&service.log, &service.bus, (at.0, at.1, &at.2), max, stop, |messages| async {
                    let input = Input::Messages(partition, messages);
                    service.inputs.send(input).await.map_err(|_| "the settlement actor stopped".to_owned())
                });
                if let Err(reason) = followed.await {
                    tracing::error!(partition, %reason, "settlement reader stopped");
                }
            }));
        }
        if self.config.cutoff_interval_ms > 0 {
            let service = Arc::clone(self);
            let mut stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(service.config.cutoff_interval_ms));
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tick.tick() => {
                            if service.inputs.send(Input::Cutoff(None)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        let service = Arc::clone(self);
        let mut actor_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut actor = Actor { service: Arc::clone(&service), infos: HashMap::new(), batches: HashMap::new() };
            loop {
                let input = tokio::select! {
                    _ = actor_stop.changed() => return,
                    input = receiver.recv() => input,
                };
                let Some(input) = input else { return };
                let result = match input {
                    Input::Messages(partition, messages) => actor.consume(partition, messages).await.map(|_| ()),
                    Input::Cutoff(reply) => {
                        let closed = actor.cutoff().await;
                        let failed = closed.as_ref().err().cloned();
                        if let Some(reply) = reply {
                            let _ = reply.send(closed);
                        }
                        failed.map_or(Ok(()), Err)
                    }
                };
                if let Err(error) = result {
                    tracing::error!(%error, "settlement failed; stopping it (restart to recover)");
                    return;
                }
            }
        }));
        tasks.push(tokio::spawn(run_relay(
            Arc::clone(&self.log),
            Arc::clone(&self.bus),
            PAYMENT_COMMANDS,
            |e| e.event_type.starts_with("command.").then_some(PAYMENT_COMMANDS),
            RelayConfig::default(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(run_relay(
            Arc::clone(&self.log),
            Arc::clone(&self.bus),
            SETTLEMENT_EVENTS,
            |e| e.event_type.starts_with("settlement.").then_some(SETTLEMENT_EVENTS),
            RelayConfig::default(),
            stop,
        )));
        Ok(tasks)
    }

    /// Close every open batch now; returns the closed batches' ids.
    pub async fn cutoff(&self) -> Result<Vec<BatchId>, LogError> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::Cutoff(Some(reply))).await.map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    /// A batch as stored, with its entries.
    pub fn batch(&self, batch_id: BatchId) -> Result<Option<BatchState>, LogError> {
        load_batch(&self.log, batch_id)
    }

    /// A merchant's batches, newest first.
    pub fn batches(&self, merchant_id: MerchantId, limit: usize) -> Result<Vec<BatchState>, LogError> {
        let prefix = format!("merchant-batches/{merchant_id}/").into_bytes();
        let mut out = Vec::new();
        for (key, _) in self.log.scan(Table::State, &prefix)?.into_iter().take(limit) {
            let Some(bytes) = key.get(key.len() - 16..).and_then(|b| <[u8; 16]>::try_from(b).ok()) else { continue };
            let batch_id = BatchId::from_u128(u128::MAX - u128::from_be_bytes(bytes));
            if let Some(batch) = self.batch(batch_id)? {
                out.push(batch);
            }
        }
        Ok(out)
    }
}

/// Why settlement could not be rebuilt from the topics.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("the settlement log to rebuild into is not empty (it holds {0} events): rebuild into a new one")]
    NotEmpty(u64),
    #[error("reading {SETTLEMENT_EVENTS}: {0}")]
    Range(#[from] RangeError),
    #[error(transparent)]
    Bus(#[from] kassa_bus::BusError),
    #[error("writing the rebuilt state: {0}")]
    Log(#[from] LogError),
    #[error("{SETTLEMENT_EVENTS} {partition}@{offset}: {reason}; the batches cannot be rebuilt from this topic")]
    Bad { partition: u32, offset: u64, reason: String },
}

/// What a rebuild restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Batch events replayed (re-published copies dropped).
    pub events: u64,
    pub batches: u64,
    /// Of them, still open (they close at the next cut-off).
    pub open: u64,
}

impl SettlementService {
    /// Rebuild settlement's batches into an empty `log` from `settlement.events`,
    /// where its relay published every batch event (for a lost or suspect disk).
    /// Each batch's events keep their ids and order, and the relays start past
    /// them (nothing is published again). What batches were made of is then
    /// known; the service, started on this log, follows `payments.events` from
    /// the start again to learn each payment's merchant, currency and provider,
    /// and adds only the captures and refunds no batch holds yet.
    pub async fn rebuild(log: &EventLog, bus: &dyn Bus) -> Result<Rebuilt, RebuildError> {
        if log.head_position() > 0 {
            return Err(RebuildError::NotEmpty(log.head_position()));
        }
        // Until the last append, the log is half-built: `spawn` refuses it.
        log.append(AppendRequest { writes: vec![position_write(REBUILDING.to_vec(), 1)], ..Default::default() })
            .await?;
        let mut rebuilt = Rebuilt { events: 0, batches: 0, open: 0 };
        // The open batches of each key, over every partition (batches of one key are on several,
        // so a later batch may be read before an earlier one closes).
        let mut open_by_key: HashMap<BatchKey, std::collections::BTreeSet<BatchId>> = HashMap::new();
        for partition in 0..bus.partitions(SETTLEMENT_EVENTS)? {
            let end = bus.end_offset(SETTLEMENT_EVENTS, partition)?;
            // A batch's events are all on one partition, in order: batches of this partition until closed.
            let mut batches: HashMap<BatchId, BatchState> = HashMap::new();
            // Batches closed and written: any later event of theirs is a re-published copy.
            let mut closed: std::collections::HashSet<BatchId> = Default::default();
            let (mut next, mut empty_fetches) = (0, 0);
            while next < end {
                let messages = fetch_range(bus, SETTLEMENT_EVENTS, partition, next, end, &mut empty_fetches).await?;
                let mut events = Vec::with_capacity(messages.len());
                let mut writes = Vec::new();
                let mut changed: BTreeMap<BatchId, Vec<SettlementEntry>> = BTreeMap::new();
                for message in messages {
                    next = message.offset + 1;
                    let bad = |reason: String| RebuildError::Bad { partition, offset: message.offset, reason };
                    let envelope = decode_frame(&message.payload).map_err(|e| bad(e.to_string()))?;
                    let event = BatchEvent::decode_payload(&envelope.event_type, &envelope.payload)
                        .map_err(|e| bad(format!("{}: {e}", envelope.event_type)))?;
                    let batch_id = BatchId::from_u128(envelope.stream_id);
                    if closed.contains(&batch_id) {
                        continue;
                    }
                    let batch = batches.entry(batch_id).or_default();
                    if batch.holds(&event) {
                        continue;
                    }
                    try_apply_batch(batch, &event).map_err(|reason| bad(format!("batch {batch_id}: {reason}")))?;
                    let new_entries = changed.entry(batch_id).or_default();
                    match &event {
                        BatchEvent::Opened { key, .. } => {
                            open_by_key.entry(key.clone()).or_default().insert(batch_id);
                            writes.push(StateWrite {
                                table: Table::State,
                                key: merchant_batches_key(key.merchant_id, batch_id),
                                value: Some(Vec::new()),
                            });
                        }
                        BatchEvent::EntryAdded { entry } => {
                            writes.push(StateWrite {
                                table: Table::State,
                                key: id_key("entry/", entry.entry_id),
                                value: Some(batch_id.as_u128().to_be_bytes().to_vec()),
                            });
                            new_entries.push(entry.clone());
                        }
                        BatchEvent::Closed { closed_at, .. } => {
                            let key = batch.key.as_ref().expect("a closed batch was opened");
                            if let Some(open) = open_by_key.get_mut(key) {
                                open.remove(&batch_id);
                            }
                            // Its settlement commands may not have reached payments.commands
                            // (two relays, either may lead): made again with the same ids, and
                            // published again; authorization drops what it has by id.
                            for entry in batch.entries.iter().filter(|e| e.kind == EntryKind::Capture) {
                                events.push(settlement_command(entry, batch_id, closed_at.unix_ms()));
                            }
                        }
                    }
                    events.push(NewEvent {
                        event_id: envelope.event_id,
                        event_type: envelope.event_type,
                        stream_id: envelope.stream_id,
                        timestamp_ms: envelope.timestamp_ms,
                        causation_id: envelope.causation_id,
                        correlation_id: envelope.correlation_id,
                        payload: envelope.payload,
                    });
                }
                for (batch_id, new_entries) in &changed {
                    writes.extend(batch_writes(&batches[batch_id], new_entries));
                    if batches[batch_id].closed.is_some() {
                        batches.remove(batch_id);
                        closed.insert(*batch_id);
                        rebuilt.batches += 1;
                    }
                }
                rebuilt.events += events.len() as u64;
                append_in_chunks_with(log, events, writes).await?;
            }
            rebuilt.batches += batches.len() as u64;
        }
        // The open batch of each key (ids are time-ordered: the latest, should there be more than
        // one); the batch events' relay starts past them (they are on the topic already), the
        // commands' relay from the start (the commands made again above).
        let mut writes = Vec::new();
        for (key, open) in &open_by_key {
            let Some(batch_id) = open.last() else { continue };
            if open.len() > 1 {
                tracing::warn!(%batch_id, open = open.len(), "several open batches of one key; the latest takes new entries");
            }
            rebuilt.open += 1;
            writes.push(StateWrite {
                table: Table::State,
                key: open_key(key),
                value: Some(batch_id.as_u128().to_be_bytes().to_vec()),
            });
        }
        writes.push(relayed_write(SETTLEMENT_EVENTS, log.head_position()));
        writes.push(StateWrite { table: Table::Positions, key: REBUILDING.to_vec(), value: None });
        log.append(AppendRequest { writes, ..Default::default() }).await?;
        Ok(rebuilt)
    }

    /// Whether `log` holds a rebuild that did not finish (it must be rebuilt again, not used).
    pub fn rebuild_unfinished(log: &EventLog) -> Result<bool, LogError> {
        Ok(log.get(Table::Positions, REBUILDING)?.is_some())
    }
}

/// Set while a rebuild writes the log, cleared by its last append.
const REBUILDING: &[u8] = b"settlement.rebuilding";

/// The command that records `entry`'s payment settled in `batch_id`: the same
/// id whether a cut-off or a rebuild makes it.
fn settlement_command(entry: &SettlementEntry, batch_id: BatchId, timestamp_ms: i64) -> NewEvent {
    let command = PaymentCommandMessage::RecordSettlement { payment_id: entry.payment_id, batch_id };
    NewEvent {
        event_id: derived_id(entry.entry_id, command.event_type(), 3),
        event_type: command.event_type().to_owned(),
        stream_id: entry.payment_id.as_u128(),
        timestamp_ms,
        causation_id: Some(entry.entry_id),
        correlation_id: None,
        payload: command.encode_payload(),
    }
}

/// Append events and writes that may be more than one append carries: the
/// events in chunks, the writes with the last chunk.
async fn append_in_chunks_with(
    log: &EventLog,
    mut events: Vec<NewEvent>,
    writes: Vec<StateWrite>,
) -> Result<(), LogError> {
    let last = events.len().saturating_sub(EVENTS_PER_APPEND_MAX);
    let tail = events.split_off(last);
    append_in_chunks(log, events).await?;
    log.append(AppendRequest { events: tail, expected: Vec::new(), writes }).await?;
    Ok(())
}

struct Actor {
    service: Arc<SettlementService>,
    infos: HashMap<PaymentId, PaymentInfo>,
    /// Open batches by key, loaded on first use.
    batches: HashMap<BatchKey, BatchState>,
}

impl Actor {
    fn info(&mut self, payment_id: PaymentId) -> Result<PaymentInfo, LogError> {
        if let Some(info) = self.infos.get(&payment_id) {
            return Ok(info.clone());
        }
        Ok(match self.service.log.get(Table::State, &id_key("info/", payment_id.as_u128()))? {
            Some(bytes) => decode_value(&bytes, "payment info").unwrap_or_default(),
            None => PaymentInfo::default(),
        })
    }

    /// The open batch of `key`, taken out of the cache (it goes back after the
    /// append that changes it, so a failed append leaves the durable one to load):
    /// never cloned, since a batch holds every entry and grows until cut-off.
    fn take_batch(&mut self, key: &BatchKey) -> Result<Option<BatchState>, LogError> {
        if let Some(batch) = self.batches.remove(key) {
            return Ok(Some(batch));
        }
        let Some(id) = self.service.log.get(Table::State, &open_key(key))? else { return Ok(None) };
        let Ok(bytes) = <[u8; 16]>::try_from(id.as_slice()) else { return Ok(None) };
        self.service.batch(BatchId::from_u128(u128::from_be_bytes(bytes)))
    }

    fn record(
        &self,
        events: &mut Vec<NewEvent>,
        stream: u128,
        cause: u128,
        index: u64,
        event_type: &str,
        payload: Vec<u8>,
    ) {
        events.push(NewEvent {
            event_id: derived_id(cause, event_type, index),
            event_type: event_type.to_owned(),
            stream_id: stream,
            timestamp_ms: self.service.clock.now().unix_ms(),
            causation_id: Some(cause),
            correlation_id: None,
            payload,
        });
    }

    async fn consume(&mut self, partition: u32, messages: Vec<Message>) -> Result<(), LogError> {
        let now = self.service.clock.now();
        let mut events = Vec::new();
        let mut writes = Vec::new();
        let mut changed_infos: BTreeMap<PaymentId, PaymentInfo> = BTreeMap::new();
        let mut changed_batches: HashMap<BatchKey, BatchState> = HashMap::new();
        let mut new_entries: HashMap<BatchKey, Vec<SettlementEntry>> = HashMap::new();
        let last_offset = messages.last().map(|m| m.offset);
        for message in messages {
            let Ok(envelope) = decode_frame(&message.payload) else {
                tracing::error!(partition, offset = message.offset, "undecodable event skipped");
                continue;
            };
            let payment_id = PaymentId::from_u128(envelope.stream_id);
            let mut info = match changed_infos.get(&payment_id) {
                Some(info) => info.clone(),
                None => self.info(payment_id)?,
            };
            if envelope.stream_seq <= info.applied_seq {
                continue;
            }
            info.applied_seq = envelope.stream_seq;
            let Ok(event) = PaymentEvent::decode_payload(&envelope.event_type, &envelope.payload) else {
                changed_infos.insert(payment_id, info);
                continue; // not a payment event (a rejection): nothing to settle
            };
            let entry = match event {
                PaymentEvent::Requested(r) => {
                    info.merchant_id = Some(r.merchant_id);
                    info.currency = Some(r.amount.currency);
                    None
                }
                PaymentEvent::Authorized { provider, .. } => {
                    info.provider = Some(provider);
                    None
                }
                PaymentEvent::Captured { capture_id, amount } => Some(SettlementEntry {
                    entry_id: capture_id.as_u128(),
                    payment_id,
                    kind: EntryKind::Capture,
                    amount,
                }),
                PaymentEvent::Refunded { refund_id, amount } => {
                    Some(SettlementEntry { entry_id: refund_id.as_u128(), payment_id, kind: EntryKind::Refund, amount })
                }
                _ => None,
            };
            if let (Some(entry), Some(merchant_id), Some(currency), Some(provider)) =
                (entry, info.merchant_id, info.currency, info.provider.clone())
            {
                let entry_key = id_key("entry/", entry.entry_id);
                if self.service.log.get(Table::State, &entry_key)?.is_some() {
                    // Batched already (a replay of payments.events after a rebuild):
                    // no batch opens for it.
                    changed_infos.insert(payment_id, info);
                    continue;
                }
                let key = BatchKey { provider, merchant_id, currency };
                let mut batch = match changed_batches.remove(&key) {
                    Some(batch) => batch,
                    None => self.take_batch(&key)?.unwrap_or_default(),
                };
                if batch.key.is_none() {
                    // Time-ordered (newest-first listings), unique by its first entry.
                    let batch_id = BatchId::from_parts(now.unix_ms() as u64, derived_id(entry.entry_id, "batch", 0));
                    let open = decide_batch(&batch, BatchCommand::Open { batch_id, key: key.clone() }, now)
                        .map_err(|r| LogError::BadChunk { position: 0, reason: r.to_string() })?;
                    for event in open {
                        apply_batch(&mut batch, &event);
                        self.record(
                            &mut events,
                            batch_id.as_u128(),
                            entry.entry_id,
                            0,
                            event.event_type(),
                            event.encode_payload(),
                        );
                    }
                    writes.push(StateWrite {
                        table: Table::State,
                        key: open_key(&key),
                        value: Some(batch_id.as_u128().to_be_bytes().to_vec()),
                    });
                    writes.push(StateWrite {
                        table: Table::State,
                        key: merchant_batches_key(merchant_id, batch_id),
                        value: Some(Vec::new()),
                    });
                }
                let batch_id = batch.batch_id.expect("opened above");
                match decide_batch(&batch, BatchCommand::Add { entry: entry.clone() }, now) {
                    Ok(added) => {
                        for event in added {
                            apply_batch(&mut batch, &event);
                            self.record(
                                &mut events,
                                batch_id.as_u128(),
                                entry.entry_id,
                                1,
                                event.event_type(),
                                event.encode_payload(),
                            );
                        }
                        writes.push(StateWrite {
                            table: Table::State,
                            key: entry_key,
                            value: Some(batch_id.as_u128().to_be_bytes().to_vec()),
                        });
                        new_entries.entry(key.clone()).or_default().push(entry.clone());
                    }
                    Err(rejection) => {
                        tracing::error!(entry = entry.entry_id, %rejection, "entry not batched; needs an operator")
                    }
                }
                changed_batches.insert(key, batch);
            }
            changed_infos.insert(payment_id, info);
        }
        for (payment_id, info) in &changed_infos {
            writes.push(StateWrite {
                table: Table::State,
                key: id_key("info/", payment_id.as_u128()),
                value: Some(encode_value(info)),
            });
        }
        for (key, batch) in &changed_batches {
            writes.extend(batch_writes(batch, new_entries.get(key).map_or(&[][..], Vec::as_slice)));
        }
        if let Some(offset) = last_offset {
            writes.push(StateWrite {
                table: Table::Positions,
                key: offset_key(partition),
                value: Some((offset + 1).to_be_bytes().to_vec()),
            });
        }
        self.service.log.append(AppendRequest { events, expected: Vec::new(), writes }).await?;
        if let Some(offset) = last_offset {
            self.service.bus.note_consumed(crate::topics::SETTLEMENT_GROUP, PAYMENT_EVENTS, partition, offset + 1);
        }
        if self.infos.len() > 100_000 {
            self.infos.clear();
        }
        self.infos.extend(changed_infos);
        self.batches.extend(changed_batches);
        Ok(())
    }

    /// Close every open batch; record each captured payment in it settled.
    async fn cutoff(&mut self) -> Result<Vec<BatchId>, LogError> {
        let now = self.service.clock.now();
        let open = self.service.log.scan(Table::State, b"open/")?;
        let mut closed = Vec::new();
        for (open_key_bytes, id) in open {
            let Ok(bytes) = <[u8; 16]>::try_from(id.as_slice()) else { continue };
            let batch_id = BatchId::from_u128(u128::from_be_bytes(bytes));
            let Some(mut batch) = self.service.batch(batch_id)? else { continue };
            let key = batch.key.clone().expect("a stored batch has a key");
            let fees = self.service.config.fees.get(&key.provider).copied().unwrap_or(self.service.config.default_fees);
            let mut close_events = Vec::new();
            match decide_batch(&batch, BatchCommand::Close { fees }, now) {
                Ok(close) => {
                    for event in close {
                        apply_batch(&mut batch, &event);
                        let payload = event.encode_payload();
                        self.record(
                            &mut close_events,
                            batch_id.as_u128(),
                            batch_id.as_u128(),
                            2,
                            event.event_type(),
                            payload,
                        );
                    }
                }
                Err(rejection) => {
                    tracing::warn!(%batch_id, %rejection, "batch not closed");
                    continue;
                }
            }
            // A batch can hold more captures than one append may carry: the
            // settlement commands go first, in chunks, and the close last. A
            // crash in between leaves the batch open; the next cut-off sends
            // the commands again, and a payment already settled refuses the
            // repeat, so none is settled twice.
            let mut commands = Vec::new();
            for entry in batch.entries.iter().filter(|e| e.kind == EntryKind::Capture) {
                commands.push(settlement_command(entry, batch_id, now.unix_ms()));
            }
            append_in_chunks(&self.service.log, commands).await?;
            let mut writes = batch_writes(&batch, &[]);
            writes.push(StateWrite { table: Table::State, key: open_key_bytes, value: None });
            self.service.log.append(AppendRequest { events: close_events, expected: Vec::new(), writes }).await?;
            self.batches.remove(&key);
            closed.push(batch_id);
        }
        Ok(closed)
    }
}
