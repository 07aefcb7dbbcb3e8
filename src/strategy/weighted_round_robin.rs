//! Weighted round-robin: smooth interleaving with exact shares per cycle.

use std::cmp::{Ordering, Reverse};
use std::collections::binary_heap::{BinaryHeap, PeekMut};
use std::fmt;
use std::sync::Arc;

use super::{Endpoints, PickContext, Picker, Strategy};

/// The longest cycle that is precomputed and shared by all clones; longer cycles are
/// scheduled by each clone (see [`WeightedRoundRobin`]). The cap bounds the build, which runs
/// on the discovery task at every membership or weight change: O(L log n), some tens of
/// milliseconds at 2^18 slots with thousands of endpoints.
const MAX_SCHEDULE_LEN: u64 = 1 << 18;

/// A per-clone scheduler starts up to this many picks into its cycle. Reaching the start is
/// paid by the clone's first request after a table change, so it stays small; it is enough
/// to spread clones that start together over as many different first endpoints.
const START_SPREAD: u64 = 1024;

/// Sends each endpoint a share of requests proportional to its weight, interleaved smoothly.
///
/// Weights 3:1:1 give `a b a c a`, not `a a a b c`. Weights come from discovery
/// ([`BalanceLayer::weighted`]) or a [`BalanceHandle`]; a reweight rebuilds the schedule
/// (off the request path) and takes effect from the next table.
///
/// # Schedule
///
/// Weights are divided by their greatest common divisor; the reduced weights `r_i` sum to the
/// cycle length `L`, and every `L` consecutive picks of a clone give endpoint `i` exactly `r_i`
/// of them. Within a cycle the order follows an *earliest eligible deadline first* rule (as in
/// EEVDF and WF²Q): endpoint `i`'s `k`-th pick of the cycle (from 0) becomes eligible at slot
/// `⌈k·L/r_i⌉` and is due at `(k+1)·L/r_i`; each slot goes to the eligible pick due first, ties
/// to the endpoint listed first.
///
/// Picks are released no faster than their share, and the picks released by any point never
/// need more slots than there are, so every pick lands in its window: the `k`-th in slots
/// `⌈k·L/r_i⌉ ..= ⌈(k+1)·L/r_i⌉ - 1`. Hence, across cycle boundaries too (the schedule
/// repeats):
///
/// - after `t` picks from the start of a cycle, endpoint `i` has had strictly between
///   `t·r_i/L - 1` and `t·r_i/L + 1` of them: it is never a whole pick ahead of or behind an
///   exact proportional share;
/// - endpoint `i` is never picked more than `⌈L/(L - r_i)⌉` times in a row, at most one more
///   than the least possible, `⌈r_i/(L - r_i)⌉`. Weights 5:1:1 give `a b a a c a a`: runs of
///   three at most.
///
/// # Cost
///
/// Each clone walks the schedule with its own cursor, starting at its own position (so clones
/// that start together do not all begin with the heaviest endpoint), and touches no shared
/// counter, lock or allocator per pick.
///
/// - Cycles of up to 2^18 (262,144) picks are precomputed when the picker is built, in
///   O(L log n) time (tens of milliseconds at the cap with thousands of endpoints) and 4 bytes
///   a slot while building, into one table of endpoint indices shared by all clones (2 bytes
///   an entry up to 65,536 endpoints, 4 above: at most 512 KiB or 1 MiB). A pick reads the
///   next entry: O(1). Thousands of endpoints with weights up to about 100, or hundreds with
///   weights up to about 1,000, stay under the cap.
/// - Longer cycles (say 4,096 endpoints with unrelated weights up to 10,000, `L` ≈ 2·10^7) are
///   never stored; building is O(n). Each clone instead runs the same scheduler itself in
///   clone-private state made on its first pick from a new table (O(n) time and memory, under
///   48 bytes an endpoint, plus up to 1,024 scheduling steps to reach a random start). A pick
///   then costs O(log n). Order, shares and the guarantees above are the same.
///
/// An endpoint that is not ready when its turn comes is skipped for the next one in the
/// schedule; it loses that turn.
///
/// [`BalanceLayer::weighted`]: crate::BalanceLayer::weighted
/// [`BalanceHandle`]: crate::BalanceHandle
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// use tower::{service_fn, Layer, Service, ServiceExt};
/// use tower_lb::{discover, BalanceLayer, Weight, Weighted, WeightedRoundRobin};
///
/// let backend = |name: &'static str| service_fn(move |_: ()| async move {
///     Ok::<_, std::convert::Infallible>(name)
/// });
/// let endpoints = [
///     ("a", Weighted::new(backend("a"), Weight::new(3)?)),
///     ("b", Weighted::new(backend("b"), Weight::ONE)),
///     ("c", Weighted::new(backend("c"), Weight::ONE)),
/// ];
/// let mut balance = BalanceLayer::new(WeightedRoundRobin::new())
///     .weighted()
///     .layer(discover::fixed(endpoints));
///
/// let mut seen = String::new();
/// for _ in 0..10 {
///     seen.push_str(balance.ready().await?.call(()).await?);
/// }
/// // Two cycles of `a b a c a`, starting wherever this clone's cursor started.
/// assert!("abacaabacaabaca".contains(&seen), "{seen}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct WeightedRoundRobin {
    /// [`MAX_SCHEDULE_LEN`], lowered by unit tests to exercise per-clone scheduling.
    max_schedule_len: u64,
}

