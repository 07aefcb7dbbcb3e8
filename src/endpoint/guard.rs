//! The in-flight guard and the releases of an endpoint's references.

use std::fmt;
use std::ptr::NonNull;

use super::{check_owners, EndpointState, DRAIN, IN_FLIGHT_MASK, OWNER, OWNER_MASK, WATCHED};
use crate::util::sync::{fence, Ordering};

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
///
/// A guard that is never dropped (`std::mem::forget`, or a leaked response future) keeps its
/// request counted in flight forever: least-connections avoids the endpoint a little more,
/// and a drain of it never ends.
#[must_use = "dropping the guard ends the request's in-flight accounting"]
pub struct InFlightGuard {
    ptr: NonNull<EndpointState>,
    /// Whether the endpoint reports its load, read from the dispatch's read-modify-write. It
    /// cannot change while the guard lives: reporting starts only while nothing is in flight.
    reports: bool,
}

// SAFETY: the state is `Send + Sync` (asserted in the module above) and the guard's reference
// is released exactly once, in `drop`.
unsafe impl Send for InFlightGuard {}
// SAFETY: as above; `&InFlightGuard` only reads and counts through atomics.
unsafe impl Sync for InFlightGuard {}

impl InFlightGuard {
    /// Wraps an in-flight reference.
    ///
    /// # Safety
    /// The caller took one in-flight reference on the live state at `ptr` for this guard;
    /// `reports` says whether `WATCHED` was set when it did.
    #[inline]
    pub(super) unsafe fn new(ptr: NonNull<EndpointState>, reports: bool) -> Self {
        Self { ptr, reports }
    }

    #[inline]
    fn state(&self) -> &EndpointState {
        // SAFETY: the guard holds one in-flight reference, so the cell is alive.
        unsafe { self.ptr.as_ref() }
    }

    /// Counts the request as failed against its endpoint (the failure total and the run of
    /// consecutive failures that load-aware strategies and outlier detection hold against
    /// it); the guard is released as usual.
    pub fn record_failure(&self) {
        self.state().record_response_failure();
    }

    /// Counts the request as answered successfully, ending any run of failures.
    #[inline]
    pub fn record_success(&self) {
        self.state().record_response_success();
    }

    /// Folds a latency sample in, the decay given as a time constant (tests' convenience).
    #[cfg(test)]
    pub(crate) fn record_rtt(&self, sample_ns: f64, now: u64, decay_ns: f64) {
        self.record_rtt_at_rate(sample_ns, now, 1.0 / decay_ns);
    }

    /// [`record_rtt`](Self::record_rtt) with the decay as a rate, `1 / decay_ns`.
    #[inline]
    pub(crate) fn record_rtt_at_rate(&self, sample_ns: f64, now: u64, rate: f64) {
        self.state().rtt.record(sample_ns, now, rate);
    }

    /// The number of requests in flight to this guard's endpoint, this one included.
    pub fn endpoint_in_flight(&self) -> u64 {
        self.state().in_flight()
    }

    /// The endpoint's identity (the discovery key's `Debug` form), for errors and logs.
    pub fn endpoint(&self) -> &str {
        self.state().identity()
    }

    /// Ends the request's in-flight count now, and returns what records its outcome once it
    /// is known — for a stream tracked only until its first data whose status arrives at its
    /// end (gRPC trailers), say.
    pub fn into_outcome(self) -> Outcome {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the guard's in-flight reference, which `ManuallyDrop` keeps from being
        // released again, becomes the outcome's owner reference.
        unsafe { trade_for_owner(this.ptr) };
        Outcome {
            endpoint: super::EndpointHandle { ptr: this.ptr },
        }
    }
}

/// Records the outcome of a request that no longer counts as in flight; see
/// [`InFlightGuard::into_outcome`]. Dropping it records nothing.
#[must_use = "an outcome records nothing unless told"]
pub struct Outcome {
    endpoint: super::EndpointHandle,
}

impl Outcome {
    /// Counts the request as failed against its endpoint.
    pub fn record_failure(self) {
        self.endpoint.record_response_failure();
    }

    /// Counts the request as answered successfully, ending any run of failures.
    pub fn record_success(self) {
        self.endpoint.record_response_success();
    }
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("endpoint", &self.endpoint.identity())
            .finish()
    }
}

