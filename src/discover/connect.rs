//! Turning a discovery stream of addresses into one of endpoint services.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_core::Stream;
use futures_util::future::{AbortHandle, Abortable, Aborted};
use futures_util::stream::FuturesUnordered;
use pin_project_lite::pin_project;
use tower::discover::{Change, Discover};
use tower::BoxError;
use tower_service::Service;

/// Makes the endpoint service for a discovered target (an address, a [`Target`], a URI…).
///
/// Any `FnMut(T) -> S` closure is a `MakeEndpoint<T>`; so are, with the feature `http`, a
/// hyper-util `Client` (an `HttpEndpoint` per `SocketAddr`) and `http::MakeHttpEndpoint`.
/// Making an endpoint cannot fail and does not wait: it builds a service that connects
/// lazily (tonic's `Endpoint::connect_lazy`, a pooled hyper client). For makers that connect
/// first, or can fail, use [`connect_service`] with a [`MakeService`](tower::MakeService).
///
/// [`Target`]: crate::discover::Target
pub trait MakeEndpoint<T> {
    /// The endpoint service.
    type Service;

    /// The endpoint service for `target`.
    fn make_endpoint(&mut self, target: T) -> Self::Service;
}

impl<T, S, F> MakeEndpoint<T> for F
where
    F: FnMut(T) -> S,
{
    type Service = S;

    fn make_endpoint(&mut self, target: T) -> S {
        self(target)
    }
}

/// Maps a discovery stream of targets to one of endpoint services: each
/// `Change::Insert(key, target)` becomes `Change::Insert(key, make(target))`, with the same
/// key; `Change::Remove(key)` and the source's errors pass through unchanged.
///
/// `make` is a closure or any [`MakeEndpoint`]:
///
/// ```
/// use std::net::SocketAddr;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let addrs: [SocketAddr; 2] = ["10.0.0.7:8080".parse()?, "10.0.0.8:8080".parse()?];
/// // One endpoint service per address (here a stand-in that answers its address; in a real
/// // program a tonic `Channel` or a hyper client pointed at the address).
/// let endpoints = discover::connect(discover::fixed(addrs.map(|a| (a, a))), |addr: SocketAddr| {
///     service_fn(move |_: ()| async move { Ok::<_, std::convert::Infallible>(addr) })
/// });
/// let balance = BalanceLayer::new(RoundRobin::new()).layer(endpoints);
/// let answer = balance.oneshot(()).await?;
/// assert!(addrs.contains(&answer));
/// # Ok(())
/// # }
/// ```
pub fn connect<D, M>(source: D, make: M) -> Connect<D, M> {
    Connect { source, make }
}

pin_project! {
    /// The discovery stream [`connect`] returns.
    pub struct Connect<D, M> {
        #[pin]
        source: D,
        make: M,
    }
}

impl<D, M> Connect<D, M> {
    /// The source of targets.
    pub fn get_ref(&self) -> &D {
        &self.source
    }

    /// The maker.
    pub fn maker(&self) -> &M {
        &self.make
    }
}

impl<D, M> Stream for Connect<D, M>
where
    D: Discover,
    M: MakeEndpoint<D::Service>,
{
    type Item = Result<Change<D::Key, M::Service>, D::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let change = ready!(this.source.poll_discover(cx));
        Poll::Ready(change.map(|change| {
            change.map(|change| match change {
                Change::Insert(key, target) => Change::Insert(key, this.make.make_endpoint(target)),
                Change::Remove(key) => Change::Remove(key),
            })
        }))
    }
}

impl<D: fmt::Debug, M> fmt::Debug for Connect<D, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Wraps every endpoint service `source` yields in `layer`: a per-endpoint timeout, a
/// concurrency limit, a retry — anything that should see each endpoint alone, inside the
/// balancer. It is [`connect`] with `layer` as the maker.
///
/// An error that the layer returns is the endpoint's, so it counts against the endpoint (see
/// [`classify`](crate::classify)): with a timeout here, an endpoint that hangs is blamed and,
/// with outlier detection, ejected, where a timeout around the whole balancer would only fail
/// the caller's request.
///
/// ```
/// use std::time::Duration;
/// use tower::timeout::TimeoutLayer;
/// use tower::{service_fn, Layer, ServiceBuilder};
/// use tower_lb::{discover, strategy::PowerOfTwoChoices, BalanceLayer};
///
/// let replicas = (0..3).map(|i| {
///     (i, service_fn(move |_: ()| async move { Ok::<_, std::convert::Infallible>(i) }))
/// });
/// let svc = ServiceBuilder::new()
///     // Around the balancer: the caller's own deadline, covering any wait for endpoints.
///     .timeout(Duration::from_secs(5))
///     .layer(BalanceLayer::new(PowerOfTwoChoices::peak_ewma()))
///     // Inside it, per endpoint: an endpoint slower than this fails, and that counts.
///     .service(discover::with_layer(
///         discover::fixed(replicas),
///         TimeoutLayer::new(Duration::from_secs(2)),
///     ));
/// # let _ = svc;
/// ```
pub fn with_layer<D, L>(source: D, layer: L) -> Connect<D, EachEndpoint<L>> {
    connect(source, EachEndpoint(layer))
}

