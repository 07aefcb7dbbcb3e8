//! Strategies: how the balancer chooses an endpoint.
//!
//! A [`Strategy`] is configuration. When the set of endpoints (or a weight) changes, the
//! balancer asks it to [`build`](Strategy::build) a [`Picker`] for that set, off the request
//! path; the picker is then shared by every clone of the `Balance` and asked for one choice per
//! request. A picker sees a read-only view of the endpoints ([`Endpoints`]) and a small
//! per-clone [`PickContext`] (a cursor and a random number generator, so that rotation and
//! sampling never contend across threads), and returns an index into the view.
//!
//! A strategy never sees tokio, discovery or services: readiness, the in-flight guards and the
//! endpoint table are the balancer's job.
//!
//! # When a strategy picks
//!
//! Strategies that do not look at the request ([`RoundRobin`]) pick in `poll_ready`: the
//! balancer asks the picker, polls the chosen endpoint for readiness and, if it is not ready,
//! asks again (up to three times in all) before scanning the remaining endpoints from a
//! random position for a ready one. An endpoint that has not reported ready is never called.
//! Keyed strategies ([`Picker::is_keyed`]) pick in `call`, where the request is known: the
//! balancer feeds the request's key (its [`RequestKey`](crate::key::RequestKey)) into the picker's
//! [`Picker::key_hasher`] and hands the hash to the picker through [`PickContext::key_hash`]; see [`Picker::is_keyed`] for how readiness is
//! honoured there. Keeping the key apart from the strategy means swapping, say, a ring for
//! Maglev keeps the key, and strategies stay independent of the request type.
//!
//! # Writing a strategy
//!
//! ```
//! use tower_lb::strategy::{Endpoints, PickContext, Picker, Strategy};
//!
//! /// Always the endpoint with the highest weight (ties: the first).
//! #[derive(Clone, Debug)]
//! struct Heaviest;
//!
//! struct HeaviestPicker(Option<usize>);
//!
//! impl Strategy for Heaviest {
//!     type Picker = HeaviestPicker;
//!     fn build(&self, endpoints: &Endpoints<'_>) -> HeaviestPicker {
//!         // Precomputed once per endpoint set, never per request.
//!         HeaviestPicker((0..endpoints.len()).max_by_key(|&i| endpoints.get(i).weight()))
//!     }
//! }
//!
//! impl Picker for HeaviestPicker {
//!     type Local = (); // nothing kept per clone of the balancer
//!     fn pick(&self, _: &Endpoints<'_>, _: &mut PickContext<'_>) -> Option<usize> {
//!         self.0
//!     }
//! }
//! ```

mod alias;
mod consistent_hash;
mod least_connections;
mod least_time;
mod p2c;
mod random;
mod round_robin;
mod swap;
mod weighted_round_robin;

use std::fmt;
use std::task::{Context, Poll};

use crate::endpoint::{EndpointHandle, EndpointState};
use crate::util::rng::FastRng;

pub use consistent_hash::{ConsistentHash, ConsistentHashPicker, KeyFallback};
pub use least_connections::{LeastConnections, LeastConnectionsPicker};
pub use least_time::LeastTime;
pub use p2c::{PowerOfTwoChoices, PowerOfTwoChoicesPicker};
pub use random::{Random, RandomPicker};
pub use round_robin::{RoundRobin, RoundRobinPicker};
pub use swap::{SwapHandle, Swappable};
pub use weighted_round_robin::{WeightedRoundRobin, WeightedRoundRobinPicker};

