//! End-to-end tests of the reverse proxy example (`examples/proxy`): real HTTP backends, the
//! proxy and a client, all on loopback in this process. The proxy's code is the example's
//! own `app.rs` and `cli.rs`, included below.
#![cfg(all(feature = "http", feature = "dns"))]

#[path = "../examples/proxy/app.rs"]
#[allow(dead_code)]
mod app;
#[path = "../examples/proxy/body.rs"]
mod body;
#[path = "../examples/proxy/cli.rs"]
#[allow(dead_code)]
mod cli;
mod common;
#[path = "../examples/proxy/forward.rs"]
mod forward;
#[path = "../examples/proxy/server.rs"]
#[allow(dead_code)]
mod server;
#[path = "../examples/proxy/upstream.rs"]
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use app::{ActiveHealth, Backend, Config, StrategySpec};
use axum::body::Body;
use bytes::Bytes;
use common::dnsmasq::Dnsmasq;
use common::servers::listeners_on_one_port;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tower_lb::health::HealthCheckBuilder;
use tower_lb::health::OutlierDetection;
use tower_lb::weight::Weight;

/// How long any single step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// Runs `future`, failing the test if it takes longer than [`STEP`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A real HTTP/1.1 server on loopback. Stopping it closes its listener and every connection.
struct TestBackend {
    addr: SocketAddr,
    server: JoinHandle<()>,
    /// Connections open now.
    connections: Arc<AtomicUsize>,
}

