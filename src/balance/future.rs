//! The balancer's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use crate::classify::{is_caller_error, EndpointError};
use crate::completion::{CompleteOnResponse, TrackCompletion};
use crate::endpoint::clock::Clock;
use crate::endpoint::InFlightGuard;
use crate::error::Error;

pin_project! {
    /// The response future of [`Balance`](crate::Balance).
    ///
    /// It owns the request's [`InFlightGuard`]: the endpoint's in-flight count drops when the
    /// call fails (counted as a failure of the endpoint unless it was the caller's, see
    /// [`classify`](crate::classify); the error is wrapped in an
    /// [`EndpointError`] naming the endpoint), when this future is dropped or unwinds
    /// unfinished, or when the response arrives — then the balancer's [`TrackCompletion`]
    /// classifies it and decides whether the guard is dropped or travels on inside the
    /// response (e.g. an HTTP body).
    pub struct ResponseFuture<S, Req, C = CompleteOnResponse>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        guard: Option<InFlightGuard>,
        timing: Option<Timing>,
        completion: C,
    }

    impl<S, Req, C> PinnedDrop for ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped unfinished (a caller's timeout, say).
            let this = this.project();
            if let (Some(guard), Some(timing)) = (this.guard.as_ref(), this.timing.as_ref()) {
                timing.abandoned(guard);
            }
        }
    }
}

/// What a balancer measures of its requests, if anything: latencies into the endpoints'
/// PeakEWMA estimates (when the picker asks for them), and how long an abandoned request
/// waited (when configured). Worked out once per table, so that an untimed request reads no
/// clock and checks one flag.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timed {
    clock: Clock,
    /// The PeakEWMA decay rate, `1 / decay_ns`; 0 when latencies are not measured.
    rate: f64,
    /// Waits from this one on count as the endpoint's failure; `u64::MAX` when not counted.
    abandon_after_ns: u64,
}

impl Timed {
    /// What to measure, or `None` when neither is asked for.
    ///
    /// Made for every new clone: `rate` comes divided from the table, so this is a few moves.
    #[inline]
    pub(crate) fn new(
        clock: Clock,
        rate: Option<f64>,
        abandon_after_ns: Option<u64>,
    ) -> Option<Self> {
        if rate.is_none() && abandon_after_ns.is_none() {
            return None;
        }
        Some(Self {
            clock,
            rate: rate.unwrap_or(0.0),
            abandon_after_ns: abandon_after_ns.unwrap_or(u64::MAX),
        })
    }

    /// The clock's time now.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Starts timing a request dispatched at `start` (a reading of [`Timed::now`]).
    #[inline]
    pub(crate) fn start(self, start: u64) -> Timing {
        Timing { start, timed: self }
    }
}

/// What a request measures from its dispatch; see [`Timed`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    start: u64,
    timed: Timed,
}

impl Timing {
    /// The response arrived (or failed): a latency sample.
    fn answered(&self, guard: &InFlightGuard) {
        let rate = self.timed.rate;
        if rate > 0.0 {
            let now = self.timed.now();
            guard.record_rtt_at_rate(now.saturating_sub(self.start) as f64, now, rate);
        }
    }

    /// The caller gave up: the endpoint took at least this long, which PeakEWMA takes as a
    /// peak, so an endpoint that hangs stops looking idle though none of its requests ever
    /// completes; and after a long enough wait it counts as the endpoint's failure.
    fn abandoned(&self, guard: &InFlightGuard) {
        let now = self.timed.now();
        let waited = now.saturating_sub(self.start);
        let rate = self.timed.rate;
        if rate > 0.0 {
            guard.record_rtt_at_rate(waited as f64, now, rate);
        }
        if waited >= self.timed.abandon_after_ns {
            guard.record_failure();
        }
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
    #[inline]
    pub(crate) fn called(
        future: S::Future,
        guard: InFlightGuard,
        timing: Option<Timing>,
        completion: C,
    ) -> Self {
        Self {
            state: State::Called { future },
            guard: Some(guard),
            timing,
            completion,
        }
    }

    pub(crate) fn readying(
        oneshot: Oneshot<S, Req>,
        guard: InFlightGuard,
        timing: Option<Timing>,
        completion: C,
    ) -> Self {
        Self {
            state: State::Readying { oneshot },
            guard: Some(guard),
            timing,
            completion,
        }
    }

    pub(crate) fn failed(error: Error, completion: C) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            guard: None,
            timing: None,
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

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.state.project() {
            StateProj::Called { future } => ready!(future.poll(cx)),
            StateProj::Readying { oneshot } => ready!(poll_readying(oneshot, cx)),
            StateProj::Failed { error } => return Poll::Ready(Err(failed(error))),
        };
        let Some(guard) = this.guard.take() else {
            return Poll::Ready(Err(polled_again()));
        };
        if let Some(timing) = this.timing {
            timing.answered(&guard);
        }
        Poll::Ready(match result {
            // The completion records the response's verdict, and ends the request now or
            // keeps it in flight inside the response.
            Ok(response) => Ok(this.completion.track(guard, response)),
            // Dropping the guard releases the endpoint now, not when the caller drops the
            // finished future.
            Err(error) => Err(endpoint_failed(guard, error.into())),
        })
    }
}

/// A request whose endpoint was not ready at once (a keyed pick, a redirected reservation):
/// out of line, so that the common case — called at once — stays small enough to inline.
#[cold]
#[inline(never)]
fn poll_readying<S: Service<Req>, Req>(
    oneshot: Pin<&mut Oneshot<S, Req>>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Response, S::Error>> {
    oneshot.poll(cx)
}

/// The balancer could not dispatch the request: why.
#[cold]
#[inline(never)]
fn failed(error: &mut Option<Error>) -> BoxError {
    error.take().unwrap_or(Error::NotReady).into()
}

#[cold]
#[inline(never)]
fn polled_again() -> BoxError {
    "response future polled after completion".into()
}

/// The endpoint's call failed: counted against it unless the caller caused it, and named.
#[cold]
#[inline(never)]
fn endpoint_failed(guard: InFlightGuard, error: BoxError) -> BoxError {
    if !is_caller_error(&*error) {
        guard.record_failure();
    }
    EndpointError::new(guard.endpoint(), error).into()
}

impl<S: Service<Req>, Req, C> std::fmt::Debug for ResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}
