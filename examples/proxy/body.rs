//! The bodies the proxy streams: a client's request body on its way to a backend, and a
//! backend's response body on its way to the client, each with a timeout between frames.
//!
//! tower-http's `TimeoutBody` does the same timing, but it hides its inner body's size hint and
//! end of stream: a forwarded `Content-Length` body would then look unbounded to hyper, and an
//! empty response body would keep its in-flight guard until polled. These forward both.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower_lb::classify::CallerError;

/// Fails a body that waits longer than `timeout` for its next frame. The timer is armed only
/// while the body waits, so a body whose frames are ready costs no timer.
struct FrameTimeout {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl FrameTimeout {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: None,
            armed: false,
        }
    }

    /// A frame arrived: the next wait starts afresh.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// The body is waiting: whether it has waited too long (if not, `cx` is woken when it has).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// What a client did wrong while sending its request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// The body failed: malformed (a bad chunk), cut short, or the client went away.
    BadBody,
    /// The client sent nothing for longer than the body timeout.
    TimedOut,
}

impl ClientFault {
    fn code(self) -> u8 {
        match self {
            ClientFault::BadBody => 1,
            ClientFault::TimedOut => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(ClientFault::BadBody),
            2 => Some(ClientFault::TimedOut),
            _ => None,
        }
    }
}

/// What the proxy's handler and the forwarded body share about one client request body: the
/// body itself until a backend starts reading it (so a request whose connection was refused
/// can be sent again), and whether the client failed it.
pub(crate) struct ClientSide {
    unread: Mutex<Option<Body>>,
    fault: AtomicU8,
    waker: AtomicWaker,
}

impl ClientSide {
    pub(crate) fn new(body: Body) -> Arc<Self> {
        Arc::new(Self {
            unread: Mutex::new(Some(body)),
            fault: AtomicU8::new(0),
            waker: AtomicWaker::new(),
        })
    }

    /// Whether no backend has started reading the body yet.
    pub(crate) fn is_unread(&self) -> bool {
        self.unread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn take(&self) -> Option<Body> {
        self.unread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn record(&self, fault: ClientFault) {
        // Set before the failure reaches hyper, so anyone who sees the backend's side fail
        // afterwards also sees whose fault it was.
        self.fault.store(fault.code(), Ordering::SeqCst);
        self.waker.wake();
    }

    /// The client's fault, if it has made one.
    pub(crate) fn fault(&self) -> Option<ClientFault> {
        ClientFault::from_code(self.fault.load(Ordering::SeqCst))
    }

    /// Resolves when the client fails its body.
    pub(crate) fn faulted(&self) -> impl Future<Output = ClientFault> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(fault) = self.fault() {
                return Poll::Ready(fault);
            }
            self.waker.register(cx.waker());
            match self.fault() {
                Some(fault) => Poll::Ready(fault),
                None => Poll::Pending,
            }
        })
    }
}

/// A client's request body on its way to a backend.
///
/// Like tower-lb's `http::CallerBody`, its failures carry a `CallerError`; it also keeps the
/// body for a second try until a backend reads it, times pauses, and tells the handler which
/// fault the client made (400 or 408).
pub(crate) struct RequestBody {
    client: Option<Arc<ClientSide>>,
    /// Taken from `client` at the first read.
    body: Option<Body>,
    timer: FrameTimeout,
}

/// The client sent no part of its body within the body timeout.
#[derive(Debug)]
pub(crate) struct ClientBodyTimeout;

impl std::fmt::Display for ClientBodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client stopped sending its request body")
    }
}

impl std::error::Error for ClientBodyTimeout {}

/// An empty body (the health probes send these).
impl Default for RequestBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl RequestBody {
    /// A request without a body.
    pub(crate) fn empty() -> Self {
        Self {
            client: None,
            body: None,
            timer: FrameTimeout::new(Duration::ZERO),
        }
    }

    /// The body `client` holds (none for a request without a body).
    pub(crate) fn for_client(client: Option<&Arc<ClientSide>>, timeout: Duration) -> Self {
        match client {
            Some(client) => Self::new(client.clone(), timeout),
            None => Self::empty(),
        }
    }

    /// The body `client` holds, failing if the client pauses longer than `timeout`.
    pub(crate) fn new(client: Arc<ClientSide>, timeout: Duration) -> Self {
        Self {
            client: Some(client),
            body: None,
            timer: FrameTimeout::new(timeout),
        }
    }

    /// Runs `f` on the body wherever it is now; `None` for no body.
    fn peek<T>(&self, f: impl FnOnce(&Body) -> T) -> Option<T> {
        if let Some(body) = &self.body {
            return Some(f(body));
        }
        let client = self.client.as_ref()?;
        let unread = client.unread.lock().unwrap_or_else(PoisonError::into_inner);
        unread.as_ref().map(f)
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.body.is_none() {
            this.body = this.client.as_ref().and_then(|client| client.take());
        }
        let (Some(body), Some(client)) = (this.body.as_mut(), this.client.as_ref()) else {
            return Poll::Ready(None);
        };
        match Pin::new(body).poll_frame(cx) {
            // Marked as the caller's doing, so the balancer never counts it against the
            // backend even if the failure reaches it before the handler gives up the call.
            Poll::Ready(Some(Err(error))) => {
                client.record(ClientFault::BadBody);
                Poll::Ready(Some(Err(CallerError::new(error).into())))
            }
            Poll::Ready(frame) => {
                this.timer.disarm();
                Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)))
            }
            Poll::Pending if this.timer.expired(cx) => {
                client.record(ClientFault::TimedOut);
                Poll::Ready(Some(Err(CallerError::new(ClientBodyTimeout).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.peek(HttpBody::is_end_stream).unwrap_or(true)
    }

    fn size_hint(&self) -> SizeHint {
        self.peek(HttpBody::size_hint)
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

/// The backend sent no part of its response body within the upstream timeout.
#[derive(Debug)]
pub(crate) struct UpstreamBodyTimeout;

impl std::fmt::Display for UpstreamBodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the backend stopped sending its response body")
    }
}

impl std::error::Error for UpstreamBodyTimeout {}

/// A backend's response body, failing (against the backend) if it pauses longer than the
/// upstream timeout.
///
/// The body of a `101 Switching Protocols` answer never ends by itself: whoever holds it keeps
/// the request in flight, so the tunnel that follows counts against its backend until it
/// closes.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    timer: FrameTimeout,
    tunnel: bool,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration, tunnel: bool) -> Self {
        Self {
            inner,
            timer: FrameTimeout::new(timeout),
            tunnel,
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer.disarm();
                Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)))
            }
            Poll::Pending if this.timer.expired(cx) => {
                Poll::Ready(Some(Err(UpstreamBodyTimeout.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.tunnel && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A backend's response on its way to the client. If the client fails its request body while
/// the response streams, the backend's side is dropped unread: the backend's connection
/// breaking because of the client must not count against the backend.
pub(crate) struct DownstreamBody<B> {
    inner: Option<B>,
    client: Option<Arc<ClientSide>>,
}

impl<B> DownstreamBody<B> {
    pub(crate) fn new(inner: B, client: Option<Arc<ClientSide>>) -> Self {
        Self {
            inner: Some(inner),
            client,
        }
    }
}

impl<B> HttpBody for DownstreamBody<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(fault) = this.client.as_ref().and_then(|client| client.fault()) {
            if this.inner.take().is_some() {
                return Poll::Ready(Some(Err(format!("client fault: {fault:?}").into())));
            }
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}
