//! The PeakEWMA latency estimate of an endpoint, and the clock it is measured on.

use super::EndpointState;
use crate::util::sync::{AtomicU64, Ordering};

/// The clocks requests are timed with.
///
/// A balancer times its requests (PeakEWMA latencies, abandoned requests) with a [`Clock`]
/// chosen when it is built: the CPU's time-stamp counter through `quanta` — a few
/// nanoseconds a read, where the operating system's monotonic clock costs tens — unless tokio's
/// clock is paused then (`#[tokio::test(start_paused = true)]`, a simulation), in which case it
/// follows tokio's clock, so that latencies in tests are the virtual ones. [`now_ns`] is tokio's
/// clock, for what is timed off the request path.
pub(crate) mod clock {
    use std::sync::OnceLock;
    use tokio::time::Instant;

    static EPOCH: OnceLock<Instant> = OnceLock::new();

    /// Nanoseconds since a process-wide epoch on tokio's clock (which follows a paused test
    /// clock). One clock read.
    pub(crate) fn now_ns() -> u64 {
        let epoch = *EPOCH.get_or_init(Instant::now);
        Instant::now().saturating_duration_since(epoch).as_nanos() as u64
    }

    /// The time-stamp counter, calibrated once per process (under a millisecond usually, at
    /// most 200 ms), and where its nanoseconds start.
    struct Counter {
        clock: quanta::Clock,
        origin: u64,
    }

    static COUNTER: OnceLock<Counter> = OnceLock::new();

    fn counter() -> &'static Counter {
        COUNTER.get_or_init(|| {
            let clock = quanta::Clock::new();
            let origin = clock.raw();
            Counter { clock, origin }
        })
    }

    /// Nanoseconds since the counter's origin.
    #[inline]
    fn counter_ns() -> u64 {
        let counter = counter();
        counter
            .clock
            .delta_as_nanos(counter.origin, counter.clock.raw())
    }

    /// A balancer's clock: see the [module docs](self).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Clock {
        /// The time-stamp counter.
        Counter,
        /// tokio's clock, for balancers built while it was paused.
        Tokio,
    }

    impl Clock {
        /// The clock for a balancer built now: tokio's if the current runtime's clock is
        /// paused, else the counter (calibrated here, so that no request pays for it).
        ///
        /// A paused clock does not move between two reads; a running one moves by the time
        /// a read takes, which the monotonic clock resolves. (Should it not, the balancer
        /// follows tokio's clock, which is right either way, only slower.)
        pub(crate) fn detect() -> Self {
            let (first, second) = (Instant::now(), Instant::now());
            if first == second {
                Clock::Tokio
            } else {
                counter();
                Clock::Counter
            }
        }

        /// Nanoseconds on this clock. One clock read.
        #[inline]
        pub(crate) fn now_ns(self) -> u64 {
            match self {
                Clock::Counter => counter_ns(),
                Clock::Tokio => now_ns(),
            }
        }
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
