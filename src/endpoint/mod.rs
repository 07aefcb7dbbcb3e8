//! Per-endpoint state shared by the endpoint table, the strategies and the in-flight guards.
//!
//! This is the only module of the crate with `unsafe` code. An endpoint's state is one heap
//! cell whose life is counted by hand, because the count *is* the in-flight gauge. Its word
//! `refs` holds, from the low bits up:
//!
//! | bits | what |
//! |---|---|
//! | 0–31 | requests in flight: each [`InFlightGuard`] holds one |
//! | 32–61 | owners: each [`EndpointHandle`] (tables, the registry, a `Drain`) holds one |
//! | 62 | [`DRAIN`]: a drain waits for the in-flight count to reach zero |
//! | 63 | [`WATCHED`]: the endpoint reports its load ([`load_report`]) |
//!
//! A request costs one atomic add to count it and one compare-and-swap to release it, and its
//! guard keeps the state alive on its own: removing the endpoint, swapping the strategy or
//! publishing a new table never invalidates a guard, and a guard never refers to a slot index
//! that could be reused for another endpoint. The cell is freed by whoever drops the last
//! reference of either kind.
//!
//! # Limits
//!
//! Like `Arc`, the counts abort the process rather than overflow: at 2^32 − 1 requests in
//! flight to one endpoint, and at 2^29 owners (half the owner field, so that increments racing
//! the check can never carry into the flag bits). Neither is reachable without leaking guards
//! or handles with `mem::forget`; a forgotten [`InFlightGuard`] keeps its request counted in
//! flight forever.
//!
//! # Draining
//!
//! A drain sets [`DRAIN`] in `refs` itself, so the flag and the count change in one total
//! order: a dispatch whose increment comes after the flag sees it and backs out; one that
//! comes before is counted, so the drain waits for it. A guard released while the flag is set
//! trades its in-flight reference for an owner one in the same read-modify-write, which keeps
//! the state alive while it wakes the drain's waiter; without the flag it releases with a
//! compare-and-swap that fails if the flag appeared meanwhile. So the drain is woken by
//! whichever release takes the count to zero, whatever the interleaving, and no request that
//! a `poll_ready` reserved before the drain is sent after the drain has resolved.

mod guard;
pub(crate) mod latency;
pub(crate) mod load_report;

use std::fmt;
use std::ptr::{self, NonNull};

use crate::util::sync::{AtomicPtr, AtomicU32, AtomicU64, AtomicWaker, Ordering};

pub use guard::{InFlightGuard, Outcome};
pub(crate) use latency::clock;
pub(crate) use load_report::{Activation, LoadReport};

/// The endpoint's service failed `poll_ready`; out of rotation until re-inserted.
pub(crate) const BROKEN: u32 = 1;
/// Ejected by outlier detection; back when its ejection time is over.
pub(crate) const EJECTED: u32 = 2;
/// Being drained: no new requests; the drain waiter is woken when in-flight reaches zero.
pub(crate) const DRAINING: u32 = 4;
/// Removed by discovery (or drained): out of every table from the next publish, and no request
/// reserved before that is sent to it.
pub(crate) const REMOVED: u32 = 8;

/// One request in flight, in the low half of `refs`.
const IN_FLIGHT_MASK: u64 = (1 << 32) - 1;
/// One owner, in bits 32–61 of `refs`.
const OWNER: u64 = 1 << 32;
const OWNER_MASK: u64 = ((1 << 30) - 1) << 32;
/// Owners at which an increment aborts: half the field, far below the carry.
const MAX_OWNERS: u64 = 1 << 29;
/// Set in `refs` while a drain waits for the in-flight count to reach zero.
const DRAIN: u64 = 1 << 62;
/// Set in `refs` once the endpoint reports its load to a [`LoadReport`].
const WATCHED: u64 = 1 << 63;

// The hand-written `Send` and `Sync` of the handle and the guard hold because everything in
// the state is reached through atomics (or is immutable); this fails to compile if a field
// that is not `Send + Sync` is ever added.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<EndpointState>();
};

