//! An endpoint service that sends requests to one address over a shared hyper-util client.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connect as HyperConnect, HttpConnector};
use hyper_util::client::legacy::{Client, Error as ClientError, ResponseFuture};
use pin_project_lite::pin_project;
use tower::discover::Change;
use tower_service::Service;

use crate::error::ConfigError;

/// Sends each request to one address: it sets the request URI's scheme and authority (keeping
/// the path and query) and hands it to a shared hyper-util pooled client, so every endpoint of
/// a balancer reuses one connection pool.
///
/// It is always ready (the client queues for a connection itself). Cloning is cheap.
///
/// `B` is the request body type, `C` the client's connector.
pub struct HttpEndpoint<B, C = HttpConnector> {
    client: Client<C, B>,
    scheme: Scheme,
    authority: Authority,
}

impl<B, C: Clone> HttpEndpoint<B, C> {
    /// An endpoint at `addr` over plain HTTP.
    pub fn new(client: &Client<C, B>, addr: SocketAddr) -> Self {
        Self {
            client: client.clone(),
            scheme: Scheme::HTTP,
            authority: Authority::try_from(addr.to_string().as_str())
                .expect("a socket address is a valid authority"),
        }
    }

    /// An endpoint at a base URI such as `http://10.0.0.7:8080` or
    /// `https://api.internal:443` (https needs a TLS connector in the client). Only the scheme
    /// and authority may be given; anything else is rejected.
    pub fn from_uri(client: &Client<C, B>, uri: &str) -> Result<Self, ConfigError> {
        let parsed: Uri = uri
            .parse()
            .map_err(|e| ConfigError::new("endpoint uri", format!("{uri:?}: {e}")))?;
        let scheme = parsed.scheme().cloned().ok_or_else(|| {
            ConfigError::new(
                "endpoint uri",
                format!("{uri:?} has no scheme (http:// or https://)"),
            )
        })?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(ConfigError::new(
                "endpoint uri",
                format!("{uri:?}: scheme must be http or https"),
            ));
        }
        let authority = parsed
            .authority()
            .cloned()
            .ok_or_else(|| ConfigError::new("endpoint uri", format!("{uri:?} has no host")))?;
        if parsed.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(ConfigError::new(
                "endpoint uri",
                format!("{uri:?}: give only scheme and authority; requests keep their own path"),
            ));
        }
        Ok(Self {
            client: client.clone(),
            scheme,
            authority,
        })
    }

    /// The authority requests are sent to.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

impl<B, C> Service<Request<B>> for HttpEndpoint<B, C>
where
    C: HyperConnect + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Incoming>;
    type Error = ClientError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> ResponseFuture {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        self.client.request(request)
    }
}

impl<B, C: Clone> Clone for HttpEndpoint<B, C> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
        }
    }
}

impl<B, C> fmt::Debug for HttpEndpoint<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpEndpoint")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .finish()
    }
}

/// Turns a discovery stream of addresses (`Change<K, SocketAddr>`) into one of
/// [`HttpEndpoint`]s over `client`.
///
/// ```
/// use std::net::SocketAddr;
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower_lb::{discover, http::connect};
///
/// let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let addrs: [SocketAddr; 2] = ["127.0.0.1:8081".parse().unwrap(), "127.0.0.1:8082".parse().unwrap()];
/// let endpoints = connect(client, discover::fixed(addrs.map(|a| (a, a))));
/// # let _ = endpoints;
/// ```
pub fn connect<D, C, B>(client: Client<C, B>, addresses: D) -> Connect<D, C, B> {
    Connect { addresses, client }
}

pin_project! {
    /// The discovery stream [`connect`] returns.
    pub struct Connect<D, C, B> {
        #[pin]
        addresses: D,
        client: Client<C, B>,
    }
}

impl<D, K, E, C, B> Stream for Connect<D, C, B>
where
    D: Stream<Item = Result<Change<K, SocketAddr>, E>>,
    C: Clone,
{
    type Item = Result<Change<K, HttpEndpoint<B, C>>, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let change = std::task::ready!(this.addresses.poll_next(cx));
        Poll::Ready(change.map(|change| {
            change.map(|change| match change {
                Change::Insert(key, addr) => {
                    Change::Insert(key, HttpEndpoint::new(this.client, addr))
                }
                Change::Remove(key) => Change::Remove(key),
            })
        }))
    }
}

impl<D, C, B> fmt::Debug for Connect<D, C, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect").finish_non_exhaustive()
    }
}
