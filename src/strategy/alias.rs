//! Vose's alias method on integers: draws an index in proportion to its weight in O(1), from
//! one random number. Weighted random and power of two choices draw with it.

use crate::util::rng::split;

/// The table for one set of weights; built off the request path.
#[derive(Debug)]
pub(crate) struct AliasTable {
    entries: Box<[Entry]>,
}

/// One bucket: its own index if the draw's second half is below `keep_below`, else `alias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    keep_below: u64,
    alias: u32,
}

impl AliasTable {
    /// The table for `weights` (at least one, each at least 1), exact up to the 2^-64
    /// resolution of a draw: each index brings `w × n` units into `n` buckets of `W = Σw`
    /// units each, in integers, so no bucket is short.
    pub(crate) fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut mass: Vec<u64> = weights.iter().map(|&w| u64::from(w) * n as u64).collect();
        let mut entries: Box<[Entry]> = (0..n)
            .map(|i| Entry {
                keep_below: u64::MAX,
                alias: i as u32,
            })
            .collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| mass[i] < total);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            // Bucket `s` keeps its own mass and is topped up from `l`.
            entries[s] = Entry {
                keep_below: ((u128::from(mass[s]) << 64) / u128::from(total)) as u64,
                alias: l as u32,
            };
            mass[l] -= total - mass[s];
            if mass[l] < total {
                large.pop();
                small.push(l);
            }
        }
        // What is left is exactly full: the unassigned mass always equals `total` per
        // unassigned bucket, and integer arithmetic loses nothing.
        debug_assert!(small.is_empty() && large.iter().all(|&l| mass[l] == total));
        Self { entries }
    }

    /// The number of indexes.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// An index, in proportion to its weight, from one uniform random number: its
    /// multiply-shift picks the bucket and the low half of the product tosses the coin.
    #[inline]
    pub(crate) fn draw(&self, random: u64) -> usize {
        let (bucket, coin) = split(random, self.entries.len());
        let entry = self.entries[bucket];
        // A coin flip the branch predictor cannot learn: select without a branch.
        let keep = 0usize.wrapping_sub(usize::from(coin < entry.keep_below));
        (bucket & keep) | (entry.alias as usize & !keep)
    }

    /// The probability with which each index is drawn.
    #[cfg(test)]
    pub(crate) fn probabilities(&self) -> Vec<f64> {
        let n = self.entries.len() as f64;
        let mut p = vec![0.0; self.entries.len()];
        for (bucket, entry) in self.entries.iter().enumerate() {
            let keep = entry.keep_below as f64 / 2f64.powi(64);
            p[bucket] += keep / n;
            p[entry.alias as usize] += (1.0 - keep) / n;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop, prop_assert, proptest};

    proptest! {
        /// The table draws each index with probability weight / total weight.
        #[test]
        fn the_table_is_exact(weights in prop::collection::vec(1u32..=1_000_000, 1..64)) {
            let table = AliasTable::new(&weights);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            for (i, p) in table.probabilities().into_iter().enumerate() {
                let expected = f64::from(weights[i]) / total;
                prop_assert!((p - expected).abs() < 1e-12, "index {}: {} vs {}", i, p, expected);
            }
        }
    }

    #[test]
    fn draws_follow_the_weights() {
        let table = AliasTable::new(&[1, 3, 6]);
        let mut rng = crate::util::rng::FastRng::seeded(3);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[table.draw(rng.next_u64())] += 1;
        }
        for (count, weight) in counts.iter().zip([1.0, 3.0, 6.0]) {
            let share = f64::from(*count) / 100_000.0;
            assert!((share - weight / 10.0).abs() < 0.01, "{counts:?}");
        }
    }
}
