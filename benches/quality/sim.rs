//! The simulation: scenarios, the backend model, the request stream and the runner.
//!
//! Everything runs on a current-thread tokio runtime with a paused clock, so simulated
//! seconds cost real milliseconds and a run depends only on its seed (and on the balancer's
//! own randomness).

use std::future::{pending, ready, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

use crate::balancers::{Balancer, MakeBalancer};
pub(crate) use crate::rng::SplitMix64;

/// Mean service time of a normal backend worker for a request of work 1.
const MEAN_SERVICE: Duration = Duration::from_millis(10);
/// Workers (concurrent requests) of a normal backend.
const WORKERS: usize = 4;
/// How long a client waits in the scenarios that have a timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// One request of the open-loop stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    /// When it arrives, from the start of the run.
    pub(crate) at: Duration,
    /// Its service time in units of the backend's mean: an exponential sample times the
    /// request's cost, fixed per request so every balancer replays the same work.
    pub(crate) work: f64,
}

/// A backend: `workers` requests served at once, the rest queue in FIFO order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackendSpec {
    pub(crate) workers: usize,
    /// Mean service time for a request of work 1.
    pub(crate) mean_service: Duration,
    /// The weight the balancer is told (its capacity, where the operator knows it).
    pub(crate) weight: u32,
}

impl BackendSpec {
    fn normal() -> Self {
        Self {
            workers: WORKERS,
            mean_service: MEAN_SERVICE,
            weight: 1,
        }
    }

    /// Requests per second it completes when busy, for requests of work 1.
    fn capacity(&self) -> f64 {
        self.workers as f64 / self.mean_service.as_secs_f64()
    }
}

/// What a faulty backend does during the middle third of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Answers every request with an error at once.
    FailFast,
    /// Never answers: the client's timeout ends the request.
    Hang,
}

/// A fault of one backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fault {
    pub(crate) backend: usize,
    pub(crate) kind: FaultKind,
}

/// The request costs: most cost 1, a share `heavy_share` costs `heavy_factor`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Costs {
    pub(crate) heavy_share: f64,
    pub(crate) heavy_factor: f64,
}

impl Costs {
    const UNIFORM: Costs = Costs {
        heavy_share: 0.0,
        heavy_factor: 1.0,
    };

    fn mean(&self) -> f64 {
        1.0 - self.heavy_share + self.heavy_share * self.heavy_factor
    }
}

/// One test situation: backends, offered load, request costs and an optional fault.
#[derive(Clone, Debug)]
pub(crate) struct Scenario {
    /// Short name used in tables and for filtering.
    pub(crate) name: &'static str,
    /// One line for the report.
    pub(crate) about: &'static str,
    pub(crate) backends: Vec<BackendSpec>,
    /// Offered load as a share of the total capacity.
    pub(crate) load: f64,
    pub(crate) costs: Costs,
    pub(crate) fault: Option<Fault>,
    pub(crate) client_timeout: Option<Duration>,
}

impl Scenario {
    fn equal(name: &'static str, about: &'static str, load: f64) -> Self {
        Self {
            name,
            about,
            backends: vec![BackendSpec::normal(); 5],
            load,
            costs: Costs::UNIFORM,
            fault: None,
            client_timeout: None,
        }
    }

    /// Mean arrivals per second.
    pub(crate) fn arrival_rate(&self) -> f64 {
        let capacity: f64 = self.backends.iter().map(BackendSpec::capacity).sum();
        self.load * capacity / self.costs.mean()
    }

    /// The request stream for `seed`: Poisson arrivals, exponential service, costs.
    pub(crate) fn requests(&self, seed: u64, count: usize) -> Vec<Request> {
        let mut rng = SplitMix64::new(seed);
        let mean_gap = 1.0 / self.arrival_rate();
        let mut at = 0.0;
        (0..count)
            .map(|_| {
                at += rng.exponential(mean_gap);
                let cost = if rng.unit() <= self.costs.heavy_share {
                    self.costs.heavy_factor
                } else {
                    1.0
                };
                Request {
                    at: Duration::from_secs_f64(at),
                    work: rng.exponential(1.0) * cost,
                }
            })
            .collect()
    }
}

/// The scenarios of the issue, in report order.
pub(crate) fn scenarios() -> Vec<Scenario> {
    let big = BackendSpec {
        workers: 3 * WORKERS,
        weight: 3,
        ..BackendSpec::normal()
    };
    let slow = BackendSpec {
        mean_service: MEAN_SERVICE * 10,
        ..BackendSpec::normal()
    };
    let single = BackendSpec {
        workers: 1,
        ..BackendSpec::normal()
    };
    let faulty = |kind| Some(Fault { backend: 0, kind });
    vec![
        Scenario::equal("equal-70", "5 equal backends, 70% load", 0.7),
        Scenario::equal("equal-90", "5 equal backends, 90% load", 0.9),
        Scenario {
            backends: vec![big, BackendSpec::normal(), BackendSpec::normal()],
            ..Scenario::equal(
                "capacity-3:1:1",
                "3 backends with 12:4:4 workers, weights 3:1:1 (tower p2c: unweighted), 70% load",
                0.7,
            )
        },
        Scenario {
            backends: vec![
                slow,
                BackendSpec::normal(),
                BackendSpec::normal(),
                BackendSpec::normal(),
                BackendSpec::normal(),
            ],
            ..Scenario::equal(
                "one-10x-slow",
                "backend 0 is 10x slower, unknown to the balancer (all weights 1), 70% load",
                0.7,
            )
        },
        Scenario {
            costs: Costs {
                heavy_share: 0.05,
                heavy_factor: 100.0,
            },
            ..Scenario::equal(
                "heavy-tail",
                "5 equal backends, 5% of requests cost 100x, 70% load",
                0.7,
            )
        },
        Scenario {
            backends: vec![single; 100],
            ..Scenario::equal(
                "many-100-90",
                "100 equal single-worker backends, 90% load",
                0.9,
            )
        },
        Scenario {
            fault: faulty(FaultKind::FailFast),
            ..Scenario::equal(
                "fail-fast",
                "backend 0 answers errors at once in the middle third, 70% load",
                0.7,
            )
        },
        Scenario {
            fault: faulty(FaultKind::Hang),
            client_timeout: Some(CLIENT_TIMEOUT),
            ..Scenario::equal(
                "hang",
                "backend 0 never answers in the middle third; client timeout 1 s, 70% load",
                0.7,
            )
        },
    ]
}

