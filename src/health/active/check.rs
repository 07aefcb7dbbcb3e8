//! `HealthCheck`: the discovery adapter that lets through only endpoints whose probes pass.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::future::AbortHandle;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tower::discover::{Change, Discover};

use super::config::HealthCheckBuilder;
use super::probe::{Probe, ProbeError};
use super::schedule::{jittered, NextProbe, ProbeEnd, RunningProbe};
use super::status::{EndpointHealth, HealthStatus};
use crate::util::rng::FastRng;

/// Source changes taken per `poll_next` before the other work gets a turn, so a source that is
/// always ready cannot starve the probes.
const SOURCE_BUDGET: usize = 256;

/// A [`Discover`] adapter that probes the candidate endpoints of another `Discover` and
/// passes on only the healthy ones: `Insert` when an endpoint becomes healthy (after `rise`
/// consecutive successful probes), `Remove` when it becomes unhealthy (after `fall`
/// consecutive failures).
///
/// ```
/// use std::net::SocketAddr;
/// use std::time::Duration;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_lb::{discover, health::{HealthCheckBuilder, TcpProbe}};
/// use tower_lb::{strategy::RoundRobin, BalanceLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let replica: SocketAddr = listener.local_addr()?;
/// // Candidates keyed by address (here each service just answers its address).
/// let candidates = discover::fixed([replica].map(|addr| {
///     (addr, service_fn(move |_: ()| async move { Ok::<_, std::convert::Infallible>(addr) }))
/// }));
/// let checked = HealthCheckBuilder::new()
///     .interval(Duration::from_secs(5))
///     .build(candidates, TcpProbe::new())?;
/// let health = checked.status();
/// let balance = BalanceLayer::new(RoundRobin::new())
///     .wait_for_endpoints(Duration::from_secs(1))?
///     .layer(checked);
/// assert_eq!(balance.clone().oneshot(()).await?, replica);
/// assert!(health.get(&replica).is_some_and(|h| h.healthy));
/// # Ok(())
/// # }
/// ```
///
/// # Behaviour
///
/// - **Probing.** Every candidate is probed once at discovery and then every
///   [`interval`](HealthCheckBuilder::interval) (±[`jitter`](HealthCheckBuilder::jitter)),
///   counted from the end of its previous probe, so the probes of one endpoint never overlap.
///   A probe that has not finished within the [`timeout`](HealthCheckBuilder::timeout) is
///   dropped and counts as a failure. At most
///   [`max_concurrent_probes`](HealthCheckBuilder::max_concurrent_probes) run at once; due
///   probes wait their turn in order.
/// - **Counting.** `rise` consecutive successes make an unhealthy endpoint healthy; `fall`
///   consecutive failures make a healthy one unhealthy. What is assumed before the first
///   probe is [`InitialHealth`](super::InitialHealth); the default, like HAProxy's, inserts at once and lets the
///   first probe remove a dead endpoint.
/// - **The source.** A candidate the source removes stops being probed (a probe in flight is
///   cancelled) and is removed downstream if it was healthy. A candidate the source inserts
///   again with a new service keeps its health; if it is healthy, the new service is passed
///   on as an `Insert`. Source errors are passed through. When the source ends, its last set
///   is probed on; the stream ends only when the source has ended with no candidate left.
/// - **Where probes run.** All work happens inside `poll_next`: a balancer polls its
///   discovery from a background task, so probes run with or without traffic and never on the
///   request path; when the stream is dropped (the balancer is gone), probing stops and
///   probes in flight are dropped. It must be polled within a tokio runtime with time
///   enabled.
/// - **Observing.** [`status`](Self::status) gives a handle with each candidate's health,
///   counts and last error. Every change of health is a `tracing` event (`info` when an
///   endpoint becomes healthy, `warn` when it becomes unhealthy) with the endpoint's key, the
///   old and new state and the consecutive count; single failed probes are `debug` events.
///
/// # Defaults
///
/// HAProxy's: `rise` 2, `fall` 3, interval 2 s; plus a 1 s timeout, ±10% jitter and 16
/// probes at a time. See [`HealthCheckBuilder`] for each setting.
pub struct HealthCheck<D, P>
where
    D: Discover,
    P: Probe<D::Key, D::Service>,
{
    source: Pin<Box<D>>,
    source_done: bool,
    probe: P,
    config: HealthCheckBuilder,
    candidates: HashMap<D::Key, Candidate<D::Service>>,
    /// Tells a candidate from an earlier one with the same key, so a timer or probe of a
    /// removed candidate is ignored when it fires.
    next_generation: u64,
    /// Candidates whose probe is due, waiting for a free probe slot, first come first served.
    due: VecDeque<(D::Key, u64)>,
    timers: FuturesUnordered<NextProbe<D::Key>>,
    running: FuturesUnordered<RunningProbe<D::Key, P::Future>>,
    /// Changes (and source errors) not yet handed to the consumer, in order.
    outbox: VecDeque<Item<D>>,
    rng: FastRng,
    status: HealthStatus<D::Key>,
}

