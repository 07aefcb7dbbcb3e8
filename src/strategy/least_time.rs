//! Least time: least connections that steers around slow endpoints. The recommended default.

use std::time::Duration;

use super::least_connections::{LeastConnections, LeastConnectionsPicker};
use super::{Endpoints, Strategy};
use crate::error::ConfigError;

/// Sends each request to the endpoint with the fewest requests in flight (per weight), unless
/// its latency makes it clearly costlier than another: **the recommended default**.
///
/// ```
/// use tower_lb::{strategy::LeastTime, BalanceLayer};
///
/// let layer = BalanceLayer::new(LeastTime::new());
/// # let _ = layer;
/// ```
///
/// # The pick
///
/// A pick is [`LeastConnections::weighted`]'s: the lowest load per copy of the lightest
/// endpoint (requests in flight, plus failures in a row while they are recent), found through
/// its index without reading every endpoint, ties rotating (equal weights) or broken in
/// proportion to weight. Then each candidate it finds is held against one other endpoint
/// drawn at random (in proportion to weight): if that one's expected cost — its latency
/// estimate × (its load per copy + 1) — is below 70% of the candidate's, the candidate is
/// passed over and the search goes on to the next least loaded endpoint. After eight passes
/// the next candidate is taken regardless, so a pick stays bounded.
///
/// Latency is each endpoint's PeakEWMA estimate, as [`PowerOfTwoChoices::peak_ewma`] keeps
/// it (per copy of the lightest endpoint): it jumps up toward a slower response (at most
/// doubling per response), decays toward
/// faster ones over [`decay`](Self::decay) (10 s) or within about 64 responses per copy,
/// whichever is sooner (so that one slow response among many fast ones fades quickly:
/// latency here only has to tell endpoints that are slow from those that are not), and
/// counts at least [`latency_resolution`](Self::latency_resolution) (1 ms). An endpoint
/// whose response latency has not been measured yet, or whose last responses failed, is
/// judged by its load alone and is no reference for passing over others (an endpoint that
/// fails fast looks fast).
///
/// # Why this, and not least connections or power of two choices
///
/// Exact least connections is the best pick when endpoints are alike — with equal backends
/// at 70% and 90% load, with heavy-tailed request costs, with 100 single-worker backends at
/// 90% (where power of two choices has 1.7× its p99), and with a hanging backend — but an
/// endpoint that is 10× slower still gets a request whenever it is the least loaded, which
/// it often is, and least connections' p99 is 2.5× the best there. PeakEWMA P2C handles the
/// slow endpoint but is 1.04–1.10× the best with equal backends and heavy tails, and 1.8×
/// with 100 backends. Least time keeps least connections' picks where latencies are alike —
/// a random other endpoint is rarely clearly cheaper than the least loaded one — and passes
/// over the slow or hanging endpoint, since nearly any other is clearly cheaper. Checking
/// candidates against a random other, rather than against the cheapest endpoint, costs O(1)
/// and needs no global minimum; drawing the other afresh for each candidate (never the
/// candidate itself) means a slow endpoint is always held against someone else.
///
/// In the virtual-time quality benchmark (`cargo bench --bench quality`, 8 scenarios × 5
/// seeds) its p99 and p99.9 are within 5% of the best of tower's p2c (pending requests and
/// PeakEWMA) and exact least connections in every scenario but one, and below all of them
/// with a 10× slow backend; the exception is a backend that fails fast, where tower's p2c
/// turns a quarter of the requests into errors during the fault (25,522 against our 104),
/// which unloads the others: p99 1.07× and p99.9 1.05× there. The figures are in
/// `BENCHMARKS.md`.
///
/// # Weights
///
/// Weights hold as in [`LeastConnections::weighted`]: with weights 99:1 over equally fast
/// endpoints the heavy one gets 99% ± 1% of the requests, one at a time or eight at a time,
/// whether the endpoints answer in microseconds or milliseconds (`tests/weights.rs`). Latency
/// estimates are per copy of the lightest endpoint, as in PeakEWMA P2C, so a heavy endpoint is
/// not judged by the worst of its many more samples. Services that are not
/// [`Weighted`](crate::weight::Weighted) all weigh 1.
///
/// # Cost
///
/// Least connections' pick, plus two latency estimates and one random draw per candidate
/// (usually one), and the balancer's two clock reads per request (at the pick and at the
/// response), as under PeakEWMA P2C.
///
/// [`PowerOfTwoChoices::peak_ewma`]: super::PowerOfTwoChoices::peak_ewma
#[derive(Clone, Debug)]
pub struct LeastTime {
    inner: LeastConnections,
}

