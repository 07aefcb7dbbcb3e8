//! When each endpoint is probed next, and the probes in flight.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::{AbortHandle, Abortable};
use pin_project_lite::pin_project;
use tokio::time::{Sleep, Timeout};

use super::probe::ProbeError;
use crate::util::rng::FastRng;

/// `interval` spread uniformly over `interval × (1 ± jitter)`.
pub(super) fn jittered(interval: Duration, jitter: f64, rng: &mut FastRng) -> Duration {
    // 53 random bits give a uniform float in [0, 1).
    let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    interval.mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
}

pin_project! {
    /// Resolves to an endpoint's key and generation when its next probe is due.
    pub(super) struct NextProbe<K> {
        key: Option<K>,
        generation: u64,
        #[pin]
        sleep: Sleep,
    }
}

impl<K> NextProbe<K> {
    pub(super) fn after(key: K, generation: u64, delay: Duration) -> Self {
        Self {
            key: Some(key),
            generation,
            sleep: tokio::time::sleep(delay),
        }
    }
}

impl<K> Future for NextProbe<K> {
    type Output = Option<(K, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        ready!(this.sleep.poll(cx));
        Poll::Ready(this.key.take().map(|key| (key, *this.generation)))
    }
}

/// How a probe in flight ended.
pub(super) enum ProbeEnd {
    /// It finished or timed out.
    Done(Result<(), ProbeError>),
    /// Its endpoint left the source; the result means nothing.
    Cancelled,
}

pin_project! {
    /// A probe in flight, under its timeout, cancellable through an [`AbortHandle`].
    pub(super) struct RunningProbe<K, F> {
        key: Option<K>,
        generation: u64,
        timeout: Duration,
        #[pin]
        probe: Abortable<Timeout<F>>,
    }
}

impl<K, F: Future> RunningProbe<K, F> {
    pub(super) fn start(
        key: K,
        generation: u64,
        probe: F,
        timeout: Duration,
    ) -> (Self, AbortHandle) {
        let (cancel, registration) = AbortHandle::new_pair();
        let running = Self {
            key: Some(key),
            generation,
            timeout,
            probe: Abortable::new(tokio::time::timeout(timeout, probe), registration),
        };
        (running, cancel)
    }
}

impl<K, F> Future for RunningProbe<K, F>
where
    F: Future<Output = Result<(), ProbeError>>,
{
    type Output = Option<(K, u64, ProbeEnd)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let end = match ready!(this.probe.poll(cx)) {
            Ok(Ok(result)) => ProbeEnd::Done(result),
            Ok(Err(_elapsed)) => ProbeEnd::Done(Err(ProbeError::timed_out(*this.timeout))),
            Err(_aborted) => ProbeEnd::Cancelled,
        };
        Poll::Ready(this.key.take().map(|key| (key, *this.generation, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let mut rng = FastRng::seeded(3);
        let interval = Duration::from_secs(2);
        let delays: Vec<_> = (0..10_000)
            .map(|_| jittered(interval, 0.2, &mut rng))
            .collect();
        let (low, high) = (Duration::from_millis(1600), Duration::from_millis(2400));
        assert!(delays.iter().all(|d| (low..=high).contains(d)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(1650)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(2350)));
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        assert!(
            mean.abs_diff(interval) < Duration::from_millis(20),
            "{mean:?}"
        );
    }

    #[test]
    fn no_jitter_is_the_interval() {
        let mut rng = FastRng::seeded(9);
        assert_eq!(
            jittered(Duration::from_secs(2), 0.0, &mut rng),
            Duration::from_secs(2)
        );
    }
}
