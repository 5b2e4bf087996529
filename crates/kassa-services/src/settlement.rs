//! The settlement batching service.
//!
//! Every capture and refund becomes an entry in the open batch of its
//! provider, merchant and currency. At a cut-off (on a schedule, or asked by
//! an operator) every open batch closes with its totals and fees, and each
//! captured payment in it is recorded settled — `command.record_settlements`
//! (up to four payments each) its relay publishes to `payments.commands`.
//!
//! Batches span payment partitions, so settlement works in two stages, each
//! shared by the service's instances through a consumer group:
//!
//! - **The feed** follows `payments.events` (group `kassa-settlement`). It
//!   keeps what it must know of each payment first (merchant, currency,
//!   provider), and turns each capture and refund into a
//!   `settlement.entry_pending` keyed by its batch key, which its relay
//!   publishes to `settlement.entries`. Its state is a function of its input:
//!   a partition that moves is read again from where its new owner last was
//!   (the start, if never), and the entries it sends again are dropped by id.
//! - **The batches** follow `settlement.entries` (group
//!   `kassa-settlement-batches`): one key's batches all live on one partition,
//!   whose owner adds entries (each once, by id), and closes its open batches
//!   when it reads a `settlement.cutoff_requested`. With `changelog` on, each
//!   commit goes to `settlement.changelog` first, so a partition that moves
//!   takes its batches along (`changelog.rs`).
//!
//! Cut-offs are requests on `settlement.entries`, one per partition: entries
//! before one on a partition are in the batches it closes, entries after it in
//! the next. The schedule sends one per slot of `cutoff_interval_ms` (every
//! instance does; a partition closes once per slot), an operator one that
//! always closes.

use crate::batch_store::{batch_writes, load_batch, load_header};
use crate::changelog;
use crate::consume::{
    Owned, PartitionEnd, RangeError, appends_of, fetch_range, id_key, next_batch, position_write, resume_subscription,
    run_partitions, stored_offset,
};
use crate::messages::{CUTOFF_REQUESTED, PaymentCommandMessage, SettlementInput, commands_for_payments};
use crate::payment_key;
use crate::relay::{RelayConfig, run_relay};
use crate::runtime::{Clock, derived_id};
use crate::topics::{
    PAYMENT_COMMANDS, PAYMENT_EVENTS, SETTLEMENT_BATCHES_GROUP, SETTLEMENT_CHANGELOG, SETTLEMENT_ENTRIES,
    SETTLEMENT_EVENTS, SETTLEMENT_GROUP,
};
use kassa_bus::{Bus, BusError, Membership, Message, Record, partition_for};
use kassa_codec::{Envelope, EventPayload, decode_frame, decode_frame_ref, decode_value, encode_frame, encode_value};
use kassa_domain::settlement::{
    BatchCommand, BatchEvent, BatchKey, BatchState, EntryKind, FeeSchedule, SettlementEntry, apply_batch, decide_batch,
    try_apply_batch,
};
use kassa_domain::{BatchId, Currency, MerchantId, PaymentEvent, PaymentId};
use kassa_eventlog::{AppendRequest, Durability, EventLog, LogError, NewEvent, StateWrite, Table};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bounds and rules of settlement. Units last.
#[derive(Debug, Clone)]
pub struct SettlementConfig {
    /// Close every open batch once per slot of this length, counted from the
    /// Unix epoch (0: only when an operator asks).
    pub cutoff_interval_ms: u64,
    /// Fees per provider; `default_fees` for the others.
    pub fees: HashMap<String, FeeSchedule>,
    pub default_fees: FeeSchedule,
    /// Messages decided and written in one append, at most.
    pub batch_inputs_max: usize,
    /// Share the partitions with other instances through consumer groups, the
    /// batches' state moving through `settlement.changelog` (`kassa settle`).
    /// Off: this instance owns every partition.
    pub changelog: bool,
    /// How long an operator's cut-off waits for this instance's partitions to close their batches.
    pub cutoff_wait_ms: u64,
}

impl Default for SettlementConfig {
    fn default() -> Self {
        SettlementConfig {
            cutoff_interval_ms: 60_000,
            fees: HashMap::new(),
            default_fees: FeeSchedule { capture_basis_points: 290, capture_fixed_minor: 25 },
            batch_inputs_max: 1024,
            changelog: false,
            cutoff_wait_ms: 10_000,
        }
    }
}

/// What settlement needs to know of a payment before its captures arrive.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PaymentInfo {
    merchant_id: Option<MerchantId>,
    currency: Option<Currency>,
    provider: Option<String>,
    /// Stream sequence of the event that set it last (kept for the stored layout).
    applied_seq: u64,
}

/// What an operator's cut-off closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoffDone {
    /// The batches closed by this instance's partitions.
    pub closed: Vec<BatchId>,
    /// Whether every partition of `settlement.entries` answered here (this
    /// instance owns them all). If not, the other partitions close their
    /// batches when their owners read the request.
    pub complete: bool,
}

/// Why a cut-off could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum CutoffError {
    #[error("the cut-off request could not be published to {SETTLEMENT_ENTRIES}: {0}")]
    Bus(#[from] BusError),
}

/// Why settlement cannot start on a log.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(
        "this settlement log holds batches made without {SETTLEMENT_CHANGELOG} (by an earlier Kassa, or by \
         `kassa up`): another settler could not take them over. Start `kassa settle` on a new data directory: \
         each partition takes its batches from {SETTLEMENT_EVENTS} the first time it is claimed"
    )]
    Unshared,
    #[error(
        "this settlement log was written by `kassa settle` (its batches are shared through {SETTLEMENT_CHANGELOG} \
         and may be stale here); run it with `kassa settle`, not alone"
    )]
    Shared,
}

