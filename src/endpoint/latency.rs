//! The PeakEWMA latency estimate of an endpoint, and the clock it is measured on.

use super::EndpointState;
use crate::util::sync::{AtomicU64, Ordering};

/// The balancer's clock: tokio's, so that latency estimates follow a paused test clock.
pub(crate) mod clock {
    use std::sync::OnceLock;
    use tokio::time::Instant;

    static EPOCH: OnceLock<Instant> = OnceLock::new();

    /// Nanoseconds since a process-wide epoch. One clock read.
    pub(crate) fn now_ns() -> u64 {
        let epoch = *EPOCH.get_or_init(Instant::now);
        Instant::now().saturating_duration_since(epoch).as_nanos() as u64
    }
}

/// Samples after which a copy's estimate has come most of the way (1 - 1/e) down to faster
/// samples, however close together they come.
const SAMPLES_TO_FORGET: f64 = 64.0;

/// A PeakEWMA estimate in nanoseconds and when it was last updated.
///
/// An endpoint of weight `w` counts as `w / w_min` copies of the lightest endpoint (see
/// [`PowerOfTwoChoices`](crate::strategy::PowerOfTwoChoices)); the estimate is that of one
/// copy, which meets `w_min / w` of the endpoint's responses: a slow response raises it by
/// that share of the difference, and it forgets over 64 responses per copy. So a heavy
/// endpoint is not judged by the worst of its many more samples, which would make it look
/// slower than an equally fast light one.
pub(super) struct Estimate {
    /// The estimate as `f64` bits; 0 before any sample.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds on the [`clock`] scale.
    at: AtomicU64,
    /// The share of the endpoint's responses one copy meets, `w_min / w`, as `f64` bits.
    share: AtomicU64,
}

impl Estimate {
    pub(super) fn new() -> Self {
        Self {
            rtt_ns: AtomicU64::new(0),
            at: AtomicU64::new(0),
            share: AtomicU64::new(1f64.to_bits()),
        }
    }

    /// Sets the share of responses one copy meets (a picker that weighs latency sets it for
    /// its table's weights).
    pub(super) fn set_share(&self, share: f64) {
        let share = if share.is_finite() && share > 0.0 {
            share.min(1.0)
        } else {
            1.0
        };
        self.share.store(share.to_bits(), Ordering::Relaxed);
    }

    /// The estimate decayed to `now`, or `None` before the first sample.
    fn get(&self, now: u64, decay_ns: f64) -> Option<f64> {
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        if estimate == 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(self.at.load(Ordering::Relaxed)) as f64;
        // Without samples the estimate decays toward zero, so an endpoint that stopped
        // getting traffic because it looked slow is tried again eventually.
        Some(estimate * (-elapsed / decay_ns).exp())
    }

    /// Folds a latency sample in: a sample above the estimate replaces it (the peak; for one
    /// copy of a heavier endpoint, raises it by the copy's share of the difference), one
    /// below decays it toward the sample with time constant `decay_ns`, or faster when
    /// samples come closer together than 1/64 of it per copy. Concurrent updates race
    /// benignly: the last writer wins, as in any EWMA that drops a sample.
    pub(super) fn record(&self, sample_ns: f64, now: u64, decay_ns: f64) {
        let sample_ns = sample_ns.max(1.0);
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let share = f64::from_bits(self.share.load(Ordering::Relaxed));
        let next = if estimate == 0.0 {
            sample_ns
        } else if sample_ns > estimate {
            estimate + (sample_ns - estimate) * share
        } else {
            let elapsed = now.saturating_sub(self.at.load(Ordering::Relaxed)) as f64;
            let keep = (-elapsed / decay_ns)
                .exp()
                .min(1.0 - share / SAMPLES_TO_FORGET);
            estimate * keep + sample_ns * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

impl EndpointState {
    /// Sets the share of this endpoint's responses one copy of the lightest endpoint in its
    /// table meets, `w_min / w`, for its latency estimate.
    pub(crate) fn set_latency_share(&self, share: f64) {
        self.rtt.set_share(share);
    }

    /// The PeakEWMA latency estimate (nanoseconds) decayed to `now`, or `None` before the
    /// first sample.
    pub(crate) fn rtt_estimate(&self, now: u64, decay_ns: f64) -> Option<f64> {
        self.rtt.get(now, decay_ns)
    }
}
