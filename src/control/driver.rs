//! The discovery task's loop: messages, discovery, time, then publish.

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tower::discover::{Change, Discover};
use tower::BoxError;

use super::registry::Registry;
use super::table::{self, Snapshot, Source};
use super::{Message, Shared};
use crate::endpoint::{EndpointHandle, FailureReport, EJECTED};
use crate::health::outlier::Ejector;
use crate::health::{panic, Passive};
use crate::strategy::{decay_rate, Endpoints, Picker, Strategy};
use crate::util::sync::{lock, Ordering};
use crate::weight::Weigh;

/// Changes applied per wake-up before the task publishes and yields, so a discovery stream
/// that is always ready cannot starve the runtime.
const BATCH: usize = 1024;

type SharedOf<D, St, W, X> = Shared<
    <D as Discover>::Key,
    <W as Weigh<<D as Discover>::Key, <D as Discover>::Service>>::Service,
    <St as Strategy>::Picker,
    X,
>;

/// The discovery task of one balancer.
pub(crate) struct Driver<D, St, W, X>
where
    D: Discover,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
{
    discover: Pin<Box<D>>,
    discover_done: bool,
    strategy: St,
    /// The last change of the strategy this task built from (see [`Strategy::poll_change`]).
    strategy_seen: u64,
    weigher: W,
    messages: mpsc::UnboundedReceiver<Message>,
    shared: Weak<SharedOf<D, St, W, X>>,
    passive: Passive,
    /// Ejects endpoints on the response path, with outlier detection on.
    ejector: Option<Arc<Ejector>>,
    /// The next ejection end or slow-start step.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last step stopped at its budget with more changes possibly ready.
    more_ready: bool,
    /// Whether something the task ran panicked; it does nothing more.
    failed: bool,
}

