//! End-to-end tests of the reverse proxy example (`examples/proxy`): real HTTP backends, the
//! proxy and a client, all on loopback in this process. The proxy's code is the example's
//! own `app.rs` and `cli.rs`, included below.
#![cfg(feature = "http")]

#[path = "../examples/proxy/app.rs"]
#[allow(dead_code)]
mod app;
#[path = "../examples/proxy/body.rs"]
mod body;
#[path = "../examples/proxy/cli.rs"]
#[allow(dead_code)]
mod cli;
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use app::{ActiveHealth, Backend, Config, StrategySpec};
use axum::body::Body;
use bytes::Bytes;
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
use tower_lb::discover::HealthCheckBuilder;
use tower_lb::health::OutlierDetection;
use tower_lb::Weight;

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
}

impl TestBackend {
    async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // Owned by this task, so aborting it drops (and aborts) every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let response = handler(request);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, server }
    }

    /// A backend that answers its name, then one `name: value` line per header it received.
    async fn echo(name: &'static str) -> Self {
        Self::start(move |request: Request<Incoming>| async move {
            let mut body = format!("{name}\n");
            for (header, value) in request.headers() {
                body.push_str(&format!("{header}: {}\n", value.to_str().unwrap()));
            }
            Response::new(Body::from(body))
        })
        .await
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
    config.outlier = OutlierDetection::new().consecutive_failures(3).unwrap();
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
        .unwrap()
        .timeout(Duration::from_millis(500))
        .unwrap()
        .fall(1)
        .unwrap()
        .rise(2)
        .unwrap();
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
    assert!(StrategySpec::parse("round-robin").is_ok());
}