/// The [`MakeEndpoint`] of [`with_layer`]: applies a layer to each endpoint service.
#[derive(Clone, Debug)]
pub struct EachEndpoint<L>(pub L);

impl<S, L: tower_layer::Layer<S>> MakeEndpoint<S> for EachEndpoint<L> {
    type Service = L::Service;

    fn make_endpoint(&mut self, service: S) -> L::Service {
        self.0.layer(service)
    }
}

/// Maps a discovery stream of targets to one of endpoint services with a
/// [`MakeService`](tower::MakeService): a service that, given a target, asynchronously makes
/// the endpoint service (connecting first, or looking something up), and may fail.
///
/// - Keys are kept; `Change::Remove` passes through.
/// - Several endpoints are made at once; each `Insert` is yielded when its service is ready,
///   so a slow target does not hold up the others. Changes to one key keep their order: a
///   `Remove`, or a newer `Insert`, of a key whose service is still being made cancels that
///   making (the future is dropped), so a stale service never arrives after it.
/// - The maker's readiness is respected: no change is taken from the source until the maker
///   is ready, so a maker with a concurrency limit paces discovery.
/// - A failed making is yielded as an error, a [`MakeError`] naming the key (the balancer
///   counts it, logs it and keeps that key's previous service, if any), and the stream goes
///   on. The source's own errors pass through. If the maker itself fails (`poll_ready`
///   returns an error), that error is yielded and the stream ends: the balancer keeps the
///   last endpoint set.
/// - A making that never finishes never inserts its endpoint: bound it, for example with
///   `tower::timeout::Timeout` around the maker.
///
/// Errors are [`BoxError`]s: either the source's error or a [`MakeError<K>`], found with
/// `downcast_ref`.
///
/// ```
/// use std::net::SocketAddr;
/// use tower::{service_fn, BoxError, Layer, ServiceExt};
/// use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let addr: SocketAddr = "127.0.0.1:8080".parse()?;
/// // A maker that checks something first (in a real program: connects, and fails if it can't).
/// let make = service_fn(|addr: SocketAddr| async move {
///     let endpoint = service_fn(move |_: ()| async move { Ok::<_, BoxError>(addr) });
///     Ok::<_, BoxError>(endpoint)
/// });
/// let endpoints = discover::connect_service(discover::fixed([(addr, addr)]), make);
/// let balance = BalanceLayer::new(RoundRobin::new())
///     .wait_for_endpoints(std::time::Duration::from_secs(1))?
///     .layer(endpoints);
/// assert_eq!(balance.oneshot(()).await?, addr);
/// # Ok(())
/// # }
/// ```
pub fn connect_service<D, M>(source: D, make: M) -> ConnectService<D, M>
where
    D: Discover,
    M: Service<D::Service>,
{
    ConnectService {
        source,
        make,
        making: FuturesUnordered::new(),
        cancel: HashMap::new(),
        source_done: false,
        maker_failed: false,
    }
}

type Making<K, F> = Abortable<Keyed<K, F>>;

pin_project! {
    /// The discovery stream [`connect_service`] returns.
    pub struct ConnectService<D, M>
    where
        D: Discover,
        M: Service<D::Service>,
    {
        #[pin]
        source: D,
        make: M,
        making: FuturesUnordered<Making<D::Key, M::Future>>,
        cancel: HashMap<D::Key, AbortHandle>,
        source_done: bool,
        maker_failed: bool,
    }
}

