//! Consumer groups: the members of a group share a topic's partitions, each
//! partition owned by one member at a time.
//!
//! A member learns its share as a stream of [`Rebalance`]s. The protocol is
//! Kafka's eager one: before a partition moves, its owner is told it is
//! revoked and the group waits until the owner has stopped it and made its
//! work durable (it drops `done`, or a bound passes); only then is the
//! partition assigned elsewhere. Partitions are spread by ranges over the
//! members sorted by id, as Kafka's range assignor does.
//!
//! [`Coordinator`] is the in-process coordinator the embedded bus uses;
//! [`crate::KafkaBus`] uses the cluster's group coordinator instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A change in a member's share of its group's partitions.
#[derive(Debug)]
pub enum Rebalance {
    /// These partitions are now this member's.
    Assigned(Vec<u32>),
    /// These partitions are taken away: stop working on them, make that work
    /// durable, then drop `done` — the partitions move on only after that.
    Revoked { partitions: Vec<u32>, done: oneshot::Sender<()> },
}

/// A member's view of its group. Dropping it leaves the group.
#[derive(Debug)]
pub struct Membership {
    pub member_id: String,
    pub changes: mpsc::UnboundedReceiver<Rebalance>,
    /// Held for its `Drop`: leaves the group (the in-process coordinator) or
    /// closes the member's consumer (Kafka).
    pub(crate) _leave: Box<dyn std::any::Any + Send>,
}

impl Membership {
    /// The only member: every partition, never revoked.
    pub fn sole(group: &str, partitions: u32) -> Membership {
        let (tx, changes) = mpsc::unbounded_channel();
        let _ = tx.send(Rebalance::Assigned((0..partitions).collect()));
        Membership { member_id: format!("{group}-sole"), changes, _leave: Box::new(tx) }
    }
}

/// How long the group waits for a member to hand back a revoked partition.
pub const REVOKE_WAIT_MAX: Duration = Duration::from_secs(15);

/// The partitions of `partitions` that member `index` of `members` owns: ranges, the first members taking one more.
pub fn range_assignment(partitions: u32, members: usize, index: usize) -> Vec<u32> {
    if members == 0 || index >= members {
        return Vec::new();
    }
    let (per, extra) = (partitions as usize / members, partitions as usize % members);
    let start = index * per + index.min(extra);
    let len = per + usize::from(index < extra);
    (start..start + len).map(|p| p as u32).collect()
}

struct Member {
    changes: mpsc::UnboundedSender<Rebalance>,
    owned: BTreeSet<u32>,
}

#[derive(Default)]
struct Group {
    members: BTreeMap<String, Member>,
    /// Rebalances run one at a time, in join/leave order.
    generation: u64,
}

/// In-process group coordinator: groups by (group, topic).
#[derive(Clone, Default)]
pub struct Coordinator {
    groups: Arc<Mutex<BTreeMap<(String, String), Group>>>,
    /// Serializes rebalances across the coordinator.
    rebalancing: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

struct Leave {
    coordinator: Coordinator,
    key: (String, String),
    member_id: String,
    partitions: u32,
}

impl Drop for Leave {
    fn drop(&mut self) {
        {
            let mut groups = self.coordinator.groups.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(group) = groups.get_mut(&self.key) {
                group.members.remove(&self.member_id);
            }
        }
        let (coordinator, key, partitions) = (self.coordinator.clone(), self.key.clone(), self.partitions);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { coordinator.rebalance(key, partitions).await });
        }
    }
}

