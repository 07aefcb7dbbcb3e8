//! Bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): a key's endpoint takes its
//! request only if that keeps it within `factor ×` its weighted share of everything in
//! flight; otherwise the next candidate does.
//!
//! The total in flight is estimated once per picker and shared by every clone of the
//! balancer (see [`LoadEstimate`]), so a pick costs O(1) atomic loads rather than a sum over
//! every endpoint, and a new clone — one per request, in axum — starts from what every other
//! clone has seen rather than from nothing.

use std::iter;

use super::Endpoints;
use crate::error::ConfigError;
use crate::util::sync::{AtomicU64, Ordering};

/// Endpoint counts re-read per pick (by whichever clone picks) to keep the shared estimate of
/// the total fresh.
const REFRESH_PER_PICK: u64 = 8;

/// The largest accepted factor; beyond it the bound would never apply.
const MAX_FACTOR: f64 = 1000.0;

/// Validates a load factor and returns it in thousandths.
pub(super) fn factor_milli(factor: f64) -> Result<u64, ConfigError> {
    const SETTING: &str = "bounded_load";
    if factor.is_nan() {
        return Err(ConfigError::new(SETTING, "the factor is not a number"));
    }
    if factor < 1.0 {
        return Err(ConfigError::new(
            SETTING,
            format!(
                "{factor} is below 1; the factor must be at least 1 (the average load), \
                 1.25 is typical"
            ),
        ));
    }
    if factor > MAX_FACTOR {
        return Err(ConfigError::new(
            SETTING,
            format!("{factor} is above the maximum of {MAX_FACTOR}"),
        ));
    }
    Ok((factor * 1000.0).round() as u64)
}

/// The bound for one endpoint set.
pub(super) struct BoundedLoad {
    /// The factor in thousandths.
    factor_milli: u128,
    /// Weights when the picker was built (table order).
    weights: Box<[u32]>,
    /// 1000 × the total weight: the denominator of every bound.
    scale: u128,
    estimate: LoadEstimate,
}

impl BoundedLoad {
    pub(super) fn new(endpoints: &Endpoints<'_>, factor_milli: u64) -> Self {
        let weights: Box<[u32]> = endpoints.iter().map(|e| e.weight()).collect();
        let total_weight: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        Self {
            factor_milli: u128::from(factor_milli),
            weights,
            scale: 1000 * total_weight,
            estimate: LoadEstimate::new(endpoints),
        }
    }

    /// Whether `endpoint`, with `load` requests in flight, may take one more while `total`
    /// are in flight everywhere: `load + 1 ≤ ceil(factor × (total + 1) × weight / total
    /// weight)`. For an integer `load` that is `load < factor × (total + 1) × weight / total
    /// weight`, compared here without division or rounding.
    fn has_room(&self, endpoint: usize, load: u64, total: u64) -> bool {
        let weight = u128::from(self.weights[endpoint]);
        u128::from(load) * self.scale < self.factor_milli * (u128::from(total) + 1) * weight
    }

    /// The first of `candidates` (the key's endpoint, then its successors) with room, or, if
    /// none has room, the least loaded relative to its weight. Every endpoint is considered
    /// at most once.
    pub(super) fn choose(
        &self,
        endpoints: &Endpoints<'_>,
        mut candidates: impl Iterator<Item = usize>,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n != self.weights.len() {
            return None;
        }
        let primary = candidates.next()?;
        let load = endpoints.get(primary).in_flight();
        if load == 0 {
            // An idle endpoint always has room. Not counting this dispatch in the estimate
            // only makes the estimated total low until the endpoint is next read, which makes
            // bounds stricter, never looser; and it keeps the common case free of shared
            // writes.
            return Some(primary);
        }
        let estimate = &self.estimate;
        estimate.refresh(endpoints);
        let total = estimate.total();
        let epoch = estimate.next_epoch();
        let mut least: Option<(usize, u64)> = None;
        let mut considered = 0;
        let mut chosen = None;
        for candidate in iter::once(primary).chain(candidates) {
            if !estimate.consider(candidate, epoch) {
                continue;
            }
            let load = endpoints.get(candidate).in_flight();
            estimate.observe(candidate, load);
            if self.has_room(candidate, load, total) {
                chosen = Some(candidate);
                break;
            }
            let weight = u128::from(self.weights[candidate]);
            let lighter = least.is_none_or(|(best, best_load)| {
                u128::from(load) * u128::from(self.weights[best]) < u128::from(best_load) * weight
            });
            if lighter {
                least = Some((candidate, load));
            }
            considered += 1;
            if considered == n {
                break;
            }
        }
        let chosen = chosen.or(least.map(|(endpoint, _)| endpoint))?;
        estimate.dispatched(chosen);
        Some(chosen)
    }
}