impl Default for LeastTime {
    fn default() -> Self {
        Self::new()
    }
}

impl LeastTime {
    /// The default [`decay`](Self::decay) of latency estimates: 10 s.
    pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
    /// The default [`latency_resolution`](Self::latency_resolution): 1 ms.
    pub const DEFAULT_RESOLUTION: Duration = Duration::from_millis(1);

    /// Weighted least connections that passes over clearly slower endpoints.
    pub fn new() -> Self {
        Self {
            inner: LeastConnections::weighted()
                .latency_aware(Self::DEFAULT_DECAY, Self::DEFAULT_RESOLUTION),
        }
    }

    fn latency(&self) -> (Duration, Duration) {
        self.inner
            .latency_settings()
            .unwrap_or((Self::DEFAULT_DECAY, Self::DEFAULT_RESOLUTION))
    }

    /// How fast a latency estimate forgets: the time constant with which it decays toward
    /// faster responses (or within about 64 responses per copy, when they come faster), and
    /// toward zero without responses, so that an endpoint passed over for being slow is tried
    /// again later. Rejected when zero.
    pub fn decay(self, decay: Duration) -> Result<Self, ConfigError> {
        if decay.is_zero() {
            return Err(ConfigError::new(
                "decay",
                "must be greater than zero; it is the time constant of the latency estimate",
            ));
        }
        let (_, resolution) = self.latency();
        Ok(Self {
            inner: self.inner.latency_aware(decay, resolution),
        })
    }

    /// The finest latency difference the pick acts on: estimates below it count as equal to
    /// it (default 1 ms; see
    /// [`PowerOfTwoChoices::latency_resolution`](super::PowerOfTwoChoices::latency_resolution)
    /// for why). Rejected when zero.
    pub fn latency_resolution(self, resolution: Duration) -> Result<Self, ConfigError> {
        if resolution.is_zero() {
            return Err(ConfigError::new(
                "latency_resolution",
                "must be greater than zero; use 1 ns to compare estimates as they are",
            ));
        }
        let (decay, _) = self.latency();
        Ok(Self {
            inner: self.inner.latency_aware(decay, resolution),
        })
    }

    /// How many requests in flight each recent failure in a row counts as (default 1); see
    /// [`LeastConnections::error_penalty`].
    pub fn error_penalty(self, penalty: u32) -> Result<Self, ConfigError> {
        Ok(Self {
            inner: self.inner.error_penalty(penalty)?,
        })
    }

    /// How long failures count against an endpoint after a pick first notices the latest one
    /// (default 10 s); see [`LeastConnections::error_window`].
    pub fn error_window(self, window: Duration) -> Result<Self, ConfigError> {
        Ok(Self {
            inner: self.inner.error_window(window)?,
        })
    }
}

