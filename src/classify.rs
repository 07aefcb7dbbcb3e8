//! What counts as an endpoint's failure.
//!
//! One place decides, per request, whether its outcome counts against the endpoint that served
//! it — the count outlier detection ejects by, that failure-aware strategies (P2C, least
//! connections) hold against an endpoint, and that stats and metrics report:
//!
//! - **An error from the endpoint's service** counts (a refused connection, a reset, a
//!   per-endpoint timeout) — unless it is the caller's doing: an error whose cause chain holds a
//!   [`CallerError`] never counts. With the `http` feature,
//!   [`http::CallerBody`](crate::http::CallerBody) wraps a request body so that its failure —
//!   a malformed upload, a client that went away mid-body — carries one.
//! - **A response** counts as the balancer's
//!   [`TrackCompletion`](crate::completion::TrackCompletion) classifies it. The default counts
//!   none; with the `http` feature [`TrackBody`](crate::http::TrackBody) takes a
//!   [`tower-http` classifier](https://docs.rs/tower-http/latest/tower_http/classify/index.html):
//!   by default 5xx for HTTP, and for gRPC the statuses that say the server failed, read from
//!   the headers of a trailers-only response or from the trailers when the stream ends.
//! - **A request the caller gave up on** — its response future or body dropped unfinished —
//!   does not count, unless it waited longer than
//!   [`BalanceLayer::count_abandoned_after`](crate::BalanceLayer::count_abandoned_after): a
//!   caller's own timeout around the balancer then blames a hanging endpoint too.

use std::error::Error as StdError;
use std::fmt;

use tower::BoxError;

/// An error the caller caused, not the endpoint: it never counts against the endpoint that
/// was serving the request.
///
/// Wrap the cause of such errors in it (a request body's failure, say), anywhere in the
/// endpoint error's cause chain: the balancer looks for it with [`is_caller_error`].
///
/// ```
/// use tower_lb::classify::{is_caller_error, CallerError};
///
/// let upload_failed = CallerError::new("the client's body ended early");
/// assert!(is_caller_error(&upload_failed));
/// ```
#[derive(Debug)]
pub struct CallerError {
    source: BoxError,
}

impl CallerError {
    /// Marks `source` as the caller's doing.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// The caller's error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for CallerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the caller's request failed: {}", self.source)
    }
}

impl StdError for CallerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Whether `error`, or anything in its cause chain, is a [`CallerError`].
pub fn is_caller_error(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    // Cause chains are short; the bound guards against a cycle.
    for _ in 0..64 {
        match next {
            Some(error) if error.is::<CallerError>() => return true,
            Some(error) => next = error.source(),
            None => return false,
        }
    }
    false
}

/// An error an endpoint's service returned, with the endpoint it came from: the balancer
/// returns endpoint errors wrapped in it, so a caller can log which endpoint failed. The
/// endpoint's own error is its [`source`](StdError::source) (and [`into_inner`](Self::into_inner)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower::{service_fn, BoxError, ServiceExt};
/// use tower_lb::classify::EndpointError;
/// use tower_lb::{discover, strategy::RoundRobin, Balance};
///
/// let down = service_fn(|_: ()| async { Err::<(), BoxError>("connection refused".into()) });
/// let balance = Balance::new(discover::fixed([("10.0.0.7:8080", down)]), RoundRobin::new());
/// let error = balance.oneshot(()).await.unwrap_err();
/// let error = error.downcast_ref::<EndpointError>().expect("from the endpoint");
/// assert_eq!(error.endpoint(), "\"10.0.0.7:8080\"");
/// assert_eq!(error.to_string(), "endpoint \"10.0.0.7:8080\": connection refused");
/// # }
/// ```
#[derive(Debug)]
pub struct EndpointError {
    endpoint: Box<str>,
    source: BoxError,
}

impl EndpointError {
    pub(crate) fn new(endpoint: &str, source: BoxError) -> Self {
        Self {
            endpoint: endpoint.into(),
            source,
        }
    }

    /// The endpoint's identity: its discovery key's `Debug` form.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint's own error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "endpoint {}: {}", self.endpoint, self.source)
    }
}

impl StdError for EndpointError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(BoxError);

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "wrapped: {}", self.0)
        }
    }

    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn a_caller_error_is_found_anywhere_in_the_chain() {
        let deep = Wrapper(Box::new(Wrapper(Box::new(CallerError::new("body ended")))));
        assert!(is_caller_error(&deep));
        let endpoint = EndpointError::new("a", Box::new(deep));
        assert!(is_caller_error(&endpoint));
        let plain = Wrapper("connection reset".into());
        assert!(!is_caller_error(&plain));
    }
}