/// A running backend: a [`Service`] over a FIFO semaphore of workers.
#[derive(Clone, Debug)]
pub(crate) struct Backend {
    workers: Arc<Semaphore>,
    mean_service: Duration,
    /// Requests this backend was called with.
    calls: Arc<AtomicU64>,
    fault: Option<(FaultKind, Instant, Instant)>,
}

impl Backend {
    fn new(spec: &BackendSpec, fault: Option<(FaultKind, Instant, Instant)>) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(spec.workers)),
            mean_service: spec.mean_service,
            calls: Arc::new(AtomicU64::new(0)),
            fault,
        }
    }

    fn fault_now(&self) -> Option<FaultKind> {
        let now = Instant::now();
        self.fault
            .filter(|&(_, from, until)| from <= now && now < until)
            .map(|(kind, _, _)| kind)
    }
}

type BackendFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

impl Service<Request> for Backend {
    type Response = ();
    type Error = BoxError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // A server accepts every connection; requests queue for a worker.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> BackendFuture {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match self.fault_now() {
            Some(FaultKind::FailFast) => Box::pin(ready(Err("backend failing".into()))),
            Some(FaultKind::Hang) => Box::pin(pending()),
            None => {
                let workers = Arc::clone(&self.workers);
                let service = self.mean_service.mul_f64(request.work);
                Box::pin(async move {
                    let _worker = workers.acquire_owned().await?;
                    tokio::time::sleep(service).await;
                    Ok(())
                })
            }
        }
    }
}

/// What the client saw for one request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outcome {
    /// A response, after this latency.
    Ok(Duration),
    /// An error (from the backend or the balancer).
    Failed,
    /// No answer within the client timeout (the latency is the timeout).
    TimedOut(Duration),
}

/// The result of replaying one stream through one balancer.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) outcomes: Vec<Outcome>,
    /// Requests each backend was called with, in backend order.
    pub(crate) calls: Vec<u64>,
}

/// Replays `requests` through a balancer built by `make`, in virtual time.
pub(crate) fn run(
    scenario: &Scenario,
    requests: &[Request],
    make: &MakeBalancer,
    seed: u64,
) -> Run {
    debug_assert!(
        scenario.fault.map(|f| f.kind) != Some(FaultKind::Hang)
            || scenario.client_timeout.is_some(),
        "a hanging backend needs a client timeout, or the run never ends"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
        .block_on(simulate(scenario, requests, make, seed))
}

async fn simulate(
    scenario: &Scenario,
    requests: &[Request],
    make: &MakeBalancer,
    seed: u64,
) -> Run {
    let start = Instant::now();
    let backends = start_backends(scenario, requests, start);
    let calls: Vec<_> = backends.iter().map(|(_, b)| Arc::clone(&b.calls)).collect();
    let mut balancer = make(backends, seed);

    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        let arrived = start + request.at;
        tokio::time::sleep_until(arrived).await;
        let response = dispatch(&mut balancer, *request).await;
        responses.push(tokio::spawn(outcome(
            arrived,
            response,
            scenario.client_timeout,
        )));
    }
    let mut outcomes = Vec::with_capacity(responses.len());
    for response in responses {
        outcomes.push(response.await.expect("the request task does not panic"));
    }
    Run {
        outcomes,
        calls: calls.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
    }
}

/// The backends of `scenario`, with the fault (if any) in the middle third of the stream.
fn start_backends(
    scenario: &Scenario,
    requests: &[Request],
    start: Instant,
) -> Vec<(BackendSpec, Backend)> {
    let span = requests.last().map_or(Duration::ZERO, |r| r.at);
    let window = (start + span / 3, start + span * 2 / 3);
    scenario
        .backends
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let fault = scenario
                .fault
                .filter(|f| f.backend == i)
                .map(|f| (f.kind, window.0, window.1));
            (*spec, Backend::new(spec, fault))
        })
        .collect()
}

/// Sends `request` through the balancer; returns its response future (not yet awaited).
async fn dispatch(balancer: &mut Balancer, request: Request) -> Result<BackendFuture, BoxError> {
    Ok(balancer.ready().await?.call(request))
}

async fn outcome(
    arrived: Instant,
    response: Result<BackendFuture, BoxError>,
    timeout: Option<Duration>,
) -> Outcome {
    let Ok(response) = response else {
        return Outcome::Failed;
    };
    let answered = match timeout {
        Some(timeout) => tokio::time::timeout(timeout, response).await,
        None => Ok(response.await),
    };
    match answered {
        Ok(Ok(())) => Outcome::Ok(arrived.elapsed()),
        Ok(Err(_)) => Outcome::Failed,
        Err(_) => Outcome::TimedOut(arrived.elapsed()),
    }
}
