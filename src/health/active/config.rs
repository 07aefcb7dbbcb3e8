//! The settings of a health check, validated where they are given.

use std::time::Duration;

use tower::discover::Discover;

use super::check::HealthCheck;
use super::probe::Probe;
use crate::error::ConfigError;

/// The longest interval or timeout accepted: a day. Longer is not a check a caller would
/// notice, and it keeps the jitter arithmetic far from overflow.
const MAX_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest jitter accepted: ±50% (HAProxy's `spread-checks` limit). More would let two
/// probes of one endpoint come three times closer together than the interval says.
const MAX_JITTER: f64 = 0.5;

/// What a [`HealthCheck`] assumes about an endpoint before probes have spoken, named after
/// HAProxy's `init-state`.
///
/// Probing starts at once whatever the initial health, so "the first probe" comes within
/// the probe timeout of the endpoint's discovery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialHealth {
    /// Inserted at once, but the first probe decides: if it fails, the endpoint is removed
    /// at once; once it succeeds, removal takes `fall` consecutive failures. This is
    /// HAProxy's default (`init-state up`) and ours: a balancer serves from the start
    /// instead of failing with `NoEndpoints` for `rise` intervals, and an endpoint that is
    /// dead from the start leaves after one probe rather than `fall` of them.
    #[default]
    Healthy,
    /// Inserted at once; removed only after `fall` consecutive failed probes (HAProxy
    /// `init-state fully-up`).
    FullyHealthy,
    /// Withheld until a probe succeeds: the first success inserts it; after a first failure,
    /// it takes `rise` consecutive successes (HAProxy `init-state down`; Envoy treats new
    /// hosts this way). For sources that announce endpoints before they can serve.
    Unhealthy,
    /// Withheld until `rise` consecutive probes succeed (HAProxy `init-state fully-down`).
    FullyUnhealthy,
}

impl InitialHealth {
    pub(super) fn is_healthy(self) -> bool {
        matches!(self, InitialHealth::Healthy | InitialHealth::FullyHealthy)
    }

    /// Whether the first probe alone decides the health, whatever `rise` and `fall` say.
    pub(super) fn first_probe_decides(self) -> bool {
        matches!(self, InitialHealth::Healthy | InitialHealth::Unhealthy)
    }
}

/// Settings for a [`HealthCheck`]; each setter rejects a bad value with a [`ConfigError`].
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`interval`](Self::interval) | 2 s | time from one probe's end to the next probe of the same endpoint (HAProxy `inter`) |
/// | [`jitter`](Self::jitter) | 0.1 | each interval is drawn uniformly within ±10% of it, so probes of many endpoints (and of many clients) drift apart instead of arriving together |
/// | [`timeout`](Self::timeout) | 1 s | a probe that has not finished by then has failed |
/// | [`rise`](Self::rise) | 2 | consecutive successes that make an unhealthy endpoint healthy |
/// | [`fall`](Self::fall) | 3 | consecutive failures that make a healthy endpoint unhealthy |
/// | [`initial_health`](Self::initial_health) | [`InitialHealth::Healthy`] | what is assumed before probes have spoken |
/// | [`max_concurrent_probes`](Self::max_concurrent_probes) | 16 | probes in flight at once, over all endpoints; others wait their turn |
///
/// The timeout may be longer than the interval: the next probe of an endpoint is scheduled
/// when its previous one ends, so probes of one endpoint never overlap. A healthy endpoint
/// that stops answering is removed within `fall × (interval × (1 + jitter) + timeout)`.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::{discover, health::{HealthCheckBuilder, InitialHealth, TcpProbe}};
/// use tower_lb::ConfigError;
///
/// # fn main() -> Result<(), ConfigError> {
/// let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
/// let checked = HealthCheckBuilder::new()
///     .interval(Duration::from_secs(5))
///     .timeout(Duration::from_millis(500))
///     .rise(3)
///     .initial_health(InitialHealth::FullyUnhealthy)
///     .build(discover::fixed([(addr, ())]), TcpProbe::new())?;
/// # let _ = checked;
/// let bad = HealthCheckBuilder::new().fall(0).build(discover::fixed([(addr, ())]), TcpProbe::new());
/// assert_eq!(bad.unwrap_err().setting(), "fall");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthCheckBuilder {
    pub(super) interval: Duration,
    pub(super) jitter: f64,
    pub(super) timeout: Duration,
    pub(super) rise: u32,
    pub(super) fall: u32,
    pub(super) initial_health: InitialHealth,
    pub(super) max_concurrent_probes: usize,
}

impl Default for HealthCheckBuilder {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            jitter: 0.1,
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            initial_health: InitialHealth::Healthy,
            max_concurrent_probes: 16,
        }
    }
}

impl HealthCheckBuilder {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// Time from the end of one probe of an endpoint to the start of the next (before
    /// jitter). Zero and more than a day are rejected by [`build`](Self::build).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Spreads each interval uniformly over `interval × (1 ± jitter)`; `0.0` probes on a fixed
    /// period. Must be within `0.0..=0.5`.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// How long a probe may take; a slower probe is a failure and is cancelled. Zero and more
    /// than a day are rejected.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Consecutive successful probes that make an unhealthy endpoint healthy: 1 to 10,000.
    pub fn rise(mut self, rise: u32) -> Self {
        self.rise = rise;
        self
    }

