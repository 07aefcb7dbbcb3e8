//! `BalanceHandle`: reach a running balancer from anywhere.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use super::shared::{Control, Shared};
use crate::endpoint::{EndpointHandle, DRAINING};
use crate::error::Error;
use crate::stats::Stats;
use crate::sync::lock;
use crate::weight::Weight;

/// A handle on a running balancer: stats and runtime reweighting, from any task.
///
/// It does not keep the balancer alive; once every clone of the balancer is dropped, its
/// methods return [`Error::Closed`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_lb::Error> {
/// use tower::service_fn;
/// use tower_lb::{discover, Balance, RoundRobin, Weight};
///
/// let echo = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
/// let balance = Balance::new(discover::fixed([("a", echo)]), RoundRobin::new());
/// let handle = balance.handle();
/// handle.set_weight(&"a", Weight::new(5).unwrap())?;
/// assert_eq!(handle.stats()?.get(&"a").unwrap().weight, 5);
/// # Ok(())
/// # }
/// ```
pub struct BalanceHandle<K> {
    inner: Weak<dyn ControlPlane<K>>,
}

impl<K> BalanceHandle<K> {
    pub(crate) fn new(inner: Weak<dyn ControlPlane<K>>) -> Self {
        Self { inner }
    }

    fn upgrade(&self) -> Result<Arc<dyn ControlPlane<K>>, Error> {
        self.inner.upgrade().ok_or(Error::Closed)
    }

    /// A snapshot of every endpoint's counters and state.
    pub fn stats(&self) -> Result<Stats<K>, Error> {
        Ok(self.upgrade()?.stats())
    }

    /// Changes an endpoint's weight without resetting its counters. Weight-aware strategies
    /// rebuild their pickers off the request path and follow the new weight from their next
    /// table. A later `Insert` of the same key from weighted discovery sets the weight again.
    pub fn set_weight(&self, key: &K, weight: Weight) -> Result<(), Error> {
        self.upgrade()?.set_weight(key, weight)
    }

    /// Drains an endpoint: it gets no new requests at once (requests already reserved by a
    /// `poll_ready` may still be sent), and it is removed from the balancer. The returned
    /// future resolves when its in-flight requests have finished.
    ///
    /// A later `Insert` of the same key from discovery adds it again as a new endpoint.
    pub fn drain(&self, key: &K) -> Result<Drain, Error> {
        let handle = self.upgrade()?.drain(key)?;
        Ok(Drain { handle })
    }
}

/// Resolves when a drained endpoint has no request in flight; see [`BalanceHandle::drain`].
#[must_use = "a drain future does nothing unless polled"]
pub struct Drain {
    handle: EndpointHandle,
}

impl Drain {
    /// Requests still in flight to the endpoint.
    pub fn in_flight(&self) -> u64 {
        self.handle.in_flight()
    }
}

impl Future for Drain {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.handle.register_drain_waker(cx.waker());
        if self.handle.in_flight() == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl<K> Clone for BalanceHandle<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Weak::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for BalanceHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceHandle")
            .field("closed", &(self.inner.strong_count() == 0))
            .finish()
    }
}

/// What a handle can do, without the service and strategy types.
pub(crate) trait ControlPlane<K>: Send + Sync {
    fn stats(&self) -> Stats<K>;
    fn set_weight(&self, key: &K, weight: Weight) -> Result<(), Error>;
    fn drain(&self, key: &K) -> Result<EndpointHandle, Error>;
}

impl<K, S, P, Kx> ControlPlane<K> for Shared<K, S, P, Kx>
where
    K: Hash + Eq + Clone + Send + Sync,
    S: Send + Sync,
    P: Send + Sync,
    Kx: Send + Sync,
{
    fn stats(&self) -> Stats<K> {
        Shared::stats(self)
    }

    fn set_weight(&self, key: &K, weight: Weight) -> Result<(), Error> {
        {
            let registry = lock(&self.registry);
            let position = *registry.index.get(key).ok_or(Error::UnknownEndpoint)?;
            registry.members[position].handle.set_weight(weight.get());
        }
        self.control
            .send(Control::Rebuild)
            .map_err(|_| Error::Closed)
    }

    fn drain(&self, key: &K) -> Result<EndpointHandle, Error> {
        let handle = {
            let registry = lock(&self.registry);
            let position = *registry.index.get(key).ok_or(Error::UnknownEndpoint)?;
            let handle = registry.members[position].handle.clone();
            handle.set_flag(DRAINING);
            handle
        };
        self.control
            .send(Control::Rebuild)
            .map_err(|_| Error::Closed)?;
        Ok(handle)
    }
}
