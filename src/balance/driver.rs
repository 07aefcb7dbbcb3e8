//! The discovery task: applies `Change`s and control messages to the registry and publishes
//! new endpoint tables, whether or not requests arrive.

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tower::discover::{Change, Discover};
use tower::BoxError;

use super::shared::{Config, Control, SharedOf, Snapshot, Source};
use crate::endpoint::{EndpointEvents, EndpointHandle, EJECTED};
use crate::health::slow_start::{SCALE, STEPS};
use crate::strategy::{decay_ns, Endpoints, Picker, Strategy};
use crate::sync::{lock, Mutex, Ordering};
use crate::weight::Weigh;

/// Changes applied per wake-up before the task publishes and yields, so a discovery stream
/// that is always ready cannot starve the runtime.
const BATCH: usize = 1024;

pub(crate) struct Driver<D: Discover, St: Strategy, Kx, W> {
    discover: Pin<Box<D>>,
    discover_done: bool,
    strategy: St,
    weigher: W,
    control: mpsc::UnboundedReceiver<Control>,
    shared: Weak<SharedOf<D, St, Kx>>,
    config: Config,
    /// Woken when an endpoint ejects itself on the response path.
    ejected: Pin<Box<OwnedNotified>>,
    events: Arc<EndpointEvents>,
    /// The next ejection end or slow-start step.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last step stopped at its budget with more changes possibly ready.
    more_ready: bool,
    /// Whether something the task ran panicked; it does nothing more.
    failed: bool,
}

