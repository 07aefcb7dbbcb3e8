//! Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, §3.4): a prime-sized lookup table filled by letting endpoints take
//! turns claiming their next preferred empty slot.
//!
//! Each endpoint's preference list is a permutation of the slots, `offset + j × skip (mod
//! size)`, from two hashes of its identity; since the size is prime, every `skip` visits every
//! slot. Endpoints take turns in identity order, heavier endpoints more often (as in Envoy's
//! weighted Maglev): an endpoint of weight `w` takes its `k`-th turn in round
//! `max(previous + 1, ceil(k × max_weight / w))`. Each turn claims exactly one slot, so the
//! shares of the table follow the turns, and a change of membership disturbs few slots because
//! everyone else's preferences are unchanged.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{identity_hash, Endpoints};
use crate::key::mix64;

/// Slots when none is configured: a prime near 2¹⁶, as in Envoy.
pub(super) const DEFAULT_TABLE_SIZE: u64 = 65_537;
/// The largest table (a prime, as in Envoy): 20 MB of slots.
pub(super) const MAX_TABLE_SIZE: u64 = 5_000_011;
/// Slots per endpoint below which the table is grown: an endpoint's share is within one slot
/// of its weighted share, so 100 slots keep it within about 1%.
const SLOTS_PER_ENDPOINT: u64 = 100;
/// Salts the second identity hash (the probe step) so it is independent of the first.
const SKIP_SALT: u64 = 0x6a09_e667_f3bc_c909;

/// A filled Maglev lookup table.
pub(super) struct Maglev {
    slots: Slots,
}

/// `slots[i]` is the endpoint (table index) owning slot `i`; two bytes per slot when there
/// are at most 65,536 endpoints, so that the table of 4,096 endpoints (524,309 slots) takes
/// 1 MB and stays in a core's L2 cache.
enum Slots {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Maglev {
    /// Fills a table of [`table_size_for`] slots for these endpoints.
    pub(super) fn build(
        endpoints: &Endpoints<'_>,
        by_identity: &[usize],
        min_size: u64,
        seed: u64,
    ) -> Self {
        if endpoints.is_empty() {
            return Self {
                slots: Slots::Narrow(Box::new([])),
            };
        }
        let size = table_size_for(min_size, endpoints.len());
        if size > min_size {
            tracing::debug!(
                configured = min_size,
                size,
                endpoints = endpoints.len(),
                "maglev table grown to keep 100 slots per endpoint"
            );
        }
        let slots = if endpoints.len() <= 1 << 16 {
            Slots::Narrow(populate(endpoints, by_identity, size, seed))
        } else {
            Slots::Wide(populate(endpoints, by_identity, size, seed))
        };
        Self { slots }
    }

    /// The number of slots.
    #[inline]
    pub(super) fn len(&self) -> usize {
        match &self.slots {
            Slots::Narrow(slots) => slots.len(),
            Slots::Wide(slots) => slots.len(),
        }
    }

    /// The endpoint owning `slot`.
    #[inline]
    fn owner(&self, slot: usize) -> usize {
        match &self.slots {
            Slots::Narrow(slots) => usize::from(slots[slot]),
            Slots::Wide(slots) => slots[slot] as usize,
        }
    }

    /// The slot of a key hash: `hash × size / 2⁶⁴`, a multiply instead of a division; any
    /// fixed map from hashes to slots would do, since the table is what moves keys.
    #[inline]
    pub(super) fn slot(&self, hash: u64) -> Option<usize> {
        let size = self.len();
        if size == 0 {
            return None;
        }
        Some(crate::util::rng::split(hash, size).0)
    }

    /// The endpoint owning a key hash.
    #[inline]
    pub(super) fn get(&self, hash: u64) -> Option<usize> {
        self.slot(hash).map(|slot| self.owner(slot))
    }

