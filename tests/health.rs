//! Active health checking: counting, timing, timeouts, concurrency and shutdown with user
//! probes on tokio's paused clock; TCP and HTTP probes against real loopback servers.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Echo;
use futures::StreamExt;
use tokio::time::Instant;
use tower::discover::Change;
use tower_lb::{
    discover,
    health::{probe_fn, HealthCheck, HealthCheckBuilder, InitialHealth, Probe, ProbeErrorKind},
};
use tower_lb::{strategy::RoundRobin, Balance};

type Key = &'static str;

/// A change as the tests compare it: `(+|-, key)`.
fn seen<S>(change: Change<Key, S>) -> (char, Key) {
    match change {
        Change::Insert(key, _) => ('+', key),
        Change::Remove(key) => ('-', key),
    }
}

/// What a user probe answers per endpoint (healthy unless set), and how it was called.
#[derive(Clone, Default)]
struct Verdicts {
    healthy: Arc<Mutex<HashMap<Key, bool>>>,
    calls: Arc<AtomicUsize>,
}

impl Verdicts {
    fn set(&self, key: Key, healthy: bool) {
        self.healthy.lock().unwrap().insert(key, healthy);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A probe that answers at once.
    fn probe<S: 'static>(
        &self,
    ) -> impl Probe<Key, S, Future = impl Future + Send> + Send + 'static {
        let verdicts = self.clone();
        probe_fn(move |key: &Key, _: &S| {
            verdicts.calls.fetch_add(1, Ordering::SeqCst);
            let healthy = verdicts.healthy.lock().unwrap().get(key).copied();
            let healthy = healthy.unwrap_or(true);
            async move { healthy }
        })
    }
}

/// The next item of `stream`, failing the test if none comes within 10 virtual minutes.
async fn next<St: futures::Stream + Unpin>(stream: &mut St) -> Option<St::Item> {
    tokio::time::timeout(Duration::from_secs(600), stream.next())
        .await
        .expect("the stream yields or ends in time")
}

fn config() -> HealthCheckBuilder {
    HealthCheckBuilder::new()
}

/// Everything `check` yields until `deadline`, with the virtual time it came at.
async fn changes_until<St, S>(check: &mut St, deadline: Instant) -> Vec<(Duration, (char, Key))>
where
    St: futures::Stream<Item = Result<Change<Key, S>, std::convert::Infallible>> + Unpin,
{
    let start = Instant::now();
    let mut changes = Vec::new();
    while let Ok(Some(change)) = tokio::time::timeout_at(deadline, check.next()).await {
        changes.push((start.elapsed(), seen(change.unwrap())));
    }
    changes
}

#[tokio::test(start_paused = true)]
async fn a_healthy_endpoint_leaves_at_its_fall_th_failed_probe_and_returns_at_its_rise_th() {
    let verdicts = Verdicts::default();
    let mut check = config()
        .initial_health(InitialHealth::FullyHealthy)
        .jitter(0.0)
        .build(discover::fixed([("a", Echo(0))]), verdicts.probe())
        .unwrap();
    let status = check.status();
    let start = Instant::now();

    assert_eq!(seen(next(&mut check).await.unwrap().unwrap()), ('+', "a"));
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "assumed healthy: inserted at once"
    );

    // Probes run at 0 s, 2 s, 4 s, ...: the one at 0 s passed; from 2 s on they fail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    verdicts.set("a", false);
    let changes = changes_until(&mut check, start + Duration::from_secs(29)).await;
    let health = status.get(&"a").unwrap();
    assert!(health.probes >= 4);
    // fall = 3: the failures at 2 s and 4 s leave it in; the one at 6 s removes it.
    assert_eq!(changes.first(), Some(&(Duration::from_secs(5), ('-', "a"))));
    assert_eq!(changes.len(), 1);
    assert!(!health.healthy);
    assert_eq!(health.last_error.unwrap().kind(), ProbeErrorKind::Unhealthy);

    verdicts.set("a", true);
    let back_at = Instant::now();
    let changes = changes_until(&mut check, back_at + Duration::from_secs(10)).await;
    // Now 29 s; probes at 30 s and 32 s pass: rise = 2 re-inserts it at 32 s.
    assert_eq!(changes, [(Duration::from_secs(3), ('+', "a"))]);
    let health = status.get(&"a").unwrap();
    assert!(health.healthy);
    assert_eq!(health.consecutive_failures, 0);
    assert!(health.consecutive_successes >= 2);
}

