//! `EndpointSlices` driven by a real `kube::Client` against a fake API server on loopback
//! that speaks the real list/watch protocol (see `fake_api`).

mod fake_api;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tower::discover::Change;
use tower::{Layer, ServiceExt};
use tower_lb::strategy::RoundRobin;
use tower_lb::{discover, Balance, BalanceLayer, EndpointStatus, Error as LbError};
use tower_lb_kube::{EndpointSlices, Error};

use fake_api::{slice, FakeApiServer};

const NS: &str = "shop";
const SERVICE: &str = "echo";
const PORTS: &[(&str, u16)] = &[("http", 8080), ("grpc", 9090)];

/// Every test is bounded: a hang fails the test instead of stalling the suite.
async fn within_limit<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the test finished within 30 s")
}

/// Endpoint conditions as (ready, serving, terminating).
const READY: (bool, bool, bool) = (true, true, false);
const TERMINATING: (bool, bool, bool) = (false, true, true);

fn endpoints<'a>(list: &[(&'a str, (bool, bool, bool))]) -> Vec<(&'a str, bool, bool, bool)> {
    list.iter()
        .map(|&(ip, (ready, serving, terminating))| (ip, ready, serving, terminating))
        .collect()
}

fn echo_slice(name: &str, list: &[(&str, (bool, bool, bool))]) -> serde_json::Value {
    slice(SERVICE, name, PORTS, &endpoints(list))
}

fn source(server: &FakeApiServer) -> EndpointSlices {
    EndpointSlices::new(server.client(), NS, SERVICE)
        .unwrap()
        .port_name("grpc")
        .unwrap()
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .unwrap()
}

type Item = Result<Change<SocketAddr, SocketAddr>, Error>;

/// The next item, within 5 s.
async fn next(stream: &mut (impl Stream<Item = Item> + Unpin)) -> Item {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an item within 5 s")
        .expect("the stream does not end")
}

/// The next `n` changes as `+addr` / `-addr`, and how many errors came in between.
async fn changes(
    stream: &mut (impl Stream<Item = Item> + Unpin),
    n: usize,
) -> (Vec<String>, usize) {
    let mut changes = Vec::new();
    let mut errors = 0;
    while changes.len() < n {
        match next(stream).await {
            Ok(Change::Insert(key, addr)) => {
                assert_eq!(key, addr, "keyed by the address");
                changes.push(format!("+{key}"));
            }
            Ok(Change::Remove(key)) => changes.push(format!("-{key}")),
            Err(_) => errors += 1,
        }
    }
    (changes, errors)
}

/// Writes a slice with one fresh ready endpoint and checks that its insert is the very next
/// change: nothing else was pending before it.
async fn assert_nothing_pending(
    server: &FakeApiServer,
    stream: &mut (impl Stream<Item = Item> + Unpin),
) {
    server.apply(NS, echo_slice("sentinel", &[("10.9.9.9", READY)]));
    assert_eq!(
        changes(stream, 1).await.0,
        ["+10.9.9.9:9090"],
        "no change was pending"
    );
    server.delete(NS, "sentinel");
    assert_eq!(changes(stream, 1).await.0, ["-10.9.9.9:9090"]);
}

#[tokio::test]
async fn slices_added_modified_and_deleted_become_inserts_and_removes() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", READY), ("10.0.0.2", READY)]),
        );
        // Another Service's slice and another namespace's are not ours.
        server.apply(
            NS,
            slice(
                "other",
                "other-a",
                PORTS,
                &endpoints(&[("10.1.0.1", READY)]),
            ),
        );
        server.apply("elsewhere", echo_slice("echo-z", &[("10.2.0.1", READY)]));
        let mut stream = source(&server);

        // The named port `grpc` (9090), not the slice's first port.
        assert_eq!(
            changes(&mut stream, 2).await,
            (vec!["+10.0.0.1:9090".into(), "+10.0.0.2:9090".into()], 0)
        );

        server.apply(NS, echo_slice("echo-b", &[("10.0.0.3", READY)]));
        assert_eq!(changes(&mut stream, 1).await.0, ["+10.0.0.3:9090"]);

        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", READY), ("10.0.0.4", READY)]),
        );
        assert_eq!(
            changes(&mut stream, 2).await.0,
            ["-10.0.0.2:9090", "+10.0.0.4:9090"]
        );

        server.delete(NS, "echo-b");
        assert_eq!(changes(&mut stream, 1).await.0, ["-10.0.0.3:9090"]);

        assert_nothing_pending(&server, &mut stream).await;
        assert_eq!(server.requests().0, 1, "one list, then one watch");
    })
    .await;
}