impl WeightedRoundRobin {
    /// Weighted round-robin over the discovered endpoints.
    pub fn new() -> Self {
        Self {
            max_schedule_len: MAX_SCHEDULE_LEN,
        }
    }
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

/// The picker [`WeightedRoundRobin`] builds: one endpoint set's schedule.
pub struct WeightedRoundRobinPicker {
    plan: Plan,
}

enum Plan {
    /// No endpoints.
    Empty,
    /// The whole cycle, precomputed and shared.
    Precomputed(Schedule),
    /// A cycle too long to store: each clone runs a [`Scheduler`] of its own.
    PerClone(Arc<Cycle>),
}

/// One cycle of endpoint indices, as narrow as the endpoint count allows.
enum Schedule {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Schedule {
    fn len(&self) -> usize {
        match self {
            Schedule::Narrow(slots) => slots.len(),
            Schedule::Wide(slots) => slots.len(),
        }
    }

    #[inline]
    fn get(&self, slot: usize) -> usize {
        match self {
            Schedule::Narrow(slots) => usize::from(slots[slot]),
            Schedule::Wide(slots) => slots[slot] as usize,
        }
    }
}

/// The gcd-reduced weights of one endpoint set.
struct Cycle {
    /// Picks per cycle of each endpoint, in table order.
    shares: Box<[u32]>,
    /// Picks per cycle in all: the sum of `shares`.
    len: u64,
    /// `L / share` and `L % share` of each endpoint: the spacing of its picks, kept apart so
    /// that scheduling adds instead of dividing.
    spacing: Box<[(u64, u32)]>,
}

impl Cycle {
    fn new(endpoints: &Endpoints<'_>) -> Self {
        // `weight()` is at least 1; `max` keeps a zero from ever reaching a division.
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight().max(1)).collect();
        let divisor = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
        let shares: Box<[u32]> = weights.iter().map(|&w| w / divisor).collect();
        let len: u64 = shares.iter().map(|&s| u64::from(s)).sum();
        let spacing = shares
            .iter()
            .map(|&s| (len / u64::from(s), (len % u64::from(s)) as u32))
            .collect();
        Self {
            shares,
            len,
            spacing,
        }
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Strategy for WeightedRoundRobin {
    type Picker = WeightedRoundRobinPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> WeightedRoundRobinPicker {
        if endpoints.is_empty() {
            return WeightedRoundRobinPicker { plan: Plan::Empty };
        }
        let cycle = Arc::new(Cycle::new(endpoints));
        if cycle.len > self.max_schedule_len {
            return WeightedRoundRobinPicker {
                plan: Plan::PerClone(cycle),
            };
        }
        let len = cycle.len as usize;
        let narrow = endpoints.len() <= usize::from(u16::MAX) + 1;
        let mut scheduler = Scheduler::precomputing(cycle);
        let mut next = move || {
            scheduler
                .next()
                .expect("some endpoint is eligible at every slot (see `Scheduler::next`)")
        };
        let schedule = if narrow {
            Schedule::Narrow((0..len).map(|_| next() as u16).collect())
        } else {
            Schedule::Wide((0..len).map(|_| next() as u32).collect())
        };
        WeightedRoundRobinPicker {
            plan: Plan::Precomputed(schedule),
        }
    }
}

impl Picker for WeightedRoundRobinPicker {
    #[inline]
    fn pick(&self, _: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        match &self.plan {
            Plan::Precomputed(schedule) => {
                let len = schedule.len() as u64;
                let cursor = cx.cursor();
                let mut slot = *cursor;
                // Only the first pick of a clone (random cursor) or after a new table divides,
                // and once per cycle when the cursor reaches the end.
                if slot >= len {
                    slot %= len;
                }
                *cursor = slot + 1;
                Some(schedule.get(slot as usize))
            }
            Plan::PerClone(cycle) => {
                let seed = *cx.cursor();
                let local = cx.local(PerCloneState::default);
                // Scratch is dropped with the table, so this is the same cycle unless another
                // picker of this type shares the clone; then start over rather than mix them.
                if !local
                    .0
                    .as_ref()
                    .is_some_and(|s| Arc::ptr_eq(&s.cycle, cycle))
                {
                    local.0 = Some(Scheduler::starting_at(Arc::clone(cycle), seed));
                }
                local.0.as_mut()?.next()
            }
            Plan::Empty => None,
        }
    }
}

impl fmt::Debug for WeightedRoundRobinPicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("WeightedRoundRobinPicker");
        match &self.plan {
            Plan::Empty => d.field("cycle_len", &0),
            Plan::Precomputed(schedule) => d
                .field("cycle_len", &schedule.len())
                .field("precomputed", &true),
            Plan::PerClone(cycle) => d
                .field("cycle_len", &cycle.len)
                .field("precomputed", &false),
        };
        d.finish()
    }
}

/// Clone-private state for cycles too long to precompute.
#[derive(Default)]
struct PerCloneState(Option<Scheduler>);

/// Produces one cycle after another of the schedule described on [`WeightedRoundRobin`].
struct Scheduler {
    cycle: Arc<Cycle>,
    /// The next slot of the current cycle, below `cycle.len`.
    slot: u64,
    /// Where each endpoint stands in the current cycle.
    progress: Box<[Progress]>,
    /// Endpoints whose next pick is eligible, earliest due first.
    eligible: BinaryHeap<Due>,
    /// Endpoints whose next pick becomes eligible at a later slot.
    waiting: Waiting,
}

/// Endpoints waiting for their next pick to become eligible, by slot.
enum Waiting {
    /// A heap, soonest first: O(log n) a pick in O(n) memory, for per-clone scheduling of
    /// cycles too long to hold anything per slot.
    Heap(BinaryHeap<Reverse<(u64, u32)>>),
    /// A list per slot: O(1) a pick, for precomputing a cycle short enough to hold a list
    /// head per slot (4 bytes each, while building).
    Calendar {
        /// The first endpoint waiting for each slot, or [`Waiting::NONE`].
        first: Box<[u32]>,
        /// The next endpoint waiting for the same slot, or [`Waiting::NONE`].
        then: Box<[u32]>,
    },
}

impl Waiting {
    const NONE: u32 = u32::MAX;

