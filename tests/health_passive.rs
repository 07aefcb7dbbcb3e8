//! Passive health in the balancer: outlier ejection, the panic threshold, slow start, drain.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{settle, Held};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_lb::health::{OutlierDetection, SlowStart};
use tower_lb::strategy::{Endpoints, PickContext, Picker, Strategy};
use tower_lb::{discover, strategy::RoundRobin, BalanceLayer, EndpointStatus};

/// An endpoint that answers its id, or fails while its switch is on.
#[derive(Clone)]
struct Switchable {
    id: usize,
    failing: Arc<AtomicBool>,
}

impl Service<()> for Switchable {
    type Response = usize;
    type Error = BoxError;
    type Future = std::future::Ready<Result<usize, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        std::future::ready(if self.failing.load(Ordering::SeqCst) {
            Err("boom".into())
        } else {
            Ok(self.id)
        })
    }
}

fn endpoints(n: usize, failing: &[usize]) -> (Vec<(usize, Switchable)>, Vec<Arc<AtomicBool>>) {
    let switches: Vec<_> = (0..n)
        .map(|i| Arc::new(AtomicBool::new(failing.contains(&i))))
        .collect();
    let endpoints = (0..n)
        .map(|id| {
            (
                id,
                Switchable {
                    id,
                    failing: switches[id].clone(),
                },
            )
        })
        .collect();
    (endpoints, switches)
}

fn outlier(failures: u32, base: u64, max: u64, percent: u8) -> OutlierDetection {
    OutlierDetection::new()
        .consecutive_failures(failures)
        .base_ejection_time(Duration::from_secs(base))
        .max_ejection_time(Duration::from_secs(max))
        .max_ejected_percent(percent)
}

/// Sends `n` requests one after another; returns (answers per endpoint, errors).
async fn send<S>(svc: &mut S, n: usize) -> (HashMap<usize, usize>, usize)
where
    S: Service<(), Response = usize, Error = BoxError>,
{
    let mut answers = HashMap::new();
    let mut errors = 0;
    for _ in 0..n {
        match svc.ready().await.unwrap().call(()).await {
            Ok(id) => *answers.entry(id).or_insert(0) += 1,
            Err(_) => errors += 1,
        }
        settle().await;
    }
    (answers, errors)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failing_endpoint_is_ejected_after_its_consecutive_failures_and_returns() {
    let (endpoints, switches) = endpoints(3, &[2]);
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier(3, 10, 100, 50))
        .unwrap()
        .layer(discover::fixed(endpoints));

    let (_, errors) = send(&mut balance, 30).await;
    assert_eq!(
        errors, 3,
        "exactly the threshold of requests fail before the ejection"
    );
    let stats = balance.stats();
    let bad = stats.get(&2).unwrap();
    assert_eq!(bad.status, EndpointStatus::Ejected);
    assert_eq!((bad.picks, bad.failures, bad.ejections), (3, 3, 1));

    // Back after the base ejection time, still failing: ejected again, for twice as long.
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        balance.stats().get(&2).unwrap().status,
        EndpointStatus::Active
    );
    let (_, errors) = send(&mut balance, 30).await;
    assert_eq!(errors, 3);
    assert_eq!(balance.stats().get(&2).unwrap().ejections, 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        balance.stats().get(&2).unwrap().status,
        EndpointStatus::Ejected,
        "the second ejection lasts 20 s"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        balance.stats().get(&2).unwrap().status,
        EndpointStatus::Active
    );

    // Healthy for the max ejection time: the next ejection starts over at the base time.
    switches[2].store(false, Ordering::SeqCst);
    let (answers, errors) = send(&mut balance, 30).await;
    assert_eq!((errors, answers[&2]), (0, 10));
    tokio::time::sleep(Duration::from_secs(100)).await;
    switches[2].store(true, Ordering::SeqCst);
    send(&mut balance, 30).await;
    let bad = balance.stats();
    let bad = bad.get(&2).unwrap();
    assert_eq!((bad.status, bad.ejections), (EndpointStatus::Ejected, 1));
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        balance.stats().get(&2).unwrap().status,
        EndpointStatus::Active
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_more_than_the_maximum_share_is_ejected() {
    let (endpoints, _) = endpoints(10, &[0, 1, 2, 3, 4]);
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier(2, 60, 60, 20))
        .unwrap()
        .layer(discover::fixed(endpoints));
    send(&mut balance, 100).await;
    let stats = balance.stats();
    let ejected = stats
        .endpoints
        .iter()
        .filter(|e| e.status == EndpointStatus::Ejected)
        .count();
    assert_eq!(ejected, 2, "20% of 10");
    assert!(!stats.panic_mode);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn below_the_panic_threshold_traffic_goes_to_every_endpoint() {
    let (endpoints, _) = endpoints(4, &[1, 2, 3]);
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier(2, 60, 60, 100))
        .unwrap()
        .panic_threshold(0.5)
        .unwrap()
        .layer(discover::fixed(endpoints));
    send(&mut balance, 40).await;
    let stats = balance.stats();
    assert!(stats.panic_mode, "1 of 4 available is below half");
    let (answers, errors) = send(&mut balance, 40).await;
    assert_eq!(
        answers[&0], 10,
        "the survivor gets its share, not everything"
    );
    assert_eq!(errors, 30, "the ejected endpoints are used too");

    // With the threshold disabled, the survivor takes all traffic.
    let (endpoints, _) = self::endpoints(4, &[1, 2, 3]);
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier(2, 60, 60, 100))
        .unwrap()
        .panic_threshold(0.0)
        .unwrap()
        .layer(discover::fixed(endpoints));
    send(&mut balance, 40).await;
    let (answers, errors) = send(&mut balance, 40).await;
    assert_eq!((answers[&0], errors), (40, 0));
    assert!(!balance.stats().panic_mode);
}