/// A way of choosing endpoints; see the [module docs](self).
pub trait Strategy: Send + Sync + 'static {
    /// What this strategy builds for one set of endpoints.
    type Picker: Picker;

    /// Whether every picker of this strategy picks by request key ([`Picker::is_keyed`]): a
    /// balancer with such a strategy and no [`RequestKey`](crate::key::RequestKey) — a
    /// `BalanceLayer` without `.key(...)`, keyed by [`NoKey`](crate::key::NoKey) — does not
    /// compile. `false` (the default) for
    /// strategies that decide at run time, such as [`BoxStrategy`] and [`Swappable`]; their
    /// keyed pickers fail requests without a key with
    /// [`Error::MissingKey`](crate::Error::MissingKey) (or apply their fallback).
    const KEYED: bool = false;

    /// Precomputes whatever picking needs for this endpoint set. Called when membership or a
    /// weight changes, never on the request path.
    fn build(&self, endpoints: &Endpoints<'_>) -> Self::Picker;

    /// For strategies whose configuration changes at run time (such as [`Swappable`]): `Ready`
    /// when it has changed since the change numbered `seen` (0 at first), which it then
    /// updates, so that the balancer builds a new picker; `Pending` otherwise, with `cx`'s
    /// task woken at the next change. Each balancer keeps its own `seen`. The default never
    /// changes.
    fn poll_change(&self, seen: &mut u64, cx: &mut Context<'_>) -> Poll<()> {
        let _ = (seen, cx);
        Poll::Pending
    }
}

/// Chooses one endpoint per request; built by a [`Strategy`] for one set of endpoints.
pub trait Picker: Send + Sync + 'static {
    /// State each clone of the balancer keeps for this picker, private to the clone (so it
    /// needs no synchronisation), reached through [`PickContext::local`]; `()` for pickers that
    /// need none.
    ///
    /// A clone makes it with `Default` on its first pick from a table and drops it when it
    /// moves to a newer table, so it never outlives the picker that uses it. Balancers are
    /// cloned per request in axum, hyper and tonic, so `Default` must be cheap: O(1), no
    /// allocation. Grow anything larger lazily, on later picks.
    type Local: Default + Send + Sync + 'static;

    /// Returns the index (below `endpoints.len()`) of the endpoint to use, or `None` when no
    /// endpoint can be chosen (the balancer then falls back to any ready endpoint, for
    /// unkeyed strategies, or fails the request with [`Error::NoEndpoints`]).
    ///
    /// `endpoints` is never empty and is the same set the picker was built for.
    ///
    /// [`Error::NoEndpoints`]: crate::Error::NoEndpoints
    fn pick(
        &self,
        endpoints: &Endpoints<'_>,
        cx: &mut PickContext<'_, Self::Local>,
    ) -> Option<usize>;

    /// Whether this picker needs the request, so picks in `call` instead of `poll_ready`.
    ///
    /// A keyed pick still honours tower's readiness contract: the balancer polls the chosen
    /// endpoint's service for readiness before calling it; if it is not ready at once, the
    /// response future drives a clone of that service to readiness and then calls it, so the
    /// request still goes to the endpoint its key maps to.
    fn is_keyed(&self) -> bool {
        false
    }

    /// The hasher a keyed picker wants request keys fed into; the default is
    /// [`KeyHasher::stable`](crate::key::KeyHasher::stable) with seed 0.
    fn key_hasher(&self) -> crate::key::KeyHasher {
        crate::key::KeyHasher::default()
    }

    /// `Some(decay)` asks the balancer to measure each response's latency into the endpoint's
    /// PeakEWMA estimate with this decay time (read through [`Endpoint::latency_estimate`]).
    /// The balancer then reads the clock once when it picks (available as
    /// [`PickContext::now`]) and once when the response completes. `None` (the default) costs
    /// nothing.
    fn latency_decay(&self) -> Option<std::time::Duration> {
        None
    }
}

/// What a picker gets besides the endpoints: the clone's cursor and random generator, its
/// [`Picker::Local`] state, and the request's key hash for keyed pickers.
pub struct PickContext<'a, L = ()> {
    pub(crate) common: &'a mut LocalState,
    pub(crate) local: &'a mut L,
    pub(crate) key_hash: Option<u64>,
    pub(crate) now: u64,
}

impl<'a, L> PickContext<'a, L> {
    pub(crate) fn new(common: &'a mut LocalState, local: &'a mut L) -> Self {
        Self {
            common,
            local,
            key_hash: None,
            now: 0,
        }
    }