/// The service; share behind an `Arc`.
#[derive(Debug)]
pub struct SettlementService {
    log: Arc<EventLog>,
    bus: Arc<dyn Bus>,
    clock: Arc<dyn Clock>,
    config: SettlementConfig,
    /// The partitions of `settlement.entries` whose batches this instance owns.
    owned: Owned,
    /// The partitions of `payments.events` this instance feeds from.
    fed: Owned,
    /// Of `owned`, those whose changelog has been replayed here (their batches are current).
    taken: Owned,
    /// Operators' cut-offs being waited for: what each partition closed.
    waiting: std::sync::Mutex<HashMap<u128, BTreeMap<u32, Vec<BatchId>>>>,
    answered: tokio::sync::Notify,
    /// Set by the first `spawn`: a second starts nothing.
    spawned: std::sync::atomic::AtomicBool,
}

/// Marks a partition as taken while it lives.
struct Taken<'a>(&'a Owned, u32);

impl<'a> Taken<'a> {
    fn new(set: &'a Owned, partition: u32) -> Self {
        set.lock().unwrap_or_else(|e| e.into_inner()).insert(partition);
        Taken(set, partition)
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

/// Drops an operator's cut-off from `waiting` however its wait ends (its caller may go away).
struct Waiting<'a>(&'a SettlementService, u128);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
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

/// A state key that names a batch (`open/`, `entry/`).
fn batch_ref(key: Vec<u8>, batch_id: BatchId) -> StateWrite {
    StateWrite { table: Table::State, key, value: Some(batch_id.as_u128().to_be_bytes().to_vec()) }
}

/// Where the feed stores its position in `payments.events`.
fn feed_offset_key(partition: u32) -> Vec<u8> {
    format!("{PAYMENT_EVENTS}/{partition}").into_bytes()
}

/// Where the batches store their position in `settlement.entries`.
fn entries_offset_key(partition: u32) -> Vec<u8> {
    format!("{SETTLEMENT_ENTRIES}/{partition}").into_bytes()
}

/// The time (ms since the epoch) of the last scheduled cut-off a partition closed.
fn slot_key(partition: u32) -> Vec<u8> {
    format!("{SETTLEMENT_ENTRIES}/{partition}/cutoff-slot").into_bytes()
}

/// Set once a partition has taken its keys' batches from `settlement.events`.
fn imported_key(partition: u32) -> Vec<u8> {
    format!("{SETTLEMENT_ENTRIES}/{partition}/imported").into_bytes()
}

/// Set on a log whose batches' state is on `settlement.changelog`.
const SHARED: &[u8] = b"settlement.changelog/shared";

/// The stream (and message key) of a batch key's entries: the first 16 bytes
/// of SHA-256 over the key's encoding, the same in every instance.
pub fn key_stream(key: &BatchKey) -> u128 {
    let digest = Sha256::digest(encode_value(key));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

/// Which topic a relay publishes an event of the log to, by its type (none: not published).
type Route = fn(&str) -> Option<&'static str>;

/// The commands that record the payments of a closed batch's captures
/// settled in it: the same ids whoever closes the batch.
fn settlement_commands(batch: &BatchState, batch_id: BatchId, partitions: u32, timestamp_ms: i64) -> Vec<NewEvent> {
    let captures = batch.entries.iter().filter(|e| e.kind == EntryKind::Capture).map(|e| e.payment_id);
    commands_for_payments(captures, partitions, batch_id.as_u128(), timestamp_ms, |payment_ids| {
        PaymentCommandMessage::RecordSettlements { payment_ids, batch_id }
    })
}

/// Why a partition of the batches stopped.
#[derive(Debug, thiserror::Error)]
enum PartitionError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// Another instance owns the partition now: stop it, with no effect.
    #[error(transparent)]
    Fenced(#[from] changelog::Fenced),
    /// Stopped while a commit's fate on the changelog is unknown.
    #[error("stopped while the changelog was unreachable")]
    Stopped,
    #[error("reading {SETTLEMENT_EVENTS} to take the partition's batches: {0}")]
    Range(#[from] RangeError),
    #[error("{SETTLEMENT_EVENTS} {partition}@{offset}: {reason}; the partition's batches cannot be taken from it")]
    Bad { partition: u32, offset: u64, reason: String },
}

impl From<changelog::CommitError> for PartitionError {
    fn from(error: changelog::CommitError) -> Self {
        match error {
            changelog::CommitError::Log(error) => PartitionError::Log(error),
            changelog::CommitError::Fenced(fenced) => PartitionError::Fenced(fenced),
            changelog::CommitError::Stopped => PartitionError::Stopped,
        }
    }
}

/// What one input of the batches changes, until it is committed.
#[derive(Default)]
struct Pending {
    events: Vec<NewEvent>,
    writes: Vec<StateWrite>,
    batches: HashMap<BatchKey, BatchState>,
    new_entries: HashMap<BatchKey, Vec<SettlementEntry>>,
    /// Entries batched by this input (not in the log's index yet).
    batched: HashSet<u128>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.writes.is_empty() && self.batches.is_empty()
    }
}

impl SettlementService {
    pub fn new(log: Arc<EventLog>, bus: Arc<dyn Bus>, clock: Arc<dyn Clock>, config: SettlementConfig) -> Self {
        SettlementService {
            log,
            bus,
            clock,
            config,
            owned: Owned::default(),
            fed: Owned::default(),
            taken: Owned::default(),
            waiting: std::sync::Mutex::new(HashMap::new()),
            answered: tokio::sync::Notify::new(),
            spawned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The partitions of `settlement.entries` whose batches this instance owns now.
    pub fn partitions_owned(&self) -> Vec<u32> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    /// Start the feed (every partition of `payments.events`, or this
    /// instance's share in its group with `changelog`), the batches (likewise
    /// over `settlement.entries`), the cut-off schedule, and the relays.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Result<Vec<JoinHandle<()>>, StartError> {
        if self.spawned.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let entries = self.bus.partitions(SETTLEMENT_ENTRIES)?;
        let (feed, batches) = if self.config.changelog {
            let changelog = self.bus.partitions(SETTLEMENT_CHANGELOG)?;
            if changelog != entries {
                return Err(StartError::Bus(BusError::PartitionCountChanged {
                    topic: SETTLEMENT_CHANGELOG.to_owned(),
                    existing: changelog,
                    configured: entries,
                }));
            }
            self.check_shared()?;
            (
                self.bus.join_group(SETTLEMENT_GROUP, PAYMENT_EVENTS)?,
                self.bus.join_group(SETTLEMENT_BATCHES_GROUP, SETTLEMENT_ENTRIES)?,
            )
        } else {
            if self.log.get(Table::Positions, SHARED)?.is_some() {
                return Err(StartError::Shared);
            }
            (
                Membership::sole(SETTLEMENT_GROUP, self.bus.partitions(PAYMENT_EVENTS)?),
                Membership::sole(SETTLEMENT_BATCHES_GROUP, entries),
            )
        };
        let mut tasks = Vec::new();
        let service = Arc::clone(self);
        let feed_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let starter = Arc::clone(&service);
            run_partitions(feed, feed_stop, &service.fed, move |partition, _owner, stop| {
                tokio::spawn(Arc::clone(&starter).run_feed(partition, stop))
            })
            .await;
        }));
        let service = Arc::clone(self);
        let batches_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if service.config.changelog {
                let mark = AppendRequest { writes: vec![position_write(SHARED.to_vec(), 1)], ..Default::default() };
                if let Err(error) = service.log.append(mark).await {
                    tracing::error!(%error, "settlement cannot write its log; stopping");
                    return;
                }
            }
            let starter = Arc::clone(&service);
            run_partitions(batches, batches_stop, &service.owned, move |partition, owner, stop| {
                tokio::spawn(Arc::clone(&starter).run_batches(partition, owner, stop))
            })
            .await;
        }));
        if self.config.cutoff_interval_ms > 0 {
            tasks.push(tokio::spawn(Arc::clone(self).schedule_cutoffs(stop.clone())));
        }
        let relays: [(&'static str, Route); 3] = [
            (PAYMENT_COMMANDS, |t| t.starts_with("command.").then_some(PAYMENT_COMMANDS)),
            (SETTLEMENT_EVENTS, |t| BatchEvent::EVENT_TYPES.contains(&t).then_some(SETTLEMENT_EVENTS)),
            (SETTLEMENT_ENTRIES, |t| (t == crate::messages::ENTRY_PENDING).then_some(SETTLEMENT_ENTRIES)),
        ];
        for (name, route) in relays {
            let (log, bus) = (Arc::clone(&self.log), Arc::clone(&self.bus));
            tasks.push(tokio::spawn(run_relay(log, bus, name, route, RelayConfig::default(), stop.clone())));
        }
        Ok(tasks)
    }

    /// With `changelog` on: a log whose batches were made without it (by a
    /// version before it, or by `kassa up`) is refused, since another instance
    /// taking a partition over would not get them. A new one is marked before
    /// its first batch.
    fn check_shared(&self) -> Result<(), StartError> {
        if self.log.get(Table::Positions, SHARED)?.is_some() {
            return Ok(());
        }
        if !self.log.scan_range(Table::State, b"entry/", b"entry0", 1)?.is_empty() {
            return Err(StartError::Unshared);
        }
        Ok(())
    }

    /// Close every open batch now: a cut-off request to every partition of
    /// `settlement.entries`; waits (up to `cutoff_wait_ms`) for the partitions
    /// this instance owns to close theirs.
    pub async fn cutoff(&self) -> Result<CutoffDone, CutoffError> {
        let cutoff_id: u128 = rand::random();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(cutoff_id, BTreeMap::new());
        let _waiting = Waiting(self, cutoff_id);
        let requested = self.request_cutoff(cutoff_id, None).await;
        let waited = async {
            requested?;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.cutoff_wait_ms);
            loop {
                let answered = self.answered.notified();
                let done = {
                    let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                    let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
                    let reported = waiting.get(&cutoff_id);
                    owned.iter().all(|p| reported.is_some_and(|r| r.contains_key(p)))
                };
                if done || tokio::time::Instant::now() >= deadline {
                    return Ok(());
                }
                let _ = tokio::time::timeout_at(deadline, answered).await;
            }
        };
        let result: Result<(), CutoffError> = waited.await;
        let reported = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&cutoff_id).unwrap_or_default();
        result?;
        let partitions = self.bus.partitions(SETTLEMENT_ENTRIES)?;
        let complete = reported.len() == partitions as usize;
        Ok(CutoffDone { closed: reported.into_values().flatten().collect(), complete })
    }

    /// Put a cut-off request on every partition of `settlement.entries`.
    async fn request_cutoff(&self, cutoff_id: u128, slot: Option<u64>) -> Result<(), BusError> {
        let partitions = self.bus.partitions(SETTLEMENT_ENTRIES)?;
        let requested_at = self.clock.now();
        let input = SettlementInput::CutoffRequested { cutoff_id, slot, requested_at };
        let records = (0..partitions)
            .map(|partition| {
                let envelope = Envelope {
                    event_id: derived_id(cutoff_id, CUTOFF_REQUESTED, u64::from(partition)),
                    event_type: CUTOFF_REQUESTED.to_owned(),
                    stream_id: cutoff_id,
                    stream_seq: 1,
                    position: 0,
                    timestamp_ms: requested_at.unix_ms(),
                    causation_id: None,
                    correlation_id: None,
                    payload: input.encode_payload(),
                    prev_hash: [0; 32],
                };
                Record {
                    topic: SETTLEMENT_ENTRIES.to_owned(),
                    key: changelog::partition_key(partition, partitions),
                    payload: encode_frame(&envelope),
                    timestamp_ms: requested_at.unix_ms(),
                }
            })
            .collect();
        self.bus.produce(records).await?;
        Ok(())
    }

    /// Ask for a cut-off at the start of every slot of `cutoff_interval_ms`
    /// (counted from the Unix epoch), named by that time.
    async fn schedule_cutoffs(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let interval = self.config.cutoff_interval_ms.max(1);
        loop {
            let now = self.clock.now().unix_ms().max(0) as u64;
            let slot = (now / interval + 1) * interval;
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(slot - now)) => {}
            }
            if let Err(error) =
                self.request_cutoff(derived_id(u128::from(slot), "settlement.cutoff", 0), Some(slot)).await
            {
                tracing::warn!(slot, %error, "the scheduled cut-off could not be requested; the next slot's closes the batches");
            }
        }
    }

    /// A batch as stored, with its entries, if this instance holds it now.
    pub fn batch(&self, batch_id: BatchId) -> Result<Option<BatchState>, LogError> {
        match load_header(&self.log, batch_id)? {
            Some(header) if self.holds(&header) => load_batch(&self.log, batch_id),
            _ => Ok(None),
        }
    }

    /// A merchant's batches this instance holds now, newest first.
    pub fn batches(&self, merchant_id: MerchantId, limit: usize) -> Result<Vec<BatchState>, LogError> {
        self.merchant_batches(merchant_id, limit, |id| self.batch(id))
    }

    /// [`Self::batches`] without their entries: key, totals and state only
    /// (`entries` empty), however many entries each holds.
    pub fn batch_headers(&self, merchant_id: MerchantId, limit: usize) -> Result<Vec<BatchState>, LogError> {
        self.merchant_batches(merchant_id, limit, |id| {
            Ok(load_header(&self.log, id)?.filter(|header| self.holds(header)))
        })
    }

    fn merchant_batches(
        &self,
        merchant_id: MerchantId,
        limit: usize,
        load: impl Fn(BatchId) -> Result<Option<BatchState>, LogError>,
    ) -> Result<Vec<BatchState>, LogError> {
        let prefix = format!("merchant-batches/{merchant_id}/").into_bytes();
        let mut out = Vec::new();
        for (key, _) in self.log.scan(Table::State, &prefix)? {
            if out.len() >= limit {
                break;
            }
            let Some(bytes) = key.get(key.len() - 16..).and_then(|b| <[u8; 16]>::try_from(b).ok()) else { continue };
            let batch_id = BatchId::from_u128(u128::MAX - u128::from_be_bytes(bytes));
            if let Some(batch) = load(batch_id)? {
                out.push(batch);
            }
        }
        Ok(out)
    }

    /// Whether `batch` is current here. With the changelog, only the batches
    /// of the partitions this instance has taken (restored from the changelog)
    /// are: the copy a partition left behind when it moved on may be stale.
    /// Without it, every one.
    fn holds(&self, batch: &BatchState) -> bool {
        if !self.config.changelog {
            return true;
        }
        let (Some(key), Ok(partitions)) = (&batch.key, self.bus.partitions(SETTLEMENT_ENTRIES)) else { return false };
        let partition = partition_for(&payment_key(key_stream(key)), partitions);
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).contains(&partition)
    }

    fn event(&self, stream: u128, cause: u128, index: u64, event_type: &str, payload: Vec<u8>) -> NewEvent {
        NewEvent {
            event_id: derived_id(cause, event_type, index),
            event_type: event_type.to_owned(),
            stream_id: stream,
            timestamp_ms: self.clock.now().unix_ms(),
            causation_id: Some(cause),
            correlation_id: None,
            payload,
        }
    }
}