/// The endpoints' in-flight counts as the picks of every clone have seen them, and their sum.
///
/// It starts exact (read when the picker is built, off the request path). Each pick that has
/// to look beyond an idle endpoint re-reads [`REFRESH_PER_PICK`] counts in rotation and every
/// candidate it considers, and adds its own dispatch at once; so the total is exact while
/// nothing completes, and catches up with completions within `n / REFRESH_PER_PICK` such
/// picks. Concurrent updates keep the sum right: each replaces a count with a swap and adds
/// the difference to the total.
struct LoadEstimate {
    loads: Box<[AtomicU64]>,
    total: AtomicU64,
    /// The next endpoint to re-read.
    cursor: AtomicU64,
    /// `considered[i] == epoch` when endpoint `i` was considered in the pick of `epoch`.
    considered: Box<[AtomicU64]>,
    /// The last epoch handed out; each pick takes a new one, so marks need no clearing.
    epoch: AtomicU64,
}

impl LoadEstimate {
    fn new(endpoints: &Endpoints<'_>) -> Self {
        let loads: Box<[AtomicU64]> = endpoints
            .iter()
            .map(|e| AtomicU64::new(e.in_flight()))
            .collect();
        let total = loads.iter().map(|l| l.load(Ordering::Relaxed)).sum();
        Self {
            considered: endpoints.iter().map(|_| AtomicU64::new(0)).collect(),
            loads,
            total: AtomicU64::new(total),
            cursor: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn refresh(&self, endpoints: &Endpoints<'_>) {
        let n = self.loads.len() as u64;
        let first = self.cursor.fetch_add(REFRESH_PER_PICK, Ordering::Relaxed);
        for k in 0..REFRESH_PER_PICK.min(n) {
            let endpoint = (first.wrapping_add(k) % n) as usize;
            self.observe(endpoint, endpoints.get(endpoint).in_flight());
        }
    }

    fn observe(&self, endpoint: usize, load: u64) {
        let slot = &self.loads[endpoint];
        if slot.load(Ordering::Relaxed) != load {
            let before = slot.swap(load, Ordering::Relaxed);
            self.total
                .fetch_add(load.wrapping_sub(before), Ordering::Relaxed);
        }
    }

    fn dispatched(&self, endpoint: usize) {
        self.loads[endpoint].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Marks `endpoint` as considered in this pick; `false` if it already was. A concurrent
    /// pick may overwrite the mark, which at worst makes this one look at an endpoint twice.
    fn consider(&self, endpoint: usize, epoch: u64) -> bool {
        self.considered[endpoint].swap(epoch, Ordering::Relaxed) != epoch
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{ConsistentHash, KeyFallback};
    use super::*;
    use crate::endpoint::{EndpointHandle, InFlightGuard};
    use crate::strategy::test_util::named_endpoints;
    use crate::strategy::{LocalState, Strategy};

    /// `ceil(factor × (total + 1) × weight / total_weight)`, in floating point, for checking.
    fn cap(factor: f64, total_after: u64, weight: u32, total_weight: u32) -> u64 {
        (factor * total_after as f64 * f64::from(weight) / f64::from(total_weight) - 1e-9).ceil()
            as u64
    }

    #[test]
    fn factors_are_validated() {
        assert_eq!(factor_milli(1.25), Ok(1250));
        assert_eq!(factor_milli(1.0), Ok(1000));
        assert!(factor_milli(0.999).is_err());
        assert!(factor_milli(f64::INFINITY).is_err());
        assert!(factor_milli(-1.0).is_err());
    }

    #[test]
    fn the_bound_is_exact_at_integer_caps() {
        // Four equal endpoints, factor 1.1, 9 in flight: the cap is ceil(1.1 × 10 / 4) = 3.
        let handles = named("node", 4);
        let bound = BoundedLoad::new(&Endpoints::new(&handles), factor_milli(1.1).unwrap());
        assert!(bound.has_room(0, 2, 9));
        assert!(!bound.has_room(0, 3, 9));
        // 1.1 × 40 / 4 = 11 exactly (not 11.000000000000002): an endpoint may reach 11.
        assert!(bound.has_room(0, 10, 39));
        assert!(!bound.has_room(0, 11, 39));
    }

    /// Holds every request and checks after each pick that no endpoint is above its cap, for
    /// all three tables, equal and unequal weights, several clones, and one hot key.
    #[test]
    fn held_requests_never_exceed_the_cap() {
        let weight_sets: [&[(&str, u32)]; 2] = [
            &[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)],
            &[("a", 1), ("b", 2), ("c", 3), ("d", 1), ("e", 5)],
        ];
        for weights in weight_sets {
            let handles = named_endpoints(weights);
            let total_weight: u32 = weights.iter().map(|&(_, w)| w).sum();
            for (kind, factor) in [
                (ConsistentHash::maglev(), 1.25),
                (ConsistentHash::ring(), 1.0),
                (ConsistentHash::ring_nginx(), 1.5),
            ] {
                let picker = kind
                    .bounded_load(factor)
                    .unwrap()
                    .build(&Endpoints::new(&handles));
                let mut clones: Vec<LocalState> = (0..3).map(|_| LocalState::new()).collect();
                let mut held: Vec<InFlightGuard> = Vec::new();
                for i in 0..300u64 {
                    // Mostly one hot key, so the bound has work to do.
                    let key = if i % 4 == 0 {
                        format!("key-{i}")
                    } else {
                        "hot".to_owned()
                    };
                    let hash = hash_of(&picker, key.as_bytes());
                    let local = &mut clones[i as usize % 3];
                    let index = pick_hash(&picker, &handles, Some(hash), local).unwrap();
                    held.push(handles[index].dispatch());
                    let total = held.len() as u64;
                    for (endpoint, &(name, weight)) in handles.iter().zip(weights) {
                        let limit = cap(factor, total, weight, total_weight);
                        assert!(
                            endpoint.in_flight() <= limit,
                            "{picker:?}: {name} has {} in flight, cap {limit} at {total}",
                            endpoint.in_flight()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_full_endpoint_passes_keys_on_deterministically() {
        let handles = named("node", 6);
        let picker = ConsistentHash::ring()
            .bounded_load(1.0)
            .unwrap()
            .build(&Endpoints::new(&handles));
        let hash = hash_of(&picker, b"hot");
        let home = pick_hash(&picker, &handles, Some(hash), &mut LocalState::new()).unwrap();
        // The key's endpoint is busy: everyone else is idle, so the key moves on, to the same
        // endpoint from every clone.
        let _busy: Vec<InFlightGuard> = (0..3).map(|_| handles[home].dispatch()).collect();
        let next: Vec<usize> = (0..5)
            .map(|_| pick_hash(&picker, &handles, Some(hash), &mut LocalState::new()).unwrap())
            .collect();
        assert!(next.iter().all(|&i| i == next[0] && i != home), "{next:?}");
    }

    #[test]
    fn round_robin_fallback_skips_full_endpoints() {
        let handles = named("node", 3);
        let picker = ConsistentHash::maglev()
            .bounded_load(1.0)
            .unwrap()
            .fallback(KeyFallback::RoundRobin)
            .build(&Endpoints::new(&handles));
        let _busy: Vec<InFlightGuard> = (0..2).map(|_| handles[1].dispatch()).collect();
        let mut local = LocalState::new();
        for _ in 0..6 {
            assert_ne!(pick_hash(&picker, &handles, None, &mut local), Some(1));
        }
    }

    #[test]
    fn when_no_candidate_has_room_the_least_loaded_is_chosen() {
        let handles: Vec<EndpointHandle> = named("node", 3);
        let bound = BoundedLoad::new(&Endpoints::new(&handles), 1000);
        // 3, 2 and 0 in flight: the cap is ceil(6 / 3) = 2, so only endpoint 2 has room, but
        // the walk offers endpoints 0 and 1 only.
        let _held: Vec<InFlightGuard> = [0, 0, 0, 1, 1]
            .iter()
            .map(|&i| handles[i].dispatch())
            .collect();
        let endpoints = Endpoints::new(&handles);
        assert_eq!(bound.choose(&endpoints, [0, 1].into_iter()), Some(1));
        assert_eq!(bound.choose(&endpoints, [0, 1, 2].into_iter()), Some(2));
    }
}