    /// The request's key hash (from the picker's [`Picker::key_hasher`]), for keyed pickers:
    /// `None` when the picker is not keyed or the request had no key (the picker then applies
    /// its fallback).
    pub fn key_hash(&self) -> Option<u64> {
        self.key_hash
    }

    /// A clone-local counter for rotations. A new clone's cursor is one more than the
    /// previous clone's (from a random start per balancer), so a server that clones the
    /// balancer per request still rotates.
    pub fn cursor(&mut self) -> &mut u64 {
        &mut self.common.cursor
    }

    /// A uniformly random `u64` from the clone's fast generator.
    pub fn random(&mut self) -> u64 {
        self.common.rng.next_u64()
    }

    /// A uniformly random number in `0..n`; `n` must not be zero.
    pub fn random_below(&mut self, n: usize) -> usize {
        self.common.rng.below(n)
    }

    /// The time of this pick in nanoseconds on the balancer's clock, for pickers that asked
    /// for latency measurement ([`Picker::latency_decay`]) and in balancers that time requests
    /// for [`count_abandoned_after`](crate::BalanceLayer::count_abandoned_after); 0 otherwise.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// This clone's state for this picker (see [`Picker::Local`]).
    pub fn local(&mut self) -> &mut L {
        self.local
    }

    /// The same context over another local state, for pickers that wrap pickers.
    pub fn with_local<'b, M>(&'b mut self, local: &'b mut M) -> PickContext<'b, M> {
        PickContext {
            common: self.common,
            local,
            key_hash: self.key_hash,
            now: self.now,
        }
    }
}

impl<L> fmt::Debug for PickContext<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PickContext")
            .field("cursor", &self.common.cursor)
            .field("key_hash", &self.key_hash)
            .finish_non_exhaustive()
    }
}

/// The clone-local part of picking that every picker shares: a cursor and a generator.
#[derive(Clone, Debug)]
pub(crate) struct LocalState {
    pub(crate) cursor: u64,
    pub(crate) rng: FastRng,
}

impl LocalState {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::with_rng(FastRng::new())
    }

    pub(crate) fn with_rng(mut rng: FastRng) -> Self {
        Self {
            cursor: rng.next_u64() >> 1,
            rng,
        }
    }
}

/// A read-only view of the endpoints a picker chooses among.
#[derive(Clone, Copy)]
pub struct Endpoints<'a> {
    handles: &'a [EndpointHandle],
}

impl<'a> Endpoints<'a> {
    pub(crate) fn new(handles: &'a [EndpointHandle]) -> Self {
        Self { handles }
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The endpoint at `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`, like slice indexing.
    pub fn get(&self, index: usize) -> Endpoint<'a> {
        Endpoint {
            state: &self.handles[index],
        }
    }

    /// The shared state of the endpoint at `index`, for pickers inside the crate.
    pub(crate) fn state(&self, index: usize) -> &'a EndpointState {
        &self.handles[index]
    }

    /// The handle of the endpoint at `index`, for pickers that keep endpoints.
    pub(crate) fn handle(&self, index: usize) -> &'a EndpointHandle {
        &self.handles[index]
    }

    /// All endpoints, in table order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Endpoint<'a>> + 'a {
        self.handles.iter().map(|h| Endpoint { state: h })
    }
}

impl fmt::Debug for Endpoints<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A read-only view of one endpoint's live state.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    state: &'a EndpointState,
}

