//! A small, fast, non-cryptographic random number generator for picks.
//!
//! Each `Balance` clone owns one, so random strategies never contend on shared state and never
//! pay for SipHash per pick.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// wyrand: one multiply per number, passes BigCrush, 64 bits of state.
#[derive(Clone, Debug)]
pub(crate) struct FastRng {
    state: u64,
}

impl FastRng {
    /// A generator seeded from a process-wide sequence mixed with per-process randomness, so
    /// clones start at different points and processes differ.
    pub(crate) fn new() -> Self {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(n);
        Self::seeded(hasher.finish())
    }

    pub(crate) fn seeded(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    }

    /// A uniform number in `0..n` (see [`split`]). `n` must not be zero.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        split(self.next_u64(), n).0
    }
}

/// Splits a uniform `r` into a uniform index below `n` and a uniform remainder: the high and
/// low halves of `r × n` (Lemire's multiply-shift; the bias is below `n / 2^64`, negligible for
/// the sizes a balancer sees).
#[inline]
pub(crate) fn split(r: u64, n: usize) -> (usize, u64) {
    let product = u128::from(r) * n as u128;
    ((product >> 64) as usize, product as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = FastRng::seeded(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10)] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    #[test]
    fn clones_get_different_seeds() {
        assert_ne!(FastRng::new().next_u64(), FastRng::new().next_u64());
    }
}