// The feed: payments.events → settlement.entries.
impl SettlementService {
    /// Follow one partition of `payments.events`.
    async fn run_feed(self: Arc<Self>, partition: u32, mut stop: watch::Receiver<bool>) -> PartitionEnd {
        let key = feed_offset_key(partition);
        let mut subscription = match resume_subscription(&self.log, &self.bus, PAYMENT_EVENTS, partition, &key) {
            Ok(subscription) => subscription,
            Err(error) => return PartitionEnd::Fatal(format!("reading the position in {PAYMENT_EVENTS}: {error}")),
        };
        let mut infos = HashMap::new();
        loop {
            let messages = match next_batch(&mut subscription, self.config.batch_inputs_max, &mut stop).await {
                Ok(Some(messages)) => messages,
                Ok(None) => return PartitionEnd::Again,
                Err(error) => return PartitionEnd::Fatal(error.to_string()),
            };
            if let Err(error) = self.feed(partition, messages, &mut infos).await {
                // Its log refuses writes: starting the partition again here cannot help.
                return PartitionEnd::Fatal(error.to_string());
            }
        }
    }

    fn info(&self, infos: &HashMap<PaymentId, PaymentInfo>, payment_id: PaymentId) -> Result<PaymentInfo, LogError> {
        if let Some(info) = infos.get(&payment_id) {
            return Ok(info.clone());
        }
        Ok(match self.log.get(Table::State, &id_key("info/", payment_id.as_u128()))? {
            Some(bytes) => decode_value(&bytes, "payment info").unwrap_or_default(),
            None => PaymentInfo::default(),
        })
    }

