//! The balancer's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use crate::endpoint::{clock, InFlightGuard};
use crate::error::Error;

pin_project! {
    /// The response future of [`Balance`](crate::Balance).
    ///
    /// It owns the request's [`InFlightGuard`]: the endpoint's in-flight count drops when the
    /// response arrives, when the call fails (counted as a failure), or when this future is
    /// dropped or unwinds unfinished.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        guard: Option<InFlightGuard>,
        latency: Option<LatencyProbe>,
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

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn called(
        future: S::Future,
        guard: InFlightGuard,
        latency: Option<LatencyProbe>,
    ) -> Self {
        Self {
            state: State::Called { future },
            guard: Some(guard),
            latency,
        }
    }

    pub(crate) fn readying(
        oneshot: Oneshot<S, Req>,
        guard: InFlightGuard,
        latency: Option<LatencyProbe>,
    ) -> Self {
        Self {
            state: State::Readying { oneshot },
            guard: Some(guard),
            latency,
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            guard: None,
            latency: None,
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

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
        // Release the endpoint now, not when the caller drops the finished future.
        if let Some(guard) = this.guard.take() {
            if result.is_err() {
                guard.record_failure();
            } else {
                guard.record_success();
            }
            if let Some(probe) = this.latency {
                let now = clock::now_ns();
                let sample = now.saturating_sub(probe.start) as f64;
                guard.record_rtt(sample, now, probe.decay_ns);
            }
        }
        Poll::Ready(result.map_err(Into::into))
    }
}

impl<S: Service<Req>, Req> std::fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}
