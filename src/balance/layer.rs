//! `BalanceLayer`: builds a `Balance` over a discovery stream.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tower::discover::Discover;
use tower::BoxError;
use tower_layer::Layer;

use super::local::{Local, NO_VERSION};
use super::service::{clone_state, Balance};
use super::Front;
use crate::completion::CompleteOnResponse;
use crate::control::driver::Driver;
use crate::control::table::Snapshot;
use crate::control::Shared;
use crate::endpoint::clock::Clock;
use crate::error::ConfigError;
use crate::health::{OutlierDetection, Passive, SlowStart};
use crate::key::{Keyed, NoKey};
use crate::strategy::{decay_rate, Endpoints, Picker, Strategy};
use crate::util::sync::{AtomicU64, CachePadded};
use crate::weight::{FromWeighted, Unweighted, Weigh};

/// Settings that do not depend on the strategy.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Config {
    /// How long `poll_ready` waits for discovery to produce an endpoint before failing with
    /// `NoEndpoints`; `None` fails at once.
    pub(super) wait_for_endpoints: Option<Duration>,
    /// See [`BalanceLayer::count_abandoned_after`].
    pub(super) abandon_after: Option<Duration>,
    pub(super) passive: Passive,
    /// Seeds the clones' random generators, for reproducible runs.
    pub(super) seed: Option<u64>,
}

/// Builds a balancer: its shared state, its discovery task (spawned on the current runtime,
/// or kept until the first `poll_ready` finds one), and its first clone.
pub(super) fn build<D, St, Kx, W, C>(
    discover: D,
    strategy: St,
    key: Kx,
    weigher: W,
    completion: C,
    config: Config,
) -> Balance<D::Key, W::Service, St, Kx, C>
where
    D: Discover + Send + 'static,
    D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Error: Into<BoxError>,
    St: Strategy,
    W: Weigh<D::Key, D::Service>,
    W::Service: Clone + Send + Sync + 'static,
    Kx: Send + Sync + 'static,
{
    let (messages, inbox) = mpsc::unbounded_channel();
    let empty = strategy.build(&Endpoints::new(&[]));
    let (keyed, decay) = (empty.is_keyed(), empty.latency_decay().map(decay_rate));
    let (rotation_base, seed_base) = match config.seed {
        Some(seed) => (crate::key::mix64(seed) >> 1, seed),
        None => {
            let mut rng = crate::util::rng::FastRng::new();
            (rng.next_u64() >> 1, rng.next_u64())
        }
    };
    let front = Front {
        key,
        wait_for_endpoints: config.wait_for_endpoints,
        abandon_after_ns: config.abandon_after.map(|d| d.as_nanos() as u64),
        clock: Clock::detect(decay.is_some() || config.abandon_after.is_some()),
        clones: CachePadded(AtomicU64::new(0)),
        rotation_base,
        seed_base,
    };
    let shared = Arc::new(Shared::new(
        Snapshot::empty(empty, keyed, decay),
        messages,
        front,
    ));
    let mut driver = Driver::new(discover, strategy, weigher, inbox, &shared, config.passive);
    // Take in everything discovery has ready now (a fixed list, say, however long), so the
    // first request does not race the task's first turn. The task registers its real waker
    // when it runs.
    driver.prime();
    shared.task.hold(Box::pin(driver));
    // Start discovery now if a runtime is current; otherwise at the first poll_ready.
    let _ = shared.task.spawn();
    // No table yet: a balancer that is only ever cloned (axum's `State`, say) must not keep a
    // table, and with it removed endpoints' services, alive.
    let local = Local::new(
        clone_state(&shared.front),
        NO_VERSION,
        None,
        shared.front.clock,
        shared.front.abandon_after_ns,
    );
    Balance {
        shared,
        local,
        completion,
    }
}

/// The longest bounded wait for endpoints that is accepted: a day. Longer is not a bound a
/// caller would notice, and it keeps the deadline arithmetic far from overflow.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// A [`Layer`] that turns a [`Discover`] stream of endpoint services into a [`Balance`].
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_lb::{strategy::RoundRobin, BalanceLayer};
///
/// let layer = BalanceLayer::new(RoundRobin::new())
///     .wait_for_endpoints(Duration::from_millis(500))
///     .expect("a bounded wait");
/// let builder = ServiceBuilder::new().layer(layer);
/// # let _ = builder;
/// ```
#[derive(Clone)]
pub struct BalanceLayer<St, Kx = NoKey, W = Unweighted, C = CompleteOnResponse> {
    strategy: St,
    key: Kx,
    weigher: W,
    completion: C,
    config: Config,
}

impl<St> BalanceLayer<St> {
    /// A layer that balances with `strategy`, failing at once when there are no endpoints;
    /// every endpoint weighs 1.
    pub fn new(strategy: St) -> Self {
        Self {
            strategy,
            key: NoKey,
            weigher: Unweighted,
            completion: CompleteOnResponse,
            config: Config::default(),
        }
    }
}

impl<St, Kx, W, C> BalanceLayer<St, Kx, W, C> {
    /// Takes each endpoint's weight from discovery: the inserted services are
    /// [`Weighted`](crate::weight::Weighted).
    pub fn weighted(self) -> BalanceLayer<St, Kx, FromWeighted, C> {
        self.weigh_with(FromWeighted)
    }

