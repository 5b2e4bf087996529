//! The reconciliation service: for every closed settlement batch, ask the
//! batch's provider for its settlement report and match it, line by line,
//! against what Kassa batched (`kassa_domain::reconciliation`). Matched
//! captures are recorded reconciled on their payments; every discrepancy is
//! kept in the report for an operator.
//!
//! It follows `settlement.events` (keyed by batch id, so one batch's events
//! arrive in order on one partition) and folds each batch's events itself.
//! Lines the provider has not recorded yet are asked again a few times before
//! they are reported missing: a provider settles what it has been told, and
//! an owed capture may still be on its way.

use crate::batch_store::{batch_writes, load_batch};
use crate::changelog;
use crate::consume::{Owned, PartitionEnd, appends_of, id_key, next_batch, resume_subscription, run_partitions};
use crate::messages::{PaymentCommandMessage, commands_for_payments};
use crate::relay::{RelayConfig, run_relay};
use crate::runtime::{Clock, derived_id};
use crate::topics::{PAYMENT_COMMANDS, RECONCILIATION_CHANGELOG, RECONCILIATION_GROUP, SETTLEMENT_EVENTS};
use kassa_bus::{Bus, Membership, Message};
use kassa_codec::{EventPayload, decode_frame_ref, decode_value, encode_value};
use kassa_domain::reconciliation::{Reconciliation, reconcile};
use kassa_domain::settlement::{BatchEvent, BatchState, EntryKind, SettlementEntry, try_apply_batch};
use kassa_domain::{BatchId, MerchantId, ReportId, Timestamp};
use kassa_eventlog::{AppendRequest, EventLog, LogError, NewEvent, StateWrite, Table};
use kassa_providers::Connector;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bounds of reconciliation. Units last.
#[derive(Debug, Clone, Copy)]
pub struct ReconciliationConfig {
    /// Times the provider is asked for lines it has not recorded yet.
    pub report_attempts_max: u32,
    /// Pause between those asks.
    pub retry_delay_ms: u64,
    /// Deadline of one report call.
    pub provider_timeout_ms: u64,
    /// Share `settlement.events` with other instances through a consumer
    /// group, each partition's state moving with it through
    /// `reconciliation.changelog` (`kassa reconcile`). Off: this instance owns
    /// every partition.
    pub changelog: bool,
}

impl Default for ReconciliationConfig {
    fn default() -> Self {
        ReconciliationConfig {
            report_attempts_max: 5,
            retry_delay_ms: 1000,
            provider_timeout_ms: 5000,
            changelog: false,
        }
    }
}

/// A stored reconciliation report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconciliationReport {
    pub report_id: ReportId,
    pub batch_id: BatchId,
    pub provider: String,
    pub merchant_id: MerchantId,
    pub created_at: Timestamp,
    pub result: Reconciliation,
    /// The provider could not be asked at all (down past every attempt).
    pub provider_error: Option<String>,
}

pub const REPORT_RECORDED: &str = "reconciliation.report_recorded";

/// The service; share behind an `Arc`.
#[derive(Debug)]
pub struct ReconciliationService {
    log: Arc<EventLog>,
    bus: Arc<dyn Bus>,
    providers: Vec<Arc<dyn Connector>>,
    clock: Arc<dyn Clock>,
    config: ReconciliationConfig,
    /// Open batches being followed, so each event does not reload its batch.
    open: std::sync::Mutex<HashMap<BatchId, BatchState>>,
    /// The partitions of `settlement.events` this instance owns.
    owned: Owned,
}