    /// The owners of every slot from `slot` on, wrapping (with repeats): where a key goes
    /// when its endpoint is full.
    pub(super) fn slots_from(&self, slot: usize) -> impl Iterator<Item = usize> + '_ {
        let size = self.len();
        (0..size).map(move |k| {
            let slot = slot + k;
            self.owner(if slot >= size { slot - size } else { slot })
        })
    }
}

/// The number of slots for `endpoints` endpoints: `min_size` (a prime) if it gives each
/// endpoint [`SLOTS_PER_ENDPOINT`] slots, else the first prime at or above `min_size × 2^k`
/// for the smallest `k` that does, at most [`MAX_TABLE_SIZE`]. A function of its arguments
/// only, so every process picks the same size.
pub(super) fn table_size_for(min_size: u64, endpoints: usize) -> u64 {
    let wanted = SLOTS_PER_ENDPOINT.saturating_mul(endpoints as u64);
    if min_size >= wanted {
        return min_size;
    }
    let mut size = min_size.max(2);
    while size < wanted && size < MAX_TABLE_SIZE {
        size *= 2;
    }
    if size >= MAX_TABLE_SIZE {
        return MAX_TABLE_SIZE;
    }
    next_prime(size).min(MAX_TABLE_SIZE)
}

/// One endpoint's walk through its preference list: `next`, `next + skip`, … (mod size).
struct Chooser {
    endpoint: usize,
    next: u32,
    skip: u32,
    /// The inverse of `skip` modulo the size, computed on first use; 0 until then.
    skip_inverse: u32,
}

impl Chooser {
    fn advance(&self, slot: u32, size: u32) -> u32 {
        let next = slot + self.skip;
        if next >= size {
            next - size
        } else {
            next
        }
    }

    /// Claims the first free slot of the preference list by probing.
    fn probe(&mut self, taken: &mut [u64], size: u32) -> u32 {
        let mut slot = self.next;
        loop {
            let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
            if taken[word] & bit == 0 {
                taken[word] |= bit;
                self.next = self.advance(slot, size);
                return slot;
            }
            slot = self.advance(slot, size);
        }
    }

    /// Claims the first of the `free` slots in the preference list (the one `probe` would
    /// find): slot `s` is `(s - next) / skip` steps away, modulo the prime size.
    fn nearest(&mut self, free: &mut Vec<u32>, size: u32) -> u32 {
        if self.skip_inverse == 0 {
            self.skip_inverse = inverse_mod(self.skip, size);
        }
        let (modulus, inverse) = (u64::from(size), u64::from(self.skip_inverse));
        let (mut best, mut best_steps) = (0, u64::MAX);
        for (i, &slot) in free.iter().enumerate() {
            let distance = (u64::from(slot) + modulus - u64::from(self.next)) % modulus;
            let steps = distance * inverse % modulus;
            if steps < best_steps {
                (best, best_steps) = (i, steps);
            }
        }
        let slot = free.swap_remove(best);
        self.next = self.advance(slot, size);
        slot
    }
}

/// The free slots of a bitmap.
fn free_slots(taken: &[u64], size: usize) -> Vec<u32> {
    (0..size as u32)
        .filter(|&slot| taken[slot as usize / 64] & (1 << (slot % 64)) == 0)
        .collect()
}

/// The inverse of `a` modulo the prime `m` (extended Euclid).
fn inverse_mod(a: u32, m: u32) -> u32 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(a));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i64::from(m)) as u32
}

/// A table slot's content: an endpoint index, in two or four bytes.
trait Owner: Copy + Default {
    fn from_index(index: usize) -> Self;
}

impl Owner for u16 {
    fn from_index(index: usize) -> Self {
        index as u16
    }
}

impl Owner for u32 {
    fn from_index(index: usize) -> Self {
        index as u32
    }
}

