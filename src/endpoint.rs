//! Per-endpoint state shared by the endpoint table, the strategies and the in-flight guards.
//!
//! An endpoint's state is one heap cell whose life is counted by hand, because the count *is*
//! the in-flight gauge: the low 32 bits of `refs` count in-flight requests (each
//! [`InFlightGuard`] holds one), the high 32 bits count the table handles that own the cell.
//! A guard therefore costs one atomic add to create and one atomic subtract to drop, and it
//! keeps the state alive on its own: removing the endpoint, swapping the strategy or
//! publishing a new table never invalidates a guard, and a guard never refers to a slot index
//! that could be reused for another endpoint.
//!
//! # Load reporting (opt-in)
//!
//! A picker that needs the least-loaded endpoint without reading all of them (least
//! connections) gives endpoints a place in a [`LoadIndex`] ([`EndpointState::install_watch`],
//! off the request path) and then *activates* reporting ([`EndpointState::activate`]): from
//! then on the endpoint reports every change of its in-flight count to the index, on the
//! request path. Reporting is marked by the top bit of `refs` ([`WATCHED`]), so an endpoint
//! that never reports — every endpoint of a round-robin balancer — pays one predictable branch
//! on the value its dispatch read-modify-write returns anyway, and its guard one on a flag it
//! keeps from that value. An endpoint reports for life once activated, also if the balancer
//! swaps to a strategy that does not read the index.
//!
//! Activation only happens while nothing is in flight, so a guard's endpoint reports for the
//! whole life of the guard or not at all: the flag stays true, and a guard that does not
//! report never sees `WATCHED` in its release.

use std::fmt;
use std::ptr::{self, NonNull};

use crate::load_index::LoadIndex;
use crate::sync::{fence, Arc, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// The balancer's clock: tokio's, so that latency estimates follow a paused test clock.
pub(crate) mod clock {
    use std::sync::OnceLock;
    use tokio::time::Instant;

    static EPOCH: OnceLock<Instant> = OnceLock::new();

    /// Nanoseconds since a process-wide epoch. One clock read.
    pub(crate) fn now_ns() -> u64 {
        let epoch = *EPOCH.get_or_init(Instant::now);
        Instant::now().saturating_duration_since(epoch).as_nanos() as u64
    }
}

/// The endpoint's service failed `poll_ready`; out of rotation until re-inserted.
pub(crate) const BROKEN: u32 = 1;
/// Ejected by outlier detection; back when its ejection time is over.
pub(crate) const EJECTED: u32 = 2;
/// Being drained: no new requests; the drain waiter is woken when in-flight reaches zero.
pub(crate) const DRAINING: u32 = 4;
/// Removed by discovery (or drained): out of every table from the next publish, and no request
/// reserved before that is sent to it.
pub(crate) const REMOVED: u32 = 8;

/// What an endpoint reports to its balancer from the response path.
pub(crate) struct EndpointEvents {
    /// Consecutive failures that eject the endpoint; 0 disables ejection.
    pub(crate) eject_after: u32,
    /// How many endpoints may be ejected at once, and how many are.
    pub(crate) max_ejected: std::sync::atomic::AtomicUsize,
    pub(crate) ejected: std::sync::atomic::AtomicUsize,
    /// Wakes the discovery task, which times the ejection.
    pub(crate) wake: std::sync::Arc<tokio::sync::Notify>,
}

impl EndpointEvents {
    /// Takes one of the ejection slots, if one is free.
    fn try_eject(&self) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        let max = self.max_ejected.load(Ordering::Acquire);
        self.ejected
            .fetch_update(AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .is_ok()
    }
}

/// One table handle, in the high half of `refs`.
const OWNER: u64 = 1 << 32;
/// The in-flight count, in the low half of `refs`.
const IN_FLIGHT_MASK: u64 = OWNER - 1;
/// Set in `refs` once the endpoint reports its load to an index; far above any owner count.
const WATCHED: u64 = 1 << 63;

/// An endpoint's place in a load index.
pub(crate) struct Watch {
    pub(crate) index: Arc<LoadIndex>,
    pub(crate) slot: usize,
}

/// What [`EndpointState::activate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// This call started the reporting.
    Activated,
    /// The endpoint already reports.
    AlreadyActive,
    /// Requests are in flight (or no watch is installed): try again later.
    Busy,
}