/// What the adapter yields: a change of the healthy set, or a source error passed through.
type Item<D> =
    Result<Change<<D as Discover>::Key, <D as Discover>::Service>, <D as Discover>::Error>;

/// An endpoint the source has, healthy or not.
struct Candidate<S> {
    service: S,
    generation: u64,
    /// Cancels the probe in flight, if any, when the source removes the endpoint.
    in_flight: Option<AbortHandle>,
    /// The first probe decides the health alone (see `InitialHealth`).
    first_probe_decides: bool,
    health: EndpointHealth,
}

impl<D, P> HealthCheck<D, P>
where
    D: Discover,
    P: Probe<D::Key, D::Service>,
{
    /// Health-checks the candidate endpoints of `source` with `probe`, with the default
    /// settings (see [`HealthCheckBuilder`]).
    pub fn new(source: D, probe: P) -> Self {
        // The defaults are valid.
        Self::from_parts(source, probe, HealthCheckBuilder::new())
    }

    pub(super) fn from_parts(source: D, probe: P, config: HealthCheckBuilder) -> Self {
        Self {
            source: Box::pin(source),
            source_done: false,
            probe,
            config,
            candidates: HashMap::new(),
            next_generation: 0,
            due: VecDeque::new(),
            timers: FuturesUnordered::new(),
            running: FuturesUnordered::new(),
            outbox: VecDeque::new(),
            rng: FastRng::new(),
            status: HealthStatus::new(),
        }
    }
}

