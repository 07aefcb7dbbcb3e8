//! `BalanceLayer`: builds a `Balance` over a discovery stream.

use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tower::discover::Discover;
use tower::BoxError;
use tower_layer::Layer;

use super::service::Balance;
use super::shared::Config;
use crate::completion::CompleteOnResponse;
use crate::error::ConfigError;
use crate::health::{OutlierDetection, SlowStart};
use crate::key::NoKey;
use crate::strategy::Strategy;
use crate::weight::{FromWeighted, Unweighted, Weigh};

/// The longest bounded wait for endpoints that is accepted: a day. Longer is not a bound a
/// caller would notice, and it keeps the deadline arithmetic far from overflow.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// A [`Layer`] that turns a [`Discover`] stream of endpoint services into a [`Balance`].
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_lb::{BalanceLayer, RoundRobin};
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
    /// [`Weighted`](crate::Weighted).
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

    /// Ejects endpoints whose responses keep failing; see [`health`](crate::health). Off by
    /// default. Needs tokio's timer.
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.config.outlier = Some(outlier);
        self
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
        self.config.panic_threshold = share;
        Ok(self)
    }

    /// Ramps up the share of new and recovered endpoints; see [`health`](crate::health). Off by
    /// default. Needs tokio's timer.
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.config.slow_start = Some(slow_start);
        self
    }

    /// Seeds the random choices of every clone (rotation starts, sampling) so that a run can
    /// be reproduced, e.g. in simulations; clone `i` of the balancer always gets the same
    /// generator. By default each process and clone draws fresh randomness. This does not
    /// affect consistent hashing, which is deterministic anyway.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Sets how requests are turned into a key hash for keyed strategies (consistent hashing).
    /// Unkeyed strategies ignore it.
    pub fn key<K>(self, key: K) -> BalanceLayer<St, K, W, C> {
        BalanceLayer {
            strategy: self.strategy,
            key,
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
    D::Service: Clone + Send + Sync + 'static,
    D::Error: Into<BoxError>,
    St: Strategy + Clone,
    Kx: Clone + Send + Sync + 'static,
    W: Weigh<D::Key, D::Service> + Clone,
    C: Clone,
{
    type Service = Balance<D, St, Kx, C>;

    fn layer(&self, discover: D) -> Self::Service {
        Balance::with_parts(
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
