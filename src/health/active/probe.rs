//! What a probe is, how it fails, and probes written as async functions.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::BoxError;

/// Checks one endpoint once: the future resolves to `Ok(())` if the endpoint is healthy.
///
/// A [`HealthCheck`](super::HealthCheck) calls `probe` when an endpoint is due, with its
/// discovery key and its current service, and drives the returned future under its timeout;
/// a future still pending at the timeout is dropped and counts as a failure. Do the work in
/// the future, not in `probe` itself: `probe` runs inside the health check's `poll_next`.
///
/// Ready-made: [`TcpProbe`](super::TcpProbe), `HttpProbe` (feature `http`) and [`probe_fn`]
/// for an async function.
pub trait Probe<K, S> {
    /// The probe in flight.
    type Future: Future<Output = Result<(), ProbeError>>;

    /// Starts a probe of the endpoint `key`, whose service is `service`.
    fn probe(&mut self, key: &K, service: &S) -> Self::Future;
}

/// A boxed probe future, for probes whose future cannot be named.
pub type BoxProbeFuture = Pin<Box<dyn Future<Output = Result<(), ProbeError>> + Send>>;

/// Why a probe failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeErrorKind {
    /// The probe did not finish within the timeout.
    TimedOut,
    /// An HTTP probe got a status outside the expected set.
    UnexpectedStatus(u16),
    /// The probe ran and judged the endpoint unhealthy (a probe function returned `false`).
    Unhealthy,
    /// The probe failed with an error (connection refused, an HTTP error, a probe function's
    /// error): see [`source`](std::error::Error::source).
    Failed,
}

/// A failed probe: its [kind](Self::kind), and the underlying error if there is one.
///
/// Cheap to clone (the source is shared), so the last one can be kept in
/// [`EndpointHealth`](super::EndpointHealth).
#[derive(Clone, Debug)]
pub struct ProbeError {
    kind: ProbeErrorKind,
    timeout: Option<Duration>,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl ProbeError {
    /// A probe that failed with `error`. A `ProbeError` passed in (even boxed) is kept as is.
    pub fn new(error: impl Into<BoxError>) -> Self {
        match error.into().downcast::<ProbeError>() {
            Ok(probe_error) => *probe_error,
            Err(error) => Self {
                kind: ProbeErrorKind::Failed,
                timeout: None,
                source: Some(Arc::from(error)),
            },
        }
    }

    /// A probe that ran and judged the endpoint unhealthy.
    pub fn unhealthy() -> Self {
        Self::of_kind(ProbeErrorKind::Unhealthy)
    }

    /// An HTTP probe answered with a status outside the expected set.
    pub fn unexpected_status(status: u16) -> Self {
        Self::of_kind(ProbeErrorKind::UnexpectedStatus(status))
    }

    pub(super) fn timed_out(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            ..Self::of_kind(ProbeErrorKind::TimedOut)
        }
    }

    fn of_kind(kind: ProbeErrorKind) -> Self {
        Self {
            kind,
            timeout: None,
            source: None,
        }
    }

    /// Why the probe failed.
    pub fn kind(&self) -> ProbeErrorKind {
        self.kind
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.timeout, &self.source) {
            (ProbeErrorKind::TimedOut, Some(timeout), _) => {
                write!(f, "probe timed out after {timeout:?}")
            }
            (ProbeErrorKind::TimedOut, None, _) => f.write_str("probe timed out"),
            (ProbeErrorKind::UnexpectedStatus(status), ..) => {
                write!(f, "probe got unexpected HTTP status {status}")
            }
            (ProbeErrorKind::Unhealthy, ..) => f.write_str("probe reported the endpoint unhealthy"),
            (ProbeErrorKind::Failed, _, Some(source)) => write!(f, "probe failed: {source}"),
            (ProbeErrorKind::Failed, _, None) => f.write_str("probe failed"),
        }
    }
}

impl StdError for ProbeError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

