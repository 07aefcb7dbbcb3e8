//! Membership: the endpoints discovery has given, the ones removed that may still have
//! requests in flight, and forgetting those once nothing refers to them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use super::table::Origin;
use crate::endpoint::{EndpointHandle, REMOVED};
use crate::health::outlier::Ejection;
use crate::health::slow_start::Ramp;
use crate::stats::{EndpointStats, EndpointStatus};

/// One endpoint known to discovery.
pub(crate) struct Member<K, S> {
    pub(crate) key: K,
    pub(crate) handle: EndpointHandle,
    /// Shared with every table that lists the endpoint.
    pub(crate) service: Arc<Origin<S>>,
    /// Fixed while it is a member: clones keep their copies of its service by slot.
    pub(crate) slot: u32,
    /// Which service it has: every `Insert` gets a new id, so a readiness failure or a copy of
    /// another id belongs to a service that has since been replaced.
    pub(crate) id: u64,
    pub(crate) ejection: Ejection,
    pub(crate) ramp: Ramp,
}

/// Membership, owned by the discovery task and read for stats and by handles.
pub(crate) struct Registry<K, S> {
    pub(crate) members: Vec<Member<K, S>>,
    index: HashMap<K, usize>,
    /// Removed endpoints that may still have requests in flight or reserved.
    retired: Vec<(K, EndpointHandle)>,
    /// Picks and failures of removed endpoints that have been forgotten.
    forgotten: (u64, u64),
    /// Slots given back by removed members, for reuse.
    free_slots: Vec<u32>,
    /// Slots handed out so far (free or not): the length of a table's `members`.
    slot_count: u32,
    /// The last service id handed out.
    last_id: u64,
    /// Copies to invalidate in the next table (see
    /// [`Snapshot::invalidated`](super::table::Snapshot::invalidated)).
    invalidated: Vec<(u32, u64)>,
}

impl<K: Hash + Eq + Clone, S> Registry<K, S> {
    pub(crate) fn new() -> Self {
        Self {
            members: Vec::new(),
            index: HashMap::new(),
            retired: Vec::new(),
            forgotten: (0, 0),
            free_slots: Vec::new(),
            slot_count: 0,
            last_id: 0,
            invalidated: Vec::new(),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// The member with this key.
    pub(crate) fn get(&self, key: &K) -> Option<&Member<K, S>> {
        self.index.get(key).map(|&position| &self.members[position])
    }

    /// The member with this key, to change its health state.
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut Member<K, S>> {
        self.index
            .get(key)
            .map(|&position| &mut self.members[position])
    }

    /// The member holding this endpoint.
    pub(crate) fn find(&self, handle: &EndpointHandle) -> Option<&Member<K, S>> {
        self.members.iter().find(|m| m.handle.same(handle))
    }

    /// Adds a member for a new key, or gives a known key its new service and weight (its
    /// counters stay). Returns whether the key was new.
    pub(crate) fn insert(
        &mut self,
        key: K,
        service: S,
        weight: u32,
        new_handle: impl FnOnce() -> EndpointHandle,
    ) -> bool {
        let id = self.next_id();
        if let Some(&position) = self.index.get(&key) {
            let member = &mut self.members[position];
            self.invalidated.push((member.slot, member.id));
            member.service = Arc::new(Origin::new(service));
            member.id = id;
            // Requests reserved on the old service in older tables go elsewhere.
            member.handle.set_service(id);
            member.handle.set_weight(weight);
            member.handle.clear_broken();
            return false;
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slot_count += 1;
            self.slot_count - 1
        });
        let handle = new_handle();
        handle.set_service(id);
        self.index.insert(key.clone(), self.members.len());
        self.members.push(Member {
            key,
            handle,
            service: Arc::new(Origin::new(service)),
            slot,
            id,
            ejection: Ejection::default(),
            ramp: Ramp::default(),
        });
        true
    }

    /// Takes an endpoint out of the table into the removed ones, which stay (in stats) until
    /// nothing is in flight or can still be dispatched to them. Returns its in-flight count.
    pub(crate) fn retire(&mut self, key: &K) -> Option<u64> {
        let position = self.index.remove(key)?;
        let member = self.members.swap_remove(position);
        if let Some(moved) = self.members.get(position) {
            self.index.insert(moved.key.clone(), position);
        }
        // Requests reserved on the endpoint in older tables go elsewhere from now on.
        member.handle.set_flag(REMOVED);
        self.free_slots.push(member.slot);
        self.invalidated.push((member.slot, member.id));
        let in_flight = member.handle.in_flight();
        self.retired.push((member.key, member.handle));
        Some(in_flight)
    }

    /// The service id in each slot (0: none), for a new table.
    pub(crate) fn ids_by_slot(&self) -> Box<[u64]> {
        let mut ids = vec![0; self.slot_count as usize];
        for member in &self.members {
            ids[member.slot as usize] = member.id;
        }
        ids.into_boxed_slice()
    }

    /// The copies invalidated since the last table.
    pub(crate) fn take_invalidated(&mut self) -> Box<[(u32, u64)]> {
        std::mem::take(&mut self.invalidated).into_boxed_slice()
    }

    /// Picks and failures of removed endpoints that are no longer listed.
    pub(crate) fn forgotten(&self) -> (u64, u64) {
        self.forgotten
    }

    /// Forgets removed endpoints that nothing can dispatch to any more and that have nothing
    /// in flight.
    pub(crate) fn prune_retired(&mut self) {
        let forgotten = &mut self.forgotten;
        self.retired.retain(|(_, handle)| {
            let keep = !handle.is_idle_and_unshared();
            if !keep {
                forgotten.0 += handle.picks();
                forgotten.1 += handle.failures();
            }
            keep
        });
    }

    pub(crate) fn stats(&mut self) -> Vec<EndpointStats<K>> {
        self.prune_retired();
        let active = self.members.iter().map(|m| {
            let status = if m.handle.is_broken() {
                EndpointStatus::Broken
            } else if m.handle.is_draining() {
                EndpointStatus::Draining
            } else if m.handle.is_ejected() {
                EndpointStatus::Ejected
            } else if m.ramp.is_ramping() {
                EndpointStatus::SlowStart
            } else {
                EndpointStatus::Active
            };
            endpoint_stats(&m.key, &m.handle, status, m.ejection.count())
        });
        let retired = self.retired.iter().map(|(key, handle)| {
            let status = if handle.is_draining() {
                EndpointStatus::Draining
            } else {
                EndpointStatus::Removed
            };
            endpoint_stats(key, handle, status, 0)
        });
        active.chain(retired).collect()
    }
}

fn endpoint_stats<K: Clone>(
    key: &K,
    handle: &EndpointHandle,
    status: EndpointStatus,
    ejections: u32,
) -> EndpointStats<K> {
    EndpointStats {
        key: key.clone(),
        in_flight: handle.in_flight(),
        picks: handle.picks(),
        failures: handle.failures(),
        consecutive_failures: handle.consecutive_failures(),
        weight: handle.configured_weight(),
        effective_weight: handle.weight(),
        ejections,
        status,
    }
}