impl Coordinator {
    /// Join `group` on `topic` (of `partitions` partitions). The new share
    /// arrives on the membership's channel once the group has rebalanced.
    pub fn join(&self, group: &str, topic: &str, partitions: u32) -> Membership {
        let key = (group.to_owned(), topic.to_owned());
        let (tx, rx) = mpsc::unbounded_channel();
        let member_id = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let entry = groups.entry(key.clone()).or_default();
            entry.generation += 1;
            // Ids sort in join order, so earlier members keep the lower ranges.
            let member_id = format!("{group}-{:06}", entry.generation);
            entry.members.insert(member_id.clone(), Member { changes: tx, owned: BTreeSet::new() });
            member_id
        };
        let coordinator = self.clone();
        let rebalance_key = key.clone();
        tokio::spawn(async move { coordinator.rebalance(rebalance_key, partitions).await });
        let leave = Leave { coordinator: self.clone(), key, member_id: member_id.clone(), partitions };
        Membership { member_id, changes: rx, _leave: Box::new(leave) }
    }

    /// Bring the group to the range assignment over its current members:
    /// revoke what moves, wait for those revocations, then assign.
    async fn rebalance(&self, key: (String, String), partitions: u32) {
        let _one_at_a_time = self.rebalancing.lock().await;
        // Members whose channel is closed have left without saying so.
        let (revocations, target) = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let Some(group) = groups.get_mut(&key) else { return };
            group.members.retain(|_, member| !member.changes.is_closed());
            let count = group.members.len();
            let target: BTreeMap<String, BTreeSet<u32>> = group
                .members
                .keys()
                .enumerate()
                .map(|(index, id)| (id.clone(), range_assignment(partitions, count, index).into_iter().collect()))
                .collect();
            let mut revocations = Vec::new();
            for (id, member) in &mut group.members {
                let lost: Vec<u32> = member.owned.difference(&target[id]).copied().collect();
                if lost.is_empty() {
                    continue;
                }
                let (done, waited) = oneshot::channel();
                if member.changes.send(Rebalance::Revoked { partitions: lost.clone(), done }).is_ok() {
                    revocations.push(waited);
                }
                for partition in lost {
                    member.owned.remove(&partition);
                }
            }
            (revocations, target)
        };
        for waited in revocations {
            // Dropped `done` (handed back) or a member gone: either way the partition is free.
            let _ = tokio::time::timeout(REVOKE_WAIT_MAX, waited).await;
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let Some(group) = groups.get_mut(&key) else { return };
        for (id, member) in &mut group.members {
            let Some(wanted) = target.get(id) else { continue };
            let gained: Vec<u32> = wanted.difference(&member.owned).copied().collect();
            if gained.is_empty() {
                continue;
            }
            // A partition another member still owns (it joined after `target` was taken) waits for the next round.
            if member.changes.send(Rebalance::Assigned(gained.clone())).is_ok() {
                member.owned.extend(gained);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_partition_once() {
        for partitions in 0..20u32 {
            for members in 1..6usize {
                let mut all: Vec<u32> =
                    (0..members).flat_map(|index| range_assignment(partitions, members, index)).collect();
                all.sort_unstable();
                assert_eq!(all, (0..partitions).collect::<Vec<_>>(), "{partitions} partitions, {members} members");
            }
        }
        assert!(range_assignment(8, 0, 0).is_empty());
        assert!(range_assignment(8, 2, 2).is_empty());
    }

    async fn next(membership: &mut Membership) -> Rebalance {
        tokio::time::timeout(Duration::from_secs(5), membership.changes.recv())
            .await
            .expect("a rebalance within 5 s")
            .expect("the group is open")
    }

    #[tokio::test]
    async fn a_second_member_takes_half_only_after_the_first_hands_it_back() {
        let coordinator = Coordinator::default();
        let mut first = coordinator.join("g", "t", 8);
        match next(&mut first).await {
            Rebalance::Assigned(partitions) => assert_eq!(partitions, (0..8).collect::<Vec<_>>()),
            other => panic!("expected an assignment, got {other:?}"),
        }
        let mut second = coordinator.join("g", "t", 8);
        let done = match next(&mut first).await {
            Rebalance::Revoked { partitions, done } => {
                assert_eq!(partitions, vec![4, 5, 6, 7]);
                done
            }
            other => panic!("expected a revocation, got {other:?}"),
        };
        // Nothing is assigned while the first member still holds the partitions.
        assert!(tokio::time::timeout(Duration::from_millis(200), second.changes.recv()).await.is_err());
        drop(done);
        match next(&mut second).await {
            Rebalance::Assigned(partitions) => assert_eq!(partitions, vec![4, 5, 6, 7]),
            other => panic!("expected an assignment, got {other:?}"),
        }
        // The first member leaves: the second takes everything.
        drop(first);
        match next(&mut second).await {
            Rebalance::Assigned(partitions) => assert_eq!(partitions, vec![0, 1, 2, 3]),
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
}