    /// Learn each payment's merchant, currency and provider; send its captures
    /// and refunds on to their batch keys.
    async fn feed(
        &self,
        partition: u32,
        messages: Vec<Message>,
        infos: &mut HashMap<PaymentId, PaymentInfo>,
    ) -> Result<(), LogError> {
        let mut events = Vec::new();
        let mut changed: BTreeMap<PaymentId, PaymentInfo> = BTreeMap::new();
        let last_offset = messages.last().map(|m| m.offset);
        for message in messages {
            let Ok(envelope) = decode_frame_ref(&message.payload) else {
                tracing::error!(partition, offset = message.offset, "undecodable event skipped");
                continue;
            };
            // Only these tell settlement anything; the rest are not even decoded.
            if !matches!(
                envelope.event_type,
                "payment.requested"
                    | "payment.authorized"
                    | "payment.stand_in_confirmed"
                    | "payment.captured"
                    | "payment.refunded"
            ) {
                continue;
            }
            let Ok(event) = PaymentEvent::decode_payload(envelope.event_type, envelope.payload) else {
                tracing::error!(partition, offset = message.offset, "undecodable payment event skipped");
                continue;
            };
            let payment_id = PaymentId::from_u128(envelope.stream_id);
            let mut info = match changed.get(&payment_id) {
                Some(info) => info.clone(),
                None => self.info(infos, payment_id)?,
            };
            // What is known of the payment is written only when it changes. A copy
            // published again sets the same again, or sends an entry again, which
            // the batches drop by its id.
            let entry = match event {
                PaymentEvent::Requested(r) => {
                    info.merchant_id = Some(r.merchant_id);
                    info.currency = Some(r.amount.currency);
                    info.applied_seq = envelope.stream_seq;
                    changed.insert(payment_id, info);
                    continue;
                }
                PaymentEvent::Authorized { provider, .. } | PaymentEvent::StandInConfirmed { provider, .. } => {
                    info.provider = Some(provider);
                    info.applied_seq = envelope.stream_seq;
                    changed.insert(payment_id, info);
                    continue;
                }
                PaymentEvent::Captured { capture_id, amount } => {
                    SettlementEntry { entry_id: capture_id.as_u128(), payment_id, kind: EntryKind::Capture, amount }
                }
                PaymentEvent::Refunded { refund_id, amount } => {
                    SettlementEntry { entry_id: refund_id.as_u128(), payment_id, kind: EntryKind::Refund, amount }
                }
                _ => continue,
            };
            match (info.merchant_id, info.currency, info.provider.clone()) {
                (Some(merchant_id), Some(currency), Some(provider)) => {
                    let key = BatchKey { provider, merchant_id, currency };
                    let input = SettlementInput::EntryPending { key: key.clone(), entry: entry.clone() };
                    let event_type = input.event_type();
                    events.push(NewEvent {
                        event_id: derived_id(entry.entry_id, event_type, 0),
                        event_type: event_type.to_owned(),
                        stream_id: key_stream(&key),
                        timestamp_ms: envelope.timestamp_ms,
                        causation_id: Some(envelope.event_id),
                        correlation_id: None,
                        payload: input.encode_payload(),
                    });
                }
                _ => tracing::error!(
                    %payment_id,
                    entry = entry.entry_id,
                    "a capture or refund of a payment whose request or authorization was not seen; not batched"
                ),
            }
        }
        let mut writes: Vec<StateWrite> = changed
            .iter()
            .map(|(payment_id, info)| StateWrite {
                table: Table::State,
                key: id_key("info/", payment_id.as_u128()),
                value: Some(encode_value(info)),
            })
            .collect();
        if let Some(offset) = last_offset {
            writes.push(position_write(feed_offset_key(partition), offset + 1));
        }
        // What the feed knows of payments is read from `payments.events` again if a crash of
        // the machine loses it with its offset; entries (events) make the append synced.
        let append = AppendRequest { events, writes, durability: Durability::Derived, ..Default::default() };
        self.log.append(append).await?;
        if let Some(offset) = last_offset {
            self.bus.note_consumed(SETTLEMENT_GROUP, PAYMENT_EVENTS, partition, offset + 1);
        }
        if infos.len() > 100_000 {
            infos.clear();
        }
        infos.extend(changed);
        Ok(())
    }
}