#[tokio::test(start_paused = true)]
async fn removal_comes_within_the_jitter_bounds() {
    let verdicts = Verdicts::default();
    verdicts.set("a", false);
    let interval = Duration::from_secs(2);
    let jitter = 0.2;
    let mut check = config()
        .initial_health(InitialHealth::FullyHealthy)
        .interval(interval)
        .jitter(jitter)
        .build(discover::fixed([("a", Echo(0))]), verdicts.probe())
        .unwrap();
    let start = Instant::now();
    let changes = changes_until(&mut check, start + Duration::from_secs(60)).await;
    // Failures at 0, then after two jittered intervals: removed at the third.
    let (at, change) = changes[1];
    assert_eq!(change, ('-', "a"));
    assert!(
        at >= interval.mul_f64(2.0 * (1.0 - jitter))
            && at <= interval.mul_f64(2.0 * (1.0 + jitter)),
        "removed after {at:?}"
    );
    assert!(verdicts.calls() >= 3);
}

#[tokio::test(start_paused = true)]
async fn by_default_the_first_probe_decides() {
    let verdicts = Verdicts::default();
    verdicts.set("dead", false);
    let source = discover::fixed([("dead", Echo(0)), ("live", Echo(1))]);
    let mut check = HealthCheck::new(source, verdicts.probe());
    let changes = changes_until(&mut check, Instant::now() + Duration::from_secs(20)).await;
    let at_once: Vec<_> = changes
        .iter()
        .filter(|(at, _)| at.is_zero())
        .map(|(_, change)| *change)
        .collect();
    // Both served at once; the first probe (at once) removes the dead one, not the third.
    assert_eq!(at_once, [('+', "dead"), ('+', "live"), ('-', "dead")]);
    assert_eq!(changes.len(), 3, "{changes:?}");

    // After its first probe passed, "live" is an ordinary healthy endpoint: fall = 3.
    verdicts.set("live", false);
    let start = Instant::now();
    let calls = verdicts.calls();
    let changes = changes_until(&mut check, start + Duration::from_secs(20)).await;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].1, ('-', "live"));
    // Its next probe fails within one (jittered) interval; two more intervals to the third.
    let at = changes[0].0;
    assert!(
        at >= Duration::from_secs(2).mul_f64(2.0 * 0.9),
        "removed after {at:?}: sooner than three failures"
    );
    assert!(
        at <= Duration::from_secs(2).mul_f64(3.0 * 1.1),
        "removed after {at:?}"
    );
    assert!(verdicts.calls() - calls >= 6);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_assumed_unhealthy_waits_for_its_probes() {
    let verdicts = Verdicts::default();
    let mut fully = config()
        .initial_health(InitialHealth::FullyUnhealthy)
        .jitter(0.0)
        .build(discover::fixed([("a", Echo(0))]), verdicts.probe())
        .unwrap();
    let changes = changes_until(&mut fully, Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(
        changes,
        [(Duration::from_secs(2), ('+', "a"))],
        "rise = 2: probes at 0 s and 2 s"
    );

    let mut first_success = config()
        .initial_health(InitialHealth::Unhealthy)
        .build(discover::fixed([("a", Echo(0))]), verdicts.probe())
        .unwrap();
    let changes = changes_until(&mut first_success, Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(
        changes,
        [(Duration::ZERO, ('+', "a"))],
        "one success is enough at first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_slower_than_the_timeout_fails() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let never = probe_fn(move |_: &Key, _: &Echo| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<bool>()
    });
    let mut check = config()
        .initial_health(InitialHealth::FullyHealthy)
        .jitter(0.0)
        .timeout(Duration::from_millis(500))
        .fall(2)
        .build(discover::fixed([("a", Echo(0))]), never)
        .unwrap();
    let status = check.status();
    let changes = changes_until(&mut check, Instant::now() + Duration::from_millis(9900)).await;
    // Probe 0–0.5 s times out; the next starts 2 s after it ended and times out at 3 s.
    assert_eq!(
        changes,
        [
            (Duration::ZERO, ('+', "a")),
            (Duration::from_millis(3000), ('-', "a"))
        ]
    );
    let error = status.get(&"a").unwrap().last_error.unwrap();
    assert_eq!(error.kind(), ProbeErrorKind::TimedOut);
    assert_eq!(error.to_string(), "probe timed out after 500ms");
    // 0, 2.5, 5, 7.5: one probe at a time, each cancelled at its timeout.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn no_more_probes_run_at_once_than_the_limit() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let probe = {
        let (running, most, calls) = (running.clone(), most.clone(), calls.clone());
        probe_fn(move |_: &usize, _: &Echo| {
            let (running, most) = (running.clone(), most.clone());
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                true
            }
        })
    };
    let endpoints = (0..20).map(|i| (i, Echo(i)));
    let mut check = config()
        .max_concurrent_probes(3)
        .build(discover::fixed(endpoints), probe)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, check.next()).await {}
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "probes ran concurrently, never beyond 3"
    );
    // 3 slots × 10 s / 0.3 s per probe bounds the count; every endpoint got its turns.
    let calls = calls.load(Ordering::SeqCst);
    assert!((60..=100).contains(&calls), "{calls} probes");
}