/// The shared state of one endpoint.
///
/// Aligned to two cache lines so that counters of different endpoints, touched by different
/// threads, never share a line. In C layout so that everything a request touches — including
/// what a load report reads — sits in the first 64 bytes.
#[repr(C, align(128))]
pub(crate) struct EndpointState {
    /// `owners << 32 | in_flight`, plus [`WATCHED`].
    refs: AtomicU64,
    /// Requests dispatched to this endpoint since it was first inserted.
    picks: AtomicU64,
    /// The index `watch` owns, copied here for reports; null until attached.
    report_to: AtomicPtr<LoadIndex>,
    /// The slot `watch` holds, copied here for reports.
    report_slot: AtomicU32,
    /// Responses that failed in a row; a success resets it.
    consecutive_failures: AtomicU32,
    /// The weight strategies see (at least 1): the configured weight, or less while the
    /// endpoint is slow-starting.
    weight: AtomicU32,
    /// `BROKEN | EJECTED | DRAINING`.
    flags: AtomicU32,
    /// Requests and readiness checks that failed.
    failures: AtomicU64,
    /// The weight discovery or a handle gave (at least 1).
    configured_weight: AtomicU32,
    /// The id the balancer gave the endpoint's current service; a new `Insert` of the same key
    /// replaces the service and the id.
    service_id: AtomicU64,
    /// Who to tell when the endpoint fails too often; `None` outside a balancer.
    events: Option<std::sync::Arc<EndpointEvents>>,
    /// Woken when the last in-flight request of a draining endpoint finishes.
    drained: futures_util::task::AtomicWaker,
    /// The PeakEWMA latency estimate in nanoseconds, as `f64` bits; 0 before any sample.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds on the [`clock`] scale.
    rtt_at: AtomicU64,
    /// A stable name for hashing strategies; fixed for the endpoint's life.
    identity: Box<str>,
    /// The index this endpoint reports its load to; null until attached, then fixed for life
    /// (and freed with the state), so a reporter holding a reference on the state can use it.
    watch: AtomicPtr<Watch>,
    /// Lets loom see the cell's life: a leaked cell leaks this `Arc` and a double free drops
    /// it twice, and loom reports both.
    #[cfg(tower_lb_loom)]
    _life: crate::sync::Arc<()>,
}

impl EndpointState {
    #[inline]
    pub(crate) fn in_flight(&self) -> u64 {
        self.refs.load(Ordering::SeqCst) & IN_FLIGHT_MASK
    }

    /// The in-flight count, read with a read-modify-write: a cleaner of a [`LoadIndex`] bit
    /// reads it this way after clearing, so that it meets the endpoint's own report on this
    /// word (see the index's docs).
    pub(crate) fn in_flight_latest(&self) -> u64 {
        self.refs.fetch_add(0, Ordering::AcqRel) & IN_FLIGHT_MASK
    }

    #[inline]
    pub(crate) fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub(crate) fn configured_weight(&self) -> u32 {
        self.configured_weight.load(Ordering::Relaxed)
    }

    /// Sets the configured weight; the driver derives the weight strategies see from it.
    pub(crate) fn set_weight(&self, weight: u32) {
        self.configured_weight.store(weight, Ordering::Relaxed);
    }

    /// Records the id of the endpoint's service, when it is inserted or replaced.
    pub(crate) fn set_service(&self, id: u64) {
        self.service_id.store(id, Ordering::Release);
    }

    /// Whether `id` is the endpoint's current service.
    #[inline]
    pub(crate) fn serves(&self, id: u64) -> bool {
        self.service_id.load(Ordering::Acquire) == id
    }

