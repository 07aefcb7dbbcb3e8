//! Drain: take an endpoint out of new picks and wait for its requests in flight to finish.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::endpoint::EndpointHandle;

/// Resolves when a drained endpoint has no request in flight; see
/// [`BalanceHandle::drain`](crate::BalanceHandle::drain).
///
/// No request is sent to the endpoint after the drain started: requests a `poll_ready`
/// reserved on it before go elsewhere, so once this resolves the endpoint gets nothing more.
#[must_use = "a drain future does nothing unless polled"]
pub struct Drain {
    handle: EndpointHandle,
}

impl Drain {
    /// Starts draining the endpoint of `handle`.
    pub(crate) fn start(handle: EndpointHandle) -> Self {
        handle.start_drain();
        Self { handle }
    }

    /// Requests still in flight to the endpoint.
    pub fn in_flight(&self) -> u64 {
        self.handle.in_flight()
    }
}

impl Future for Drain {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.handle.poll_drained(cx)
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
