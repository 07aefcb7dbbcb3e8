//! The hash ring: points on a circle of 32-bit hashes, each owned by an endpoint; a key
//! belongs to the owner of the first point at or after its hash.

use super::{identity_hash, Endpoints};
use crate::key::mix64;

/// The most points a ring holds (4 Mi, 32 MB): beyond that, huge weights would
/// cost memory and build time for no gain in evenness.
pub(super) const MAX_POINTS: u64 = 1 << 22;

/// Spaces one endpoint's points: splitmix64's increment, so the points are the splitmix64
/// sequence seeded with the endpoint's identity hash.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// One point: its place on the circle and its owner, side by side so that the lookup that
/// finds the place also has the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    hash: u32,
    owner: u32,
}

/// Which 32 bits of a 64-bit key hash are its place on the circle.
#[derive(Clone, Copy, Debug)]
pub(super) enum KeyBits {
    /// The high half, for the 64-bit stable hash (whose high bits are its best mixed).
    High,
    /// The low half, where [`KeyHasher::crc32`](crate::key::KeyHasher::crc32) leaves its CRC.
    Low,
}

/// A sorted circle of points.
///
/// Lookups first read a bucket index over the top bits of the hash, then search the points
/// of that bucket (binary search; in packed rings, a guess by interpolation and a walk from
/// it, expected O(1) as points are uniform, at worst the bucket's size): a few cache lines
/// instead of ~20 for a plain binary search over a large ring. The index has about one
/// bucket per two points, and at most 65,536 buckets (256 KB).
///
/// Large rings (2¹⁵ points or more, with at most 65,536 endpoints) are *packed*: with 2¹⁶
/// buckets the top half of a point's hash is its bucket, so a point is stored as the low half
/// of its hash and its owner, 4 bytes instead of 8. A lookup then reads the index and one or
/// two neighbouring cache lines of a table half the size (6.5 MB rather than 13 MB at 4,096
/// endpoints of weights 1–4), which stays in the last-level cache far more often.
///
/// The circle has 2³² places, as in libketama and nginx. Two endpoints' points land on the
/// same place with probability about `points² / 2³³` (some 50 of 655,360 points at 4,096
/// endpoints); the smaller identity keeps the place, which shifts no share measurably.
pub(super) struct Ring {
    points: Stored,
    /// `buckets[b]` is the first point whose hash, shifted right by `shift`, is at least `b`.
    buckets: Box<[u32]>,
    shift: u32,
    key_bits: KeyBits,
}

/// The points, sorted by hash, hashes distinct.
enum Stored {
    Plain(Box<[Point]>),
    /// `low half of the hash | owner << 16`, for rings of 2¹⁶ buckets (`shift` 16), whose
    /// buckets give the high half.
    Packed(Box<[u32]>),
}

/// Rings with this many points or more are packed (when their owners fit in 16 bits).
const PACK_FROM: usize = 1 << 15;

impl Ring {
    /// A Ketama-style ring: `points_per_weight × weight` points per endpoint (see
    /// [`point_counts`]), from the splitmix64 sequence seeded with its identity's hash.
    pub(super) fn ketama(
        endpoints: &Endpoints<'_>,
        by_identity: &[usize],
        points_per_weight: u32,
        seed: u64,
    ) -> Self {
        let counts = point_counts(endpoints, points_per_weight);
        let mut points = Points::with_capacity(counts.iter().sum::<u64>() as usize);
        for (rank, &index) in by_identity.iter().enumerate() {
            let base = identity_hash(seed, endpoints.get(index).identity());
            for j in 1..=counts[index] {
                let hash = mix64(base.wrapping_add(j.wrapping_mul(GOLDEN_GAMMA)));
                points.push((hash >> 32) as u32, rank);
            }
        }
        Self::new(points, by_identity, KeyBits::High)
    }

