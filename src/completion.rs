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

/// Decides, when a response arrives, whether it counts as a failure of its endpoint and how
/// long the request still counts as in flight.
pub trait TrackCompletion<Resp>: Clone + Send + Sync + 'static {
    /// What the balancer returns in place of `Resp`.
    type Output;

    /// Takes the request's guard and its response. Records whether the response is a failure
    /// of the endpoint — with [`InFlightGuard::record_failure`] or
    /// [`record_success`](InFlightGuard::record_success), now or when it is known (keeping the
    /// guard, or its [`Outcome`](crate::Outcome)) — and ends the request's in-flight
    /// accounting now (dropping the guard) or later (keeping it in the output, e.g. in an
    /// HTTP body). The response is returned to the caller either way; see
    /// [`classify`](crate::classify) for what should count.
    fn track(&self, guard: InFlightGuard, response: Resp) -> Self::Output;
}

/// A request stops counting as in flight when its response (head) arrives, and every response
/// counts as a success (only errors are failures): the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompleteOnResponse;

impl<Resp> TrackCompletion<Resp> for CompleteOnResponse {
    type Output = Resp;

    #[inline]
    fn track(&self, guard: InFlightGuard, response: Resp) -> Resp {
        guard.record_success();
        drop(guard);
        response
    }
}
