//! State shared by every clone of one balancer and by its discovery task.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::endpoint::{EndpointHandle, BROKEN, DRAINING, EJECTED, REMOVED};
use crate::error::Error;
use crate::health::{OutlierDetection, SlowStart};
use crate::rng::FastRng;
use crate::stats::{EndpointStats, EndpointStatus, Stats};
use crate::strategy::LocalState;
use crate::sync::{lock, AtomicBool, AtomicU64, CachePadded, Mutex, Ordering};
use crate::table::Published;

/// Settings that do not depend on the strategy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    /// How long `poll_ready` waits for discovery to produce an endpoint before failing with
    /// `NoEndpoints`; `None` fails at once.
    pub(crate) wait_for_endpoints: Option<Duration>,
    pub(crate) outlier: Option<OutlierDetection>,
    /// Below this share of available endpoints, ejected ones are used too; 0 disables it.
    pub(crate) panic_threshold: f64,
    pub(crate) slow_start: Option<SlowStart>,
    /// Seeds the clones' random generators, for reproducible runs.
    pub(crate) seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            wait_for_endpoints: None,
            outlier: None,
            panic_threshold: 0.5,
            slow_start: None,
            seed: None,
        }
    }
}

/// One endpoint's service in a table, and where clones keep their copies of it.
pub(crate) struct Source<S> {
    /// Shared with the member and every table that has it, so a publish clones no service.
    pub(crate) service: std::sync::Arc<S>,
    /// The member's slot, fixed while it is a member: clones keep their copies by slot.
    pub(crate) slot: u32,
    /// Which service this is: every `Insert` gets a new id, so a clone never uses its copy of
    /// a service that has been replaced, or of an endpoint removed while its slot was reused.
    pub(crate) id: u64,
}

/// One published endpoint set: what a clone picks from and calls.
pub(crate) struct Snapshot<S, P> {
    pub(crate) endpoints: Box<[EndpointHandle]>,
    /// The services to copy into clones that use them, in the order of `endpoints`.
    pub(crate) sources: Box<[Source<S>]>,
    /// The service id of the member in each slot (0: none), for clones that catch up over
    /// several tables at once.
    pub(crate) members: Box<[u64]>,
    /// The `(slot, id)` of services removed or replaced since the previous table, for clones
    /// that catch up by one table: they drop exactly these copies.
    pub(crate) invalidated: Box<[(u32, u64)]>,
    pub(crate) picker: P,
    /// `picker.is_keyed()`, asked once per table rather than per request.
    pub(crate) keyed: bool,
    /// `picker.latency_decay()` in nanoseconds, asked once per table.
    pub(crate) latency_decay_ns: Option<f64>,
    /// False in panic mode, when ejected endpoints are picked too.
    pub(crate) honor_ejection: bool,
}

impl<S, P> Snapshot<S, P> {
    /// The flags that keep an endpoint of this table from new requests.
    #[inline]
    pub(crate) fn unavailable(&self) -> u32 {
        let ejected = if self.honor_ejection { EJECTED } else { 0 };
        BROKEN | DRAINING | REMOVED | ejected
    }
}

/// Messages from the request path (and handles) to the discovery task.
pub(crate) enum Control {
    /// A clone saw this endpoint's service (of this id) fail `poll_ready`.
    Failed { handle: EndpointHandle, id: u64 },
    /// Weights or the strategy changed: build a new picker and publish.
    Rebuild,
}

/// One endpoint known to discovery.
pub(crate) struct Member<K, S> {
    pub(crate) key: K,
    pub(crate) handle: EndpointHandle,
    pub(crate) service: std::sync::Arc<S>,
    /// See [`Source::slot`].
    pub(crate) slot: u32,
    /// See [`Source::id`]: a readiness failure reported for another id came from a service
    /// that has since been replaced.
    pub(crate) id: u64,
    /// Times ejected since the count last started over.
    pub(crate) ejections: u32,
    /// When the current ejection ends.
    pub(crate) ejected_until: Option<tokio::time::Instant>,
    /// When it last came back from an ejection.
    pub(crate) returned_at: Option<tokio::time::Instant>,
    /// When its slow start began, while it lasts.
    pub(crate) ramp_from: Option<tokio::time::Instant>,
    /// The slow-start factor of the last table, to rebuild only when the ramp moves.
    pub(crate) ramp_factor: u32,
}

/// Membership, owned by the discovery task and read for stats.
pub(crate) struct Registry<K, S> {
    pub(crate) members: Vec<Member<K, S>>,
    pub(crate) index: HashMap<K, usize>,
    /// Removed endpoints that may still have requests in flight or reserved.
    pub(crate) retired: Vec<(K, EndpointHandle)>,
    /// Picks and failures of removed endpoints that have been forgotten.
    pub(crate) forgotten: (u64, u64),
    /// Slots given back by removed members, for reuse.
    free_slots: Vec<u32>,
    /// Slots handed out so far (free or not): the length of a snapshot's `members`.
    pub(crate) slot_count: u32,
    /// The last service id handed out.
    last_id: u64,
    /// Copies to invalidate in the next table (see [`Snapshot::invalidated`]).
    pub(crate) invalidated: Vec<(u32, u64)>,
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

