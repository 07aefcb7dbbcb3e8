//! The crate's error types.

use std::fmt;

/// Errors the balancer itself produces.
///
/// The balancer's service error type is [`tower::BoxError`] (endpoint errors pass through
/// boxed); errors that come from the balancer downcast to this type:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower::{service_fn, BoxError, ServiceExt};
/// use tower_lb::{discover, strategy::RoundRobin, Balance, Error};
///
/// // A balancer over an empty endpoint set fails at once instead of hanging.
/// let (_handle, source) = discover::channel::<u32, tower::util::ServiceFn<fn(()) -> std::future::Ready<Result<(), BoxError>>>>();
/// let balance = Balance::new(source, RoundRobin::new());
/// let err = balance.oneshot(()).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
/// # let _ = service_fn(|_: ()| async { Ok::<_, BoxError>(()) });
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// No endpoint is available: discovery has produced none (or every one failed its
    /// readiness check), at once or within the configured wait.
    NoEndpoints,
    /// `call` was invoked without a preceding `poll_ready` that returned `Ready(Ok(()))`, which
    /// breaks tower's `Service` contract.
    NotReady,
    /// The balancer was built outside a tokio runtime and first used outside one too, so its
    /// background discovery task could not be started.
    NoRuntime,
    /// A keyed strategy (consistent hashing) got a request without a key (see
    /// [`RequestKey`](crate::key::RequestKey)) and its fallback is to fail.
    MissingKey,
    /// A handle named an endpoint the balancer does not have.
    UnknownEndpoint,
    /// The balancer behind a handle is gone (every clone was dropped).
    Closed,
    /// The balancer's discovery task failed — something it ran panicked (a discovery stream,
    /// a weigher, a strategy's build) — so the balancer can no longer follow its endpoints and
    /// fails every request. Carries the panic's message; [`Stats`](crate::Stats) and a
    /// `tracing` error say so too.
    DiscoveryFailed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoEndpoints => f.write_str("no endpoints available"),
            Error::NotReady => {
                f.write_str("balancer called without poll_ready reporting ready first")
            }
            Error::NoRuntime => {
                f.write_str("no tokio runtime: the balancer's discovery task needs one to run on")
            }
            Error::MissingKey => f.write_str(
                "the request has no key for the consistent-hashing strategy, whose fallback is to fail",
            ),
            Error::UnknownEndpoint => f.write_str("no endpoint with that key"),
            Error::Closed => f.write_str("the balancer is gone"),
            Error::DiscoveryFailed(message) => {
                write!(f, "the balancer's discovery task failed: {message}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// A configuration value was rejected where it was given.
///
/// ```
/// use tower_lb::BalanceLayer;
/// use tower_lb::strategy::RoundRobin;
///
/// let err = BalanceLayer::new(RoundRobin::new())
///     .wait_for_endpoints(std::time::Duration::MAX)
///     .unwrap_err();
/// assert!(err.to_string().contains("wait_for_endpoints"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    setting: &'static str,
    problem: String,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }

    /// The name of the rejected setting.
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.problem)
    }
}

impl std::error::Error for ConfigError {}
