//! Projections rebuilt from the log, with snapshots so recovery does not
//! replay from zero.

use crate::{EventLog, LogError};
use kassa_codec::Envelope;

/// State folded from events.
pub trait Projection: Default {
    /// Fold one event in. Events a projection does not care about are skipped.
    fn apply(&mut self, envelope: &Envelope) -> Result<(), LogError>;
    fn to_snapshot(&self) -> Vec<u8>;
    fn from_snapshot(bytes: &[u8]) -> Result<Self, String>;
}

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered<P> {
    pub projection: P,
    /// The last position folded in.
    pub position: u64,
    /// The snapshot position started from, if one was usable.
    pub snapshot_position: Option<u64>,
    pub events_replayed: u64,
}

/// Load the latest snapshot of `name` (if it is sound) and replay the rest.
/// A corrupt or unreadable snapshot is skipped with a warning: it is derived
/// data, and the log can always rebuild it.
pub fn recover<P: Projection>(log: &EventLog, name: &str) -> Result<Recovered<P>, LogError> {
    let (mut projection, start, snapshot_position) = match log.load_snapshot(name) {
        Ok(Some((position, bytes))) => match P::from_snapshot(&bytes) {
            Ok(projection) => (projection, position, Some(position)),
            Err(reason) => {
                tracing::warn!(snapshot = name, %reason, "snapshot does not decode; replaying from the start");
                (P::default(), 0, None)
            }
        },
        Ok(None) => (P::default(), 0, None),
        Err(error) => {
            tracing::warn!(snapshot = name, %error, "snapshot unusable; replaying from the start");
            (P::default(), 0, None)
        }
    };
    let mut position = start;
    let mut events_replayed = 0;
    for envelope in log.iter_from(start + 1) {
        let envelope = envelope?;
        projection.apply(&envelope)?;
        position = envelope.position;
        events_replayed += 1;
    }
    Ok(Recovered { projection, position, snapshot_position, events_replayed })
}
