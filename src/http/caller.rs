//! Request bodies whose failures are the caller's, never the endpoint's.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::classify::CallerError;

pin_project! {
    /// A request body whose errors are the caller's doing: each is wrapped in a
    /// [`CallerError`], so when the endpoint's client fails because the body failed — a
    /// malformed chunked upload, a client that went away mid-body — the failure is not counted
    /// against the endpoint (see [`classify`](crate::classify)).
    ///
    /// A reverse proxy wraps the bodies of the requests it forwards in it:
    ///
    /// ```
    /// use tower_lb::http::CallerBody;
    ///
    /// fn forward(request: http::Request<hyper::body::Incoming>) -> http::Request<CallerBody<hyper::body::Incoming>> {
    ///     request.map(CallerBody::new)
    /// }
    /// # let _ = forward;
    /// ```
    #[derive(Debug)]
    pub struct CallerBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> CallerBody<B> {
    /// Wraps a request body.
    pub fn new(inner: B) -> Self {
        Self { inner }
    }

    /// The inner body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for CallerBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = CallerError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, CallerError>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(CallerError::new)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
