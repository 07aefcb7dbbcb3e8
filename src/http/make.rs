//! Making HTTP endpoints for discovered addresses: the shared client, or one that keeps names.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::Uri;
use hyper_util::client::legacy::connect::{Connect as HyperConnect, HttpConnector};
use hyper_util::client::legacy::{Builder, Client};
use tower_layer::{Identity, Layer};
use tower_service::Service;

use super::endpoint::{addr_authority, HttpEndpoint};
use crate::discover::{self, MakeEndpoint, Target};
use crate::error::ConfigError;
use crate::weight::Weighted;

/// Turns a discovery stream of addresses (`Change<K, SocketAddr>`) into one of
/// [`HttpEndpoint`]s over `client`, which all endpoints share (one connection pool, keyed by
/// address). Requests carry the address as their authority.
///
/// It is [`discover::connect`] with the client as the maker. For endpoints found by name (DNS)
/// that must keep it (`Host`, `:authority`, TLS server name), use [`MakeHttpEndpoint`].
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
pub fn connect<D, B, C>(client: Client<C, B>, addresses: D) -> discover::Connect<D, Client<C, B>> {
    discover::connect(addresses, client)
}

/// A hyper-util client makes an [`HttpEndpoint`] at each address it is given, sharing itself
/// (and so its connection pool) with every endpoint.
impl<B, C: Clone> MakeEndpoint<SocketAddr> for Client<C, B> {
    type Service = HttpEndpoint<B, C>;

    fn make_endpoint(&mut self, addr: SocketAddr) -> HttpEndpoint<B, C> {
        HttpEndpoint::new(self, addr)
    }
}

/// Makes an [`HttpEndpoint`] per discovered address that **connects to the address but keeps
/// the name** the address was found under: requests carry it as their authority (`Host` over
/// HTTP/1.1, `:authority` over HTTP/2), and a TLS connector ([`https`](Self::https)) sends it
/// as the server name (SNI) and checks the certificate against it.
///
/// Each endpoint gets its own client (built from the shared [`Builder`]) and so its own
/// connection pool: endpoints that share a name never share connections, so every request
/// goes to the address the balancer picked. The client's connector is a [`ConnectTo`] that
/// dials the endpoint's address whatever host the request names.
///
/// It makes endpoints from [`Target`]s (an address, its name, its weight: what `discover::dns`
/// yields) as [`Weighted`] services, so [`BalanceLayer::weighted`] uses the weights; and from
/// plain `SocketAddr`s (presented by their address, or by [`authority`](Self::authority)).
/// Use it with [`discover::connect`].
///
/// A request that already has a `Host` header keeps it (a reverse proxy forwarding its
/// client's `Host`, for example); one without gets the endpoint's.
///
/// ```
/// use std::net::SocketAddr;
/// use http_body_util::Empty;
/// use hyper::body::Bytes;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::Layer;
/// use tower_lb::discover::{self, Target};
/// use tower_lb::http::MakeHttpEndpoint;
/// use tower_lb::{strategy::WeightedRoundRobin, BalanceLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// // Where DNS said `api.internal:8080` is (in a real program: `discover::dns`).
/// let found = ["10.0.0.7:8080", "10.0.0.8:8080"].map(|a| {
///     let addr: SocketAddr = a.parse().unwrap();
///     (addr, Target::new(addr).with_authority("api.internal:8080").unwrap())
/// });
/// let make = MakeHttpEndpoint::<Empty<Bytes>>::new(Client::builder(TokioExecutor::new()));
/// let endpoints = discover::connect(discover::fixed(found), make);
/// let balance = BalanceLayer::new(WeightedRoundRobin::new()).weighted().layer(endpoints);
/// // Requests go to 10.0.0.7 or 10.0.0.8 with `Host: api.internal:8080`.
/// # let _ = balance;
/// # Ok(())
/// # }
/// ```
///
/// With TLS, give [`https`](Self::https) a layer that wraps the [`ConnectTo`] connector in
/// a TLS connector, such as hyper-rustls's `HttpsConnector`:
///
/// ```
/// use std::sync::Arc;
/// use http_body_util::Empty;
/// use hyper::body::Bytes;
/// use hyper_rustls::HttpsConnector;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::layer::layer_fn;
/// use tower_lb::discover::Target;
/// use tower_lb::http::{ConnectTo, MakeHttpEndpoint};
///
/// # fn main() -> Result<(), tower::BoxError> {
/// # let roots = rustls::RootCertStore::empty();
/// let provider = Arc::new(rustls::crypto::ring::default_provider());
/// let mut tls = rustls::ClientConfig::builder_with_provider(provider)
///     .with_safe_default_protocol_versions()?
///     .with_root_certificates(roots)
///     .with_no_client_auth();
/// tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
/// let tls = Arc::new(tls);
/// let make = MakeHttpEndpoint::<Empty<Bytes>>::new(Client::builder(TokioExecutor::new()))
///     .https(layer_fn(move |tcp: ConnectTo| HttpsConnector::from((tcp, tls.clone()))));
///
/// // TCP to 10.0.0.7:443; SNI, certificate check and :authority for api.internal.
/// let target = Target::new("10.0.0.7:443".parse()?).with_authority("api.internal")?;
/// let endpoint = make.endpoint(&target);
/// assert_eq!(endpoint.authority().as_str(), "api.internal");
/// # Ok(())
/// # }
/// ```
///
/// [`BalanceLayer::weighted`]: crate::BalanceLayer::weighted
pub struct MakeHttpEndpoint<B, L = Identity> {
    builder: Builder,
    connector: HttpConnector,
    tls: L,
    scheme: Scheme,
    authority: Option<Authority>,
    _body: PhantomData<fn(B)>,
}

