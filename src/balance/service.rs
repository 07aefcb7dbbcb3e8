//! The `Balance` service.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, Notify};
use tower::discover::Discover;
use tower::BoxError;
use tower_service::Service;

use super::driver::Driver;
use super::future::ResponseFuture;
use super::handle::{BalanceHandle, ControlPlane};
use super::local::{Local, Reserved, NO_VERSION};
use super::shared::{Config, Registry, Shared, SharedOf, Snapshot};
use super::wait::{Waiting, Woken};
use crate::completion::{CompleteOnResponse, TrackCompletion};
use crate::endpoint::EndpointEvents;
use crate::error::Error;
use crate::key::{NoKey, RequestKey};
use crate::stats::Stats;
use crate::strategy::{decay_ns, Endpoints, Picker, Rebuild, Strategy};
use crate::sync::{lock, AtomicBool, AtomicU64, CachePadded, Mutex};
use crate::table::{Published, FAILED};
use crate::weight::{Unweighted, Weigh};

/// Picks an endpoint per request from a discovered set; see the [crate docs](crate).
///
/// Built by [`BalanceLayer`](crate::BalanceLayer) or [`Balance::new`]. It is `Clone`, `Send`
/// and `Sync` (for endpoint services that are `Clone + Send + Sync`, as hyper-util's client,
/// tonic's `Channel` and `BoxCloneSyncService` are), so it can sit in axum's `State`, an
/// `Arc` or a `BoxCloneSyncService` and be cloned per request.
///
/// Clones share the endpoint table, the counters, the strategy and the discovery task. A
/// clone costs O(1) whatever the number of endpoints — reference-count bumps, no lock, no
/// allocation: it starts from its parent's table and copies an endpoint's service (one
/// `Clone` of it) only when it first polls that endpoint. A long-lived clone keeps its copies
/// across table changes, dropping only those of removed or replaced services. See the crate
/// docs' *Clones* section for measured costs.
///
/// The discovery task runs on the tokio runtime current at construction (or, if there is
/// none, the one current at the first `poll_ready`); it processes changes even when no
/// request arrives, and ends when the last clone is dropped.
pub struct Balance<D, St, Kx = NoKey, C = CompleteOnResponse>
where
    D: Discover,
    St: Strategy,
{
    shared: Arc<SharedOf<D, St, Kx>>,
    local: Local<D::Service, St::Picker>,
    completion: C,
    _discover: PhantomData<fn() -> D>,
}

impl<D, St> Balance<D, St>
where
    D: Discover + Send + 'static,
    D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Service: Clone + Send + Sync + 'static,
    D::Error: Into<BoxError>,
    St: Strategy,
{
    /// Balances over the endpoints `discover` yields, choosing with `strategy`; every
    /// endpoint weighs 1 until a [`BalanceHandle`] reweights it.
    pub fn new(discover: D, strategy: St) -> Self {
        Self::with_parts(
            discover,
            strategy,
            NoKey,
            Unweighted,
            CompleteOnResponse,
            Config::default(),
        )
    }
}

impl<D, St, Kx, C> Balance<D, St, Kx, C>
where
    D: Discover + Send + 'static,
    D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Service: Clone + Send + Sync + 'static,
    D::Error: Into<BoxError>,
    St: Strategy,
    Kx: Send + Sync + 'static,
{
    pub(crate) fn with_parts<W>(
        discover: D,
        strategy: St,
        key: Kx,
        weigher: W,
        completion: C,
        config: Config,
    ) -> Self
    where
        W: Weigh<D::Key, D::Service>,
    {
        let (control, control_rx) = mpsc::unbounded_channel();
        let events = Arc::new(EndpointEvents {
            eject_after: config.outlier.map_or(0, |o| o.consecutive_failures),
            max_ejected: std::sync::atomic::AtomicUsize::new(0),
            ejected: std::sync::atomic::AtomicUsize::new(0),
            wake: Arc::new(Notify::new()),
        });
        strategy.attach(Rebuild {
            control: control.downgrade(),
        });
        let empty = strategy.build(&Endpoints::new(&[]));
        let (rotation_base, seed_base) = match config.seed {
            Some(seed) => (crate::key::mix64(seed) >> 1, seed),
            None => {
                let mut rng = crate::rng::FastRng::new();
                (rng.next_u64() >> 1, rng.next_u64())
            }
        };
        let shared = Arc::new(Shared {
            table: Published::new(Snapshot {
                endpoints: Box::new([]),
                sources: Box::new([]),
                members: Box::new([]),
                invalidated: Box::new([]),
                keyed: empty.is_keyed(),
                latency_decay_ns: empty.latency_decay().map(decay_ns),
                picker: empty,
                honor_ejection: true,
            }),
            registry: Mutex::new(Registry::new()),
            published: Arc::new(Notify::new()),
            control,
            key,
            config,
            unspawned: Mutex::new(None),
            spawned: AtomicBool::new(false),
            discovery_errors: AtomicU64::new(0),
            discovery_ended: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
            failure: std::sync::OnceLock::new(),
            clones: CachePadded(AtomicU64::new(0)),
            rotation_base,
            seed_base,
        });
        let mut driver = Driver::new(
            discover,
            strategy,
            weigher,
            control_rx,
            Arc::downgrade(&shared),
            config,
            events,
        );
        // Take in everything discovery has ready now (a fixed list, say, however long), so the
        // first request does not race the task's first turn. The task registers its real
        // waker when it runs.
        driver.prime();
        *lock(&shared.unspawned) = Some(Box::pin(driver));
        // Start discovery now if a runtime is current; otherwise at the first poll_ready.
        let _ = shared.spawn_driver();
        // No table yet: a balancer that is only ever cloned (axum's `State`, say) must not
        // keep a table, and with it removed endpoints' services, alive.
        let local = Local::new(shared.local_state(), NO_VERSION, None);
        Self {
            shared,
            local,
            completion,
            _discover: PhantomData,
        }
    }
}

