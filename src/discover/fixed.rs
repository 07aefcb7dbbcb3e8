//! A fixed list of endpoints.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tower::discover::Change;

/// Inserts every `(key, service)` of `endpoints`, then ends (the balancer keeps the set).
///
/// ```
/// use tower::service_fn;
/// use tower_lb::discover;
///
/// let endpoints = ["a", "b"].map(|name| {
///     (name, service_fn(move |_: ()| async move { Ok::<_, std::convert::Infallible>(name) }))
/// });
/// let source = discover::fixed(endpoints);
/// # let _ = source;
/// ```
pub fn fixed<K, S, I>(endpoints: I) -> Fixed<K, S>
where
    I: IntoIterator<Item = (K, S)>,
{
    Fixed {
        endpoints: endpoints.into_iter().collect::<Vec<_>>().into_iter(),
    }
}

/// The stream [`fixed`] returns.
#[derive(Debug)]
pub struct Fixed<K, S> {
    endpoints: std::vec::IntoIter<(K, S)>,
}

impl<K, S> Unpin for Fixed<K, S> {}

impl<K, S> Stream for Fixed<K, S> {
    type Item = Result<Change<K, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(
            self.endpoints
                .next()
                .map(|(key, service)| Ok(Change::Insert(key, service))),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.endpoints.size_hint()
    }
}