impl TestBackend {
    async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), handler)
    }

    /// Serves `handler` on `listener`.
    fn serve<F, Fut>(listener: TcpListener, handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let connections_open = open.clone();
        let server = tokio::spawn(async move {
            // Owned by this task, so aborting it drops (and aborts) every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let open = open.clone();
                open.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let response = handler(request);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_headers(1000)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            server,
            connections: connections_open,
        }
    }

    /// A backend that answers its name, then one `name: value` line per header it received.
    async fn echo(name: &'static str) -> Self {
        Self::echo_on(name, TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// An [`echo`](Self::echo) backend on `listener`.
    fn echo_on(name: &'static str, listener: TcpListener) -> Self {
        Self::serve(listener, move |request: Request<Incoming>| async move {
            let mut body = format!("{name}\n");
            for (header, value) in request.headers() {
                body.push_str(&format!("{header}: {}\n", value.to_str().unwrap()));
            }
            Response::new(Body::from(body))
        })
    }

    fn backend(&self) -> Backend {
        self.weighted(1)
    }

    fn weighted(&self, weight: u32) -> Backend {
        Backend {
            addr: self.addr,
            weight: Weight::new(weight).unwrap(),
        }
    }

    async fn stop(self) {
        self.server.abort();
        let _ = self.server.await;
    }
}

/// An echo backend's answer.
struct Echo {
    backend: String,
    headers: Vec<(String, String)>,
}

impl Echo {
    fn parse(body: &str) -> Self {
        let mut lines = body.lines();
        let backend = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter_map(|line| line.split_once(": "))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Self { backend, headers }
    }

    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The proxy, serving on loopback until its `shutdown` is sent (or it is dropped).
struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Proxy {
    async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel();
        let app = app::build_app(&config).expect("a valid configuration");
        let server = tokio::spawn(app::serve(app, listener, admin_listener, async {
            let _ = signal.await;
        }));
        Self {
            addr,
            admin,
            shutdown: Some(shutdown),
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin stats page, parsed.
    async fn stats(&self) -> serde_json::Value {
        let (status, _, body) = send(
            Request::get(format!("http://{}/_lb/stats", self.admin))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_str(&body).unwrap()
    }

    /// Picks per backend address, from the admin stats.
    async fn picks(&self) -> HashMap<String, u64> {
        let stats = self.stats().await;
        stats["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap().to_owned(),
                    b["picks"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `request` and reads the whole answer.
async fn send(request: Request<Body>) -> (StatusCode, HeaderMap, String) {
    within("a request through the proxy", async {
        let response = client().request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    })
    .await
}

/// `GET path` through the proxy; returns the status and the body.
async fn get(proxy: &Proxy, path: &str) -> (StatusCode, String) {
    let (status, _, body) = send(Request::get(proxy.url(path)).body(Body::empty()).unwrap()).await;
    (status, body)
}

/// Sends `n` GETs one after another; returns how many each backend answered.
async fn shares(proxy: &Proxy, n: usize) -> HashMap<String, usize> {
    let mut shares = HashMap::new();
    for _ in 0..n {
        let (status, body) = get(proxy, "/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        *shares.entry(Echo::parse(&body).backend).or_insert(0) += 1;
    }
    shares
}

#[tokio::test]
async fn round_robin_gives_every_backend_an_equal_share() {
    let backends = [
        TestBackend::echo("a").await,
        TestBackend::echo("b").await,
        TestBackend::echo("c").await,
    ];
    let proxy = Proxy::start(Config::new(backends.iter().map(|b| b.backend()).collect())).await;

    let shares = shares(&proxy, 300).await;
    for name in ["a", "b", "c"] {
        let share = shares.get(name).copied().unwrap_or(0);
        assert!(
            share == 100,
            "backend {name} answered {share} of 300: {shares:?}"
        );
    }
}

/// A proxy with `strategy` over `backends`.
async fn proxy_with(strategy: &str, backends: Vec<Backend>) -> Proxy {
    let mut config = Config::new(backends);
    config.strategy = StrategySpec::parse(strategy).unwrap();
    Proxy::start(config).await
}

#[tokio::test]
async fn weighted_strategies_give_shares_that_follow_the_weights() {
    let a = TestBackend::echo("a").await;
    let b = TestBackend::echo("b").await;
    let backends = vec![a.weighted(3), b.weighted(1)];

    // Weighted round-robin: exact per cycle of 4, though every request uses a fresh clone.
    let proxy = proxy_with("weighted-round-robin", backends.clone()).await;
    let wrr = shares(&proxy, 400).await;
    assert_eq!((wrr["a"], wrr["b"]), (300, 100), "{wrr:?}");

    // Weighted random: 3:1 in expectation; 30 is more than 3 standard deviations (8.7).
    let proxy = proxy_with("weighted-random", backends).await;
    let random = shares(&proxy, 400).await;
    assert!(random["a"].abs_diff(300) <= 30, "{random:?}");
}

#[tokio::test]
async fn every_strategy_proxies_requests_to_every_backend() {
    let backends = [
        TestBackend::echo("a").await,
        TestBackend::echo("b").await,
        TestBackend::echo("c").await,
    ];
    for (name, _) in app::STRATEGIES {
        let strategy = name.replace("KEY", "header:x-user");
        let proxy = proxy_with(&strategy, backends.iter().map(|b| b.backend()).collect()).await;
        // Different users, so hashing strategies spread them too.
        let mut answered = HashMap::new();
        for user in 0..60 {
            let request = Request::get(proxy.url("/"))
                .header("x-user", format!("user-{user}"))
                .body(Body::empty())
                .unwrap();
            let (status, _, body) = send(request).await;
            assert_eq!(status, StatusCode::OK, "{strategy}: {body}");
            *answered.entry(Echo::parse(&body).backend).or_insert(0) += 1;
        }
        assert_eq!(
            answered.len(),
            3,
            "{strategy} reached every backend: {answered:?}"
        );
        let stats = proxy.stats().await;
        assert_eq!(stats["strategy"], strategy.as_str());
        assert_eq!(stats["picks"], 60);
        assert_eq!(stats["in_flight"], 0);
    }
}

/// A backend that holds every request until `released` turns true, and reports each arrival
/// with its name.
async fn holding_backend(
    name: &'static str,
    arrivals: mpsc::UnboundedSender<&'static str>,
    released: tokio::sync::watch::Receiver<bool>,
) -> TestBackend {
    TestBackend::start(move |_: Request<Incoming>| {
        let arrivals = arrivals.clone();
        let mut released = released.clone();
        async move {
            let _ = arrivals.send(name);
            let _ = released.wait_for(|r| *r).await;
            Response::new(Body::from(format!("{name}\n")))
        }
    })
    .await
}

#[tokio::test]
async fn least_connections_avoids_a_backend_busy_with_a_long_request() {
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let slow = holding_backend("slow", arrivals_tx, released).await;
    let fast = TestBackend::echo("fast").await;
    let proxy = proxy_with("least-connections", vec![slow.backend(), fast.backend()]).await;

    // One request at a time: each either is held by the slow backend or answered at once.
    let mut held = Vec::new();
    let mut answered = 0;
    for _ in 0..20 {
        let mut request = tokio::spawn(send(
            Request::get(proxy.url("/")).body(Body::empty()).unwrap(),
        ));
        let is_held = within("a request landing", async {
            tokio::select! {
                _ = arrivals.recv() => true,
                answer = &mut request => {
                    assert_eq!(Echo::parse(&answer.unwrap().2).backend, "fast");
                    false
                }
            }
        })
        .await;
        if is_held {
            held.push(request);
        } else {
            answered += 1;
        }
    }
    // Once a request is in flight on the slow backend, every later one goes to the idle one
    // (round-robin would have sent the slow backend half of them).
    assert_eq!((held.len(), answered), (1, 19));

    release.send(true).unwrap();
    for request in held {
        let (status, _, body) = within("the held request", request).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "slow\n"));
    }
}

#[tokio::test]
async fn weighted_least_connections_keeps_in_flight_counts_in_proportion_to_weights() {
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let big = holding_backend("big", arrivals_tx.clone(), released.clone()).await;
    let small = holding_backend("small", arrivals_tx, released).await;
    let proxy = proxy_with(
        "weighted-least-connections",
        vec![big.weighted(3), small.weighted(1)],
    )
    .await;

    // Eight requests, each sent once the previous one has landed, all held.
    let mut requests = JoinSet::new();
    let mut landed: HashMap<&str, usize> = HashMap::new();
    for _ in 0..8 {
        requests.spawn(send(
            Request::get(proxy.url("/")).body(Body::empty()).unwrap(),
        ));
        let name = within("a request landing", arrivals.recv()).await.unwrap();
        *landed.entry(name).or_insert(0) += 1;
    }
    // (in flight + 1) / weight stays level: 6 and 2, give or take a tie.
    assert!((5..=7).contains(&landed["big"]), "{landed:?}");

    release.send(true).unwrap();
    for (status, _, _) in within("the held requests", requests.join_all()).await {
        assert_eq!(status, StatusCode::OK);
    }
}

/// For each user, the backends that answered its `per_user` requests (by `x-user` header).
async fn backends_per_user(proxy: &Proxy, users: usize, per_user: usize) -> Vec<Vec<String>> {
    let mut answers = Vec::new();
    for user in 0..users {
        let mut seen = Vec::new();
        for _ in 0..per_user {
            let request = Request::get(proxy.url("/"))
                .header("x-user", format!("user-{user}"))
                .body(Body::empty())
                .unwrap();
            let (status, _, body) = send(request).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            seen.push(Echo::parse(&body).backend);
        }
        answers.push(seen);
    }
    answers
}

fn assert_sticky_and_spread(strategy: &str, answers: &[Vec<String>]) {
    for (user, seen) in answers.iter().enumerate() {
        assert!(
            seen.iter().all(|b| b == &seen[0]),
            "{strategy}: user {user} moved between backends: {seen:?}"
        );
    }
    let used: std::collections::HashSet<&String> = answers.iter().map(|seen| &seen[0]).collect();
    assert!(used.len() >= 2, "{strategy}: 16 users all on one backend");
}

#[tokio::test]
async fn hashing_by_a_header_sends_each_user_to_one_backend() {
    let backends = [
        TestBackend::echo("a").await,
        TestBackend::echo("b").await,
        TestBackend::echo("c").await,
    ];
    for strategy in [
        "hash-header:x-user",
        "nginx-hash-header:x-user",
        "maglev-header:x-user",
    ] {
        let proxy = proxy_with(strategy, backends.iter().map(|b| b.backend()).collect()).await;
        let answers = backends_per_user(&proxy, 16, 5).await;
        assert_sticky_and_spread(strategy, &answers);

        // Without the header, requests are not refused: they go to each backend in turn.
        let anonymous = shares(&proxy, 30).await;
        assert_eq!(anonymous.len(), 3, "{strategy}: {anonymous:?}");
    }
}

#[tokio::test]
async fn hashing_by_client_ip_sends_each_client_to_one_backend() {
    let backends = [
        TestBackend::echo("a").await,
        TestBackend::echo("b").await,
        TestBackend::echo("c").await,
    ];
    let proxy = proxy_with("maglev-ip", backends.iter().map(|b| b.backend()).collect()).await;
    // Clients on 16 loopback addresses (127.0.0.0/8 is all loopback on Linux).
    let mut answers = Vec::new();
    for host in 1..=16u8 {
        let ip = std::net::IpAddr::from([127, 0, 0, host]);
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(ip));
        let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build(connector);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let response = within(
                "a request from one client address",
                client.request(Request::get(proxy.url("/")).body(Body::empty()).unwrap()),
            )
            .await
            .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let echo = Echo::parse(std::str::from_utf8(&body).unwrap());
            assert_eq!(echo.header("x-forwarded-for"), [ip.to_string()]);
            seen.push(echo.backend);
        }
        answers.push(seen);
    }
    assert_sticky_and_spread("maglev-ip", &answers);
}

type Answer = (StatusCode, HeaderMap, String);

/// Sends six concurrent requests for one key; returns how many landed on each backend (as
/// the backends report arrivals) and the requests, which the backends hold.
async fn send_hot_key(
    proxy: &Proxy,
    arrivals: &mut mpsc::UnboundedReceiver<&'static str>,
) -> (HashMap<&'static str, usize>, JoinSet<Answer>) {
    let mut requests = JoinSet::new();
    for _ in 0..6 {
        let request = Request::get(proxy.url("/"))
            .header("x-user", "celebrity")
            .body(Body::empty())
            .unwrap();
        requests.spawn(send(request));
    }
    let mut landed = HashMap::new();
    for _ in 0..6 {
        let name = within("a request arriving", arrivals.recv()).await.unwrap();
        *landed.entry(name).or_insert(0) += 1;
    }
    (landed, requests)
}

#[tokio::test]
async fn a_bounded_load_spills_a_hot_key_over_to_other_backends() {
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(holding_backend(name, arrivals_tx.clone(), released.clone()).await);
    }
    let addrs = || backends.iter().map(|b| b.backend()).collect::<Vec<_>>();

    let unbounded = proxy_with("maglev-header:x-user", addrs()).await;
    let (landed, unbounded_requests) = send_hot_key(&unbounded, &mut arrivals).await;
    assert_eq!(
        landed.len(),
        1,
        "without a bound one backend takes them all: {landed:?}"
    );

    let mut config = Config::new(addrs());
    config.strategy = StrategySpec::parse("maglev-header:x-user")
        .unwrap()
        .bounded_load(1.25)
        .unwrap();
    let bounded = Proxy::start(config).await;
    let (landed, bounded_requests) = send_hot_key(&bounded, &mut arrivals).await;
    // With 6 in flight over 3 backends, 1.25 x the average is at most 3 per backend.
    assert!(landed.len() >= 2, "{landed:?}");
    assert!(landed.values().all(|&n| n <= 3), "{landed:?}");

    release.send(true).unwrap();
    for requests in [unbounded_requests, bounded_requests] {
        for (status, _, _) in within("the held requests", requests.join_all()).await {
            assert_eq!(status, StatusCode::OK);
        }
    }
}

#[tokio::test]
async fn a_refused_connection_goes_to_another_backend_and_the_dead_one_is_ejected() {
    let a = TestBackend::echo("a").await;
    let b = TestBackend::echo("b").await;
    let c = TestBackend::echo("c").await;
    let b_addr = b.addr.to_string();
    let mut config = Config::new(vec![a.backend(), b.backend(), c.backend()]);
    config.outlier = OutlierDetection::new().consecutive_failures(3);
    let proxy = Proxy::start(config).await;
    assert_eq!(
        shares(&proxy, 30).await.len(),
        3,
        "all three answer at first"
    );

    b.stop().await;
    // Nothing was sent to b: every request is tried once more, on another backend.
    let after = shares(&proxy, 60).await;
    assert_eq!(after.values().sum::<usize>(), 60, "{after:?}");
    assert!(!after.contains_key("b"), "{after:?}");

    let stats = proxy.stats().await;
    let dead = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|backend| backend["address"] == b_addr.as_str())
        .expect("the dead backend is listed");
    assert_eq!(dead["status"], "ejected", "{stats:#}");
    assert_eq!(dead["ejections"], 1);
    assert_eq!(
        dead["failures"], 3,
        "each refusal counts, until the ejection"
    );
    assert_eq!(stats["available"], 2);
}

/// An echo backend whose `/healthz` answers 200 or 503 as the returned switch says.
async fn backend_with_health(name: &'static str) -> (TestBackend, Arc<AtomicBool>) {
    let healthy = Arc::new(AtomicBool::new(true));
    let switch = healthy.clone();
    let backend = TestBackend::start(move |request: Request<Incoming>| {
        let healthy = healthy.load(Ordering::SeqCst);
        async move {
            if request.uri().path() != "/healthz" {
                return Response::new(Body::from(format!("{name}\n")));
            }
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Response::builder()
                .status(status)
                .body(Body::empty())
                .unwrap()
        }
    })
    .await;
    (backend, switch)
}

/// Fast active health checks: a probe every 20 ms, one failure takes a backend out, two
/// successes bring it back.
fn fast_health_checks() -> ActiveHealth {
    let mut health = ActiveHealth::new("/healthz");
    health.settings = HealthCheckBuilder::new()
        .interval(Duration::from_millis(20))
        .timeout(Duration::from_millis(500))
        .fall(1)
        .rise(2);
    health
}

/// Polls the admin stats (every 10 ms, for at most [`STEP`]) until `done` holds.
async fn wait_for_stats(proxy: &Proxy, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    within(what, async {
        loop {
            if done(&proxy.stats().await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Whether the balancer sends new requests to `addr` (a removed backend may stay listed, as
/// "removed", while balancer clones may still hold it).
fn in_rotation(stats: &serde_json::Value, addr: SocketAddr) -> bool {
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["address"] == addr.to_string().as_str() && b["status"] == "active")
}

#[tokio::test]
async fn active_health_checks_take_a_failing_backend_out_and_bring_it_back() {
    let (a, _) = backend_with_health("a").await;
    let (b, b_healthy) = backend_with_health("b").await;
    let mut config = Config::new(vec![a.backend(), b.backend()]);
    config.health = Some(fast_health_checks());
    let proxy = Proxy::start(config).await;
    assert_eq!(shares(&proxy, 10).await.len(), 2, "both serve at first");

    b_healthy.store(false, Ordering::SeqCst);
    wait_for_stats(&proxy, "b taken out", |stats| !in_rotation(stats, b.addr)).await;
    let stats = proxy.stats().await;
    let checks = stats["health_checks"].as_array().unwrap();
    assert_eq!(
        checks.len(),
        2,
        "every configured backend is shown: {stats:#}"
    );
    let b_check = checks
        .iter()
        .find(|c| c["address"] == b.addr.to_string().as_str())
        .unwrap();
    assert_eq!(b_check["healthy"], false);
    assert!(
        b_check["last_error"].as_str().unwrap().contains("503"),
        "{b_check}"
    );
    // No request failed: the probe, not traffic, took b out.
    let only_a = shares(&proxy, 20).await;
    assert_eq!(only_a.get("a"), Some(&20), "{only_a:?}");

    b_healthy.store(true, Ordering::SeqCst);
    wait_for_stats(&proxy, "b back", |stats| in_rotation(stats, b.addr)).await;
    assert_eq!(shares(&proxy, 10).await.len(), 2, "both serve again");
}

#[tokio::test]
async fn every_backend_unhealthy_answers_503() {
    let (a, a_healthy) = backend_with_health("a").await;
    a_healthy.store(false, Ordering::SeqCst);
    let mut config = Config::new(vec![a.backend()]);
    config.health = Some(fast_health_checks());
    let proxy = Proxy::start(config).await;
    wait_for_stats(&proxy, "a taken out", |stats| stats["available"] == 0).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "503 Service Unavailable: no backend is available\n");
}

#[tokio::test]
async fn a_bad_health_check_path_is_rejected() {
    let mut config = Config::new(Vec::new());
    config.health = Some(ActiveHealth::new("healthz"));
    let error = app::build_app(&config).err().unwrap();
    assert!(error.to_string().contains("probe path"), "{error}");
}

#[tokio::test]
async fn no_backend_answers_503_with_a_clear_body() {
    let proxy = Proxy::start(Config::new(Vec::new())).await;
    let (status, body) = get(&proxy, "/anything").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "503 Service Unavailable: no backend is available\n");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let backend = TestBackend::start(|request: Request<Incoming>| async move {
        let mut body = String::from("private\n");
        for (header, value) in request.headers() {
            body.push_str(&format!("{header}: {}\n", value.to_str().unwrap()));
        }
        Response::builder()
            .header("connection", "x-backend-private")
            .header("x-backend-private", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-backend-public", "1")
            .body(Body::from(body))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;

    let request = Request::get(proxy.url("/"))
        .header("connection", "keep-alive, x-hop")
        .header("keep-alive", "timeout=5")
        .header("x-hop", "for the next hop only")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "gzip")
        .header("upgrade", "websocket")
        .header("x-end-to-end", "kept")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(request).await;
    assert_eq!(status, StatusCode::OK);

    let echo = Echo::parse(&body);
    for hop in [
        "connection",
        "keep-alive",
        "x-hop",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(echo.header(hop).is_empty(), "{hop} was forwarded: {body}");
    }
    assert_eq!(echo.header("x-end-to-end"), ["kept"]);

    for hop in ["x-backend-private", "keep-alive", "proxy-authenticate"] {
        assert!(!headers.contains_key(hop), "{hop} came back: {headers:?}");
    }
    assert_eq!(headers["x-backend-public"], "1");
}

#[test]
fn every_hop_by_hop_header_and_every_header_named_in_connection_is_removed() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("connection", "close, X-Named-A"),
        ("connection", "x-named-b"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("x-named-a", "1"),
        ("x-named-b", "2"),
        ("x-end-to-end", "3"),
    ] {
        headers.append(name, value.parse().unwrap());
    }
    forward::remove_hop_by_hop_headers(&mut headers);
    let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    // `Trailer` describes the message (its trailer fields), not the connection.
    assert_eq!(left, ["trailer", "x-end-to-end"]);
}

#[tokio::test]
async fn forwarding_headers_keep_earlier_hops_and_append_the_client() {
    let backend = TestBackend::echo("a").await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;

    let request = Request::get(proxy.url("/"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "198.51.100.2")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .body(Body::empty())
        .unwrap();
    let (_, _, body) = send(request).await;
    let echo = Echo::parse(&body);
    assert_eq!(
        echo.header("x-forwarded-for"),
        ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    );
    let host = proxy.addr.to_string();
    assert_eq!(
        echo.header("forwarded"),
        [format!(
            "for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=\"{host}\""
        )]
    );
    assert_eq!(
        echo.header("host"),
        [host.as_str()],
        "the client's Host is kept"
    );

    let (_, body) = get(&proxy, "/").await;
    assert_eq!(Echo::parse(&body).header("x-forwarded-for"), ["127.0.0.1"]);
}

const CHUNK_SIZE: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_SIZE] = [7; CHUNK_SIZE];
/// 64 MiB: a body far larger than any buffer on the way.
const LARGE: usize = 64 * 1024 * 1024;

/// The process's peak resident memory, where the OS tells it (Linux).
fn peak_memory() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn assert_not_buffered_whole(peak_before: Option<usize>) {
    if let (Some(before), Some(after)) = (peak_before, peak_memory()) {
        assert!(
            after.saturating_sub(before) < LARGE / 2,
            "peak memory grew by {} MiB while 64 MiB streamed",
            (after - before) >> 20
        );
    }
}

/// A body fed chunk by chunk through `chunks`.
fn channel_body(chunks: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.recv().await?;
        Some((Ok::<_, Infallible>(chunk), chunks))
    }))
}

#[tokio::test]
async fn a_large_request_body_streams_to_the_backend_before_the_client_has_sent_it_all() {
    let peak_before = peak_memory();
    // The backend reports how many bytes it had when its first data arrived, and answers the
    // total it counted.
    let (first_data_tx, mut first_data) = mpsc::unbounded_channel();
    let backend = TestBackend::start(move |request: Request<Incoming>| {
        let first_data_tx = first_data_tx.clone();
        async move {
            let mut body = request.into_body();
            let mut received = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    if received == 0 {
                        let _ = first_data_tx.send(data.len());
                    }
                    received += data.len();
                }
            }
            Response::new(Body::from(received.to_string()))
        }
    })
    .await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;

    let (chunks, rx) = mpsc::channel(4);
    let request = Request::post(proxy.url("/upload"))
        .body(channel_body(rx))
        .unwrap();
    let response = tokio::spawn(client().request(request));

    chunks.send(Bytes::from_static(&CHUNK)).await.unwrap();
    let first = within(
        "the backend receiving data while the client has sent only 64 KiB",
        first_data.recv(),
    )
    .await
    .unwrap();
    assert!(first > 0 && first <= CHUNK_SIZE);

    within("sending the rest", async {
        for _ in 1..LARGE / CHUNK_SIZE {
            chunks.send(Bytes::from_static(&CHUNK)).await.unwrap();
        }
    })
    .await;
    drop(chunks);
    let response = within("the backend's answer", response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, LARGE.to_string(), "every byte arrived");
    assert_not_buffered_whole(peak_before);
}

#[tokio::test]
async fn a_large_response_streams_to_the_client_and_counts_in_flight_until_it_ends() {
    let peak_before = peak_memory();
    let (chunks, rx) = mpsc::channel(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let backend = TestBackend::start(move |_: Request<Incoming>| {
        let rx = rx.lock().unwrap().take().expect("one request");
        async move { Response::new(channel_body(rx)) }
    })
    .await;
    let backend_addr = backend.addr.to_string();
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;

    let response = within(
        "the response head",
        client().request(
            Request::get(proxy.url("/download"))
                .body(Body::empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();

    chunks.send(Bytes::from_static(&CHUNK)).await.unwrap();
    let first = within(
        "the client receiving data while the backend has sent only 64 KiB",
        body.frame(),
    )
    .await
    .unwrap()
    .unwrap()
    .into_data()
    .unwrap();
    let mut received = first.len();
    assert!(received > 0);

    let stats = proxy.stats().await;
    assert_eq!(
        stats["in_flight"], 1,
        "a streaming response is in flight: {stats:#}"
    );
    assert_eq!(stats["backends"][0]["address"], backend_addr.as_str());
    assert_eq!(stats["backends"][0]["in_flight"], 1);

    let sender = tokio::spawn(async move {
        for _ in 1..LARGE / CHUNK_SIZE {
            chunks.send(Bytes::from_static(&CHUNK)).await.unwrap();
        }
    });
    within("the rest of the body", async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                received += data.len();
            }
        }
    })
    .await;
    sender.await.unwrap();
    assert_eq!(received, LARGE, "every byte arrived");

    let stats = proxy.stats().await;
    assert_eq!(
        stats["in_flight"], 0,
        "released at the end of the body: {stats:#}"
    );
    assert_eq!(stats["backends"][0]["picks"], 1);
    assert_not_buffered_whole(peak_before);
}

#[tokio::test]
async fn admin_stats_list_every_backend_with_its_counters() {
    let a = TestBackend::echo("a").await;
    let b = TestBackend::echo("b").await;
    let proxy = Proxy::start(Config::new(vec![a.backend(), b.weighted(3)])).await;
    let answered = shares(&proxy, 10).await;

    let stats = proxy.stats().await;
    assert_eq!(stats["strategy"], "round-robin");
    assert_eq!(stats["picks"], 10);
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["available"], 2);
    let backends = stats["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    for (backend, name, weight) in [(&a, "a", 1), (&b, "b", 3)] {
        let listed = backends
            .iter()
            .find(|l| l["address"] == backend.addr.to_string().as_str())
            .unwrap_or_else(|| panic!("{name} is listed: {stats:#}"));
        assert_eq!(listed["picks"], answered[name] as u64);
        assert_eq!(listed["in_flight"], 0);
        assert_eq!(listed["weight"], weight);
        assert_eq!(listed["status"], "active");
        assert_eq!(listed["failures"], 0);
    }
    assert_eq!(proxy.picks().await.values().sum::<u64>(), 10);
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_progress_and_stops_listening() {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (release_tx, release) = oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release)));
    let backend = TestBackend::start(move |_: Request<Incoming>| {
        let arrived_tx = arrived_tx.clone();
        let release = release.lock().unwrap().take();
        async move {
            let _ = arrived_tx.send(());
            if let Some(release) = release {
                let _ = release.await;
            }
            Response::new(Body::from("finished"))
        }
    })
    .await;
    let mut proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    let url = proxy.url("/slow");
    let request =
        tokio::spawn(async move { send(Request::get(url).body(Body::empty()).unwrap()).await });
    within("the request reaching the backend", arrived.recv()).await;

    proxy.shutdown.take().unwrap().send(()).unwrap();
    // A short, bounded wait: the proxy must still be serving the request in progress.
    assert!(
        timeout(Duration::from_millis(200), &mut proxy.server)
            .await
            .is_err(),
        "the proxy stopped with a request in progress"
    );
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "no new connections once shutting down"
    );

    release_tx.send(()).unwrap();
    let (status, _, body) = within("the request in progress", request).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "finished"));
    within("the proxy to stop", &mut proxy.server)
        .await
        .unwrap();
}