    fn clear(&mut self) {
        match self {
            Waiting::Heap(heap) => heap.clear(),
            Waiting::Calendar { first, .. } => first.fill(Self::NONE),
        }
    }

    /// Endpoint `index` waits for slot `at` (below the cycle length).
    fn push(&mut self, at: u64, index: u32) {
        match self {
            Waiting::Heap(heap) => heap.push(Reverse((at, index))),
            Waiting::Calendar { first, then } => {
                then[index as usize] = first[at as usize];
                first[at as usize] = index;
            }
        }
    }

    /// Hands every endpoint waiting for `slot` or earlier to `release`.
    fn release(&mut self, slot: u64, mut release: impl FnMut(u32)) {
        match self {
            Waiting::Heap(heap) => {
                while let Some(&Reverse((at, index))) = heap.peek() {
                    if at > slot {
                        break;
                    }
                    heap.pop();
                    release(index);
                }
            }
            Waiting::Calendar { first, then } => {
                // Slots are visited in order, so earlier slots were emptied already.
                let mut index = std::mem::replace(&mut first[slot as usize], Self::NONE);
                while index != Self::NONE {
                    release(index);
                    index = then[index as usize];
                }
            }
        }
    }
}

/// One endpoint's picks so far in the cycle, `done`, and `done·L / share` as a whole part
/// and a remainder: its next pick is eligible from slot `⌈done·L/share⌉`.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    done: u32,
    remainder: u32,
    whole: u64,
}

