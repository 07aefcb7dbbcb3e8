//! The reverse proxy itself: configuration, the balancer, the proxy handler, header rewriting
//! and the admin stats. `main.rs` parses the command line and runs it; `tests/proxy.rs`
//! includes this file and runs it in-process on loopback.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{Stream, TryStreamExt};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::discover::Change;
use tower::{BoxError, Layer, Service};
use tower_lb::discover::dns::DnsBuilder;
use tower_lb::discover::Target;
use tower_lb::health::OutlierDetection;
use tower_lb::http::{ClientIp, CookieKey, HeaderKey, HttpEndpoint, PathKey, PeerAddr};
use tower_lb::http::{TrackBody, TrackedBody};
use tower_lb::key::{KeyHasher, Keyed};
use tower_lb::strategy::Swappable;
use tower_lb::strategy::WeightedRoundRobin;
use tower_lb::strategy::{
    ConsistentHash, KeyFallback, LeastConnections, PowerOfTwoChoices, Random,
};
use tower_lb::weight::{Weight, Weighted};
use tower_lb::{discover, Balance, BalanceHandle, BalanceLayer, ConfigError, EndpointStatus};
use tower_lb::{
    health::{HealthCheckBuilder, HealthStatus},
    http::HttpProbe,
};
use tower_lb::{key::RequestKey, strategy::RoundRobin};

/// Everything the proxy needs to run.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The backends at fixed addresses, each with its weight (1 unless given).
    pub(crate) backends: Vec<Backend>,
    /// The backends found by DNS names, re-resolved as their TTLs run out.
    pub(crate) dns: DnsBackends,
    /// How requests are spread over the backends.
    pub(crate) strategy: StrategySpec,
    /// The path of the JSON stats page (served by the proxy, not forwarded).
    pub(crate) admin_path: String,
    /// When a backend is ejected for failing (passive health checking).
    pub(crate) outlier: OutlierDetection,
    /// Active health checks, if any: backends whose probes fail are taken out of rotation.
    pub(crate) health: Option<ActiveHealth>,
}

/// Active health checking: `GET path` on every backend, on a schedule.
#[derive(Clone, Debug)]
pub(crate) struct ActiveHealth {
    /// The probed path, such as `/healthz`; a 2xx or 3xx answer is healthy.
    pub(crate) path: String,
    /// Interval, timeout, rise and fall (HAProxy's defaults: 2 s, 1 s, 2, 3).
    pub(crate) settings: HealthCheckBuilder,
}

impl ActiveHealth {
    /// Probes `path` with the default settings.
    pub(crate) fn new(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            settings: HealthCheckBuilder::new(),
        }
    }
}

impl Config {
    /// Round-robin over `backends`, stats on `/_lb/stats`, the default outlier detection
    /// (5 failures in a row eject a backend for 30 s, longer if it keeps failing), no active
    /// health checks.
    pub(crate) fn new(backends: Vec<Backend>) -> Self {
        Self {
            backends,
            dns: DnsBackends::default(),
            strategy: StrategySpec::parse("round-robin").expect("a known strategy"),
            admin_path: "/_lb/stats".to_owned(),
            outlier: OutlierDetection::new(),
            health: None,
        }
    }
}

/// A backend address and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: Weight,
}

/// A `--backend` value: a fixed address, or a DNS name re-resolved as its TTL runs out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BackendSpec {
    Addr(Backend),
    /// `host:port`, and the weight of each of its addresses.
    Name(String, Weight),
}

impl Backend {
    /// Parses `ADDR[=WEIGHT]`, where `ADDR` is `ip:port` (a fixed backend) or `host:port` (a
    /// DNS name: every address it resolves to is a backend, re-resolved as the TTL runs out) and
    /// `WEIGHT` a whole number from 1.
    pub(crate) fn parse(spec: &str) -> Result<BackendSpec, String> {
        let (addr, weight) = match spec.rsplit_once('=') {
            Some((addr, weight)) => {
                let weight = weight
                    .parse::<u32>()
                    .map_err(|_| format!("backend {spec:?}: weight {weight:?} is not a number"))
                    .and_then(|w| Weight::new(w).map_err(|e| format!("backend {spec:?}: {e}")))?;
                (addr, weight)
            }
            None => (spec, Weight::ONE),
        };
        if let Ok(addr) = addr.parse::<SocketAddr>() {
            return Ok(BackendSpec::Addr(Self { addr, weight }));
        }
        DnsBuilder::new()
            .name(addr)
            .map_err(|e| format!("backend {spec:?}: {addr:?} is not a host:port address ({e})"))?;
        Ok(BackendSpec::Name(addr.to_owned(), weight))
    }
}