#[test]
fn the_command_line_is_parsed_and_mistakes_are_explained() {
    let parse = |args: &[&str]| cli::parse_args(args.iter().map(|a| a.to_string()));

    let defaults = parse(&[]).unwrap();
    assert_eq!(defaults.listen, "127.0.0.1:8080".parse().unwrap());
    assert!(
        defaults.config.backends.is_empty(),
        "none: the demo backends"
    );
    assert_eq!(defaults.config.strategy.name(), "round-robin");
    assert_eq!(defaults.config.admin_path, "/_lb/stats");

    let args = parse(&[
        "--listen=0.0.0.0:9000",
        "--backend",
        "127.0.0.1:8081=3",
        "--backend",
        "[::1]:8082",
        "--admin",
        "/stats",
    ])
    .unwrap();
    assert_eq!(args.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(
        args.config.backends,
        [
            Backend {
                addr: "127.0.0.1:8081".parse().unwrap(),
                weight: Weight::new(3).unwrap()
            },
            Backend {
                addr: "[::1]:8082".parse().unwrap(),
                weight: Weight::ONE
            },
        ]
    );
    assert_eq!(args.config.admin_path, "/stats");

    let error = |args: &[&str]| parse(args).err().unwrap();
    let unknown = error(&["--strategy", "fastest"]);
    assert!(
        unknown.contains("unknown strategy \"fastest\""),
        "{unknown}"
    );
    for (name, _) in app::STRATEGIES {
        assert!(unknown.contains(name), "{name} is listed: {unknown}");
    }
    assert!(error(&["--backend", "127.0.0.1:1=0"]).contains("0 is not a weight"));
    assert!(error(&["--backend", "127.0.0.1:1=x"]).contains("not a number"));
    assert!(error(&["--backend", "nowhere"]).contains("not a host:port address"));
    assert!(error(&["--backend", "127.0.0.1:1", "--backend", "127.0.0.1:1"]).contains("twice"));
    assert!(error(&["--listen", "localhost"]).contains("not an ip:port"));
    assert!(error(&["--admin", "stats"]).contains("must start with '/'"));
    assert!(error(&["--admin", "/{id}"]).contains("must start with '/'"));
    assert!(error(&["--strategy"]).contains("needs a value"));
    assert!(error(&["--strategy", "maglev-cookie"]).contains("unknown hash key"));
    assert!(error(&["--strategy", "hash-header:bad name"]).contains("header key"));
    let bounded = parse(&["--bounded-load", "1.25", "--strategy", "hash-ip"]).unwrap();
    assert_eq!(bounded.config.strategy.name(), "hash-ip");
    assert!(error(&["--strategy", "p2c", "--bounded-load", "2"]).contains("hashing strategies"));
    assert!(error(&["--strategy", "maglev-ip", "--bounded-load", "0.9"]).contains("below 1"));
    assert!(error(&["--strategy", "maglev-ip", "--bounded-load", "x"]).contains("not a number"));
    assert!(error(&["--bogus"]).contains("unknown argument"));
    let health = parse(&["--health", "/healthz"])
        .unwrap()
        .config
        .health
        .unwrap();
    assert_eq!(health.path, "/healthz");
    assert_eq!(error(&["--help"]), "", "asks for the help text");

    // The deployment flags, and their defaults.
    assert_eq!(defaults.admin_listen, "127.0.0.1:9901".parse().unwrap());
    let server = defaults.config.server;
    assert_eq!(server.header_timeout, Duration::from_secs(60));
    assert_eq!(server.idle_timeout, Duration::from_secs(75));
    assert_eq!(server.max_header_size, 32 * 1024);
    assert_eq!(server.shutdown_timeout, Duration::from_secs(25));
    assert_eq!(defaults.config.body_timeout, Duration::from_secs(60));
    assert_eq!(
        defaults.config.tunnel_idle_timeout,
        Duration::from_secs(600)
    );
    let upstream = defaults.config.upstream;
    assert_eq!(upstream.connect_timeout, Duration::from_secs(2));
    assert_eq!(upstream.timeout, Duration::from_secs(60));
    assert_eq!(upstream.pool_idle_timeout, Duration::from_secs(60));
    assert_eq!(upstream.pool_max_idle, 32);
    assert!(defaults.config.trusted_proxies.is_empty());

    let args = parse(&[
        "--admin-listen=127.0.0.1:9000",
        "--trust-proxy",
        "10.0.0.0/8",
        "--trust-proxy",
        "192.0.2.1",
        "--header-timeout",
        "500ms",
        "--idle-timeout",
        "2m",
        "--body-timeout",
        "30",
        "--connect-timeout",
        "1.5s",
        "--upstream-timeout",
        "1h",
        "--tunnel-idle-timeout",
        "90s",
        "--shutdown-timeout",
        "0",
        "--upstream-idle-timeout",
        "10s",
        "--upstream-max-idle",
        "8",
        "--max-header-size",
        "64k",
    ])
    .unwrap();
    assert_eq!(args.admin_listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(
        args.config.trusted_proxies,
        [
            "10.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
            "192.0.2.1/32".parse().unwrap()
        ]
    );
    let (server, upstream) = (args.config.server, args.config.upstream);
    assert_eq!(server.header_timeout, Duration::from_millis(500));
    assert_eq!(server.idle_timeout, Duration::from_secs(120));
    assert_eq!(args.config.body_timeout, Duration::from_secs(30));
    assert_eq!(upstream.connect_timeout, Duration::from_millis(1500));
    assert_eq!(upstream.timeout, Duration::from_secs(3600));
    assert_eq!(args.config.tunnel_idle_timeout, Duration::from_secs(90));
    assert_eq!(server.shutdown_timeout, Duration::ZERO);
    assert_eq!(upstream.pool_idle_timeout, Duration::from_secs(10));
    assert_eq!(upstream.pool_max_idle, 8);
    assert_eq!(server.max_header_size, 64 * 1024);

    assert!(error(&["--header-timeout", "0"]).contains("too short"));
    assert!(error(&["--upstream-timeout", "2d"]).contains("unknown unit"));
    assert!(error(&["--idle-timeout", "25h"]).contains("longer than a day"));
    assert!(error(&["--body-timeout", "soon"]).contains("not a duration"));
    assert!(error(&["--trust-proxy", "10.0.0.0/33"]).contains("not a network"));
    assert!(error(&["--max-header-size", "4k"]).contains("minimum of 8 KiB"));
    assert!(error(&["--max-header-size", "lots"]).contains("not a size"));
    assert!(error(&["--upstream-max-idle", "-1"]).contains("not a whole number"));
    assert!(error(&["--admin-listen", "127.0.0.1:8080"]).contains("must not be public"));
    assert!(error(&["--admin-listen", "nowhere"]).contains("not an ip:port"));
    assert!(cli::usage().contains("--shutdown-timeout"));
    assert!(StrategySpec::parse("round-robin").is_ok());
}

// ---------------------------------------------------------------------------------------------
// What a deployed reverse proxy must do (issue 14's table, one test or more per row).

/// Sends `request` as raw bytes on a new connection and reads until the proxy closes it.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("a raw exchange", async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        // A reset after the answer is fine: what was read is the answer.
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
}

/// The status code of a raw answer (0 if there is none).
fn raw_status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// The body of a raw answer.
fn raw_body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// The stats of the backend at `addr`.
async fn backend_stats(proxy: &Proxy, addr: SocketAddr) -> serde_json::Value {
    let stats = proxy.stats().await;
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|backend| backend["address"] == addr.to_string().as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{addr} is listed: {stats:#}"))
}

/// Waits (bounded) until `done` holds, checking every 10 ms.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A backend that never answers.
async fn hanging_backend() -> TestBackend {
    TestBackend::start(|_: Request<Incoming>| async {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await
}

#[tokio::test]
async fn the_shutdown_deadline_cuts_a_hung_request() {
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (_never, released) = tokio::sync::watch::channel(false);
    let backend = holding_backend("hung", arrivals_tx, released).await;
    let mut config = Config::new(vec![backend.backend()]);
    config.server.shutdown_timeout = Duration::from_millis(200);
    let mut proxy = Proxy::start(config).await;
    let url = proxy.url("/");
    let request = tokio::spawn(client().request(Request::get(url).body(Body::empty()).unwrap()));
    within("the request reaching the backend", arrivals.recv()).await;

    proxy.shutdown.take().unwrap().send(()).unwrap();
    within("the proxy to stop at its deadline", &mut proxy.server)
        .await
        .unwrap();
    let cut = within("the hung request", request).await.unwrap();
    assert!(cut.is_err(), "the hung request was cut: {cut:?}");
}

/// The example's binary, as `cargo test` / `cargo nextest` built it beside this test.
fn proxy_binary() -> std::path::PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    // Built (or found up to date) with this test's features, so it is never a stale copy.
    // Without the variables Cargo sets for this test binary (`CARGO_PKG_NAME`,
    // `CARGO_MANIFEST_DIR`…): ring's build script tracks some of them, so inherited they made
    // every run rebuild ring and the crates above it, some 9 s, and the next plain build
    // rebuild them back.
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args(["build", "--example", "proxy", "--all-features", "--quiet"]);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_for_tests = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR";
        if set_for_tests {
            build.env_remove(&*name);
        }
    }
    let built = build.status().unwrap();
    assert!(built.success(), "building the proxy example");
    dir.join("examples").join("proxy")
}

#[tokio::test]
async fn sigterm_lets_the_request_in_progress_finish_then_exits() {
    use tokio::io::AsyncBufReadExt;
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let backend = holding_backend("finished", arrivals_tx, released).await;

    let mut child = tokio::process::Command::new(proxy_binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--backend", &backend.addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = within("the proxy to start", async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the proxy's banner");
            if let Some(rest) = line.strip_prefix("tower-lb proxy on http://") {
                break rest.split(' ').next().unwrap().parse().unwrap();
            }
        }
    })
    .await;

    let request = tokio::spawn(send(
        Request::get(format!("http://{addr}/"))
            .body(Body::empty())
            .unwrap(),
    ));
    within("the request reaching the backend", arrivals.recv()).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    within("the proxy to stop accepting connections", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    release.send(true).unwrap();
    let (status, _, body) = within("the request in progress", request).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "finished\n"));
    let exit = within("the proxy to exit", child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_client_slow_to_send_its_head_is_disconnected() {
    let backend = TestBackend::echo("a").await;
    let mut config = Config::new(vec![backend.backend()]);
    config.server.header_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;
    // Half a head, then nothing: the proxy hangs up (hyper answers nothing on this timeout).
    let answer = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(
        answer.is_empty() || raw_status(&answer) == 408,
        "{answer:?}"
    );
    assert_eq!(proxy.stats().await["picks"], 0);
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::echo("a").await;
    let mut config = Config::new(vec![backend.backend()]);
    config.server.idle_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    within(
        "the first answer, then the proxy closing the idle connection",
        async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        },
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(
        raw_status(&answer),
        200,
        "kept alive for the request: {answer}"
    );
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_a_504_and_the_blame() {
    let backend = hanging_backend().await;
    let mut config = Config::new(vec![backend.backend()]);
    config.upstream.timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;

    let (status, body) = get(&proxy, "/").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout\n")
    );
    let stats = backend_stats(&proxy, backend.addr).await;
    assert_eq!(stats["failures"], 1, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
}

#[tokio::test]
async fn a_backend_that_stalls_its_body_is_cut_off_and_blamed() {
    let (chunks, rx) = mpsc::channel(1);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let backend = TestBackend::start(move |_: Request<Incoming>| {
        let rx = rx.lock().unwrap().take().expect("one request");
        async move { Response::new(channel_body(rx)) }
    })
    .await;
    let mut config = Config::new(vec![backend.backend()]);
    config.upstream.timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;

    let response = within(
        "the response head",
        client().request(Request::get(proxy.url("/")).body(Body::empty()).unwrap()),
    )
    .await
    .unwrap();
    chunks.send(Bytes::from_static(b"first")).await.unwrap();
    let mut body = response.into_body();
    let first = within("the first chunk", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    // Then nothing (the sender is kept, so the backend's body neither ends nor fails).
    let rest = within("the response being cut", body.collect()).await;
    assert!(rest.is_err(), "the client sees an incomplete response");

    let stats = backend_stats(&proxy, backend.addr).await;
    assert_eq!(stats["failures"], 1, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    drop(chunks);
}

#[tokio::test]
async fn a_response_with_250_headers_passes() {
    let backend = TestBackend::start(|_: Request<Incoming>| async {
        let mut response = Response::builder();
        for i in 0..250 {
            response = response.header(format!("x-header-{i}"), i.to_string());
        }
        response.body(Body::from("many")).unwrap()
    })
    .await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    let client: Client<_, Body> = Client::builder(TokioExecutor::new())
        .http1_max_headers(1000)
        .build_http();
    let response = within(
        "the response",
        client.request(Request::get(proxy.url("/")).body(Body::empty()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-header-249"], "249");
    assert_eq!(
        (0..250)
            .filter(|i| response.headers().contains_key(format!("x-header-{i}")))
            .count(),
        250
    );
}

#[tokio::test]
async fn request_heads_above_the_size_cap_get_431() {
    let backend = TestBackend::echo("a").await;
    let big = |size: usize| {
        Request::get("/")
            .header("x-big", "b".repeat(size))
            .body(Body::empty())
            .unwrap()
    };
    let default = Proxy::start(Config::new(vec![backend.backend()])).await;
    let mut request = big(20_000);
    *request.uri_mut() = default.url("/").parse().unwrap();
    assert_eq!(
        send(request).await.0,
        StatusCode::OK,
        "20 KB fits in 32 KiB"
    );

    let mut config = Config::new(vec![backend.backend()]);
    config.server.max_header_size = 8 * 1024;
    let capped = Proxy::start(config).await;
    let mut request = big(10_000);
    *request.uri_mut() = capped.url("/").parse().unwrap();
    assert_eq!(
        send(request).await.0,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(capped.stats().await["picks"], 0);
}

#[tokio::test]
async fn an_http2_client_s_authority_becomes_the_host() {
    let backend = TestBackend::echo("a").await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    let h2: Client<_, Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = within(
        "an HTTP/2 request",
        h2.request(Request::get(proxy.url("/h2")).body(Body::empty()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo = Echo::parse(std::str::from_utf8(&body).unwrap());
    let authority = proxy.addr.to_string();
    assert_eq!(echo.header("host"), [authority.as_str()]);
    assert_eq!(echo.header("x-forwarded-host"), [authority.as_str()]);

    // A Host that names another host than :authority is malformed (RFC 9113 §8.3.1).
    let request = Request::get(proxy.url("/h2"))
        .header("host", "elsewhere.example")
        .body(Body::empty())
        .unwrap();
    let response = within("a conflicting HTTP/2 request", h2.request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_missing_repeated_or_invalid_host_is_a_bad_request() {
    let backend = TestBackend::echo("a").await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    for (what, request) in [
        ("no Host", "GET / HTTP/1.1\r\n"),
        ("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n"),
        ("a space", "GET / HTTP/1.1\r\nHost: a b\r\n"),
        ("a bad port", "GET / HTTP/1.1\r\nHost: a:99999\r\n"),
        ("user information", "GET / HTTP/1.1\r\nHost: user@a\r\n"),
        ("an empty Host", "GET / HTTP/1.1\r\nHost: \r\n"),
        (
            "an invalid absolute target",
            "GET http://a:x/ HTTP/1.1\r\nHost: a\r\n",
        ),
    ] {
        let answer = raw(
            proxy.addr,
            format!("{request}Connection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(raw_status(&answer), 400, "{what}: {answer}");
        assert_eq!(raw_body(&answer), "400 Bad Request\n", "{what}");
    }
    assert_eq!(proxy.stats().await["picks"], 0, "none was forwarded");

    // HTTP/1.0 may go without.
    let answer = raw(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
}

#[tokio::test]
async fn an_absolute_form_target_s_authority_wins_over_host() {
    let backend = TestBackend::echo("a").await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    let answer = raw(
        proxy.addr,
        b"GET http://a.example/x?y=1 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let echo = Echo::parse(raw_body(&answer));
    assert_eq!(echo.header("host"), ["a.example"]);
    assert_eq!(echo.header("x-forwarded-host"), ["a.example"]);
}

#[tokio::test]
async fn forwarded_proto_and_host_are_the_proxy_s_unless_the_peer_is_trusted() {
    let backend = TestBackend::echo("a").await;
    let spoofing = |proxy: &Proxy| {
        Request::get(proxy.url("/"))
            .header("host", "shop.example")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .body(Body::empty())
            .unwrap()
    };

    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    let (_, _, body) = send(spoofing(&proxy)).await;
    let echo = Echo::parse(&body);
    assert_eq!(echo.header("x-forwarded-proto"), ["http"]);
    assert_eq!(echo.header("x-forwarded-host"), ["shop.example"]);
    let (_, body) = get(&proxy, "/").await;
    assert_eq!(Echo::parse(&body).header("x-forwarded-proto"), ["http"]);

    let mut config = Config::new(vec![backend.backend()]);
    config.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let behind_a_load_balancer = Proxy::start(config).await;
    let (_, _, body) = send(spoofing(&behind_a_load_balancer)).await;
    let echo = Echo::parse(&body);
    assert_eq!(echo.header("x-forwarded-proto"), ["https"]);
    assert_eq!(echo.header("x-forwarded-host"), ["evil.example"]);
}

#[tokio::test]
async fn hashing_by_client_ip_believes_forwarded_for_only_from_trusted_proxies() {
    let backends = [
        TestBackend::echo("a").await,
        TestBackend::echo("b").await,
        TestBackend::echo("c").await,
    ];
    let addrs = || backends.iter().map(|b| b.backend()).collect::<Vec<_>>();
    // For each of 16 clients behind a proxy, the backends its 3 requests reached.
    async fn per_client(proxy: &Proxy) -> Vec<Vec<String>> {
        let mut answers = Vec::new();
        for client in 1..=16 {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let request = Request::get(proxy.url("/"))
                    .header("x-forwarded-for", format!("203.0.113.{client}"))
                    .body(Body::empty())
                    .unwrap();
                seen.push(Echo::parse(&send(request).await.2).backend);
            }
            answers.push(seen);
        }
        answers
    }

    let untrusting = proxy_with("maglev-ip", addrs()).await;
    let answers = per_client(&untrusting).await;
    let used: std::collections::HashSet<&String> = answers.iter().flatten().collect();
    assert_eq!(
        used.len(),
        1,
        "every request is from 127.0.0.1: {answers:?}"
    );

    let mut config = Config::new(addrs());
    config.strategy = StrategySpec::parse("maglev-ip").unwrap();
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let trusting = Proxy::start(config).await;
    assert_sticky_and_spread("maglev-ip behind a proxy", &per_client(&trusting).await);
}

/// A WebSocket server that echoes every text and binary message.
async fn websocket_echo_backend() -> (SocketAddr, JoinHandle<()>) {
    use futures::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut sockets = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            sockets.spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    (addr, server)
}

#[tokio::test]
async fn a_websocket_is_tunnelled_and_counts_in_flight_until_it_closes() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (backend, _server) = websocket_echo_backend().await;
    let proxy = Proxy::start(Config::new(vec![Backend {
        addr: backend,
        weight: Weight::ONE,
    }]))
    .await;

    let (mut socket, response) = within(
        "the WebSocket handshake through the proxy",
        tokio_tungstenite::connect_async(format!("ws://{}/chat", proxy.addr)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "again"] {
        socket.send(Message::text(text)).await.unwrap();
        let echoed = within("the echo", socket.next()).await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let stats = proxy.stats().await;
    assert_eq!(
        stats["in_flight"], 1,
        "the open tunnel is in flight: {stats:#}"
    );
    assert_eq!(stats["picks"], 1);

    socket.close(None).await.unwrap();
    drop(socket);
    wait_for_stats(&proxy, "the tunnel released", |stats| {
        stats["in_flight"] == 0
    })
    .await;
    assert_eq!(proxy.stats().await["backends"][0]["failures"], 0);
}

#[tokio::test]
async fn a_quiet_tunnel_is_closed_after_the_tunnel_idle_timeout() {
    use futures::StreamExt;
    let (backend, _server) = websocket_echo_backend().await;
    let mut config = Config::new(vec![Backend {
        addr: backend,
        weight: Weight::ONE,
    }]);
    config.tunnel_idle_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;
    let (mut socket, _) = within(
        "the WebSocket handshake through the proxy",
        tokio_tungstenite::connect_async(format!("ws://{}/quiet", proxy.addr)),
    )
    .await
    .unwrap();
    // Nothing is sent: the proxy closes the tunnel, and the socket ends.
    let end = within("the quiet tunnel closing", async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    });
    end.await;
    wait_for_stats(&proxy, "the tunnel released", |stats| {
        stats["in_flight"] == 0
    })
    .await;
}

#[tokio::test]
async fn connect_is_answered_405() {
    let backend = TestBackend::echo("a").await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    let answer = raw(
        proxy.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 405, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nallow: get"),
        "{answer}"
    );
    assert_eq!(proxy.stats().await["picks"], 0);
}

/// A body of `data`, then `trailers`.
fn body_with_trailers(data: &'static str, trailers: &[(&'static str, &'static str)]) -> Body {
    let mut map = HeaderMap::new();
    for (name, value) in trailers {
        map.insert(*name, value.parse().unwrap());
    }
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(data.as_bytes()))),
        Ok(http_body::Frame::trailers(map)),
    ];
    Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        frames,
    )))
}

#[tokio::test]
async fn trailers_pass_both_ways_when_the_client_accepts_them() {
    // Answers what it saw (TE, the request's trailer), with a trailer of its own.
    let backend = TestBackend::start(|request: Request<Incoming>| async move {
        let te = request
            .headers()
            .get("te")
            .map_or("none".to_owned(), |te| te.to_str().unwrap().to_owned());
        let body = request.into_body().collect().await.unwrap();
        let checksum = body
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        let seen: &'static str = Box::leak(format!("te={te} checksum={checksum}").into_boxed_str());
        Response::builder()
            .header("trailer", "x-result")
            .body(body_with_trailers(seen, &[("x-result", "ok")]))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;

    let collect = |response: Response<Incoming>| async move {
        let body = response.into_body().collect().await.unwrap();
        let trailer = body.trailers().and_then(|t| t.get("x-result")).cloned();
        (
            String::from_utf8(body.to_bytes().to_vec()).unwrap(),
            trailer,
        )
    };
    let request = Request::post(proxy.url("/"))
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .body(body_with_trailers("payload", &[("x-checksum", "abc")]))
        .unwrap();
    let response = within("a request with trailers", client().request(request))
        .await
        .unwrap();
    let (seen, trailer) = collect(response).await;
    assert_eq!(seen, "te=trailers checksum=abc");
    assert_eq!(trailer.unwrap(), "ok");

    // HTTP/2 (gRPC's case): the response's trailers arrive.
    let h2: Client<_, Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::post(proxy.url("/"))
        .header("te", "trailers")
        .body(Body::from("payload"))
        .unwrap();
    let response = within("an HTTP/2 request", h2.request(request))
        .await
        .unwrap();
    let (seen, trailer) = collect(response).await;
    assert_eq!(seen, "te=trailers checksum=none");
    assert_eq!(trailer.unwrap(), "ok");

    // A client that did not ask for trailers gets none, and the backend is not offered them.
    let request = Request::post(proxy.url("/"))
        .body(Body::from("payload"))
        .unwrap();
    let response = within("a request without TE", client().request(request))
        .await
        .unwrap();
    let (seen, trailer) = collect(response).await;
    assert_eq!(seen, "te=none checksum=none");
    assert!(trailer.is_none());
}

#[tokio::test]
async fn stats_are_served_on_the_admin_listener_only() {
    let backend = TestBackend::echo("a").await;
    let proxy = Proxy::start(Config::new(vec![backend.backend()])).await;
    // On the public port the path is the backend's, like any other.
    let (status, body) = get(&proxy, "/_lb/stats").await;
    assert_eq!(
        (status, Echo::parse(&body).backend.as_str()),
        (StatusCode::OK, "a")
    );
    let stats = proxy.stats().await;
    assert_eq!(stats["picks"], 1);

    let defaults = cli::parse_args(std::iter::empty()).unwrap();
    assert!(defaults.admin_listen.ip().is_loopback());
    assert_eq!(defaults.admin_listen.port(), 9901);
}

/// A backend that reads the whole request body before answering how many bytes it got, and
/// reports each request's arrival.
async fn reading_backend(arrivals: mpsc::UnboundedSender<()>) -> TestBackend {
    TestBackend::start(move |request: Request<Incoming>| {
        let arrivals = arrivals.clone();
        async move {
            let _ = arrivals.send(());
            match request.into_body().collect().await {
                Ok(body) => Response::new(Body::from(format!("read {}", body.to_bytes().len()))),
                Err(_) => Response::new(Body::from("broken body")),
            }
        }
    })
    .await
}

#[tokio::test]
async fn malformed_or_abandoned_request_bodies_are_the_client_s_fault() {
    use tokio::io::AsyncWriteExt;
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let backend = reading_backend(arrivals_tx).await;
    let mut config = Config::new(vec![backend.backend()]);
    // Three failures in a row would eject it: five faults of each kind must not.
    config.outlier = OutlierDetection::new().consecutive_failures(3);
    let proxy = Proxy::start(config).await;

    for _ in 0..5 {
        let answer = raw(
            proxy.addr,
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await;
        assert!(
            answer.is_empty() || raw_status(&answer) == 400,
            "a malformed chunk: {answer:?}"
        );
        if !answer.is_empty() {
            assert_eq!(raw_body(&answer), "400 Bad Request\n");
        }
    }
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
            .await
            .unwrap();
        within("the abandoned upload reaching the backend", arrivals.recv()).await;
        drop(stream);
    }
    wait_for_stats(&proxy, "every request settled", |stats| {
        stats["in_flight"] == 0
    })
    .await;

    let stats = backend_stats(&proxy, backend.addr).await;
    assert_eq!(stats["failures"], 0, "{stats}");
    assert_eq!(stats["ejections"], 0, "{stats}");
    assert_eq!(stats["status"], "active", "{stats}");
    let (status, body) = get(&proxy, "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "read 0"));
}

#[tokio::test]
async fn a_request_body_that_stalls_gets_408_and_the_backend_is_not_blamed() {
    let (arrivals_tx, _arrivals) = mpsc::unbounded_channel();
    let backend = reading_backend(arrivals_tx).await;
    let mut config = Config::new(vec![backend.backend()]);
    config.body_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;

    let answer = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
    )
    .await;
    assert_eq!(raw_status(&answer), 408, "{answer:?}");
    wait_for_stats(&proxy, "the request settled", |stats| {
        stats["in_flight"] == 0
    })
    .await;
    assert_eq!(backend_stats(&proxy, backend.addr).await["failures"], 0);
}

#[tokio::test]
async fn idle_backend_connections_are_capped_and_expire() {
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let backend = holding_backend("a", arrivals_tx, released).await;
    let mut config = Config::new(vec![backend.backend()]);
    config.upstream.pool_max_idle = 2;
    config.upstream.pool_idle_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;

    // A burst: twelve requests at once, so twelve connections to the backend.
    let mut requests = JoinSet::new();
    for _ in 0..12 {
        requests.spawn(send(
            Request::get(proxy.url("/")).body(Body::empty()).unwrap(),
        ));
    }
    for _ in 0..12 {
        within("the burst reaching the backend", arrivals.recv()).await;
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 12);
    release.send(true).unwrap();
    for (status, _, _) in within("the burst", requests.join_all()).await {
        assert_eq!(status, StatusCode::OK);
    }
    let open = || backend.connections.load(Ordering::SeqCst);
    wait_until("all but 2 idle connections closed", || open() <= 2).await;
    wait_until("the idle connections expiring", || open() == 0).await;
}

#[tokio::test]
async fn a_502_says_nothing_about_the_backend() {
    use tokio::io::AsyncReadExt;
    // Reads the request, then hangs up without an answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _rude = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0; 1024];
            let _ = stream.read(&mut buf).await;
        }
    });
    let proxy = Proxy::start(Config::new(vec![Backend {
        addr,
        weight: Weight::ONE,
    }]))
    .await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::BAD_GATEWAY, "502 Bad Gateway\n")
    );
    assert_eq!(backend_stats(&proxy, addr).await["failures"], 1);
}

#[tokio::test]
async fn a_shutdown_waits_for_an_open_tunnel_until_the_deadline_then_cuts_it() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (backend, _server) = websocket_echo_backend().await;
    let mut config = Config::new(vec![Backend {
        addr: backend,
        weight: Weight::ONE,
    }]);
    config.server.shutdown_timeout = Duration::from_millis(300);
    let mut proxy = Proxy::start(config).await;
    let (mut socket, _) = within(
        "the WebSocket handshake through the proxy",
        tokio_tungstenite::connect_async(format!("ws://{}/live", proxy.addr)),
    )
    .await
    .unwrap();

    proxy.shutdown.take().unwrap().send(()).unwrap();
    // Draining: the tunnel still carries messages.
    socket.send(Message::text("still there?")).await.unwrap();
    let echoed = within("the echo while draining", socket.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("still there?"));

    within("the proxy to stop at its deadline", &mut proxy.server)
        .await
        .unwrap();
    within("the tunnel being cut", async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

#[tokio::test]
async fn hashing_by_a_forwarding_header_sees_it_as_the_client_sent_it() {
    let backends = [
        TestBackend::echo("a").await,
        TestBackend::echo("b").await,
        TestBackend::echo("c").await,
    ];
    let proxy = proxy_with(
        "nginx-hash-header:x-forwarded-for",
        backends.iter().map(|b| b.backend()).collect(),
    )
    .await;
    // The same X-Forwarded-For from two client addresses: the proxy appends each client to
    // the header it forwards, but the key is the header the client sent, so both land on the
    // same backend.
    for user in 0..8 {
        let mut landed = Vec::new();
        for host in [2u8, 3] {
            let mut connector = HttpConnector::new();
            connector.set_local_address(Some(std::net::IpAddr::from([127, 0, 0, host])));
            let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build(connector);
            let request = Request::get(proxy.url("/"))
                .header("x-forwarded-for", format!("198.51.100.{user}"))
                .body(Body::empty())
                .unwrap();
            let response = within("a request", client.request(request)).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let echo = Echo::parse(std::str::from_utf8(&body).unwrap());
            assert_eq!(
                echo.header("x-forwarded-for"),
                [format!("198.51.100.{user}, 127.0.0.{host}")]
            );
            landed.push(echo.backend);
        }
        assert_eq!(landed[0], landed[1], "user {user}");
    }
}

#[tokio::test]
async fn backends_found_by_dns_follow_a_changing_record_and_srv_records() {
    let (port, mut listeners) = listeners_on_one_port(2).await;
    let b = TestBackend::echo_on("b", listeners.pop().unwrap());
    let a = TestBackend::echo_on("a", listeners.pop().unwrap());
    let srv = TestBackend::echo_on("srv", TcpListener::bind("127.0.0.4:0").await.unwrap());
    let server = Dnsmasq::start(
        1,
        "127.0.0.2 web.test\n",
        &[
            format!(
                "--srv-host=_http._tcp.api.test,srv.api.test,{},1,1",
                srv.addr.port()
            ),
            "--host-record=srv.api.test,127.0.0.4".to_owned(),
        ],
    );
    let mut config = Config::new(Vec::new());
    // As `--backend web.test:PORT --backend-srv _http._tcp.api.test --dns-server ADDR` give,
    // with a 1 s floor for the test's sake.
    let args = [
        "--backend".to_owned(),
        format!("web.test:{port}"),
        "--backend-srv".to_owned(),
        "_http._tcp.api.test".to_owned(),
        "--dns-server".to_owned(),
        server.addr().to_string(),
    ];
    config.dns = cli::parse_args(args.into_iter()).unwrap().config.dns;
    config.dns.resolver = config
        .dns
        .resolver
        .map(|r| r.ttl_floor(Duration::from_secs(1)).unwrap());
    let proxy = Proxy::start(config).await;

    let mut answered = HashMap::new();
    within("a and srv answering", async {
        while answered.len() < 2 {
            let (status, body) = get(&proxy, "/").await;
            if status == StatusCode::OK {
                *answered.entry(Echo::parse(&body).backend).or_insert(0) += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(
        answered
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        ["a", "srv"].into()
    );

    // The record moves from a to b while requests flow: every request succeeds, and within
    // the floor and a second only b and srv answer.
    server.set_hosts("127.0.0.3 web.test\n");
    let changed = std::time::Instant::now();
    let mut after_change = HashMap::new();
    within("b answering instead of a", async {
        loop {
            let (status, body) = get(&proxy, "/").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let backend = Echo::parse(&body).backend;
            if backend == "b" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..20 {
            let (status, body) = get(&proxy, "/").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            *after_change.entry(Echo::parse(&body).backend).or_insert(0) += 1;
        }
    })
    .await;
    assert!(
        changed.elapsed() < Duration::from_secs(3),
        "{:?}",
        changed.elapsed()
    );
    assert!(
        !after_change.contains_key("a"),
        "a is gone: {after_change:?}"
    );
    assert_eq!(after_change.values().sum::<usize>(), 20);

    let stats = proxy.stats().await;
    let listed: Vec<&str> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "active")
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    let mut listed = listed;
    listed.sort();
    let mut expected = vec![b.addr.to_string(), srv.addr.to_string()];
    expected.sort();
    assert_eq!(listed, expected);
    // a was up all along: it left because DNS stopped naming it.
    drop(a);
}

#[test]
fn the_command_line_takes_dns_names_and_srv_names() {
    let parse = |args: &[&str]| cli::parse_args(args.iter().map(|a| a.to_string()));
    let args = parse(&[
        "--backend",
        "api.test:8080=3",
        "--backend",
        "10.0.0.1:80",
        "--backend-srv",
        "_http._tcp.web.test",
        "--dns-server",
        "127.0.0.1:5353",
    ])
    .unwrap();
    assert_eq!(
        args.config.dns.names,
        [("api.test:8080".to_owned(), Weight::new(3).unwrap())]
    );
    assert_eq!(args.config.dns.srv, ["_http._tcp.web.test"]);
    assert!(args.config.dns.resolver.is_some());
    assert_eq!(args.config.backends.len(), 1);

    let error = |args: &[&str]| parse(args).err().unwrap();
    assert!(error(&["--backend", "api.test:70000"]).contains("out of range"));
    assert!(error(&["--backend", "bad name:80"]).contains("not a host:port address"));
    assert!(error(&["--backend", "a.test:80", "--backend", "a.test:80"]).contains("twice"));
    assert!(error(&["--backend-srv", ""]).contains("empty"));
    assert!(error(&["--backend-srv", "_http._tcp.web.test:80"]).contains("no port"));
    assert!(error(&["--dns-server", "localhost"]).contains("not an ip:port"));
}