impl<D, St, W, X> Driver<D, St, W, X>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + Debug,
    D::Error: Into<BoxError>,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
{
    pub(crate) fn new(
        discover: D,
        strategy: St,
        weigher: W,
        messages: mpsc::UnboundedReceiver<Message>,
        shared: &Arc<SharedOf<D, St, W, X>>,
        passive: Passive,
    ) -> Self {
        let ejector = passive.outlier.map(|outlier| {
            let wake = shared.messages.downgrade();
            Arc::new(Ejector::new(&outlier, move || {
                if let Some(messages) = wake.upgrade() {
                    let _ = messages.send(Message::Ejected);
                }
            }))
        });
        Self {
            discover: Box::pin(discover),
            discover_done: false,
            strategy,
            strategy_seen: 0,
            weigher,
            messages,
            shared: Arc::downgrade(shared),
            passive,
            ejector,
            timer: None,
            more_ready: false,
            failed: false,
        }
    }

    /// Takes in everything discovery has ready now, without a runtime's waker: the balancer
    /// does this at construction so that a fixed list is in the first table. A panic is
    /// caught and fails the balancer, as in the task.
    pub(crate) fn prime(&mut self) {
        let mut noop = Context::from_waker(std::task::Waker::noop());
        while self.poll_guarded(&mut noop).is_pending() && self.more_ready {}
    }

    /// [`poll_step`](Self::poll_step), with a panic caught: it fails the balancer (requests get
    /// [`Error::DiscoveryFailed`] with the panic's message) and ends the task, rather than
    /// leaving clones with a table nobody updates.
    ///
    /// [`Error::DiscoveryFailed`]: crate::Error::DiscoveryFailed
    fn poll_guarded(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.failed {
            return Poll::Ready(());
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll_step(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                self.failed = true;
                self.more_ready = false;
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic with a non-string payload".to_owned());
                if let Some(shared) = self.shared.upgrade() {
                    shared.fail(format!("panicked: {message}"));
                }
                Poll::Ready(())
            }
        }
    }

    /// One turn of the loop: messages, the strategy, discovery and time, then a new table if
    /// anything changed. `Ready` when the balancer is gone.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(shared) = self.shared.upgrade() else {
            return Poll::Ready(());
        };
        let now = Instant::now();
        let Some(mut changed) = self.take_messages(cx, &shared, now) else {
            // Every clone is gone: nothing can use a table any more.
            return Poll::Ready(());
        };
        changed |= self
            .strategy
            .poll_change(&mut self.strategy_seen, cx)
            .is_ready();
        changed |= self.take_discovery(cx, &shared, now);
        if self.passive.is_timed() {
            changed |= self.on_time(&shared, now);
        }
        if changed {
            self.publish(&shared, now);
        }
        if self.passive.is_timed() {
            self.arm_timer(&shared, now, cx);
        }
        if self.more_ready {
            // More changes may be ready: come back after other tasks had a turn.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Acts on the messages that arrived; returns whether a new table is needed, or `None`
    /// when every clone is gone.
    fn take_messages(
        &mut self,
        cx: &mut Context<'_>,
        shared: &SharedOf<D, St, W, X>,
        now: Instant,
    ) -> Option<bool> {
        let mut changed = false;
        loop {
            match self.messages.poll_recv(cx) {
                Poll::Ready(Some(Message::Failed { handle, id })) => {
                    changed |= mark_broken(&lock(&shared.registry), &handle, id);
                }
                Poll::Ready(Some(Message::Ejected)) => {
                    changed |= self.start_ejections(shared, now);
                }
                Poll::Ready(Some(Message::Rebuild)) => changed = true,
                Poll::Ready(None) => return None,
                Poll::Pending => return Some(changed),
            }
        }
    }

    /// Applies what discovery has ready, up to [`BATCH`] changes; returns whether anything
    /// changed.
    fn take_discovery(
        &mut self,
        cx: &mut Context<'_>,
        shared: &SharedOf<D, St, W, X>,
        now: Instant,
    ) -> bool {
        // A new endpoint slow-starts, unless there was nothing to protect from it.
        let ramp_from = (self.passive.slow_start.is_some()
            && lock(&shared.registry)
                .members
                .iter()
                .any(|m| !m.handle.is_broken()))
        .then_some(now);
        let mut changed = false;
        let mut budget = BATCH;
        while !self.discover_done && budget > 0 {
            match self.discover.as_mut().poll_discover(cx) {
                Poll::Ready(Some(Ok(change))) => {
                    budget -= 1;
                    self.apply(&mut lock(&shared.registry), change, ramp_from);
                    changed = true;
                }
                Poll::Ready(Some(Err(error))) => {
                    budget -= 1;
                    let error: BoxError = error.into();
                    shared
                        .status
                        .discovery_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "discovery error; keeping the last endpoint set");
                }
                Poll::Ready(None) => {
                    self.discover_done = true;
                    shared.status.discovery_ended.store(true, Ordering::Relaxed);
                    tracing::debug!("discovery ended; keeping the last endpoint set");
                }
                Poll::Pending => break,
            }
        }
        self.more_ready = budget == 0;
        changed
    }

    fn apply(
        &self,
        registry: &mut Registry<D::Key, W::Service>,
        change: Change<D::Key, D::Service>,
        ramp_from: Option<Instant>,
    ) {
        match change {
            Change::Insert(key, service) => {
                let (weight, service) = self.weigher.weigh(&key, service);
                let weight = weight.get();
                let report = self
                    .ejector
                    .as_ref()
                    .map(|e| Arc::clone(e) as Arc<dyn FailureReport>);
                let identity = || format!("{key:?}").into_boxed_str();
                let new = registry.insert(key.clone(), service, weight, || {
                    EndpointHandle::with_identity(weight, identity(), report)
                });
                if new {
                    tracing::debug!(?key, weight, "endpoint inserted");
                    if let (Some(now), Some(member)) = (ramp_from, registry.get_mut(&key)) {
                        member.ramp.start(now);
                    }
                } else {
                    tracing::debug!(?key, weight, "endpoint replaced");
                }
            }
            Change::Remove(key) => {
                if let Some(in_flight) = registry.retire(&key) {
                    tracing::debug!(?key, in_flight, "endpoint removed");
                }
            }
        }
    }

    /// Times the ejections that endpoints started on the response path.
    fn start_ejections(&self, shared: &SharedOf<D, St, W, X>, now: Instant) -> bool {
        let Some(outlier) = self.passive.outlier else {
            return false;
        };
        let mut registry = lock(&shared.registry);
        let mut changed = false;
        for member in registry.members.iter_mut() {
            if !member.handle.is_ejected() || member.ejection.is_timed() {
                continue;
            }
            let time = member.ejection.start(&outlier, now);
            member.ramp.stop();
            changed = true;
            tracing::warn!(
                key = ?member.key,
                ejections = member.ejection.count(),
                ?time,
                "endpoint ejected after consecutive failures"
            );
        }
        changed
    }

    /// Ends due ejections and moves slow starts; returns whether anything changed.
    fn on_time(&self, shared: &SharedOf<D, St, W, X>, now: Instant) -> bool {
        let mut registry = lock(&shared.registry);
        let mut changed = false;
        for member in registry.members.iter_mut() {
            if member.ejection.end_if_due(now) {
                member.handle.reset_consecutive_failures();
                if member.handle.clear_flag(EJECTED) {
                    if let Some(ejector) = &self.ejector {
                        ejector.returned();
                    }
                }
                if self.passive.slow_start.is_some() {
                    member.ramp.start(now);
                }
                changed = true;
                tracing::info!(key = ?member.key, "ejection over; endpoint back in rotation");
            }
            if let Some(slow) = &self.passive.slow_start {
                let was_ramping = member.ramp.is_ramping();
                changed |= member.ramp.step(slow, now);
                if was_ramping && !member.ramp.is_ramping() {
                    tracing::debug!(key = ?member.key, "slow start over");
                }
            }
        }
        changed
    }

    /// Sleeps until the next ejection end or slow-start step.
    fn arm_timer(&mut self, shared: &SharedOf<D, St, W, X>, now: Instant, cx: &mut Context<'_>) {
        if tokio::runtime::Handle::try_current().is_err() {
            // The priming poll at construction may run outside a runtime; the task arms it.
            return;
        }
        let next = {
            let registry = lock(&shared.registry);
            let slow = self.passive.slow_start;
            registry
                .members
                .iter()
                .flat_map(|m| {
                    let step = slow.and_then(|slow| m.ramp.next_step(&slow, now));
                    [m.ejection.until(), step]
                })
                .flatten()
                .min()
        };
        let Some(next) = next else {
            self.timer = None;
            return;
        };
        match &mut self.timer {
            Some(timer) if timer.deadline() == next => {}
            Some(timer) => timer.as_mut().reset(next),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(next))),
        }
        if let Some(timer) = &mut self.timer {
            if timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
    }

    /// Builds and publishes a table of the members that may take requests.
    fn publish(&self, shared: &SharedOf<D, St, W, X>, now: Instant) {
        let mut registry = lock(&shared.registry);
        registry.prune_retired();
        // Draining endpoints leave the table; their in-flight requests finish.
        while let Some(member) = registry.members.iter().find(|m| m.handle.is_draining()) {
            let key = member.key.clone();
            if let Some(in_flight) = registry.retire(&key) {
                tracing::info!(?key, in_flight, "endpoint draining");
            }
        }

        let usable = registry.members.iter().filter(|m| !m.handle.is_broken());
        let total = usable.clone().count();
        let available = usable.filter(|m| !m.handle.is_ejected()).count();
        let panic = panic::panicking(self.passive.panic_threshold, total, available);
        if panic != shared.status.panicking.swap(panic, Ordering::Relaxed) {
            if panic {
                tracing::warn!(
                    available,
                    total,
                    "panic mode: too few endpoints available; balancing over all of them"
                );
            } else {
                tracing::info!(available, total, "panic mode over");
            }
        }
        if let (Some(ejector), Some(outlier)) = (&self.ejector, &self.passive.outlier) {
            ejector.set_endpoints(outlier, total);
        }

        let ramp = self
            .passive
            .slow_start
            .filter(|_| registry.members.iter().any(|m| m.ramp.is_ramping()));
        let (endpoints, sources): (Vec<_>, Vec<_>) = registry
            .members
            .iter()
            .filter(|m| !m.handle.is_broken() && (panic || !m.handle.is_ejected()))
            .map(|m| {
                let weight = m.handle.configured_weight();
                // While any endpoint ramps, weights are scaled so that weight-1 endpoints can
                // ramp too.
                let effective = match &ramp {
                    Some(slow) => weight.saturating_mul(m.ramp.factor(slow, now)),
                    None => weight,
                };
                m.handle.set_effective_weight(effective.max(1));
                let source = Source {
                    service: Arc::clone(&m.service),
                    slot: m.slot,
                    id: m.id,
                };
                (m.handle.clone(), source)
            })
            .unzip();
        let members = registry.ids_by_slot();
        let invalidated = registry.take_invalidated();
        drop(registry);
        let picker = self.strategy.build(&Endpoints::new(&endpoints));
        shared.table.publish(Snapshot {
            endpoints: endpoints.into_boxed_slice(),
            sources: sources.into_boxed_slice(),
            members,
            invalidated,
            keyed: picker.is_keyed(),
            latency_rate: picker.latency_decay().map(decay_rate),
            picker,
            unavailable: table::unavailable(!panic),
        });
        shared.published.notify_waiters();
    }
}

/// Takes an endpoint out of rotation after its service failed `poll_ready`, unless that
/// service has been replaced since. Returns whether anything changed.
fn mark_broken<K: Hash + Eq + Clone + Debug, S>(
    registry: &Registry<K, S>,
    handle: &EndpointHandle,
    id: u64,
) -> bool {
    let Some(member) = registry.find(handle) else {
        return false;
    };
    if member.id != id || !member.handle.mark_broken() {
        return false;
    }
    tracing::warn!(key = ?member.key, "endpoint failed its readiness check; out of rotation until re-inserted");
    true
}

// Nothing in `Driver` is structurally pinned (the stream is boxed), so it may move.
impl<D, St, W, X> Unpin for Driver<D, St, W, X>
where
    D: Discover,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
{
}

impl<D, St, W, X> Future for Driver<D, St, W, X>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + Debug,
    D::Error: Into<BoxError>,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_guarded(cx)
    }
}