#[tokio::test]
async fn an_address_in_two_slices_is_one_endpoint() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        server.apply(NS, echo_slice("echo-a", &[("10.0.0.1", READY)]));
        server.apply(
            NS,
            echo_slice("echo-b", &[("10.0.0.1", READY), ("10.0.0.2", READY)]),
        );
        let mut stream = source(&server);
        assert_eq!(
            changes(&mut stream, 2).await.0,
            ["+10.0.0.1:9090", "+10.0.0.2:9090"]
        );

        // The controller moves 10.0.0.1 out of echo-a: still in echo-b, so nothing changes.
        server.apply(NS, echo_slice("echo-a", &[]));
        assert_nothing_pending(&server, &mut stream).await;

        // Gone from the last slice that had it: removed once.
        server.apply(NS, echo_slice("echo-b", &[("10.0.0.2", READY)]));
        assert_eq!(changes(&mut stream, 1).await.0, ["-10.0.0.1:9090"]);
        server.delete(NS, "echo-a");
        assert_nothing_pending(&server, &mut stream).await;
    })
    .await;
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_resource_version_without_a_relist() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        server.apply(NS, echo_slice("echo-a", &[("10.0.0.1", READY)]));
        let mut stream = source(&server);
        assert_eq!(changes(&mut stream, 1).await.0, ["+10.0.0.1:9090"]);
        // The sentinel comes through the watch: it is open.
        assert_nothing_pending(&server, &mut stream).await;
        assert_eq!(server.requests(), (1, 1));

        // The API server ends the watch (its timeout, a restart); changes made meanwhile are
        // replayed to the resumed watch.
        server.end_watches();
        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", READY), ("10.0.0.2", READY)]),
        );
        server.apply(NS, echo_slice("echo-b", &[("10.0.0.3", READY)]));
        assert_eq!(
            changes(&mut stream, 2).await.0,
            ["+10.0.0.2:9090", "+10.0.0.3:9090"]
        );
        assert_eq!(server.requests(), (1, 2), "watched again, not listed again");
    })
    .await;
}

#[tokio::test]
async fn an_expired_watch_lists_again_and_emits_only_the_difference() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", READY), ("10.0.0.2", READY)]),
        );
        server.apply(NS, echo_slice("echo-b", &[("10.0.0.3", READY)]));
        let mut stream = source(&server);
        assert_eq!(changes(&mut stream, 3).await.0.len(), 3);
        assert_nothing_pending(&server, &mut stream).await;

        // While the watch is down: echo-b is deleted, 10.0.0.2 leaves echo-a, 10.0.0.4 joins
        // it, echo-c appears; then the history is compacted, so the resumed watch gets
        // `410 Gone` and the client must list again.
        server.end_watches();
        server.delete(NS, "echo-b");
        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", READY), ("10.0.0.4", READY)]),
        );
        server.apply(NS, echo_slice("echo-c", &[("10.0.0.5", READY)]));
        server.expire_history();

        let (relisted, errors) = changes(&mut stream, 4).await;
        assert_eq!(
            relisted,
            [
                "-10.0.0.2:9090",
                "-10.0.0.3:9090",
                "+10.0.0.4:9090",
                "+10.0.0.5:9090"
            ]
        );
        assert_eq!(errors, 1, "the 410 is reported");
        assert_eq!(server.requests().0, 2, "listed again");
        // 10.0.0.1 was in both lists: no change for it.
        assert_nothing_pending(&server, &mut stream).await;
    })
    .await;
}

#[tokio::test]
async fn failing_requests_are_reported_and_retried_after_a_growing_backoff() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        server.apply(NS, echo_slice("echo-a", &[("10.0.0.1", READY)]));
        server.fail_next_requests(5);
        let started = Instant::now();
        let mut stream = source(&server);

        let (inserted, errors) = changes(&mut stream, 1).await;
        assert_eq!(inserted, ["+10.0.0.1:9090"]);
        assert_eq!(
            errors, 5,
            "each failure is an error item, and the stream goes on"
        );
        // Backoff 20 ms doubling to 200 ms, each delay in the upper half of its range:
        // at least 20 + 20 + 40 + 80 + 100 ms before the sixth attempt.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(260),
            "retried after {elapsed:?}"
        );
        assert_eq!(
            server.requests().0,
            6,
            "five failed lists, then one good one"
        );
    })
    .await;
}

#[tokio::test]
async fn bad_slices_are_reported_and_the_watch_goes_on() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", READY), ("not-an-ip", READY)]),
        );
        server.apply(
            NS,
            slice(
                SERVICE,
                "echo-http-only",
                &[("http", 8080)],
                &endpoints(&[("10.0.0.2", READY)]),
            ),
        );
        let mut stream = source(&server);

        let (inserted, errors) = changes(&mut stream, 1).await;
        assert_eq!(inserted, ["+10.0.0.1:9090"]);
        assert_eq!(errors, 2, "the bad address and the slice without `grpc`");
        server.apply(NS, echo_slice("echo-b", &[("10.0.0.3", READY)]));
        assert_eq!(changes(&mut stream, 1).await.0, ["+10.0.0.3:9090"]);
    })
    .await;
}

/// An endpoint service whose requests wait for a permit, so the test decides when they
/// finish; it answers with its address.
#[derive(Clone)]
struct Held {
    addr: SocketAddr,
    permits: Arc<Semaphore>,
}

impl tower::Service<()> for Held {
    type Response = SocketAddr;
    type Error = tower::BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<SocketAddr, tower::BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let (addr, permits) = (self.addr, Arc::clone(&self.permits));
        Box::pin(async move {
            permits.acquire().await?.forget();
            Ok(addr)
        })
    }
}