/// Counts probe futures alive (started and not yet dropped).
struct Alive(Arc<AtomicUsize>);

impl Alive {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_stops_probing_and_cancels_probes_in_flight() {
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicUsize::new(0));
    let probe = {
        let (calls, alive) = (calls.clone(), alive.clone());
        probe_fn(move |_: &Key, _: &Echo| {
            calls.fetch_add(1, Ordering::SeqCst);
            let guard = Alive::new(&alive);
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_millis(100)).await;
                true
            }
        })
    };
    let mut check = config()
        .jitter(0.0)
        .build(discover::fixed([("a", Echo(0)), ("b", Echo(1))]), probe)
        .unwrap();
    // Probes of each run 0–0.1 s, 2.1–2.2 s, 4.2–4.3 s: stop in the middle of the third.
    let deadline = Instant::now() + Duration::from_millis(4250);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, check.next()).await {}
    let before = calls.load(Ordering::SeqCst);
    assert_eq!(before, 6, "probing ran");
    assert_eq!(alive.load(Ordering::SeqCst), 2, "two probes in flight");
    drop(check);
    assert_eq!(
        alive.load(Ordering::SeqCst),
        0,
        "probes in flight were dropped"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "no probe after the drop"
    );
}

#[tokio::test(start_paused = true)]
async fn a_candidate_the_source_removes_has_its_probe_in_flight_cancelled() {
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicUsize::new(0));
    let probe = {
        let (calls, alive) = (calls.clone(), alive.clone());
        probe_fn(move |_: &Key, _: &Echo| {
            calls.fetch_add(1, Ordering::SeqCst);
            let guard = Alive::new(&alive);
            async move {
                let _guard = guard;
                std::future::pending::<bool>().await
            }
        })
    };
    let (handle, source) = discover::channel();
    let mut check = HealthCheck::new(source, probe);
    handle.insert("a", Echo(0));
    assert_eq!(seen(next(&mut check).await.unwrap().unwrap()), ('+', "a"));
    assert_eq!(
        alive.load(Ordering::SeqCst),
        1,
        "its first probe is in flight"
    );

    handle.remove("a");
    assert_eq!(seen(next(&mut check).await.unwrap().unwrap()), ('-', "a"));
    assert_eq!(
        alive.load(Ordering::SeqCst),
        0,
        "the probe in flight was dropped"
    );
    let changes = changes_until(&mut check, Instant::now() + Duration::from_secs(30)).await;
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never probed again");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_balancer_stops_probing() {
    let verdicts = Verdicts::default();
    let check = HealthCheck::new(discover::fixed([("a", Echo(0))]), verdicts.probe());
    let status = check.status();
    let balance = Balance::new(check, RoundRobin::new());
    // No traffic: the balancer's background task drives the probes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = verdicts.calls();
    assert!(before >= 4, "probed without traffic: {before}");
    assert_eq!(status.get(&"a").unwrap().probes as usize, before);

    verdicts.set("a", false);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(balance.stats().available(), 0, "removed without traffic");

    drop(balance);
    common::settle().await;
    let after_drop = verdicts.calls();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        verdicts.calls(),
        after_drop,
        "no probe once the balancer is gone"
    );
}