// The batches: settlement.entries → batches, settlement.events and payments.commands.
impl SettlementService {
    /// Own one partition of `settlement.entries`.
    async fn run_batches(
        self: Arc<Self>,
        partition: u32,
        owner: String,
        mut stop: watch::Receiver<bool>,
    ) -> PartitionEnd {
        let mut ownership = None;
        if self.config.changelog {
            // What other instances (or this one, before a crash) did with this partition, then a claim.
            let (log, bus) = (&self.log, self.bus.as_ref());
            let taken =
                changelog::take_partition(log, bus, SETTLEMENT_CHANGELOG, partition, &owner, &stop, "settlement");
            match taken.await {
                Ok((taken, _)) => ownership = Some(taken),
                Err(end) => return end,
            }
        }
        // Until the task ends, this partition's batches here are current.
        let _taken = Taken::new(&self.taken, partition);
        let key = entries_offset_key(partition);
        let mut subscription = match resume_subscription(&self.log, &self.bus, SETTLEMENT_ENTRIES, partition, &key) {
            Ok(subscription) => subscription,
            Err(error) => {
                return PartitionEnd::Fatal(format!("reading the position in {SETTLEMENT_ENTRIES}: {error}"));
            }
        };
        let partitions = match self.bus.partitions(SETTLEMENT_ENTRIES) {
            Ok(partitions) => partitions,
            Err(error) => return PartitionEnd::Fatal(error.to_string()),
        };
        // This partition's open batches, so each entry does not reload its batch.
        let mut open = HashMap::new();
        // With the changelog each input's commit is one Kafka record: ~400 bytes an entry,
        // so 256 stay well inside a broker's default 1 MB.
        let inputs_max =
            if self.config.changelog { self.config.batch_inputs_max.min(256) } else { self.config.batch_inputs_max };
        if ownership.is_some() {
            let imported = match stored_offset(&self.log, &imported_key(partition)) {
                Ok(imported) => imported,
                Err(error) => return PartitionEnd::Fatal(error.to_string()),
            };
            if imported == 0 {
                let mut batches =
                    Batches { service: &self, partition, partitions, ownership: ownership.as_mut(), open: &mut open };
                match batches.import(&stop).await {
                    Ok(count) => tracing::info!(partition, batches = count, "batches taken from {SETTLEMENT_EVENTS}"),
                    Err(PartitionError::Fenced(fenced)) => {
                        tracing::warn!(partition, %fenced, "another instance owns this partition now; stopped it here");
                        return PartitionEnd::TakenOver;
                    }
                    Err(error @ (PartitionError::Stopped | PartitionError::Range(_))) => {
                        tracing::warn!(partition, %error, "settlement partition stopped");
                        return PartitionEnd::Again;
                    }
                    Err(error) => return PartitionEnd::Fatal(error.to_string()),
                }
            }
        }
        loop {
            let messages = match next_batch(&mut subscription, inputs_max, &mut stop).await {
                Ok(Some(messages)) => messages,
                Ok(None) => return PartitionEnd::Again,
                Err(error) => return PartitionEnd::Fatal(error.to_string()),
            };
            let mut batches =
                Batches { service: &self, partition, partitions, ownership: ownership.as_mut(), open: &mut open };
            match batches.consume(messages, &stop).await {
                Ok(()) => {}
                // Its log refuses writes: starting the partition again here cannot help.
                Err(PartitionError::Log(error)) => return PartitionEnd::Fatal(error.to_string()),
                Err(PartitionError::Fenced(fenced)) => {
                    tracing::warn!(partition, %fenced, "another instance owns this partition now; stopped it here");
                    return PartitionEnd::TakenOver;
                }
                Err(error @ (PartitionError::Stopped | PartitionError::Range(_) | PartitionError::Bad { .. })) => {
                    tracing::warn!(partition, %error, "settlement partition stopped");
                    return PartitionEnd::Again;
                }
            }
        }
    }