/// `source` with a `Held` service per address.
fn held_services(
    source: EndpointSlices,
    permits: Arc<Semaphore>,
) -> discover::Connect<EndpointSlices, impl FnMut(SocketAddr) -> Held> {
    discover::connect(source, move |addr| Held {
        addr,
        permits: Arc::clone(&permits),
    })
}

/// Polls the balancer's stats until `done` holds (bounded by the test's limit).
async fn until<K>(
    balance: &tower_lb::BalanceHandle<K>,
    done: impl Fn(&tower_lb::Stats<K>) -> bool,
) {
    loop {
        if done(&balance.stats().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_terminating_endpoint_is_drained_its_requests_finish_and_new_ones_go_elsewhere() {
    within_limit(async {
        let server = FakeApiServer::start().await;
        let a: SocketAddr = "10.0.0.1:9090".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:9090".parse().unwrap();
        server.apply(NS, echo_slice("echo-a", &[("10.0.0.1", READY)]));
        let permits = Arc::new(Semaphore::new(0));
        let balance = Balance::new(
            held_services(source(&server), Arc::clone(&permits)),
            RoundRobin::new(),
        );
        let handle = balance.handle();
        until(&handle, |s| s.get(&a).is_some()).await;

        // Two requests in flight on `a`, its only endpoint.
        let in_flight: Vec<_> = (0..2)
            .map(|_| tokio::spawn(balance.clone().oneshot(())))
            .collect();
        until(&handle, |s| s.get(&a).is_some_and(|e| e.in_flight == 2)).await;

        // `b` becomes ready and `a` starts terminating (still serving).
        server.apply(
            NS,
            echo_slice("echo-a", &[("10.0.0.1", TERMINATING), ("10.0.0.2", READY)]),
        );
        until(&handle, |s| {
            s.get(&a)
                .is_some_and(|e| e.status == EndpointStatus::Removed)
        })
        .await;
        let stats = handle.stats().unwrap();
        assert_eq!(
            stats.get(&a).unwrap().in_flight,
            2,
            "drained, not cut: still in flight"
        );
        assert_eq!(stats.get(&b).unwrap().status, EndpointStatus::Active);

        // New requests all go to `b`; `a`'s in-flight requests then finish normally.
        let new: Vec<_> = (0..6)
            .map(|_| tokio::spawn(balance.clone().oneshot(())))
            .collect();
        until(&handle, |s| s.get(&b).is_some_and(|e| e.in_flight == 6)).await;
        assert_eq!(
            handle.stats().unwrap().get(&a).unwrap().picks,
            2,
            "no new picks of a"
        );
        permits.add_permits(8);
        for request in in_flight {
            assert_eq!(
                request.await.unwrap().unwrap(),
                a,
                "the in-flight request completes"
            );
        }
        for request in new {
            assert_eq!(request.await.unwrap().unwrap(), b);
        }

        // Terminated: gone from the slice; the balancer has forgotten it.
        server.apply(NS, echo_slice("echo-a", &[("10.0.0.2", READY)]));
        until(&handle, |s| s.get(&a).is_none()).await;
        let stats = handle.stats().unwrap();
        assert_eq!((stats.in_flight(), stats.get(&b).unwrap().picks), (0, 6));
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_api_server_means_no_endpoints_within_the_wait_not_a_hang() {
    within_limit(async {
        // A port with nothing listening.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let client = kube::Client::try_from(kube::Config::new(
            format!("http://{closed}").parse().unwrap(),
        ))
        .unwrap();
        let source = EndpointSlices::new(client, NS, SERVICE)
            .unwrap()
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .unwrap();
        let permits = Arc::new(Semaphore::new(0));
        let balance = BalanceLayer::new(RoundRobin::new())
            .wait_for_endpoints(Duration::from_millis(300))
            .unwrap()
            .layer(held_services(source, permits));
        let err = balance.clone().oneshot(()).await.unwrap_err();
        assert_eq!(err.downcast_ref::<LbError>(), Some(&LbError::NoEndpoints));
        let stats = balance.stats();
        assert!(
            stats.discovery_errors >= 1,
            "the failures are counted: {}",
            stats.discovery_errors
        );
    })
    .await;
}

#[tokio::test]
async fn bad_settings_are_rejected_where_they_are_given() {
    let server = FakeApiServer::start().await;
    let err = EndpointSlices::new(server.client(), "Shop", SERVICE).unwrap_err();
    assert_eq!(err.setting(), "namespace");
    let err = EndpointSlices::new(server.client(), NS, "").unwrap_err();
    assert_eq!(err.setting(), "service");
    let err = source(&server).port_name("").unwrap_err();
    assert_eq!(err.setting(), "port_name");
    let err = source(&server)
        .backoff(Duration::ZERO, Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(err.setting(), "backoff");
    let err = source(&server)
        .backoff(Duration::from_secs(2), Duration::from_secs(1))
        .unwrap_err();
    assert!(err.to_string().contains("below the minimum"), "{err}");
}