/// Hears of every failed response of an endpoint, on the response path: how passive health
/// checking ([`health`](crate::health)) learns of failures without the endpoint knowing its
/// policy.
pub(crate) trait FailureReport: Send + Sync + 'static {
    /// A response of `endpoint` failed; `in_a_row` counts this one and those that failed
    /// right before it.
    fn failed(&self, endpoint: &EndpointState, in_a_row: u32);
}

/// The shared state of one endpoint.
///
/// Aligned to two cache lines so that counters of different endpoints, touched by different
/// threads, never share a line. In C layout so that everything a request touches — including
/// what a load report reads — sits in the first 64 bytes.
#[repr(C, align(128))]
pub(crate) struct EndpointState {
    /// See the [module docs](self).
    refs: AtomicU64,
    /// Requests dispatched to this endpoint since it was first inserted.
    picks: AtomicU64,
    /// Where the endpoint reports its load; null until installed, then fixed for life (and
    /// freed with the state), so a reporter holding a reference on the state can use it.
    watch: AtomicPtr<load_report::Watch>,
    /// The id the balancer gave the endpoint's current service; a new `Insert` of the same key
    /// replaces the service and the id.
    service_id: AtomicU64,
    /// `BROKEN | EJECTED | DRAINING | REMOVED`.
    flags: AtomicU32,
    /// Responses that failed in a row; a success resets it.
    consecutive_failures: AtomicU32,
    /// The weight strategies see (at least 1): the configured weight, or less while the
    /// endpoint is slow-starting.
    weight: AtomicU32,
    /// The weight discovery or a handle gave (at least 1).
    configured_weight: AtomicU32,
    /// Requests and readiness checks that failed.
    failures: AtomicU64,
    /// Who hears of failed responses; `None` when nobody listens.
    failure_report: Option<std::sync::Arc<dyn FailureReport>>,
    /// Woken when the last in-flight request of a draining endpoint finishes.
    drained: AtomicWaker,
    /// The PeakEWMA latency estimate ([`latency`]).
    rtt: latency::Estimate,
    /// A stable name for hashing strategies; fixed for the endpoint's life.
    identity: Box<str>,
    /// Lets loom see the cell's life: a leaked cell leaks this `Arc` and a double free drops
    /// it twice, and loom reports both.
    #[cfg(tower_lb_loom)]
    _life: crate::util::sync::Arc<()>,
}

