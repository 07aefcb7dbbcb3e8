//! The delay between failed attempts to reach etcd.

use std::time::Duration;

use crate::util::rng::FastRng;

/// Doubles from `min` up to `max`, each delay drawn uniformly from the upper half of its
/// range (so clients that failed together do not retry together), and starts over after a
/// success.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: FastRng,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
            rng: FastRng::new(),
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let unit = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(0.5 + 0.5 * unit).max(self.min.min(ceiling))
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
    fn delays_double_up_to_the_cap_in_the_upper_half_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let mut ceiling = min;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(
                delay <= ceiling && delay >= (ceiling / 2).max(min),
                "{delay:?} for {ceiling:?}"
            );
            seen.insert(delay);
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(ceiling, max);
        assert!(seen.len() > 10, "jittered: {seen:?}");
        backoff.reset();
        assert_eq!(backoff.next_delay(), min);
    }
}
