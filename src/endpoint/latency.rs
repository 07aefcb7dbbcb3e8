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

/// A PeakEWMA estimate in nanoseconds and when it was last updated.
pub(super) struct Estimate {
    /// The estimate as `f64` bits; 0 before any sample.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds on the [`clock`] scale.
    at: AtomicU64,
}

impl Estimate {
    pub(super) fn new() -> Self {
        Self {
            rtt_ns: AtomicU64::new(0),
            at: AtomicU64::new(0),
        }
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

    /// Folds a latency sample in: a sample above the estimate replaces it (the peak), one
    /// below decays it toward the sample with time constant `decay_ns`. Concurrent updates
    /// race benignly: the last writer wins, as in any EWMA that drops a sample.
    pub(super) fn record(&self, sample_ns: f64, now: u64, decay_ns: f64) {
        let sample_ns = sample_ns.max(1.0);
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let next = if estimate == 0.0 || sample_ns > estimate {
            sample_ns
        } else {
            let elapsed = now.saturating_sub(self.at.load(Ordering::Relaxed)) as f64;
            let keep = (-elapsed / decay_ns).exp();
            estimate * keep + sample_ns * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

impl EndpointState {
    /// The PeakEWMA latency estimate (nanoseconds) decayed to `now`, or `None` before the
    /// first sample.
    pub(crate) fn rtt_estimate(&self, now: u64, decay_ns: f64) -> Option<f64> {
        self.rtt.get(now, decay_ns)
    }
}