impl<D, M, S> Stream for ConnectService<D, M>
where
    D: Discover,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    M: Service<D::Service, Response = S>,
    M::Error: Into<BoxError>,
    D::Key: fmt::Debug + Send + Sync + 'static,
{
    type Item = Result<Change<D::Key, S>, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if *this.maker_failed {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut *this.making).poll_next(cx) {
                Poll::Ready(Some(Ok((key, made)))) => {
                    this.cancel.remove(&key);
                    return Poll::Ready(Some(match made {
                        Ok(service) => Ok(Change::Insert(key, service)),
                        Err(error) => Err(Box::new(MakeError {
                            key,
                            source: error.into(),
                        })),
                    }));
                }
                // Cancelled by a later change of its key, which is already under way.
                Poll::Ready(Some(Err(Aborted))) => continue,
                Poll::Ready(None) | Poll::Pending => {}
            }
            if *this.source_done {
                return if this.making.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
            match this.make.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => {
                    *this.maker_failed = true;
                    this.making.clear();
                    this.cancel.clear();
                    let error: BoxError = error.into();
                    tracing::error!(%error, "the endpoint maker failed; discovery ends here");
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Ok(())) => {}
            }
            match ready!(this.source.as_mut().poll_discover(cx)) {
                None => *this.source_done = true,
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                Some(Ok(Change::Remove(key))) => {
                    if let Some(making) = this.cancel.remove(&key) {
                        making.abort();
                    }
                    return Poll::Ready(Some(Ok(Change::Remove(key))));
                }
                Some(Ok(Change::Insert(key, target))) => {
                    let (handle, registration) = AbortHandle::new_pair();
                    if let Some(older) = this.cancel.insert(key.clone(), handle) {
                        older.abort();
                    }
                    let future = this.make.call(target);
                    this.making.push(Abortable::new(
                        Keyed {
                            key: Some(key),
                            future,
                        },
                        registration,
                    ));
                }
            }
        }
    }
}

impl<D, M> fmt::Debug for ConnectService<D, M>
where
    D: Discover + fmt::Debug,
    M: Service<D::Service>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectService")
            .field("source", &self.source)
            .field("making", &self.making.len())
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// A making future that yields its key with its outcome.
    struct Keyed<K, F> {
        key: Option<K>,
        #[pin]
        future: F,
    }
}

impl<K, F: Future> Future for Keyed<K, F> {
    type Output = (K, F::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.future.poll(cx));
        let key = this
            .key
            .take()
            .expect("a making future is not polled after it finished");
        Poll::Ready((key, output))
    }
}

/// Making the endpoint service for a key failed; its previous service, if any, is kept.
#[derive(Debug)]
pub struct MakeError<K> {
    key: K,
    source: BoxError,
}

impl<K> MakeError<K> {
    /// The key whose endpoint could not be made.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: fmt::Debug> fmt::Display for MakeError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not make the endpoint service for {:?}: {}",
            self.key, self.source
        )
    }
}

