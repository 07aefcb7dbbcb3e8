//! The endpoint table: what the discovery task publishes and every clone reads.
//!
//! A [`Snapshot`] is one endpoint set: the endpoints' shared state, the services clones copy
//! when they first use an endpoint, and the strategy's picker for that set. [`Table`] holds the
//! newest snapshot.
//!
//! Publishing is rare (membership, weight or strategy changes) and reading is per request, so
//! the table is a version number beside a read-write-locked `Arc`. A reader compares the
//! version with the one it last saw (one atomic load on the request path, on cache lines
//! nothing else writes) and takes the read lock only when it changed, to pick up the new
//! snapshot; readers never wait for each other. The version is written inside the write lock,
//! so a reader that saw a new version and then loads always gets that snapshot or a newer one.
//!
//! The top bit of the version says the discovery task has failed: every reader notices it at
//! its next version check, at no cost on the request path.

use crate::endpoint::{EndpointHandle, BROKEN, DRAINING, EJECTED, REMOVED};
use crate::util::spare::Spare;
use crate::util::sync::{read, replace, Arc, AtomicU64, CachePadded, Ordering, RwLock};

/// One endpoint's service in a table, and where clones keep their copies of it.
pub(crate) struct Source<S> {
    /// Shared with the member and every table that has it, so a publish clones no service.
    pub(crate) service: std::sync::Arc<Origin<S>>,
    /// The member's slot, fixed while it is a member: clones keep their copies by slot.
    pub(crate) slot: u32,
    /// Which service this is: every `Insert` gets a new id, so a clone never uses its copy of
    /// a service that has been replaced, or of an endpoint removed while its slot was reused.
    pub(crate) id: u64,
}

/// An endpoint's service as the tables hold it, beside one spare copy of it.
///
/// A clone needs its own copy of a service to poll and call. Cloning one costs what the
/// service's `Clone` costs — for hyper-util's client, four reference counts on four cache
/// lines, and four more to drop it — which a clone made per request pays per request. So a
/// clone, when it is dropped, leaves a copy whose readiness it has used up (the last thing it
/// did with it was `call`) here, and the next clone that needs the endpoint takes it instead
/// of cloning: one compare-and-swap each way ([`Spare`]), on the line the service is on (a
/// clone that finds the place busy, another thread taking or leaving a copy right then,
/// clones the service). One spare per service bounds what this keeps alive: a replaced
/// service's spare goes with the last table that lists it; a copy that finds the place taken
/// is dropped as before. A copy that may hold something for its readiness (a `Buffer` permit,
/// say) is never left: the clone leaves nothing if any of its copies was polled and not
/// called since (see `Local::tainted`). Services without drop glue (no reference counts,
/// nothing to release) are plain data: they are cloned, which costs less than the spare's
/// two atomic operations.
pub(crate) struct Origin<S> {
    pub(crate) service: S,
    spare: Spare<S>,
}

impl<S> Origin<S> {
    pub(crate) fn new(service: S) -> Self {
        Self {
            service,
            spare: Spare::new(),
        }
    }

    /// A copy of the service: the spare if there is one, else a clone.
    #[inline]
    pub(crate) fn copy(&self) -> S
    where
        S: Clone,
    {
        if !std::mem::needs_drop::<S>() {
            return self.service.clone();
        }
        self.spare.take().unwrap_or_else(|| self.service.clone())
    }

    /// Leaves `copy` as the spare if there is none; otherwise it is dropped.
    #[inline]
    pub(crate) fn give_back(&self, copy: S) {
        if std::mem::needs_drop::<S>() {
            drop(self.spare.give(copy));
        }
    }
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
    /// `picker.latency_decay()` as a rate (`1 / decay_ns`, what estimates decay by), asked
    /// and divided once per table.
    pub(crate) latency_rate: Option<f64>,
    /// The flags that keep an endpoint of this table from new requests: ejection does not
    /// in panic mode, when ejected endpoints are picked too.
    pub(crate) unavailable: u32,
}

impl<S, P> Snapshot<S, P> {
    /// A table with no endpoint.
    pub(crate) fn empty(picker: P, keyed: bool, latency_rate: Option<f64>) -> Self {
        Self {
            endpoints: Box::new([]),
            sources: Box::new([]),
            members: Box::new([]),
            invalidated: Box::new([]),
            picker,
            keyed,
            latency_rate,
            unavailable: unavailable(true),
        }
    }
}