    /// Consecutive failed probes that make a healthy endpoint unhealthy: 1 to 10,000.
    pub fn fall(mut self, fall: u32) -> Self {
        self.fall = fall;
        self
    }

    /// What is assumed about an endpoint before probes have spoken.
    pub fn initial_health(mut self, initial: InitialHealth) -> Self {
        self.initial_health = initial;
        self
    }

    /// How many probes may be in flight at once, over all endpoints: 1 to 65,536. Endpoints
    /// due for a probe while the limit is reached are probed in turn as slots free up.
    pub fn max_concurrent_probes(mut self, max: usize) -> Self {
        self.max_concurrent_probes = max;
        self
    }

    /// Health-checks the candidate endpoints of `source` with `probe`. Every setting is
    /// checked here, and the first one out of range is named in the error.
    pub fn build<D, P>(self, source: D, probe: P) -> Result<HealthCheck<D, P>, ConfigError>
    where
        D: Discover,
        P: Probe<D::Key, D::Service>,
    {
        self.validate()?;
        Ok(HealthCheck::from_parts(source, probe, self))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        period("interval", self.interval)?;
        if !(0.0..=MAX_JITTER).contains(&self.jitter) {
            return Err(ConfigError::new(
                "jitter",
                format!("{} is not a fraction within 0.0..=0.5", self.jitter),
            ));
        }
        period("timeout", self.timeout)?;
        threshold("rise", self.rise)?;
        threshold("fall", self.fall)?;
        if !(1..=MAX_CONCURRENT_PROBES).contains(&self.max_concurrent_probes) {
            return Err(ConfigError::new(
                "max_concurrent_probes",
                format!(
                    "{} is not between 1 and {MAX_CONCURRENT_PROBES}",
                    self.max_concurrent_probes
                ),
            ));
        }
        Ok(())
    }
}

/// The most consecutive probes a threshold may ask for: at the default interval, 10,000 probes
/// take more than five hours; a larger number is no threshold at all.
const MAX_THRESHOLD: u32 = 10_000;
/// The most probes in flight at once: more would be a denial of service on the endpoints.
const MAX_CONCURRENT_PROBES: usize = 65_536;

fn period(setting: &'static str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(setting, "zero; use a positive duration"));
    }
    if value > MAX_PERIOD {
        return Err(ConfigError::new(
            setting,
            format!("{value:?} is longer than the one-day maximum"),
        ));
    }
    Ok(value)
}

fn threshold(setting: &'static str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(
            setting,
            "0 consecutive probes can never be counted; use at least 1",
        ));
    }
    if value > MAX_THRESHOLD {
        return Err(ConfigError::new(
            setting,
            format!("{value} is above the maximum of {MAX_THRESHOLD} consecutive probes"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_haproxy() {
        let config = HealthCheckBuilder::new();
        assert_eq!(config.interval, Duration::from_secs(2));
        assert_eq!((config.rise, config.fall), (2, 3));
        assert_eq!(config.timeout, Duration::from_secs(1));
        assert_eq!(config.initial_health, InitialHealth::Healthy);
    }

    #[test]
    fn bad_values_are_rejected_at_build_with_the_setting_named() {
        let config = HealthCheckBuilder::new();
        let cases = [
            config.interval(Duration::ZERO),
            config.interval(Duration::from_secs(90_000)),
            config.interval(Duration::MAX),
            config.timeout(Duration::ZERO),
            config.timeout(Duration::MAX),
            config.rise(0),
            config.rise(u32::MAX),
            config.fall(0),
            config.fall(u32::MAX),
            config.jitter(-0.1),
            config.jitter(0.6),
            config.jitter(f64::NAN),
            config.max_concurrent_probes(0),
            config.max_concurrent_probes(usize::MAX),
        ];
        let settings: Vec<_> = cases
            .iter()
            .map(|c| c.validate().unwrap_err().setting())
            .collect();
        assert_eq!(
            settings,
            [
                "interval",
                "interval",
                "interval",
                "timeout",
                "timeout",
                "rise",
                "rise",
                "fall",
                "fall",
                "jitter",
                "jitter",
                "jitter",
                "max_concurrent_probes",
                "max_concurrent_probes"
            ]
        );
    }

    #[test]
    fn good_values_are_kept() {
        let config = HealthCheckBuilder::new()
            .interval(Duration::from_millis(10))
            .jitter(0.0)
            .timeout(Duration::from_secs(30))
            .rise(1)
            .fall(10_000)
            .max_concurrent_probes(1);
        config.validate().unwrap();
        assert_eq!(config.interval, Duration::from_millis(10));
        assert_eq!(config.jitter, 0.0);
        assert_eq!(config.timeout, Duration::from_secs(30));
        assert_eq!((config.rise, config.fall), (1, 10_000));
        assert_eq!(config.max_concurrent_probes, 1);
    }
}
