//! The PeakEWMA latency estimate of an endpoint, and the clock it is measured on.

use super::EndpointState;
use crate::util::sync::{AtomicU64, Ordering};

/// The clocks requests are timed with.
///
/// A balancer times its requests (PeakEWMA latencies, abandoned requests) with a [`Clock`]
/// chosen when it is built: the CPU's time-stamp counter through `quanta` — a few
/// nanoseconds a read, where the operating system's monotonic clock costs tens — unless tokio's
/// clock is paused then (`#[tokio::test(start_paused = true)]`, a simulation), in which case it
/// follows tokio's clock, so that latencies in tests are the virtual ones. The clock is chosen
/// at build: a balancer built before `tokio::time::pause()` is called, or outside the runtime
/// that is paused later, keeps the counter and measures real time. [`now_ns`] is tokio's clock,
/// for what is timed by tokio's time everywhere (how long least connections holds failures
/// against an endpoint), and the clock of balancers built while it was paused.
pub(crate) mod clock {
    use std::sync::OnceLock;
    use std::time::Duration;
    use tokio::time::Instant;

    static EPOCH: OnceLock<Instant> = OnceLock::new();

    /// How far before its first use the epoch is put: every runtime made since, paused or
    /// not, reads tokio's clock at or after it.
    const EPOCH_LEAD: Duration = Duration::from_secs(3600);

    /// Nanoseconds since a process-wide epoch on tokio's clock (which follows a paused test
    /// clock). One clock read.
    ///
    /// The epoch is taken from the real clock, an hour before the first call: a paused clock
    /// starts at the real time its runtime was made and only moves forward, so runtimes made
    /// at about the same time — tests running side by side, one of them having advanced its
    /// virtual clock by minutes when it first called this — all read times after the epoch,
    /// where an epoch read from one paused clock would put the others' times before it (read
    /// as 0 until their clocks caught up).
    pub(crate) fn now_ns() -> u64 {
        let epoch = *EPOCH.get_or_init(|| {
            let now = std::time::Instant::now();
            Instant::from_std(now.checked_sub(EPOCH_LEAD).unwrap_or(now))
        });
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
        /// paused, else the counter. `timed` says whether the balancer's requests are timed
        /// from the start; the counter is then calibrated now, so that no request pays for it.
        ///
        /// A paused clock does not move between two reads; a running one moves by the time
        /// a read takes, which the monotonic clock resolves. (Should it not, the balancer
        /// follows tokio's clock, which is right either way, only slower.)
        pub(crate) fn detect(timed: bool) -> Self {
            let (first, second) = (Instant::now(), Instant::now());
            if first == second {
                Clock::Tokio
            } else {
                if timed {
                    counter();
                }
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
        let elapsed = now.saturating_sub(self.at.load(Ordering::Relaxed));
        // Without samples the estimate decays toward zero, so an endpoint that stopped
        // getting traffic because it looked slow is tried again eventually.
        Some(estimate * kept(elapsed, 1.0 / decay_ns))
    }

    /// Folds a latency sample in: a sample above the estimate replaces it (the peak), up to
    /// twice the estimate (for one copy of a heavier endpoint, raises it by the copy's share
    /// of that), one below decays it toward the sample at `rate` (`1 / decay_ns`, the decay's
    /// time constant inverted) — and, when a picker asked for it, at least a set part of the
    /// way per copy's sample. Concurrent updates race benignly: the last writer wins, as in
    /// any EWMA that drops a sample.
    ///
    /// `rate` is `1 / decay_ns`, worked out once per table rather than divided per response.
    pub(super) fn record(&self, sample_ns: f64, now: u64, rate: f64) {
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
            let elapsed = now.saturating_sub(self.at.load(Ordering::Relaxed));
            let forget = f64::from_bits(self.forget.load(Ordering::Relaxed));
            let keep = kept(elapsed, rate).min(1.0 - share * forget);
            estimate * keep + sample_ns * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

/// Below this, `e^x` is its Taylor series up to `x⁴`: the next term, under `2⁻⁵⁰ / 120`, is
/// far below the last bit of the result.
const SERIES_BELOW: f64 = 1.0 / 1024.0;

/// `exp(-elapsed × rate)`: the share of an estimate left after `elapsed` nanoseconds when it
/// decays at `rate` (`1 / decay_ns`).
///
/// Requests come micro- or milliseconds apart and estimates decay over seconds, so the
/// exponent is nearly always tiny; there a short series gives the same value as `exp` (to
/// its rounding) at a fraction of the cost. Larger exponents, an endpoint idle for a while,
/// take `exp`.
#[inline]
fn kept(elapsed: u64, rate: f64) -> f64 {
    if elapsed == 0 {
        return 1.0;
    }
    let x = -(elapsed as f64) * rate;
    if x > -SERIES_BELOW {
        1.0 + x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0))))
    } else {
        x.exp()
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
    #[inline]
    pub(crate) fn rtt_estimate(&self, now: u64, decay_ns: f64) -> Option<f64> {
        self.rtt.get(now, decay_ns)
    }

    /// The latency estimate as last updated, before it decays: at least
    /// [`rtt_estimate`](Self::rtt_estimate) at any later time, and cheaper to read.
    #[inline]
    pub(crate) fn rtt_undecayed(&self) -> Option<f64> {
        let estimate = f64::from_bits(self.rtt.rtt_ns.load(Ordering::Relaxed));
        (estimate != 0.0).then_some(estimate)
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;

    /// The series and `exp` agree to within a few units of the last bit where the series is
    /// used, and `exp` is used beyond.
    /// Paused runtimes side by side (tests on virtual time) each read their own time, even
    /// when one of them advanced by minutes before the first read fixed the epoch.
    #[test]
    fn paused_clocks_side_by_side_read_their_own_time() {
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a runtime")
        };
        let ahead = paused();
        ahead.block_on(async {
            tokio::time::advance(std::time::Duration::from_secs(600)).await;
            clock::now_ns()
        });
        let behind = paused();
        let (before, after) = behind.block_on(async {
            let before = clock::now_ns();
            tokio::time::advance(std::time::Duration::from_millis(1)).await;
            (before, clock::now_ns())
        });
        assert_eq!(after - before, 1_000_000);
    }

    /// A balancer built while tokio's clock is paused times its requests on that clock, so
    /// that latencies in tests are the virtual ones.
    #[test]
    fn a_paused_clock_is_followed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let clock = clock::Clock::detect(true);
            assert_eq!(clock, clock::Clock::Tokio);
            let before = clock.now_ns();
            tokio::time::advance(std::time::Duration::from_millis(3)).await;
            assert_eq!(clock.now_ns() - before, 3_000_000);
        });
    }

    #[test]
    fn kept_is_exp() {
        let decay = 10e9;
        for elapsed in [
            1,
            7,
            1_000,
            123_456,
            1_000_000,
            9_000_000,
            9_765_625,
            10_000_000,
            5e9 as u64,
            1e12 as u64,
        ] {
            let exact = (-(elapsed as f64) / decay).exp();
            let fast = kept(elapsed, 1.0 / decay);
            assert!(
                (fast - exact).abs() <= 4.0 * f64::EPSILON * exact,
                "{elapsed}: {fast} vs {exact}"
            );
        }
        assert_eq!(kept(0, 1.0 / decay), 1.0);
    }
}
