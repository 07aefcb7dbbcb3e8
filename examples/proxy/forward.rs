//! Forwarding one request: the checks on what the client sent, the header rewriting, the
//! balancer call (retried once if no connection could be made), the error answers, and the
//! tunnel after a protocol upgrade.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use http_body::Body as _;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::{BoxError, ServiceExt};
use tower_lb::http::{PeerAddr, TrackedBody};

use crate::app::Balancer;
use crate::body::{ClientFault, ClientSide, DownstreamBody, RequestBody, UpstreamBody};
use crate::server::{reached, Lifecycle, Phase};
use crate::upstream::{Failure, UpstreamError};

/// What the handler needs: the balancer, whom to trust, the timeouts it applies itself, and
/// the server's lifecycle (tunnels follow it).
pub(crate) struct Forwarder {
    /// Cloned for every request, as an axum handler clones the services in its state.
    pub(crate) balancer: Balancer,
    /// Peers whose forwarding headers are believed.
    pub(crate) trusted: Arc<[IpNet]>,
    pub(crate) body_timeout: Duration,
    /// A tunnel through which nothing passed for this long is closed.
    pub(crate) tunnel_idle_timeout: Duration,
    pub(crate) lifecycle: Lifecycle,
}

impl Forwarder {
    fn is_trusted(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| self.trusted.iter().any(|net| net.contains(&ip)))
    }
}

/// How to rewrite a request's headers for the backend, once it is picked: who the client is,
/// whether its forwarding headers are believed, and the protocol it asked to switch to.
#[derive(Clone, Debug)]
pub(crate) struct Forwarding {
    pub(crate) client: Option<IpAddr>,
    pub(crate) trusted: bool,
    pub(crate) upgrade: Option<HeaderValue>,
}

impl Forwarding {
    /// Prepares `request` for the backend; see [`rewrite_request_headers`].
    pub(crate) fn apply<B>(&self, request: &mut http::Request<B>) {
        rewrite_request_headers(
            request.headers_mut(),
            self.client,
            self.trusted,
            self.upgrade.as_ref(),
        );
        // The backend connection is HTTP/1.1 whatever the client spoke.
        *request.version_mut() = Version::HTTP_11;
    }
}

/// Marks the second try of a request: hashing strategies ignore their key for it, so it is
/// spread like a request without one (the key's backend just refused a connection).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retrying;

type BackendResponse = http::Response<TrackedBody<UpstreamBody>>;

/// Why a request got no response from a backend.
enum Outcome {
    Client(ClientFault),
    Backend(BoxError),
}

/// Forwards one request to a backend and streams the response back.
pub(crate) async fn forward(State(proxy): State<Arc<Forwarder>>, mut request: Request) -> Response {
    if request.method() == Method::CONNECT {
        return method_not_allowed();
    }
    let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
    if let Err(problem) = settle_host(&mut request) {
        tracing::debug!(?peer, problem, "bad request");
        return plain(StatusCode::BAD_REQUEST, "400 Bad Request\n");
    }
    let upgrade = requested_upgrade(request.headers(), request.version());
    // The headers are rewritten for the backend after the balancer has picked it, so that
    // hashing sees them as the client sent them (as nginx's $http_x_forwarded_for does).
    request.extensions_mut().insert(Forwarding {
        client: peer.map(|p| p.ip()),
        trusted: proxy.is_trusted(peer.map(|p| p.ip())),
        upgrade: upgrade.clone(),
    });
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

    let (parts, body) = request.into_parts();
    let client = (!body.is_end_stream()).then(|| ClientSide::new(body));
    let replay = Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        peer,
        forwarding: parts.extensions.get::<Forwarding>().cloned(),
    };
    let body = RequestBody::for_client(client.as_ref(), proxy.body_timeout);
    let mut result = send(&proxy, Request::from_parts(parts, body), client.as_deref()).await;
    if let Err(Outcome::Backend(error)) = &result {
        if nothing_was_sent(&**error, client.as_deref()) {
            tracing::warn!(error = %chain(&**error), "trying another backend");
            let body = RequestBody::for_client(client.as_ref(), proxy.body_timeout);
            result = send(&proxy, replay.request(body), client.as_deref()).await;
        }
    }

    match result {
        Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            match client_upgrade {
                Some(client_upgrade) => tunnel(&proxy, response, client_upgrade),
                None => {
                    tracing::warn!("a backend switched protocols unasked");
                    plain(StatusCode::BAD_GATEWAY, "502 Bad Gateway\n")
                }
            }
        }
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop_headers(&mut parts.headers);
            Response::from_parts(parts, Body::new(DownstreamBody::new(body, client)))
        }
        Err(Outcome::Client(fault)) => client_fault(fault, peer),
        Err(Outcome::Backend(error)) => backend_failure(&*error, client.as_deref(), peer),
    }
}