impl<K: fmt::Debug> std::error::Error for MakeError<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures_util::StreamExt;
    use tokio::sync::oneshot;

    use super::*;
    use crate::discover::channel;

    /// Polls `stream` once with a no-op waker.
    fn poll_once<S: Stream + Unpin>(stream: &mut S) -> Poll<Option<S::Item>> {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        Pin::new(stream).poll_next(&mut cx)
    }

    #[tokio::test]
    async fn a_closure_makes_services_and_keys_and_removals_pass_through() {
        let (handle, source) = channel::<&str, u16>();
        let mut endpoints = connect(source, |port: u16| format!("service on {port}"));
        handle.insert("a", 8080);
        handle.remove("b");
        drop(handle);
        let changes: Vec<_> = endpoints.by_ref().map(Result::unwrap).collect().await;
        assert!(matches!(&changes[0], Change::Insert("a", s) if s == "service on 8080"));
        assert!(matches!(changes[1], Change::Remove("b")));
        assert_eq!(changes.len(), 2);
    }

    type Finish = oneshot::Sender<Result<String, BoxError>>;

    /// A maker whose makings finish when the test says so, with the outcome it gives.
    #[derive(Clone, Default)]
    struct Controlled {
        calls: Arc<Mutex<Vec<(u16, Finish)>>>,
        ready: Arc<Mutex<Option<Result<(), &'static str>>>>,
    }

    impl Controlled {
        fn finish(&self, port: u16, outcome: Result<String, BoxError>) {
            let mut calls = self.calls.lock().unwrap();
            let i = calls.iter().position(|(p, _)| *p == port).expect("a call");
            let (_, tx) = calls.remove(i);
            let _ = tx.send(outcome);
        }

        fn calls(&self) -> Vec<u16> {
            self.calls.lock().unwrap().iter().map(|(p, _)| *p).collect()
        }
    }

    impl Service<u16> for Controlled {
        type Response = String;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            match *self.ready.lock().unwrap() {
                None => Poll::Ready(Ok(())),
                Some(Ok(())) => Poll::Pending,
                Some(Err(e)) => Poll::Ready(Err(e.into())),
            }
        }

        fn call(&mut self, port: u16) -> Self::Future {
            let (tx, rx) = oneshot::channel();
            self.calls.lock().unwrap().push((port, tx));
            Box::pin(async move { rx.await.map_err(|_| BoxError::from("dropped"))? })
        }
    }

    #[tokio::test]
    async fn services_are_inserted_when_made_and_a_slow_one_holds_up_no_other() {
        let (handle, source) = channel::<&str, u16>();
        let make = Controlled::default();
        let mut endpoints = connect_service(source, make.clone());
        handle.insert("slow", 1);
        handle.insert("fast", 2);
        assert!(poll_once(&mut endpoints).is_pending());
        assert_eq!(make.calls(), [1, 2], "both are being made at once");

        make.finish(2, Ok("fast service".into()));
        let change = endpoints.next().await.unwrap().unwrap();
        assert!(matches!(change, Change::Insert("fast", ref s) if s == "fast service"));
        make.finish(1, Ok("slow service".into()));
        let change = endpoints.next().await.unwrap().unwrap();
        assert!(matches!(change, Change::Insert("slow", _)));
    }

    #[tokio::test]
    async fn a_failed_making_names_its_key_and_the_stream_goes_on() {
        let (handle, source) = channel::<&str, u16>();
        let make = Controlled::default();
        let mut endpoints = connect_service(source, make.clone());
        handle.insert("a", 1);
        assert!(poll_once(&mut endpoints).is_pending());
        make.finish(1, Err("connection refused".into()));
        let error = endpoints.next().await.unwrap().unwrap_err();
        let make_error = error
            .downcast_ref::<MakeError<&str>>()
            .expect("a MakeError");
        assert_eq!(*make_error.key(), "a");
        assert_eq!(
            error.to_string(),
            "could not make the endpoint service for \"a\": connection refused"
        );

        handle.insert("b", 2);
        assert!(poll_once(&mut endpoints).is_pending());
        make.finish(2, Ok("b".into()));
        assert!(matches!(
            endpoints.next().await.unwrap().unwrap(),
            Change::Insert("b", _)
        ));
    }

    #[tokio::test]
    async fn a_removal_or_newer_insert_cancels_the_making_of_its_key() {
        let (handle, source) = channel::<&str, u16>();
        let make = Controlled::default();
        let mut endpoints = connect_service(source, make.clone());
        handle.insert("a", 1);
        handle.insert("b", 2);
        handle.insert("b", 3);
        handle.remove("a");
        let change = endpoints.next().await.unwrap().unwrap();
        assert!(matches!(change, Change::Remove("a")));
        assert!(poll_once(&mut endpoints).is_pending());
        // The cancelled makings were dropped: their senders see a closed receiver.
        let closed: Vec<u16> = make
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(closed, [1, 2]);
        make.finish(1, Ok("stale a".into()));
        make.finish(2, Ok("stale b".into()));
        make.finish(3, Ok("b on 3".into()));
        drop(handle);
        let rest: Vec<_> = endpoints.map(Result::unwrap).collect().await;
        assert_eq!(rest.len(), 1, "only the newest making arrives");
        assert!(matches!(&rest[0], Change::Insert("b", s) if s == "b on 3"));
    }

    #[tokio::test]
    async fn nothing_is_taken_from_the_source_until_the_maker_is_ready() {
        let (handle, source) = channel::<&str, u16>();
        let make = Controlled::default();
        *make.ready.lock().unwrap() = Some(Ok(()));
        let mut endpoints = connect_service(source, make.clone());
        handle.insert("a", 1);
        assert!(poll_once(&mut endpoints).is_pending());
        assert!(make.calls().is_empty());
        *make.ready.lock().unwrap() = None;
        assert!(poll_once(&mut endpoints).is_pending());
        assert_eq!(make.calls(), [1]);
    }

    #[tokio::test]
    async fn a_failed_maker_is_reported_and_ends_the_stream() {
        let (handle, source) = channel::<&str, u16>();
        let make = Controlled::default();
        *make.ready.lock().unwrap() = Some(Err("maker closed"));
        let mut endpoints = connect_service(source, make);
        handle.insert("a", 1);
        let error = endpoints.next().await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "maker closed");
        assert!(endpoints.next().await.is_none());
    }

    #[tokio::test]
    async fn source_errors_pass_through_and_the_end_waits_for_makings_under_way() {
        let source = futures_util::stream::iter([
            Ok(Change::Insert("a", 1u16)),
            Err::<Change<&str, u16>, _>("registry unreachable"),
        ]);
        let make = Controlled::default();
        let mut endpoints = connect_service(source, make.clone());
        let error = endpoints.next().await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "registry unreachable");
        assert!(
            poll_once(&mut endpoints).is_pending(),
            "a making is under way"
        );
        make.finish(1, Ok("a".into()));
        assert!(matches!(
            endpoints.next().await.unwrap().unwrap(),
            Change::Insert("a", _)
        ));
        assert!(endpoints.next().await.is_none());
    }
}
