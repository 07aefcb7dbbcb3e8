//! Weighted round-robin: smooth interleaving with exact shares per cycle.

use std::cmp::Ordering;
use std::collections::binary_heap::{BinaryHeap, PeekMut};
use std::fmt;
use std::sync::Arc;

use super::{Endpoints, PickContext, Picker, Strategy};

/// The longest cycle that is precomputed and shared by all clones; longer cycles are walked
/// with a stride (see [`WeightedRoundRobin`]). The cap bounds the build, which runs
/// on the discovery task at every membership or weight change: O(L log n), some tens of
/// milliseconds at 2^18 slots with thousands of endpoints.
const MAX_SCHEDULE_LEN: u64 = 1 << 18;

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
/// Each clone walks the schedule with its own cursor and touches no shared counter, lock or
/// allocator per pick. A new clone's cursor is one more than the previous clone's, so a server
/// that clones the balancer per request walks the schedule exactly too, and making a clone
/// costs O(1) whatever the number of endpoints.
///
/// - Cycles of up to 2^18 (262,144) picks are precomputed when the picker is built, in
///   O(L log n) time (tens of milliseconds at the cap with thousands of endpoints) and 4 bytes
///   a slot while building, into one table of endpoint indices shared by all clones (2 bytes
///   an entry up to 65,536 endpoints, 4 above: at most 512 KiB or 1 MiB). A pick reads the
///   next entry: O(1). Thousands of endpoints with weights up to about 100, or hundreds with
///   weights up to about 1,000, stay under the cap.
/// - Longer cycles (say 4,096 endpoints with unrelated weights up to 10,000, `L` ≈ 2·10^7) are
///   never stored. Each endpoint owns a stretch of `r_i` consecutive positions on a line of
///   `L`, and a clone steps along the line by a stride `g` coprime with `L` and close to
///   `L/φ` (the golden ratio), wrapping around: pick `t` takes the endpoint whose stretch
///   holds position `t·g mod L`. Building is O(n) (prefix sums and a bucket index, 12 bytes
///   an endpoint); a pick is an addition and an O(1) expected lookup. Every `L` consecutive
///   picks visit every position once, so each endpoint still gets exactly `r_i` of them; the
///   golden-ratio stride spreads each endpoint's picks almost evenly (by the three-gap
///   theorem its gaps take at most three lengths), but the order is not the one above, and
///   an endpoint may run a few picks ahead of or behind its exact share within a cycle
///   (`thousands_of_endpoints_with_large_weights_stay_near_their_share` bounds it by 4 over
///   200,000 picks of such a set).
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
/// use tower_lb::{discover, strategy::WeightedRoundRobin, weight::{Weight, Weighted}, BalanceLayer};
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
    /// A cycle too long to store, walked with a stride.
    Strided(Stride),
}

/// What a clone keeps for a [`WeightedRoundRobinPicker`] over a cycle too long to precompute:
/// its position on the line (see [`WeightedRoundRobin`]). Empty until its first pick.
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightedRoundRobinLocal {
    position: Option<u64>,
}

/// A cycle too long to store: each endpoint owns `share` consecutive positions on a line of
/// `len`, walked with a stride coprime with `len` (see [`WeightedRoundRobin`]).
struct Stride {
    /// Where each endpoint's stretch starts, then `len`.
    starts: Box<[u64]>,
    len: u64,
    step: u64,
    /// `first[b]`: the endpoint whose stretch holds position `b << shift`.
    first: Box<[u32]>,
    shift: u32,
}

impl Stride {
    fn new(cycle: &Cycle) -> Self {
        let n = cycle.shares.len();
        let mut starts = Vec::with_capacity(n + 1);
        let mut at = 0u64;
        for &share in cycle.shares.iter() {
            starts.push(at);
            at += u64::from(share);
        }
        starts.push(at);
        let len = cycle.len;
        // About one bucket per endpoint, each a power of two wide, so a lookup shifts.
        let buckets = (n as u64).next_power_of_two().max(1);
        let shift = len.div_ceil(buckets).next_power_of_two().trailing_zeros();
        let count = ((len - 1) >> shift) + 1;
        let mut first = Vec::with_capacity(count as usize);
        let mut endpoint = 0usize;
        for bucket in 0..count {
            let position = bucket << shift;
            while starts[endpoint + 1] <= position {
                endpoint += 1;
            }
            first.push(endpoint as u32);
        }
        Self {
            starts: starts.into_boxed_slice(),
            len,
            step: golden_step(len),
            first: first.into_boxed_slice(),
            shift,
        }
    }

