//! Health: active checks as a discovery adapter, and what the balancer itself learns from
//! traffic — outlier ejection, the panic threshold, slow start and drain.
//!
//! - [`HealthCheck`]: wraps any endpoint source and passes on only the endpoints whose probes
//!   pass — [`TcpProbe`], [`HttpProbe`](crate::http::HttpProbe) (feature `http`) or an async
//!   function ([`probe_fn`]) — with rise/fall counts, jittered intervals and timeouts.
//!
//! - [`OutlierDetection`]: an endpoint whose responses fail `consecutive_failures` times in a
//!   row is ejected — taken out of picks — for `base_ejection_time` × the number of times it
//!   has been ejected, up to `max_ejection_time`; it returns on its own. At most
//!   `max_ejected_percent` of the endpoints (but always at least one) are ejected at once. An
//!   endpoint that stays healthy for `max_ejection_time` after returning starts again from one
//!   ejection. Failures are errors from the endpoint, plus responses the balancer's
//!   [`TrackCompletion`](crate::completion::TrackCompletion) classifies as failures (with the `http`
//!   feature, 5xx by default).
//! - **Panic threshold** ([`BalanceLayer::panic_threshold`](crate::BalanceLayer::panic_threshold)):
//!   when fewer than this share of the endpoints are available (not ejected), the balancer
//!   balances over all of them, ejected ones included, rather than overload the survivors
//!   (Envoy's behaviour; default 50%).
//! - [`SlowStart`]: a new endpoint, or one back from ejection, gets a share of traffic that
//!   ramps up over a window.
//! - **Drain** ([`BalanceHandle::drain`](crate::BalanceHandle::drain)): no new requests; the
//!   returned future resolves when the endpoint's in-flight requests have finished, and the
//!   endpoint is removed.
//!
//! ```
//! use std::time::Duration;
//! use tower_lb::health::{OutlierDetection, SlowStart};
//! use tower_lb::{strategy::RoundRobin, BalanceLayer};
//!
//! // Settings are plain values; each group is checked once, where the balancer takes it, and
//! // the error names the setting out of range.
//! let layer = BalanceLayer::new(RoundRobin::new())
//!     .outlier_detection(
//!         OutlierDetection::new()
//!             .consecutive_failures(5)
//!             .base_ejection_time(Duration::from_secs(30)),
//!     )?
//!     .panic_threshold(0.5)?
//!     .slow_start(SlowStart::new(Duration::from_secs(60)))?;
//! # let _ = layer;
//! # Ok::<(), tower_lb::ConfigError>(())
//! ```

pub(crate) mod active;
mod drain;
pub(crate) mod outlier;
pub(crate) mod panic;
pub(crate) mod slow_start;

pub use active::{
    probe_fn, BoxProbeFuture, EndpointHealth, HealthCheck, HealthCheckBuilder, HealthStatus,
    InitialHealth, Probe, ProbeError, ProbeErrorKind, ProbeFn, ProbeFnFuture, ProbeOutcome,
    TcpProbe,
};
pub use drain::Drain;
pub use outlier::OutlierDetection;
pub use slow_start::SlowStart;

/// The passive health settings the discovery task applies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Passive {
    pub(crate) outlier: Option<OutlierDetection>,
    /// Below this share of available endpoints, ejected ones are used too; 0 disables it.
    pub(crate) panic_threshold: f64,
    pub(crate) slow_start: Option<SlowStart>,
}

impl Default for Passive {
    fn default() -> Self {
        Self {
            outlier: None,
            panic_threshold: 0.5,
            slow_start: None,
        }
    }
}

impl Passive {
    /// Whether any of it needs a clock.
    pub(crate) fn is_timed(&self) -> bool {
        self.outlier.is_some() || self.slow_start.is_some()
    }
}
