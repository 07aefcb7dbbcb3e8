//! The reverse proxy's parts put together: configuration, the balancer, the public router
//! and the admin router. `main.rs` parses the command line and runs it; `tests/proxy.rs`
//! includes these files and runs the proxy in-process on loopback.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{Stream, TryStreamExt};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tower::discover::Change;
use tower::{BoxError, Layer};
use tower_lb::discover::dns::DnsBuilder;
use tower_lb::discover::Target;
use tower_lb::health::{HealthCheckBuilder, HealthStatus, OutlierDetection};
use tower_lb::http::{ClientIp, CookieKey, HeaderKey, HttpEndpoint, HttpProbe, PathKey, TrackBody};
use tower_lb::key::{KeyHasher, Keyed, RequestKey};
use tower_lb::strategy::{ConsistentHash, KeyFallback, LeastConnections, LeastTime};
use tower_lb::strategy::{PowerOfTwoChoices, Random, RoundRobin, Swappable, WeightedRoundRobin};
use tower_lb::weight::{Weight, Weighted};
use tower_lb::{discover, Balance, BalanceHandle, BalanceLayer, ConfigError, EndpointStatus};

use crate::forward::{forward, Forwarder, Retrying};
use crate::server::{self, Lifecycle, ServerSettings};
use crate::upstream::Upstream;

/// Everything the proxy needs to run.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The backends at fixed addresses, each with its weight (1 unless given).
    pub(crate) backends: Vec<Backend>,
    /// The backends found by DNS names, re-resolved as their TTLs run out.
    pub(crate) dns: DnsBackends,
    /// How requests are spread over the backends.
    pub(crate) strategy: StrategySpec,
    /// The path of the JSON stats page on the admin listener.
    pub(crate) admin_path: String,
    /// When a backend is ejected for failing (passive health checking).
    pub(crate) outlier: OutlierDetection,
    /// Active health checks, if any: backends whose probes fail are taken out of rotation.
    pub(crate) health: Option<ActiveHealth>,
    /// Peers (other proxies, load balancers) whose forwarding headers are believed.
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// The client side: header and idle timeouts, header size, shutdown deadline.
    pub(crate) server: ServerSettings,
    /// The longest pause in a client's request body (408 or the connection closed after it).
    pub(crate) body_timeout: Duration,
    /// A WebSocket (or other upgraded) tunnel through which nothing passed for this long is
    /// closed.
    pub(crate) tunnel_idle_timeout: Duration,
    /// The backend side: timeouts and the connection pool.
    pub(crate) upstream: UpstreamSettings,
}

/// How the proxy talks to its backends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpstreamSettings {
    /// How long a connection to a backend may take to open.
    pub(crate) connect_timeout: Duration,
    /// How long a backend may take to send its response head, and then each part of its body
    /// (504 before the head; the response is cut after it). Counted against the backend.
    pub(crate) timeout: Duration,
    /// How long an idle pooled connection to a backend is kept.
    pub(crate) pool_idle_timeout: Duration,
    /// How many idle connections to each backend are kept.
    pub(crate) pool_max_idle: usize,
}

/// The defaults, as nginx's where nginx has one.
pub(crate) mod defaults {
    use std::time::Duration;

