//! Behaviour of the core balancer: rotation, readiness, discovery, removal, zero endpoints,
//! sharing between clones, failures.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{settle, Broken, Echo, Gate, Gated, Held};
use futures::Stream;
use tower::discover::Change;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::{discover, strategy::RoundRobin, Balance, BalanceLayer, EndpointStatus, Error};

type Boxed = BoxCloneSyncService<(), usize, BoxError>;

fn boxed<S>(svc: S) -> Boxed
where
    S: Service<(), Response = usize> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(svc.map_err(Into::into))
}

async fn send<S: Service<(), Response = usize, Error = BoxError>>(svc: &mut S) -> usize {
    svc.ready().await.unwrap().call(()).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn round_robin_rotates_over_ready_endpoints_and_skips_a_pending_one() {
    let gate = Gate::closed();
    let endpoints = vec![
        (0, boxed(Echo(0))),
        (
            1,
            boxed(Gated {
                id: 1,
                gate: gate.clone(),
            }),
        ),
        (2, boxed(Echo(2))),
    ];
    let mut balance = Balance::new(discover::fixed(endpoints), RoundRobin::new());
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.push(send(&mut balance).await);
    }
    assert!(
        !seen.contains(&1),
        "the pending endpoint is never called: {seen:?}"
    );
    assert_eq!(seen.iter().filter(|&&id| id == 0).count(), 15);
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "strict alternation: {seen:?}"
    );

    gate.open();
    let mut counts = HashMap::new();
    for _ in 0..30 {
        *counts.entry(send(&mut balance).await).or_insert(0) += 1;
    }
    assert_eq!(counts, HashMap::from([(0, 10), (1, 10), (2, 10)]));
}

#[tokio::test(flavor = "current_thread")]
async fn a_removed_endpoint_gets_no_new_request_while_its_request_in_flight_completes() {
    let (handle, source) = discover::channel();
    handle.insert("a", Held(0));
    handle.insert("b", Held(1));
    let mut balance = Balance::new(source, RoundRobin::new());

    // Dispatch one request to each endpoint and hold both.
    let mut releases = Vec::new();
    let mut in_flight = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let future = balance.ready().await.unwrap().call(rx);
        releases.push(tx);
        in_flight.push(tokio::spawn(future));
    }
    let stats = balance.stats();
    assert_eq!(stats.get(&"a").unwrap().in_flight, 1);
    assert_eq!(stats.get(&"b").unwrap().in_flight, 1);

    handle.remove("b");
    settle().await;
    assert_eq!(
        balance.stats().get(&"b").unwrap().status,
        EndpointStatus::Removed
    );

    for _ in 0..10 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let future = balance.ready().await.unwrap().call(rx);
        tx.send(()).unwrap();
        assert_eq!(future.await.unwrap(), 0, "only `a` gets new requests");
    }

    for tx in releases {
        tx.send(()).unwrap();
    }
    let mut answers = Vec::new();
    for task in in_flight {
        answers.push(task.await.unwrap().unwrap());
    }
    answers.sort_unstable();
    assert_eq!(
        answers,
        vec![0, 1],
        "the request in flight to `b` completed"
    );

    let stats = balance.stats();
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(stats.get(&"a").unwrap().picks, 11);
    assert_eq!(stats.picks(), 12, "b's pick is still accounted for");
}