    /// The endpoint whose stretch holds `position` (below `len`).
    #[inline]
    fn endpoint_at(&self, position: u64) -> usize {
        let bucket = (position >> self.shift) as usize;
        let low = self.first[bucket] as usize;
        let high = self
            .first
            .get(bucket + 1)
            .map_or(self.starts.len() - 2, |&i| i as usize);
        // The stretch holding `position` is one of `low..=high`: count the ones after `low`
        // that start at or before it.
        low + self.starts[low + 1..=high].partition_point(|&start| start <= position)
    }

    /// The position of pick `cursor` of the walk.
    fn position(&self, cursor: u64) -> u64 {
        ((u128::from(cursor % self.len) * u128::from(self.step)) % u128::from(self.len)) as u64
    }
}

/// A stride coprime with `len` and as close as possible to `len/φ`, so that consecutive picks
/// spread over the line like the golden-ratio sequence.
fn golden_step(len: u64) -> u64 {
    if len <= 2 {
        // One position (step 0) or two (step 1).
        return len.saturating_sub(1);
    }
    let ideal = (len as f64 * 0.618_033_988_749_895).round() as u64;
    (0..len)
        .flat_map(|d| [ideal.saturating_add(d), ideal.saturating_sub(d)])
        .find(|&g| g > 0 && g < len && gcd64(g, len) == 1)
        .unwrap_or(1)
}

fn gcd64(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
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
        let cycle = Cycle::new(endpoints);
        if cycle.len > self.max_schedule_len {
            return WeightedRoundRobinPicker {
                plan: Plan::Strided(Stride::new(&cycle)),
            };
        }
        let len = cycle.len as usize;
        let narrow = endpoints.len() <= usize::from(u16::MAX) + 1;
        let mut scheduler = Scheduler::precomputing(Arc::new(cycle));
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
    type Local = WeightedRoundRobinLocal;

    #[inline]
    fn pick(
        &self,
        _: &Endpoints<'_>,
        cx: &mut PickContext<'_, WeightedRoundRobinLocal>,
    ) -> Option<usize> {
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
            Plan::Strided(stride) => {
                // The cursor counts picks, so a clone that moves to a new table (and loses
                // its position) or a new clone (one cursor step on) continues the walk.
                let cursor = cx.cursor();
                let pick = *cursor;
                *cursor = pick.wrapping_add(1);
                let local = cx.local();
                let position = match local.position {
                    Some(position) => position,
                    None => stride.position(pick),
                };
                let next = position + stride.step;
                local.position = Some(if next >= stride.len {
                    next - stride.len
                } else {
                    next
                });
                Some(stride.endpoint_at(position))
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
            Plan::Strided(stride) => d
                .field("cycle_len", &stride.len)
                .field("precomputed", &false),
        };
        d.finish()
    }
}

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

/// Endpoints waiting for their next pick to become eligible: a list per slot, so O(1) a
/// pick, for precomputing a cycle short enough to hold a list head per slot (4 bytes each,
/// while building).
struct Waiting {
    /// The first endpoint waiting for each slot, or [`Waiting::NONE`].
    first: Box<[u32]>,
    /// The next endpoint waiting for the same slot, or [`Waiting::NONE`].
    then: Box<[u32]>,
}

impl Waiting {
    const NONE: u32 = u32::MAX;

    fn clear(&mut self) {
        self.first.fill(Self::NONE);
    }

    /// Endpoint `index` waits for slot `at` (below the cycle length).
    fn push(&mut self, at: u64, index: u32) {
        self.then[index as usize] = self.first[at as usize];
        self.first[at as usize] = index;
    }