    /// nginx's `client_header_timeout`.
    pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
    /// nginx's `keepalive_timeout`.
    pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
    /// nginx's `client_body_timeout`.
    pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(60);
    /// Longer than nginx's 60 s `proxy_read_timeout`, which closes quiet WebSockets that
    /// ping less often than once a minute.
    pub(crate) const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// nginx's `large_client_header_buffers` (4 × 8 KiB).
    pub(crate) const MAX_HEADER_SIZE: usize = 32 * 1024;
    /// Kubernetes' default grace period is 30 s; stop a little before it kills the process.
    pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);
    /// Backends are usually near; nginx's 60 s `proxy_connect_timeout` is for the internet.
    pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// nginx's `proxy_read_timeout`.
    pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
    /// nginx's upstream `keepalive_timeout`.
    pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// The usual `keepalive 32` of an nginx upstream block.
    pub(crate) const POOL_MAX_IDLE: usize = 32;
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
    /// health checks, no trusted proxies, and the [`defaults`].
    pub(crate) fn new(backends: Vec<Backend>) -> Self {
        Self {
            backends,
            dns: DnsBackends::default(),
            strategy: StrategySpec::parse("round-robin").expect("a known strategy"),
            admin_path: "/_lb/stats".to_owned(),
            outlier: OutlierDetection::new(),
            health: None,
            trusted_proxies: Vec::new(),
            server: ServerSettings {
                header_timeout: defaults::HEADER_TIMEOUT,
                idle_timeout: defaults::IDLE_TIMEOUT,
                max_header_size: defaults::MAX_HEADER_SIZE,
                shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            },
            body_timeout: defaults::BODY_TIMEOUT,
            tunnel_idle_timeout: defaults::TUNNEL_IDLE_TIMEOUT,
            upstream: UpstreamSettings {
                connect_timeout: defaults::CONNECT_TIMEOUT,
                timeout: defaults::UPSTREAM_TIMEOUT,
                pool_idle_timeout: defaults::POOL_IDLE_TIMEOUT,
                pool_max_idle: defaults::POOL_MAX_IDLE,
            },
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
    (
        "least-time",
        "the fewest requests in flight per weight, avoiding slow backends",
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
    LeastTime,
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
            "least-time" => Algorithm::LeastTime,
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
            Algorithm::LeastTime => Swappable::new(LeastTime::new()),
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
pub(crate) enum HashOn {
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

impl HashOn {
    /// Believes forwarding headers from `trusted` peers when hashing by client IP.
    fn trusting(&self, trusted: &[IpNet]) -> Result<Self, ConfigError> {
        match self {
            HashOn::ClientIp(_) if !trusted.is_empty() => {
                let networks = trusted.iter().map(|net| net.to_string());
                Ok(HashOn::ClientIp(ClientIp::new().trust_proxies(networks)?))
            }
            other => Ok(other.clone()),
        }
    }
}

impl<B> RequestKey<axum::http::Request<B>> for HashOn {
    fn hash_key(&self, request: &axum::http::Request<B>, hasher: &mut KeyHasher) -> bool {
        if request.extensions().get::<Retrying>().is_some() {
            return false;
        }
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

/// The most headers a backend's response may have (hyper's default is 100, and a backend
/// answering more got a 502). hyper parses into a heap array of this size per response, so
/// it is not much larger than needed.
pub(crate) const MAX_RESPONSE_HEADERS: usize = 256;

type Endpoints =
    Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, Weighted<Upstream>>, BoxError>> + Send>>;
type Candidates = Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, Target>, BoxError>> + Send>>;

/// The balancer, the one place its type is spelled out. `Swappable` lets the strategy be
/// chosen at run time (from the command line) behind one type; it costs one virtual call per
/// pick. It is `Send + Sync`, so axum's `State` holds it as it is, and every request clones it.
pub(crate) type Balancer = Balance<SocketAddr, Upstream, Swappable, Keyed<HashOn>, TrackBody>;

/// Builds the balancer over the configured backends (fixed, and found by DNS), behind active
/// health checks if configured; returns it with the health checks' view of the backends.
fn build_balancer(
    config: &Config,
) -> Result<(Balancer, Option<HealthStatus<SocketAddr>>), ConfigError> {
    let upstream = config.upstream;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(upstream.connect_timeout));
    // One client, so one connection pool, for every backend and every probe. Requests keep
    // their client's `Host`, so backends found by name need no name of their own.
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(upstream.pool_idle_timeout)
        .pool_max_idle_per_host(upstream.pool_max_idle)
        .http1_max_headers(MAX_RESPONSE_HEADERS)
        .build(connector);

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
    let timeout = upstream.timeout;
    let endpoints = discover::connect(candidates, move |target: Target| {
        let weight = target
            .authority()
            .and_then(|name| name_weights.get(name))
            .copied()
            .unwrap_or(target.weight());
        let endpoint = HttpEndpoint::new(&client, target.addr());
        Weighted::new(Upstream::new(endpoint, target.addr(), timeout), weight)
    });

    let balance = BalanceLayer::new(config.strategy.strategy())
        .key(config.strategy.hash_on.trusting(&config.trusted_proxies)?)
        .weighted()
        // A response counts as in flight until its body has streamed to the client.
        .track_completion(TrackBody::end_of_stream())
        .outlier_detection(config.outlier)?
        .layer(Box::pin(endpoints) as Endpoints);
    Ok((balance, health))
}

/// The proxy, built and ready to serve: the public router (every request forwarded), the
/// admin router (the stats), and the server settings.
pub(crate) struct App {
    public: Router,
    admin: Router,
    server: ServerSettings,
    lifecycle: Lifecycle,
}

/// Builds the proxy. Fails if the configuration is invalid (such as a bad health check path).
pub(crate) fn build_app(config: &Config) -> Result<App, ConfigError> {
    let (balance, health) = build_balancer(config)?;
    let lifecycle = Lifecycle::new();
    let admin = AdminState {
        handle: balance.handle(),
        health,
        backends: config.backends.iter().map(|b| b.addr).collect(),
        strategy: config.strategy.name().into(),
    };
    let forwarder = Forwarder {
        balancer: balance,
        trusted: config.trusted_proxies.clone().into(),
        body_timeout: config.body_timeout,
        tunnel_idle_timeout: config.tunnel_idle_timeout,
        lifecycle: lifecycle.clone(),
    };
    Ok(App {
        public: Router::new()
            .fallback(forward)
            .with_state(Arc::new(forwarder)),
        admin: Router::new()
            .route(&config.admin_path, get(admin_stats))
            .with_state(admin),
        server: config.server,
        lifecycle,
    })
}

impl App {
    /// Something that stops the proxy at once, whatever is in progress (a second signal).
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.clone()
    }
}

/// Serves the proxy on `public` and its stats on `admin` until `shutdown` resolves, then stops
/// accepting connections and finishes the requests in progress, for at most the shutdown
/// timeout.
pub(crate) async fn serve(
    app: App,
    public: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut draining = app.lifecycle.follow();
    let admin = axum::serve(admin, app.admin).with_graceful_shutdown(async move {
        server::reached(&mut draining, server::Phase::Draining).await;
    });
    let admin = tokio::spawn(async move {
        if let Err(error) = admin.await {
            tracing::warn!(%error, "the admin listener failed");
        }
    });
    server::serve(public, app.public, app.server, app.lifecycle, shutdown).await;
    admin.abort();
}

#[derive(Clone)]
struct AdminState {
    handle: BalanceHandle<SocketAddr>,
    health: Option<HealthStatus<SocketAddr>>,
    backends: Arc<[SocketAddr]>,
    strategy: Arc<str>,
}

/// The balancer's stats as JSON.
async fn admin_stats(State(state): State<AdminState>) -> Response {
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
