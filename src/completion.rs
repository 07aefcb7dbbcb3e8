//! When a request stops counting as in flight.
//!
//! By default a request is in flight from dispatch until its response future completes. For
//! streaming responses (HTTP bodies, gRPC server streams) that ends too early: the endpoint is
//! still busy sending the body. A [`TrackCompletion`] decides what to do with the request's
//! [`InFlightGuard`] when the response arrives: drop it ([`CompleteOnResponse`], the default),
//! or move it into the response so it is released later — with the `http` feature,
//! `tower_lb::http::TrackBody` keeps it until the body's first data or its end.
//!
//! This mirrors tower's `load::TrackCompletion`.

use crate::endpoint::InFlightGuard;

/// Decides how long a request counts as in flight after its response arrives.
pub trait TrackCompletion<Resp>: Clone + Send + Sync + 'static {
    /// What the balancer returns in place of `Resp`.
    type Output;

    /// Takes the request's guard and its response; drop the guard to end the request's
    /// in-flight accounting now, or keep it in the output to end it later.
    fn track(&self, guard: InFlightGuard, response: Resp) -> Self::Output;

    /// Whether a response that arrived counts as a failure of its endpoint (for outlier
    /// detection and error-aware strategies), e.g. an HTTP 5xx. The response is still
    /// returned to the caller. The default: no response is a failure; only errors are.
    fn is_failure(&self, response: &Resp) -> bool {
        let _ = response;
        false
    }
}

/// A request stops counting as in flight when its response (head) arrives: the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompleteOnResponse;

impl<Resp> TrackCompletion<Resp> for CompleteOnResponse {
    type Output = Resp;

    #[inline]
    fn track(&self, guard: InFlightGuard, response: Resp) -> Resp {
        drop(guard);
        response
    }
}
