//! The endpoint service for one backend: tower-lb's `HttpEndpoint` with the upstream timeout,
//! and errors that say which backend failed and how.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::Service;
use tower_lb::http::HttpEndpoint;

use crate::body::{RequestBody, UpstreamBody};
use crate::forward::Forwarding;

/// One backend: requests go to its address over the shared pooled client, their headers
/// rewritten for it (the request's [`Forwarding`]); the response head must come within
/// `timeout`, and then each part of the body.
///
/// A timeout or a failure is an error of this service, so the balancer counts it against the
/// backend (outlier detection, failure-aware picks).
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    inner: HttpEndpoint<RequestBody>,
    addr: SocketAddr,
    timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(
        inner: HttpEndpoint<RequestBody>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Self {
        Self {
            inner,
            addr,
            timeout,
        }
    }
}

/// How a backend failed a request.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection could be made: nothing was sent, so the request may go elsewhere.
    Connect(hyper_util::client::legacy::Error),
    /// No response head within the upstream timeout.
    Timeout(Duration),
    /// The connection failed after the request was (perhaps partly) sent.
    Failed(hyper_util::client::legacy::Error),
}

/// A backend's failure, with the backend's address.
#[derive(Debug)]
pub(crate) struct UpstreamError {
    pub(crate) backend: SocketAddr,
    pub(crate) failure: Failure,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            Failure::Connect(_) => write!(f, "backend {}: cannot connect", self.backend),
            Failure::Timeout(after) => {
                write!(f, "backend {}: no response within {after:?}", self.backend)
            }
            Failure::Failed(_) => write!(f, "backend {}: request failed", self.backend),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            Failure::Connect(error) | Failure::Failed(error) => Some(error),
            Failure::Timeout(_) => None,
        }
    }
}

impl Service<Request<RequestBody>> for Upstream {
    type Response = Response<UpstreamBody>;
    type Error = UpstreamError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.inner.poll_ready(cx).map_err(|error| UpstreamError {
            backend: self.addr,
            failure: Failure::Failed(error),
        })
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> UpstreamFuture {
        if let Some(forwarding) = request.extensions_mut().remove::<Forwarding>() {
            forwarding.apply(&mut request);
        }
        UpstreamFuture {
            inner: tokio::time::timeout(self.timeout, self.inner.call(request)),
            backend: self.addr,
            timeout: self.timeout,
        }
    }
}

pin_project! {
    /// The response future of [`Upstream`].
    pub(crate) struct UpstreamFuture {
        #[pin]
        inner: tokio::time::Timeout<hyper_util::client::legacy::ResponseFuture>,
        backend: SocketAddr,
        timeout: Duration,
    }
}

impl Future for UpstreamFuture {
    type Output = Result<Response<UpstreamBody>, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let failure = match ready!(this.inner.poll(cx)) {
            Ok(Ok(response)) => {
                let timeout = *this.timeout;
                let tunnel = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                return Poll::Ready(Ok(
                    response.map(|body| UpstreamBody::new(body, timeout, tunnel))
                ));
            }
            Ok(Err(error)) if error.is_connect() => Failure::Connect(error),
            Ok(Err(error)) => Failure::Failed(error),
            Err(_) => Failure::Timeout(*this.timeout),
        };
        Poll::Ready(Err(UpstreamError {
            backend: *this.backend,
            failure,
        }))
    }
}