#[tokio::test(start_paused = true)]
async fn source_changes_pass_through_health() {
    let verdicts = Verdicts::default();
    let (handle, source) = discover::channel();
    let mut check = config()
        .initial_health(InitialHealth::FullyHealthy)
        .jitter(0.0)
        .build(source, verdicts.probe())
        .unwrap();
    let status = check.status();
    handle.insert("a", Echo(0));
    handle.insert("b", Echo(1));
    let mut next_seen = async || -> (char, Key, Option<usize>) {
        match next(&mut check).await.unwrap().unwrap() {
            Change::Insert(key, svc) => ('+', key, Some(svc.0)),
            Change::Remove(key) => ('-', key, None),
        }
    };
    assert_eq!(next_seen().await, ('+', "a", Some(0)));
    assert_eq!(next_seen().await, ('+', "b", Some(1)));

    // A new service for a healthy endpoint is passed on.
    handle.insert("a", Echo(10));
    assert_eq!(next_seen().await, ('+', "a", Some(10)));

    // "b" becomes unhealthy; a new service for it waits for its health.
    verdicts.set("b", false);
    assert_eq!(next_seen().await, ('-', "b", None));
    handle.insert("b", Echo(11));
    verdicts.set("b", true);
    assert_eq!(next_seen().await, ('+', "b", Some(11)));

    // The source removes a healthy endpoint: removed at once, and no longer probed.
    handle.remove("a");
    assert_eq!(next_seen().await, ('-', "a", None));
    assert!(status.get(&"a").is_none());
    let calls = verdicts.calls();
    let changes = changes_until(&mut check, Instant::now() + Duration::from_secs(10)).await;
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(
        verdicts.calls() - calls,
        5,
        "only \"b\" is probed, every 2 s"
    );

    // An unhealthy endpoint leaves silently: the balancer never had it.
    verdicts.set("b", false);
    let changes = changes_until(&mut check, Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(changes.len(), 1);
    handle.remove("b");
    drop(handle);
    assert!(
        next(&mut check).await.is_none(),
        "source ended with nothing left to probe"
    );
}

#[tokio::test(start_paused = true)]
async fn source_errors_pass_through() {
    let source = futures::stream::iter([
        Ok(Change::Insert("a", Echo(0))),
        Err("resolver down"),
        Ok(Change::Insert("b", Echo(1))),
    ]);
    let mut check = HealthCheck::new(source, Verdicts::default().probe());
    assert!(matches!(
        next(&mut check).await,
        Some(Ok(Change::Insert("a", _)))
    ));
    assert_eq!(next(&mut check).await.unwrap().err(), Some("resolver down"));
    assert!(matches!(
        next(&mut check).await,
        Some(Ok(Change::Insert("b", _)))
    ));
}

#[test]
fn bad_configuration_is_a_typed_error_at_build() {
    let build = |config: HealthCheckBuilder| {
        config
            .build(
                discover::fixed([("a", Echo(0))]),
                probe_fn(|_: &&str, _: &Echo| async { true }),
            )
            .map(|_| ())
    };
    let zero_interval = build(config().interval(Duration::ZERO)).unwrap_err();
    assert_eq!(zero_interval.setting(), "interval");
    let rise = build(config().rise(0)).unwrap_err();
    assert_eq!(rise.setting(), "rise");
    assert!(rise.to_string().contains("at least 1"), "{rise}");
    assert_eq!(
        build(config().timeout(Duration::ZERO))
            .unwrap_err()
            .setting(),
        "timeout"
    );
    assert_eq!(
        build(config().fall(u32::MAX)).unwrap_err().setting(),
        "fall"
    );
    assert!(build(config()).is_ok());
}

#[cfg_attr(not(feature = "http"), allow(dead_code))]
mod loopback {
    //! Probes against real servers on loopback, on the real clock with short intervals: a
    //! paused clock would advance past a pending connect. Every wait is bounded.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpSocket};
    use tokio::task::JoinSet;
    use tokio::time::Instant;
    use tower_lb::{
        discover,
        health::{HealthCheckBuilder, InitialHealth, ProbeErrorKind, TcpProbe},
    };

    /// Polls `condition` every 5 ms until it holds; fails the test after 5 s.
    pub(super) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    }

    #[tokio::test]
    async fn a_closed_port_fails_a_tcp_probe_and_an_open_one_passes() {
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap();
        let closed_addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let check = HealthCheckBuilder::new()
            .interval(Duration::from_millis(20))
            .initial_health(InitialHealth::FullyUnhealthy)
            .rise(1)
            .build(
                discover::fixed([(open_addr, ()), (closed_addr, ())]),
                TcpProbe::new(),
            )
            .unwrap();
        let status = check.status();
        let mut check = check;
        let inserted =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut check))
                .await
                .unwrap();
        assert!(
            matches!(inserted, Some(Ok(tower::discover::Change::Insert(addr, ()))) if addr == open_addr)
        );
        // Let the closed port be probed a few more times.
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            futures::StreamExt::next(&mut check),
        )
        .await;
        let closed = status.get(&closed_addr).unwrap();
        assert!(!closed.healthy);
        assert!(closed.consecutive_failures >= 2);
        let error = closed.last_error.unwrap();
        assert_eq!(error.kind(), ProbeErrorKind::Failed);
        let io = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .expect("the connect error");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(status.get(&open_addr).unwrap().healthy);
        drop(open);
    }

    /// A real HTTP/1.1 server answering `status` (shared, switchable) and its name; stopping
    /// it closes the listener and every connection.
    pub(super) struct Backend {
        pub(super) addr: SocketAddr,
        server: tokio::task::JoinHandle<()>,
    }

    impl Backend {
        pub(super) async fn start(
            name: &'static str,
            addr: SocketAddr,
            status: Arc<AtomicU16>,
        ) -> Self {
            let socket = TcpSocket::new_v4().unwrap();
            // The port is reused on restart, while the old connections sit in TIME_WAIT.
            socket.set_reuseaddr(true).unwrap();
            socket.bind(addr).unwrap();
            let listener = socket.listen(64).unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                // Dropped with this task: aborts every connection.
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let status = status.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(
                            move |_: http::Request<hyper::body::Incoming>| {
                                let status = status.load(Ordering::SeqCst);
                                async move {
                                    let mut response = http::Response::new(
                                        http_body_util::Full::new(bytes::Bytes::from(name)),
                                    );
                                    *response.status_mut() =
                                        http::StatusCode::from_u16(status).unwrap();
                                    Ok::<_, Infallible>(response)
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self { addr, server }
        }

        pub(super) async fn stop(self) {
            self.server.abort();
            let _ = self.server.await;
        }
    }
}

#[cfg(feature = "http")]
mod http_probe {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::time::Instant;
    use tower::{Service, ServiceExt};
    use tower_lb::http::connect;
    use tower_lb::{
        discover,
        health::{HealthCheckBuilder, ProbeErrorKind},
        http::HttpProbe,
    };
    use tower_lb::{strategy::RoundRobin, Balance, EndpointStatus};

    use super::loopback::{eventually, Backend};

    const INTERVAL: Duration = Duration::from_millis(100);
    const JITTER: f64 = 0.1;

    #[tokio::test]
    async fn a_stopped_server_leaves_the_balancer_after_fall_probes_and_returns_after_rise() {
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let ok = || Arc::new(AtomicU16::new(200));
        let a = Backend::start("a", any_port, ok()).await;
        let b = Backend::start("b", any_port, ok()).await;
        let (a_addr, b_addr) = (a.addr, b.addr);

        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let endpoints = connect(
            client.clone(),
            discover::fixed([(a_addr, a_addr), (b_addr, b_addr)]),
        );
        let check = HealthCheckBuilder::new()
            .interval(INTERVAL)
            .jitter(JITTER)
            .timeout(Duration::from_millis(500))
            .build(endpoints, HttpProbe::new(&client, "/healthz").unwrap())
            .unwrap();
        let status = check.status();
        let mut balance = Balance::new(check, RoundRobin::new());
        let active = |balance: &Balance<_, _, _>, addr: SocketAddr| {
            balance
                .stats()
                .get(&addr)
                .is_some_and(|e| e.status == EndpointStatus::Active)
        };
        eventually("both are probed healthy", || {
            status
                .get(&a_addr)
                .is_some_and(|h| h.consecutive_successes >= 2)
                && status
                    .get(&b_addr)
                    .is_some_and(|h| h.consecutive_successes >= 2)
        })
        .await;
        assert_eq!(balance.stats().available(), 2);

        let stopped = Instant::now();
        b.stop().await;
        let removed = eventually("b leaves the balancer", || !active(&balance, b_addr)).await;
        let took = removed - stopped;
        // Three failed probes, at most one interval apart after the first: more than two
        // shortest intervals, within three longest ones (plus slack for a busy machine).
        assert!(
            took >= INTERVAL.mul_f64(2.0 * (1.0 - JITTER)),
            "removed after only {took:?}"
        );
        assert!(
            took <= INTERVAL.mul_f64(3.0 * (1.0 + JITTER)) + Duration::from_millis(700),
            "removed after {took:?}"
        );
        let b_health = status.get(&b_addr).unwrap();
        assert!(b_health.consecutive_failures >= 3);
        assert_eq!(b_health.last_error.unwrap().kind(), ProbeErrorKind::Failed);
        assert!(active(&balance, a_addr));

        // Requests go to "a" only.
        for _ in 0..4 {
            let request = http::Request::get("/").body(Empty::new()).unwrap();
            let response = balance.ready().await.unwrap().call(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "a");
        }

        let restarted = Instant::now();
        let b = Backend::start("b", b_addr, ok()).await;
        let back = eventually("b is back in the balancer", || active(&balance, b_addr)).await;
        let took = back - restarted;
        // rise = 2: the second success comes at least one short interval after the first.
        assert!(
            took >= INTERVAL.mul_f64(1.0 - JITTER),
            "back after only {took:?}"
        );
        assert!(
            took <= INTERVAL.mul_f64(2.0 * (1.0 + JITTER)) + Duration::from_millis(700),
            "back after {took:?}"
        );
        assert_eq!(balance.stats().available(), 2);
        b.stop().await;
        a.stop().await;
    }

    #[tokio::test]
    async fn an_unexpected_status_fails_the_probe() {
        let code = Arc::new(AtomicU16::new(200));
        let server = Backend::start("a", "127.0.0.1:0".parse().unwrap(), code.clone()).await;
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let probe = HttpProbe::new(&client, "/healthz")
            .unwrap()
            .expect_statuses([200..=200, 204..=204])
            .unwrap();
        let check = HealthCheckBuilder::new()
            .interval(Duration::from_millis(20))
            .fall(1)
            .build(discover::fixed([(server.addr, ())]), probe)
            .unwrap();
        let status = check.status();
        let balance = Balance::new(check, RoundRobin::new());
        eventually("probed", || {
            status.get(&server.addr).is_some_and(|h| h.probes >= 2)
        })
        .await;
        assert_eq!(balance.stats().available(), 1);

        code.store(503, Ordering::SeqCst);
        eventually("503 removes it", || balance.stats().available() == 0).await;
        let error = status.get(&server.addr).unwrap().last_error.unwrap();
        assert_eq!(error.kind(), ProbeErrorKind::UnexpectedStatus(503));

        code.store(204, Ordering::SeqCst);
        eventually("204 is expected too", || balance.stats().available() == 1).await;
        server.stop().await;
    }

    #[test]
    fn an_unparsable_probe_path_or_status_range_is_a_typed_error() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        for path in ["healthz", "http://10.0.0.1/healthz", "/health z", "/h#x"] {
            let error = HttpProbe::new(&client, path).unwrap_err();
            assert_eq!(error.setting(), "probe path", "{path:?}");
        }
        let probe = HttpProbe::new(&client, "/healthz").unwrap();
        assert!(probe.clone().expect_statuses([]).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = probe.clone().expect_statuses([300..=200]);
        assert!(reversed.is_err());
        assert!(probe.expect_statuses([0..=99]).is_err());
    }
}

mod counting {
    //! The yielded changes follow rise/fall counting exactly, for any run of probe results.

    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// The changes a reference model of the counting rules expects: `(second, +|-)`, where
    /// probe `i` runs at second `i` (jitter 0) and the initial insert comes at second 0.
    fn model(initial: InitialHealth, rise: u32, fall: u32, results: &[bool]) -> Vec<(usize, char)> {
        let mut healthy = matches!(
            initial,
            InitialHealth::Healthy | InitialHealth::FullyHealthy
        );
        let mut first_decides =
            matches!(initial, InitialHealth::Healthy | InitialHealth::Unhealthy);
        let mut changes = Vec::new();
        if healthy {
            changes.push((0, '+'));
        }
        let (mut successes, mut failures) = (0, 0);
        for (i, &ok) in results.iter().enumerate() {
            let (rise, fall) = if first_decides { (1, 1) } else { (rise, fall) };
            first_decides = false;
            if ok {
                successes += 1;
                failures = 0;
                if !healthy && successes >= rise {
                    healthy = true;
                    changes.push((i, '+'));
                }
            } else {
                failures += 1;
                successes = 0;
                if healthy && failures >= fall {
                    healthy = false;
                    changes.push((i, '-'));
                }
            }
        }
        changes
    }

    async fn run(
        initial: InitialHealth,
        rise: u32,
        fall: u32,
        results: Vec<bool>,
    ) -> Vec<(usize, char)> {
        let queue = Arc::new(Mutex::new(results.iter().copied().collect::<VecDeque<_>>()));
        let probe = probe_fn(move |_: &Key, _: &Echo| {
            let ok = queue.lock().unwrap().pop_front().unwrap_or(true);
            async move { ok }
        });
        let mut check = config()
            .initial_health(initial)
            .rise(rise)
            .fall(fall)
            .interval(Duration::from_secs(1))
            .jitter(0.0)
            .build(discover::fixed([("a", Echo(0))]), probe)
            .unwrap();
        // Probe i runs at i seconds; stop before the probe after the last result.
        let start = Instant::now();
        let deadline = start + Duration::from_millis(results.len() as u64 * 1000 - 500);
        let mut changes = Vec::new();
        while let Ok(Some(change)) = tokio::time::timeout_at(deadline, next(&mut check)).await {
            changes.push((
                start.elapsed().as_secs_f64() as usize,
                seen(change.unwrap()).0,
            ));
        }
        changes
    }

    fn initial() -> impl Strategy<Value = InitialHealth> {
        prop_oneof![
            Just(InitialHealth::Healthy),
            Just(InitialHealth::FullyHealthy),
            Just(InitialHealth::Unhealthy),
            Just(InitialHealth::FullyUnhealthy),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn changes_match_the_counting_rules(
            initial in initial(),
            rise in 1u32..4,
            fall in 1u32..4,
            results in proptest::collection::vec(any::<bool>(), 1..24),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let changes = runtime.block_on(run(initial, rise, fall, results.clone()));
            prop_assert_eq!(changes, model(initial, rise, fall, &results));
        }
    }
}