    /// Note what a partition closed for an operator's cut-off someone waits for.
    fn answer_cutoff(&self, cutoff_id: u128, partition: u32, closed: Vec<BatchId>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(answers) = waiting.get_mut(&cutoff_id) {
            answers.insert(partition, closed);
            self.answered.notify_waiters();
        }
    }
}

/// One partition of the batches at work on an input.
struct Batches<'a, 'o> {
    service: &'a SettlementService,
    partition: u32,
    /// Of `settlement.entries`.
    partitions: u32,
    ownership: Option<&'o mut changelog::Ownership>,
    open: &'a mut HashMap<BatchKey, BatchState>,
}

impl Batches<'_, '_> {
    /// Make an append durable: on the changelog first (with it on), then in the log.
    async fn commit(&mut self, request: AppendRequest, stop: &watch::Receiver<bool>) -> Result<(), PartitionError> {
        self.commit_all(vec![request], stop).await
    }

    /// Make appends durable in their order, all in flight at once ([`changelog::commit_in_order`]).
    async fn commit_all(
        &mut self,
        requests: Vec<AppendRequest>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), PartitionError> {
        let (log, bus, now) = (&self.service.log, self.service.bus.as_ref(), self.service.clock.now().unix_ms());
        changelog::commit_in_order(log, bus, self.ownership.as_deref_mut(), requests, now, stop).await?;
        Ok(())
    }

    async fn consume(&mut self, messages: Vec<Message>, stop: &watch::Receiver<bool>) -> Result<(), PartitionError> {
        let partition = self.partition;
        let mut pending = Pending::default();
        let Some(last_offset) = messages.last().map(|m| m.offset) else { return Ok(()) };
        for message in messages {
            let input = decode_frame_ref(&message.payload).map_err(|e| e.to_string()).and_then(|envelope| {
                SettlementInput::decode(envelope.event_type, envelope.payload)
                    .map_err(|e| format!("{}: {e}", envelope.event_type))
            });
            match input {
                Err(reason) => {
                    tracing::error!(partition, offset = message.offset, %reason, "settlement input skipped")
                }
                Ok(SettlementInput::EntryPending { key, entry }) => self.add(&mut pending, key, entry)?,
                Ok(SettlementInput::CutoffRequested { cutoff_id, slot, .. }) => {
                    // What came before the request goes into the batches it closes.
                    if !pending.is_empty() {
                        self.flush(std::mem::take(&mut pending), message.offset, stop).await?;
                    }
                    let closed = self.close_open(slot, message.offset + 1, stop).await?;
                    if !closed.is_empty() {
                        tracing::info!(partition, batches = closed.len(), ?slot, "settlement batches closed");
                    }
                    self.service.answer_cutoff(cutoff_id, partition, closed);
                }
            }
        }
        self.flush(pending, last_offset + 1, stop).await?;
        self.service.bus.note_consumed(SETTLEMENT_BATCHES_GROUP, SETTLEMENT_ENTRIES, partition, last_offset + 1);
        Ok(())
    }

