//! The floor every strategy is measured against (issue 16): round-robin over a `Vec` of
//! endpoints with one atomic in-flight counter each, counted in `call` and released by the
//! response future. No discovery, no fallback when an endpoint is not ready, no stats, no table
//! shared by clones: what any balancer that counts requests in flight has to pay.
//!
//! Each counter is behind an `Arc` that the response future clones, so that a request can
//! outlive the balancer or its endpoint's removal, as a balancer's requests must (tower-lb's
//! guard gets that from the in-flight count itself). [`Bare`] leaves that out — its counters
//! live for ever — to show the cost of the two atomic operations alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

/// An in-flight counter on cache lines of its own, as each endpoint's state is in tower-lb.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

/// Round-robin over `endpoints`, each with an in-flight counter; `C` is how a response future
/// holds its counter (an `Arc`, or a `'static` reference in [`Bare`]).
pub(crate) struct Reference<S, C = Arc<Counter>> {
    endpoints: Vec<(S, C)>,
    next: usize,
}

/// The reference without the `Arc`: counters leaked, so that futures hold plain references.
pub(crate) type Bare<S> = Reference<S, &'static Counter>;

impl<S> Reference<S> {
    pub(crate) fn new(endpoints: Vec<S>) -> Self {
        let endpoints = endpoints.into_iter().map(|e| (e, Arc::default())).collect();
        Self { endpoints, next: 0 }
    }
}

impl<S> Bare<S> {
    pub(crate) fn leaked(endpoints: Vec<S>) -> Self {
        let endpoints = endpoints
            .into_iter()
            .map(|e| (e, &*Box::leak(Box::default())))
            .collect();
        Self { endpoints, next: 0 }
    }
}

impl<S, C: std::ops::Deref<Target = Counter>> Reference<S, C> {
    /// Requests in flight to all endpoints together.
    pub(crate) fn in_flight(&self) -> u64 {
        self.endpoints
            .iter()
            .map(|(_, c)| c.0.load(Ordering::Acquire))
            .sum()
    }
}

impl<S, C, Req> Service<Req> for Reference<S, C>
where
    S: Service<Req>,
    C: std::ops::Deref<Target = Counter> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Guarded<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.endpoints[self.next].0.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let i = self.next;
        self.next = if i + 1 == self.endpoints.len() {
            0
        } else {
            i + 1
        };
        let (endpoint, counter) = &mut self.endpoints[i];
        counter.0.fetch_add(1, Ordering::Acquire);
        let guard = Some(Guard(counter.clone()));
        Guarded {
            future: endpoint.call(request),
            guard,
        }
    }
}

/// Releases its endpoint's count when dropped.
pub(crate) struct Guard<C: std::ops::Deref<Target = Counter>>(C);

impl<C: std::ops::Deref<Target = Counter>> Drop for Guard<C> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Release);
    }
}

pin_project! {
    /// The endpoint's future, holding the request's count until it completes or is dropped.
    pub(crate) struct Guarded<F, C: std::ops::Deref<Target = Counter>> {
        #[pin]
        future: F,
        guard: Option<Guard<C>>,
    }
}

impl<F: Future, C: std::ops::Deref<Target = Counter>> Future for Guarded<F, C> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = ready!(this.future.poll(cx));
        this.guard.take();
        Poll::Ready(output)
    }
}
