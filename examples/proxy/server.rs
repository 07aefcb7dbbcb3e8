//! The listening side: hyper-util's HTTP/1.1 + HTTP/2 server on each accepted connection, with
//! the header-read timeout, the idle timeout, the header size cap, and a graceful shutdown that
//! a deadline bounds.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_lb::http::PeerAddr;

/// How the proxy treats its clients' connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServerSettings {
    /// A client must send a whole request head within this. On HTTP/1.1 the wait for the next
    /// request on a kept-alive connection counts too (hyper starts the timer when it starts
    /// reading a head), so an idle HTTP/1.1 connection lasts at most this long.
    pub(crate) header_timeout: Duration,
    /// A connection with no request in progress for this long is closed (HTTP/2: GOAWAY).
    pub(crate) idle_timeout: Duration,
    /// The largest request head (request line and headers) accepted; 431 above it.
    pub(crate) max_header_size: usize,
    /// How long a graceful shutdown waits for requests and tunnels in progress.
    pub(crate) shutdown_timeout: Duration,
}

/// The smallest header size cap hyper accepts (its minimum read buffer).
pub(crate) const MIN_HEADER_SIZE: usize = 8 * 1024;

/// Where the server is in its life. Every connection and every tunnel holds a receiver while
/// it runs, so the shutdown knows when the last one has finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// No new connections; connections close once their requests finish.
    Draining,
    /// The drain deadline passed: everything still open is cut.
    Stopped,
}

/// The server's phase, shared with whoever must follow it (connections, tunnels).
#[derive(Clone, Debug)]
pub(crate) struct Lifecycle {
    phase: watch::Sender<Phase>,
    cut: Arc<Notify>,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
            cut: Arc::new(Notify::new()),
        }
    }

    /// Follows the phase; the shutdown waits until every follower is dropped.
    pub(crate) fn follow(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Cuts everything still open now (a second signal, say).
    pub(crate) fn stop(&self) {
        self.phase.send_replace(Phase::Stopped);
        self.cut.notify_one();
    }

    fn drain(&self) {
        self.phase.send_if_modified(|phase| {
            let changed = *phase == Phase::Serving;
            if changed {
                *phase = Phase::Draining;
            }
            changed
        });
    }
}

/// Resolves once `phase` reaches `at_least` (or its sender is gone).
pub(crate) async fn reached(phase: &mut watch::Receiver<Phase>, at_least: Phase) {
    let rank = |p: Phase| p as u8;
    let _ = phase.wait_for(|p| rank(*p) >= rank(at_least)).await;
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets requests
/// and tunnels in progress finish for at most `settings.shutdown_timeout`, and cuts what is
/// left.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ServerSettings,
    lifecycle: Lifecycle,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(connection_builder(&settings));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(
                        builder.clone(),
                        stream,
                        peer,
                        app.clone(),
                        settings.idle_timeout,
                        lifecycle.follow(),
                    ));
                }
                Err(error) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
            () = lifecycle.cut.notified() => break,
        }
    }
    drop(listener);
    lifecycle.drain();
    if lifecycle.phase.receiver_count() > 0 {
        tracing::info!(
            connections = connections.len(),
            "draining: waiting up to {:?} for requests in progress",
            settings.shutdown_timeout
        );
    }
    tokio::select! {
        // Every connection and tunnel has finished and dropped its follower.
        () = lifecycle.phase.closed() => {}
        () = tokio::time::sleep(settings.shutdown_timeout) => {
            tracing::warn!("shutdown deadline passed: closing what is still open");
        }
        () = lifecycle.cut.notified() => {}
    }
    lifecycle.stop();
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

fn connection_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        // Requests keep hyper's cap of 100 headers (431 above it): hyper parses up to 100 on
        // the stack, and a larger cap costs a heap array per request.
        .max_buf_size(settings.max_header_size.max(MIN_HEADER_SIZE));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_size).unwrap_or(u32::MAX));
    builder
}

/// Serves one client connection until it closes, goes idle for too long, or the server stops.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    idle_timeout: Duration,
    mut phase: watch::Receiver<Phase>,
) {
    let activity = Arc::new(Activity::new());
    let service = ConnectionService {
        app,
        peer,
        activity: activity.clone(),
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
                return;
            }
            () = idle.as_mut(), if !closing => match activity.idle_deadline(idle_timeout) {
                Some(deadline) if deadline <= Instant::now() => {
                    tracing::debug!(%peer, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                Some(deadline) => idle.as_mut().reset(deadline),
                None => idle.as_mut().reset(Instant::now() + idle_timeout),
            },
            changed = phase.changed() => match changed.map(|()| *phase.borrow()) {
                Ok(Phase::Serving) => {}
                Ok(Phase::Draining) => {
                    if !closing {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
                Ok(Phase::Stopped) | Err(_) => return,
            },
        }
    }
}

/// Whether a connection has requests in progress, and since when it has had none.
struct Activity {
    start: Instant,
    in_progress: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_progress: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        InProgress(self.clone())
    }

    /// When the connection will have been idle for `idle_timeout`; `None` while it is busy.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.in_progress.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.start + since + idle_timeout)
    }
}

/// One request in progress on a connection, until its response body has been sent or dropped.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        // The time first, then the count: whoever sees no request in progress sees this time.
        let elapsed = self.0.start.elapsed().as_millis();
        self.0
            .idle_since_ms
            .store(u64::try_from(elapsed).unwrap_or(u64::MAX), Ordering::SeqCst);
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router as one connection's service: every request learns its client's address, and
/// counts as in progress on the connection until its response has been sent.
#[derive(Clone)]
struct ConnectionService {
    app: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<ConnectionBody>;
    type Error = std::convert::Infallible;
    type Future = ConnectionFuture;

    fn call(&self, mut request: Request<Incoming>) -> ConnectionFuture {
        request.extensions_mut().insert(PeerAddr(self.peer));
        ConnectionFuture {
            in_progress: Some(self.activity.begin()),
            inner: self.app.clone().oneshot(request),
        }
    }
}

pin_project! {
    struct ConnectionFuture {
        #[pin]
        inner: Oneshot<Router, Request<Incoming>>,
        in_progress: Option<InProgress>,
    }
}

impl Future for ConnectionFuture {
    type Output = Result<Response<ConnectionBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let in_progress = this.in_progress.take();
        Poll::Ready(Ok(response.map(|body| ConnectionBody {
            inner: body,
            _in_progress: in_progress,
        })))
    }
}

/// A response body that keeps its request in progress on the connection while it is sent.
struct ConnectionBody {
    inner: Body,
    _in_progress: Option<InProgress>,
}

impl HttpBody for ConnectionBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