    /// Once per partition, before its first input with the changelog on: the
    /// batches of its keys that `settlement.events` holds — those a settler
    /// made without the changelog (an earlier Kassa, `kassa up --bus kafka`) —
    /// with their entries (so an entry the feed sends again is not batched a
    /// second time), the open ones left open, and each closed batch's
    /// settlement commands made again with their ids (authorization drops
    /// those it has). A new deployment's topic is empty. Returns how many
    /// batches were taken.
    async fn import(&mut self, stop: &watch::Receiver<bool>) -> Result<u64, PartitionError> {
        let bus = self.service.bus.as_ref();
        let commands_partitions = bus.partitions(PAYMENT_COMMANDS).map_err(RangeError::from)?;
        // A batch's events are all on one partition of settlement.events, in order.
        let mut batches: BTreeMap<BatchId, BatchState> = BTreeMap::new();
        let mut elsewhere: HashSet<BatchId> = HashSet::new();
        for partition in 0..bus.partitions(SETTLEMENT_EVENTS).map_err(RangeError::from)? {
            let end = bus.end_offset(SETTLEMENT_EVENTS, partition).map_err(RangeError::from)?;
            let (mut next, mut empty_fetches) = (0, 0);
            while next < end {
                let messages = fetch_range(bus, SETTLEMENT_EVENTS, partition, next, end, &mut empty_fetches).await?;
                for message in messages {
                    next = message.offset + 1;
                    let bad = |reason: String| PartitionError::Bad { partition, offset: message.offset, reason };
                    let envelope = decode_frame(&message.payload).map_err(|e| bad(e.to_string()))?;
                    let event = BatchEvent::decode_payload(&envelope.event_type, &envelope.payload)
                        .map_err(|e| bad(format!("{}: {e}", envelope.event_type)))?;
                    let batch_id = BatchId::from_u128(envelope.stream_id);
                    if elsewhere.contains(&batch_id) {
                        continue;
                    }
                    if let BatchEvent::Opened { key, .. } = &event
                        && partition_for(&payment_key(key_stream(key)), self.partitions) != self.partition
                    {
                        elsewhere.insert(batch_id);
                        continue;
                    }
                    let batch = batches.entry(batch_id).or_default();
                    if batch.holds(&event) {
                        continue; // published again
                    }
                    try_apply_batch(batch, &event).map_err(|reason| bad(format!("batch {batch_id}: {reason}")))?;
                }
            }
        }
        // The open batch of a key, should there be several: the latest (ids are time-ordered).
        let mut open: HashMap<BatchKey, BatchId> = HashMap::new();
        let mut commits: Vec<AppendRequest> = Vec::new();
        for (batch_id, batch) in &batches {
            let Some(key) = batch.key.clone() else { continue }; // its opening was not read
            let mut writes = batch_writes(batch, &batch.entries);
            writes.push(StateWrite {
                table: Table::State,
                key: merchant_batches_key(key.merchant_id, *batch_id),
                value: Some(Vec::new()),
            });
            writes.extend(batch.entries.iter().map(|entry| batch_ref(id_key("entry/", entry.entry_id), *batch_id)));
            let mut events = Vec::new();
            match batch.closed {
                Some((_, closed_at)) => {
                    events.extend(settlement_commands(batch, *batch_id, commands_partitions, closed_at.unix_ms()));
                }
                None => {
                    open.insert(key, *batch_id);
                }
            }
            // Small commits: each is one changelog record.
            for chunk in writes.chunks(512) {
                commits.push(AppendRequest { writes: chunk.to_vec(), ..Default::default() });
            }
            while !events.is_empty() {
                let rest = events.split_off(events.len().min(512));
                commits.push(AppendRequest { events: std::mem::replace(&mut events, rest), ..Default::default() });
            }
        }
        let mut last: Vec<StateWrite> =
            open.iter().map(|(key, batch_id)| batch_ref(open_key(key), *batch_id)).collect();
        last.push(position_write(imported_key(self.partition), 1));
        commits.push(AppendRequest { writes: last, ..Default::default() });
        self.commit_all(commits, stop).await?;
        Ok(batches.values().filter(|b| b.key.is_some()).count() as u64)
    }

    /// Commit what `pending` holds, with the partition's position (`next`).
    async fn flush(&mut self, pending: Pending, next: u64, stop: &watch::Receiver<bool>) -> Result<(), PartitionError> {
        let Pending { events, mut writes, batches, new_entries, .. } = pending;
        for (key, batch) in &batches {
            writes.extend(batch_writes(batch, new_entries.get(key).map_or(&[][..], Vec::as_slice)));
        }
        writes.push(position_write(entries_offset_key(self.partition), next));
        // Taken out of the cache while changed: a failed commit leaves the durable ones to load.
        self.commit(AppendRequest { events, writes, ..Default::default() }, stop).await?;
        if self.open.len() > 10_000 {
            self.open.clear();
        }
        self.open.extend(batches);
        Ok(())
    }

    /// The open batch of `key`: changed by this input, cached, or stored.
    fn take_batch(&mut self, pending: &mut Pending, key: &BatchKey) -> Result<BatchState, LogError> {
        if let Some(batch) = pending.batches.remove(key).or_else(|| self.open.remove(key)) {
            return Ok(batch);
        }
        let Some(id) = self.service.log.get(Table::State, &open_key(key))? else { return Ok(BatchState::default()) };
        let Ok(bytes) = <[u8; 16]>::try_from(id.as_slice()) else { return Ok(BatchState::default()) };
        Ok(load_batch(&self.service.log, BatchId::from_u128(u128::from_be_bytes(bytes)))?.unwrap_or_default())
    }

    /// Apply `events` (caused by `cause`) to `batch`, and record them in `pending`.
    fn record(&self, pending: &mut Pending, batch: &mut BatchState, cause: u128, index: u64, events: Vec<BatchEvent>) {
        for event in events {
            apply_batch(batch, &event);
            // The batch's id is known once it is applied (an opening sets it).
            let stream = batch.batch_id.map_or(0, |id| id.as_u128());
            pending.events.push(self.service.event(stream, cause, index, event.event_type(), event.encode_payload()));
        }
    }