    /// A ring from points pushed in rank order (ranks index `by_identity`).
    ///
    /// Points are sorted by hash; of points with equal hashes only the first (the smallest
    /// identity) is kept, as nginx keeps the first after its sort.
    pub(super) fn new(points: Points, by_identity: &[usize], key_bits: KeyBits) -> Self {
        let sorted = points.sorted();
        let mut ring: Vec<Point> = Vec::with_capacity(sorted.len());
        for packed in sorted {
            let hash = (packed >> 32) as u32;
            if ring.last().is_some_and(|last| last.hash == hash) {
                continue;
            }
            let rank = packed as u32 as usize;
            ring.push(Point {
                hash,
                owner: by_identity[rank] as u32,
            });
        }
        let pack = ring.len() >= PACK_FROM && by_identity.len() <= 1 << 16;
        // About two points per bucket; at least 2 buckets (so the shift stays below 32), at
        // most 2^16, which packed rings have.
        let bits = if pack {
            16
        } else {
            (usize::BITS - ring.len().leading_zeros())
                .saturating_sub(2)
                .clamp(1, 16)
        };
        let shift = 32 - bits;
        let mut buckets = Vec::with_capacity((1 << bits) + 1);
        let mut first = 0;
        for bucket in 0..=(1u32 << bits) {
            while first < ring.len() && ring[first].hash >> shift < bucket {
                first += 1;
            }
            buckets.push(first as u32);
        }
        let points = if pack {
            Stored::Packed(
                ring.iter()
                    .map(|point| {
                        // Owners index a table of at most 2^16 endpoints.
                        debug_assert!(point.owner < 1 << 16);
                        point.hash & 0xffff | point.owner << 16
                    })
                    .collect(),
            )
        } else {
            Stored::Plain(ring.into_boxed_slice())
        };
        Self {
            points,
            buckets: buckets.into_boxed_slice(),
            shift,
            key_bits,
        }
    }

    /// The number of points.
    #[inline]
    pub(super) fn len(&self) -> usize {
        match &self.points {
            Stored::Plain(points) => points.len(),
            Stored::Packed(points) => points.len(),
        }
    }

    /// The owner of the point at `position` (below `len`).
    #[inline]
    fn owner(&self, position: usize) -> usize {
        match &self.points {
            Stored::Plain(points) => points[position].owner as usize,
            Stored::Packed(points) => (points[position] >> 16) as usize,
        }
    }

    /// The position of the first point at or after the key's place, wrapping to the first
    /// point; `None` for an empty ring.
    #[inline]
    pub(super) fn position(&self, key_hash: u64) -> Option<usize> {
        let len = self.len();
        if len == 0 {
            return None;
        }
        let hash = match self.key_bits {
            KeyBits::High => (key_hash >> 32) as u32,
            KeyBits::Low => key_hash as u32,
        };
        let bucket = (hash >> self.shift) as usize;
        let (low, high) = (
            self.buckets[bucket] as usize,
            self.buckets[bucket + 1] as usize,
        );
        // No point of this bucket at or after `hash`: `high` is the first point of a later
        // bucket, which is the answer (or the end, which wraps).
        let position = low
            + match &self.points {
                Stored::Plain(points) => {
                    points[low..high].partition_point(|point| point.hash < hash)
                }
                Stored::Packed(points) => first_at_or_after(&points[low..high], hash & 0xffff),
            };
        Some(if position == len { 0 } else { position })
    }

    /// The endpoint owning a key hash.
    #[inline]
    pub(super) fn get(&self, key_hash: u64) -> Option<usize> {
        self.position(key_hash).map(|position| self.owner(position))
    }

    /// The owners of every point from `position` on, clockwise, wrapping (with repeats): where
    /// a key goes when its endpoint is full.
    pub(super) fn clockwise_from(&self, position: usize) -> impl Iterator<Item = usize> + '_ {
        let len = self.len();
        (0..len).map(move |k| {
            let at = position + k;
            self.owner(if at >= len { at - len } else { at })
        })
    }
}

