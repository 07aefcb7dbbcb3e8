//! The delay between failed watch attempts.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Doubles from `min` up to `max`, each delay drawn uniformly from its upper half (so clients
/// that failed together do not retry together), and starts over after a success.
#[derive(Clone, Debug)]
pub(crate) struct ExponentialBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl ExponentialBackoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let mut seed = RandomState::new().build_hasher();
        seed.write_u64(0x5eed);
        Self {
            min,
            max,
            next: min,
            rng: seed.finish() | 1,
        }
    }

    /// xorshift64*: plenty for jitter.
    fn random_unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let bits = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        bits as f64 / (1u64 << 53) as f64
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let jittered = ceiling.mul_f64(0.5 + 0.5 * self.random_unit());
        jittered.max(self.min.min(ceiling))
    }

    /// After a success: the next delay is `min` again.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let min = Duration::from_millis(800);
        let max = Duration::from_secs(30);
        let mut backoff = ExponentialBackoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "{delay:?} above {ceiling:?}");
            assert!(
                delay >= (ceiling / 2).max(min),
                "{delay:?} below half of {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(ceiling, max, "the cap was reached");
    }

    #[test]
    fn a_reset_starts_over() {
        let min = Duration::from_millis(100);
        let mut backoff = ExponentialBackoff::new(min, Duration::from_secs(10));
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(
            backoff.next_delay(),
            min,
            "the first delay after a reset is the minimum"
        );
    }

    #[test]
    fn delays_are_not_all_the_same() {
        let mut backoff =
            ExponentialBackoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let delays: std::collections::HashSet<_> =
            (0..26).map(|_| backoff.next_delay()).skip(10).collect();
        assert!(delays.len() > 1, "jitter spreads retries: {delays:?}");
    }
}
