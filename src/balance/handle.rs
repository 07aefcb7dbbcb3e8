//! `BalanceHandle`: reach a running balancer from anywhere.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Weak};

use crate::control::{Message, Shared};
use crate::error::Error;
use crate::health::Drain;
use crate::stats::Stats;
use crate::util::sync::lock;
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
/// use tower_lb::{discover, strategy::RoundRobin, weight::Weight, Balance};
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

    /// Drains an endpoint: it gets no new requests at once — requests already reserved on it
    /// by a `poll_ready` go to other endpoints — and it is removed from the balancer. The
    /// returned future resolves when its in-flight requests have finished, and no request is
    /// sent to the endpoint after that.
    ///
    /// A later `Insert` of the same key from discovery adds it again as a new endpoint.
    pub fn drain(&self, key: &K) -> Result<Drain, Error> {
        self.upgrade()?.drain(key)
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
    fn drain(&self, key: &K) -> Result<Drain, Error>;
}

impl<K, S, P, X> ControlPlane<K> for Shared<K, S, P, X>
where
    K: Hash + Eq + Clone + Send + Sync,
    S: Send + Sync,
    P: Send + Sync,
    X: Send + Sync,
{
    fn stats(&self) -> Stats<K> {
        Shared::stats(self)
    }

    fn set_weight(&self, key: &K, weight: Weight) -> Result<(), Error> {
        lock(&self.registry)
            .get(key)
            .ok_or(Error::UnknownEndpoint)?
            .handle
            .set_weight(weight.get());
        self.messages
            .send(Message::Rebuild)
            .map_err(|_| Error::Closed)
    }

    fn drain(&self, key: &K) -> Result<Drain, Error> {
        let drain = {
            let registry = lock(&self.registry);
            let member = registry.get(key).ok_or(Error::UnknownEndpoint)?;
            Drain::start(member.handle.clone())
        };
        self.messages
            .send(Message::Rebuild)
            .map_err(|_| Error::Closed)?;
        Ok(drain)
    }
}
