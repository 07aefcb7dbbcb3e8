//! Keeping a request in flight while its response body streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::completion::TrackCompletion;
use crate::endpoint::InFlightGuard;

/// Until when a response body keeps its request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyCompletion {
    /// Until the response head arrives (the body is not tracked).
    Head,
    /// Until the first data frame arrives (time to first byte).
    FirstData,
    /// Until the body ends: its last frame, an error, or the body being dropped.
    EndOfStream,
}

/// A [`TrackCompletion`] for `http::Response`s that moves the request's in-flight guard into
/// the response body.
///
/// The guard is released when the body reaches the chosen point, when it yields an error
/// (counted as a failure of the endpoint), or when the body is dropped unfinished — whichever
/// comes first. An empty body releases it at once.
///
/// ```
/// use tower_lb::http::TrackBody;
/// use tower_lb::{strategy::RoundRobin, BalanceLayer};
///
/// let layer = BalanceLayer::new(RoundRobin::new()).track_completion(TrackBody::end_of_stream());
/// # let _ = layer;
/// ```
///
/// It also classifies responses for outlier detection and error-aware strategies: by default
/// a 5xx status counts as a failure of the endpoint (see [`TrackBody::failure_when`]).
#[derive(Clone, Copy, Debug)]
pub struct TrackBody {
    until: BodyCompletion,
    is_failure: fn(http::StatusCode) -> bool,
}

impl TrackBody {
    /// In flight until the body ends (streaming responses, gRPC server streams).
    pub fn end_of_stream() -> Self {
        Self::until(BodyCompletion::EndOfStream)
    }

    /// In flight until the first data frame.
    pub fn first_data() -> Self {
        Self::until(BodyCompletion::FirstData)
    }

    /// In flight until the response head: no body tracking, only the 5xx classification.
    pub fn head() -> Self {
        Self::until(BodyCompletion::Head)
    }

    /// In flight until `until`.
    pub fn until(until: BodyCompletion) -> Self {
        Self {
            until,
            is_failure: |status| status.is_server_error(),
        }
    }

    /// Which statuses count as a failure of the endpoint (default: 5xx).
    pub fn failure_when(mut self, is_failure: fn(http::StatusCode) -> bool) -> Self {
        self.is_failure = is_failure;
        self
    }
}

impl<B: Body> TrackCompletion<http::Response<B>> for TrackBody
where
    B: Send + 'static,
{
    type Output = http::Response<TrackedBody<B>>;

    fn is_failure(&self, response: &http::Response<B>) -> bool {
        (self.is_failure)(response.status())
    }

    fn track(&self, guard: InFlightGuard, response: http::Response<B>) -> Self::Output {
        let until = self.until;
        response.map(|inner| {
            let tracked = until != BodyCompletion::Head && !inner.is_end_stream();
            let guard = tracked.then_some(guard);
            TrackedBody {
                inner,
                guard,
                until,
            }
        })
    }
}

pin_project! {
    /// A response body that holds its request's [`InFlightGuard`]; see [`TrackBody`].
    #[derive(Debug)]
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlightGuard>,
        until: BodyCompletion,
    }
}

impl<B> TrackedBody<B> {
    /// Whether the body still holds its request in flight.
    pub fn is_tracking(&self) -> bool {
        self.guard.is_some()
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                let first_data = *this.until == BodyCompletion::FirstData && frame.is_data();
                if first_data || this.inner.is_end_stream() {
                    this.guard.take();
                }
            }
            Some(Err(_)) => {
                if let Some(guard) = this.guard.take() {
                    guard.record_failure();
                }
            }
            None => {
                this.guard.take();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
