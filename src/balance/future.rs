//! The balancer's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use crate::completion::{CompleteOnResponse, TrackCompletion};
use crate::endpoint::{clock, InFlightGuard};
use crate::error::Error;

pin_project! {
    /// The response future of [`Balance`](crate::Balance).
    ///
    /// It owns the request's [`InFlightGuard`]: the endpoint's in-flight count drops when the
    /// call fails (counted as a failure), when this future is dropped or unwinds unfinished,
    /// or when the response arrives — then the balancer's [`TrackCompletion`] decides whether
    /// the guard is dropped or travels on inside the response (e.g. an HTTP body).
    pub struct ResponseFuture<S, Req, C = CompleteOnResponse>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        guard: Option<InFlightGuard>,
        latency: Option<LatencyProbe>,
        completion: C,
    }

    impl<S, Req, C> PinnedDrop for ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped unfinished (a client timeout, say): the endpoint took at least this long.
            // PeakEWMA takes the sample as a peak, so an endpoint that hangs stops looking idle
            // even though none of its requests ever completes.
            let this = this.project();
            if let (Some(guard), Some(probe)) = (this.guard.as_ref(), this.latency.as_ref()) {
                let now = clock::now_ns();
                guard.record_rtt(now.saturating_sub(probe.start) as f64, now, probe.decay_ns);
            }
        }
    }
}

/// Measures a response's latency into its endpoint's PeakEWMA estimate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LatencyProbe {
    start: u64,
    decay_ns: f64,
}

impl LatencyProbe {
    pub(crate) fn new(start: u64, decay_ns: f64) -> Self {
        Self { start, decay_ns }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // The endpoint was ready and has been called.
        Called { #[pin] future: S::Future },
        // A keyed pick whose endpoint was not ready at once: ready it, then call it.
        Readying { #[pin] oneshot: Oneshot<S, Req> },
        // The balancer could not dispatch the request.
        Failed { error: Option<Error> },
    }
}

impl<S: Service<Req>, Req, C> ResponseFuture<S, Req, C> {
    pub(crate) fn called(
        future: S::Future,
        guard: InFlightGuard,
        latency: Option<LatencyProbe>,
        completion: C,
    ) -> Self {
        Self {
            state: State::Called { future },
            guard: Some(guard),
            latency,
            completion,
        }
    }

    pub(crate) fn readying(
        oneshot: Oneshot<S, Req>,
        guard: InFlightGuard,
        latency: Option<LatencyProbe>,
        completion: C,
    ) -> Self {
        Self {
            state: State::Readying { oneshot },
            guard: Some(guard),
            latency,
            completion,
        }
    }

    pub(crate) fn failed(error: Error, completion: C) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            guard: None,
            latency: None,
            completion,
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: TrackCompletion<S::Response>,
{
    type Output = Result<C::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.state.project() {
            StateProj::Called { future } => ready!(future.poll(cx)),
            StateProj::Readying { oneshot } => ready!(oneshot.poll(cx)),
            StateProj::Failed { error } => {
                let error = error.take().unwrap_or(Error::NotReady);
                return Poll::Ready(Err(error.into()));
            }
        };
        let Some(guard) = this.guard.take() else {
            return Poll::Ready(Err("response future polled after completion".into()));
        };
        if let Some(probe) = this.latency {
            let now = clock::now_ns();
            let sample = now.saturating_sub(probe.start) as f64;
            guard.record_rtt(sample, now, probe.decay_ns);
        }
        match result {
            Ok(response) => {
                if this.completion.is_failure(&response) {
                    guard.record_failure();
                } else {
                    guard.record_success();
                }
                Poll::Ready(Ok(this.completion.track(guard, response)))
            }
            // Dropping the guard releases the endpoint now, not when the caller drops the
            // finished future.
            Err(error) => {
                guard.record_failure();
                Poll::Ready(Err(error.into()))
            }
        }
    }
}

impl<S: Service<Req>, Req, C> std::fmt::Debug for ResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}
