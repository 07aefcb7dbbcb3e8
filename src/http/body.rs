//! Keeping a request in flight while its response body streams, and judging the response —
//! at its head, or at its end for a gRPC stream whose status comes in trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse};

use super::failures::{ServerFailures, ServerFailuresEos};
use crate::completion::TrackCompletion;
use crate::endpoint::{InFlightGuard, Outcome};

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

/// A [`TrackCompletion`] for `http::Response`s: it judges each response with a
/// [`tower-http` classifier](tower_http::classify) and keeps the request in flight inside the
/// response body.
///
/// - **In flight**: the guard is released when the body reaches the chosen point
///   ([`BodyCompletion`]), when it yields an error, or when it is dropped unfinished — whichever
///   comes first. An empty body releases it at once.
/// - **Judged**: by default with [`ServerFailures`] — a 5xx status, or for gRPC a status that
///   says the server failed, read from the headers of a trailers-only response or from the
///   trailers when the stream ends (also when the request stopped counting in flight at its
///   first data). A body error counts as a failure; a body the caller drops unfinished does not.
///   [`classify_with`](Self::classify_with) takes any other classifier, such as tower-http's
///   `ServerErrorsAsFailures` or `StatusInRangeAsFailures`.
///
/// ```
/// use tower_lb::http::TrackBody;
/// use tower_lb::{strategy::RoundRobin, BalanceLayer};
///
/// let layer = BalanceLayer::new(RoundRobin::new()).track_completion(TrackBody::end_of_stream());
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TrackBody<C = ServerFailures> {
    until: BodyCompletion,
    classifier: C,
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

    /// In flight until the response head: no in-flight tracking of the body, only its
    /// judgement (5xx, gRPC status).
    pub fn head() -> Self {
        Self::until(BodyCompletion::Head)
    }

    /// In flight until `until`.
    pub fn until(until: BodyCompletion) -> Self {
        Self {
            until,
            classifier: ServerFailures::new(),
        }
    }
}

impl<C> TrackBody<C> {
    /// Judges responses with `classifier` instead of [`ServerFailures`].
    pub fn classify_with<C2>(self, classifier: C2) -> TrackBody<C2>
    where
        C2: ClassifyResponse + Clone,
    {
        TrackBody {
            until: self.until,
            classifier,
        }
    }
}

impl<B, C> TrackCompletion<http::Response<B>> for TrackBody<C>
where
    B: Body + Send + 'static,
    C: ClassifyResponse + Clone + Send + Sync + 'static,
    C::ClassifyEos: Send + 'static,
{
    type Output = http::Response<TrackedBody<B, C::ClassifyEos>>;

    fn track(&self, guard: InFlightGuard, response: http::Response<B>) -> Self::Output {
        let pending = match self.classifier.clone().classify_response(&response) {
            ClassifiedResponse::Ready(Ok(())) => {
                guard.record_success();
                None
            }
            ClassifiedResponse::Ready(Err(_)) => {
                guard.record_failure();
                None
            }
            ClassifiedResponse::RequiresEos(eos) => Some(eos),
        };
        let until = self.until;
        response.map(|inner| {
            let (guard, outcome, eos) = if inner.is_end_stream() {
                // Nothing will come: judge it now, without trailers, and end the request.
                if let Some(eos) = pending {
                    record(Some(&guard), None, eos.classify_eos(None).is_err());
                }
                (None, None, None)
            } else if until == BodyCompletion::Head {
                // In flight no longer; judged at the end if the classifier waits for it.
                let outcome = pending.is_some().then(|| guard.into_outcome());
                (None, outcome, pending)
            } else {
                (Some(guard), None, pending)
            };
            TrackedBody {
                inner,
                guard,
                outcome,
                eos,
                until,
            }
        })
    }
}

pin_project! {
    /// A response body that holds its request's [`InFlightGuard`] and the judgement still to
    /// come; see [`TrackBody`].
    #[derive(Debug)]
    pub struct TrackedBody<B, E = ServerFailuresEos> {
        #[pin]
        inner: B,
        guard: Option<InFlightGuard>,
        // The request's outcome, once it no longer counts as in flight but is still to be
        // judged.
        outcome: Option<Outcome>,
        // The classifier that judges the end of the stream, until it has.
        eos: Option<E>,
        until: BodyCompletion,
    }
}

impl<B, E> TrackedBody<B, E> {
    /// Whether the body still holds its request in flight.
    pub fn is_tracking(&self) -> bool {
        self.guard.is_some()
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

fn record(guard: Option<&InFlightGuard>, outcome: Option<Outcome>, failed: bool) {
    match (guard, outcome, failed) {
        (Some(guard), _, true) => guard.record_failure(),
        (Some(guard), _, false) => guard.record_success(),
        (None, Some(outcome), true) => outcome.record_failure(),
        (None, Some(outcome), false) => outcome.record_success(),
        (None, None, _) => {}
    }
}

impl<B: Body, E: ClassifyEos> Body for TrackedBody<B, E> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        let mut body = Parts {
            guard: this.guard,
            outcome: this.outcome,
            eos: this.eos,
        };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    body.judge(Some(trailers));
                }
                if this.inner.is_end_stream() {
                    body.judge(None);
                    body.guard.take();
                } else if *this.until == BodyCompletion::FirstData && frame.is_data() {
                    // In flight no longer; judged at the end if the classifier waits for it.
                    if let Some(guard) = body.guard.take() {
                        if body.eos.is_some() {
                            *body.outcome = Some(guard.into_outcome());
                        }
                    }
                }
            }
            Some(Err(_)) => {
                body.failed();
                body.guard.take();
            }
            None => {
                body.judge(None);
                body.guard.take();
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

/// The projected fields of a [`TrackedBody`] that judge it.
struct Parts<'a, E> {
    guard: &'a mut Option<InFlightGuard>,
    outcome: &'a mut Option<Outcome>,
    eos: &'a mut Option<E>,
}

impl<E: ClassifyEos> Parts<'_, E> {
    fn judge(&mut self, trailers: Option<&HeaderMap>) {
        let Some(eos) = self.eos.take() else {
            return;
        };
        let failed = eos.classify_eos(trailers).is_err();
        record(self.guard.as_ref(), self.outcome.take(), failed);
    }

    fn failed(&mut self) {
        *self.eos = None;
        record(self.guard.as_ref(), self.outcome.take(), true);
    }
}
