//! Random: a uniformly random endpoint, or one drawn in proportion to its weight.

use std::fmt;

use super::alias::AliasTable;
use super::{Endpoints, PickContext, Picker, Strategy};

/// Sends each request to a random endpoint: uniformly ([`Random::new`]) or in proportion to
/// the endpoints' weights ([`Random::weighted`]).
///
/// Randomness comes from each clone's own fast generator, so picks never contend across
/// threads. Weighted picks use an alias table (Walker, built with Vose's method in integer
/// arithmetic, so each endpoint's probability is exactly its weight over the total) that is
/// built once per endpoint set, off the request path; when all weights are equal the table
/// is skipped and the pick is uniform.
///
/// An endpoint that is not ready when drawn is skipped for another draw.
///
/// Pick cost: O(1): one random number, plus one table read when weighted.
///
/// ```
/// use tower_lb::{strategy::Random, BalanceLayer};
///
/// let uniform = BalanceLayer::new(Random::new());
/// // Weights from discovery (`Weighted` services) or a `BalanceHandle`.
/// let by_weight = BalanceLayer::new(Random::weighted()).weighted();
/// # let _ = (uniform, by_weight);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Random {
    weighted: bool,
}

impl Random {
    /// Every endpoint equally likely, whatever its weight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Each endpoint chosen with probability its weight over the sum of the weights.
    pub fn weighted() -> Self {
        Self { weighted: true }
    }
}

/// The picker [`Random`] builds.
pub struct RandomPicker {
    /// `None`: uniform.
    alias: Option<AliasTable>,
}

impl Strategy for Random {
    type Picker = RandomPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> RandomPicker {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight().max(1)).collect();
        let uniform = !self.weighted || weights.windows(2).all(|w| w[0] == w[1]);
        RandomPicker {
            alias: (!uniform).then(|| AliasTable::new(&weights)),
        }
    }
}

impl Picker for RandomPicker {
    type Local = ();

    #[inline]
    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        match &self.alias {
            Some(table) => Some(table.draw(cx.random())),
            None => Some(cx.random_below(endpoints.len())),
        }
    }
}

impl fmt::Debug for RandomPicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RandomPicker")
            .field("weighted", &self.alias.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::test_util::{endpoints, picks};

    fn counts(strategy: Random, weights: &[u32], n: usize) -> Vec<usize> {
        let handles = endpoints(weights);
        let picker = strategy.build(&Endpoints::new(&handles));
        let mut counts = vec![0; weights.len()];
        for i in picks(&picker, &handles, n) {
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn uniform_picks_are_even_whatever_the_weights() {
        // 40,000 picks over 4: 10,000 each, σ ≈ 87; 6σ tolerance.
        let seen = counts(Random::new(), &[1, 50, 1, 3], 40_000);
        assert!(
            seen.iter().all(|&c| (9_480..=10_520).contains(&c)),
            "{seen:?}"
        );
    }

    #[test]
    fn weights_99_to_1_give_99_to_1() {
        // 100,000 picks: 1,000 expected for the light one, σ ≈ 31.5; 6σ tolerance.
        let seen = counts(Random::weighted(), &[99, 1], 100_000);
        assert!((810..=1_190).contains(&seen[1]), "{seen:?}");
        assert_eq!(seen[0] + seen[1], 100_000);
    }

    #[test]
    fn equal_weights_skip_the_table() {
        let handles = endpoints(&[7, 7, 7]);
        let picker = Random::weighted().build(&Endpoints::new(&handles));
        assert!(picker.alias.is_none());
        assert!(format!("{picker:?}").contains("weighted: false"));
        let handles = endpoints(&[7, 8]);
        assert!(Random::weighted()
            .build(&Endpoints::new(&handles))
            .alias
            .is_some());
        let empty = Random::weighted().build(&Endpoints::new(&[]));
        assert!(empty.alias.is_none());
    }

    #[test]
    fn both_halves_of_a_column_are_used() {
        // 1:2 → columns {0 keeps 2/3, alias 1} and {1 full}: endpoint 0 only from its keep.
        let table = AliasTable::new(&[1, 2]);
        let p = table.probabilities();
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-12 && (p[1] - 2.0 / 3.0).abs() < 1e-12);
        let seen = counts(Random::weighted(), &[1, 2], 30_000);
        assert!((9_400..=10_600).contains(&seen[0]), "{seen:?}");
    }
}