/// Maglev population: endpoints take turns, each claiming its next preferred empty slot,
/// until every slot is owned.
///
/// Endpoints of equal weight always take their turns together, in identity order, so turns
/// are scheduled per weight class with a heap ordered by (round, heavier class first): the
/// usual case of equal weights costs one heap operation per round of `n` claims, and skewed
/// weights cost O(log classes) per turn instead of Envoy's O(n) per round. The cost is
/// dominated by probes, about `size × ln(size)` of them, as the last empty slots are hard to
/// find.
fn populate<T: Owner>(
    endpoints: &Endpoints<'_>,
    by_identity: &[usize],
    size: u64,
    seed: u64,
) -> Box<[T]> {
    let size32 = size as u32; // MAX_TABLE_SIZE < 2^32
                              // Weight classes, heaviest first; members in identity order.
    let mut ranked: Vec<(Reverse<u32>, usize)> = by_identity
        .iter()
        .enumerate()
        .map(|(rank, &index)| (Reverse(endpoints.get(index).weight()), rank))
        .collect();
    ranked.sort_unstable();
    let mut choosers = Vec::with_capacity(ranked.len());
    let mut classes: Vec<(u32, std::ops::Range<usize>)> = Vec::new();
    for &(Reverse(weight), rank) in &ranked {
        let index = by_identity[rank];
        let hash = identity_hash(seed, endpoints.get(index).identity());
        choosers.push(Chooser {
            endpoint: index,
            next: (hash % size) as u32,
            skip: (mix64(hash ^ SKIP_SALT) % (size - 1) + 1) as u32,
            skip_inverse: 0,
        });
        match classes.last_mut() {
            Some((class_weight, members)) if *class_weight == weight => members.end += 1,
            _ => classes.push((weight, choosers.len() - 1..choosers.len())),
        }
    }
    let max_weight = u64::from(classes[0].0);

    let size = size as usize;
    let mut slots = vec![T::default(); size].into_boxed_slice();
    // Probes test a bitmap (64 KB for 524,309 slots) rather than the slots themselves: most
    // probes of a filling table hit taken slots, and the bitmap stays in cache.
    let mut taken = vec![0u64; size.div_ceil(64)].into_boxed_slice();
    // The last empty slots cost the most probes (`size / free` each). Once only
    // `sqrt(size / 4)` are left, a chooser's first free slot is found by computing where
    // each free slot falls in its preference list instead: `free` modular multiplications
    // per claim, the same answer, and about half the build time of pure probing.
    let endgame = ((size / 4) as f64).sqrt() as usize;
    let mut free: Vec<u32> = Vec::new();
    let mut filled = 0usize;
    // (round, class, turns taken by the class so far)
    let mut turns: BinaryHeap<Reverse<(u64, usize, u64)>> = (0..classes.len())
        .map(|class| Reverse((1, class, 0)))
        .collect();
    'fill: while let Some(Reverse((round, class, taken_turns))) = turns.pop() {
        let (weight, members) = &classes[class];
        for chooser in &mut choosers[members.clone()] {
            let slot = if size - filled > endgame {
                chooser.probe(&mut taken, size32)
            } else {
                if free.is_empty() {
                    free = free_slots(&taken, size);
                }
                chooser.nearest(&mut free, size32)
            };
            slots[slot as usize] = T::from_index(chooser.endpoint);
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
        let taken_turns = taken_turns + 1;
        let due = (taken_turns * max_weight).div_ceil(u64::from(*weight));
        turns.push(Reverse((due.max(round + 1), class, taken_turns)));
    }
    slots
}