/// The flags that keep an endpoint from new requests: ejection too, unless in panic mode.
pub(crate) fn unavailable(honor_ejection: bool) -> u32 {
    let ejected = if honor_ejection { EJECTED } else { 0 };
    BROKEN | DRAINING | REMOVED | ejected
}

/// Set in the version once the discovery task has failed; no table is published after it.
pub(crate) const FAILED: u64 = 1 << 63;

/// The newest snapshot and its version; see the [module docs](self).
pub(crate) struct Table<T> {
    version: CachePadded<AtomicU64>,
    current: RwLock<(u64, Arc<T>)>,
}

impl<T> Table<T> {
    pub(crate) fn new(initial: T) -> Self {
        Self {
            version: CachePadded(AtomicU64::new(0)),
            current: RwLock::new((0, Arc::new(initial))),
        }
    }

    /// The version of the newest snapshot, with [`FAILED`] set once the task has failed.
    #[inline]
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The newest snapshot and its version (without [`FAILED`]).
    pub(crate) fn load(&self) -> (u64, Arc<T>) {
        let current = read(&self.current);
        (current.0, Arc::clone(&current.1))
    }

    /// Replaces the snapshot; readers see it from their next version check.
    pub(crate) fn publish(&self, next: T) {
        let next = Arc::new(next);
        let version = read(&self.current).0 + 1;
        // Only the discovery task publishes, so the version read above is still the newest.
        let old = replace(&self.current, (version, next));
        // An add, not a store, so that a racing `fail` is kept.
        self.version.fetch_add(1, Ordering::Release);
        // The old snapshot (and with it, maybe, services) is dropped outside the lock.
        drop(old);
    }

    /// Marks the table as failed: every reader's next version check sees it.
    pub(crate) fn fail(&self) {
        self.version.fetch_or(FAILED, Ordering::AcqRel);
    }
}

#[cfg(all(test, tower_lb_loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// A reader that sees a version always loads a snapshot at least that new, and versions
    /// and snapshots never go backwards, while a writer publishes twice.
    #[test]
    fn readers_never_see_a_version_without_its_snapshot() {
        loom::model(|| {
            let table = Arc::new(Table::new(0u64));
            let writer = {
                let table = Arc::clone(&table);
                thread::spawn(move || {
                    table.publish(1);
                    table.publish(2);
                })
            };
            let mut last = 0;
            for _ in 0..2 {
                let seen = table.version();
                let (version, snapshot) = table.load();
                assert!(version >= seen);
                assert_eq!(*snapshot, version, "the snapshot matches its version");
                assert!(*snapshot >= last);
                last = *snapshot;
            }
            writer.join().unwrap();
            assert_eq!(table.version(), 2);
        });
    }

    /// Clones made on two threads take the table, copy a service out of it (the balancer's
    /// lazily copied services: an `Arc` shared by the tables that list it, cloned into the
    /// clone) and drop everything, while the discovery task publishes a table without that
    /// service. Loom checks that every table and every service is freed exactly once,
    /// whatever the interleaving, and that a reader never sees a table older than the version
    /// it read.
    #[test]
    fn fresh_clones_copy_services_while_tables_change() {
        loom::model(|| {
            let service = Arc::new(7u32);
            let table = Arc::new(Table::new((1u64, Some(Arc::clone(&service)))));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let table = Arc::clone(&table);
                    thread::spawn(move || {
                        let seen = table.version();
                        let (version, snapshot) = table.load();
                        assert!(version >= seen);
                        let copy = snapshot.1.as_ref().map(|s| Arc::new(**s));
                        drop(snapshot);
                        if let Some(copy) = copy {
                            assert_eq!(*copy, 7);
                        }
                    })
                })
                .collect();
            table.publish((2, None));
            drop(service);
            for reader in readers {
                reader.join().unwrap();
            }
            let (version, snapshot) = table.load();
            assert_eq!((version, snapshot.0), (1, 2));
            assert!(snapshot.1.is_none());
        });
    }

    /// A failure marked while a table is published is never lost, and the version under it
    /// keeps counting.
    #[test]
    fn a_failure_survives_a_racing_publish() {
        loom::model(|| {
            let table = Arc::new(Table::new(0u64));
            let writer = {
                let table = Arc::clone(&table);
                thread::spawn(move || table.publish(1))
            };
            table.fail();
            writer.join().unwrap();
            assert_eq!(table.version(), FAILED | 1);
        });
    }
}
