//! The ingest service: the payments API's side of Kassa.
//!
//! It accepts requests (merchant auth, validation, idempotency), records each
//! accepted payment or command in its own log — the outbox its relay
//! publishes to `payments.commands` — and keeps a read model of every
//! payment, fed by `payments.events`, which answers reads and tells waiting
//! requests when their payment has an outcome. Merchants made here go out on
//! `merchants` too, and every instance follows that topic from its start, so
//! any instance knows every merchant's API key (several instances can serve
//! one set of topics).

use crate::consume::{follow, id_key};
use crate::messages::{
    CARD_SEALED, COMMAND_REJECTED, CommandRejected, DUPLICATE_REQUEST, DuplicateRequest, PaymentCommandMessage,
};
use crate::relay::{RelayConfig, run_relay};
use crate::runtime::{Clock, ExpiryClock};
use crate::seal::CardSeal;
use crate::topics::{MERCHANTS, PAYMENT_COMMANDS, PAYMENT_EVENTS};
use crate::vault::CardVault;
use kassa_api::{ApiError, ApiKey, ErrorType, fingerprint};
use kassa_bus::Bus;
use kassa_codec::{EventPayload, decode_frame, decode_frame_ref, decode_value, encode_value};
use kassa_domain::{
    CaptureId, MerchantId, PaymentCommand, PaymentEvent, PaymentId, PaymentState, RefundId, RequestPayment, apply,
    decide, try_apply,
};
use kassa_eventlog::{AppendRequest, Durability, EventLog, NewEvent, StateWrite, Table};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Bounds of the ingest service. Units last.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// How long a request waits for its payment's outcome before answering 202.
    pub outcome_wait_ms: u64,
    /// Key for card tokens (HMAC-SHA256). Keep it secret and stable.
    pub token_key: Vec<u8>,
    pub idempotency_key_chars_max: usize,
    /// Events accepted but not yet published to the bus, at most: past it
    /// (the bus is down or far behind), new requests are answered 503 with
    /// `Retry-After` instead of the outbox growing until memory or disk runs out.
    pub outbox_events_max: u64,
    /// How long a request with an `Idempotency-Key` waits to learn whether the
    /// key was its to take (another instance may have taken it first), before
    /// it answers 202. Authorization decides that on reading the request.
    pub claim_wait_ms: u64,
    /// How long this instance keeps its idempotency records (at least).
    pub idempotency_keep_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            outcome_wait_ms: 2000,
            token_key: b"kassa-default-token-key".to_vec(),
            idempotency_key_chars_max: 255,
            outbox_events_max: 200_000,
            claim_wait_ms: 5_000,
            idempotency_keep_ms: 24 * 3_600_000,
        }
    }
}

/// A payment as the read model keeps it. Its history is kept beside it, one
/// key for what each input of the read model added (`history-group/`), so an
/// update writes what changed and not the whole story.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PaymentView {
    pub state: PaymentState,
    /// Last stream sequence applied (drops re-published duplicates).
    pub applied_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub sequence: u64,
    pub event_type: String,
    pub at_ms: i64,
    pub data: String,
    /// The command (event id) that caused it, so a waiting request knows its own outcome.
    pub caused_by: Option<u128>,
}

/// An idempotency record: the request's fingerprint, and the response once given.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdempotencyRecord {
    fingerprint: String,
    /// The payment the request created or changed, recorded in the same
    /// append as the change itself: a retry after a crash in between finds it
    /// instead of creating a second payment.
    payment_id: Option<PaymentId>,
    response: Option<(u16, String)>,
}

type KeyLocks = Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>;

/// Removes an Idempotency-Key's lock from the map when its last user is done.
struct ForgetLock<'a> {
    map: &'a KeyLocks,
    key: Vec<u8>,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Drop for ForgetLock<'_> {
    fn drop(&mut self) {
        self.lock.take();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // One reference left (the map's, plus the caller's `lock` clone being dropped
        // after this guard): nobody else waits.
        if map.get(&self.key).is_some_and(|l| Arc::strong_count(l) <= 2) {
            map.remove(&self.key);
        }
    }
}

/// What a request under an Idempotency-Key writes with its change.
#[derive(Debug, Clone)]
pub struct IdempotencySlot {
    key: Vec<u8>,
    fingerprint: String,
}

impl IdempotencySlot {
    fn write(&self, payment_id: PaymentId) -> StateWrite {
        let record =
            IdempotencyRecord { fingerprint: self.fingerprint.clone(), payment_id: Some(payment_id), response: None };
        StateWrite { table: Table::Idempotency, key: self.key.clone(), value: Some(encode_value(&record)) }
    }
}

/// A response body with its status, and whether it was replayed.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub replayed: bool,
}

/// Requests waiting for the read model to change a payment. A payment's entry
/// stays while anyone holds its `Notify` (each waiter holds one clone for its
/// whole wait), so every change after a waiter registered reaches it.
/// Lock order: `payments`, then `latest`.
#[derive(Debug, Default)]
struct Waiters {
    payments: Mutex<HashMap<PaymentId, Arc<Notify>>>,
    /// The state the read model stored last for a payment somebody waits on,
    /// so the request need not read it back from the log. Kept only while the
    /// payment's entry in `payments` is.
    latest: Mutex<HashMap<PaymentId, PaymentState>>,
    rejections: Mutex<HashMap<u128, CommandRejected>>,
}

impl Waiters {
    fn notify_for(&self, payment_id: PaymentId) -> Arc<Notify> {
        let mut map = self.payments.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(payment_id).or_default())
    }

    /// Drop a payment's entries once no request waits on it any more.
    fn release(&self, payment_id: PaymentId) {
        let mut map = self.payments.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&payment_id).is_some_and(|notify| Arc::strong_count(notify) == 1) {
            map.remove(&payment_id);
            self.latest.lock().unwrap_or_else(|e| e.into_inner()).remove(&payment_id);
        }
    }

    /// The read model stored `state` for the payment: wake whoever waits on it.
    /// Kept while the payment's entry is, even if its last waiter is on its way
    /// out: a waiter that registers before that one's release must not be handed
    /// an older state. Every registration is released (`Registered`), and the
    /// release drops both entries.
    fn wake(&self, payment_id: PaymentId, state: &PaymentState) {
        let map = self.payments.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = map.get(&payment_id) {
            self.latest.lock().unwrap_or_else(|e| e.into_inner()).insert(payment_id, state.clone());
            notify.notify_waiters();
        }
    }

    /// The state stored last for a payment a request waits on, if one came since the last call.
    fn take_latest(&self, payment_id: PaymentId) -> Option<PaymentState> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).remove(&payment_id)
    }
}

/// Releases a waiter's registration however its wait ends, also when the
/// request is dropped mid-wait (the client went away).
struct Registered<'a> {
    waiters: &'a Waiters,
    payment_id: PaymentId,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiters.release(self.payment_id);
    }
}

/// The ingest service. Share behind an `Arc`.
#[derive(Debug)]
pub struct IngestService {
    log: Arc<EventLog>,
    bus: Arc<dyn Bus>,
    /// The in-memory hand-over to an authorization service in this process;
    /// `None` when authorization runs elsewhere and takes the sealed card only.
    vault: Option<Arc<CardVault>>,
    clock: Arc<dyn Clock>,
    /// Stamps and ages the idempotency records (resumed on first use).
    expiry: Mutex<Option<ExpiryClock>>,
    config: IngestConfig,
    /// Seals each accepted card for authorization (`command.card_sealed`), so
    /// it can run in another process; without it the card travels only
    /// through the shared in-memory vault.
    seal: Option<Arc<CardSeal>>,
    waiters: Waiters,
    /// Idempotency keys being processed: a second request with the same key waits for the first.
    in_progress: KeyLocks,
    /// Payments this instance accepted, and so listed for their merchant, whose
    /// request its read model has not read yet: the read model need not list
    /// them again. At most [`LISTED_HERE_MAX`] (emptied when full: a payment
    /// missing from it is listed twice, which changes nothing).
    listed_here: Mutex<HashSet<PaymentId>>,
}

/// Payments accepted here and not yet read back by the read model, at most.
const LISTED_HERE_MAX: usize = 100_000;

/// Command refusals kept for requests still waiting on them, at most.
const REJECTIONS_KEPT_MAX: usize = 10_000;

/// Bytes of payment views (as stored) the read model keeps in memory per
/// partition of `payments.events`, so that a payment's next event need not
/// read its view back from the log: some 10,000 views of ~400 bytes.
const VIEWS_CACHED_BYTES_MAX: usize = 4 << 20;

/// The views a read-model task stored last, with their stored sizes, at most
/// [`VIEWS_CACHED_BYTES_MAX`] of them (emptied when full).
#[derive(Default)]
struct ViewCache {
    views: HashMap<PaymentId, (PaymentView, usize)>,
    bytes: usize,
}

impl ViewCache {
    fn take(&mut self, payment_id: PaymentId) -> Option<PaymentView> {
        let (view, size) = self.views.remove(&payment_id)?;
        self.bytes -= size;
        Some(view)
    }

