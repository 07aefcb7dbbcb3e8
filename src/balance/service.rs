//! The `Balance` service.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::{mpsc, Notify};
use tower::discover::Discover;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use super::driver::Driver;
use super::future::{LatencyProbe, ResponseFuture};
use super::handle::{BalanceHandle, ControlPlane};
use super::shared::{Config, Control, Registry, Shared, SharedOf, Snapshot};
use crate::completion::{CompleteOnResponse, TrackCompletion};
use crate::endpoint::{clock, EndpointEvents, BROKEN, DRAINING, EJECTED};
use crate::error::Error;
use crate::key::{NoKey, RequestKey};
use crate::stats::Stats;
use crate::strategy::{decay_ns, Endpoints, LocalState, PickContext, Picker, Rebuild, Strategy};
use crate::sync::{lock, AtomicBool, AtomicU64, Mutex};
use crate::table::Published;
use crate::weight::{Unweighted, Weigh};

/// Picks an endpoint per request from a discovered set; see the [crate docs](crate).
///
/// Built by [`BalanceLayer`](crate::BalanceLayer) or [`Balance::new`]. Cloning is cheap (one
/// reference-count bump): clones share the endpoint table, the counters, the strategy and the
/// discovery task, and each keeps its own copies of the endpoint services (cloned from the
/// table when it changes) so it can poll them without locks.
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

/// One clone's view of the table.
struct Local<S, P> {
    /// The version of `snapshot`; `u64::MAX` before the first sync.
    version: u64,
    snapshot: Option<crate::sync::Arc<Snapshot<S, P>>>,
    /// This clone's copies of the endpoint services, in table order.
    services: Vec<S>,
    /// Endpoints whose service failed `poll_ready` in this clone.
    dead: Vec<bool>,
    reserved: Reserved,
    /// The clock reading of the reserving pick, for pickers that measure latency.
    picked_at: u64,
    pick: LocalState,
    wait: Option<Pin<Box<Waiting>>>,
}

/// What `poll_ready` promised `call`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reserved {
    None,
    /// This endpoint reported ready.
    Endpoint(usize),
    /// The strategy is keyed: `call` picks, and readies the endpoint it picked.
    Keyed,
}

pin_project! {
    /// A bounded wait for discovery to produce endpoints.
    struct Waiting {
        #[pin]
        deadline: tokio::time::Sleep,
        #[pin]
        published: tokio::sync::futures::OwnedNotified,
        notify: Arc<Notify>,
    }
}

enum Woken {
    Published,
    TimedOut,
}

impl Waiting {
    fn new(wait: Duration, notify: &Arc<Notify>) -> Self {
        Self {
            deadline: tokio::time::sleep(wait),
            published: Arc::clone(notify).notified_owned(),
            notify: Arc::clone(notify),
        }
    }

    fn poll_woken(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woken> {
        let mut this = self.project();
        if this.published.as_mut().poll(cx).is_ready() {
            // Re-arm for the next publish; the deadline stays.
            this.published.set(Arc::clone(this.notify).notified_owned());
            return Poll::Ready(Woken::Published);
        }
        if this.deadline.poll(cx).is_ready() {
            return Poll::Ready(Woken::TimedOut);
        }
        Poll::Pending
    }
}

impl<S: Clone, P> Local<S, P> {
    fn new(pick: LocalState) -> Self {
        Self {
            version: u64::MAX,
            snapshot: None,
            services: Vec::new(),
            dead: Vec::new(),
            reserved: Reserved::None,
            picked_at: 0,
            pick,
            wait: None,
        }
    }

