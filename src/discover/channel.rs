//! Endpoints inserted and removed at run time through a handle.

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;
use tower::discover::Change;

/// A handle that inserts and removes endpoints at run time, and the stream that carries
/// those changes to a balancer.
///
/// The stream ends when every handle is dropped; the balancer then keeps the last set.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower::{service_fn, Layer};
/// use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};
///
/// let (handle, source) = discover::channel();
/// let balance = BalanceLayer::new(RoundRobin::new()).layer(source);
/// handle.insert("a", service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>("a") }));
/// handle.remove("a");
/// # let _ = balance;
/// # }
/// ```
pub fn channel<K, S>() -> (DiscoverHandle<K, S>, ChannelDiscover<K, S>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (DiscoverHandle { tx }, ChannelDiscover { rx })
}

/// Sends endpoint changes to a [`ChannelDiscover`]; see [`channel`].
pub struct DiscoverHandle<K, S> {
    tx: mpsc::UnboundedSender<Change<K, S>>,
}

impl<K, S> DiscoverHandle<K, S> {
    /// Adds an endpoint, or replaces the service of a known key (its counters are kept).
    /// Returns `false` if the balancer is gone.
    pub fn insert(&self, key: K, service: S) -> bool {
        self.tx.send(Change::Insert(key, service)).is_ok()
    }

    /// Removes an endpoint: it gets no new requests; those in flight finish. Returns `false`
    /// if the balancer is gone.
    pub fn remove(&self, key: K) -> bool {
        self.tx.send(Change::Remove(key)).is_ok()
    }

    /// Whether the receiving stream (and so the balancer) is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<K, S> Clone for DiscoverHandle<K, S> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K, S> fmt::Debug for DiscoverHandle<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoverHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The stream side of [`channel`]: a `Discover` of the changes sent through its handles.
pub struct ChannelDiscover<K, S> {
    rx: mpsc::UnboundedReceiver<Change<K, S>>,
}

impl<K, S> Stream for ChannelDiscover<K, S> {
    type Item = Result<Change<K, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|change| change.map(Ok))
    }
}

impl<K, S> fmt::Debug for ChannelDiscover<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelDiscover").finish_non_exhaustive()
    }
}