    fn keep(&mut self, payment_id: PaymentId, view: PaymentView, size: usize) {
        if self.bytes + size > VIEWS_CACHED_BYTES_MAX {
            self.views.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        if let Some((_, replaced)) = self.views.insert(payment_id, (view, size)) {
            self.bytes -= replaced;
        }
    }
}

/// A payment's history from its groups and its single entries (written
/// before groups), in sequence order, each sequence once.
fn merged_history(groups: Vec<Vec<HistoryEntry>>, singles: Vec<HistoryEntry>) -> Vec<HistoryEntry> {
    let mut history: Vec<HistoryEntry> = groups.into_iter().flatten().chain(singles).collect();
    history.sort_by_key(|entry| entry.sequence);
    history.dedup_by_key(|entry| entry.sequence);
    history
}

/// A payment's history entries as written before 2026-12-01: one key an entry.
fn history_prefix(payment_id: PaymentId) -> Vec<u8> {
    id_key("history/", payment_id.as_u128())
}

/// A payment's history: one key for the entries one input of the read model
/// added (a `Vec<HistoryEntry>`), by the first one's sequence number.
fn history_group_prefix(payment_id: PaymentId) -> Vec<u8> {
    id_key("history-group/", payment_id.as_u128())
}

fn history_group_key(payment_id: PaymentId, first_sequence: u64) -> Vec<u8> {
    let mut key = history_group_prefix(payment_id);
    key.extend_from_slice(&first_sequence.to_be_bytes());
    key
}

fn view_key(payment_id: PaymentId) -> Vec<u8> {
    id_key("view/", payment_id.as_u128())
}

fn merchant_key_key(hash_hex: &str) -> Vec<u8> {
    format!("merchant-key/{hash_hex}").into_bytes()
}

/// Newest first: the index key holds the id inverted.
fn merchant_index_key(merchant_id: MerchantId, payment_id: PaymentId) -> Vec<u8> {
    let mut key = format!("merchant-payments/{merchant_id}/").into_bytes();
    key.extend_from_slice(&(u128::MAX - payment_id.as_u128()).to_be_bytes());
    key
}

fn idempotency_key(merchant_id: MerchantId, key: &str) -> Vec<u8> {
    format!("{merchant_id}/{key}").into_bytes()
}

/// A payment whose `Idempotency-Key` another payment held: the original's id.
fn duplicate_key(payment_id: PaymentId) -> Vec<u8> {
    id_key("duplicate/", payment_id.as_u128())
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    tracing::error!(%error, "ingest failed");
    ApiError::new(
        500,
        ErrorType::ApiError,
        "internal_error",
        "Kassa could not complete the request; retry with the same Idempotency-Key",
    )
}

fn position_key(partition: u32) -> Vec<u8> {
    format!("{PAYMENT_EVENTS}/{partition}").into_bytes()
}

/// Idempotency records by when they were stored: the prefix, the time
/// (big-endian ms), then the record's key.
const IDEMPOTENCY_BY_TIME: &[u8] = b"idempotency-at/";
/// The [`ExpiryClock`] reading the idempotency records are dropped by.
const EXPIRY_CLOCK: &[u8] = b"expiry-clock";

/// What a time index entry holds of the record it was made for: the first 16
/// bytes of the SHA-256 of its encoding.
fn record_tag(record: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(record)[..16].to_vec()
}

/// Idempotency records dropped per pass at most (one append each).
const IDEMPOTENCY_PRUNED_PER_PASS: usize = 1_000;

/// How far this instance followed `merchants`.
const MERCHANTS_POSITION: &[u8] = b"merchants/0";

/// Set once this log's merchants from before `merchants` existed were published there.
const MERCHANTS_SHARED: &[u8] = b"merchants/shared";

/// On `merchants`: a keyed hash of a fixed text, so ingest instances can tell
/// whether they share the token key (card tokens and idempotency claims must agree).
const TOKEN_KEY_CHECK: &str = "ingest.token_key_check";

/// Set once this log published its token key check.
const TOKEN_KEY_PUBLISHED: &[u8] = b"token-key/published";

/// The first token key check read from `merchants`: the deployment's token key.
const TOKEN_KEY_FIRST: &[u8] = b"token-key/first";

/// The event that records a merchant, on the log and on `merchants`.
const MERCHANT_CREATED: &str = "merchant.created";

/// Where the relay publishes one of ingest's own events (none: not published).
fn route(event_type: &str) -> Option<&'static str> {
    if event_type == "payment.requested" || event_type.starts_with("command.") {
        Some(PAYMENT_COMMANDS)
    } else if event_type == MERCHANT_CREATED {
        Some(MERCHANTS)
    } else {
        None
    }
}

impl IngestService {
    pub fn new(
        log: Arc<EventLog>,
        bus: Arc<dyn Bus>,
        vault: Arc<CardVault>,
        clock: Arc<dyn Clock>,
        config: IngestConfig,
    ) -> Self {
        IngestService {
            log,
            bus,
            vault: Some(vault),
            clock,
            expiry: Mutex::new(None),
            config,
            seal: None,
            waiters: Waiters::default(),
            in_progress: Mutex::new(HashMap::new()),
            listed_here: Mutex::new(HashSet::new()),
        }
    }

    /// Seal each accepted card for authorization with this key.
    pub fn with_card_seal(mut self, seal: Arc<CardSeal>) -> Self {
        self.seal = Some(seal);
        self
    }

    /// Seal each accepted card for an authorization service in another
    /// process, and keep no clear copy here (no one here would take it out).
    pub fn sealing_only(mut self, seal: Arc<CardSeal>) -> Self {
        self.seal = Some(seal);
        self.vault = None;
        self
    }