impl EndpointState {
    #[inline]
    pub(crate) fn in_flight(&self) -> u64 {
        self.refs.load(Ordering::Acquire) & IN_FLIGHT_MASK
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

    /// Counts a failed response: the failure total and the run of consecutive failures, and
    /// tells whoever listens.
    pub(crate) fn record_response_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let run = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(report) = &self.failure_report {
            report.failed(self, run);
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

    /// Sets `flag`; returns `true` for the caller that changed it.
    pub(crate) fn set_flag(&self, flag: u32) -> bool {
        self.flags.fetch_or(flag, Ordering::AcqRel) & flag == 0
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

    /// Starts draining: no request is dispatched from now on, and the drain waiter is woken
    /// when the in-flight count reaches zero (see the [module docs](self)).
    pub(crate) fn start_drain(&self) {
        self.set_flag(DRAINING);
        self.refs.fetch_or(DRAIN, Ordering::AcqRel);
    }

    /// Ready once a drained endpoint has nothing in flight; until then the last release wakes
    /// `cx`'s task (see the [module docs](self)).
    pub(crate) fn poll_drained(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // Register first, then look: a release that takes the count to zero after the look
        // wakes the waker registered before it.
        crate::util::sync::register(&self.drained, cx.waker());
        if self.in_flight() == 0 {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Adds an owner reference, aborting the process before the owner count could overflow.
    #[inline]
    fn add_owner(&self) {
        check_owners(self.refs.fetch_add(OWNER, Ordering::Relaxed));
    }
}

/// Aborts the process if an owner was just added to `prev` owners at the limit, like `Arc` on
/// overflow: the increments that can race this check are far too few to carry out of the
/// owner bits.
#[inline]
fn check_owners(prev: u64) {
    if (prev & OWNER_MASK) >> 32 >= MAX_OWNERS {
        std::process::abort();
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        let watch = self.watch.load(Ordering::Acquire);
        if !watch.is_null() {
            // SAFETY: the watch was made by `Box::into_raw` in `install_watch`, and nothing
            // else can reach this state any more.
            let watch = unsafe { Box::from_raw(watch) };
            watch.sink.release(watch.slot);
        }
    }
}

/// An owning handle on an endpoint's state, held by the endpoint table and its snapshots.
pub(crate) struct EndpointHandle {
    ptr: NonNull<EndpointState>,
}

// SAFETY: the state is `Send + Sync` (asserted above) and is freed exactly once, by whoever
// releases its last reference.
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
        failure_report: Option<std::sync::Arc<dyn FailureReport>>,
    ) -> Self {
        Self::with_refs(weight, identity, failure_report, OWNER)
    }

    fn with_refs(
        weight: u32,
        identity: Box<str>,
        failure_report: Option<std::sync::Arc<dyn FailureReport>>,
        refs: u64,
    ) -> Self {
        let state = Box::new(EndpointState {
            refs: AtomicU64::new(refs),
            picks: AtomicU64::new(0),
            watch: AtomicPtr::new(ptr::null_mut()),
            service_id: AtomicU64::new(0),
            flags: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            weight: AtomicU32::new(weight),
            configured_weight: AtomicU32::new(weight),
            failures: AtomicU64::new(0),
            failure_report,
            drained: AtomicWaker::new(),
            rtt: latency::Estimate::new(),
            identity,
            #[cfg(tower_lb_loom)]
            _life: crate::util::sync::Arc::new(()),
        });
        Self {
            ptr: NonNull::from(Box::leak(state)),
        }
    }

    /// A handle whose owner count starts `owners` below the abort threshold, for tests of the
    /// threshold. The extra owners are never released: the cell leaks.
    #[cfg(all(test, not(tower_lb_loom)))]
    pub(crate) fn near_owner_limit(owners: u64) -> Self {
        Self::with_refs(1, Box::from(""), None, (MAX_OWNERS - owners) * OWNER)
    }

    /// Counts a request as dispatched to this endpoint and returns the guard that counts it
    /// down again (the balancer uses [`try_dispatch`](Self::try_dispatch)).
    #[cfg(test)]
    pub(crate) fn dispatch(&self) -> InFlightGuard {
        let guard = self.enter().0;
        self.picks.fetch_add(1, Ordering::Relaxed);
        guard
    }

    /// Dispatches a request to service `service` of this endpoint, unless the endpoint is
    /// draining, has one of the `unavailable` flags, or its service has been replaced. The
    /// request is counted in flight first, so a drain either sees it or is seen by it (see the
    /// [module docs](self)).
    #[inline(always)]
    pub(crate) fn try_dispatch(&self, unavailable: u32, service: u64) -> Option<InFlightGuard> {
        let (guard, draining) = self.enter();
        if draining || self.flags() & unavailable != 0 || !self.serves(service) {
            // Dropping the guard releases the count (and wakes a drain waiting for it).
            return None;
        }
        self.picks.fetch_add(1, Ordering::Relaxed);
        Some(guard)
    }

    /// Counts one more request in flight; also says whether a drain had started.
    #[inline(always)]
    fn enter(&self) -> (InFlightGuard, bool) {
        let prev = self.refs.fetch_add(1, Ordering::Acquire);
        if prev & IN_FLIGHT_MASK == IN_FLIGHT_MASK {
            // Four billion requests in flight to one endpoint: the count would spill into the
            // owner bits. Like `Arc` on overflow, refuse to continue rather than corrupt it.
            std::process::abort();
        }
        let reports = prev & WATCHED != 0;
        if reports {
            self.report_dispatch(prev);
        }
        // SAFETY: the in-flight reference just taken is the guard's.
        let guard = unsafe { InFlightGuard::new(self.ptr, reports) };
        (guard, prev & DRAIN != 0)
    }

    /// Out of line, so that endpoints that do not report keep a small `enter`.
    #[inline(never)]
    fn report_dispatch(&self, prev: u64) {
        self.report_in_flight((prev & IN_FLIGHT_MASK) + 1);
    }

    /// Whether this is the only handle left and nothing is in flight: no snapshot can dispatch
    /// to the endpoint any more.
    pub(crate) fn is_idle_and_unshared(&self) -> bool {
        self.refs.load(Ordering::Acquire) & (OWNER_MASK | IN_FLIGHT_MASK) == OWNER
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
        self.add_owner();
        Self { ptr: self.ptr }
    }
}

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        // SAFETY: this handle holds one owner reference.
        unsafe { guard::release(self.ptr, OWNER) }
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
        assert!(handle.is_idle_and_unshared());
    }

    #[test]
    fn a_dispatch_after_the_drain_started_backs_out() {
        let handle = EndpointHandle::new(1);
        let before = handle.try_dispatch(0, 0).expect("not draining yet");
        handle.start_drain();
        assert!(handle.try_dispatch(0, 0).is_none());
        assert_eq!(handle.in_flight(), 1, "the refused dispatch is not counted");
        assert_eq!(handle.picks(), 1);
        drop(before);
        assert_eq!(handle.in_flight(), 0);
        assert!(
            handle.is_idle_and_unshared(),
            "the drain flag is not an owner"
        );
    }

    /// The process that runs this test aborts: [`owner_increments_abort_before_the_carry`]
    /// runs it in a child process and checks how it ended.
    #[test]
    fn abort_at_the_owner_limit() {
        if std::env::var_os("TOWER_LB_ABORT_CHILD").is_none() {
            return;
        }
        let handle = EndpointHandle::near_owner_limit(1);
        let one = handle.clone();
        eprintln!("one below the limit: alive");
        let two = handle.clone();
        eprintln!("unreachable: {two:?} {one:?}");
    }

    #[test]
    fn owner_increments_abort_before_the_carry() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "endpoint::tests::abort_at_the_owner_limit",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TOWER_LB_ABORT_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("one below the limit: alive"), "{stderr}");
        assert!(!stderr.contains("unreachable"), "{stderr}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                output.status.signal(),
                Some(6),
                "SIGABRT: {:?}",
                output.status
            );
        }
        assert!(!output.status.success());
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

    /// The last guard's release (a compare-and-swap) races the last handle's drop, with
    /// nothing else holding the cell: exactly one of them frees it.
    #[test]
    fn the_final_free_races_a_plain_release() {
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let guard = handle.try_dispatch(0, 0).expect("available");
            let t = thread::spawn(move || drop(guard));
            drop(handle);
            t.join().unwrap();
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

    /// The race that could lose a drain's wake-up: the last request's guard is released while
    /// the drain starts and its waiter polls. Whatever the interleaving the waiter is woken
    /// (loom reports a deadlock otherwise), and the cell is freed once.
    #[test]
    fn a_drain_is_woken_by_the_last_release() {
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let guard = handle.try_dispatch(0, 0).expect("available");
            let waiter = {
                let handle = handle.clone();
                thread::spawn(move || {
                    handle.start_drain();
                    loom::future::block_on(std::future::poll_fn(|cx| handle.poll_drained(cx)));
                    assert_eq!(handle.in_flight(), 0);
                })
            };
            drop(guard);
            waiter.join().unwrap();
        });
    }

    /// A request reserved before a drain is dispatched while the drain starts and waits: it is
    /// either refused (the drain came first) or counted before the drain can resolve — never
    /// sent after the drain resolved. The order of events is recorded under a lock, which
    /// orders them as they happened.
    #[test]
    fn no_request_is_sent_after_the_drain_resolved() {
        loom::model(|| {
            let handle = EndpointHandle::new(1);
            let events = crate::util::sync::Arc::new(crate::util::sync::Mutex::new(Vec::new()));
            let sender = {
                let (handle, events) = (handle.clone(), crate::util::sync::Arc::clone(&events));
                thread::spawn(move || {
                    if let Some(guard) = handle.try_dispatch(REMOVED, 0) {
                        events.lock().unwrap().push("sent");
                        drop(guard);
                    }
                })
            };
            handle.start_drain();
            loom::future::block_on(std::future::poll_fn(|cx| handle.poll_drained(cx)));
            events.lock().unwrap().push("resolved");
            sender.join().unwrap();
            let events = events.lock().unwrap();
            assert_ne!(
                events.first(),
                Some(&"resolved").filter(|_| events.len() == 2)
            );
        });
    }
}