    /// Takes the newest snapshot and clones its services; drops any reservation.
    fn sync(&mut self, table: &Published<Snapshot<S, P>>) {
        let (version, snapshot) = table.load();
        self.services.clear();
        self.services
            .extend(lock(&snapshot.services).iter().cloned());
        self.dead.clear();
        self.dead.resize(self.services.len(), false);
        self.snapshot = Some(snapshot);
        self.version = version;
        self.reserved = Reserved::None;
        self.pick.scratch = None;
    }
}

impl<D, St> Balance<D, St>
where
    D: Discover + Send + 'static,
    D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Service: Clone + Send + 'static,
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
    D::Service: Clone + Send + 'static,
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
        let shared = Arc::new(Shared {
            table: Published::new(Snapshot {
                endpoints: Box::new([]),
                services: Mutex::new(Box::new([])),
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
            clones: AtomicU64::new(0),
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
        // first request does not race the task's first turn. The task registers its real waker when it runs.
        let mut noop = Context::from_waker(std::task::Waker::noop());
        while driver.poll_step(&mut noop).is_pending() && driver.more_ready() {}
        *lock(&shared.unspawned) = Some(Box::pin(driver));
        // Start discovery now if a runtime is current; otherwise at the first poll_ready.
        let _ = shared.spawn_driver();
        let pick = shared.local_state();
        Self {
            shared,
            local: Local::new(pick),
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
    D::Service: Send + 'static,
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
    /// Asks the picker (up to three times), then scans, for a ready endpoint.
    ///
    /// `Ready(Some(i))`: endpoint `i` is ready. `Ready(None)`: every endpoint has failed.
    /// `Pending`: some endpoint is pending and none is ready; each pending one will wake us.
    ///
    /// The snapshot is borrowed, not cloned: an `Arc` clone per request would be two atomic
    /// operations on a cache line every clone on every thread shares.
    fn pick_ready<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Option<usize>>
    where
        D::Service: Service<Req>,
        <D::Service as Service<Req>>::Error: Into<BoxError>,
    {
        let Local {
            version,
            snapshot,
            services,
            dead,
            pick,
            picked_at,
            ..
        } = &mut self.local;
        let Some(snapshot) = snapshot.as_deref() else {
            return Poll::Ready(None);
        };
        let mut ready = Readiness {
            snapshot,
            services,
            dead,
            version: *version,
            control: &self.shared.control,
        };
        let endpoints = Endpoints::new(&snapshot.endpoints);
        let n = endpoints.len();
        if n == 0 {
            return Poll::Ready(None);
        }
        let mut pending = false;
        let now = if snapshot.latency_decay_ns.is_some() {
            clock::now_ns()
        } else {
            0
        };
        *picked_at = now;
        for _ in 0..3 {
            let mut pick_cx = PickContext {
                local: pick,
                key_hash: None,
                now,
            };
            let Some(index) = snapshot.picker.pick(&endpoints, &mut pick_cx) else {
                break;
            };
            if index >= n {
                break;
            }
            match ready.poll::<Req>(index, cx) {
                Poll::Ready(true) => return Poll::Ready(Some(index)),
                Poll::Ready(false) => {}
                Poll::Pending => pending = true,
            }
        }
        let start = pick.rng.below(n);
        for offset in 0..n {
            let index = (start + offset) % n;
            match ready.poll::<Req>(index, cx) {
                Poll::Ready(true) => return Poll::Ready(Some(index)),
                Poll::Ready(false) => {}
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
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

/// One clone's endpoints, borrowed apart from its picking state so that both can be used at
/// once without cloning the snapshot.
struct Readiness<'a, S, P> {
    snapshot: &'a Snapshot<S, P>,
    services: &'a mut [S],
    dead: &'a mut [bool],
    version: u64,
    control: &'a mpsc::UnboundedSender<Control>,
}

impl<S, P> Readiness<'_, S, P> {
    /// Polls endpoint `index` for readiness. A failed endpoint is counted, skipped by this
    /// clone from now on and reported to the discovery task.
    #[inline]
    fn poll<Req>(&mut self, index: usize, cx: &mut Context<'_>) -> Poll<bool>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        if self.dead[index] {
            return Poll::Ready(false);
        }
        let handle = &self.snapshot.endpoints[index];
        let unavailable = BROKEN
            | DRAINING
            | if self.snapshot.honor_ejection {
                EJECTED
            } else {
                0
            };
        if handle.flags() & unavailable != 0 {
            return Poll::Ready(false);
        }
        match self.services[index].poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(true),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => {
                let error: BoxError = error.into();
                tracing::debug!(%error, "endpoint failed poll_ready");
                handle.record_failure();
                self.dead[index] = true;
                let _ = self.control.send(Control::Failed {
                    handle: handle.clone(),
                    version: self.version,
                });
                Poll::Ready(false)
            }
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
        self.shared.ensure_driver()?;
        let version = self.shared.table.version();
        if version != self.local.version {
            self.local.sync(&self.shared.table);
        } else if self.local.reserved != Reserved::None {
            return Poll::Ready(Ok(()));
        }
        let Some(snapshot) = &self.local.snapshot else {
            return self.poll_no_endpoints(version, cx);
        };
        let usable = if snapshot.keyed {
            let live = (0..self.local.dead.len()).any(|i| {
                !self.local.dead[i] && snapshot.endpoints[i].flags() & (BROKEN | DRAINING) == 0
            });
            live.then_some(Reserved::Keyed)
        } else {
            match self.pick_ready::<Req>(cx) {
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
        let reserved = std::mem::replace(&mut self.local.reserved, Reserved::None);
        let Some(snapshot) = &self.local.snapshot else {
            return ResponseFuture::failed(Error::NotReady, self.completion.clone());
        };
        let index = match reserved {
            Reserved::None => {
                return ResponseFuture::failed(Error::NotReady, self.completion.clone())
            }
            Reserved::Endpoint(index) => index,
            Reserved::Keyed => {
                let latency = snapshot.latency_decay_ns;
                let now = if latency.is_some() {
                    clock::now_ns()
                } else {
                    0
                };
                let probe = latency.map(|decay| LatencyProbe::new(now, decay));
                let mut hasher = snapshot.picker.key_hasher();
                let key_hash = self
                    .shared
                    .key
                    .hash_key(&request, &mut hasher)
                    .then(|| hasher.finish());
                let mut pick_cx = PickContext {
                    local: &mut self.local.pick,
                    key_hash,
                    now,
                };
                let endpoints = Endpoints::new(&snapshot.endpoints);
                match snapshot.picker.pick(&endpoints, &mut pick_cx) {
                    Some(index) if index < endpoints.len() => {
                        let guard = snapshot.endpoints[index].dispatch();
                        let service = &mut self.local.services[index];
                        let mut noop = Context::from_waker(std::task::Waker::noop());
                        return match service.poll_ready(&mut noop) {
                            Poll::Ready(Ok(())) => ResponseFuture::called(
                                service.call(request),
                                guard,
                                probe,
                                self.completion.clone(),
                            ),
                            // Not ready (or failing): let the response future ready a clone
                            // of it, so the request still goes where its key maps.
                            _ => ResponseFuture::readying(
                                Oneshot::new(service.clone(), request),
                                guard,
                                probe,
                                self.completion.clone(),
                            ),
                        };
                    }
                    _ => {
                        // No choice: for a request without a key, say so.
                        let error = if key_hash.is_none() {
                            Error::MissingKey
                        } else {
                            Error::NoEndpoints
                        };
                        return ResponseFuture::failed(error, self.completion.clone());
                    }
                }
            }
        };
        let guard = snapshot.endpoints[index].dispatch();
        let probe = snapshot
            .latency_decay_ns
            .map(|decay| LatencyProbe::new(self.local.picked_at, decay));
        ResponseFuture::called(
            self.local.services[index].call(request),
            guard,
            probe,
            self.completion.clone(),
        )
    }
}

impl<D, St, Kx, C> Clone for Balance<D, St, Kx, C>
where
    D: Discover,
    D::Service: Clone,
    St: Strategy,
    C: Clone,
{
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            local: Local::new(self.shared.local_state()),
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
            .field("endpoints", &self.local.services.len())
            .field("reserved", &self.local.reserved)
            .finish_non_exhaustive()
    }
}