    /// Start the outbox relay and the read model's consumers.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Result<Vec<JoinHandle<()>>, kassa_bus::BusError> {
        let mut tasks = vec![tokio::spawn(run_relay(
            Arc::clone(&self.log),
            Arc::clone(&self.bus),
            PAYMENT_COMMANDS,
            route,
            RelayConfig::default(),
            stop.clone(),
        ))];
        tasks.push(tokio::spawn(Arc::clone(self).follow_merchants(stop.clone())));
        tasks.push(tokio::spawn(Arc::clone(self).prune_idempotency(stop.clone())));
        for partition in 0..self.bus.partitions(PAYMENT_EVENTS)? {
            let service = Arc::clone(self);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move { service.run_read_model(partition, stop).await }));
        }
        Ok(tasks)
    }

    // ---------- merchants ----------

    /// Create a merchant; returns its id and its API key (shown once, stored hashed).
    pub async fn create_merchant(&self, name: &str) -> Result<(MerchantId, ApiKey), ApiError> {
        let request = new_merchant(name, self.clock.now())?;
        self.log.append(request.0).await.map_err(internal)?;
        Ok((request.1, request.2))
    }

    /// Learn the merchants other instances made (and, read back, this one's
    /// own): each `merchant.created` on `merchants` stores its key's hash here.
    /// Only the key: the event stays on the topic, and is not appended here
    /// again (the relay would publish it once more).
    async fn follow_merchants(self: Arc<Self>, stop: watch::Receiver<bool>) {
        if let Err(error) = self.share_earlier_merchants(&stop).await {
            tracing::error!(%error, "cannot publish this instance's earlier merchants to {MERCHANTS}; stopped");
            return;
        }
        let at = (MERCHANTS, 0, MERCHANTS_POSITION);
        if let Err(reason) = follow(&self.log, &self.bus, at, 1024, stop, |m| self.apply_merchants(m)).await {
            tracing::error!(%reason, "stopped following {MERCHANTS}");
        }
    }

    /// Store the key hashes of a batch from `merchants`, and check its token
    /// key checks against this instance's.
    async fn apply_merchants(&self, messages: Vec<kassa_bus::Message>) -> Result<(), String> {
        let Some(next) = messages.last().map(|m| m.offset + 1) else { return Ok(()) };
        let mut writes: Vec<StateWrite> = Vec::new();
        let mut first = self.log.get(Table::State, TOKEN_KEY_FIRST).map_err(|e| e.to_string())?;
        for check in messages.iter().filter_map(token_key_check_of) {
            if first.is_none() {
                // The earliest on the topic: the deployment's token key.
                first = Some(check.to_vec());
                writes.push(StateWrite { table: Table::State, key: TOKEN_KEY_FIRST.to_vec(), value: first.clone() });
            }
        }
        if first.is_some_and(|first| first != self.token_key_check()) {
            // Crash-only: the process stops with this reason rather than make card tokens and
            // idempotency claims no other instance agrees with.
            return Err("this ingest instance's token key is not the one the deployment's first ingest instance \
                        uses: start it with a copy of that instance's token.key (--token-key FILE)"
                .into());
        }
        writes.extend(messages.iter().filter_map(merchant_key_write));
        writes.push(crate::consume::position_write(MERCHANTS_POSITION.to_vec(), next));
        self.log.append(AppendRequest { writes, ..Default::default() }).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// This instance's token key check (see [`TOKEN_KEY_CHECK`]).
    fn token_key_check(&self) -> [u8; 32] {
        self.keyed_hash(MerchantId::from_u128(0), &[TOKEN_KEY_CHECK.as_bytes()])
    }

    /// Once per log: publish to `merchants` this instance's token key check and
    /// the merchants this log holds from before the topic existed (their key
    /// hashes), so other instances, and a rebuild of this one, know them too.
    /// Publishing one twice is harmless.
    async fn share_earlier_merchants(&self, stop: &watch::Receiver<bool>) -> Result<(), String> {
        // A flag of its own for the token key check: a log that shared its merchants before it came
        // still publishes its check.
        if self.log.get(Table::Positions, MERCHANTS_SHARED).map_err(|e| e.to_string())?.is_some()
            && self.log.get(Table::Positions, TOKEN_KEY_PUBLISHED).map_err(|e| e.to_string())?.is_some()
        {
            return Ok(());
        }
        let prefix = merchant_key_key("");
        let stored = self.log.scan(Table::State, &prefix).map_err(|e| e.to_string())?;
        let check = self.token_key_check();
        let check_id = u128::from_be_bytes(check[..16].try_into().expect("16 of 32 bytes"));
        let now_ms = self.clock.now().unix_ms();
        let records: Vec<kassa_bus::Record> =
            std::iter::once(merchants_record(TOKEN_KEY_CHECK, 0, check_id, encode_value(&check), now_ms))
                .chain(stored.iter().filter_map(|(key, value)| {
                    let hash_hex = std::str::from_utf8(key.get(prefix.len()..)?).ok()?;
                    let merchant_id = MerchantId::from_u128(u128::from_be_bytes(value.as_slice().try_into().ok()?));
                    let payload = encode_value(&(merchant_id, "", hash_hex));
                    Some(merchants_record(
                        MERCHANT_CREATED,
                        merchant_id.as_u128(),
                        merchant_id.as_u128(),
                        payload,
                        now_ms,
                    ))
                }))
                .collect();
        while !records.is_empty() {
            match self.bus.produce(records.clone()).await {
                Ok(_) => break,
                Err(error) if error.is_fatal() => return Err(error.to_string()),
                Err(error) => {
                    tracing::warn!(%error, "cannot publish earlier merchants yet; retrying");
                    if *stop.borrow() {
                        return Ok(()); // the next start tries again
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let markers = vec![
            crate::consume::position_write(MERCHANTS_SHARED.to_vec(), records.len() as u64),
            crate::consume::position_write(TOKEN_KEY_PUBLISHED.to_vec(), 1),
        ];
        self.log.append(AppendRequest { writes: markers, ..Default::default() }).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The merchant an `Authorization` header belongs to (401 otherwise).
    pub fn authenticate(&self, header: Option<&str>) -> Result<MerchantId, ApiError> {
        let key = ApiKey::from_authorization(header).map_err(|_| ApiError::unauthorized())?;
        let stored = self.log.get(Table::State, &merchant_key_key(&key.hash_hex())).map_err(internal)?;
        let bytes: [u8; 16] = stored.and_then(|b| b.try_into().ok()).ok_or_else(ApiError::unauthorized)?;
        Ok(MerchantId::from_u128(u128::from_be_bytes(bytes)))
    }

    // ---------- reads ----------

    fn view(&self, payment_id: PaymentId) -> Result<Option<PaymentView>, ApiError> {
        match self.log.get(Table::State, &view_key(payment_id)).map_err(internal)? {
            Some(bytes) => decode_value(&bytes, "payment view").map(Some).map_err(internal),
            None => Ok(None),
        }
    }

    /// The read model's view of a payment or, for one accepted here whose
    /// events have not come back from authorization yet (the bus is slow or
    /// down), what ingest itself recorded: the request, processing.
    fn view_or_accepted(&self, payment_id: PaymentId) -> Result<Option<PaymentView>, ApiError> {
        if let Some(view) = self.view(payment_id)? {
            return Ok(Some(view));
        }
        let envelopes = self.log.read_stream(payment_id.as_u128(), 1, 16).map_err(internal)?;
        let mut state = PaymentState::default();
        for envelope in &envelopes {
            // Commands (`command.*`) on the stream are not payment events.
            if let Ok(event) = PaymentEvent::decode_payload(&envelope.event_type, &envelope.payload) {
                apply(&mut state, &event);
            }
        }
        Ok(state.request.is_some().then_some(PaymentView { state, applied_seq: 0 }))
    }

    /// A merchant's payment, or 404 (also for another merchant's: never 403).
    fn own_view(&self, merchant_id: MerchantId, payment_id: PaymentId) -> Result<PaymentView, ApiError> {
        match self.view_or_accepted(payment_id)? {
            Some(view) if view.state.request.as_ref().is_some_and(|r| r.merchant_id == merchant_id) => Ok(view),
            _ => Err(ApiError::not_found("payment")),
        }
    }

    /// A payment's history, oldest first: its groups, and the single entries
    /// a read model wrote before groups.
    fn history(&self, payment_id: PaymentId) -> Result<Vec<HistoryEntry>, ApiError> {
        let stored = self.stored_history(&history_group_prefix(payment_id))?;
        Ok(merged_history(stored, self.stored_history(&history_prefix(payment_id))?))
    }

    /// The history values stored under `prefix`, decoded: groups or single entries.
    fn stored_history<T: serde::de::DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, ApiError> {
        let values = self.log.scan(Table::State, prefix).map_err(internal)?;
        values.iter().map(|(_, bytes)| decode_value(bytes, "payment history").map_err(internal)).collect()
    }

    pub fn parse_payment_id(text: &str) -> Result<PaymentId, ApiError> {
        PaymentId::parse(text).map_err(|_| ApiError::not_found("payment"))
    }

    pub fn get_payment(&self, merchant_id: MerchantId, payment_id: PaymentId) -> Result<serde_json::Value, ApiError> {
        let payment_id = self.original(payment_id)?;
        Ok(payment_json(payment_id, &self.own_view(merchant_id, payment_id)?.state))
    }

    /// The payment a request became: itself, or — when its `Idempotency-Key`
    /// was another payment's and the request the same (a retry that reached
    /// another instance) — that one. Ids answered 202 before authorization
    /// found the duplicate lead to the original.
    fn original(&self, payment_id: PaymentId) -> Result<PaymentId, ApiError> {
        match self.duplicate_of(payment_id)? {
            Some(DuplicateRequest { original, same_request: true }) => Ok(original),
            // Refused (its key was used for another request): it never became a payment.
            Some(DuplicateRequest { same_request: false, .. }) => Err(ApiError::not_found("payment")),
            None => Ok(payment_id),
        }
    }

    fn duplicate_of(&self, payment_id: PaymentId) -> Result<Option<DuplicateRequest>, ApiError> {
        match self.log.get(Table::State, &duplicate_key(payment_id)).map_err(internal)? {
            Some(bytes) => DuplicateRequest::decode(&bytes).map(Some).map_err(internal),
            None => Ok(None),
        }
    }

    pub fn payment_events(
        &self,
        merchant_id: MerchantId,
        payment_id: PaymentId,
    ) -> Result<serde_json::Value, ApiError> {
        let payment_id = self.original(payment_id)?;
        self.own_view(merchant_id, payment_id)?;
        let data: Vec<_> = self
            .history(payment_id)?
            .iter()
            .map(|h| {
                serde_json::json!({
                    "sequence": h.sequence,
                    "type": h.event_type,
                    "at": kassa_domain::Timestamp(h.at_ms).to_string(),
                    "data": serde_json::from_str::<serde_json::Value>(&h.data).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect();
        Ok(serde_json::json!({ "data": data }))
    }

    pub fn list_payments(
        &self,
        merchant_id: MerchantId,
        query: kassa_api::ListQuery,
    ) -> Result<serde_json::Value, ApiError> {
        let prefix = format!("merchant-payments/{merchant_id}/").into_bytes();
        let entries = self.log.scan(Table::State, &prefix).map_err(internal)?;
        // Newest first: the index keys hold the id's complement.
        let ids = entries.into_iter().filter_map(|(key, _)| {
            let bytes: [u8; 16] = key.get(key.len() - 16..)?.try_into().ok()?;
            Some(PaymentId::from_u128(u128::MAX - u128::from_be_bytes(bytes)))
        });
        let after = query.starting_after;
        if let Some(after) = after
            && self.own_view(merchant_id, after).is_err()
        {
            // Not one of this merchant's payments: say so rather than answer an empty page.
            let message = format!("starting_after: no payment {after} of yours");
            return Err(ApiError::invalid("resource_missing", "starting_after", message));
        }
        // Those older than the cursor (ids are time-ordered), also when this instance has
        // not listed the cursor's payment yet (another instance took it).
        let ids = ids.filter(|id| after.is_none_or(|after| id.as_u128() < after.as_u128()));
        let mut data = Vec::new();
        let mut has_more = false;
        for id in ids {
            if self.duplicate_of(id)?.is_some() {
                continue; // a request taken here that another payment's key made a duplicate: listed as that one
            }
            let Some(view) = self.view_or_accepted(id)? else { continue };
            if data.len() == query.limit as usize {
                has_more = true;
                break;
            }
            data.push(payment_json(id, &view.state));
        }
        Ok(serde_json::json!({ "data": data, "has_more": has_more }))
    }

    // ---------- writes ----------

    fn check_idempotency_key(&self, key: Option<&str>) -> Result<Option<String>, ApiError> {
        match key {
            None => Ok(None),
            Some(key)
                if key.is_empty()
                    || key.chars().count() > self.config.idempotency_key_chars_max
                    || key.chars().any(char::is_control) =>
            {
                Err(ApiError::invalid(
                    "idempotency_key_invalid",
                    "Idempotency-Key",
                    format!(
                        "Idempotency-Key must be 1 to {} printable characters",
                        self.config.idempotency_key_chars_max
                    ),
                ))
            }
            Some(key) => Ok(Some(key.to_owned())),
        }
    }

    /// Run `work` once per (merchant, Idempotency-Key): a repeat with the same
    /// request replays the first answer; with a different request it is 409.
    async fn idempotent<F, Fut>(
        &self,
        merchant_id: MerchantId,
        key: Option<&str>,
        print: String,
        work: F,
    ) -> Result<Answer, ApiError>
    where
        F: FnOnce(Option<IdempotencySlot>) -> Fut,
        Fut: std::future::Future<Output = Result<Answer, ApiError>>,
    {
        let Some(key) = self.check_idempotency_key(key)? else { return work(None).await };
        let storage_key = idempotency_key(merchant_id, &key);
        let lock = {
            let mut map = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(storage_key.clone()).or_default())
        };
        // Forgets the lock once nobody else waits on it — also when the client
        // goes away and this future is dropped mid-way.
        let _forget = ForgetLock { map: &self.in_progress, key: storage_key.clone(), lock: Some(lock.clone()) };
        let _guard = lock.lock().await;
        self.idempotent_locked(merchant_id, storage_key, print, work).await
    }

    async fn idempotent_locked<F, Fut>(
        &self,
        merchant_id: MerchantId,
        storage_key: Vec<u8>,
        print: String,
        work: F,
    ) -> Result<Answer, ApiError>
    where
        F: FnOnce(Option<IdempotencySlot>) -> Fut,
        Fut: std::future::Future<Output = Result<Answer, ApiError>>,
    {
        let stored = self.log.get(Table::Idempotency, &storage_key).map_err(internal)?;
        let stored = match stored {
            Some(bytes) => Some(decode_value::<IdempotencyRecord>(&bytes, "idempotency record").map_err(internal)?),
            None => None,
        };
        // The payment the record names (also one answered 202 before its claim was decided).
        let duplicate = match stored.as_ref().and_then(|record| record.payment_id) {
            Some(payment_id) => self.duplicate_of(payment_id)?,
            None => None,
        };
        let stored = match (stored, &duplicate) {
            // The request recorded here found the key was another request's: it never became a
            // payment, and the key is not this record's. Forget it; go on as if the key were new here.
            (Some(_), Some(DuplicateRequest { same_request: false, .. })) => {
                self.forget_idempotency(storage_key.clone()).await?;
                None
            }
            // The same for a capture, void or refund answered 202 here and refused later:
            // its key was another request's. The refused request again is refused at once.
            (Some(record), None) if self.command_key_refused(merchant_id, &storage_key, &record)? => {
                self.forget_idempotency(storage_key.clone()).await?;
                if record.fingerprint == print {
                    return Err(idempotency_key_reused());
                }
                None
            }
            (stored, _) => stored,
        };
        if let Some(record) = stored {
            if record.fingerprint != print {
                return Err(idempotency_key_reused());
            }
            if let Some(DuplicateRequest { original, same_request: true }) = duplicate {
                // Another instance took this same request first: it is that payment.
                return self.answer_with(merchant_id, original).await;
            }
            if let Some((status, body)) = record.response {
                let body = serde_json::from_str(&body).map_err(internal)?;
                return Ok(Answer { status, body, replayed: true });
            }
            if let Some(payment_id) = record.payment_id {
                // The change was recorded but never answered (a crash in between): answer from the payment.
                let state = self.wait_for(payment_id, has_outcome).await?;
                let view = self.own_view(merchant_id, payment_id).ok();
                let state = state.or(view.map(|v| v.state)).unwrap_or_default();
                let status = if has_outcome(&state) { 200 } else { 202 };
                return Ok(Answer { status, body: payment_json(payment_id, &state), replayed: true });
            }
        }
        let slot = IdempotencySlot { key: storage_key.clone(), fingerprint: print.clone() };
        let answer = work(Some(slot)).await;
        let record = match &answer {
            Ok(answer) => IdempotencyRecord {
                fingerprint: print,
                payment_id: answer.body["id"].as_str().and_then(|id| PaymentId::parse(id).ok()),
                response: Some((answer.status, answer.body.to_string())),
            },
            // The key was another request's (on another instance): that one owns it, not this
            // request, which leaves no record of it here.
            Err(error) if error.code == "idempotency_key_reused" => {
                self.forget_idempotency(storage_key).await?;
                return answer;
            }
            // A 4xx is an answer too once the request changed something (its payment or
            // command recorded under the key); one refused before that — bad input, a
            // conflict seen at once — leaves no record, so the client may correct it and
            // send it again with the same key. A 5xx may be retried with the same key.
            Err(error) if error.status < 500 => {
                if self.log.get(Table::Idempotency, &storage_key).map_err(internal)?.is_none() {
                    return answer;
                }
                IdempotencyRecord {
                    fingerprint: print,
                    payment_id: None,
                    response: Some((error.status, error.body().to_string())),
                }
            }
            Err(_) => return answer,
        };
        let stamped = self.expiry_now()?;
        let mut by_time = IDEMPOTENCY_BY_TIME.to_vec();
        by_time.extend_from_slice(&(stamped.max(0) as u64).to_be_bytes());
        by_time.extend_from_slice(&storage_key);
        let record = encode_value(&record);
        // The index entry names the record it was made for: a record stored again later
        // under the same key (the first one was forgotten) outlives this entry.
        let made_for = record_tag(&record);
        let writes = vec![
            StateWrite { table: Table::Idempotency, key: storage_key, value: Some(record) },
            StateWrite { table: Table::State, key: by_time, value: Some(made_for) },
            ExpiryClock::stored(EXPIRY_CLOCK, stamped),
        ];
        self.log.append(AppendRequest { writes, ..Default::default() }).await.map_err(internal)?;
        answer
    }

    async fn forget_idempotency(&self, storage_key: Vec<u8>) -> Result<(), ApiError> {
        let forget = StateWrite { table: Table::Idempotency, key: storage_key, value: None };
        self.log.append(AppendRequest { writes: vec![forget], ..Default::default() }).await.map_err(internal)?;
        Ok(())
    }

    /// The [`ExpiryClock`] reading (resumed from the stored one on first use).
    /// Whoever stamps a record with it stores it too.
    fn expiry_now(&self) -> Result<i64, ApiError> {
        let mut expiry = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        if expiry.is_none() {
            let stored = self.log.get(Table::State, EXPIRY_CLOCK).map_err(internal)?;
            // With nothing stored yet, not past the newest stamp (the wall clock's, before).
            let newest = ExpiryClock::newest_stamp(&self.log, IDEMPOTENCY_BY_TIME).map_err(internal)?;
            let wall = self.clock.now().unix_ms();
            *expiry = Some(ExpiryClock::resume(ExpiryClock::decode(stored.as_deref()), newest, wall));
        }
        Ok(expiry.as_ref().map_or(0, ExpiryClock::now))
    }

    /// Drop the idempotency records stored before `cutoff_ms` (up to 1,000 per
    /// call), with their time index; how many. Safe at any age: a request sent
    /// again after it is still one payment (its claim is with authorization) and
    /// one capture or refund (authorization drops a command id it has seen).
    pub async fn prune_idempotency_before(&self, cutoff_ms: i64) -> Result<usize, ApiError> {
        let mut until = IDEMPOTENCY_BY_TIME.to_vec();
        until.extend_from_slice(&(cutoff_ms.max(0) as u64).to_be_bytes());
        let old = self
            .log
            .scan_range(Table::State, IDEMPOTENCY_BY_TIME, &until, IDEMPOTENCY_PRUNED_PER_PASS)
            .map_err(internal)?;
        let mut writes = Vec::with_capacity(old.len() * 2);
        for (by_time, made_for) in &old {
            if let Some(storage_key) = by_time.get(IDEMPOTENCY_BY_TIME.len() + 8..) {
                // The record this entry was made for (an entry written before entries named
                // theirs, empty, is taken to be), not a later one stored under the same key.
                let stored = self.log.get(Table::Idempotency, storage_key).map_err(internal)?;
                let same = made_for.is_empty() || stored.as_deref().map(record_tag).as_ref() == Some(made_for);
                if same {
                    writes.push(StateWrite { table: Table::Idempotency, key: storage_key.to_vec(), value: None });
                }
            }
            writes.push(StateWrite { table: Table::State, key: by_time.clone(), value: None });
        }
        if !writes.is_empty() {
            self.log.append(AppendRequest { writes, ..Default::default() }).await.map_err(internal)?;
        }
        Ok(old.len())
    }

    /// Every minute, drop the idempotency records older than `idempotency_keep_ms`
    /// by the [`ExpiryClock`] that stamped them: a wall clock running ahead or set
    /// back drops no record early.
    async fn prune_idempotency(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = every.tick() => {}
            }
            let now = match self.expiry_now() {
                Ok(now) => {
                    // Stored every minute: a restart resumes from it and loses little measured time.
                    let writes = vec![ExpiryClock::stored(EXPIRY_CLOCK, now)];
                    if let Err(error) = self.log.append(AppendRequest { writes, ..Default::default() }).await {
                        tracing::warn!(%error, "cannot store the expiry clock; trying again later");
                    }
                    now
                }
                Err(error) => {
                    tracing::warn!(message = %error.message, "cannot read the expiry clock; trying again later");
                    continue;
                }
            };
            let cutoff = now.saturating_sub(self.config.idempotency_keep_ms as i64);
            // Pass after pass while they come back full, so the backlog never grows.
            loop {
                match self.prune_idempotency_before(cutoff).await {
                    Ok(dropped) if dropped == IDEMPOTENCY_PRUNED_PER_PASS => {}
                    Ok(0) => break,
                    Ok(dropped) => {
                        tracing::debug!(dropped, "old idempotency records dropped");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(message = %error.message, "cannot drop old idempotency records; trying again later");
                        break;
                    }
                }
                if *stop.borrow() {
                    return;
                }
            }
        }
    }

    /// `POST /v1/payments`.
    /// The answer to a request that turned out to be `original`'s, replayed: its
    /// outcome (waited for, bounded), or 202 with its state. 503 while this
    /// instance has not read the original yet (never stored as the key's answer).
    async fn answer_with(&self, merchant_id: MerchantId, original: PaymentId) -> Result<Answer, ApiError> {
        let state = match self.wait_for(original, has_outcome).await? {
            Some(state) => state,
            None => match self.own_view(merchant_id, original) {
                Ok(view) => view.state,
                Err(error) if error.status == 404 => {
                    return Err(ApiError::new(
                        503,
                        ErrorType::ApiError,
                        "processing",
                        format!(
                            "this request is payment {original}, which this instance has not read yet; retry shortly"
                        ),
                    ));
                }
                Err(error) => return Err(error),
            },
        };
        let status = if has_outcome(&state) { 200 } else { 202 };
        Ok(Answer { status, body: payment_json(original, &state), replayed: true })
    }

    /// What travels of an `Idempotency-Key` and a request's fingerprint: hashes
    /// keyed with the token key (the fingerprint covers the card number, so it
    /// never leaves in a form that could be tried against card numbers).
    fn claim_of(&self, merchant_id: MerchantId, slot: &IdempotencySlot) -> ([u8; 32], String) {
        let print = self.keyed_hash(merchant_id, &[slot.fingerprint.as_bytes()]);
        (self.keyed_hash(merchant_id, &[&slot.key]), print.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The id of a capture, void or refund made with an `Idempotency-Key`: the
    /// same request (key and fingerprint) gets the same id on every instance, so
    /// authorization, which drops a command id it has seen, carries it out once.
    fn command_id_of(&self, merchant_id: MerchantId, slot: &IdempotencySlot) -> u128 {
        let hash = self.keyed_hash(merchant_id, &[b"command", &slot.key, slot.fingerprint.as_bytes()]);
        u128::from_be_bytes(hash[..16].try_into().expect("16 of 32 bytes"))
    }

    /// Whether the command recorded under a key (a capture, void or refund) was
    /// refused because another command held the key: authorization refuses it
    /// after its claim meets the other's, perhaps after this instance answered 202.
    fn command_key_refused(
        &self,
        merchant_id: MerchantId,
        storage_key: &[u8],
        record: &IdempotencyRecord,
    ) -> Result<bool, ApiError> {
        let Some(payment_id) = record.payment_id else { return Ok(false) };
        // Refused after its answer: one answered 202, or never answered (a crash in between).
        if record.response.as_ref().is_some_and(|(status, _)| *status != 202) {
            return Ok(false);
        }
        let slot = IdempotencySlot { key: storage_key.to_vec(), fingerprint: record.fingerprint.clone() };
        let command_id = self.command_id_of(merchant_id, &slot);
        Ok(self.history(payment_id)?.iter().any(|entry| {
            entry.caused_by == Some(command_id)
                && entry.event_type == COMMAND_REJECTED
                && serde_json::from_str::<serde_json::Value>(&entry.data)
                    .is_ok_and(|data| data["code"] == "idempotency_key_reused")
        }))
    }

    /// SHA-256 keyed with the token key, over the merchant and `parts`.
    fn keyed_hash(&self, merchant_id: MerchantId, parts: &[&[u8]]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update((self.config.token_key.len() as u64).to_le_bytes());
        hasher.update(&self.config.token_key);
        hasher.update(merchant_id.as_u128().to_be_bytes());
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    /// A new payment id on the partition of `payments.commands` an idempotency
    /// key maps to, so that every claim on the key reaches one actor.
    fn payment_id_meeting(&self, key_hash: &[u8; 32], now: kassa_domain::Timestamp) -> Result<PaymentId, ApiError> {
        let partitions = self.bus.partitions(PAYMENT_COMMANDS).map_err(internal)?;
        let target = kassa_bus::partition_for(key_hash, partitions);
        // Each try lands there with odds 1/partitions.
        for _ in 0..10_000 {
            let payment_id = PaymentId::from_parts(now.unix_ms() as u64, rand::random());
            if kassa_bus::partition_for(&crate::payment_key(payment_id.as_u128()), partitions) == target {
                return Ok(payment_id);
            }
        }
        Err(internal(format!("no payment id found on partition {target} of {partitions}")))
    }

    /// Refuse new work while the outbox holds more than its bound.
    fn check_outbox(&self) -> Result<(), ApiError> {
        let relayed = crate::relay::relayed_position(&self.log, PAYMENT_COMMANDS).map_err(internal)?;
        let waiting = self.log.head_position().saturating_sub(relayed);
        if waiting > self.config.outbox_events_max {
            tracing::warn!(waiting, "outbox full: the bus is not taking messages; refusing new requests");
            return Err(ApiError::new(
                503,
                ErrorType::RateLimitError,
                "bus_unavailable",
                format!("{waiting} accepted requests are still waiting to be passed on; retry later"),
            ));
        }
        Ok(())
    }

    pub async fn create_payment(
        &self,
        merchant_id: MerchantId,
        idempotency: Option<&str>,
        body: &[u8],
    ) -> Result<Answer, ApiError> {
        let print = fingerprint("POST", "/v1/payments", body);
        self.idempotent(merchant_id, idempotency, print, |slot| async move {
            self.check_outbox()?;
            let now = self.clock.now();
            let request = kassa_api::parse_create_payment(body, now)?;
            // A request with a key claims it where every instance's claims on that key meet.
            let claim = slot.as_ref().map(|slot| self.claim_of(merchant_id, slot));
            let claimed = claim.is_some();
            let payment_id = match &claim {
                Some((key_hash, _)) => self.payment_id_meeting(key_hash, now)?,
                None => PaymentId::from_parts(now.unix_ms() as u64, rand::random()),
            };
            let command = PaymentCommand::Request(RequestPayment {
                payment_id,
                merchant_id,
                amount: request.amount,
                card: request.card.summarize(&self.config.token_key),
                capture: request.capture,
                reference: request.reference,
                metadata: request.metadata,
            });
            let events = decide(&PaymentState::default(), command, now).map_err(|r| internal(r.to_string()))?;
            // Every message of the request is on the payment's stream.
            let on_payment = |event_type: &str, payload: Vec<u8>| NewEvent {
                event_id: rand::random(),
                event_type: event_type.to_owned(),
                stream_id: payment_id.as_u128(),
                timestamp_ms: now.unix_ms(),
                causation_id: None,
                correlation_id: Some(payment_id.as_u128()),
                payload,
            };
            // The sealed card goes first: authorization holds it when the request arrives.
            let sealed = self.seal.as_ref().map(|seal| {
                let message =
                    PaymentCommandMessage::CardSealed { payment_id, sealed: seal.seal(payment_id, &request.card) };
                on_payment(CARD_SEALED, message.encode_payload())
            });
            if let Some(vault) = &self.vault {
                vault
                    .put(payment_id, request.card)
                    .map_err(|full| ApiError::new(429, ErrorType::RateLimitError, "overloaded", full.to_string()))?;
            }
            let claim = claim.map(|(key_hash, fingerprint)| {
                let message =
                    PaymentCommandMessage::ClaimIdempotencyKey { payment_id, merchant_id, key_hash, fingerprint };
                on_payment(message.event_type(), message.encode_payload())
            });
            let new_events = sealed
                .into_iter()
                .chain(claim)
                .chain(events.iter().map(|event| on_payment(event.event_type(), event.encode_payload())))
                .collect();
            let mut writes = vec![StateWrite {
                table: Table::State,
                key: merchant_index_key(merchant_id, payment_id),
                value: Some(Vec::new()),
            }];
            writes.extend(slot.map(|slot| slot.write(payment_id)));
            // Noted before the append: the read model reads the request only after it is durable.
            self.note_listed_here(payment_id);
            let appended =
                match self.log.append(AppendRequest { events: new_events, writes, ..Default::default() }).await {
                    Ok(appended) => appended,
                    Err(error) => {
                        if let Some(vault) = &self.vault {
                            vault.remove(payment_id);
                        }
                        self.take_listed_here(payment_id);
                        return Err(internal(error));
                    }
                };
            if claimed {
                // Whether the key was this request's to take: authorization decides that as
                // soon as it reads the claim, with no provider call, so wait for it longer —
                // once the claim is on the bus. While it is not (the broker is down), the
                // request is answered as any other, 202 after the usual wait.
                let decided_check = || {
                    if let Some(duplicate) = self.duplicate_of(payment_id)? {
                        return Ok(Some(Some(duplicate)));
                    }
                    Ok(self.view(payment_id)?.filter(|v| v.state.request.is_some()).map(|_| None))
                };
                let mut decided = self.wait_bounded(payment_id, self.config.outcome_wait_ms, decided_check).await?;
                let published = crate::relay::relayed_position(&self.log, PAYMENT_COMMANDS).map_err(internal)?
                    >= appended.last_position;
                if decided.is_none() && published {
                    let rest = self.config.claim_wait_ms.saturating_sub(self.config.outcome_wait_ms);
                    decided = self.wait_bounded(payment_id, rest, decided_check).await?;
                }
                if let Some(Some(duplicate)) = decided {
                    if let Some(vault) = &self.vault {
                        vault.remove(payment_id);
                    }
                    if !duplicate.same_request {
                        return Err(idempotency_key_reused());
                    }
                    // Another instance took this request first: answer with that payment.
                    return self.answer_with(merchant_id, duplicate.original).await;
                }
            }
            let state = self.wait_for(payment_id, has_outcome).await?;
            Ok(match state {
                // No provider could take it (breakers open, maintenance): a clear error to retry later.
                Some(state) if state.decline_code.as_deref() == Some("providers_unavailable") => Answer {
                    status: 503,
                    body: serde_json::json!({
                        "error": {
                            "type": "api_error",
                            "code": "providers_unavailable",
                            "message": "no provider can take this payment now (outages or maintenance); retry later with a new request",
                        },
                        "payment": payment_json(payment_id, &state),
                    }),
                    replayed: false,
                },
                Some(state) => Answer { status: 200, body: payment_json(payment_id, &state), replayed: false },
                None => {
                    // Durable and on its way, no outcome within the bound yet.
                    let mut state = PaymentState::default();
                    for event in &events {
                        apply(&mut state, event);
                    }
                    Answer { status: 202, body: payment_json(payment_id, &state), replayed: false }
                }
            })
        })
        .await
    }

    /// `POST /v1/payments/{id}/capture|void|refunds`.
    pub async fn command(
        &self,
        merchant_id: MerchantId,
        payment_id: PaymentId,
        action: &str,
        idempotency: Option<&str>,
        body: &[u8],
    ) -> Result<Answer, ApiError> {
        let payment_id = self.original(payment_id)?;
        let print = fingerprint("POST", &format!("/v1/payments/{payment_id}/{action}"), body);
        self.idempotent(merchant_id, idempotency, print, |slot| async move {
            self.own_view(merchant_id, payment_id)?; // 404 unless it is this merchant's
            self.check_outbox()?;
            let amount = match action {
                "void" => {
                    if !body.iter().all(u8::is_ascii_whitespace) && body != b"{}" {
                        return Err(ApiError::invalid("parameter_unknown", "body", "void takes no parameters"));
                    }
                    None
                }
                _ => kassa_api::parse_amount_request(body)?.amount_minor,
            };
            // With a key, the same request gets the same ids on any instance: authorization carries it out once.
            let keyed = slot.as_ref().map(|slot| self.command_id_of(merchant_id, slot));
            let command_id: u128 = keyed.unwrap_or_else(rand::random);
            let id_for = |label: &str| keyed.map_or_else(rand::random, |id| crate::runtime::derived_id(id, label, 0));
            let message = match action {
                "capture" => PaymentCommandMessage::Capture {
                    payment_id,
                    capture_id: CaptureId::from_u128(id_for("capture")),
                    amount_minor: amount,
                },
                "void" => PaymentCommandMessage::Void { payment_id },
                _ => PaymentCommandMessage::Refund {
                    payment_id,
                    refund_id: RefundId::from_u128(id_for("refund")),
                    amount_minor: amount,
                },
            };
            let now = self.clock.now();
            let on_payment = |event_id: u128, message: PaymentCommandMessage| NewEvent {
                event_id,
                event_type: message.event_type().to_owned(),
                stream_id: payment_id.as_u128(),
                timestamp_ms: now.unix_ms(),
                causation_id: None,
                correlation_id: Some(payment_id.as_u128()),
                payload: message.encode_payload(),
            };
            // With a key, the command claims it first, where every instance's commands on
            // this payment meet: a different request under the same key is refused there.
            let claim = slot.as_ref().map(|slot| {
                let (key_hash, fingerprint) = self.claim_of(merchant_id, slot);
                let claim = PaymentCommandMessage::ClaimCommandKey {
                    payment_id,
                    merchant_id,
                    key_hash,
                    fingerprint,
                    command_id,
                };
                on_payment(crate::runtime::derived_id(command_id, "claim", 0), claim)
            });
            let events = claim.into_iter().chain([on_payment(command_id, message)]).collect();
            let writes = slot.map(|slot| slot.write(payment_id)).into_iter().collect();
            self.log.append(AppendRequest { events, writes, ..Default::default() }).await.map_err(internal)?;
            // Wait for the command's outcome: an event it caused, or its refusal.
            let outcome = self
                .wait_until(payment_id, || {
                    let refused = self.waiters.rejections.lock().unwrap_or_else(|e| e.into_inner()).remove(&command_id);
                    if let Some(rejected) = refused {
                        return Err(rejection_error(rejected));
                    }
                    // Any event this command caused, also one before this request: the same
                    // request taken first by another instance has the same command id.
                    let history = self.history(payment_id)?;
                    // Read after the history (the read model writes both in one append), so
                    // the view answered holds at least the event found there.
                    let view = self.own_view(merchant_id, payment_id)?;
                    let Some(caused) = history.iter().find(|h| h.caused_by == Some(command_id)) else {
                        return Ok(None);
                    };
                    if caused.event_type == COMMAND_REJECTED {
                        let data: serde_json::Value = serde_json::from_str(&caused.data).unwrap_or_default();
                        return Err(rejection_error(CommandRejected {
                            command_id,
                            code: data["code"].as_str().unwrap_or("payment_state_conflict").to_owned(),
                            message: data["message"].as_str().unwrap_or("the command was refused").to_owned(),
                        }));
                    }
                    Ok(Some(view.state))
                })
                .await?;
            Ok(match outcome {
                Some(state) => Answer { status: 200, body: payment_json(payment_id, &state), replayed: false },
                None => {
                    let state = self.own_view(merchant_id, payment_id)?.state;
                    Answer { status: 202, body: payment_json(payment_id, &state), replayed: false }
                }
            })
        })
        .await
    }

    /// Wait (bounded) until the read model's state for a payment satisfies `done`.
    async fn wait_for(
        &self,
        payment_id: PaymentId,
        done: impl Fn(&PaymentState) -> bool,
    ) -> Result<Option<PaymentState>, ApiError> {
        self.wait_until(payment_id, || {
            let state = match self.waiters.take_latest(payment_id) {
                Some(state) => Some(state),
                None => self.view(payment_id)?.map(|v| v.state),
            };
            Ok(state.filter(|s| done(s)))
        })
        .await
    }

    /// Check, and check again each time the read model changes the payment,
    /// until `check` finds something or `outcome_wait_ms` passes (`None`).
    async fn wait_until<T>(
        &self,
        payment_id: PaymentId,
        check: impl FnMut() -> Result<Option<T>, ApiError>,
    ) -> Result<Option<T>, ApiError> {
        self.wait_bounded(payment_id, self.config.outcome_wait_ms, check).await
    }

    /// [`Self::wait_until`], for up to `wait_ms`.
    async fn wait_bounded<T>(
        &self,
        payment_id: PaymentId,
        wait_ms: u64,
        mut check: impl FnMut() -> Result<Option<T>, ApiError>,
    ) -> Result<Option<T>, ApiError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        // Declared first, dropped last: the `Notify` below is let go before the release.
        let _registered = Registered { waiters: &self.waiters, payment_id };
        let notify = self.waiters.notify_for(payment_id);
        loop {
            // Made before the check, so a change in between wakes it.
            let changed = notify.notified();
            match check() {
                Ok(None) => {}
                found => return found,
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Note a payment this instance lists for its merchant as it accepts it.
    fn note_listed_here(&self, payment_id: PaymentId) {
        let mut listed_here = self.listed_here.lock().unwrap_or_else(|e| e.into_inner());
        if listed_here.len() >= LISTED_HERE_MAX {
            listed_here.clear();
        }
        listed_here.insert(payment_id);
    }

    /// Forget a noted payment: whether it was noted.
    fn take_listed_here(&self, payment_id: PaymentId) -> bool {
        self.listed_here.lock().unwrap_or_else(|e| e.into_inner()).remove(&payment_id)
    }

    // ---------- the read model ----------

    async fn run_read_model(self: Arc<Self>, partition: u32, stop: watch::Receiver<bool>) {
        let (this, key) = (&self, position_key(partition));
        // The views this task stored last. It alone writes its partition's views, and the
        // cache ends with it, so a view here is the stored one.
        let cache = Mutex::new(ViewCache::default());
        let cache = &cache;
        let followed = follow(&self.log, &self.bus, (PAYMENT_EVENTS, partition, &key), 1024, stop, |m| async move {
            this.apply_to_read_model(partition, m, cache).await.map_err(|e| e.message)
        });
        if let Err(reason) = followed.await {
            tracing::error!(partition, %reason, "read model stopped (restart to recover)");
        }
    }

    async fn apply_to_read_model(
        &self,
        partition: u32,
        messages: Vec<kassa_bus::Message>,
        cache: &Mutex<ViewCache>,
    ) -> Result<(), ApiError> {
        let mut views: HashMap<PaymentId, PaymentView> = HashMap::with_capacity(messages.len());
        let mut histories: HashMap<PaymentId, Vec<HistoryEntry>> = HashMap::with_capacity(messages.len());
        let mut writes = Vec::new();
        let mut rejections = Vec::new();
        let last_offset = messages.last().map(|m| m.offset);
        for message in messages {
            let envelope = match decode_frame_ref(&message.payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::error!(partition, offset = message.offset, %error, "undecodable event skipped");
                    continue;
                }
            };
            let payment_id = PaymentId::from_u128(envelope.stream_id);
            let view = match views.remove(&payment_id) {
                Some(view) => view,
                None => {
                    // Taken out while changed: a failed write ends this task, and its cache.
                    let cached = cache.lock().unwrap_or_else(|e| e.into_inner()).take(payment_id);
                    match cached {
                        Some(view) => view,
                        None => self.view(payment_id)?.unwrap_or_default(),
                    }
                }
            };
            let mut view = view;
            if envelope.stream_seq <= view.applied_seq {
                views.insert(payment_id, view);
                continue; // re-published
            }
            view.applied_seq = envelope.stream_seq;
            let data = if envelope.event_type == COMMAND_REJECTED {
                match CommandRejected::decode(envelope.payload) {
                    Ok(rejected) => {
                        let data = serde_json::json!({"code": rejected.code, "message": rejected.message}).to_string();
                        rejections.push(rejected);
                        data
                    }
                    Err(error) => {
                        tracing::error!(%error, "undecodable rejection skipped");
                        views.insert(payment_id, view);
                        continue;
                    }
                }
            } else if envelope.event_type == DUPLICATE_REQUEST {
                match DuplicateRequest::decode(envelope.payload) {
                    Ok(duplicate) => {
                        // Where a request that came second (here or on another instance) leads.
                        writes.push(StateWrite {
                            table: Table::State,
                            key: duplicate_key(payment_id),
                            value: Some(duplicate.encode_payload()),
                        });
                        serde_json::json!({
                            "original": duplicate.original.to_string(),
                            "same_request": duplicate.same_request,
                        })
                        .to_string()
                    }
                    Err(error) => {
                        tracing::error!(%error, "undecodable duplicate request skipped");
                        views.insert(payment_id, view);
                        continue;
                    }
                }
            } else {
                match PaymentEvent::decode_payload(envelope.event_type, envelope.payload) {
                    Ok(event) => {
                        let data = event_data(&event);
                        if let Err(reason) = try_apply(&mut view.state, &event) {
                            // A peer sent an event that cannot follow what this view holds: skip
                            // it, and say so, rather than stop the read model.
                            tracing::error!(%payment_id, offset = message.offset, %reason, "payment event skipped");
                            views.insert(payment_id, view);
                            continue;
                        }
                        if let PaymentEvent::Requested(requested) = &event
                            && !self.take_listed_here(payment_id)
                        {
                            // Listed for its merchant here too when another instance took it.
                            writes.push(StateWrite {
                                table: Table::State,
                                key: merchant_index_key(requested.merchant_id, payment_id),
                                value: Some(Vec::new()),
                            });
                        }
                        data
                    }
                    Err(error) => {
                        tracing::error!(%error, event_type = %envelope.event_type, "unknown payment event skipped");
                        views.insert(payment_id, view);
                        continue;
                    }
                }
            };
            let entry = HistoryEntry {
                sequence: envelope.stream_seq,
                event_type: envelope.event_type.to_owned(),
                at_ms: envelope.timestamp_ms,
                data,
                caused_by: envelope.causation_id,
            };
            histories.entry(payment_id).or_default().push(entry);
            views.insert(payment_id, view);
        }
        // One key for what this input added to each payment's history.
        for (payment_id, group) in &histories {
            let first = group.first().map_or(0, |entry| entry.sequence);
            let (key, value) = (history_group_key(*payment_id, first), encode_value(group));
            writes.push(StateWrite { table: Table::State, key, value: Some(value) });
        }
        let mut sizes = Vec::with_capacity(views.len());
        writes.extend(views.iter().map(|(id, view)| {
            let value = encode_value(view);
            sizes.push(value.len());
            StateWrite { table: Table::State, key: view_key(*id), value: Some(value) }
        }));
        if let Some(offset) = last_offset {
            writes.push(StateWrite {
                table: Table::Positions,
                key: position_key(partition),
                value: Some((offset + 1).to_be_bytes().to_vec()),
            });
        }
        // All of it is read from `payments.events` again if a crash of the machine loses it
        // (with its offset): not synced for its own sake.
        let append = AppendRequest { writes, durability: Durability::Derived, ..Default::default() };
        self.log.append(append).await.map_err(internal)?;
        if let Some(offset) = last_offset {
            self.bus.note_consumed(crate::topics::INGEST_GROUP, PAYMENT_EVENTS, partition, offset + 1);
        }
        {
            let mut map = self.waiters.rejections.lock().unwrap_or_else(|e| e.into_inner());
            // Rejections nobody waited for (the caller had its 202) must not pile up.
            if map.len() > REJECTIONS_KEPT_MAX {
                map.clear();
            }
            for rejected in rejections {
                map.insert(rejected.command_id, rejected);
            }
        }
        for (payment_id, view) in &views {
            self.waiters.wake(*payment_id, &view.state);
        }
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        for ((payment_id, view), size) in views.into_iter().zip(sizes) {
            cache.keep(payment_id, view, size);
        }
        Ok(())
    }
}

/// The write that lets a `merchant.created` message's key in; `None` (logged)
/// for any other message: a peer's bad message changes nothing.
fn merchant_key_write(message: &kassa_bus::Message) -> Option<StateWrite> {
    if token_key_check_of(message).is_some() {
        return None;
    }
    let decoded = decode_frame(&message.payload).map_err(|e| e.to_string()).and_then(|envelope| {
        if envelope.event_type != MERCHANT_CREATED {
            return Err(format!("a {:?} event is not a merchant", envelope.event_type));
        }
        let (merchant_id, _name, hash_hex): (MerchantId, String, String) =
            decode_value(&envelope.payload, MERCHANT_CREATED).map_err(|e| e.to_string())?;
        if hash_hex.len() != 64 || !hash_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash_hex:?} is not a key hash"));
        }
        Ok((merchant_id, hash_hex))
    });
    match decoded {
        Ok((merchant_id, hash_hex)) => Some(StateWrite {
            table: Table::State,
            key: merchant_key_key(&hash_hex),
            value: Some(merchant_id.as_u128().to_be_bytes().to_vec()),
        }),
        Err(reason) => {
            tracing::error!(offset = message.offset, %reason, "message on {MERCHANTS} skipped");
            None
        }
    }
}

/// A frame ingest publishes on `merchants` itself, outside its log's relay:
/// keyed by its stream, its id derived from `cause` (publishing it again is harmless).
fn merchants_record(
    event_type: &str,
    stream_id: u128,
    cause: u128,
    payload: Vec<u8>,
    now_ms: i64,
) -> kassa_bus::Record {
    let envelope = kassa_codec::Envelope {
        event_id: crate::runtime::derived_id(cause, event_type, 0),
        event_type: event_type.to_owned(),
        stream_id,
        stream_seq: 1,
        position: 0,
        timestamp_ms: now_ms,
        causation_id: None,
        correlation_id: None,
        payload,
        prev_hash: kassa_codec::GENESIS_HASH,
    };
    kassa_bus::Record {
        topic: MERCHANTS.to_owned(),
        key: crate::payment_key(stream_id),
        payload: kassa_codec::encode_frame(&envelope),
        timestamp_ms: now_ms,
    }
}

/// The token key check a message on `merchants` carries, if it is one.
fn token_key_check_of(message: &kassa_bus::Message) -> Option<[u8; 32]> {
    let envelope = decode_frame(&message.payload).ok()?;
    if envelope.event_type != TOKEN_KEY_CHECK {
        return None;
    }
    decode_value(&envelope.payload, TOKEN_KEY_CHECK).ok()
}

/// The append that creates a merchant, with its id and key: for the running
/// service and for `kassa merchant create` on a stopped one alike.
pub fn new_merchant(name: &str, now: kassa_domain::Timestamp) -> Result<(AppendRequest, MerchantId, ApiKey), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "parameter_invalid_string",
            "name",
            "merchant name must be 1 to 100 printable characters",
        ));
    }
    let merchant_id = MerchantId::from_parts(now.unix_ms() as u64, rand::random());
    let key = ApiKey::from_random(rand::random());
    let event = NewEvent {
        event_id: rand::random(),
        event_type: MERCHANT_CREATED.into(),
        stream_id: merchant_id.as_u128(),
        timestamp_ms: now.unix_ms(),
        causation_id: None,
        correlation_id: None,
        // The key's hash only: a stored key cannot be used.
        payload: encode_value(&(merchant_id, name, key.hash_hex())),
    };
    let writes = vec![StateWrite {
        table: Table::State,
        key: merchant_key_key(&key.hash_hex()),
        value: Some(merchant_id.as_u128().to_be_bytes().to_vec()),
    }];
    Ok((AppendRequest { events: vec![event], writes, ..Default::default() }, merchant_id, key))
}

fn idempotency_key_reused() -> ApiError {
    ApiError::new(
        409,
        ErrorType::IdempotencyError,
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request; use a new key for a new request",
    )
}

/// The answer to a command the authorization service refused.
fn rejection_error(rejected: CommandRejected) -> ApiError {
    if rejected.code == "idempotency_key_reused" {
        return idempotency_key_reused(); // as when this instance catches it itself
    }
    let (status, code) = match rejected.code.as_str() {
        "resource_missing" => (404, "resource_missing"),
        "amount_too_large" => (400, "amount_too_large"),
        "amount_too_small" => (400, "amount_too_small"),
        _ => (409, "payment_state_conflict"),
    };
    let mut error = ApiError::new(status, ErrorType::InvalidRequestError, code, rejected.message);
    if status == 400 {
        error.param = Some("amount".into());
    }
    error
}

/// A payment has its outcome when it is no longer processing — and, when it
/// was asked to capture, not merely authorized (the read model may apply the
/// authorization and the automatic capture in separate batches).
fn has_outcome(state: &PaymentState) -> bool {
    use kassa_domain::PaymentStatus;
    match state.status() {
        None | Some(PaymentStatus::Processing) => false,
        Some(PaymentStatus::Authorized) => !state.request.as_ref().is_some_and(|r| r.capture),
        Some(_) => true,
    }
}

/// The payment as the API shows it.
pub fn payment_json(payment_id: PaymentId, state: &PaymentState) -> serde_json::Value {
    let Some(request) = state.request.as_ref() else {
        return serde_json::json!({ "id": payment_id.to_string(), "status": "processing" });
    };
    let status = state.status().map_or("processing", |s| match s {
        kassa_domain::PaymentStatus::Processing => "processing",
        kassa_domain::PaymentStatus::Authorized => "authorized",
        kassa_domain::PaymentStatus::Captured => "captured",
        kassa_domain::PaymentStatus::Declined => "declined",
        kassa_domain::PaymentStatus::Voided => "voided",
        kassa_domain::PaymentStatus::Refunded => "refunded",
    });
    serde_json::json!({
        "id": payment_id.to_string(),
        "object": "payment",
        "status": status,
        "amount": request.amount.minor,
        "currency": request.amount.currency.code(),
        "amount_authorized": state.authorized_minor,
        "amount_captured": state.captured_minor,
        "amount_refunded": state.refunded_minor,
        // Authorized on Kassa's own authority, awaiting a provider's authorization.
        "stand_in": state.stand_in_pending(),
        "capture": request.capture,
        "card": {
            "brand": request.card.brand.as_str(),
            "last4": request.card.last4,
            "exp_month": request.card.expiry.month,
            "exp_year": request.card.expiry.year,
        },
        "provider": state.provider,
        "authorization_code": state.authorization_code,
        "decline_code": state.decline_code,
        "reference": request.reference,
        "metadata": request.metadata,
        "created_at": request.requested_at.to_string(),
    })
}

/// An event's data for the history endpoint: amounts and ids, never card data.
fn event_data(event: &PaymentEvent) -> String {
    let value = match event {
        PaymentEvent::Requested(r) => {
            serde_json::json!({"amount": r.amount.minor, "currency": r.amount.currency.code(), "capture": r.capture})
        }
        PaymentEvent::AuthorizationStarted { attempt_id, provider } => {
            serde_json::json!({"attempt_id": attempt_id.to_string(), "provider": provider})
        }
        PaymentEvent::Authorized { attempt_id, provider, authorization_code, amount } => {
            serde_json::json!({"attempt_id": attempt_id.to_string(), "provider": provider, "authorization_code": authorization_code, "amount": amount.minor})
        }
        PaymentEvent::Declined { provider, code, category, .. } => {
            serde_json::json!({"provider": provider, "code": code, "category": category})
        }
        PaymentEvent::AuthorizationFailed { attempt_id, provider, reason }
        | PaymentEvent::AuthorizationOutcomeUnknown { attempt_id, provider, reason } => {
            serde_json::json!({"attempt_id": attempt_id.to_string(), "provider": provider, "reason": reason})
        }
        PaymentEvent::AuthorizationReversed { attempt_id, provider } => {
            serde_json::json!({"attempt_id": attempt_id.to_string(), "provider": provider})
        }
        PaymentEvent::AttemptDeclined { attempt_id, provider, code } => {
            serde_json::json!({"attempt_id": attempt_id.to_string(), "provider": provider, "code": code})
        }
        PaymentEvent::AuthorizedByStandIn { amount } => serde_json::json!({"amount": amount.minor, "stand_in": true}),
        PaymentEvent::StandInConfirmed { attempt_id, provider, authorization_code } => {
            serde_json::json!({"attempt_id": attempt_id.to_string(), "provider": provider, "authorization_code": authorization_code})
        }
        PaymentEvent::StandInDeclined { attempt_id, provider, code } => {
            serde_json::json!({"attempt_id": attempt_id.map(|a| a.to_string()), "provider": provider, "code": code})
        }
        PaymentEvent::Captured { capture_id, amount } => {
            serde_json::json!({"capture_id": capture_id.to_string(), "amount": amount.minor})
        }
        PaymentEvent::Voided { amount } => serde_json::json!({"amount": amount.minor}),
        PaymentEvent::Refunded { refund_id, amount } => {
            serde_json::json!({"refund_id": refund_id.to_string(), "amount": amount.minor})
        }
        PaymentEvent::Settled { batch_id } => serde_json::json!({"batch_id": batch_id.to_string()}),
        PaymentEvent::Reconciled { report_id } => serde_json::json!({"report_id": report_id.to_string()}),
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kassa_codec::{Envelope, encode_frame};

    #[test]
    fn a_history_reads_its_groups_and_the_single_entries_from_before_them() {
        let entry = |sequence| HistoryEntry {
            sequence,
            event_type: format!("event.{sequence}"),
            at_ms: 0,
            data: "{}".into(),
            caused_by: None,
        };
        // Entries 1 and 2 from an older read model, one key each; then groups; 4 twice (an input read again).
        let merged = merged_history(vec![vec![entry(3), entry(4)], vec![entry(4), entry(5)]], vec![entry(2), entry(1)]);
        assert_eq!(merged.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        // The two kinds of key never share a prefix scan.
        let id = PaymentId::from_u128(7);
        assert!(!history_group_key(id, 1).starts_with(&history_prefix(id)));
        assert!(!history_prefix(id).starts_with(&history_group_prefix(id)));
    }

    #[test]
    fn the_view_cache_counts_what_it_holds_and_empties_when_full() {
        let mut cache = ViewCache::default();
        let view = |seq| PaymentView { state: PaymentState::default(), applied_seq: seq };
        let id = |n| PaymentId::from_u128(n);
        cache.keep(id(1), view(1), 1000);
        cache.keep(id(2), view(1), 3000);
        cache.keep(id(1), view(2), 1500);
        assert_eq!(cache.bytes, 4500);
        assert_eq!(cache.take(id(1)).map(|v| v.applied_seq), Some(2));
        assert_eq!(cache.bytes, 3000);
        assert!(cache.take(id(1)).is_none());
        // Past the bound it starts over rather than grow.
        cache.keep(id(3), view(1), VIEWS_CACHED_BYTES_MAX - 1000);
        assert!(cache.take(id(2)).is_none());
        assert_eq!(cache.bytes, VIEWS_CACHED_BYTES_MAX - 1000);
    }

    fn state_with(captured_minor: i64) -> PaymentState {
        PaymentState { captured_minor, ..PaymentState::default() }
    }

    #[test]
    fn a_waiter_is_handed_the_newest_state_the_read_model_stored() {
        let waiters = Waiters::default();
        let payment = PaymentId::from_u128(7);
        // Nobody waits: nothing is kept.
        waiters.wake(payment, &state_with(1));
        assert_eq!(waiters.take_latest(payment), None);
        // A waiter registers; two changes come before it looks: it is handed the second.
        let notify = waiters.notify_for(payment);
        waiters.wake(payment, &state_with(2));
        waiters.wake(payment, &state_with(3));
        assert_eq!(waiters.take_latest(payment), Some(state_with(3)));
        assert_eq!(waiters.take_latest(payment), None);
        // A change while it still waits is kept for it; once it leaves, nothing is.
        waiters.wake(payment, &state_with(4));
        drop(notify);
        waiters.release(payment);
        assert!(waiters.latest.lock().unwrap().is_empty());
        assert!(waiters.payments.lock().unwrap().is_empty());
        // A change while the last waiter is on its way out (its `Notify` let go, its release
        // to come) is kept, so a waiter registering in between is not handed an older one;
        // the release drops it.
        let leaving = waiters.notify_for(payment);
        waiters.wake(payment, &state_with(5));
        drop(leaving);
        waiters.wake(payment, &state_with(6));
        let next = waiters.notify_for(payment);
        waiters.release(payment); // the first waiter's release: the second still holds on
        assert_eq!(waiters.take_latest(payment), Some(state_with(6)));
        drop(next);
        waiters.release(payment);
        assert!(waiters.latest.lock().unwrap().is_empty());
        assert!(waiters.payments.lock().unwrap().is_empty());
    }

    fn message(event_type: &str, payload: Vec<u8>) -> kassa_bus::Message {
        let envelope = Envelope {
            event_id: 1,
            event_type: event_type.into(),
            stream_id: 2,
            stream_seq: 1,
            position: 1,
            timestamp_ms: 0,
            causation_id: None,
            correlation_id: None,
            payload,
            prev_hash: kassa_codec::GENESIS_HASH,
        };
        kassa_bus::Message {
            topic: MERCHANTS.into(),
            partition: 0,
            offset: 0,
            key: Vec::new(),
            payload: encode_frame(&envelope),
            timestamp_ms: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idempotency_records_older_than_the_cutoff_are_dropped_with_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![
            kassa_bus::TopicSpec::new(PAYMENT_COMMANDS, 4),
            kassa_bus::TopicSpec::new(PAYMENT_EVENTS, 4),
            kassa_bus::TopicSpec::new(MERCHANTS, 1),
        ];
        let bus =
            Arc::new(kassa_bus::EmbeddedBus::open(dir.path().join("bus"), kassa_bus::BusConfig::new(topics)).unwrap());
        let log = Arc::new(EventLog::open(dir.path().join("ingest"), kassa_eventlog::LogConfig::default()).unwrap());
        let config = IngestConfig { outcome_wait_ms: 10, ..IngestConfig::default() };
        let clock: Arc<dyn Clock> = Arc::new(crate::SystemClock);
        let ingest = IngestService::new(
            Arc::clone(&log),
            Arc::clone(&bus) as Arc<dyn Bus>,
            Arc::new(CardVault::new(10)),
            Arc::clone(&clock),
            config,
        );
        let merchant_id = MerchantId::from_u128(5);
        let body = br#"{"amount": 1999, "currency": "EUR", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}"#;
        // Nothing takes it from the bus here: answered 202, and its record kept.
        let answer = ingest.create_payment(merchant_id, Some("k-1"), body).await.unwrap();
        assert_eq!(answer.status, 202);
        let record_key = idempotency_key(merchant_id, "k-1");
        assert!(log.get(Table::Idempotency, &record_key).unwrap().is_some());
        let now = clock.now().unix_ms();

        assert_eq!(ingest.prune_idempotency_before(now - 3_600_000).await.unwrap(), 0);
        assert!(log.get(Table::Idempotency, &record_key).unwrap().is_some(), "a record younger than the cutoff went");
        assert_eq!(ingest.prune_idempotency_before(now + 1_000).await.unwrap(), 1);
        assert!(log.get(Table::Idempotency, &record_key).unwrap().is_none());
        assert!(log.scan(Table::State, IDEMPOTENCY_BY_TIME).unwrap().is_empty());

        // A record forgotten, then stored again later under the same key: the first
        // one's index entry goes at its time, the second record stays until its own.
        ingest.create_payment(merchant_id, Some("k-2"), body).await.unwrap();
        let record_key = idempotency_key(merchant_id, "k-2");
        ingest.forget_idempotency(record_key.clone()).await.unwrap();
        let first = clock.now().unix_ms();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let answer = ingest.create_payment(merchant_id, Some("k-2"), body).await.unwrap();
        assert_eq!(answer.status, 202);
        let again = log.get(Table::Idempotency, &record_key).unwrap().expect("stored again");
        assert_eq!(ingest.prune_idempotency_before(first + 5).await.unwrap(), 1);
        assert_eq!(log.get(Table::Idempotency, &record_key).unwrap(), Some(again), "the later record went early");
        assert_eq!(log.scan(Table::State, IDEMPOTENCY_BY_TIME).unwrap().len(), 1);
        assert_eq!(ingest.prune_idempotency_before(clock.now().unix_ms() + 1_000).await.unwrap(), 1);
        assert!(log.get(Table::Idempotency, &record_key).unwrap().is_none());

        // Records are stamped by the expiry clock, whose reading is stored with them. An
        // instance started on this log with a wall clock two days ahead resumes from that
        // reading: neither its stamps nor its cutoff move with the wall clock.
        let stored = ExpiryClock::decode(log.get(Table::State, EXPIRY_CLOCK).unwrap().as_deref()).expect("stored");
        assert!((first..first + 60_000).contains(&stored), "{stored} is not a reading near {first}");
        #[derive(Debug)]
        struct Ahead;
        impl Clock for Ahead {
            fn now(&self) -> kassa_domain::Timestamp {
                kassa_domain::Timestamp(crate::SystemClock.now().unix_ms() + 2 * 86_400_000)
            }
        }
        let config = IngestConfig { outcome_wait_ms: 10, ..IngestConfig::default() };
        let later = IngestService::new(Arc::clone(&log), bus, Arc::new(CardVault::new(10)), Arc::new(Ahead), config);
        let reading = later.expiry_now().unwrap();
        assert!((stored..stored + 60_000).contains(&reading), "took the wall clock's word: {}", reading - stored);
    }

    #[test]
    fn a_merchant_on_the_topic_lets_its_key_in_and_anything_else_changes_nothing() {
        let (request, merchant_id, key) = new_merchant("shop", kassa_domain::Timestamp(1)).unwrap();
        let event = &request.events[0];
        let write = merchant_key_write(&message(&event.event_type, event.payload.clone())).expect("a merchant");
        assert_eq!(write.key, merchant_key_key(&key.hash_hex()));
        assert_eq!(write.value, Some(merchant_id.as_u128().to_be_bytes().to_vec()));

        let not_a_hash = encode_value(&(merchant_id, "shop", "sk_live_in_clear"));
        let mut garbage = message(MERCHANT_CREATED, Vec::new());
        garbage.payload = b"not a frame".to_vec();
        for bad in [
            message(MERCHANT_CREATED, not_a_hash),
            message(MERCHANT_CREATED, b"\x01\x02".to_vec()),
            message("payment.requested", event.payload.clone()),
            garbage,
        ] {
            assert!(merchant_key_write(&bad).is_none(), "{:?}", bad.payload);
        }
    }
}