/// An endpoint's next pick, `pick`-th of the cycle (from 1), due at `pick / share` of the
/// cycle. Orders by due time, earliest greatest (for the max-heap), ties to the lower index.
#[derive(Clone, Copy, Debug)]
struct Due {
    pick: u32,
    share: u32,
    index: u32,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        // pick/share < other.pick/other.share, without division; both factors are at most
        // a weight, so the products fit in u64.
        let mine = u64::from(self.pick) * u64::from(other.share);
        let theirs = u64::from(other.pick) * u64::from(self.share);
        theirs.cmp(&mine).then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Due {}

impl Scheduler {
    /// A scheduler at the start of the cycle, for precomputing it: needs 4 bytes a slot.
    fn precomputing(cycle: Arc<Cycle>) -> Self {
        let waiting = Waiting::Calendar {
            first: vec![Waiting::NONE; cycle.len as usize].into_boxed_slice(),
            then: vec![Waiting::NONE; cycle.shares.len()].into_boxed_slice(),
        };
        Self::new(cycle, waiting)
    }

    /// A scheduler `seed % min(L, START_SPREAD)` picks into the cycle, for one clone: needs
    /// O(n) memory whatever the cycle length.
    fn starting_at(cycle: Arc<Cycle>, seed: u64) -> Self {
        let n = cycle.shares.len();
        let spread = START_SPREAD.min(cycle.len);
        let mut scheduler = Self::new(cycle, Waiting::Heap(BinaryHeap::with_capacity(n)));
        for _ in 0..seed % spread.max(1) {
            scheduler.next();
        }
        scheduler
    }

    fn new(cycle: Arc<Cycle>, waiting: Waiting) -> Self {
        let n = cycle.shares.len();
        let mut scheduler = Self {
            progress: vec![Progress::default(); n].into_boxed_slice(),
            eligible: BinaryHeap::with_capacity(n),
            waiting,
            slot: 0,
            cycle,
        };
        scheduler.restart();
        scheduler
    }

    /// Back to slot 0: every endpoint's first pick is eligible.
    fn restart(&mut self) {
        self.slot = 0;
        self.progress.fill(Progress::default());
        self.waiting.clear();
        self.eligible.clear();
        let shares = &self.cycle.shares;
        self.eligible
            .extend(shares.iter().enumerate().map(|(i, &share)| Due {
                pick: 1,
                share,
                index: i as u32,
            }));
    }