/// Backends found by DNS: `--backend NAME:PORT` and `--backend-srv NAME`.
#[derive(Clone, Debug, Default)]
pub(crate) struct DnsBackends {
    /// `host:port` names with the weight of each of their addresses.
    pub(crate) names: Vec<(String, Weight)>,
    /// SRV names; their records give ports and weights.
    pub(crate) srv: Vec<String>,
    /// The resolver's settings (servers, timing); the system's and the defaults if `None`.
    pub(crate) resolver: Option<DnsBuilder>,
}

impl DnsBackends {
    pub(crate) fn is_empty(&self) -> bool {
        self.names.is_empty() && self.srv.is_empty()
    }

    /// The discovery stream of every name, or `None` without names.
    fn discover(&self) -> Result<Option<Candidates>, ConfigError> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut builder = self.resolver.clone().unwrap_or_default();
        for (name, _) in &self.names {
            builder = builder.name(name)?;
        }
        for name in &self.srv {
            builder = builder.srv(name)?;
        }
        Ok(Some(Box::pin(builder.build()?.map_err(BoxError::from))))
    }
}

/// The strategies `--strategy` accepts, with what they do. `KEY` is `ip` (the client's IP
/// address), `header:NAME`, `cookie:NAME` or `path`.
pub(crate) const STRATEGIES: &[(&str, &str)] = &[
    ("round-robin", "each backend in turn"),
    (
        "weighted-round-robin",
        "in turn, in proportion to the weights",
    ),
    (
        "least-connections",
        "the backend with the fewest requests in flight",
    ),
    (
        "weighted-least-connections",
        "the fewest requests in flight per unit of weight",
    ),
    ("random", "uniformly at random"),
    ("weighted-random", "at random, in proportion to the weights"),
    ("p2c", "the less busy of two random backends"),
    (
        "p2c-peak-ewma",
        "the faster of two random backends (PeakEWMA)",
    ),
    ("hash-KEY", "the same KEY to the same backend (hash ring)"),
    ("nginx-hash-KEY", "as nginx's `hash KEY consistent`"),
    (
        "maglev-KEY",
        "the same KEY to the same backend (Maglev table)",
    ),
];

/// A parsed `--strategy` value: the algorithm, and for hashing strategies what is hashed.
#[derive(Clone, Debug)]
pub(crate) struct StrategySpec {
    name: String,
    algorithm: Algorithm,
    hash_on: HashOn,
}

#[derive(Clone, Debug)]
enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    WeightedLeastConnections,
    Random,
    WeightedRandom,
    PowerOfTwoChoices,
    PeakEwma,
    ConsistentHash(ConsistentHash),
}

impl StrategySpec {
    /// Parses a strategy name from [`STRATEGIES`]; anything else is rejected with the list.
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        let algorithm = match name {
            "round-robin" => Algorithm::RoundRobin,
            "weighted-round-robin" => Algorithm::WeightedRoundRobin,
            "least-connections" => Algorithm::LeastConnections,
            "weighted-least-connections" => Algorithm::WeightedLeastConnections,
            "random" => Algorithm::Random,
            "weighted-random" => Algorithm::WeightedRandom,
            "p2c" => Algorithm::PowerOfTwoChoices,
            "p2c-peak-ewma" => Algorithm::PeakEwma,
            _ => return Self::parse_hash(name),
        };
        Ok(Self {
            name: name.to_owned(),
            algorithm,
            hash_on: HashOn::Nothing,
        })
    }

    /// `hash-KEY`, `nginx-hash-KEY` or `maglev-KEY`.
    fn parse_hash(name: &str) -> Result<Self, String> {
        let tables = [
            ("hash-", ConsistentHash::ring()),
            ("nginx-hash-", ConsistentHash::ring_nginx()),
            ("maglev-", ConsistentHash::maglev()),
        ];
        let (key, table) = tables
            .into_iter()
            .find_map(|(prefix, table)| Some((name.strip_prefix(prefix)?, table)))
            .ok_or_else(|| unknown_strategy(name))?;
        Ok(Self {
            name: name.to_owned(),
            // A request without the key goes to each backend in turn, as with nginx.
            algorithm: Algorithm::ConsistentHash(table.fallback(KeyFallback::RoundRobin)),
            hash_on: HashOn::parse(key)?,
        })
    }

    /// Caps each backend's requests in flight at `factor` times the average (hashing
    /// strategies only; `factor` at least 1).
    pub(crate) fn bounded_load(mut self, factor: f64) -> Result<Self, String> {
        let Algorithm::ConsistentHash(hash) = self.algorithm else {
            return Err(format!(
                "a bounded load applies to hashing strategies, not to {}",
                self.name
            ));
        };
        let bounded = hash.bounded_load(factor).map_err(|e| e.to_string())?;
        self.algorithm = Algorithm::ConsistentHash(bounded);
        Ok(self)
    }

    /// The name it was parsed from.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn strategy(&self) -> Swappable {
        match &self.algorithm {
            Algorithm::RoundRobin => Swappable::new(RoundRobin::new()),
            Algorithm::WeightedRoundRobin => Swappable::new(WeightedRoundRobin::new()),
            Algorithm::LeastConnections => Swappable::new(LeastConnections::new()),
            Algorithm::WeightedLeastConnections => Swappable::new(LeastConnections::weighted()),
            Algorithm::Random => Swappable::new(Random::new()),
            Algorithm::WeightedRandom => Swappable::new(Random::weighted()),
            Algorithm::PowerOfTwoChoices => Swappable::new(PowerOfTwoChoices::new()),
            Algorithm::PeakEwma => Swappable::new(PowerOfTwoChoices::peak_ewma()),
            Algorithm::ConsistentHash(hash) => Swappable::new(hash.clone()),
        }
    }
}