/// Whether `n` is prime (trial division; `n` is at most a few million here).
pub(super) fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    let mut d = 5;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// The first prime at or above `n`.
pub(super) fn next_prime(mut n: u64) -> u64 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{identity_order, ConsistentHash};
    use super::*;
    use crate::endpoint::EndpointHandle;
    use crate::strategy::test_util::named_endpoints;
    use crate::strategy::{LocalState, Strategy};

    fn table(handles: &[EndpointHandle], size: u64) -> Vec<u32> {
        let endpoints = Endpoints::new(handles);
        owners(&Maglev::build(
            &endpoints,
            &identity_order(&endpoints),
            size,
            0,
        ))
    }

    fn owners(maglev: &Maglev) -> Vec<u32> {
        (0..maglev.len())
            .map(|slot| maglev.owner(slot) as u32)
            .collect()
    }

    /// Slots per endpoint identity.
    fn shares(handles: &[EndpointHandle], slots: &[u32]) -> std::collections::HashMap<String, u64> {
        let mut shares = std::collections::HashMap::new();
        for &owner in slots {
            *shares
                .entry(handles[owner as usize].identity().to_owned())
                .or_insert(0) += 1;
        }
        shares
    }

    #[test]
    fn inverses_modulo_a_prime() {
        for (a, m) in [
            (1, 2),
            (3, 7),
            (65_536, 65_537),
            (12_345, 524_309),
            (4_999_999, 5_000_011),
        ] {
            let inverse = inverse_mod(a, m);
            assert_eq!(
                u64::from(a) * u64::from(inverse) % u64::from(m),
                1,
                "{a} mod {m}"
            );
        }
    }

    /// The endgame's arithmetic finds the slot probing would.
    #[test]
    fn the_endgame_claims_what_probing_would() {
        let size = 1_009u32;
        let mut rng = crate::util::rng::FastRng::seeded(3);
        let mut taken = vec![0u64; (size as usize).div_ceil(64)];
        for _ in 0..950 {
            let slot = rng.below(size as usize);
            taken[slot / 64] |= 1 << (slot % 64);
        }
        for _ in 0..200 {
            let mut probing = Chooser {
                endpoint: 0,
                next: rng.below(size as usize) as u32,
                skip: rng.below(size as usize - 1) as u32 + 1,
                skip_inverse: 0,
            };
            let mut arithmetic = Chooser { ..probing };
            let mut free = free_slots(&taken, size as usize);
            let mut probed_taken = taken.clone();
            for _ in 0..free.len().min(5) {
                assert_eq!(
                    probing.probe(&mut probed_taken, size),
                    arithmetic.nearest(&mut free, size)
                );
                assert_eq!(probing.next, arithmetic.next);
            }
        }
    }

    #[test]
    fn primes_are_recognised() {
        let sieve: Vec<u64> = (0..2_000u64)
            .filter(|&n| n >= 2 && (2..n).all(|d| n % d != 0))
            .collect();
        let found: Vec<u64> = (0..2_000).filter(|&n| is_prime(n)).collect();
        assert_eq!(found, sieve);
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE));
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(4), 5);
    }

    #[test]
    fn the_table_grows_to_keep_100_slots_per_endpoint() {
        assert_eq!(table_size_for(65_537, 655), 65_537);
        let grown = table_size_for(65_537, 656);
        assert!(
            is_prime(grown) && (131_074..131_200).contains(&grown),
            "{grown}"
        );
        assert_eq!(table_size_for(65_537, 4_096), 524_309);
        assert_eq!(table_size_for(101, 1), 101);
        assert_eq!(table_size_for(65_537, 1_000_000), MAX_TABLE_SIZE);
        let handles = named("node", 1_000);
        assert_eq!(
            table(&handles, 65_537).len() as u64,
            table_size_for(65_537, 1_000)
        );
    }

    #[test]
    fn equal_weights_get_equal_shares_to_one_slot() {
        let handles = named("node", 7);
        let slots = table(&handles, 65_537);
        assert!(slots.iter().all(|&owner| owner < 7), "every slot is owned");
        let shares = shares(&handles, &slots);
        let (min, max) = (
            shares.values().min().unwrap(),
            shares.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{shares:?}");
    }

    #[test]
    fn weighted_shares_follow_the_weights() {
        let handles = named_endpoints(&[("a", 1), ("b", 2), ("c", 5), ("d", 5)]);
        let slots = table(&handles, 10_007);
        let shares = shares(&handles, &slots);
        for (name, weight) in [("a", 1.0), ("b", 2.0), ("c", 5.0), ("d", 5.0)] {
            let expected = 10_007.0 * weight / 13.0;
            let share = shares[name] as f64;
            assert!(
                (share - expected).abs() <= 2.0,
                "{name}: {share} vs {expected}"
            );
        }
    }

    /// Maglev moves a little more than the removed endpoint's slots: an endpoint that claims a
    /// freed slot is a turn late for its next preference, which another may take. The excess
    /// grows with n²/size: measured 1.07/n at 20 endpoints on 65,537 slots, 1.23/n at 50,
    /// 1.57/n at 100 (1.15/n on 524,309 slots).
    #[test]
    fn removing_an_endpoint_disturbs_few_other_slots() {
        let n = 20;
        let all = named("node", n);
        let mut fewer = named("node", n);
        fewer.remove(13);
        let before = table(&all, 65_537);
        let after = table(&fewer, 65_537);
        let name =
            |handles: &[EndpointHandle], owner: u32| handles[owner as usize].identity().to_owned();
        let moved = before
            .iter()
            .zip(after.iter())
            .filter(|&(&old, &new)| name(&all, old) != name(&fewer, new))
            .count();
        // The removed endpoint's 1/n of the slots must move; Maglev moves a little more.
        let bound = 65_537.0 * 1.3 / n as f64;
        assert!(
            (moved as f64) <= bound,
            "{moved} slots moved, bound {bound}"
        );
        assert!(moved >= 65_537 / n);
    }

    #[test]
    fn a_seed_changes_the_placement() {
        let handles = named("node", 10);
        let endpoints = Endpoints::new(&handles);
        let order = identity_order(&endpoints);
        let plain = owners(&Maglev::build(&endpoints, &order, 1_009, 0));
        let seeded = owners(&Maglev::build(&endpoints, &order, 1_009, 7));
        let same = plain
            .iter()
            .zip(seeded.iter())
            .filter(|(a, b)| a == b)
            .count();
        assert!(same < 300, "{same} of 1009 slots kept their owner");
    }

    #[test]
    fn slots_cover_the_whole_table() {
        let handles = named("node", 3);
        let endpoints = Endpoints::new(&handles);
        let maglev = Maglev::build(&endpoints, &identity_order(&endpoints), 101, 0);
        assert_eq!(maglev.slot(0), Some(0));
        assert_eq!(maglev.slot(u64::MAX), Some(maglev.len() - 1));
        let walk: Vec<usize> = maglev.slots_from(maglev.len() - 1).take(2).collect();
        assert_eq!(walk, vec![maglev.owner(maglev.len() - 1), maglev.owner(0)]);
    }

    /// 1M keys over 100 endpoints. The table itself is within 0.2% of even; the keys add
    /// sampling noise: with 10,000 expected keys per endpoint the busiest of 100 is about 2.5
    /// standard deviations (1% each) above the mean, so peak/mean is about 1.025 for any hash,
    /// and 1.045 leaves room for the noise while catching a skewed table.
    #[test]
    fn a_million_keys_spread_evenly_over_100_endpoints() {
        let handles = named("node", 100);
        let picker = ConsistentHash::maglev().build(&Endpoints::new(&handles));
        let mut local = LocalState::new();
        let mut counts = vec![0u64; 100];
        let mut key = String::new();
        for i in 0..1_000_000 {
            use std::fmt::Write;
            key.clear();
            write!(key, "user-{i}").unwrap();
            let hash = hash_of(&picker, key.as_bytes());
            counts[pick_hash(&picker, &handles, Some(hash), &mut local).unwrap()] += 1;
        }
        let peak = *counts.iter().max().unwrap() as f64 / 10_000.0;
        assert!(peak <= 1.045, "peak/mean {peak}");

        let slots = table(&handles, 65_537);
        let table_peak = *shares(&handles, &slots).values().max().unwrap() as f64 / 655.37;
        assert!(table_peak <= 1.002, "table peak/mean {table_peak}");
    }
}