/// Why a partition stopped.
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
    /// Stopped before an input's reports were made: nothing of it was committed.
    #[error("stopped before the input was committed")]
    Interrupted,
    #[error(transparent)]
    Bus(#[from] kassa_bus::BusError),
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

fn merchant_reports_key(merchant_id: MerchantId, report_id: ReportId) -> Vec<u8> {
    let mut key = format!("merchant-reports/{merchant_id}/").into_bytes();
    key.extend_from_slice(&(u128::MAX - report_id.as_u128()).to_be_bytes());
    key
}

fn offset_key(partition: u32) -> Vec<u8> {
    format!("{SETTLEMENT_EVENTS}/{partition}").into_bytes()
}

impl ReconciliationService {
    pub fn new(
        log: Arc<EventLog>,
        bus: Arc<dyn Bus>,
        providers: Vec<Arc<dyn Connector>>,
        clock: Arc<dyn Clock>,
        config: ReconciliationConfig,
    ) -> Self {
        ReconciliationService {
            log,
            bus,
            providers,
            clock,
            config,
            open: std::sync::Mutex::new(HashMap::new()),
            owned: Owned::default(),
        }
    }

    /// The partitions of `settlement.events` this instance owns now.
    pub fn partitions_owned(&self) -> Vec<u32> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    /// One reader per partition of `settlement.events` this instance owns
    /// (every one, or its share in the group with `changelog`), and the relay
    /// of its commands.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Result<Vec<JoinHandle<()>>, kassa_bus::BusError> {
        let partitions = self.bus.partitions(SETTLEMENT_EVENTS)?;
        let membership = if self.config.changelog {
            let changelog = self.bus.partitions(RECONCILIATION_CHANGELOG)?;
            if changelog != partitions {
                return Err(kassa_bus::BusError::PartitionCountChanged {
                    topic: RECONCILIATION_CHANGELOG.to_owned(),
                    existing: changelog,
                    configured: partitions,
                });
            }
            self.bus.join_group(RECONCILIATION_GROUP, SETTLEMENT_EVENTS)?
        } else {
            Membership::sole(RECONCILIATION_GROUP, partitions)
        };
        let service = Arc::clone(self);
        let mut tasks = vec![tokio::spawn({
            let stop = stop.clone();
            async move {
                let owned = &service.owned;
                let starter = Arc::clone(&service);
                run_partitions(membership, stop, owned, move |partition, owner, stop| {
                    tokio::spawn(Arc::clone(&starter).run_partition(partition, owner, stop))
                })
                .await;
            }
        })];
        tasks.push(tokio::spawn(run_relay(
            Arc::clone(&self.log),
            Arc::clone(&self.bus),
            PAYMENT_COMMANDS,
            |t| t.starts_with("command.").then_some(PAYMENT_COMMANDS),
            RelayConfig::default(),
            stop,
        )));
        Ok(tasks)
    }

    /// Follow one partition of `settlement.events`; `Some(reason)` when it cannot go on here at all.
    async fn run_partition(
        self: Arc<Self>,
        partition: u32,
        owner: String,
        mut stop: watch::Receiver<bool>,
    ) -> PartitionEnd {
        let mut ownership = None;
        if self.config.changelog {
            // What other instances (or this one, before a crash) did with this partition, then a claim.
            let (log, bus) = (&self.log, self.bus.as_ref());
            let taken = changelog::take_partition(
                log,
                bus,
                RECONCILIATION_CHANGELOG,
                partition,
                &owner,
                &stop,
                "reconciliation",
            );
            let taken = match taken.await {
                Ok((taken, _)) => taken,
                Err(end) => return end,
            };
            let followed = match crate::consume::stored_offset(&self.log, &offset_key(partition)) {
                Ok(followed) => followed,
                Err(error) => return PartitionEnd::Fatal(error.to_string()),
            };
            if taken.epoch == 1 && followed > 0 {
                // The first claim ever, on a log that followed the partition before the
                // changelog existed: the changelog would lack that state.
                return PartitionEnd::Fatal(format!(
                    "this reconciliation log followed {SETTLEMENT_EVENTS} partition {partition} before \
                     {RECONCILIATION_CHANGELOG} existed; run `kassa reconcile --rebuild` once"
                ));
            }
            ownership = Some(taken);
            // Batches cached while another instance owned the partition may be stale.
            self.open.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let subscription =
            resume_subscription(&self.log, &self.bus, SETTLEMENT_EVENTS, partition, &offset_key(partition));
        let mut subscription = match subscription {
            Ok(subscription) => subscription,
            Err(error) => return PartitionEnd::Fatal(format!("reading the position in {SETTLEMENT_EVENTS}: {error}")),
        };
        loop {
            let messages = match next_batch(&mut subscription, 256, &mut stop).await {
                Ok(Some(messages)) => messages,
                Ok(None) => return PartitionEnd::Again,
                Err(error) => return PartitionEnd::Fatal(error.to_string()),
            };
            match self.consume(partition, messages, ownership.as_mut(), &stop).await {
                Ok(()) => {}
                Err(PartitionError::Interrupted) => return PartitionEnd::Again,
                // Its log refuses writes: starting the partition again here cannot help.
                Err(PartitionError::Log(error)) => return PartitionEnd::Fatal(error.to_string()),
                Err(PartitionError::Fenced(fenced)) => {
                    tracing::warn!(partition, %fenced, "another instance owns this partition now; stopped it here");
                    return PartitionEnd::TakenOver;
                }
                Err(error) => {
                    tracing::error!(partition, %error, "reconciliation partition stopped");
                    return PartitionEnd::Again;
                }
            }
        }
    }

    /// Make an append durable: on the changelog first (with it on), then in the log.
    async fn commit(
        &self,
        requests: Vec<AppendRequest>,
        ownership: &mut Option<&mut changelog::Ownership>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), PartitionError> {
        let now = self.clock.now().unix_ms();
        let ownership = ownership.as_deref_mut();
        changelog::commit_in_order(&self.log, self.bus.as_ref(), ownership, requests, now, stop).await?;
        Ok(())
    }

    async fn consume(
        &self,
        partition: u32,
        messages: Vec<Message>,
        mut ownership: Option<&mut changelog::Ownership>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), PartitionError> {
        let last_offset = messages.last().map(|m| m.offset);
        let mut batches: HashMap<BatchId, BatchState> = HashMap::new();
        let mut new_entries: HashMap<BatchId, Vec<SettlementEntry>> = HashMap::new();
        let mut closed_now = Vec::new();
        for message in messages {
            let Ok(envelope) = decode_frame_ref(&message.payload) else {
                tracing::error!(partition, offset = message.offset, "undecodable settlement event skipped");
                continue;
            };
            let Ok(event) = BatchEvent::decode_payload(envelope.event_type, envelope.payload) else { continue };
            let batch_id = BatchId::from_u128(envelope.stream_id);
            let batch = match batches.entry(batch_id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let cached = self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&batch_id);
                    let batch = match cached {
                        Some(batch) => batch,
                        None => load_batch(&self.log, batch_id)?.unwrap_or_default(),
                    };
                    slot.insert(batch)
                }
            };
            if batch.holds(&event) {
                continue;
            }
            if let Err(reason) = try_apply_batch(batch, &event) {
                tracing::error!(partition, offset = message.offset, %batch_id, %reason, "settlement event skipped");
                continue;
            }
            match event {
                BatchEvent::EntryAdded { entry } => new_entries.entry(batch_id).or_default().push(entry),
                BatchEvent::Closed { .. } => closed_now.push(batch_id),
                BatchEvent::Opened { .. } => {}
            }
        }
        let mut writes = Vec::new();
        for (batch_id, batch) in &batches {
            writes.extend(batch_writes(batch, new_entries.get(batch_id).map_or(&[][..], Vec::as_slice)));
        }
        let mut report_events = Vec::new();
        let mut commands = Vec::new();
        let partitions = self.bus.partitions(PAYMENT_COMMANDS)?;
        for batch_id in closed_now {
            let report = self.reconcile_batch(&batches[&batch_id], stop).await;
            if *stop.borrow() {
                // Stopping (or handing the partition over) while providers were asked: nothing
                // of this input is committed, and whoever runs the partition next reconciles
                // these batches again (the same ids) rather than keep a report cut short.
                return Err(PartitionError::Interrupted);
            }
            writes.push(StateWrite {
                table: Table::State,
                key: id_key("report/", report.report_id.as_u128()),
                value: Some(encode_value(&report)),
            });
            writes.push(StateWrite {
                table: Table::State,
                key: merchant_reports_key(report.merchant_id, report.report_id),
                value: Some(Vec::new()),
            });
            let summary = (
                report.report_id,
                report.batch_id,
                report.result.matched.len() as u64,
                report.result.missing.len() as u64,
                report.result.amount_mismatch.len() as u64,
                report.result.unexpected.len() as u64,
            );
            report_events.push(self.event(
                report.report_id.as_u128(),
                batch_id.as_u128(),
                0,
                REPORT_RECORDED,
                encode_value(&summary),
            ));
            // Named by the report and the payments they name (one batch, one report):
            // reconciling the batch again makes the same ids, which authorization drops,
            // and a payment recorded in this report already is left as it is.
            let report_id = report.report_id;
            let captures = report.result.matched.iter().filter(|e| e.kind == EntryKind::Capture).map(|e| e.payment_id);
            let timestamp_ms = self.clock.now().unix_ms();
            commands.extend(commands_for_payments(captures, partitions, report_id.as_u128(), timestamp_ms, |ids| {
                PaymentCommandMessage::RecordReconciliations { payment_ids: ids, report_id }
            }));
        }
        // Commands first, in chunks; the reports, batches and offset last, queued
        // behind them in one go (the log writes them in order, and a crash keeps
        // a prefix): a crash in between re-does the reports, and a payment
        // reconciled in the report already is left as it is.
        if let Some(offset) = last_offset {
            writes.push(StateWrite {
                table: Table::Positions,
                key: offset_key(partition),
                value: Some((offset + 1).to_be_bytes().to_vec()),
            });
        }
        let mut requests = appends_of(commands);
        requests.push(AppendRequest { events: report_events, writes, ..Default::default() });
        self.commit(requests, &mut ownership, stop).await?;
        if let Some(offset) = last_offset {
            self.bus.note_consumed(RECONCILIATION_GROUP, SETTLEMENT_EVENTS, partition, offset + 1);
        }
        // Keep open batches in memory; closed ones are done.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() > 10_000 {
            open.clear();
        }
        open.extend(batches.into_iter().filter(|(_, b)| b.closed.is_none()));
        Ok(())
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

    /// Ask the provider for its lines (again while some are not there yet) and match them.
    async fn reconcile_batch(&self, batch: &BatchState, stop: &watch::Receiver<bool>) -> ReconciliationReport {
        let batch_id = batch.batch_id.expect("a closed batch has an id");
        let key = batch.key.clone().expect("a closed batch has a key");
        let ids: Vec<u128> = batch.entries.iter().map(|e| e.entry_id).collect();
        let deadline = Duration::from_millis(self.config.provider_timeout_ms);
        let provider = self.providers.iter().find(|p| p.name() == key.provider);
        let mut result = reconcile(&batch.entries, &[]);
        let mut provider_error = None;
        for attempt in 0..self.config.report_attempts_max.max(1) {
            if attempt > 0 {
                // Asking again for missing lines; a hand-over does not wait for that.
                if *stop.borrow() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(self.config.retry_delay_ms)).await;
            }
            let Some(provider) = provider else {
                provider_error = Some(format!("provider {} is not configured", key.provider));
                break;
            };
            match provider.settlement_report(&ids, deadline).await {
                Ok(lines) => {
                    provider_error = None;
                    result = reconcile(&batch.entries, &lines);
                    if result.missing.is_empty() {
                        break;
                    }
                }
                Err(error) => provider_error = Some(error.to_string()),
            }
        }
        if !result.is_clean() || provider_error.is_some() {
            tracing::warn!(%batch_id, missing = result.missing.len(), mismatched = result.amount_mismatch.len(),
                unexpected = result.unexpected.len(), error = ?provider_error, "reconciliation found discrepancies");
        }
        let created_at = self.clock.now();
        // Named by its batch and the batch's close: reconciling the batch again
        // (a rebuild) makes the same report, and the same commands.
        let closed_at = batch.closed.map_or(created_at, |(_, closed_at)| closed_at);
        ReconciliationReport {
            report_id: ReportId::from_parts(closed_at.unix_ms() as u64, derived_id(batch_id.as_u128(), "report", 0)),
            batch_id,
            provider: key.provider,
            merchant_id: key.merchant_id,
            created_at,
            result,
            provider_error,
        }
    }

    /// A merchant's reports, newest first.
    pub fn reports(&self, merchant_id: MerchantId, limit: usize) -> Result<Vec<ReconciliationReport>, LogError> {
        let prefix = format!("merchant-reports/{merchant_id}/").into_bytes();
        let mut out = Vec::new();
        for (key, _) in self.log.scan(Table::State, &prefix)?.into_iter().take(limit) {
            let Some(bytes) = key.get(key.len() - 16..).and_then(|b| <[u8; 16]>::try_from(b).ok()) else { continue };
            let report_id = u128::MAX - u128::from_be_bytes(bytes);
            if let Some(bytes) = self.log.get(Table::State, &id_key("report/", report_id))?
                && let Ok(report) = decode_value(&bytes, "report")
            {
                out.push(report);
            }
        }
        Ok(out)
    }
}