    /// Add `entry` to the open batch of `key` (opening one), unless a batch holds it already.
    fn add(&mut self, pending: &mut Pending, key: BatchKey, entry: SettlementEntry) -> Result<(), LogError> {
        let entry_key = id_key("entry/", entry.entry_id);
        if pending.batched.contains(&entry.entry_id) || self.service.log.get(Table::State, &entry_key)?.is_some() {
            // Sent again (the feed read its partition again): batched once.
            return Ok(());
        }
        let now = self.service.clock.now();
        let mut batch = self.take_batch(pending, &key)?;
        if batch.key.is_none() {
            // Time-ordered (newest-first listings), unique by its first entry.
            let batch_id = BatchId::from_parts(now.unix_ms() as u64, derived_id(entry.entry_id, "batch", 0));
            let open = decide_batch(&batch, BatchCommand::Open { batch_id, key: key.clone() }, now)
                .map_err(|r| LogError::BadChunk { position: 0, reason: r.to_string() })?;
            self.record(pending, &mut batch, entry.entry_id, 0, open);
            pending.writes.push(batch_ref(open_key(&key), batch_id));
            pending.writes.push(StateWrite {
                table: Table::State,
                key: merchant_batches_key(key.merchant_id, batch_id),
                value: Some(Vec::new()),
            });
        }
        let batch_id = batch.batch_id.expect("opened above");
        match decide_batch(&batch, BatchCommand::Add { entry: entry.clone() }, now) {
            Ok(added) => {
                self.record(pending, &mut batch, entry.entry_id, 1, added);
                pending.writes.push(batch_ref(entry_key, batch_id));
                pending.batched.insert(entry.entry_id);
                pending.new_entries.entry(key.clone()).or_default().push(entry);
            }
            Err(rejection) => {
                tracing::error!(entry = entry.entry_id, %rejection, "entry not batched; needs an operator")
            }
        }
        pending.batches.insert(key, batch);
        Ok(())
    }

    /// Close every open batch of this partition (a scheduled `slot` once),
    /// recording each captured payment in them settled; the last commit stores
    /// the position `next`.
    async fn close_open(
        &mut self,
        slot: Option<u64>,
        next: u64,
        stop: &watch::Receiver<bool>,
    ) -> Result<Vec<BatchId>, PartitionError> {
        let partition = self.partition;
        let mut last = vec![position_write(entries_offset_key(partition), next)];
        if let Some(slot) = slot {
            if stored_offset(&self.service.log, &slot_key(partition))? >= slot {
                // Closed for this slot already (another instance asked too).
                self.commit(AppendRequest { writes: last, ..Default::default() }, stop).await?;
                return Ok(Vec::new());
            }
            last.push(position_write(slot_key(partition), slot));
        }
        let partitions = self.partitions;
        let commands_partitions = self.service.bus.partitions(PAYMENT_COMMANDS).map_err(RangeError::from)?;
        let mut open = Vec::new();
        for (key_bytes, id) in self.service.log.scan(Table::State, b"open/")? {
            let Ok(key) = decode_value::<BatchKey>(&key_bytes[b"open/".len()..], "batch key") else { continue };
            let Ok(bytes) = <[u8; 16]>::try_from(id.as_slice()) else { continue };
            if partition_for(&payment_key(key_stream(&key)), partitions) == partition {
                open.push((key_bytes, key, BatchId::from_u128(u128::from_be_bytes(bytes))));
            }
        }
        let now = self.service.clock.now();
        let mut closed = Vec::new();
        let count = open.len();
        for (index, (open_key_bytes, key, batch_id)) in open.into_iter().enumerate() {
            // The partition's cached copy is the stored batch (this task alone changes it, and
            // ends on a failed commit); read from the log only when it is not cached.
            let cached = self.open.remove(&key).filter(|batch| batch.batch_id == Some(batch_id));
            let stored = match cached {
                Some(batch) => Some(batch),
                None => load_batch(&self.service.log, batch_id)?,
            };
            let Some(mut batch) = stored else { continue };
            let fees = self.service.config.fees.get(&key.provider).copied().unwrap_or(self.service.config.default_fees);
            let mut close_events = Vec::new();
            match decide_batch(&batch, BatchCommand::Close { fees }, now) {
                Ok(close) => {
                    for event in close {
                        apply_batch(&mut batch, &event);
                        let (stream, payload) = (batch_id.as_u128(), event.encode_payload());
                        close_events.push(self.service.event(stream, stream, 2, event.event_type(), payload));
                    }
                }
                Err(rejection) => {
                    tracing::warn!(%batch_id, %rejection, "batch not closed");
                    continue;
                }
            }
            // A batch can hold more captures than one append may carry: the
            // settlement commands go first, in chunks, and the close last, all
            // queued at once (the log writes them in order, and a crash keeps a
            // prefix). A crash in between leaves the batch open; the next
            // cut-off sends the commands again (the same payments make the same
            // ids, which authorization drops; a payment settled in this batch
            // already is left as it is), so none is settled twice.
            let commands = settlement_commands(&batch, batch_id, commands_partitions, now.unix_ms());
            let mut writes = batch_writes(&batch, &[]);
            writes.push(StateWrite { table: Table::State, key: open_key_bytes, value: None });
            if index + 1 == count {
                writes.append(&mut last);
            }
            let mut requests = appends_of(commands);
            requests.push(AppendRequest { events: close_events, writes, ..Default::default() });
            self.commit_all(requests, stop).await?;
            closed.push(batch_id);
        }
        if !last.is_empty() {
            self.commit(AppendRequest { writes: last, ..Default::default() }, stop).await?;
        }
        Ok(closed)
    }
}
