//! The reverse proxy's parts put together: configuration, the balancer, the public router
//! and the admin router. `main.rs` parses the command line and runs it; `tests/proxy.rs`
//! includes these files and runs the proxy in-process on loopback.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
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
use tower_lb::discover::{HealthCheckBuilder, HealthStatus, HttpProbe};
use tower_lb::health::OutlierDetection;
use tower_lb::http::{connect, ClientIp, CookieKey, HeaderKey, HttpEndpoint, PathKey, TrackBody};
use tower_lb::strategy::Swappable;
use tower_lb::KeyHasher;
use tower_lb::{discover, Balance, BalanceHandle, BalanceLayer, ConfigError, EndpointStatus};
use tower_lb::{ConsistentHash, KeyFallback, LeastConnections, PowerOfTwoChoices, Random};
use tower_lb::{RequestKey, RoundRobin};
use tower_lb::{Weight, WeightedRoundRobin};

use crate::body::RequestBody;
use crate::forward::{forward, Forwarder, Retrying};
use crate::server::{self, Lifecycle, ServerSettings};
use crate::upstream::Upstream;

/// Everything the proxy needs to run.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The backends, each with its weight (1 unless given).
    pub(crate) backends: Vec<Backend>,
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

impl Backend {
    /// Parses `ADDR[=WEIGHT]`, where `ADDR` is `ip:port` or `host:port` (resolved now, first
    /// address) and `WEIGHT` a whole number from 1.
    pub(crate) fn parse(spec: &str) -> Result<Self, String> {
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
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| format!("backend {spec:?}: {addr:?} is not a host:port address ({e})"))?
            .next()
            .ok_or_else(|| format!("backend {spec:?}: {addr:?} resolves to no address"))?;
        Ok(Self { addr, weight })
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

type Endpoints = Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, Upstream>, BoxError>> + Send>>;

/// The balancer, the one place its type is spelled out. `Swappable` lets the strategy be
/// chosen at run time (from the command line) behind one type; it costs one virtual call per
/// pick. It is `Send + Sync`, so axum's `State` holds it as it is, and every request clones it.
pub(crate) type Balancer = Balance<Endpoints, Swappable, HashOn, TrackBody>;

/// Builds the balancer over the configured backends, behind active health checks if
/// configured; returns it with the health checks' view of the backends.
fn build_balancer(
    config: &Config,
) -> Result<(Balancer, Option<HealthStatus<SocketAddr>>), ConfigError> {
    let upstream = config.upstream;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(upstream.connect_timeout));
    // One client, so one connection pool, for every backend and every probe.
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(upstream.pool_idle_timeout)
        .pool_max_idle_per_host(upstream.pool_max_idle)
        .http1_max_headers(MAX_RESPONSE_HEADERS)
        .build(connector);

    let candidates = discover::fixed(config.backends.iter().map(|b| (b.addr, b.addr)));
    let (endpoints, health) = match &config.health {
        None => (
            upstreams(connect(client, candidates), upstream.timeout),
            None,
        ),
        Some(active) => {
            let probe = HttpProbe::new(&client, &active.path)?;
            let checked = active.settings.build(candidates, probe);
            let status = checked.status();
            (
                upstreams(connect(client, checked), upstream.timeout),
                Some(status),
            )
        }
    };

    let weights: Vec<(SocketAddr, Weight)> =
        config.backends.iter().map(|b| (b.addr, b.weight)).collect();
    let weigh = move |addr: &SocketAddr, _: &Upstream| {
        weights
            .iter()
            .find(|(a, _)| a == addr)
            .map_or(Weight::ONE, |(_, w)| *w)
    };

    let balance = BalanceLayer::new(config.strategy.strategy())
        .key(config.strategy.hash_on.trusting(&config.trusted_proxies)?)
        .weigh_with(weigh)
        // A response counts as in flight until its body has streamed to the client.
        .track_completion(TrackBody::end_of_stream())
        .outlier_detection(config.outlier)
        .layer(endpoints);
    Ok((balance, health))
}

/// Wraps every discovered backend in [`Upstream`], which times its responses.
fn upstreams<D, E>(endpoints: D, timeout: Duration) -> Endpoints
where
    D: Stream<Item = Result<Change<SocketAddr, HttpEndpoint<RequestBody>>, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    Box::pin(
        endpoints
            .map_err(Into::into)
            .map_ok(move |change| match change {
                Change::Insert(addr, endpoint) => {
                    Change::Insert(addr, Upstream::new(endpoint, addr, timeout))
                }
                Change::Remove(addr) => Change::Remove(addr),
            }),
    )
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
        // Every configured backend, including those the health checks took out.
        let checks: Vec<serde_json::Value> = state
            .backends
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