    /// Hands every endpoint waiting for `slot` to `release`.
    fn release(&mut self, slot: u64, mut release: impl FnMut(u32)) {
        // Slots are visited in order, so earlier slots were emptied already.
        let mut index = std::mem::replace(&mut self.first[slot as usize], Self::NONE);
        while index != Self::NONE {
            release(index);
            index = self.then[index as usize];
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
        let n = cycle.shares.len();
        let waiting = Waiting {
            first: vec![Waiting::NONE; cycle.len as usize].into_boxed_slice(),
            then: vec![Waiting::NONE; n].into_boxed_slice(),
        };
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
    use crate::endpoint::EndpointHandle;
    use crate::strategy::test_util::{endpoints, picks};
    use crate::strategy::LocalState;
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

    /// A strategy that strides every cycle longer than four picks.
    fn strided(weights: &[u32]) -> (WeightedRoundRobinPicker, Vec<EndpointHandle>) {
        let handles = endpoints(weights);
        let strategy = WeightedRoundRobin {
            max_schedule_len: 4,
        };
        let picker = strategy.build(&Endpoints::new(&handles));
        assert!(matches!(picker.plan, Plan::Strided(_)));
        (picker, handles)
    }

    /// Picks `n` times, each from a new clone: a new local state, and a cursor one step on
    /// from the previous clone's, as `Balance` hands them out.
    fn fresh_clone_picks(
        picker: &WeightedRoundRobinPicker,
        handles: &[EndpointHandle],
        n: usize,
        first_cursor: u64,
    ) -> Vec<usize> {
        let endpoints = Endpoints::new(handles);
        (0..n as u64)
            .map(|k| {
                let mut common = LocalState::new();
                common.cursor = first_cursor.wrapping_add(k);
                let mut local = WeightedRoundRobinLocal::default();
                let mut cx = PickContext::new(&mut common, &mut local);
                picker.pick(&endpoints, &mut cx).expect("a choice")
            })
            .collect()
    }

    #[test]
    fn a_long_cycle_is_strided_with_exact_shares_per_cycle() {
        let weights = [5, 3, 1, 1, 2];
        let (picker, handles) = strided(&weights);
        assert!(format!("{picker:?}").contains("precomputed: false"));
        let chosen = picks(&picker, &handles, 12 * 5);
        for window in chosen.windows(12) {
            let mut counts = [0u32; 5];
            for &i in window {
                counts[i] += 1;
            }
            assert_eq!(counts, weights, "every 12 consecutive picks: {chosen:?}");
        }
        // Spread, not stretched out: the heaviest endpoint never runs more than twice.
        assert!(longest_runs(&chosen[..12], 5)[0] <= 2, "{chosen:?}");
    }

    #[test]
    fn fresh_clones_continue_one_walk() {
        let (picker, handles) = strided(&[5, 3, 1, 1, 2]);
        let start = 987_654_321;
        let one_clone = {
            let mut common = LocalState::new();
            common.cursor = start;
            let mut local = WeightedRoundRobinLocal::default();
            let endpoints = Endpoints::new(&handles);
            (0..36)
                .map(|_| {
                    let mut cx = PickContext::new(&mut common, &mut local);
                    picker.pick(&endpoints, &mut cx).unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(fresh_clone_picks(&picker, &handles, 36, start), one_clone);
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
    /// stored, building is O(n), and 200,000 picks keep every endpoint within 4 of its share,
    /// from one clone and from a new clone per pick alike.
    #[test]
    fn thousands_of_endpoints_with_large_weights_stay_near_their_share() {
        let mut rng = crate::util::rng::FastRng::seeded(11);
        let weights: Vec<u32> = (0..4096).map(|_| 1 + rng.below(10_000) as u32).collect();
        let handles = endpoints(&weights);
        let picker = WeightedRoundRobin::new().build(&Endpoints::new(&handles));
        let Plan::Strided(stride) = &picker.plan else {
            panic!("a cycle of ~2·10^7 picks is not stored");
        };
        assert_eq!(stride.starts.len(), weights.len() + 1);
        assert!(stride.first.len() <= 2 * weights.len());

        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let n = 200_000;
        for chosen in [
            picks(&picker, &handles, n),
            fresh_clone_picks(&picker, &handles, n, 42),
        ] {
            let mut counts = vec![0u64; weights.len()];
            for i in chosen {
                counts[i] += 1;
            }
            for (i, &w) in weights.iter().enumerate() {
                let ideal = n as f64 * f64::from(w) / total as f64;
                assert!(
                    (counts[i] as f64 - ideal).abs() < 4.0,
                    "endpoint {i}: {} picks, ideal {ideal}",
                    counts[i]
                );
            }
        }
    }

    /// Just under the cap with 4,096 endpoints: precomputed (O(L log n): some tens of
    /// milliseconds in a release build; no wall-clock assertion, test machines are shared).
    #[test]
    fn a_cycle_near_the_cap_is_precomputed() {
        let mut rng = crate::util::rng::FastRng::seeded(5);
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
        fn strided_cycles_give_exact_shares_and_find_every_position(weights in weights(), seed: u64) {
            let handles = endpoints(&weights);
            let cycle = Cycle::new(&Endpoints::new(&handles));
            let stride = Stride::new(&cycle);
            prop_assert_eq!(gcd64(stride.step.max(1), stride.len), 1);
            // The lookup agrees with a linear search at every position.
            let mut owner = Vec::new();
            for (i, &share) in cycle.shares.iter().enumerate() {
                owner.extend(std::iter::repeat_n(i, share as usize));
            }
            for (position, &i) in owner.iter().enumerate() {
                prop_assert_eq!(stride.endpoint_at(position as u64), i);
            }
            // Any cycle of picks, from any start, gives each endpoint its reduced weight.
            let len = cycle.len as usize;
            let chosen = fresh_clone_picks(
                &WeightedRoundRobinPicker { plan: Plan::Strided(stride) },
                &handles,
                len,
                seed,
            );
            let mut counts = vec![0u32; weights.len()];
            for i in chosen {
                counts[i] += 1;
            }
            prop_assert_eq!(counts, cycle.shares.to_vec());
        }
    }
}