/// The first of a bucket's packed points whose place (low half) is at or after `place`, or
/// the bucket's length.
///
/// Places are uniform, so the answer is near the same fraction of the bucket as `place` is of
/// the bucket's span: start there and step to it, reading the one cache line there most of the
/// time, where a binary search would wander over two or three.
#[inline]
fn first_at_or_after(points: &[u32], place: u32) -> usize {
    let before = |at: usize| points[at] & 0xffff < place;
    let mut at = (place as usize * points.len()) >> 16;
    while at < points.len() && before(at) {
        at += 1;
    }
    while at > 0 && !before(at - 1) {
        at -= 1;
    }
    at
}

/// Points being gathered for a ring: `hash << 32 | rank`, pushed in rank order.
pub(super) struct Points(Vec<u64>);

impl Points {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    pub(super) fn push(&mut self, hash: u32, rank: usize) {
        self.0.push(u64::from(hash) << 32 | rank as u64);
    }

    /// Sorted by hash, points with equal hashes in rank order.
    fn sorted(self) -> Vec<u64> {
        let mut points = self.0;
        points.sort_unstable();
        points
    }
}

/// How many points each endpoint gets (indexed like `endpoints`): `points_per_weight ×
/// weight`, or, when the ring would exceed [`MAX_POINTS`], that share of `MAX_POINTS` (at
/// least one). Depends only on the weights, never on the order.
pub(super) fn point_counts(endpoints: &Endpoints<'_>, points_per_weight: u32) -> Vec<u64> {
    let wanted = |weight: u32| u64::from(points_per_weight) * u64::from(weight);
    let total: u64 = endpoints.iter().map(|e| wanted(e.weight())).sum();
    endpoints
        .iter()
        .map(|endpoint| {
            let points = wanted(endpoint.weight());
            if total <= MAX_POINTS {
                points
            } else {
                let scaled = u128::from(points) * u128::from(MAX_POINTS) / u128::from(total);
                (scaled as u64).max(1)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::ConsistentHash;
    use super::*;
    use crate::strategy::test_util::named_endpoints;
    use crate::strategy::{LocalState, Strategy};

    /// A ring where endpoint `i` owns the point `points[i]`; keys are looked up by their low
    /// 32 bits.
    fn ring_of(points: &[u32]) -> Ring {
        let by_identity: Vec<usize> = (0..points.len()).collect();
        let mut gathered = Points::with_capacity(points.len());
        for (rank, &hash) in points.iter().enumerate() {
            gathered.push(hash, rank);
        }
        Ring::new(gathered, &by_identity, KeyBits::Low)
    }

    /// The reference: a linear scan for the first point at or after the hash.
    fn first_at_or_after(sorted: &[u32], hash: u32) -> usize {
        match sorted.partition_point(|&p| p < hash) {
            at if at == sorted.len() => 0,
            at => at,
        }
    }

    #[test]
    fn lookup_finds_the_first_point_at_or_after_the_hash_and_wraps() {
        let ring = ring_of(&[100, 200, 300]);
        assert_eq!(ring.position(0), Some(0));
        assert_eq!(ring.position(100), Some(0));
        assert_eq!(ring.position(101), Some(1));
        assert_eq!(ring.position(300), Some(2));
        assert_eq!(ring.position(301), Some(0), "wraps to the first point");
        assert_eq!(ring.position(u64::from(u32::MAX)), Some(0));
        assert_eq!(
            ring.position(1 << 32 | 150),
            Some(1),
            "only the low half counts"
        );
        assert_eq!(ring_of(&[]).position(5), None);
    }

    #[test]
    fn bucketed_lookup_agrees_with_a_linear_scan() {
        // From 2^15 points on, rings are packed.
        for len in [1usize, 2, 3, 7, 64, 1000, 5000, 40_000] {
            let mut rng = crate::util::rng::FastRng::seeded(len as u64);
            let points: Vec<u32> = (0..len).map(|_| rng.next_u64() as u32).collect();
            let ring = ring_of(&points);
            assert_eq!(matches!(ring.points, Stored::Packed(_)), len >= PACK_FROM);
            let mut sorted = points.clone();
            sorted.sort_unstable();
            sorted.dedup();
            // The owner of each place: the first rank that put a point there.
            let mut owners = std::collections::HashMap::new();
            for (rank, &point) in points.iter().enumerate() {
                owners.entry(point).or_insert(rank);
            }
            for _ in 0..2_000 {
                let hash = rng.next_u64() as u32;
                let expected = first_at_or_after(&sorted, hash);
                assert_eq!(ring.position(u64::from(hash)), Some(expected));
                assert_eq!(ring.get(u64::from(hash)), Some(owners[&sorted[expected]]));
            }
            for &point in &sorted {
                for hash in [point.wrapping_sub(1), point, point.wrapping_add(1)] {
                    assert_eq!(
                        ring.position(u64::from(hash)),
                        Some(first_at_or_after(&sorted, hash))
                    );
                }
            }
        }
    }

    #[test]
    fn equal_hashes_keep_the_smallest_identity() {
        // Rank 0 and rank 1 both place a point at 50; rank 0 (the smaller identity) keeps it.
        let by_identity = [1, 0];
        let mut points = Points::with_capacity(3);
        points.push(50, 0);
        points.push(50, 1);
        points.push(90, 1);
        let ring = Ring::new(points, &by_identity, KeyBits::Low);
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.get(10), Some(1), "rank 0 is endpoint 1");
        assert_eq!(ring.get(60), Some(0));
    }

    #[test]
    fn clockwise_walk_starts_at_the_position_and_visits_every_point() {
        let ring = ring_of(&[10, 20, 30, 40]);
        let walk: Vec<usize> = ring.clockwise_from(2).collect();
        assert_eq!(walk, vec![2, 3, 0, 1]);
    }

    #[test]
    fn points_follow_weights_and_are_capped() {
        let handles = named_endpoints(&[("a", 1), ("b", 3)]);
        let endpoints = Endpoints::new(&handles);
        assert_eq!(point_counts(&endpoints, 160), vec![160, 480]);
        let heavy = named_endpoints(&[("a", 1), ("b", 1_000_000)]);
        let counts = point_counts(&Endpoints::new(&heavy), 160);
        assert!(counts.iter().sum::<u64>() <= MAX_POINTS);
        assert!(
            (1..10).contains(&counts[0]),
            "every endpoint keeps a point: {counts:?}"
        );
    }

    #[test]
    fn adding_an_endpoint_takes_keys_only_for_itself() {
        let strategy = ConsistentHash::ring();
        let keys = || (0..20_000).map(|i| format!("key-{i}"));
        let before = mapping(&strategy, &named("node", 10), keys());
        let after = mapping(&strategy, &named("node", 11), keys());
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        for (old, new) in before.iter().zip(&after) {
            assert!(old == new || new == "node-10", "{old} -> {new}");
        }
        // About 1/11 of the keys, give or take the ring's uneven shares.
        assert!((900..3_000).contains(&moved), "{moved} keys moved");
    }

    #[test]
    fn shares_even_out_with_more_points() {
        let handles = named("node", 10);
        let spread = |points: u32| {
            let strategy = ConsistentHash::ring().points_per_weight(points).unwrap();
            let picker = strategy.build(&Endpoints::new(&handles));
            let mut local = LocalState::new();
            let mut counts = [0u32; 10];
            for i in 0..50_000u64 {
                let hash = mix64(i);
                counts[pick_hash(&picker, &handles, Some(hash), &mut local).unwrap()] += 1;
            }
            let max = *counts.iter().max().unwrap() as f64;
            max / 5_000.0
        };
        assert!(spread(1_000) < spread(4), "more points, more even");
        assert!(spread(1_000) < 1.1);
    }
}