/// What is kept of a request for a second try, in case no connection can be made for the first.
struct Replay {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    peer: Option<std::net::SocketAddr>,
    forwarding: Option<Forwarding>,
}

impl Replay {
    /// The request again, marked as a second try.
    fn request(self, body: RequestBody) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request.extensions_mut().insert(Retrying);
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(PeerAddr(peer));
        }
        if let Some(forwarding) = self.forwarding {
            request.extensions_mut().insert(forwarding);
        }
        request
    }
}

/// Whether the backend could not be reached at all (nothing was sent) and the client's body
/// is still unread: then the request may go to another backend.
fn nothing_was_sent(
    error: &(dyn std::error::Error + 'static),
    client: Option<&ClientSide>,
) -> bool {
    let refused = matches!(
        find::<UpstreamError>(error),
        Some(UpstreamError {
            failure: Failure::Connect(_),
            ..
        })
    );
    refused && client.is_none_or(ClientSide::is_unread)
}

/// Sends `request` through a fresh clone of the balancer (as an axum handler would), giving
/// up on it if the client fails its body first: dropping the call unfinished is neutral for
/// the backend, where an error would count against it.
async fn send(
    proxy: &Forwarder,
    request: Request<RequestBody>,
    client: Option<&ClientSide>,
) -> Result<BackendResponse, Outcome> {
    let call = proxy.balancer.clone().oneshot(request);
    let Some(client) = client else {
        return call.await.map_err(Outcome::Backend);
    };
    tokio::select! {
        biased;
        fault = client.faulted() => Err(Outcome::Client(fault)),
        result = call => result.map_err(Outcome::Backend),
    }
}

fn client_fault(fault: ClientFault, peer: Option<std::net::SocketAddr>) -> Response {
    tracing::debug!(?peer, ?fault, "the client failed its request body");
    match fault {
        ClientFault::BadBody => plain(StatusCode::BAD_REQUEST, "400 Bad Request\n"),
        ClientFault::TimedOut => plain(StatusCode::REQUEST_TIMEOUT, "408 Request Timeout\n"),
    }
}

/// 503 when the balancer has no backend to offer, 504 when the backend took too long, 502
/// when it failed. The details go to the log, not to the client.
fn backend_failure(
    error: &(dyn std::error::Error + 'static),
    client: Option<&ClientSide>,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    if let Some(fault) = client.and_then(ClientSide::fault) {
        return client_fault(fault, peer);
    }
    if let Some(tower_lb::Error::NoEndpoints) = find::<tower_lb::Error>(error) {
        tracing::warn!("no backend is available");
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: no backend is available\n",
        );
    }
    tracing::warn!(error = %chain(error), "backend failure");
    match find::<UpstreamError>(error) {
        Some(UpstreamError {
            failure: Failure::Timeout(_),
            ..
        }) => plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout\n"),
        _ => plain(StatusCode::BAD_GATEWAY, "502 Bad Gateway\n"),
    }
}

/// The first error of type `E` in `error`'s chain (the balancer wraps an endpoint's error in
/// one that names the endpoint).
fn find<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        next = error.source();
    }
    None
}