    /// Sets the weight strategies see.
    pub(crate) fn set_effective_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Counts a failed response: the failure total and the run of consecutive failures.
    /// Returns `true` when the run has just reached the balancer's ejection threshold and the
    /// endpoint was ejected (within the balancer's cap on ejected endpoints).
    pub(crate) fn record_response_failure(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let run = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.events {
            Some(events) if run == events.eject_after && events.try_eject() => {
                self.flags.fetch_or(EJECTED, Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn reset_consecutive_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Ends a run of failures. Reads first so that the common case writes nothing.
    #[inline]
    pub(crate) fn record_response_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// The PeakEWMA latency estimate (nanoseconds) decayed to `now`, or `None` before the
    /// first sample.
    pub(crate) fn rtt_estimate(&self, now: u64, decay_ns: f64) -> Option<f64> {
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        if estimate == 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(self.rtt_at.load(Ordering::Relaxed)) as f64;
        // Without samples the estimate decays toward zero, so an endpoint that stopped
        // getting traffic because it looked slow is tried again eventually.
        Some(estimate * (-elapsed / decay_ns).exp())
    }

    /// Folds a latency sample into the PeakEWMA estimate: a sample above the estimate
    /// replaces it (the peak), one below decays it toward the sample with time constant
    /// `decay_ns`. Concurrent updates race benignly: the last writer wins, as in any EWMA that
    /// drops a sample.
    pub(crate) fn record_rtt(&self, sample_ns: f64, now: u64, decay_ns: f64) {
        let sample_ns = sample_ns.max(1.0);
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let next = if estimate == 0.0 || sample_ns > estimate {
            sample_ns
        } else {
            let elapsed = now.saturating_sub(self.rtt_at.load(Ordering::Relaxed)) as f64;
            let keep = (-elapsed / decay_ns).exp();
            estimate * keep + sample_ns * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_at.store(now, Ordering::Relaxed);
    }

    pub(crate) fn identity(&self) -> &str {
        &self.identity
    }

    #[inline]
    pub(crate) fn flags(&self) -> u32 {
        self.flags.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn is_broken(&self) -> bool {
        self.flags() & BROKEN != 0
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.flags() & EJECTED != 0
    }

    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.flags() & DRAINING != 0
    }

    /// Sets `flag`; returns `true` for the caller that changed it. Sequentially consistent,
    /// so that [`EndpointHandle::try_dispatch`] and a drain agree on who came first.
    pub(crate) fn set_flag(&self, flag: u32) -> bool {
        self.flags.fetch_or(flag, Ordering::SeqCst) & flag == 0
    }

    /// Clears `flag`; returns `true` for the caller that changed it.
    pub(crate) fn clear_flag(&self, flag: u32) -> bool {
        self.flags.fetch_and(!flag, Ordering::AcqRel) & flag != 0
    }

    pub(crate) fn mark_broken(&self) -> bool {
        self.set_flag(BROKEN)
    }

    pub(crate) fn clear_broken(&self) {
        self.clear_flag(BROKEN);
    }

    /// Registers the drain waiter's waker.
    pub(crate) fn register_drain_waker(&self, waker: &std::task::Waker) {
        self.drained.register(waker);
    }

    /// The index place this endpoint has, if a picker installed one.
    pub(crate) fn watch(&self) -> Option<&Watch> {
        // SAFETY: a watch, once set, is never replaced and lives as long as the state.
        unsafe { self.watch.load(Ordering::Acquire).as_ref() }
    }

    /// Gives the endpoint `slot` in `index`, for life; it does not report until
    /// [`activate`](Self::activate)d. `false` (changing nothing) if it already has a place, or
    /// if `slot` does not fit the 32 bits kept for reports.
    pub(crate) fn install_watch(&self, index: Arc<LoadIndex>, slot: usize) -> bool {
        if u32::try_from(slot).is_err() {
            return false;
        }
        let watch = Box::into_raw(Box::new(Watch { index, slot }));
        let installed = self
            .watch
            .compare_exchange(ptr::null_mut(), watch, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !installed {
            // SAFETY: made just above and never shared.
            drop(unsafe { Box::from_raw(watch) });
        }
        installed
    }

    /// Whether the endpoint reports its load.
    pub(crate) fn is_reporting(&self) -> bool {
        self.refs.load(Ordering::Acquire) & WATCHED != 0
    }

    /// Starts reporting to the installed watch, if nothing is in flight (see the module docs).
    /// On [`Activation::Activated`] the caller must record the endpoint at level 0.
    pub(crate) fn activate(&self) -> Activation {
        let Some(watch) = self.watch() else {
            return Activation::Busy;
        };
        let mut refs = self.refs.load(Ordering::Acquire);
        loop {
            if refs & WATCHED != 0 {
                return Activation::AlreadyActive;
            }
            if refs & IN_FLIGHT_MASK != 0 {
                return Activation::Busy;
            }
            // Racing activators store the same values.
            self.report_slot.store(watch.slot as u32, Ordering::Relaxed);
            self.report_to
                .store(Arc::as_ptr(&watch.index).cast_mut(), Ordering::Relaxed);
            // `Release` publishes both to reporters that see the bit (they fence `Acquire`). A
            // dispatch either comes first (and the exchange fails on its count) or sees the bit.
            match self.refs.compare_exchange_weak(
                refs,
                refs | WATCHED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Activation::Activated,
                Err(now) => refs = now,
            }
        }
    }

    /// Reports the in-flight count that the caller's read-modify-write of `refs` produced.
    /// The caller saw `WATCHED` and holds a reference on the state.
    #[inline]
    fn report_in_flight(&self, in_flight: u64) {
        // Pairs with the `Release` of `WATCHED` in `attach`: seeing the bit makes the watch
        // visible.
        fence(Ordering::Acquire);
        // SAFETY: `watch` owns the index for as long as the state lives.
        if let Some(index) = unsafe { self.report_to.load(Ordering::Relaxed).as_ref() } {
            index.report(in_flight, self.report_slot.load(Ordering::Relaxed) as usize);
        }
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        let watch = self.watch.load(Ordering::Acquire);
        if !watch.is_null() {
            // SAFETY: the watch was made by `Box::into_raw` in `attach` and nothing else can
            // reach this state any more.
            let watch = unsafe { Box::from_raw(watch) };
            watch.index.free_slot(watch.slot);
        }
    }
}

/// Drops `count` from `refs` and frees the cell when nothing refers to it any more.
///
/// # Safety
/// `ptr` must point to a live cell on which the caller holds `count` references.
#[inline]
unsafe fn release(ptr: NonNull<EndpointState>, count: u64) {
    // SAFETY: the caller holds `count` references, so the cell is alive until the subtraction.
    let prev = unsafe { ptr.as_ref() }
        .refs
        .fetch_sub(count, Ordering::Release);
    if prev & !WATCHED == count {
        // SAFETY: that was the last reference.
        unsafe { free(ptr) }
    }
}

/// Ends one request to an endpoint that does not report its load: [`release`] of one
/// in-flight reference, minus the masking. `WATCHED` cannot be set here: reporting starts
/// only while nothing is in flight, and this reference was in flight until the subtraction.
///
/// # Safety
/// As for [`release`], with `count` 1, on an endpoint that did not report when the reference
/// was taken.
#[inline]
unsafe fn release_in_flight(ptr: NonNull<EndpointState>) {
    // SAFETY: the caller's reference keeps the cell alive until the subtraction.
    if unsafe { ptr.as_ref() }.refs.fetch_sub(1, Ordering::Release) == 1 {
        // SAFETY: that was the last reference.
        unsafe { free(ptr) }
    }
}

/// Frees a cell after its last reference was released.
///
/// # Safety
/// The caller released the last reference to the cell at `ptr`.
#[cold]
#[inline(never)]
unsafe fn free(ptr: NonNull<EndpointState>) {
    // Synchronise with every other release before freeing, as `Arc` does.
    fence(Ordering::Acquire);
    // SAFETY: nothing refers to the cell any more; it was made by `Box::new` in
    // `EndpointHandle::new`.
    drop(unsafe { Box::from_raw(ptr.as_ptr()) });
}

/// An owning handle on an endpoint's state, held by the endpoint table and its snapshots.
pub(crate) struct EndpointHandle {
    ptr: NonNull<EndpointState>,
}

// SAFETY: the state is only reached through atomics, and the cell is freed exactly once.
unsafe impl Send for EndpointHandle {}
// SAFETY: as above.
unsafe impl Sync for EndpointHandle {}

impl EndpointHandle {
    /// An endpoint with no identity and no balancer to report to, for unit tests.
    #[cfg(test)]
    pub(crate) fn new(weight: u32) -> Self {
        Self::with_identity(weight, Box::from(""), None)
    }

    pub(crate) fn with_identity(
        weight: u32,
        identity: Box<str>,
        events: Option<std::sync::Arc<EndpointEvents>>,
    ) -> Self {
        let state = Box::new(EndpointState {
            refs: AtomicU64::new(OWNER),
            picks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            weight: AtomicU32::new(weight),
            configured_weight: AtomicU32::new(weight),
            service_id: AtomicU64::new(0),
            flags: AtomicU32::new(0),
            events,
            drained: futures_util::task::AtomicWaker::new(),
            consecutive_failures: AtomicU32::new(0),
            rtt_ns: AtomicU64::new(0),
            rtt_at: AtomicU64::new(0),
            identity,
            report_to: AtomicPtr::new(ptr::null_mut()),
            report_slot: AtomicU32::new(0),
            watch: AtomicPtr::new(ptr::null_mut()),
            #[cfg(tower_lb_loom)]
            _life: crate::sync::Arc::new(()),
        });
        Self {
            ptr: NonNull::from(Box::leak(state)),
        }
    }

    /// Counts a request as dispatched to this endpoint and returns the guard that counts it
    /// down again (the balancer uses [`try_dispatch`](Self::try_dispatch)).
    #[cfg(test)]
    pub(crate) fn dispatch(&self) -> InFlightGuard {
        let guard = self.enter();
        self.picks.fetch_add(1, Ordering::Relaxed);
        guard
    }

    /// Dispatches a request to service `service` of this endpoint, unless the endpoint has
    /// one of the `unavailable` flags or its service has been replaced. Checked after the
    /// request is counted in flight: whoever sets a flag and then waits for the in-flight count
    /// to reach zero (a drain) either sees this request or is seen by it.
    #[inline]
    pub(crate) fn try_dispatch(&self, unavailable: u32, service: u64) -> Option<InFlightGuard> {
        let guard = self.enter();
        if self.flags.load(Ordering::SeqCst) & unavailable != 0 || !self.serves(service) {
            // Dropping the guard releases the count (and wakes a drain waiting for it).
            return None;
        }
        self.picks.fetch_add(1, Ordering::Relaxed);
        Some(guard)
    }

    /// Counts one more request in flight.
    #[inline]
    fn enter(&self) -> InFlightGuard {
        let prev = self.refs.fetch_add(1, Ordering::SeqCst);
        if prev & IN_FLIGHT_MASK == IN_FLIGHT_MASK {
            // Four billion requests in flight to one endpoint: the count would spill into the
            // owner half. Like `Arc` on overflow, refuse to continue rather than corrupt it.
            std::process::abort();
        }
        let reports = prev & WATCHED != 0;
        if reports {
            self.report_dispatch(prev);
        }
        InFlightGuard {
            ptr: self.ptr,
            reports,
        }
    }

    /// Out of line, so that endpoints that do not report keep a small `dispatch`.
    #[inline(never)]
    fn report_dispatch(&self, prev: u64) {
        self.report_in_flight((prev & IN_FLIGHT_MASK) + 1);
    }

    /// Whether this is the only handle left and nothing is in flight: no snapshot can dispatch
    /// to the endpoint any more.
    pub(crate) fn is_idle_and_unshared(&self) -> bool {
        self.refs.load(Ordering::Acquire) & !WATCHED == OWNER
    }

    /// Whether two handles refer to the same endpoint.
    pub(crate) fn same(&self, other: &Self) -> bool {
        self.ptr == other.ptr
    }
}

impl std::ops::Deref for EndpointHandle {
    type Target = EndpointState;

    #[inline]
    fn deref(&self) -> &EndpointState {
        // SAFETY: the handle holds an owner reference, so the cell is alive.
        unsafe { self.ptr.as_ref() }
    }
}

impl Clone for EndpointHandle {
    fn clone(&self) -> Self {
        self.refs.fetch_add(OWNER, Ordering::Relaxed);
        Self { ptr: self.ptr }
    }
}

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        // SAFETY: this handle holds one owner reference.
        unsafe { release(self.ptr, OWNER) }
    }
}

impl fmt::Debug for EndpointHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointHandle")
            .field("in_flight", &self.in_flight())
            .field("picks", &self.picks())
            .finish()
    }
}

/// Counts one request as in flight to an endpoint for as long as it lives.
///
/// The balancer creates a guard when it dispatches a request and keeps it in the response
/// future, so the endpoint's in-flight count drops exactly once: when the response arrives,
/// when the call fails, when the future is dropped unfinished, or when a panic unwinds through
/// it. With the `http` feature the guard can instead travel inside the response body and be
/// released at the end of the stream.
///
/// The guard refers to the endpoint's state itself, never to a position in the endpoint
/// table, so it stays correct when the endpoint is removed or the table is rebuilt while the
/// request is in flight.
#[must_use = "dropping the guard ends the request's in-flight accounting"]
pub struct InFlightGuard {
    ptr: NonNull<EndpointState>,
    /// Whether the endpoint reports its load, read from the dispatch's read-modify-write. It
    /// cannot change while the guard lives: reporting starts only while nothing is in flight.
    reports: bool,
}

// SAFETY: see `EndpointHandle`.
unsafe impl Send for InFlightGuard {}
// SAFETY: see `EndpointHandle`.
unsafe impl Sync for InFlightGuard {}

impl InFlightGuard {
    #[inline]
    fn state(&self) -> &EndpointState {
        // SAFETY: the guard holds one in-flight reference, so the cell is alive.
        unsafe { self.ptr.as_ref() }
    }

    /// Counts the request as failed against its endpoint (the failure total and the run of
    /// consecutive failures that load-aware strategies and outlier detection hold against
    /// it); the guard is released as usual.
    pub fn record_failure(&self) {
        if self.state().record_response_failure() {
            if let Some(events) = &self.state().events {
                events.wake.notify_one();
            }
        }
    }

    /// Counts the request as answered successfully, ending any run of failures.
    #[inline]
    pub fn record_success(&self) {
        self.state().record_response_success();
    }

    pub(crate) fn record_rtt(&self, sample_ns: f64, now: u64, decay_ns: f64) {
        self.state().record_rtt(sample_ns, now, decay_ns);
    }

    /// An owning handle on the same endpoint.
    pub(crate) fn owner(&self) -> EndpointHandle {
        self.state().refs.fetch_add(OWNER, Ordering::Relaxed);
        EndpointHandle { ptr: self.ptr }
    }

    /// The number of requests in flight to this guard's endpoint, this one included.
    pub fn endpoint_in_flight(&self) -> u64 {
        self.state().in_flight()
    }
}

impl Drop for InFlightGuard {
    #[inline]
    fn drop(&mut self) {
        if self.state().is_draining() {
            // Someone waits for the drain: keep the cell alive (as an owner) across the
            // release so the waker can be reached afterwards.
            let owner = self.owner();
            if self.reports {
                // SAFETY: this guard holds one in-flight reference on an endpoint that reports.
                unsafe { release_reporting(self.ptr) }
            } else {
                // SAFETY: as above, on an endpoint that did not report at dispatch.
                unsafe { release_in_flight(self.ptr) }
            }
            if owner.in_flight() == 0 {
                owner.drained.wake();
            }
            return;
        }
        if self.reports {
            // SAFETY: this guard holds one in-flight reference on an endpoint that reports.
            unsafe { release_reporting(self.ptr) }
        } else {
            // SAFETY: as above, on an endpoint that did not report at dispatch.
            unsafe { release_in_flight(self.ptr) }
        }
    }
}

/// Ends one request to an endpoint that reports its load, and reports the new count.
///
/// The report must follow the decrement, and the state (which owns the watch, which owns the
/// index) must outlive the report, so the in-flight reference is traded for an owner reference
/// in one step — `OWNER - 1` takes one from the low half and adds one to the high half — and
/// that is released after reporting.
///
/// # Safety
/// The caller holds one in-flight reference on a live state that reports.
#[inline(never)]
unsafe fn release_reporting(ptr: NonNull<EndpointState>) {
    // SAFETY: the caller's reference keeps the state alive, and then the owner reference does.
    let state = unsafe { ptr.as_ref() };
    let prev = state.refs.fetch_add(OWNER - 1, Ordering::Release);
    state.report_in_flight((prev & IN_FLIGHT_MASK) - 1);
    // SAFETY: the owner reference taken above.
    unsafe { release(ptr, OWNER) }
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard")
            .field("endpoint_in_flight", &self.endpoint_in_flight())
            .finish()
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_in_flight_and_outlives_its_handle() {
        let handle = EndpointHandle::new(1);
        let a = handle.dispatch();
        let b = handle.dispatch();
        assert_eq!(handle.in_flight(), 2);
        assert_eq!(handle.picks(), 2);
        drop(a);
        assert_eq!(handle.in_flight(), 1);
        drop(handle);
        // The state is still alive for the remaining guard.
        assert_eq!(b.endpoint_in_flight(), 1);
        b.record_failure();
        drop(b);
    }

    #[test]
    fn owners_do_not_count_as_in_flight() {
        let handle = EndpointHandle::new(3);
        let copies: Vec<_> = (0..5).map(|_| handle.clone()).collect();
        assert_eq!(handle.in_flight(), 0);
        assert_eq!(handle.weight(), 3);
        assert!(copies.iter().all(|c| c.same(&handle)));
        drop(copies);
        assert_eq!(handle.in_flight(), 0);
    }
}

#[cfg(all(test, tower_lb_loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Guards dropped on other threads while the last table handle goes away: the count ends
    /// at zero and the cell is freed exactly once (loom reports a leak or a double free
    /// through the cell's `_life` marker).
    #[test]
    fn guards_and_handles_release_exactly_once() {
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let g1 = handle.dispatch();
            let g2 = handle.dispatch();
            let other = handle.clone();
            let t1 = thread::spawn(move || drop(g1));
            let t2 = thread::spawn(move || {
                assert!(g2.endpoint_in_flight() >= 1);
                drop(g2);
            });
            let t3 = thread::spawn(move || drop(other));
            assert!(handle.in_flight() <= 2);
            t1.join().unwrap();
            t2.join().unwrap();
            t3.join().unwrap();
            assert_eq!(handle.in_flight(), 0);
            assert_eq!(handle.picks(), 2);
        });
    }

    /// A dispatch and its release race the activation of load reporting: activation only
    /// succeeds while nothing is in flight, so once all is done the index holds the endpoint
    /// at its count whichever came first, and the state (with its watch) is freed once.
    #[test]
    fn activation_races_a_request() {
        use crate::sync::Arc;
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let index = Arc::new(LoadIndex::new(64));
            assert!(handle.install_watch(Arc::clone(&index), 0));
            let copy = handle.clone();
            let t = thread::spawn(move || {
                let guard = copy.dispatch();
                drop(copy);
                guard
            });
            let activated = handle.activate();
            if activated == Activation::Activated {
                index.insert(0, 0);
            }
            let guard = t.join().unwrap();
            if handle.is_reporting() {
                assert!(index.holds(1, 0), "the dispatch was not reported");
            } else {
                assert_eq!(activated, Activation::Busy);
            }
            drop(guard);
            if !handle.is_reporting() {
                assert_eq!(handle.activate(), Activation::Activated);
                index.insert(0, 0);
            }
            assert!(index.holds(0, 0), "the release was not reported");
            assert!(!handle.install_watch(Arc::clone(&index), 1));
            drop(handle);
        });
    }

    /// Guards of a reporting endpoint are dropped on two threads while a third drops the last
    /// handle: each release reports before letting go, nothing is used after it is freed, the
    /// state is freed once (loom checks all three), and the index ends with the endpoint at 0.
    #[test]
    fn reporting_releases_race_the_last_handle() {
        use crate::sync::Arc;
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let index = Arc::new(LoadIndex::new(64));
            assert!(handle.install_watch(Arc::clone(&index), 3));
            assert_eq!(handle.activate(), Activation::Activated);
            let g1 = handle.dispatch();
            let g2 = handle.dispatch();
            assert!(index.holds(2, 3));
            let t1 = thread::spawn(move || drop(g1));
            let t2 = thread::spawn(move || drop(g2));
            let t3 = thread::spawn(move || drop(handle));
            t1.join().unwrap();
            t2.join().unwrap();
            t3.join().unwrap();
            assert!(index.holds(0, 3), "the last release was not reported");
        });
    }

    /// A guard made on one thread while another drops the last other handle.
    #[test]
    fn dispatch_races_with_removal() {
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let table_copy = handle.clone();
            let t = thread::spawn(move || {
                let guard = table_copy.dispatch();
                drop(table_copy);
                guard
            });
            drop(handle);
            let guard = t.join().unwrap();
            assert_eq!(guard.endpoint_in_flight(), 1);
            drop(guard);
        });
    }
}
