//! Kassa's services as phases over their event logs and the bus.
//!
//! Each service: read a batch from the bus from its own stored position →
//! load state → call the pure core → write events, state and the consumed
//! position in one append → only then produce to the bus (through its
//! outbox relay) and call providers. See ARCHITECTURE.md.

pub mod authorization;
pub mod batch_store;
pub mod changelog;
pub mod consume;
pub mod http;
pub mod ingest;
pub mod messages;
pub mod reconciliation;
pub mod relay;
pub mod routing;
pub mod runtime;
pub mod seal;
pub mod settlement;
pub mod vault;

pub use runtime::{Clock, IdSource, SystemClock};

/// Topic names. Keys are payment ids, so one payment's messages stay in order.
pub mod topics {
    /// Ingest → authorization: new payments and capture/void/refund requests.
    pub const PAYMENT_COMMANDS: &str = "payments.commands";
    /// Authorization → everyone: the payment's event stream (single writer).
    pub const PAYMENT_EVENTS: &str = "payments.events";
    /// Settlement → reconciliation: every batch's events, keyed by batch id.
    pub const SETTLEMENT_EVENTS: &str = "settlement.events";
    /// Settlement's feed → settlement's batches: each capture and refund (and
    /// cut-off requests), keyed by the batch key (provider, merchant, currency),
    /// so one key's batches have one owner.
    pub const SETTLEMENT_ENTRIES: &str = "settlement.entries";
    /// Settlement → settlement: each `settlement.entries` partition's commits, as
    /// `authorization.changelog` is for authorization.
    pub const SETTLEMENT_CHANGELOG: &str = "settlement.changelog";
    /// Authorization → operators: providers' health changes (breakers, maintenance), keyed by provider.
    pub const PROVIDER_HEALTH: &str = "providers.health";
    /// Authorization → authorization: each partition's commits, so another
    /// instance can take the partition over (keyed to land on the commands
    /// partition they belong to; kept as long as the commands are).
    pub const AUTHORIZATION_CHANGELOG: &str = "authorization.changelog";
    /// Reconciliation → reconciliation: each `settlement.events` partition's commits, as
    /// `authorization.changelog` is for authorization.
    pub const RECONCILIATION_CHANGELOG: &str = "reconciliation.changelog";
    /// Ingest → every ingest instance: merchants and their API keys (hashed),
    /// keyed by merchant id. One partition, kept forever: an instance reads it
    /// from the start, so a merchant made on one instance is known to all.
    pub const MERCHANTS: &str = "merchants";

    /// The consumer groups the services report their positions under (for lag
    /// monitoring only: positions are read back from each service's own log),
    /// with the topic each consumes.
    pub const CONSUMERS: [(&str, &str); 5] = [
        (INGEST_GROUP, PAYMENT_EVENTS),
        (AUTHORIZATION_GROUP, PAYMENT_COMMANDS),
        (SETTLEMENT_GROUP, PAYMENT_EVENTS),
        (SETTLEMENT_BATCHES_GROUP, SETTLEMENT_ENTRIES),
        (RECONCILIATION_GROUP, SETTLEMENT_EVENTS),
    ];
    pub const INGEST_GROUP: &str = "kassa-ingest";
    pub const AUTHORIZATION_GROUP: &str = "kassa-authorization";
    /// Settlement's feed (`payments.events` → `settlement.entries`).
    pub const SETTLEMENT_GROUP: &str = "kassa-settlement";
    /// Settlement's batches (`settlement.entries` → `settlement.events`).
    pub const SETTLEMENT_BATCHES_GROUP: &str = "kassa-settlement-batches";
    pub const RECONCILIATION_GROUP: &str = "kassa-reconciliation";
}

/// Partition key of a payment's messages.
pub fn payment_key(stream_id: u128) -> Vec<u8> {
    stream_id.to_be_bytes().to_vec()
}