/// An error and its causes on one line, for the log.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// CONNECT asks a proxy to open a tunnel to any host: a reverse proxy does not.
fn method_not_allowed() -> Response {
    let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
    response.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"),
    );
    response
}

/// Answers the client's upgrade with the backend's `101`, then copies bytes both ways between
/// the two upgraded connections. The backend's response body travels with the tunnel: it holds
/// the request's in-flight guard, so the tunnel counts against its backend until it closes.
fn tunnel(proxy: &Forwarder, response: BackendResponse, client_upgrade: OnUpgrade) -> Response {
    let mut response = response;
    let backend_upgrade = hyper::upgrade::on(&mut response);
    let (mut parts, in_flight) = response.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    remove_hop_by_hop_headers(&mut parts.headers);
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut phase = proxy.lifecycle.follow();
    let idle_timeout = proxy.tunnel_idle_timeout;
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let (client, backend) = match tokio::try_join!(client_upgrade, backend_upgrade) {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        let activity = Arc::new(Activity::default());
        let mut client = Watched::new(TokioIo::new(client), &activity);
        let mut backend = Watched::new(TokioIo::new(backend), &activity);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                if let Err(error) = copied {
                    tracing::debug!(%error, "tunnel closed with an error");
                }
            }
            () = activity.idle_for(idle_timeout) => {
                tracing::debug!("closing a tunnel idle for {idle_timeout:?}");
            }
            () = reached(&mut phase, Phase::Stopped) => {}
        }
    });
    Response::from_parts(parts, Body::empty())
}

/// Checks and settles the request's `Host`.
///
/// - HTTP/1.1: exactly one valid `Host` (RFC 9112 §3.2); an absolute-form target's authority
///   replaces it (§3.2.2).
/// - HTTP/2: `Host` is made from `:authority`; one that names another host is an error
///   (RFC 9113 §8.3.1).
/// - HTTP/1.0 may omit it; an absolute-form target's authority is used if given.
pub(crate) fn settle_host<B>(request: &mut http::Request<B>) -> Result<(), &'static str> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if host
        .as_ref()
        .is_some_and(|host| !is_valid_host(host.as_bytes()))
    {
        return Err("invalid Host header");
    }
    let target = request
        .uri()
        .authority()
        .map(|authority| authority.as_str().to_owned());
    if let Some(target) = &target {
        if !is_valid_host(target.as_bytes()) {
            return Err("invalid authority in the request target");
        }
    }
    let settled = match (request.version(), target, host) {
        (Version::HTTP_2 | Version::HTTP_3, Some(target), Some(host)) => {
            if !target.eq_ignore_ascii_case(host.to_str().unwrap_or_default()) {
                return Err("Host and :authority differ");
            }
            return Ok(());
        }
        (Version::HTTP_2 | Version::HTTP_3, Some(target), None) => target,
        (Version::HTTP_2 | Version::HTTP_3, None, None) => {
            return Err("neither :authority nor Host");
        }
        (Version::HTTP_11, _, None) => return Err("no Host header"),
        (_, Some(target), _) => target,
        (_, None, _) => return Ok(()),
    };
    let value = HeaderValue::from_str(&settled).map_err(|_| "invalid authority")?;
    request.headers_mut().insert(header::HOST, value);
    Ok(())
}

/// A `Host` value: `host[:port]` with a valid port and no user information.
fn is_valid_host(value: &[u8]) -> bool {
    if value.is_empty() || value.contains(&b'@') {
        return false;
    }
    let Ok(authority) = http::uri::Authority::try_from(value) else {
        return false;
    };
    authority.host().len() == authority.as_str().len() || authority.port_u16().is_some()
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with `Upgrade`),
/// such as `websocket`. An upgrade to HTTP/2 (`h2c`) concerns this hop only and is ignored.
pub(crate) fn requested_upgrade(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || !connection_has(headers, "upgrade") {
        return None;
    }
    let protocol = headers.get(header::UPGRADE)?;
    let h2c = protocol.to_str().map_or(true, |p| {
        p.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c"))
    });
    (!h2c).then(|| protocol.clone())
}