    /// The endpoint for the next slot.
    ///
    /// Some endpoint is always eligible: at slot `s` the picks so far number `s`, so if every
    /// endpoint had `done·L > s·share`, summing would give `s·L > s·L`. `None` would mean that
    /// invariant broke.
    fn next(&mut self) -> Option<usize> {
        if self.slot == self.cycle.len {
            self.restart();
        }
        let (eligible, progress, shares) = (&mut self.eligible, &self.progress, &self.cycle.shares);
        self.waiting.release(self.slot, |index| {
            eligible.push(Due {
                pick: progress[index as usize].done + 1,
                share: shares[index as usize],
                index,
            });
        });
        let mut first = self.eligible.peek_mut()?;
        let Due { index, share, .. } = *first;
        let progress = &mut self.progress[index as usize];
        progress.done += 1;
        let (whole, remainder) = self.cycle.spacing[index as usize];
        progress.whole += whole;
        progress.remainder += remainder;
        if progress.remainder >= share {
            progress.remainder -= share;
            progress.whole += 1;
        }
        if progress.done < share {
            // The next pick is eligible from slot ⌈done·L/share⌉: never ahead of its share.
            let at = progress.whole + u64::from(progress.remainder > 0);
            if at <= self.slot + 1 {
                // Eligible again by the next slot: re-key in place (one sift, not two).
                first.pick = progress.done + 1;
            } else {
                PeekMut::pop(first);
                self.waiting.push(at, index);
            }
        } else {
            PeekMut::pop(first);
        }
        self.slot += 1;
        Some(index as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::test_util::{endpoints, picks};
    use proptest::prelude::{
        prop, prop_assert, prop_assert_eq, prop_assume, prop_oneof, proptest, Just,
    };

    fn build(weights: &[u32]) -> WeightedRoundRobinPicker {
        let handles = endpoints(weights);
        WeightedRoundRobin::new().build(&Endpoints::new(&handles))
    }

    /// One cycle from slot 0, computed by the scheduler the picker uses.
    fn cycle(weights: &[u32]) -> Vec<usize> {
        let handles = endpoints(weights);
        let cycle = Arc::new(Cycle::new(&Endpoints::new(&handles)));
        let len = cycle.len;
        let mut scheduler = Scheduler::precomputing(cycle);
        (0..len).map(|_| scheduler.next().unwrap()).collect()
    }

    fn letters(cycle: &[usize]) -> String {
        cycle.iter().map(|&i| (b'a' + i as u8) as char).collect()
    }

    /// The longest run of each endpoint, counting runs that wrap around the cycle's end.
    fn longest_runs(cycle: &[usize], n: usize) -> Vec<usize> {
        let mut longest = vec![0; n];
        let doubled: Vec<usize> = cycle.iter().chain(cycle).copied().collect();
        let mut run = 0;
        for (k, &i) in doubled.iter().enumerate() {
            run = if k > 0 && doubled[k - 1] == i {
                run + 1
            } else {
                1
            };
            longest[i] = longest[i].max(run.min(cycle.len()));
        }
        longest
    }

    fn gcd_all(weights: &[u32]) -> u32 {
        weights.iter().fold(0, |g, &w| gcd(g, w))
    }

    #[test]
    fn three_one_one_interleaves() {
        assert_eq!(letters(&cycle(&[3, 1, 1])), "abaca");
        assert_eq!(letters(&cycle(&[300, 100, 100])), "abaca", "gcd-reduced");
        match build(&[300, 100, 100]).plan {
            Plan::Precomputed(schedule) => assert_eq!(schedule.len(), 5),
            _ => panic!("a short cycle is precomputed"),
        }
    }

    #[test]
    fn picks_walk_the_cycle_from_a_random_start() {
        let handles = endpoints(&[3, 1, 1]);
        let picker = WeightedRoundRobin::new().build(&Endpoints::new(&handles));
        let chosen = letters(&picks(&picker, &handles, 15));
        assert!(
            "abacaabacaabacaabaca".contains(&chosen),
            "a rotation of abaca: {chosen}"
        );
    }

    #[test]
    fn five_one_one_never_sends_five_in_a_row_even_across_cycles() {
        let schedule = cycle(&[5, 1, 1]);
        assert_eq!(letters(&schedule), "abaacaa");
        assert_eq!(longest_runs(&schedule, 3), vec![3, 1, 1]);
        let handles = endpoints(&[5, 1, 1]);
        let picker = WeightedRoundRobin::new().build(&Endpoints::new(&handles));
        let chosen = picks(&picker, &handles, 700);
        assert!(
            chosen.windows(4).all(|w| w.iter().any(|&i| i != 0)),
            "{}",
            letters(&chosen)
        );
    }

    #[test]
    fn equal_weights_rotate_like_round_robin() {
        assert_eq!(cycle(&[4, 4, 4, 4]), vec![0, 1, 2, 3]);
        assert_eq!(cycle(&[7]), vec![0]);
    }

    #[test]
    fn an_empty_set_builds_a_picker_that_picks_nothing() {
        let picker = build(&[]);
        assert!(matches!(picker.plan, Plan::Empty));
        assert!(format!("{picker:?}").contains("cycle_len: 0"));
    }

    #[test]
    fn a_long_cycle_is_scheduled_per_clone_with_the_same_order() {
        let weights = [5, 3, 1, 1, 2];
        let handles = endpoints(&weights);
        let strategy = WeightedRoundRobin {
            max_schedule_len: 4,
        };
        let picker = strategy.build(&Endpoints::new(&handles));
        assert!(matches!(picker.plan, Plan::PerClone(_)));
        assert!(format!("{picker:?}").contains("precomputed: false"));
        let expected = cycle(&weights);
        let chosen = picks(&picker, &handles, 12 * 5);
        // A random start, then the same cycle over and over.
        let doubled: Vec<usize> = expected.iter().chain(&expected).copied().collect();
        let start = (0..12)
            .find(|&s| doubled[s..s + 12] == chosen[..12])
            .expect("the per-clone order is a rotation of the precomputed one");
        for (k, &i) in chosen.iter().enumerate() {
            assert_eq!(i, expected[(start + k) % 12]);
        }
    }

    #[test]
    fn more_than_65536_endpoints_use_wide_indices() {
        let n = 70_000;
        let picker = build(&vec![1; n]);
        let Plan::Precomputed(Schedule::Wide(slots)) = &picker.plan else {
            panic!("expected a wide precomputed schedule");
        };
        assert_eq!(slots.len(), n);
        assert!(slots.iter().enumerate().all(|(k, &i)| i as usize == k));
    }

    /// 4,096 endpoints with unrelated weights up to 10,000: the cycle (~2·10^7 picks) is not
    /// stored, building is O(n), and picking still gives exact shares over the cycle prefix
    /// it covers within one.
    #[test]
    fn thousands_of_endpoints_with_large_weights_build_in_bounded_memory() {
        let mut rng = crate::rng::FastRng::seeded(11);
        let weights: Vec<u32> = (0..4096).map(|_| 1 + rng.below(10_000) as u32).collect();
        let handles = endpoints(&weights);
        let started = std::time::Instant::now();
        let picker = WeightedRoundRobin::new().build(&Endpoints::new(&handles));
        let built = started.elapsed();
        let stored = match &picker.plan {
            Plan::Precomputed(schedule) => schedule.len() as u64,
            Plan::PerClone(_) => 0,
            Plan::Empty => panic!("endpoints were given"),
        };
        assert!(stored <= MAX_SCHEDULE_LEN, "{stored} slots stored");
        assert!(
            built < std::time::Duration::from_secs(1),
            "built in {built:?}"
        );

        // Picks follow the weights: 200,000 picks, each endpoint within 2 of its share.
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let n = 200_000;
        let mut counts = vec![0u64; weights.len()];
        for i in picks(&picker, &handles, n as usize) {
            counts[i] += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            let ideal = n as f64 * f64::from(w) / total as f64;
            assert!(
                (counts[i] as f64 - ideal).abs() < 2.0,
                "endpoint {i}: {} picks, ideal {ideal}",
                counts[i]
            );
        }
    }

    /// Just under the cap with 4,096 endpoints: precomputed (O(L log n): some tens of
    /// milliseconds in a release build; no wall-clock assertion, test machines are shared).
    #[test]
    fn a_cycle_near_the_cap_is_precomputed() {
        let mut rng = crate::rng::FastRng::seeded(5);
        let weights: Vec<u32> = (0..4096).map(|_| 1 + rng.below(120) as u32).collect();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        assert!(total <= MAX_SCHEDULE_LEN && gcd_all(&weights) == 1);
        let picker = build(&weights);
        let Plan::Precomputed(Schedule::Narrow(slots)) = &picker.plan else {
            panic!("under the cap the cycle is precomputed, in 2-byte entries");
        };
        assert_eq!(slots.len() as u64, total);
        let mut counts = vec![0u32; weights.len()];
        for &i in slots.iter() {
            counts[usize::from(i)] += 1;
        }
        assert_eq!(counts, weights);
    }

    fn weights() -> impl proptest::strategy::Strategy<Value = Vec<u32>> {
        prop_oneof![
            prop::collection::vec(1u32..=5, 1..12),
            prop::collection::vec(1u32..=100, 1..40),
            prop::collection::vec(prop_oneof![Just(1u32), Just(1000), 1u32..=3000], 1..8),
        ]
    }

    proptest! {
        #[test]
        fn every_cycle_gives_each_endpoint_exactly_its_reduced_weight(weights in weights()) {
            let handles = endpoints(&weights);
            let picker = WeightedRoundRobin::new().build(&Endpoints::new(&handles));
            let g = gcd_all(&weights);
            let len: usize = weights.iter().map(|&w| (w / g) as usize).sum();
            // Three cycles from this clone's random start: each window of `len` picks is a
            // cycle.
            let chosen = picks(&picker, &handles, 3 * len);
            for window in chosen.chunks(len) {
                let mut counts = vec![0u32; weights.len()];
                for &i in window {
                    counts[i] += 1;
                }
                let expected: Vec<u32> = weights.iter().map(|&w| w / g).collect();
                prop_assert_eq!(counts, expected);
            }
        }

        #[test]
        fn lag_behind_the_ideal_share_stays_below_one_pick(weights in weights()) {
            let schedule = cycle(&weights);
            let g = gcd_all(&weights);
            let len = schedule.len() as i64;
            let mut counts = vec![0i64; weights.len()];
            for (t, &picked) in schedule.iter().enumerate() {
                counts[picked] += 1;
                let t = t as i64 + 1;
                for (i, &w) in weights.iter().enumerate() {
                    // |t·r/L - c| < 1, scaled by L.
                    let lag = t * i64::from(w / g) - counts[i] * len;
                    prop_assert!(lag.abs() < len, "endpoint {} at {}: lag {}/{}", i, t, lag, len);
                }
            }
        }

        #[test]
        fn runs_are_at_most_one_longer_than_unavoidable(weights in weights()) {
            prop_assume!(weights.len() >= 2);
            let schedule = cycle(&weights);
            let g = gcd_all(&weights);
            let len = schedule.len() as u64;
            for (i, run) in longest_runs(&schedule, weights.len()).into_iter().enumerate() {
                let share = u64::from(weights[i] / g);
                let bound = len.div_ceil(len - share);
                prop_assert!(run as u64 <= bound, "endpoint {} runs {} > {}", i, run, bound);
            }
        }

        #[test]
        fn per_clone_scheduling_matches_the_precomputed_cycle(weights in weights(), seed: u64) {
            let expected = cycle(&weights);
            let handles = endpoints(&weights);
            let cycle = Arc::new(Cycle::new(&Endpoints::new(&handles)));
            let mut scheduler = Scheduler::starting_at(cycle, seed);
            let len = expected.len();
            let start = scheduler.slot as usize;
            for k in 0..2 * len {
                prop_assert_eq!(scheduler.next(), Some(expected[(start + k) % len]));
            }
        }
    }
}