fn unknown_strategy(name: &str) -> String {
    let names: Vec<&str> = STRATEGIES.iter().map(|(name, _)| *name).collect();
    format!(
        "unknown strategy {name:?}; supported: {} (KEY: ip, header:NAME, cookie:NAME, path)",
        names.join(", ")
    )
}

/// What a hashing strategy hashes, parsed from the `KEY` part of its name.
#[derive(Clone, Debug)]
enum HashOn {
    /// Not a hashing strategy.
    Nothing,
    ClientIp(ClientIp),
    Header(HeaderKey),
    Cookie(CookieKey),
    Path,
}

impl HashOn {
    fn parse(key: &str) -> Result<Self, String> {
        let parsed = match key.split_once(':') {
            None if key == "ip" => Ok(HashOn::ClientIp(ClientIp::new())),
            None if key == "path" => Ok(HashOn::Path),
            Some(("header", name)) => HeaderKey::new(name).map(HashOn::Header),
            Some(("cookie", name)) => CookieKey::new(name).map(HashOn::Cookie),
            _ => {
                return Err(format!(
                    "unknown hash key {key:?}; use ip, header:NAME, cookie:NAME or path"
                ))
            }
        };
        parsed.map_err(|e| e.to_string())
    }
}

impl<B> RequestKey<axum::http::Request<B>> for HashOn {
    fn hash_key(&self, request: &axum::http::Request<B>, hasher: &mut KeyHasher) -> bool {
        match self {
            HashOn::Nothing => false,
            HashOn::ClientIp(key) => key.hash_key(request, hasher),
            HashOn::Header(key) => key.hash_key(request, hasher),
            HashOn::Cookie(key) => key.hash_key(request, hasher),
            HashOn::Path => PathKey.hash_key(request, hasher),
        }
    }
}

/// Checks that the admin path is one the router accepts as a plain path.
pub(crate) fn check_admin_path(path: &str) -> Result<(), String> {
    let plain = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/-._~".contains(c));
    if !path.starts_with('/') || !plain {
        return Err(format!(
            "admin path {path:?} must start with '/' and use only letters, digits and - . _ ~"
        ));
    }
    Ok(())
}

type Endpoint = Weighted<HttpEndpoint<Body>>;
type Endpoints = Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, Endpoint>, BoxError>> + Send>>;
type Candidates = Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, Target>, BoxError>> + Send>>;
// `Swappable` lets the strategy be chosen at run time (from the command line) behind one type;
// it costs one virtual call per pick.
type ProxyBalance = Balance<SocketAddr, HttpEndpoint<Body>, Swappable, Keyed<HashOn>, TrackBody>;