/// What a probe function may return: `bool` (`true` is healthy) or `Result<(), E>`.
pub trait ProbeOutcome {
    /// The outcome as a probe result.
    fn into_probe_result(self) -> Result<(), ProbeError>;
}

impl ProbeOutcome for bool {
    fn into_probe_result(self) -> Result<(), ProbeError> {
        if self {
            Ok(())
        } else {
            Err(ProbeError::unhealthy())
        }
    }
}

impl<E: Into<BoxError>> ProbeOutcome for Result<(), E> {
    fn into_probe_result(self) -> Result<(), ProbeError> {
        self.map_err(ProbeError::new)
    }
}

/// A probe from an async function of the endpoint's key and service, returning `bool` or
/// `Result<(), E>` (see [`ProbeOutcome`]).
///
/// The returned future must not borrow its arguments: clone what it needs first.
///
/// ```
/// use std::net::SocketAddr;
/// use tower_lb::{discover, health::{probe_fn, HealthCheck}};
///
/// let probe = probe_fn(|addr: &SocketAddr, _: &_| {
///     let addr = *addr;
///     async move { tokio::net::TcpStream::connect(addr).await.map(drop) }
/// });
/// let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
/// let checked = HealthCheck::new(discover::fixed([(addr, ())]), probe);
/// # let _ = checked;
/// ```
pub fn probe_fn<K, S, F, Fut>(f: F) -> ProbeFn<F, K, S>
where
    F: FnMut(&K, &S) -> Fut,
    Fut: Future,
    Fut::Output: ProbeOutcome,
{
    ProbeFn {
        f,
        _endpoint: PhantomData,
    }
}

/// The probe [`probe_fn`] returns.
pub struct ProbeFn<F, K, S> {
    f: F,
    // The key and service types, so a closure's argument types can be inferred from where
    // the probe is used.
    _endpoint: PhantomData<fn(&K, &S)>,
}

impl<F: Clone, K, S> Clone for ProbeFn<F, K, S> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _endpoint: PhantomData,
        }
    }
}

impl<F, K, S> fmt::Debug for ProbeFn<F, K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeFn").finish_non_exhaustive()
    }
}

impl<F, K, S, Fut> Probe<K, S> for ProbeFn<F, K, S>
where
    F: FnMut(&K, &S) -> Fut,
    Fut: Future,
    Fut::Output: ProbeOutcome,
{
    type Future = ProbeFnFuture<Fut>;

    fn probe(&mut self, key: &K, service: &S) -> ProbeFnFuture<Fut> {
        ProbeFnFuture {
            inner: (self.f)(key, service),
        }
    }
}

pin_project! {
    /// The future of a [`ProbeFn`]: the function's future, its outcome read as a probe result.
    pub struct ProbeFnFuture<Fut> {
        #[pin]
        inner: Fut,
    }
}

impl<Fut> Future for ProbeFnFuture<Fut>
where
    Fut: Future,
    Fut::Output: ProbeOutcome,
{
    type Output = Result<(), ProbeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .inner
            .poll(cx)
            .map(ProbeOutcome::into_probe_result)
    }
}

impl<Fut> fmt::Debug for ProbeFnFuture<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeFnFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_kinds() {
        assert!(true.into_probe_result().is_ok());
        assert_eq!(
            false.into_probe_result().unwrap_err().kind(),
            ProbeErrorKind::Unhealthy
        );
        let failed = Err::<(), _>("refused").into_probe_result().unwrap_err();
        assert_eq!(failed.kind(), ProbeErrorKind::Failed);
        assert_eq!(failed.to_string(), "probe failed: refused");
        assert_eq!(failed.source().unwrap().to_string(), "refused");
    }

    #[test]
    fn a_probe_error_passed_through_keeps_its_kind() {
        let status = Err::<(), _>(ProbeError::unexpected_status(503))
            .into_probe_result()
            .unwrap_err();
        assert_eq!(status.kind(), ProbeErrorKind::UnexpectedStatus(503));
        assert_eq!(
            ProbeError::timed_out(Duration::from_secs(1)).to_string(),
            "probe timed out after 1s"
        );
    }
}