impl<B> MakeHttpEndpoint<B> {
    /// Plain HTTP (`http://`, or HTTP/2 with prior knowledge if `builder` is
    /// `http2_only`), with clients built by `builder` over an `HttpConnector` with
    /// `TCP_NODELAY` set. Endpoints carry their target's name, or their address.
    pub fn new(builder: Builder) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            builder,
            connector,
            tls: Identity::new(),
            scheme: Scheme::HTTP,
            authority: None,
            _body: PhantomData,
        }
    }
}

impl<B, L> MakeHttpEndpoint<B, L> {
    /// Uses `connector`'s TCP settings (timeouts, keepalive, nodelay, local address) to connect.
    /// Its resolver is never used: every connection goes to the endpoint's address.
    pub fn http_connector(mut self, connector: HttpConnector) -> Self {
        self.connector = connector;
        self
    }

    /// Speaks `https://`: `tls` wraps each endpoint's [`ConnectTo`] in a TLS connector, which
    /// sees the request's URI (so the endpoint's name) and gets its TCP stream from the
    /// `ConnectTo` (so the endpoint's address).
    pub fn https<T>(self, tls: T) -> MakeHttpEndpoint<B, T> {
        MakeHttpEndpoint {
            builder: self.builder,
            connector: self.connector,
            tls,
            scheme: Scheme::HTTPS,
            authority: self.authority,
            _body: PhantomData,
        }
    }

    /// Presents every endpoint as `authority` (`host` or `host:port`), whatever name or address
    /// it was discovered by.
    pub fn authority(mut self, authority: &str) -> Result<Self, ConfigError> {
        crate::discover::check_authority(authority)?;
        let parsed = Authority::try_from(authority)
            .map_err(|e| ConfigError::new("authority", format!("{authority:?}: {e}")))?;
        self.authority = Some(parsed);
        Ok(self)
    }

    /// The endpoint for `target`: it connects to the target's address and presents the
    /// authority set with [`authority`](Self::authority), else the target's name, else its
    /// address.
    pub fn endpoint(&self, target: &Target) -> HttpEndpoint<B, L::Service>
    where
        L: Layer<ConnectTo>,
        L::Service: HyperConnect + Clone,
        B: hyper::body::Body + Send,
        B::Data: Send,
    {
        let addr = target.addr();
        let authority = self
            .authority
            .clone()
            .or_else(|| named_authority(target))
            .unwrap_or_else(|| addr_authority(addr));
        let connector = self.tls.layer(ConnectTo::new(self.connector.clone(), addr));
        let client = self.builder.build(connector);
        HttpEndpoint::pinned(client, self.scheme.clone(), authority, addr)
    }
}

/// The target's name as an authority. A `Target`'s authority was checked when it was set; one
/// the `http` crate still refuses is presented by its address instead (and logged).
fn named_authority(target: &Target) -> Option<Authority> {
    let name = target.authority()?;
    match Authority::try_from(name) {
        Ok(authority) => Some(authority),
        Err(error) => {
            tracing::warn!(name, %error, addr = %target.addr(), "name is not a valid HTTP authority; using the address");
            None
        }
    }
}

impl<B, L> MakeEndpoint<Target> for MakeHttpEndpoint<B, L>
where
    L: Layer<ConnectTo>,
    L::Service: HyperConnect + Clone,
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    type Service = Weighted<HttpEndpoint<B, L::Service>>;

    fn make_endpoint(&mut self, target: Target) -> Self::Service {
        Weighted::new(self.endpoint(&target), target.weight())
    }
}

impl<B, L> MakeEndpoint<SocketAddr> for MakeHttpEndpoint<B, L>
where
    L: Layer<ConnectTo>,
    L::Service: HyperConnect + Clone,
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    type Service = HttpEndpoint<B, L::Service>;

    fn make_endpoint(&mut self, addr: SocketAddr) -> Self::Service {
        self.endpoint(&Target::new(addr))
    }
}

impl<B, L: Clone> Clone for MakeHttpEndpoint<B, L> {
    fn clone(&self) -> Self {
        Self {
            builder: self.builder.clone(),
            connector: self.connector.clone(),
            tls: self.tls.clone(),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            _body: PhantomData,
        }
    }
}

impl<B, L> fmt::Debug for MakeHttpEndpoint<B, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeHttpEndpoint")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// A connector that always connects to one address, whatever host the URI names.
///
/// [`MakeHttpEndpoint`] gives one to each endpoint's client. A TLS connector wrapped around it
/// reads the server name from the request's URI — the endpoint's name — while the TCP
/// connection goes to the address. The inner connector (an `HttpConnector` by default) is
/// called with `http://{addr}`, so its settings apply and its resolver is never used.
///
/// ```
/// use hyper_util::client::legacy::connect::HttpConnector;
/// use tower_lb::http::ConnectTo;
///
/// let connector = ConnectTo::new(HttpConnector::new(), "10.0.0.7:8080".parse().unwrap());
/// assert_eq!(connector.addr().port(), 8080);
/// ```
#[derive(Clone, Debug)]
pub struct ConnectTo<C = HttpConnector> {
    inner: C,
    addr: SocketAddr,
    uri: Uri,
}

impl<C> ConnectTo<C> {
    /// Connects through `inner` to `addr`. An IPv6 scope id is not carried (a URI cannot hold
    /// one).
    pub fn new(inner: C, addr: SocketAddr) -> Self {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(addr_authority(addr))
            .path_and_query("/")
            .build()
            .expect("http://{ip}:{port}/ is a valid URI");
        Self { inner, addr, uri }
    }

    /// The address every connection goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl<C: Service<Uri>> Service<Uri> for ConnectTo<C> {
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _named: Uri) -> C::Future {
        self.inner.call(self.uri.clone())
    }
}