/// Builds the balancer over the configured backends (fixed, and found by DNS), behind active
/// health checks if configured; returns it with the health checks' view of the backends.
fn build_balancer(
    config: &Config,
) -> Result<(ProxyBalance, Option<HealthStatus<SocketAddr>>), ConfigError> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    // One client, so one connection pool, for every backend and every probe. Requests keep
    // their client's `Host`, so backends found by name need no name of their own.
    let client = Client::builder(TokioExecutor::new()).build(connector);

    let fixed = discover::fixed(
        config
            .backends
            .iter()
            .map(|b| (b.addr, Target::new(b.addr).with_weight(b.weight))),
    );
    let mut candidates: Candidates = Box::pin(fixed.map_err(BoxError::from));
    if let Some(found) = config.dns.discover()? {
        candidates = Box::pin(futures::stream::select(candidates, found));
    }
    let (candidates, health): (Candidates, _) = match &config.health {
        None => (candidates, None),
        Some(active) => {
            let probe = HttpProbe::new(&client, &active.path)?;
            let checked = active.settings.build(candidates, probe)?;
            let status = checked.status();
            (Box::pin(checked.map_err(BoxError::from)), Some(status))
        }
    };
    // `--backend NAME:PORT=WEIGHT` weighs every address of the name (a target carries its name
    // as `host:port`, without a final dot); SRV records carry their own weights.
    let name_weights: HashMap<String, Weight> = config
        .dns
        .names
        .iter()
        .map(|(name, weight)| match name.rsplit_once(':') {
            Some((host, port)) => (format!("{}:{port}", host.trim_end_matches('.')), *weight),
            None => (name.clone(), *weight),
        })
        .collect();
    let endpoints = discover::connect(candidates, move |target: Target| {
        let weight = target
            .authority()
            .and_then(|name| name_weights.get(name))
            .copied()
            .unwrap_or(target.weight());
        Weighted::new(HttpEndpoint::new(&client, target.addr()), weight)
    });

    let balance = BalanceLayer::new(config.strategy.strategy())
        .key(config.strategy.hash_on.clone())
        .weighted()
        // A response counts as in flight until its body has streamed to the client.
        .track_completion(TrackBody::end_of_stream())
        .outlier_detection(config.outlier)?
        .layer(Box::pin(endpoints) as Endpoints);
    Ok((balance, health))
}

/// A few long-lived clones of the balancer, each lent to one request at a time for the
/// instant of `poll_ready` + `call`.
///
/// Why not a fresh clone per request (as axum's `State` would hand out): a clone keeps its own
/// rotation cursor (starting at random) and its own copies of the endpoint services, so a
/// clone per request would make round-robin random and copy every endpoint per request.
/// One clone per core keeps contention on the short lock negligible.
struct Balancers {
    clones: Box<[Mutex<ProxyBalance>]>,
    next: AtomicUsize,
}

impl Balancers {
    fn new(balance: ProxyBalance) -> Self {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            clones: (0..count).map(|_| Mutex::new(balance.clone())).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Sends `request` to a backend; the response body streams from it.
    async fn send(
        &self,
        request: Request,
    ) -> Result<Response<TrackedBody<hyper::body::Incoming>>, BoxError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.clones.len();
        let balance = &self.clones[slot];
        let mut request = Some(request);
        // The lock is never held across an await: readiness and the call happen in one poll.
        let response = poll_fn(|cx| {
            let mut balance = balance.lock().unwrap_or_else(PoisonError::into_inner);
            std::task::ready!(balance.poll_ready(cx))?;
            let request = request.take().expect("not polled again after Ready");
            Poll::Ready(Ok::<_, BoxError>(balance.call(request)))
        })
        .await?;
        response.await
    }
}

#[derive(Clone)]
struct AppState {
    balancers: Arc<Balancers>,
    handle: BalanceHandle<SocketAddr>,
    health: Option<HealthStatus<SocketAddr>>,
    backends: Arc<[SocketAddr]>,
    strategy: Arc<str>,
}

/// The proxy as an axum router: the admin stats page, and every other request forwarded.
/// Fails if the configuration is invalid (such as a bad health check path).
///
/// Serve it with [`serve`], which gives the proxy each client's address.
pub(crate) fn build_app(config: &Config) -> Result<Router, ConfigError> {
    let (balance, health) = build_balancer(config)?;
    let state = AppState {
        handle: balance.handle(),
        balancers: Arc::new(Balancers::new(balance)),
        health,
        backends: config.backends.iter().map(|b| b.addr).collect(),
        strategy: config.strategy.name().into(),
    };
    Ok(Router::new()
        .route(&config.admin_path, get(admin_stats))
        .fallback(proxy)
        .with_state(state))
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting connections and
/// finishes the requests in progress (graceful shutdown).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        // Hands each request its client's address (`ConnectInfo`).
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Forwards one request to a backend and streams the response back.
async fn proxy(State(state): State<AppState>, mut request: Request) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    rewrite_request_headers(request.headers_mut(), client.map(|c| c.ip()));
    if let Some(client) = client {
        // `ClientIp` (hashing by client address) reads the peer from here.
        request.extensions_mut().insert(PeerAddr(client));
    }
    // The backend connection is HTTP/1.1 whatever the client spoke.
    *request.version_mut() = Version::HTTP_11;

    match state.balancers.send(request).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop_headers(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => error_response(&*error),
    }
}