impl<D, St, Kx, W> Driver<D, St, Kx, W>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + Debug,
    D::Service: Clone,
    D::Error: Into<BoxError>,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
{
    pub(crate) fn new(
        discover: D,
        strategy: St,
        weigher: W,
        control: mpsc::UnboundedReceiver<Control>,
        shared: Weak<SharedOf<D, St, Kx>>,
        config: Config,
        events: Arc<EndpointEvents>,
    ) -> Self {
        Self {
            discover: Box::pin(discover),
            discover_done: false,
            strategy,
            weigher,
            control,
            shared,
            config,
            ejected: Box::pin(Arc::clone(&events.wake).notified_owned()),
            events,
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

    /// Whether the health features that need a clock are on.
    fn timed(&self) -> bool {
        self.config.outlier.is_some() || self.config.slow_start.is_some()
    }

    /// Applies whatever is ready; returns `Ready` when the balancer is gone.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(shared) = self.shared.upgrade() else {
            return Poll::Ready(());
        };
        let mut dirty = false;
        let mut budget = BATCH;
        let now = Instant::now();
        let had_endpoints = lock(&shared.registry)
            .members
            .iter()
            .any(|m| !m.handle.is_broken());

        if self.ejected.as_mut().poll(cx).is_ready() {
            self.ejected = Box::pin(Arc::clone(&self.events.wake).notified_owned());
            // Register for the next ejection; a permit stored meanwhile fires at once.
            if self.ejected.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            dirty |= self.start_ejections(&shared, now);
        }

        loop {
            match self.control.poll_recv(cx) {
                Poll::Ready(Some(Control::Failed { handle, id })) => {
                    dirty |= self.mark_broken(&shared.registry, &handle, id);
                }
                Poll::Ready(Some(Control::Rebuild)) => dirty = true,
                // Every clone is gone: nothing can use the table any more.
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }

        while !self.discover_done && budget > 0 {
            match self.discover.as_mut().poll_discover(cx) {
                Poll::Ready(Some(Ok(change))) => {
                    budget -= 1;
                    let ramp_from =
                        (had_endpoints && self.config.slow_start.is_some()).then_some(now);
                    self.apply(&shared.registry, change, ramp_from);
                    dirty = true;
                }
                Poll::Ready(Some(Err(error))) => {
                    budget -= 1;
                    let error: BoxError = error.into();
                    shared.discovery_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "discovery error; keeping the last endpoint set");
                }
                Poll::Ready(None) => {
                    self.discover_done = true;
                    shared.discovery_ended.store(true, Ordering::Relaxed);
                    tracing::debug!("discovery ended; keeping the last endpoint set");
                }
                Poll::Pending => break,
            }
        }

        if self.timed() {
            dirty |= self.on_time(&shared, now);
        }
        if dirty {
            self.publish(&shared, now);
        }
        if self.timed() {
            self.arm_timer(&shared, now, cx);
        }
        self.more_ready = budget == 0;
        if self.more_ready {
            // More changes may be ready: come back after other tasks had a turn.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn apply(
        &self,
        registry: &Mutex<Registry<D>>,
        change: Change<D::Key, D::Service>,
        ramp_from: Option<Instant>,
    ) {
        let mut registry = lock(registry);
        match change {
            Change::Insert(key, service) => {
                let weight = self.weigher.weigh(&key, &service).get();
                if let Some(&position) = registry.index.get(&key) {
                    registry.replace(position, service);
                    let handle = &registry.members[position].handle;
                    handle.set_weight(weight);
                    handle.clear_broken();
                    tracing::debug!(?key, weight, "endpoint replaced");
                } else {
                    tracing::debug!(?key, weight, "endpoint inserted");
                    let identity = format!("{key:?}").into_boxed_str();
                    let handle = EndpointHandle::with_identity(
                        weight,
                        identity,
                        Some(Arc::clone(&self.events)),
                    );
                    registry.insert(key, handle, service).ramp_from = ramp_from;
                }
            }
            Change::Remove(key) => {
                if let Some(in_flight) = registry.retire(&key) {
                    tracing::debug!(?key, in_flight, "endpoint removed");
                }
            }
        }
    }

    /// Takes an endpoint out of rotation after its service failed `poll_ready`, unless that
    /// service has been replaced since. Returns whether anything changed.
    fn mark_broken(&self, registry: &Mutex<Registry<D>>, handle: &EndpointHandle, id: u64) -> bool {
        let registry = lock(registry);
        let Some(member) = registry.members.iter().find(|m| m.handle.same(handle)) else {
            return false;
        };
        if member.id != id || !member.handle.mark_broken() {
            return false;
        }
        tracing::warn!(key = ?member.key, "endpoint failed its readiness check; out of rotation until re-inserted");
        true
    }

    /// Times the ejections that endpoints started on the response path.
    fn start_ejections(&self, shared: &SharedOf<D, St, Kx>, now: Instant) -> bool {
        let Some(outlier) = self.config.outlier else {
            return false;
        };
        let mut registry = lock(&shared.registry);
        let mut changed = false;
        for member in registry.members.iter_mut() {
            if !member.handle.is_ejected() || member.ejected_until.is_some() {
                continue;
            }
            // A long healthy stretch since the last return starts the count over.
            if member
                .returned_at
                .is_some_and(|at| now.saturating_duration_since(at) >= outlier.max_ejection_time)
            {
                member.ejections = 0;
            }
            member.ejections += 1;
            let time = outlier.ejection_time(member.ejections);
            // A time too long for the clock means "until further notice": about 30 years.
            member.ejected_until = Some(now.checked_add(time).unwrap_or_else(far_future));
            member.ramp_from = None;
            changed = true;
            tracing::warn!(
                key = ?member.key,
                ejections = member.ejections,
                ?time,
                "endpoint ejected after consecutive failures"
            );
        }
        changed
    }

    /// Ends due ejections and slow starts. Returns whether anything changed.
    fn on_time(&self, shared: &SharedOf<D, St, Kx>, now: Instant) -> bool {
        let mut registry = lock(&shared.registry);
        let mut changed = false;
        for member in registry.members.iter_mut() {
            if member.ejected_until.is_some_and(|until| until <= now) {
                member.ejected_until = None;
                member.returned_at = Some(now);
                member.handle.reset_consecutive_failures();
                if member.handle.clear_flag(EJECTED) {
                    self.events.ejected.fetch_sub(1, AtomicOrdering::AcqRel);
                }
                if self.config.slow_start.is_some() {
                    member.ramp_from = Some(now);
                }
                changed = true;
                tracing::info!(key = ?member.key, "ejection over; endpoint back in rotation");
            }
            if let (Some(from), Some(slow)) = (member.ramp_from, self.config.slow_start) {
                let elapsed = now.saturating_duration_since(from);
                if elapsed >= slow.window {
                    member.ramp_from = None;
                    member.ramp_factor = 0;
                    changed = true;
                    tracing::debug!(key = ?member.key, "slow start over");
                } else {
                    // Rebuild only when the ramp moved, not on every wake-up of the task.
                    let factor = slow.factor(elapsed);
                    changed |= factor != member.ramp_factor;
                    member.ramp_factor = factor;
                }
            }
        }
        changed
    }

    /// Sleeps until the next ejection end or slow-start step.
    fn arm_timer(&mut self, shared: &SharedOf<D, St, Kx>, now: Instant, cx: &mut Context<'_>) {
        if tokio::runtime::Handle::try_current().is_err() {
            // The priming poll at construction may run outside a runtime; the task arms it.
            return;
        }
        let next = {
            let registry = lock(&shared.registry);
            let step = self
                .config
                .slow_start
                .map(|slow| slow.window / STEPS)
                .unwrap_or_default();
            registry
                .members
                .iter()
                .flat_map(|m| {
                    let ramp = m.ramp_from.map(|from| {
                        let elapsed = now.saturating_duration_since(from);
                        let done = (elapsed.as_nanos() / step.as_nanos().max(1)) as u32;
                        from + step * (done + 1)
                    });
                    [m.ejected_until, ramp]
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

    fn publish(&self, shared: &SharedOf<D, St, Kx>, now: Instant) {
        let mut registry = lock(&shared.registry);
        registry.prune_retired();
        // Draining endpoints leave the table; their in-flight requests finish.
        while let Some(position) = registry.members.iter().position(|m| m.handle.is_draining()) {
            let key = registry.members[position].key.clone();
            if let Some(in_flight) = registry.retire(&key) {
                tracing::info!(?key, in_flight, "endpoint draining");
            }
        }

        let usable = registry.members.iter().filter(|m| !m.handle.is_broken());
        let total = usable.clone().count();
        let available = usable.clone().filter(|m| !m.handle.is_ejected()).count();
        let panic = self.config.panic_threshold > 0.0
            && total > 0
            && (available as f64) < self.config.panic_threshold * total as f64;
        if panic != shared.panicking.swap(panic, AtomicOrdering::Relaxed) {
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
        if let Some(outlier) = self.config.outlier {
            self.events
                .max_ejected
                .store(outlier.max_ejected(total), AtomicOrdering::Release);
        }
        let ramping = registry.members.iter().any(|m| m.ramp_from.is_some());

        let (endpoints, sources): (Vec<_>, Vec<_>) = registry
            .members
            .iter()
            .filter(|m| !m.handle.is_broken() && (panic || !m.handle.is_ejected()))
            .map(|m| {
                let weight = m.handle.configured_weight();
                let effective = match (ramping, self.config.slow_start) {
                    (true, Some(slow)) => {
                        let factor = m.ramp_from.map_or(SCALE, |from| {
                            slow.factor(now.saturating_duration_since(from))
                        });
                        weight * factor
                    }
                    _ => weight,
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
        let mut members = vec![0; registry.slot_count as usize];
        for member in &registry.members {
            members[member.slot as usize] = member.id;
        }
        let invalidated = std::mem::take(&mut registry.invalidated);
        drop(registry);
        let picker = self.strategy.build(&Endpoints::new(&endpoints));
        shared.table.publish(Snapshot {
            endpoints: endpoints.into_boxed_slice(),
            sources: sources.into_boxed_slice(),
            members: members.into_boxed_slice(),
            invalidated: invalidated.into_boxed_slice(),
            keyed: picker.is_keyed(),
            latency_decay_ns: picker.latency_decay().map(decay_ns),
            picker,
            honor_ejection: !panic,
        });
        shared.published.notify_waiters();
    }
}

/// An instant further than any timer needs to go: about 30 years from now.
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(30 * 365 * 24 * 60 * 60)
}

type Registry<D> = super::shared::Registry<<D as Discover>::Key, <D as Discover>::Service>;

// Nothing in `Driver` is structurally pinned (the stream is boxed), so it may move.
impl<D: Discover, St: Strategy, Kx, W> Unpin for Driver<D, St, Kx, W> {}

impl<D, St, Kx, W> Future for Driver<D, St, Kx, W>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + Debug,
    D::Service: Clone,
    D::Error: Into<BoxError>,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_guarded(cx)
    }
}