impl Strategy for LeastTime {
    type Picker = LeastConnectionsPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> LeastConnectionsPicker {
        self.inner.build(endpoints)
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;
    use crate::endpoint::{EndpointHandle, InFlightGuard};
    use crate::strategy::test_util::endpoints;
    use crate::strategy::{LocalState, PickContext, Picker};

    /// Picks `n` times at time `now` with one clone; returns how often each endpoint won.
    fn counts_at(handles: &[EndpointHandle], n: usize, now: u64) -> Vec<usize> {
        let picker = LeastTime::new().build(&Endpoints::new(handles));
        assert_eq!(picker.latency_decay(), Some(LeastTime::DEFAULT_DECAY));
        let endpoints = Endpoints::new(handles);
        let mut local = LocalState::new();
        let mut counts = vec![0; handles.len()];
        for _ in 0..n {
            let mut unit = ();
            let mut cx = PickContext::new(&mut local, &mut unit);
            cx.now = now;
            counts[picker.pick(&endpoints, &mut cx).unwrap()] += 1;
        }
        counts
    }

    fn hold(handle: &EndpointHandle, count: usize) -> Vec<InFlightGuard> {
        (0..count).map(|_| handle.dispatch()).collect()
    }

    const NOW: u64 = 1_000_000_000;

    fn measure(handle: &EndpointHandle, latency_ms: f64) {
        let decay_ns = LeastTime::DEFAULT_DECAY.as_nanos() as f64;
        handle
            .dispatch()
            .record_rtt(latency_ms * 1e6, NOW, decay_ns);
    }

    #[test]
    fn alike_endpoints_are_picked_by_load_alone() {
        for n in [3, 20] {
            let handles = endpoints(&vec![1; n]);
            // Latencies within 10% of each other: no candidate is clearly costlier.
            for (i, handle) in handles.iter().enumerate() {
                measure(handle, 10.0 + (i % 3) as f64 * 0.3);
            }
            let _busy: Vec<_> = handles[1..].iter().flat_map(|h| hold(h, 1)).collect();
            let chosen = counts_at(&handles, 200, NOW);
            assert_eq!(chosen[0], 200, "n = {n}: {chosen:?}");
        }
    }

    #[test]
    fn a_slow_endpoint_is_passed_over_though_least_loaded() {
        for n in [3, 20] {
            let handles = endpoints(&vec![1; n]);
            measure(&handles[0], 100.0);
            for handle in &handles[1..] {
                measure(handle, 10.0);
            }
            // The slow endpoint is idle, the others have 2 in flight: 100 ms × 1 against
            // 10 ms × 3.
            let _busy: Vec<_> = handles[1..].iter().flat_map(|h| hold(h, 2)).collect();
            let chosen = counts_at(&handles, 500, NOW);
            assert_eq!(chosen[0], 0, "n = {n}: {chosen:?}");
            // With 12 in flight each the others cost 10 ms × 13: the slow one is cheaper.
            let _more: Vec<_> = handles[1..].iter().flat_map(|h| hold(h, 10)).collect();
            let chosen = counts_at(&handles, 500, NOW);
            assert_eq!(chosen[0], 500, "n = {n}: {chosen:?}");
        }
    }

    #[test]
    fn a_failing_endpoint_is_no_reference() {
        let handles = endpoints(&[1; 3]);
        for handle in &handles {
            measure(handle, 10.0);
        }
        // Endpoint 2 fails fast: its estimate drops, but it cannot make the others look slow.
        for _ in 0..200 {
            let guard = handles[2].dispatch();
            guard.record_rtt(1e3, NOW, LeastTime::DEFAULT_DECAY.as_nanos() as f64);
            guard.record_failure();
        }
        let _busy = hold(&handles[1], 1);
        // Endpoint 0 is the least loaded (2's failures count as load): always chosen.
        let chosen = counts_at(&handles, 300, NOW);
        assert_eq!(chosen, vec![300, 0, 0]);
    }

    #[test]
    fn invalid_configuration_is_rejected_with_a_reason() {
        let err = LeastTime::new().decay(Duration::ZERO).unwrap_err();
        assert_eq!(err.setting(), "decay");
        let err = LeastTime::new()
            .latency_resolution(Duration::ZERO)
            .unwrap_err();
        assert_eq!(err.setting(), "latency_resolution");
        let err = LeastTime::new().error_window(Duration::ZERO).unwrap_err();
        assert_eq!(err.setting(), "error_window");
        let err = LeastTime::new().error_penalty(2_000_000).unwrap_err();
        assert_eq!(err.setting(), "error_penalty");
        let ok = LeastTime::new()
            .decay(Duration::from_secs(2))
            .and_then(|s| s.latency_resolution(Duration::from_micros(100)));
        assert!(ok.is_ok());
    }
}
