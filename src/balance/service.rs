//! The `Balance` service.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::discover::Discover;
use tower::BoxError;
use tower_service::Service;

use super::future::ResponseFuture;
use super::handle::{BalanceHandle, ControlPlane};
use super::local::{Local, Reserved, NO_VERSION};
use super::wait::{Waiting, Woken};
use super::Shared;
use crate::completion::{CompleteOnResponse, TrackCompletion};
use crate::control::table::FAILED;
use crate::error::Error;
use crate::key::{MaybeKey, NoKey};
use crate::stats::Stats;
use crate::strategy::Strategy;
use crate::util::rng::FastRng;
use crate::util::sync::Ordering;
use crate::weight::Unweighted;

/// Picks an endpoint per request from a discovered set; see the [crate docs](crate).
///
/// `K` is the discovery key and `S` the endpoint service (as the balancer keeps it: the inner
/// service of [`Weighted`](crate::weight::Weighted) ones); neither names the discovery
/// stream, so a struct field can hold a `Balance<SocketAddr, HttpEndpoint<Body>,
/// LeastConnections>` whatever source feeds it. [`BoxBalance`] erases the rest.
///
/// Built by [`BalanceLayer`](crate::BalanceLayer) or [`Balance::new`]. It is `Clone`, `Send`
/// and `Sync` (for endpoint services that are `Clone + Send + Sync`, as hyper-util's client,
/// tonic's `Channel` and `BoxCloneSyncService` are), so it can sit in axum's `State`, an
/// `Arc` or a `BoxCloneSyncService` and be cloned per request.
///
/// Clones share the endpoint table, the counters, the strategy and the discovery task. A
/// clone costs O(1) whatever the number of endpoints — reference-count bumps, no lock, no
/// allocation: it starts from its parent's table and copies an endpoint's service only when
/// it first polls that endpoint. That copy is the endpoint's spare when there is one, else
/// one `Clone` of the service: a clone whose requests took the usual path (the first choice
/// ready, then called) leaves its copies as spares when dropped, one per service at most; a
/// clone that polled a copy and did not call it since (pending, not ready for a keyed
/// request, a reservation left unused) leaves none, since that copy's readiness may hold a
/// permit. A long-lived clone keeps its copies across table changes, dropping only those of
/// removed or replaced services. See the crate docs for measured costs.
///
/// The discovery task runs on the tokio runtime current at construction (or, if there is
/// none, the one current at the first `poll_ready`); it processes changes even when no
/// request arrives, and ends when the last clone is dropped.
pub struct Balance<K, S, St, Kx = NoKey, C = CompleteOnResponse>
where
    St: Strategy,
{
    pub(super) shared: Arc<Shared<K, S, St, Kx>>,
    pub(super) local: Local<S, St::Picker>,
    pub(super) completion: C,
}

/// A balancer with everything but its requests and responses erased: a type for struct
/// fields and trait objects, from [`Balance::boxed`].
pub type BoxBalance<Req, Resp> = tower::util::BoxCloneSyncService<Req, Resp, BoxError>;

impl<K, S, St> Balance<K, S, St>
where
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
    St: Strategy,
{
    /// Balances over the endpoints `discover` yields, choosing with `strategy`; every
    /// endpoint weighs 1 until a [`BalanceHandle`] reweights it.
    pub fn new<D>(discover: D, strategy: St) -> Self
    where
        D: Discover<Key = K, Service = S> + Send + 'static,
        D::Error: Into<BoxError>,
    {
        super::layer::build(
            discover,
            strategy,
            NoKey,
            Unweighted,
            CompleteOnResponse,
            super::layer::Config::default(),
        )
    }
}

impl<K, S, St, Kx, C> Balance<K, S, St, Kx, C>
where
    K: Hash + Eq + Clone,
    St: Strategy,
{
    /// A snapshot of every endpoint's counters and state.
    pub fn stats(&self) -> Stats<K> {
        self.shared.stats()
    }
}

impl<K, S, St, Kx, C> Balance<K, S, St, Kx, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: Send + Sync + 'static,
    St: Strategy,
    Kx: Send + Sync + 'static,
{
    /// A handle for stats, runtime reweighting and drain that does not keep the balancer
    /// alive.
    pub fn handle(&self) -> BalanceHandle<K> {
        let shared: Arc<dyn ControlPlane<K>> = self.shared.clone();
        BalanceHandle::new(Arc::downgrade(&shared))
    }
}

impl<K, S, St, Kx, C> Balance<K, S, St, Kx, C>
where
    St: Strategy,
{
    /// Erases the balancer's type parameters but its requests and responses: a
    /// [`BoxBalance`] is what a struct field or a trait object names.
    pub fn boxed<Req>(self) -> BoxBalance<Req, <Self as Service<Req>>::Response>
    where
        Self: Service<Req, Error = BoxError> + Clone + Send + Sync + 'static,
        <Self as Service<Req>>::Future: Send + 'static,
    {
        BoxBalance::new(self)
    }
}