impl Endpoint<'_> {
    /// Requests currently in flight to this endpoint, from every clone of the balancer.
    #[inline]
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight()
    }

    /// The endpoint's weight; at least 1.
    #[inline]
    pub fn weight(&self) -> u32 {
        self.state.weight()
    }

    /// The endpoint's identity: a stable name derived from its discovery key (by default the
    /// key's `Debug` form, e.g. `127.0.0.1:8080` for a `SocketAddr`). Hashing strategies place
    /// endpoints by it, so every process with the same endpoints builds the same table
    /// whatever the discovery order.
    #[inline]
    pub fn identity(&self) -> &str {
        self.state.identity()
    }

    /// Requests dispatched to this endpoint so far.
    #[inline]
    pub fn picks(&self) -> u64 {
        self.state.picks()
    }

    /// Requests and readiness checks that failed so far.
    #[inline]
    pub fn failures(&self) -> u64 {
        self.state.failures()
    }

    /// Responses that failed in a row, most recent first; a success resets it. Load-aware
    /// strategies hold it against the endpoint so that one that fails fast does not look
    /// idle and attract traffic.
    #[inline]
    pub fn consecutive_failures(&self) -> u32 {
        self.state.consecutive_failures()
    }

    /// The endpoint's PeakEWMA latency estimate in nanoseconds at time `now` (see
    /// [`PickContext::now`]), decaying with `decay`; `None` before its first measured response.
    /// Only measured for pickers that ask for it ([`Picker::latency_decay`]).
    #[inline]
    pub fn latency_estimate(&self, now: u64, decay: std::time::Duration) -> Option<f64> {
        self.state.rtt_estimate(now, decay_ns(decay))
    }

    /// The latency estimate as last updated, before it decays: never below
    /// [`latency_estimate`](Self::latency_estimate) at a later time, and cheaper to read.
    #[inline]
    pub(crate) fn latency_undecayed(&self) -> Option<f64> {
        self.state.rtt_undecayed()
    }
}

/// A decay time in nanoseconds, at least 1 so that estimates never divide by zero. Seconds and
/// nanoseconds apart, which spares a 128-bit conversion per pick and is exact up to 2⁵³ ns
/// (104 days), as `as_nanos() as f64` is.
#[inline]
pub(crate) fn decay_ns(decay: std::time::Duration) -> f64 {
    (decay.as_secs() as f64 * 1e9 + f64::from(decay.subsec_nanos())).max(1.0)
}

/// [`decay_ns`] inverted: the rate latency estimates decay at, per nanosecond.
pub(crate) fn decay_rate(decay: std::time::Duration) -> f64 {
    1.0 / decay_ns(decay)
}

impl fmt::Debug for Endpoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("weight", &self.weight())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// A strategy behind a box, so the concrete strategy can be chosen at run time.
///
/// ```
/// use tower_lb::strategy::{BoxStrategy, RoundRobin};
///
/// let strategy = BoxStrategy::new(RoundRobin::default());
/// # let _ = strategy;
/// ```
///
/// Cloning shares the boxed strategy (it is behind an `Arc`), so a `BoxStrategy` can be used
/// in a [`BalanceLayer`](crate::BalanceLayer), which clones its strategy for every balancer.
#[derive(Clone)]
pub struct BoxStrategy {
    inner: std::sync::Arc<dyn DynStrategy>,
}

impl BoxStrategy {
    /// Boxes `strategy`.
    pub fn new<S: Strategy>(strategy: S) -> Self {
        Self {
            inner: std::sync::Arc::new(strategy),
        }
    }
}

impl fmt::Debug for BoxStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxStrategy").finish_non_exhaustive()
    }
}

trait DynStrategy: Send + Sync + 'static {
    fn build_boxed(&self, endpoints: &Endpoints<'_>) -> BoxPicker;
    fn poll_change_boxed(&self, seen: &mut u64, cx: &mut Context<'_>) -> Poll<()>;
}

impl<S: Strategy> DynStrategy for S {
    fn build_boxed(&self, endpoints: &Endpoints<'_>) -> BoxPicker {
        BoxPicker::new(self.build(endpoints))
    }

    fn poll_change_boxed(&self, seen: &mut u64, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_change(seen, cx)
    }
}

impl Strategy for BoxStrategy {
    type Picker = BoxPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> Self::Picker {
        self.inner.build_boxed(endpoints)
    }

    fn poll_change(&self, seen: &mut u64, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.poll_change_boxed(seen, cx)
    }
}

/// A picker behind a box: what [`BoxStrategy`] and [`Swappable`] build.
///
/// The boxed picker's [`Picker::Local`] lives behind a box too ([`BoxLocal`]), made on the
/// clone's first pick from a table; for pickers whose local state is zero-sized (all of this
/// crate's but one) that allocates nothing.
pub struct BoxPicker {
    inner: Box<dyn DynPicker>,
}

impl BoxPicker {
    /// Boxes `picker`.
    pub fn new<P: Picker>(picker: P) -> Self {
        Self {
            inner: Box::new(picker),
        }
    }
}

impl fmt::Debug for BoxPicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxPicker").finish_non_exhaustive()
    }
}