impl Drop for InFlightGuard {
    #[inline]
    fn drop(&mut self) {
        if self.reports {
            // SAFETY: this guard holds one in-flight reference on an endpoint that reports.
            unsafe { release_reporting(self.ptr) }
        } else {
            // SAFETY: as above, on an endpoint that did not report at dispatch.
            unsafe { release_in_flight(self.ptr) }
        }
    }
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard")
            .field("endpoint_in_flight", &self.endpoint_in_flight())
            .finish()
    }
}

/// Drops `count` owner or in-flight references and frees the cell when nothing refers to it
/// any more.
///
/// # Safety
/// `ptr` must point to a live cell on which the caller holds `count` references.
#[inline]
pub(super) unsafe fn release(ptr: NonNull<EndpointState>, count: u64) {
    // SAFETY: the caller holds `count` references, so the cell is alive until the subtraction.
    let prev = unsafe { ptr.as_ref() }
        .refs
        .fetch_sub(count, Ordering::Release);
    if prev & (OWNER_MASK | IN_FLIGHT_MASK) == count {
        // SAFETY: that was the last reference.
        unsafe { free(ptr) }
    }
}

/// Ends one request to an endpoint that does not report its load.
///
/// A compare-and-swap rather than a subtraction, so that it fails if a drain sets [`DRAIN`]
/// between the load and the swap; with the flag set, [`release_draining`] takes over. `WATCHED`
/// cannot be set here: reporting starts only while nothing is in flight, and this reference
/// was in flight until the swap.
///
/// # Safety
/// The caller holds one in-flight reference on a live state that did not report when the
/// reference was taken.
#[inline]
unsafe fn release_in_flight(ptr: NonNull<EndpointState>) {
    // SAFETY: the caller's reference keeps the cell alive until the swap succeeds.
    let refs = &unsafe { ptr.as_ref() }.refs;
    let mut current = refs.load(Ordering::Relaxed);
    loop {
        if current & DRAIN != 0 {
            // SAFETY: the caller's reference, passed on.
            return unsafe { release_draining(ptr) };
        }
        match refs.compare_exchange_weak(current, current - 1, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => {
                if current & (OWNER_MASK | IN_FLIGHT_MASK) == 1 {
                    // SAFETY: that was the last reference.
                    unsafe { free(ptr) }
                }
                return;
            }
            Err(now) => current = now,
        }
    }
}

/// Ends one request to an endpoint being drained, and wakes the drain if it was the last.
///
/// # Safety
/// The caller holds one in-flight reference on a live state that did not report when the
/// reference was taken.
#[cold]
#[inline(never)]
unsafe fn release_draining(ptr: NonNull<EndpointState>) {
    // SAFETY: the caller's reference, traded for an owner one, which is released after.
    unsafe {
        trade_for_owner(ptr);
        release(ptr, OWNER);
    }
}

/// Ends one request to an endpoint that reports its load, reports the new count, and wakes a
/// drain if it was the last request.
///
/// # Safety
/// The caller holds one in-flight reference on a live state that reports.
#[inline(never)]
unsafe fn release_reporting(ptr: NonNull<EndpointState>) {
    // SAFETY: as for `release_draining`.
    unsafe {
        trade_for_owner(ptr);
        release(ptr, OWNER);
    }
}

/// Ends one request to an endpoint but keeps the state alive: the in-flight reference is
/// traded for an owner reference in one step — `OWNER - 1` takes one from the in-flight count
/// and adds one owner — then the new count is reported (if the endpoint reports its load) and
/// a drain waiting for it is woken (if it was the last). The report must follow the decrement
/// and the state must outlive the report and the wake, hence the trade. The caller then holds
/// the owner reference.
///
/// # Safety
/// The caller holds one in-flight reference on a live state.
#[inline]
unsafe fn trade_for_owner(ptr: NonNull<EndpointState>) {
    // SAFETY: the caller's reference keeps the state alive, and then the owner reference does.
    let state = unsafe { ptr.as_ref() };
    let prev = state.refs.fetch_add(OWNER - 1, Ordering::AcqRel);
    check_owners(prev);
    if prev & WATCHED != 0 {
        state.report_in_flight((prev & IN_FLIGHT_MASK) - 1);
    }
    if prev & DRAIN != 0 && prev & IN_FLIGHT_MASK == 1 {
        state.drained.wake();
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
    // `EndpointHandle::with_refs`.
    drop(unsafe { Box::from_raw(ptr.as_ptr()) });
}
