//! The discovery task: applies `Change`s and control messages to the registry and publishes
//! new endpoint tables, whether or not requests arrive.

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tower::discover::{Change, Discover};
use tower::BoxError;

use super::shared::{Control, Member, SharedOf, Snapshot};
use crate::endpoint::EndpointHandle;
use crate::strategy::{Endpoints, Strategy};
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
    ) -> Self {
        Self {
            discover: Box::pin(discover),
            discover_done: false,
            strategy,
            weigher,
            control,
            shared,
        }
    }

    /// Applies whatever is ready; returns `Ready` when the balancer is gone.
    pub(crate) fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(shared) = self.shared.upgrade() else {
            return Poll::Ready(());
        };
        let mut dirty = false;
        let mut budget = BATCH;
        let next_version = shared.table.version() + 1;

        loop {
            match self.control.poll_recv(cx) {
                Poll::Ready(Some(Control::Failed { handle, version })) => {
                    dirty |= self.mark_broken(&shared.registry, &handle, version);
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
                    self.apply(&shared.registry, change, next_version);
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

        if dirty {
            self.publish(&shared);
        }
        if budget == 0 {
            // More changes may be ready: come back after other tasks had a turn.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn apply(
        &self,
        registry: &Mutex<Registry<D>>,
        change: Change<D::Key, D::Service>,
        next_version: u64,
    ) {
        let mut registry = lock(registry);
        match change {
            Change::Insert(key, service) => {
                let weight = self.weigher.weigh(&key, &service).get();
                if let Some(&position) = registry.index.get(&key) {
                    let member = &mut registry.members[position];
                    member.service = service;
                    member.since = next_version;
                    member.handle.set_weight(weight);
                    member.handle.clear_broken();
                    tracing::debug!(?key, weight, "endpoint replaced");
                } else {
                    let position = registry.members.len();
                    registry.index.insert(key.clone(), position);
                    tracing::debug!(?key, weight, "endpoint inserted");
                    let identity = format!("{key:?}").into_boxed_str();
                    registry.members.push(Member {
                        key,
                        handle: EndpointHandle::with_identity(weight, identity),
                        service,
                        since: next_version,
                    });
                }
            }
            Change::Remove(key) => {
                if let Some(member) = registry.remove(&key) {
                    tracing::debug!(
                        ?key,
                        in_flight = member.handle.in_flight(),
                        "endpoint removed"
                    );
                    registry.retired.push((member.key, member.handle));
                }
            }
        }
    }

    /// Takes an endpoint out of rotation after its service failed `poll_ready`, unless that
    /// service has been replaced since. Returns whether anything changed.
    fn mark_broken(
        &self,
        registry: &Mutex<Registry<D>>,
        handle: &EndpointHandle,
        version: u64,
    ) -> bool {
        let registry = lock(registry);
        let Some(member) = registry.members.iter().find(|m| m.handle.same(handle)) else {
            return false;
        };
        if member.since > version || !member.handle.mark_broken() {
            return false;
        }
        tracing::warn!(key = ?member.key, "endpoint failed its readiness check; out of rotation until re-inserted");
        true
    }

    fn publish(&self, shared: &SharedOf<D, St, Kx>) {
        let (endpoints, services): (Vec<_>, Vec<_>) = {
            let mut registry = lock(&shared.registry);
            registry.prune_retired();
            registry
                .members
                .iter()
                .filter(|m| !m.handle.is_broken())
                .map(|m| (m.handle.clone(), m.service.clone()))
                .unzip()
        };
        let picker = self.strategy.build(&Endpoints::new(&endpoints));
        shared.table.publish(Snapshot {
            endpoints: endpoints.into_boxed_slice(),
            services: Mutex::new(services.into_boxed_slice()),
            picker,
        });
        shared.published.notify_waiters();
    }
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
        self.get_mut().poll_step(cx)
    }
}