/// The clone-local state of a [`BoxPicker`]: the boxed picker's own, type-erased.
#[derive(Default)]
pub struct BoxLocal(Option<Box<dyn std::any::Any + Send + Sync>>);

impl fmt::Debug for BoxLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxLocal").finish_non_exhaustive()
    }
}

impl BoxLocal {
    /// The state of type `T`, made with `Default` if this clone has none of that type yet.
    fn get<T: Default + Send + Sync + 'static>(&mut self) -> &mut T {
        if !self.0.as_ref().is_some_and(|local| local.is::<T>()) {
            self.0 = Some(Box::new(T::default()));
        }
        match self.0.as_mut().and_then(|local| local.downcast_mut::<T>()) {
            Some(local) => local,
            // Just checked or made above.
            None => unreachable!("the local state holds a T"),
        }
    }
}

trait DynPicker: Send + Sync + 'static {
    fn pick_boxed(
        &self,
        endpoints: &Endpoints<'_>,
        cx: &mut PickContext<'_, BoxLocal>,
    ) -> Option<usize>;
    fn is_keyed(&self) -> bool;
    fn key_hasher(&self) -> crate::key::KeyHasher;
    fn latency_decay(&self) -> Option<std::time::Duration>;
}

impl<P: Picker> DynPicker for P {
    fn pick_boxed(
        &self,
        endpoints: &Endpoints<'_>,
        cx: &mut PickContext<'_, BoxLocal>,
    ) -> Option<usize> {
        let PickContext {
            common,
            local,
            key_hash,
            now,
        } = cx;
        let mut inner = PickContext {
            common,
            local: local.get::<P::Local>(),
            key_hash: *key_hash,
            now: *now,
        };
        self.pick(endpoints, &mut inner)
    }

    fn is_keyed(&self) -> bool {
        Picker::is_keyed(self)
    }

    fn key_hasher(&self) -> crate::key::KeyHasher {
        Picker::key_hasher(self)
    }

    fn latency_decay(&self) -> Option<std::time::Duration> {
        Picker::latency_decay(self)
    }
}

impl Picker for BoxPicker {
    type Local = BoxLocal;

    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_, BoxLocal>) -> Option<usize> {
        self.inner.pick_boxed(endpoints, cx)
    }

    fn is_keyed(&self) -> bool {
        self.inner.is_keyed()
    }

    fn key_hasher(&self) -> crate::key::KeyHasher {
        self.inner.key_hasher()
    }

    fn latency_decay(&self) -> Option<std::time::Duration> {
        self.inner.latency_decay()
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Endpoints with the given weights, for strategy unit tests.
    pub(crate) fn endpoints(weights: &[u32]) -> Vec<EndpointHandle> {
        weights.iter().map(|&w| EndpointHandle::new(w)).collect()
    }

    /// Endpoints with the given identities and weights, for hashing strategies' tests.
    #[allow(dead_code)]
    pub(crate) fn named_endpoints(endpoints: &[(&str, u32)]) -> Vec<EndpointHandle> {
        endpoints
            .iter()
            .map(|&(name, w)| EndpointHandle::with_identity(w, Box::from(name), None))
            .collect()
    }

    /// Picks `n` times with one clone-local context; returns the chosen indices.
    pub(crate) fn picks<P: Picker>(picker: &P, handles: &[EndpointHandle], n: usize) -> Vec<usize> {
        let mut common = LocalState::new();
        let mut local = P::Local::default();
        let endpoints = Endpoints::new(handles);
        (0..n)
            .map(|_| {
                let mut cx = PickContext::new(&mut common, &mut local);
                picker.pick(&endpoints, &mut cx).expect("a choice")
            })
            .collect()
    }
}