/// Whether the `Connection` header lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    list_has(headers, header::CONNECTION, token)
}

/// Whether a comma-separated list header has `token` (parameters after `;` ignored).
fn list_has(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let item = item.split(';').next().unwrap_or_default();
            item.trim().eq_ignore_ascii_case(token)
        })
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 §7.6.1).
/// `Trailer` is not one of them: it announces the message's trailer fields, and hyper sends
/// only the trailers it announces.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers, `Upgrade`, and every header the `Connection` header names.
pub(crate) fn remove_hop_by_hop_headers(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
        headers.remove(name);
    }
}

/// Prepares a client's request headers for the backend:
///
/// - drops hop-by-hop headers, keeping an upgrade (`Connection: upgrade` and `Upgrade`) and
///   `TE: trailers` (the client accepts trailers, so the backend may send them);
/// - appends the client to `X-Forwarded-For` and `Forwarded` (keeping earlier hops);
/// - sets `X-Forwarded-Proto` and `X-Forwarded-Host`, replacing what the client sent unless the
///   client is a trusted proxy.
pub(crate) fn rewrite_request_headers(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    trusted: bool,
    upgrade: Option<&HeaderValue>,
) {
    let trailers = list_has(headers, header::TE, "trailers");
    remove_hop_by_hop_headers(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }

    let proto = HeaderName::from_static("x-forwarded-proto");
    if !trusted || !headers.contains_key(&proto) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
    let forwarded_host = HeaderName::from_static("x-forwarded-host");
    if !trusted || !headers.contains_key(&forwarded_host) {
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(forwarded_host, host),
            None => headers.remove(forwarded_host),
        };
    }

    let Some(client) = client else { return };
    let mut element = String::with_capacity(64);
    let _ = write!(element, "{client}");
    append_to_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &element,
    );
    element.clear();
    let _ = match client {
        IpAddr::V4(ip) => write!(element, "for={ip};proto=http"),
        IpAddr::V6(ip) => write!(element, "for=\"[{ip}]\";proto=http"),
    };
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        push_quoted_if_needed(&mut element, host);
    }
    append_to_list(headers, header::FORWARDED, &element);
}

/// Appends `item` to a comma-separated list header, merging repeated headers into one.
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut values = headers.get_all(&name).iter();
    let value = match (values.next(), values.next()) {
        // The usual case: the client is the first hop.
        (None, _) => HeaderValue::from_str(item),
        (Some(first), None) => {
            let mut list = Vec::with_capacity(first.len() + 2 + item.len());
            list.extend_from_slice(first.as_bytes());
            list.extend_from_slice(b", ");
            list.extend_from_slice(item.as_bytes());
            HeaderValue::from_bytes(&list)
        }
        (Some(_), Some(_)) => {
            let mut list: Vec<&str> = headers
                .get_all(&name)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .collect();
            list.push(item);
            HeaderValue::from_str(&list.join(", "))
        }
    };
    if let Ok(value) = value {
        headers.insert(name, value);
    }
}

/// Appends a `Forwarded` parameter value: a token as is, anything else quoted (RFC 7239 §4).
fn push_quoted_if_needed(out: &mut String, value: &str) {
    let token = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if token {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// When bytes last passed through a tunnel, either way.
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Resolves once nothing has passed for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if deadline <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One side of a tunnel, noting in [`Activity`] every read that brought bytes.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    fn new(io: T, activity: &Arc<Activity>) -> Self {
        Self {
            io,
            activity: activity.clone(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