/// 503 when the balancer has no backend to offer, 502 when the backend failed.
fn error_response(error: &(dyn std::error::Error + 'static)) -> Response {
    if let Some(tower_lb::Error::NoEndpoints) = error.downcast_ref::<tower_lb::Error>() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: no backend is available\n",
        )
            .into_response();
    }
    let mut message = format!("502 Bad Gateway: the backend failed: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message.push('\n');
    (StatusCode::BAD_GATEWAY, message).into_response()
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and every header the `Connection` header names.
pub(crate) fn remove_hop_by_hop_headers(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Prepares a client's request headers for the backend: drops hop-by-hop headers and adds
/// the client to `X-Forwarded-For` and `Forwarded` (keeping what earlier proxies wrote).
pub(crate) fn rewrite_request_headers(headers: &mut HeaderMap, client: Option<IpAddr>) {
    remove_hop_by_hop_headers(headers);
    let Some(client) = client else { return };
    append_to_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &client.to_string(),
    );

    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut element = format!("for={node};proto=http");
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        element.push_str(&format!(";host={}", quote_if_needed(host)));
    }
    append_to_list(headers, header::FORWARDED, &element);
}

/// Appends `item` to a comma-separated list header, merging repeated headers into one.
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut list: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    list.push(item);
    if let Ok(value) = HeaderValue::from_str(&list.join(", ")) {
        headers.insert(name, value);
    }
}

/// A `Forwarded` parameter value: a token as is, anything else quoted (RFC 7239 §4).
fn quote_if_needed(value: &str) -> String {
    let token = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if token {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The balancer's stats as JSON.
async fn admin_stats(State(state): State<AppState>) -> Response {
    let Ok(stats) = state.handle.stats() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the balancer is gone\n").into_response();
    };
    let backends: Vec<serde_json::Value> = stats
        .endpoints
        .iter()
        .map(|backend| {
            serde_json::json!({
                "address": backend.key.to_string(),
                "status": status_name(backend.status),
                "weight": backend.weight,
                "effective_weight": backend.effective_weight,
                "in_flight": backend.in_flight,
                "picks": backend.picks,
                "failures": backend.failures,
                "consecutive_failures": backend.consecutive_failures,
                "ejections": backend.ejections,
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "strategy": &*state.strategy,
        "available": stats.available(),
        "in_flight": stats.in_flight(),
        "picks": stats.picks(),
        "panic_mode": stats.panic_mode,
        "discovery_errors": stats.discovery_errors,
        "backends": backends,
    });
    if let Some(health) = &state.health {
        // Every configured backend, including those the health checks took out, then those
        // found by DNS.
        let mut addrs = state.backends.to_vec();
        let found = health.all().into_iter().map(|(addr, _)| addr);
        let found: Vec<SocketAddr> = found.filter(|addr| !addrs.contains(addr)).collect();
        addrs.extend(found);
        let checks: Vec<serde_json::Value> = addrs
            .iter()
            .map(|addr| match health.get(addr) {
                Some(health) => serde_json::json!({
                    "address": addr.to_string(),
                    "healthy": health.healthy,
                    "probes": health.probes,
                    "consecutive_failures": health.consecutive_failures,
                    "last_error": health.last_error.map(|e| e.to_string()),
                }),
                None => serde_json::json!({ "address": addr.to_string(), "healthy": null }),
            })
            .collect();
        body["health_checks"] = checks.into();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
        .into_response()
}

fn status_name(status: EndpointStatus) -> String {
    match status {
        EndpointStatus::Active => "active".into(),
        EndpointStatus::Broken => "broken".into(),
        EndpointStatus::Ejected => "ejected".into(),
        EndpointStatus::SlowStart => "slow-start".into(),
        EndpointStatus::Draining => "draining".into(),
        EndpointStatus::Removed => "removed".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}