impl<K, S, St, Kx, C> Balance<K, S, St, Kx, C>
where
    S: Clone,
    St: Strategy,
{
    /// Moves to the newest table (the slow path of `poll_ready`): fails if the discovery task
    /// failed, or if it cannot be started for want of a runtime.
    #[cold]
    fn catch_up(&mut self, version: u64) -> Result<(), BoxError> {
        if version & FAILED != 0 {
            return Err(self.shared.failure().into());
        }
        self.shared.task.ensure_spawned()?;
        self.local.sync(&self.shared.table);
        Ok(())
    }

    /// No endpoint is usable: fail at once, or wait (bounded) for discovery.
    fn poll_no_endpoints(&mut self, seen: u64, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(wait) = self.shared.front.wait_for_endpoints else {
            return Poll::Ready(Err(Error::NoEndpoints.into()));
        };
        let waiting = self
            .local
            .wait
            .get_or_insert_with(|| Box::pin(Waiting::new(wait, &self.shared.published)));
        // A publish between our version check and arming the wait would be missed otherwise.
        if self.shared.table.version() != seen {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match waiting.as_mut().poll_woken(cx) {
            Poll::Ready(Woken::Published) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Woken::TimedOut) => {
                self.local.wait = None;
                Poll::Ready(Err(Error::NoEndpoints.into()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<K, S, St, Kx, C, Req> Service<Req> for Balance<K, S, St, Kx, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    St: Strategy,
    Kx: MaybeKey<Req>,
    C: TrackCompletion<S::Response>,
{
    type Response = C::Output;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        const {
            assert!(
                !(St::KEYED && <Kx as MaybeKey<Req>>::NONE),
                "this strategy picks by request key: give the BalanceLayer one with `.key(...)` \
                 (e.g. tower_lb::key::key_fn, or tower_lb::http::HeaderKey)"
            )
        };
        let version = self.shared.table.version();
        if version != self.local.version {
            self.catch_up(version)?;
        } else if self.local.reserved != Reserved::None {
            return Poll::Ready(Ok(()));
        }
        let Some(snapshot) = &self.local.snapshot else {
            return self.poll_no_endpoints(version, cx);
        };
        let usable = if snapshot.keyed {
            // Inline only where every picker is keyed: other strategies (a `Swappable` may
            // hold a keyed one) keep their unkeyed `poll_ready` small.
            let any = if St::KEYED {
                self.local.any_usable()
            } else {
                self.local.any_usable_out_of_line()
            };
            any.then_some(Reserved::Keyed)
        } else {
            match self.local.pick_ready::<Req>(cx, &self.shared.messages) {
                Poll::Ready(found) => found.map(Reserved::Endpoint),
                Poll::Pending => return Poll::Pending,
            }
        };
        match usable {
            Some(reserved) => {
                self.local.reserved = reserved;
                if self.local.wait.is_some() {
                    self.local.wait = None;
                }
                Poll::Ready(Ok(()))
            }
            None => self.poll_no_endpoints(self.local.version, cx),
        }
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        self.local.call(request, &self.shared, &self.completion)
    }
}

impl<K, S, St, Kx, C> Clone for Balance<K, S, St, Kx, C>
where
    S: Clone,
    St: Strategy,
    C: Clone,
{
    /// O(1): reference-count bumps, no lock, no allocation. The clone starts from this
    /// clone's table if that is the newest.
    fn clone(&self) -> Self {
        let current = self.shared.table.version();
        let (version, snapshot) = if current == self.local.version {
            (current, self.local.snapshot.clone())
        } else {
            (NO_VERSION, None)
        };
        Self {
            shared: Arc::clone(&self.shared),
            local: Local::new(
                clone_state(&self.shared.front),
                version,
                snapshot,
                self.shared.front.clock,
                self.shared.front.abandon_after_ns,
            ),
            completion: self.completion.clone(),
        }
    }
}

/// The picking state of a new clone, in O(1): its cursor one step after the previous clone's,
/// its generator seeded from the balancer's seed and the clone's number.
pub(super) fn clone_state<Kx>(front: &super::Front<Kx>) -> crate::strategy::LocalState {
    let clone = front.clones.fetch_add(1, Ordering::Relaxed);
    let mut local = crate::strategy::LocalState::with_rng(FastRng::seeded(crate::key::mix64(
        front.seed_base ^ clone.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    )));
    // Clones start their rotations where the previous clone did, one further on: a service
    // that clones the balancer per request (axum's `State`, say) still rotates exactly, and
    // long-lived clones start spread out.
    local.cursor = clone.wrapping_add(front.rotation_base);
    local
}

impl<K, S, St, Kx, C> fmt::Debug for Balance<K, S, St, Kx, C>
where
    St: Strategy,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("version", &self.local.version)
            .field("copied_services", &self.local.copies())
            .field("reserved", &self.local.reserved)
            .finish_non_exhaustive()
    }
}
