//! An endpoint service that sends requests to one address over a hyper-util client.

use std::fmt;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connect as HyperConnect, HttpConnector};
use hyper_util::client::legacy::{Client, Error as ClientError, ResponseFuture};
use tower_service::Service;

use crate::error::ConfigError;

/// Sends each request to one endpoint: it sets the request URI's scheme and authority
/// (keeping the path and query) and hands it to a hyper-util pooled client.
///
/// Two kinds, one type:
///
/// - **By address over a shared client** ([`new`](Self::new), [`from_uri`](Self::from_uri),
///   [`connect`](super::connect)): the authority is where the client connects, and every
///   endpoint of a balancer reuses the client's one connection pool (keyed by authority).
/// - **By name, pinned to an address** ([`MakeHttpEndpoint`](super::MakeHttpEndpoint)): the
///   authority is the name the address was found under (DNS), sent as `Host` or `:authority`
///   and used for TLS, while the endpoint's own client connects only to the address.
///
/// It is always ready (the client queues for a connection itself). Cloning is cheap.
///
/// `B` is the request body type, `C` the client's connector.
pub struct HttpEndpoint<B, C = HttpConnector> {
    client: Client<C, B>,
    scheme: Scheme,
    authority: Authority,
    addr: Option<SocketAddr>,
}

impl<B, C: Clone> HttpEndpoint<B, C> {
    /// An endpoint at `addr` over plain HTTP, sharing `client`.
    pub fn new(client: &Client<C, B>, addr: SocketAddr) -> Self {
        Self {
            client: client.clone(),
            scheme: Scheme::HTTP,
            authority: addr_authority(addr),
            addr: Some(addr),
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
        // `http` parses any digits (or none) after the colon; a port must be a number a socket
        // can use.
        if let Some((_, port)) = authority
            .as_str()
            .rsplit_once(':')
            .filter(|_| !authority.as_str().ends_with(']'))
        {
            if !matches!(port.parse::<u16>(), Ok(port) if port > 0) {
                return Err(ConfigError::new(
                    "endpoint uri",
                    format!("{uri:?}: the port {port:?} is not a number from 1 to 65535"),
                ));
            }
        }
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
            addr: None,
        })
    }
}

impl<B, C> HttpEndpoint<B, C> {
    /// An endpoint whose own `client` connects only to `addr` and whose requests carry
    /// `authority`.
    pub(super) fn pinned(
        client: Client<C, B>,
        scheme: Scheme,
        authority: Authority,
        addr: SocketAddr,
    ) -> Self {
        Self {
            client,
            scheme,
            authority,
            addr: Some(addr),
        }
    }

    /// The authority requests carry.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The address it connects to, if it was made for one; `None` for
    /// [`from_uri`](Self::from_uri), where the client resolves the authority.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

/// An address as a URI authority (`10.0.0.7:80`, `[2001:db8::7]:80`). An IPv6 scope id is left
/// out: a URI cannot carry one.
pub(super) fn addr_authority(mut addr: SocketAddr) -> Authority {
    if let SocketAddr::V6(v6) = &mut addr {
        v6.set_scope_id(0);
        v6.set_flowinfo(0);
    }
    Authority::try_from(addr.to_string()).expect("an ip:port without scope is a valid authority")
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
            addr: self.addr,
        }
    }
}

impl<B, C> fmt::Debug for HttpEndpoint<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpEndpoint")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("addr", &self.addr)
            .finish()
    }
}