impl<D, St, Kx, C> Balance<D, St, Kx, C>
where
    D: Discover,
    D::Key: Hash + Eq + Clone,
    St: Strategy,
{
    /// A snapshot of every endpoint's counters and state.
    pub fn stats(&self) -> Stats<D::Key> {
        self.shared.stats()
    }
}

impl<D, St, Kx, C> Balance<D, St, Kx, C>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + Send + Sync + 'static,
    D::Service: Send + Sync + 'static,
    St: Strategy,
    Kx: Send + Sync + 'static,
{
    /// A handle for stats and runtime reweighting that does not keep the balancer alive.
    pub fn handle(&self) -> BalanceHandle<D::Key> {
        let shared: Arc<dyn ControlPlane<D::Key>> = self.shared.clone();
        BalanceHandle::new(Arc::downgrade(&shared))
    }
}

impl<D, St, Kx, C> Balance<D, St, Kx, C>
where
    D: Discover,
    D::Service: Clone,
    St: Strategy,
{
    /// The number of endpoint services this clone has copied so far (for tests of what a
    /// clone costs).
    #[doc(hidden)]
    pub fn copied_services(&self) -> usize {
        self.local.copies()
    }

    /// Moves to the newest table (the slow path of `poll_ready`): fails if the discovery task
    /// failed, or if it cannot be started for want of a runtime.
    #[cold]
    fn catch_up(&mut self, version: u64) -> Result<(), BoxError> {
        if version & FAILED != 0 {
            return Err(self.shared.failure().into());
        }
        self.shared.ensure_driver()?;
        self.local.sync(&self.shared.table);
        Ok(())
    }

    /// No endpoint is usable: fail at once, or wait (bounded) for discovery.
    fn poll_no_endpoints(&mut self, seen: u64, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(wait) = self.shared.config.wait_for_endpoints else {
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

impl<D, St, Kx, C, Req> Service<Req> for Balance<D, St, Kx, C>
where
    D: Discover,
    D::Service: Service<Req> + Clone,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    St: Strategy,
    Kx: RequestKey<Req>,
    C: TrackCompletion<<D::Service as Service<Req>>::Response>,
{
    type Response = C::Output;
    type Error = BoxError;
    type Future = ResponseFuture<D::Service, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
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
            self.local.any_usable().then_some(Reserved::Keyed)
        } else {
            match self.local.pick_ready::<Req>(cx, &self.shared.control) {
                Poll::Ready(found) => found.map(Reserved::Endpoint),
                Poll::Pending => return Poll::Pending,
            }
        };
        match usable {
            Some(reserved) => {
                self.local.reserved = reserved;
                self.local.wait = None;
                Poll::Ready(Ok(()))
            }
            None => self.poll_no_endpoints(self.local.version, cx),
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.local.call(request, &self.shared, &self.completion)
    }
}

impl<D, St, Kx, C> Clone for Balance<D, St, Kx, C>
where
    D: Discover,
    D::Service: Clone,
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
            local: Local::new(self.shared.local_state(), version, snapshot),
            completion: self.completion.clone(),
            _discover: PhantomData,
        }
    }
}

impl<D, St, Kx, C> fmt::Debug for Balance<D, St, Kx, C>
where
    D: Discover,
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