    /// A new service id.
    pub(crate) fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Adds a member for a new key.
    pub(crate) fn insert(
        &mut self,
        key: K,
        handle: EndpointHandle,
        service: S,
    ) -> &mut Member<K, S> {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slot_count += 1;
            self.slot_count - 1
        });
        let id = self.next_id();
        handle.set_service(id);
        let position = self.members.len();
        self.index.insert(key.clone(), position);
        self.members.push(Member {
            key,
            handle,
            service: std::sync::Arc::new(service),
            slot,
            id,
            ejections: 0,
            ejected_until: None,
            returned_at: None,
            ramp_from: None,
            ramp_factor: 0,
        });
        &mut self.members[position]
    }

    /// Replaces a member's service: clones drop their copies of the old one.
    pub(crate) fn replace(&mut self, position: usize, service: S) {
        let id = self.next_id();
        let member = &mut self.members[position];
        self.invalidated.push((member.slot, member.id));
        member.service = std::sync::Arc::new(service);
        member.id = id;
        // Requests reserved on the old service in older tables go to the new one's table.
        member.handle.set_service(id);
    }

    /// Takes an endpoint out of the table into `retired`, where it stays (in stats) until
    /// nothing is in flight or can still be dispatched to it. Returns its in-flight count.
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
            } else if m.ramp_from.is_some() {
                EndpointStatus::SlowStart
            } else {
                EndpointStatus::Active
            };
            endpoint_stats(&m.key, &m.handle, status, m.ejections)
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

/// The shared state of a balancer over `D` with strategy `St` and request key `Kx`.
pub(crate) type SharedOf<D, St, Kx> = Shared<
    <D as tower::discover::Discover>::Key,
    <D as tower::discover::Discover>::Service,
    <St as crate::strategy::Strategy>::Picker,
    Kx,
>;

pub(crate) type DriverFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(crate) struct Shared<K, S, P, Kx> {
    pub(crate) table: Published<Snapshot<S, P>>,
    pub(crate) registry: Mutex<Registry<K, S>>,
    /// Woken on every publish, for clones waiting for endpoints.
    pub(crate) published: std::sync::Arc<Notify>,
    /// The discovery task ends when this, the only sender, is dropped with the last clone.
    pub(crate) control: mpsc::UnboundedSender<Control>,
    pub(crate) key: Kx,
    pub(crate) config: Config,
    /// The discovery task, until it is spawned: at construction when a runtime is current,
    /// otherwise at the first `poll_ready`.
    pub(crate) unspawned: Mutex<Option<DriverFuture>>,
    pub(crate) spawned: AtomicBool,
    pub(crate) discovery_errors: AtomicU64,
    pub(crate) discovery_ended: AtomicBool,
    /// Whether the last table was built in panic mode.
    pub(crate) panicking: AtomicBool,
    /// Why the discovery task stopped, if it failed (the table's version says so too).
    pub(crate) failure: std::sync::OnceLock<String>,
    /// Clones made so far, to seed each one's generator differently and to start its
    /// rotation one step after the previous clone's. Bumped by every clone, so kept off the
    /// cache lines every request reads.
    pub(crate) clones: CachePadded<AtomicU64>,
    /// Where the first clone's rotation starts: random per balancer (or from the seed).
    pub(crate) rotation_base: u64,
    /// Mixed with the clone number to seed each clone's generator.
    pub(crate) seed_base: u64,
}

impl<K, S, P, Kx> Shared<K, S, P, Kx> {
    /// Makes sure the discovery task runs; fails only if it has not been started yet and there
    /// is still no runtime to start it on.
    #[inline]
    pub(crate) fn ensure_driver(&self) -> Result<(), Error> {
        if self.spawned.load(Ordering::Acquire) {
            return Ok(());
        }
        self.spawn_driver()
    }

    #[cold]
    pub(crate) fn spawn_driver(&self) -> Result<(), Error> {
        let mut unspawned = lock(&self.unspawned);
        if unspawned.is_some() {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
            if let Some(driver) = unspawned.take() {
                runtime.spawn(driver);
            }
        }
        self.spawned.store(true, Ordering::Release);
        Ok(())
    }

    /// The error every request gets once the discovery task has failed.
    pub(crate) fn failure(&self) -> Error {
        Error::DiscoveryFailed(
            self.failure
                .get()
                .cloned()
                .unwrap_or_else(|| "the discovery task stopped".to_owned()),
        )
    }

    /// Records that the discovery task failed; requests fail from their next `poll_ready`.
    pub(crate) fn fail(&self, message: String) {
        tracing::error!(%message, "the balancer's discovery task failed; every request fails from now on");
        let _ = self.failure.set(message);
        self.table.fail();
        self.published.notify_waiters();
    }

    /// The picking state of a new clone, in O(1): its cursor one step after the previous
    /// clone's, its generator seeded from the balancer's seed and the clone's number.
    pub(crate) fn local_state(&self) -> LocalState {
        let clone = self.clones.fetch_add(1, Ordering::Relaxed);
        let mut local = LocalState::with_rng(FastRng::seeded(crate::key::mix64(
            self.seed_base ^ clone.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )));
        // Clones start their rotations where the previous clone did, one further on: a
        // service that clones the balancer per request (axum's `State`, say) still rotates
        // exactly, and long-lived clones start spread out.
        local.cursor = clone.wrapping_add(self.rotation_base);
        local
    }

    pub(crate) fn stats(&self) -> Stats<K>
    where
        K: Hash + Eq + Clone,
    {
        let mut registry = lock(&self.registry);
        let endpoints = registry.stats();
        Stats {
            endpoints,
            panic_mode: self.panicking.load(Ordering::Relaxed),
            removed_picks: registry.forgotten.0,
            removed_failures: registry.forgotten.1,
            discovery_errors: self.discovery_errors.load(Ordering::Relaxed),
            discovery_ended: self.discovery_ended.load(Ordering::Relaxed),
            discovery_failure: self.failure.get().cloned(),
        }
    }
}