#[tokio::test(flavor = "current_thread")]
async fn discovery_is_processed_without_any_request() {
    let (handle, source) = discover::channel();
    let balance = Balance::new(source, RoundRobin::new());
    for id in 0..3 {
        handle.insert(id, Echo(id));
    }
    settle().await;
    let stats = balance.stats();
    assert_eq!(stats.available(), 3);
    assert_eq!(stats.picks(), 0);

    handle.remove(1);
    settle().await;
    let stats = balance.stats();
    assert_eq!(stats.available(), 2);
    assert!(
        stats.get(&1).is_none(),
        "an idle removed endpoint is forgotten"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn inserting_a_known_key_replaces_its_service_and_keeps_its_counters() {
    let (handle, source) = discover::channel();
    handle.insert("only", Echo(1));
    let mut balance = Balance::new(source, RoundRobin::new());
    for _ in 0..5 {
        assert_eq!(send(&mut balance).await, 1);
    }
    handle.insert("only", Echo(2));
    settle().await;
    assert_eq!(send(&mut balance).await, 2, "the new service answers");
    let stats = balance.stats();
    assert_eq!(stats.endpoints.len(), 1);
    assert_eq!(
        stats.get(&"only").unwrap().picks,
        6,
        "counters survive the replacement"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn no_endpoints_fails_at_once_with_a_typed_error() {
    let (_handle, source) = discover::channel::<u8, Echo>();
    let mut balance = Balance::new(source, RoundRobin::new());
    let error = Service::<()>::poll_ready(
        &mut balance,
        &mut Context::from_waker(std::task::Waker::noop()),
    );
    let Poll::Ready(Err(error)) = error else {
        panic!("expected an immediate error");
    };
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_bounded_wait_succeeds_when_an_endpoint_arrives_in_time() {
    let (handle, source) = discover::channel();
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .wait_for_endpoints(Duration::from_secs(1))
        .unwrap()
        .layer(source);
    let start = tokio::time::Instant::now();
    let inserter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        handle.insert(7, Echo(7));
        handle
    });
    assert_eq!(send(&mut balance).await, 7);
    assert_eq!(start.elapsed(), Duration::from_millis(400));
    drop(inserter.await.unwrap());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_bounded_wait_fails_with_the_typed_error_after_the_wait() {
    let (_handle, source) = discover::channel::<u8, Echo>();
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .wait_for_endpoints(Duration::from_secs(1))
        .unwrap()
        .layer(source);
    let start = tokio::time::Instant::now();
    let error = ServiceExt::<()>::ready(&mut balance).await.unwrap_err();
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[test]
fn an_unbounded_wait_is_rejected_where_it_is_configured() {
    let error = BalanceLayer::new(RoundRobin::new())
        .wait_for_endpoints(Duration::from_secs(7 * 24 * 3600))
        .unwrap_err();
    assert_eq!(error.setting(), "wait_for_endpoints");
    assert!(error.to_string().contains("maximum"), "{error}");
}

#[test]
fn sixteen_clones_on_two_threads_share_one_set_of_counts() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let endpoints = (0..4).map(|id| (id, Echo(id)));
        let balance = Balance::new(discover::fixed(endpoints), RoundRobin::new());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let mut clone = balance.clone();
                tokio::spawn(async move {
                    let mut sent = 0u64;
                    for _ in 0..1000 {
                        ServiceExt::<()>::ready(&mut clone)
                            .await
                            .unwrap()
                            .call(())
                            .await
                            .unwrap();
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        let mut dispatched = 0;
        for task in tasks {
            dispatched += task.await.unwrap();
        }
        let stats = balance.stats();
        assert_eq!(stats.picks(), dispatched);
        assert_eq!(dispatched, 16_000);
        assert_eq!(stats.in_flight(), 0);
        for endpoint in &stats.endpoints {
            assert!((3_000..5_000).contains(&endpoint.picks), "{endpoint:?}");
        }
    });
}

#[tokio::test(flavor = "current_thread")]
async fn an_endpoint_that_fails_poll_ready_leaves_rotation_until_reinserted() {
    let (handle, source) = discover::channel();
    handle.insert("good", boxed(Echo(0)));
    handle.insert("bad", boxed(Broken));
    let mut balance = Balance::new(source, RoundRobin::new());
    for _ in 0..10 {
        assert_eq!(send(&mut balance).await, 0);
    }
    settle().await;
    let stats = balance.stats();
    let bad = stats.get(&"bad").unwrap();
    assert_eq!(bad.status, EndpointStatus::Broken);
    assert_eq!(bad.failures, 1, "counted once, then out of rotation");
    assert_eq!(bad.picks, 0);

    handle.insert("bad", boxed(Echo(1)));
    settle().await;
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(send(&mut balance).await);
    }
    assert_eq!(seen.iter().filter(|&&id| id == 1).count(), 5, "{seen:?}");
    let stats = balance.stats();
    assert_eq!(stats.get(&"bad").unwrap().status, EndpointStatus::Active);
    assert_eq!(stats.get(&"bad").unwrap().failures, 1, "history is kept");
}

#[tokio::test(flavor = "current_thread")]
async fn when_every_endpoint_fails_readiness_the_error_is_no_endpoints() {
    let mut balance = Balance::new(
        discover::fixed([(1, Broken), (2, Broken)]),
        RoundRobin::new(),
    );
    let error = ServiceExt::<()>::ready(&mut balance).await.unwrap_err();
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
}

#[tokio::test(flavor = "current_thread")]
async fn call_without_poll_ready_is_a_typed_error_not_a_panic() {
    let mut balance = Balance::new(discover::fixed([(1, Echo(1))]), RoundRobin::new());
    let error = balance.call(()).await.unwrap_err();
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NotReady));
}

/// A discovery stream that yields one endpoint, one error, then stays open, and reports
/// when it is dropped.
struct Flaky {
    step: u8,
    dropped: Arc<AtomicBool>,
}

impl Stream for Flaky {
    type Item = Result<Change<u8, Echo>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.step += 1;
        match self.step {
            1 => Poll::Ready(Some(Ok(Change::Insert(1, Echo(1))))),
            2 => Poll::Ready(Some(Err("resolver unavailable".into()))),
            _ => Poll::Pending,
        }
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_discovery_error_is_counted_and_the_last_set_kept() {
    let dropped = Arc::new(AtomicBool::new(false));
    let source = Flaky {
        step: 0,
        dropped: dropped.clone(),
    };
    let mut balance = Balance::new(source, RoundRobin::new());
    settle().await;
    let stats = balance.stats();
    assert_eq!(stats.discovery_errors, 1);
    assert_eq!(stats.available(), 1);
    assert_eq!(send(&mut balance).await, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn the_discovery_task_ends_when_the_last_clone_is_dropped() {
    let dropped = Arc::new(AtomicBool::new(false));
    let source = Flaky {
        step: 0,
        dropped: dropped.clone(),
    };
    let balance = Balance::new(source, RoundRobin::new());
    let clones: Vec<_> = (0..4).map(|_| balance.clone()).collect();
    drop(balance);
    settle().await;
    assert!(
        !dropped.load(Ordering::SeqCst),
        "clones keep the task alive"
    );
    drop(clones);
    settle().await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the task ended and dropped its stream"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_ended_discovery_stream_keeps_the_last_set() {
    let mut balance = Balance::new(
        discover::fixed([(1, Echo(1)), (2, Echo(2))]),
        RoundRobin::new(),
    );
    settle().await;
    let stats = balance.stats();
    assert!(stats.discovery_ended);
    assert_eq!(stats.available(), 2);
    let a = send(&mut balance).await;
    let b = send(&mut balance).await;
    assert_ne!(a, b);
}

#[test]
fn built_outside_a_runtime_it_starts_discovery_on_first_use() {
    let (handle, source) = discover::channel::<u8, Echo>();
    let mut balance = Balance::new(source, RoundRobin::new());
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let outside = Service::<()>::poll_ready(&mut balance, &mut cx);
    let Poll::Ready(Err(error)) = outside else {
        panic!("expected an error outside a runtime");
    };
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoRuntime));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        handle.insert(3, Echo(3));
        // The first poll_ready spawns the task; it then picks up the insert.
        let _ = Service::<()>::poll_ready(
            &mut balance,
            &mut Context::from_waker(std::task::Waker::noop()),
        );
        settle().await;
        assert_eq!(send(&mut balance).await, 3);
    });
}

#[tokio::test(flavor = "current_thread")]
async fn the_layer_composes_with_service_builder_and_errors_name_their_endpoint() {
    let failing = tower::service_fn(|_: ()| async { Err::<usize, _>("backend said no") });
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(discover::fixed([(1, failing)]));
    let error = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(error.to_string(), "endpoint 1: backend said no");
    let error = error
        .downcast::<tower_lb::classify::EndpointError>()
        .expect("endpoint errors come wrapped with their endpoint");
    assert_eq!(error.endpoint(), "1");
    assert_eq!(error.into_inner().to_string(), "backend said no");
    let ok = tower::ServiceBuilder::new()
        .layer(BalanceLayer::new(RoundRobin::new()))
        .service(discover::fixed([(
            1,
            tower::service_fn(|_: ()| async { Ok::<_, Infallible>(5usize) }),
        )]));
    assert_eq!(ok.oneshot(()).await.unwrap(), 5);
}

#[test]
fn a_long_fixed_list_is_in_the_table_right_after_construction() {
    // No runtime turn happens between construction and the check.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let balance = Balance::new(
        discover::fixed((0..5000).map(|id| (id, Echo(id)))),
        RoundRobin::new(),
    );
    assert_eq!(balance.stats().available(), 5000);
}

#[tokio::test(flavor = "current_thread")]
async fn a_fresh_clone_per_request_still_rotates_exactly() {
    // The pattern of servers that clone their state per request (axum's `State`).
    let balance = Balance::new(
        discover::fixed((0..3).map(|id| (id, Echo(id)))),
        RoundRobin::new(),
    );
    let mut counts = HashMap::new();
    for _ in 0..30 {
        let answer = balance.clone().oneshot(()).await.unwrap();
        *counts.entry(answer).or_insert(0) += 1;
    }
    assert_eq!(counts, HashMap::from([(0, 10), (1, 10), (2, 10)]));
}