    /// Takes each endpoint's weight from `weigher`, a function of the discovery key and the
    /// inserted service (see [`Weigh`](crate::weight::Weigh)).
    pub fn weigh_with<W2>(self, weigher: W2) -> BalanceLayer<St, Kx, W2, C> {
        BalanceLayer {
            strategy: self.strategy,
            key: self.key,
            weigher,
            completion: self.completion,
            config: self.config,
        }
    }

    /// Sets when a request stops counting as in flight (see
    /// [`completion`](crate::completion)); the default is when the response arrives.
    pub fn track_completion<C2>(self, completion: C2) -> BalanceLayer<St, Kx, W, C2> {
        BalanceLayer {
            strategy: self.strategy,
            key: self.key,
            weigher: self.weigher,
            completion,
            config: self.config,
        }
    }

    /// When no endpoint is available, let `poll_ready` wait up to `wait` for discovery to
    /// produce one before failing with [`Error::NoEndpoints`](crate::Error::NoEndpoints).
    ///
    /// The wait needs tokio's timer (a runtime with time enabled). Waits longer than a day are
    /// rejected: they would not be a bound.
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Result<Self, ConfigError> {
        if wait > MAX_WAIT {
            return Err(ConfigError::new(
                "wait_for_endpoints",
                format!("{wait:?} is longer than the one-day maximum; use a bounded wait"),
            ));
        }
        self.config.wait_for_endpoints = (!wait.is_zero()).then_some(wait);
        Ok(self)
    }

    /// Counts a request whose response future (or tracked body) the caller drops unfinished
    /// after waiting at least `wait` as a failure of its endpoint, so that a caller's own
    /// timeout around the balancer — `ServiceBuilder::timeout` outside it, say — still blames
    /// an endpoint that hangs. Requests dropped sooner (the caller went away) never count. Off
    /// by default; set it a little below the outer timeout. At most a day. Costs one clock
    /// read per request.
    ///
    /// A timeout inside the balancer, around each endpoint (see
    /// [`discover::with_layer`](crate::discover::with_layer)), blames the endpoint in any case.
    pub fn count_abandoned_after(mut self, wait: Duration) -> Result<Self, ConfigError> {
        if wait > MAX_WAIT {
            return Err(ConfigError::new(
                "count_abandoned_after",
                format!("{wait:?} is longer than the one-day maximum"),
            ));
        }
        self.config.abandon_after = Some(wait);
        Ok(self)
    }

    /// Ejects endpoints whose responses keep failing; see [`health`](crate::health). Off by
    /// default. Needs tokio's timer. The settings are checked here; the error names the first
    /// one out of range.
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Result<Self, ConfigError> {
        outlier.validate()?;
        self.config.passive.outlier = Some(outlier);
        Ok(self)
    }

    /// When fewer than `share` (0–1) of the endpoints are available, balance over all of them,
    /// ejected ones included; `0` disables panic mode. The default is `0.5`, as in Envoy.
    pub fn panic_threshold(mut self, share: f64) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&share) {
            return Err(ConfigError::new(
                "panic_threshold",
                format!("{share} is not a share between 0 and 1"),
            ));
        }
        self.config.passive.panic_threshold = share;
        Ok(self)
    }

    /// Ramps up the share of new and recovered endpoints; see [`health`](crate::health). Off by
    /// default. Needs tokio's timer. The settings are checked here.
    pub fn slow_start(mut self, slow_start: SlowStart) -> Result<Self, ConfigError> {
        slow_start.validate()?;
        self.config.passive.slow_start = Some(slow_start);
        Ok(self)
    }

    /// Seeds the random choices of every clone (rotation starts, sampling) so that a run can
    /// be reproduced, e.g. in simulations; clone `i` of the balancer always gets the same
    /// generator. By default each process and clone draws fresh randomness. This does not
    /// affect consistent hashing, which is deterministic anyway.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Sets how requests are turned into a key hash for keyed strategies (consistent hashing):
    /// any [`RequestKey`](crate::key::RequestKey). Unkeyed strategies ignore it; a keyed
    /// strategy without it does not compile.
    pub fn key<K>(self, key: K) -> BalanceLayer<St, Keyed<K>, W, C> {
        BalanceLayer {
            strategy: self.strategy,
            key: Keyed(key),
            weigher: self.weigher,
            completion: self.completion,
            config: self.config,
        }
    }
}

impl<D, St, Kx, W, C> Layer<D> for BalanceLayer<St, Kx, W, C>
where
    D: Discover + Send + 'static,
    D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Error: Into<BoxError>,
    St: Strategy + Clone,
    Kx: Clone + Send + Sync + 'static,
    W: Weigh<D::Key, D::Service> + Clone,
    W::Service: Clone + Send + Sync + 'static,
    C: Clone,
{
    type Service = Balance<D::Key, W::Service, St, Kx, C>;

    fn layer(&self, discover: D) -> Self::Service {
        build(
            discover,
            self.strategy.clone(),
            self.key.clone(),
            self.weigher.clone(),
            self.completion.clone(),
            self.config,
        )
    }
}

impl<St: fmt::Debug, Kx, W, C> fmt::Debug for BalanceLayer<St, Kx, W, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer")
            .field("strategy", &self.strategy)
            .field("wait_for_endpoints", &self.config.wait_for_endpoints)
            .finish_non_exhaustive()
    }
}