/// A weight-proportional test strategy: random, weighted by cumulative weights.
#[derive(Clone, Debug)]
struct Proportional;

struct ProportionalPicker(Vec<u64>);

impl Strategy for Proportional {
    type Picker = ProportionalPicker;
    fn build(&self, endpoints: &Endpoints<'_>) -> ProportionalPicker {
        let mut total = 0;
        ProportionalPicker(
            endpoints
                .iter()
                .map(|e| {
                    total += u64::from(e.weight());
                    total
                })
                .collect(),
        )
    }
}

impl Picker for ProportionalPicker {
    type Local = ();

    fn pick(&self, _: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        let point = cx.random() % self.0.last()?;
        Some(self.0.partition_point(|&end| end <= point))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn slow_start_ramps_a_new_endpoint_share_over_the_window() {
    let (handle, source) = discover::channel();
    let answer = |id: usize| service_fn(move |_: ()| async move { Ok::<_, BoxError>(id) });
    handle.insert(0, answer(0));
    let mut balance = BalanceLayer::new(Proportional)
        .slow_start(SlowStart::new(Duration::from_secs(100)))
        .unwrap()
        .layer(source);
    settle().await;
    assert_eq!(
        balance.stats().get(&0).unwrap().status,
        EndpointStatus::Active,
        "initial endpoints do not ramp"
    );

    handle.insert(1, answer(1));
    settle().await;
    assert_eq!(
        balance.stats().get(&1).unwrap().status,
        EndpointStatus::SlowStart
    );
    let mut shares = Vec::new();
    for _ in 0..10 {
        let (answers, _) = send(&mut balance, 2000).await;
        shares.push(*answers.get(&1).unwrap_or(&0) as f64 / 2000.0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
    }
    // In window step k the new endpoint has factor f = max(0.1, k/10) of its weight against
    // the old endpoint's full weight: its share is f / (1 + f).
    for (step, share) in shares.iter().enumerate() {
        let f = (step as f64 / 10.0).max(0.1);
        assert!(
            (share - f / (1.0 + f)).abs() < 0.035,
            "step {step}: {shares:?}"
        );
    }
    let (answers, _) = send(&mut balance, 2000).await;
    assert!(
        (900..1100).contains(&answers[&1]),
        "equal shares after the window: {answers:?}"
    );
    assert_eq!(
        balance.stats().get(&1).unwrap().status,
        EndpointStatus::Active
    );
}

#[tokio::test(flavor = "current_thread")]
async fn drain_resolves_only_after_in_flight_requests_finish() {
    let (discover_handle, source) = discover::channel();
    discover_handle.insert("a", Held(0));
    discover_handle.insert("b", Held(1));
    let mut balance = BalanceLayer::new(RoundRobin::new()).layer(source);
    settle().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let future = balance.ready().await.unwrap().call(rx);
        held.push((tx, tokio::spawn(future)));
    }
    let handle = balance.handle();
    let drain = tokio::spawn(handle.drain(&"b").unwrap());
    settle().await;
    assert!(!drain.is_finished(), "two requests to b are in flight");
    assert_eq!(
        balance.stats().get(&"b").unwrap().status,
        EndpointStatus::Draining
    );

    for _ in 0..6 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let future = balance.ready().await.unwrap().call(rx);
        tx.send(()).unwrap();
        assert_eq!(future.await.unwrap(), 0, "no new request goes to b");
    }
    let mut remaining = Vec::new();
    for (tx, task) in held {
        tx.send(()).unwrap();
        let id = task.await.unwrap().unwrap();
        if id == 1 {
            remaining.push(());
        }
        settle().await;
        if remaining.len() < 2 {
            assert!(!drain.is_finished());
        }
    }
    drain.await.unwrap();
    assert_eq!(balance.stats().in_flight(), 0);
    assert_eq!(balance.stats().available(), 1);
}

#[cfg(feature = "http")]
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn http_5xx_responses_count_as_failures_and_eject() {
    use tower_lb::http::TrackBody;
    type Body = http_body_util::Empty<bytes::Bytes>;
    let ok = service_fn(|_: ()| async { Ok::<_, BoxError>(http::Response::new(Body::new())) });
    let broken = service_fn(|_: ()| async {
        Ok::<_, BoxError>(
            http::Response::builder()
                .status(503)
                .body(Body::new())
                .unwrap(),
        )
    });
    let endpoints = vec![
        ("ok", tower::util::BoxCloneSyncService::new(ok)),
        ("broken", tower::util::BoxCloneSyncService::new(broken)),
    ];
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::head())
        .outlier_detection(outlier(3, 30, 30, 50))
        .unwrap()
        .layer(discover::fixed(endpoints));
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let response = balance.ready().await.unwrap().call(()).await.unwrap();
        statuses.push(response.status().as_u16());
        settle().await;
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 503).count(), 3);
    let stats = balance.stats();
    assert_eq!(
        stats.get(&"broken").unwrap().status,
        EndpointStatus::Ejected
    );
    assert_eq!(stats.get(&"broken").unwrap().failures, 3);
}