impl<D, P> HealthCheck<D, P>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Service: Clone,
    P: Probe<D::Key, D::Service>,
{
    /// A handle on the health of every candidate endpoint, readable from any task.
    pub fn status(&self) -> HealthStatus<D::Key> {
        self.status.clone()
    }

    fn apply(&mut self, change: Change<D::Key, D::Service>) {
        match change {
            Change::Insert(key, service) => self.insert(key, service),
            Change::Remove(key) => self.remove(&key),
        }
    }

    fn insert(&mut self, key: D::Key, service: D::Service) {
        if let Some(candidate) = self.candidates.get_mut(&key) {
            // A new service for a known endpoint: its health is the endpoint's, so it stands;
            // a healthy endpoint's balancer entry gets the new service.
            if candidate.health.healthy {
                self.outbox
                    .push_back(Ok(Change::Insert(key, service.clone())));
            }
            candidate.service = service;
            return;
        }
        let initial = self.config.initial_health;
        let generation = self.next_generation;
        self.next_generation += 1;
        let health = EndpointHealth::initial(initial.is_healthy());
        tracing::debug!(
            ?key,
            healthy = health.healthy,
            "health check: new candidate"
        );
        self.status.set(key.clone(), &health);
        if health.healthy {
            self.outbox
                .push_back(Ok(Change::Insert(key.clone(), service.clone())));
        }
        self.candidates.insert(
            key.clone(),
            Candidate {
                service,
                generation,
                in_flight: None,
                first_probe_decides: initial.first_probe_decides(),
                health,
            },
        );
        // Probe at once: the first result matters most (it may decide the health).
        self.due.push_back((key, generation));
    }

    fn remove(&mut self, key: &D::Key) {
        let Some((key, candidate)) = self.candidates.remove_entry(key) else {
            return;
        };
        if let Some(probe) = candidate.in_flight {
            probe.abort();
        }
        self.status.remove(&key);
        tracing::debug!(?key, "health check: candidate left the source");
        if candidate.health.healthy {
            self.outbox.push_back(Ok(Change::Remove(key)));
        }
    }

    /// Starts due probes while there are free slots.
    fn start_due_probes(&mut self) {
        while self.running.len() < self.config.max_concurrent_probes {
            let Some((key, generation)) = self.due.pop_front() else {
                return;
            };
            let Some(candidate) = self.candidates.get_mut(&key) else {
                continue;
            };
            if candidate.generation != generation {
                continue;
            }
            let probe = self.probe.probe(&key, &candidate.service);
            let (running, cancel) =
                RunningProbe::start(key, generation, probe, self.config.timeout);
            candidate.in_flight = Some(cancel);
            self.running.push(running);
        }
    }

    /// Counts a finished probe, changes the health if a threshold is reached, and schedules
    /// the endpoint's next probe.
    fn record(&mut self, key: D::Key, generation: u64, result: Result<(), ProbeError>) {
        let Some(candidate) = self.candidates.get_mut(&key) else {
            return;
        };
        if candidate.generation != generation {
            return;
        }
        candidate.in_flight = None;
        let (rise, fall) = if candidate.first_probe_decides {
            (1, 1)
        } else {
            (self.config.rise, self.config.fall)
        };
        candidate.first_probe_decides = false;
        let health = &mut candidate.health;
        health.probes += 1;
        match result {
            Ok(()) => {
                health.consecutive_successes = health.consecutive_successes.saturating_add(1);
                health.consecutive_failures = 0;
                if !health.healthy && health.consecutive_successes >= rise {
                    health.healthy = true;
                    tracing::info!(
                        ?key,
                        from = "unhealthy",
                        to = "healthy",
                        consecutive_successes = health.consecutive_successes,
                        "endpoint became healthy"
                    );
                    self.outbox
                        .push_back(Ok(Change::Insert(key.clone(), candidate.service.clone())));
                }
            }
            Err(error) => {
                health.consecutive_failures = health.consecutive_failures.saturating_add(1);
                health.consecutive_successes = 0;
                if health.healthy && health.consecutive_failures >= fall {
                    health.healthy = false;
                    tracing::warn!(
                        ?key,
                        from = "healthy",
                        to = "unhealthy",
                        consecutive_failures = health.consecutive_failures,
                        %error,
                        "endpoint became unhealthy"
                    );
                    self.outbox.push_back(Ok(Change::Remove(key.clone())));
                } else {
                    tracing::debug!(
                        ?key,
                        healthy = health.healthy,
                        consecutive_failures = health.consecutive_failures,
                        %error,
                        "health probe failed"
                    );
                }
                health.last_error = Some(error);
            }
        }
        self.status.set(key.clone(), health);
        let delay = jittered(self.config.interval, self.config.jitter, &mut self.rng);
        self.timers.push(NextProbe::after(key, generation, delay));
    }

    /// Takes what the source has ready, within the budget; returns whether the budget ran out.
    fn poll_source(&mut self, cx: &mut Context<'_>) -> bool {
        for _ in 0..SOURCE_BUDGET {
            if self.source_done {
                return false;
            }
            match self.source.as_mut().poll_discover(cx) {
                Poll::Ready(Some(Ok(change))) => self.apply(change),
                Poll::Ready(Some(Err(error))) => self.outbox.push_back(Err(error)),
                Poll::Ready(None) => {
                    self.source_done = true;
                    tracing::debug!("health check: the source ended; probing its last set");
                }
                Poll::Pending => return false,
            }
        }
        true
    }

    /// Fires due timers, starts probes and records finished ones until nothing moves, so that
    /// every timer and probe left has registered for a wake-up.
    fn poll_probes(&mut self, cx: &mut Context<'_>) {
        loop {
            while let Poll::Ready(Some(fired)) = self.timers.poll_next_unpin(cx) {
                if let Some(due) = fired {
                    self.due.push_back(due);
                }
            }
            self.start_due_probes();
            let mut finished = false;
            while let Poll::Ready(Some(ended)) = self.running.poll_next_unpin(cx) {
                finished = true;
                if let Some((key, generation, ProbeEnd::Done(result))) = ended {
                    self.record(key, generation, result);
                }
                self.start_due_probes();
            }
            // A finished probe scheduled a new timer: poll again so it registers.
            if !finished {
                return;
            }
        }
    }
}

// Nothing is structurally pinned: the source is boxed, and timers and probes live in
// `FuturesUnordered`s, which pin them on the heap.
impl<D, P> Unpin for HealthCheck<D, P>
where
    D: Discover,
    P: Probe<D::Key, D::Service>,
{
}

impl<D, P> Stream for HealthCheck<D, P>
where
    D: Discover,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Service: Clone,
    P: Probe<D::Key, D::Service>,
{
    type Item = Item<D>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let more_ready = this.poll_source(cx);
        this.poll_probes(cx);
        if let Some(change) = this.outbox.pop_front() {
            return Poll::Ready(Some(change));
        }
        if more_ready {
            cx.waker().wake_by_ref();
        } else if this.source_done && this.candidates.is_empty() {
            // Nothing left to probe and nothing more to come.
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl<D, P> fmt::Debug for HealthCheck<D, P>
where
    D: Discover,
    P: Probe<D::Key, D::Service>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheck")
            .field("config", &self.config)
            .field("candidates", &self.candidates.len())
            .field("probes_in_flight", &self.running.len())
            .field("source_done", &self.source_done)
            .finish_non_exhaustive()
    }
}
