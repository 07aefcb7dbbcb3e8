//! Opt-in load reporting: a hook any strategy may use to hear of every change of an
//! endpoint's in-flight count, on the request path.
//!
//! A picker that needs the least-loaded endpoint without reading all of them
//! (least-connections' index) gives endpoints a place — a slot in a [`LoadReport`] sink — with
//! [`EndpointState::install_watch`], off the request path, and then *activates* reporting
//! ([`EndpointState::activate`]): from then on the endpoint tells the sink every change of its
//! in-flight count. Reporting is marked by [`WATCHED`] in `refs`, so an endpoint that never
//! reports — every endpoint of a round-robin balancer — pays one predictable branch on the
//! value its dispatch read-modify-write returns anyway, and its guard one on a flag it keeps
//! from that value. An endpoint reports for life once activated, also if the balancer swaps
//! to a strategy that does not read the sink.
//!
//! Activation only happens while nothing is in flight, so a guard's endpoint reports for the
//! whole life of the guard or not at all: the flag stays set, and a guard that does not report
//! never sees [`WATCHED`] in its release.
//!
//! [`WATCHED`]: super::WATCHED

use std::any::Any;
use std::ptr;
use std::sync::Arc;

use super::{EndpointState, IN_FLIGHT_MASK, WATCHED};
use crate::util::sync::{fence, Ordering};

/// Where endpoints report their in-flight counts.
pub(crate) trait LoadReport: Send + Sync + 'static {
    /// The endpoint in `slot` now has `in_flight` requests in flight.
    ///
    /// Called on the request path right after the count changed, with the change made by a
    /// read-modify-write of the endpoint's `refs` followed by an `Acquire` fence: a sink that,
    /// after forgetting what it knew of the endpoint, reads the count with a read-modify-write
    /// too ([`EndpointState::in_flight_latest`]) either sees this change or is seen by this
    /// report.
    fn report(&self, slot: usize, in_flight: u64);

    /// The endpoint in `slot` is gone (its state is being freed); the slot may be given to
    /// another endpoint.
    fn release(&self, slot: usize);

    /// The number of slots: every slot is below it.
    fn capacity(&self) -> usize;

    /// The sink as `Any`, so that the strategy that made it can find its own type again.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// An endpoint's place in a sink: fixed for the endpoint's life once installed.
pub(crate) struct Watch {
    pub(crate) sink: Arc<dyn LoadReport>,
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

impl EndpointState {
    /// The endpoint's place in a sink, if a picker installed one.
    pub(crate) fn watch(&self) -> Option<&Watch> {
        // SAFETY: a watch, once installed, is never replaced and lives as long as the state
        // (it is freed in the state's `Drop`).
        unsafe { self.watch.load(Ordering::Acquire).as_ref() }
    }

    /// Gives the endpoint `slot` in `sink`, for life; it does not report until
    /// [`activate`](Self::activate)d. `false` (changing nothing) if it already has a place or
    /// if `slot` is not one of the sink's.
    pub(crate) fn install_watch(&self, sink: Arc<dyn LoadReport>, slot: usize) -> bool {
        if slot >= sink.capacity() {
            return false;
        }
        let watch = Box::into_raw(Box::new(Watch { sink, slot }));
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
        if self.watch().is_none() {
            return Activation::Busy;
        }
        let mut refs = self.refs.load(Ordering::Acquire);
        loop {
            if refs & WATCHED != 0 {
                return Activation::AlreadyActive;
            }
            if refs & IN_FLIGHT_MASK != 0 {
                return Activation::Busy;
            }
            // `Release` publishes the watch (installed before) to reporters that see the bit
            // (they fence `Acquire`). A dispatch either comes first (and the exchange fails on
            // its count) or sees the bit.
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

    /// The in-flight count, read with a read-modify-write: a sink that clears what it knew of
    /// the endpoint reads the count this way after clearing, so that it meets the endpoint's
    /// own report on this word (see [`LoadReport::report`]).
    pub(crate) fn in_flight_latest(&self) -> u64 {
        self.refs.fetch_add(0, Ordering::AcqRel) & IN_FLIGHT_MASK
    }

    /// Reports the in-flight count that the caller's read-modify-write of `refs` produced.
    /// The caller saw [`WATCHED`] and holds a reference on the state.
    #[inline]
    pub(super) fn report_in_flight(&self, in_flight: u64) {
        // Pairs with the `Release` of `WATCHED` in `activate`: seeing the bit makes the watch
        // visible. It also orders the count's change before the sink's reads (see
        // `LoadReport::report`).
        fence(Ordering::Acquire);
        if let Some(watch) = self.watch() {
            watch.sink.report(watch.slot, in_flight);
        }
    }
}
