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

/// The most one slower response multiplies an estimate by.
const PEAK_STEP: f64 = 2.0;

/// A PeakEWMA estimate in nanoseconds and when it was last updated.
///
/// An endpoint of weight `w` counts as `w / w_min` copies of the lightest endpoint (see
/// [`PowerOfTwoChoices`](crate::strategy::PowerOfTwoChoices)); the estimate is that of one
/// copy, which meets `w_min / w` of the endpoint's responses: a slow response raises it by
/// that share of the difference. So a heavy endpoint is not judged by the worst of its many
/// more samples, which would make it look slower than an equally fast light one.
pub(super) struct Estimate {
    /// The estimate as `f64` bits; 0 before any sample.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds on the [`clock`] scale.
    at: AtomicU64,
    /// The share of the endpoint's responses one copy meets, `w_min / w`, as `f64` bits.
    share: AtomicU64,
    /// The least part of the way to a faster sample one sample moves a copy's estimate,
    /// whatever the time since the last (0: time alone decides), as `f64` bits.
    forget: AtomicU64,
}

impl Estimate {
    pub(super) fn new() -> Self {
        Self {
            rtt_ns: AtomicU64::new(0),
            at: AtomicU64::new(0),
            share: AtomicU64::new(1f64.to_bits()),
            forget: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Sets the share of responses one copy meets and how much of the way to a faster sample
    /// each of a copy's samples at least moves the estimate (a picker that weighs latency
    /// sets them for its table).
    pub(super) fn set_model(&self, share: f64, forget: f64) {
        let share = if share.is_finite() && share > 0.0 {
            share.min(1.0)
        } else {
            1.0
        };
        let forget = if forget.is_finite() {
            forget.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.share.store(share.to_bits(), Ordering::Relaxed);
        self.forget.store(forget.to_bits(), Ordering::Relaxed);
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

    /// Folds a latency sample in: a sample above the estimate replaces it (the peak), up to
    /// twice the estimate (for one copy of a heavier endpoint, raises it by the copy's share
    /// of that), one
    /// below decays it toward the sample with time constant `decay_ns` (and, when a picker
    /// asked for it, at least a set part of the way per copy's sample). Concurrent updates
    /// race benignly: the last writer wins, as in any EWMA that drops a sample.
    pub(super) fn record(&self, sample_ns: f64, now: u64, decay_ns: f64) {
        let sample_ns = sample_ns.max(1.0);
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let share = f64::from_bits(self.share.load(Ordering::Relaxed));
        let next = if estimate == 0.0 {
            sample_ns
        } else if sample_ns > estimate {
            // At most doubling per response: a lone stall of the client (a preempted thread)
            // barely moves an estimate, while a run of slow responses lifts it within a few.
            estimate + (sample_ns.min(estimate * PEAK_STEP) - estimate) * share
        } else {
            let elapsed = now.saturating_sub(self.at.load(Ordering::Relaxed)) as f64;
            let forget = f64::from_bits(self.forget.load(Ordering::Relaxed));
            let keep = (-elapsed / decay_ns).exp().min(1.0 - share * forget);
            estimate * keep + sample_ns * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

impl EndpointState {
    /// Sets how its latency estimate is kept: `share` is the part of this endpoint's responses
    /// one copy of the lightest endpoint in its table meets (`w_min / w`); `forget` the least
    /// part of the way to a faster sample each of a copy's samples moves the estimate (0:
    /// time alone decides, as in PeakEWMA).
    pub(crate) fn set_latency_model(&self, share: f64, forget: f64) {
        self.rtt.set_model(share, forget);
    }

    /// The PeakEWMA latency estimate (nanoseconds) decayed to `now`, or `None` before the
    /// first sample.
    pub(crate) fn rtt_estimate(&self, now: u64, decay_ns: f64) -> Option<f64> {
        self.rtt.get(now, decay_ns)
    }
}
