//! Least connections: the endpoint with the fewest requests in flight.

use std::fmt;
use std::time::Duration;

mod index;

use std::sync::Arc;

use index::{LoadIndex, Verdict, LEVELS};

use super::alias::AliasTable;
use super::{Endpoints, PickContext, Picker, Strategy};
use crate::endpoint::load_report::Watch;
use crate::endpoint::{clock, Activation, EndpointHandle, EndpointState, LoadReport};
use crate::error::ConfigError;
use crate::util::sync::{AtomicU64, Ordering};

/// The least-connections index an endpoint reports to, if it reports to one.
fn index_of(watch: &Watch) -> Option<Arc<LoadIndex>> {
    Arc::clone(&watch.sink).as_any().downcast().ok()
}

/// The largest accepted error penalty.
const MAX_ERROR_PENALTY: u32 = 1_000_000;

/// Up to this many endpoints a pick reads them all: that is as fast as the index (reading
/// an endpoint costs about a quarter of an index search), and the endpoints need not report
/// their load.
const SCAN_UP_TO: usize = 4;

/// Weighted picks search the index once per distinct weight; with more weights than this,
/// they read every endpoint instead.
const MAX_WEIGHT_CLASSES: usize = 8;

/// Sends each request to the endpoint with the fewest requests in flight.
///
/// "In flight" is the live count across every clone of the balancer
/// ([`Endpoint::in_flight`](super::Endpoint::in_flight)): a request counts from dispatch
/// until its response future completes or is dropped.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::{strategy::LeastConnections, BalanceLayer};
///
/// // Plain least connections.
/// let layer = BalanceLayer::new(LeastConnections::new());
///
/// // Weighted, with failures held against an endpoint for 30 s instead of 10.
/// let strategy = LeastConnections::weighted().error_window(Duration::from_secs(30))?;
/// let weighted = BalanceLayer::new(strategy).weighted();
/// # let _ = (layer, weighted);
/// # Ok::<(), tower_lb::ConfigError>(())
/// ```
///
/// # Load
///
/// An endpoint's *effective load* is
///
/// ```text
/// in_flight + error_penalty × consecutive_failures      (while the failures are recent)
/// ```
///
/// and the pick is an endpoint with the lowest effective load.
///
/// [`LeastConnections::weighted`] counts an endpoint of weight `w` as `w / w_min` copies of
/// the lightest endpoint (`w_min`) sharing its requests, and compares the load per copy,
/// rounded down to whole requests (`load × w_min / w`, in integers, so exactly): what a new
/// request meets on the least busy copy. A heavy endpoint thus takes `w / w_min` requests at
/// once before it looks busier than an idle light one, under steady concurrency in-flight
/// counts settle in proportion to the weights, and ties — every endpoint idle, as when
/// requests come one at a time — are broken in proportion to weight (below). So the shares
/// follow the weights at every concurrency: with weights 99:1 the light endpoint gets 1% of
/// sequential requests, not none (as with `(in_flight + 1) / w`, which never ties) and not
/// "whenever it is idle" (as with `in_flight / w`, nginx's comparison, which gave it 12% at
/// 8 requests in flight in our tests).
///
/// # Ties
///
/// With equal weights, each clone of the balancer rotates through the endpoints tied at the
/// lowest load: a search starts at the endpoint after the one the clone picked last, and a
/// new clone starts one endpoint further on than the clone made before it, so a service
/// cloned per request (as axum, hyper and tonic use one) rotates as exactly as a long-lived
/// one. Equal endpoints get equal shares: over 100,000 requests, 5 endpoints at 70% load with
/// random service times get within 1.1% of the mean share (what chance alone gives), and 100
/// at 90% load with equal service times get exactly 1% each (`tests/ties.rs`).
///
/// With several weights, a pick draws up to four endpoints in proportion to weight and takes
/// the first at the lowest load; when none is, it chooses among the lowest it found, in
/// proportion to weight.
///
/// # Failures count as load
///
/// An endpoint that fails fast looks idle, since its requests leave at once; plain least
/// connections would send it ever more traffic (a black hole). So each failed response in a
/// row counts as [`error_penalty`](LeastConnections::error_penalty) more requests in flight
/// (1 by default); a successful response wipes the run. A failing endpoint therefore gets
/// requests only while every other endpoint is loaded more than its penalty, and each failure
/// raises the bar.
///
/// Failures are recent for [`error_window`](LeastConnections::error_window) (10 s by default)
/// from when a pick first notices the latest one. After that the endpoint is judged by its
/// in-flight count alone until it fails again, so an endpoint that keeps failing gets about one
/// request per window — the probe that brings it back into rotation as soon as it answers —
/// while one that failed once and then recovered is not shunned for ever. This is nginx's
/// `max_fails=1 fail_timeout=10s`, made softer: under load a failing endpoint still takes
/// requests rather than overload the others. A rebuild of the picker (membership or weights
/// changed) restarts the windows. `error_penalty(0)` ignores failures.
///
/// Retiring endpoints that fail for good is the job of health checks and outlier detection;
/// this only keeps them from swallowing traffic meanwhile.
///
/// # Cost
///
/// With more than four endpoints, a pick does not read every endpoint. The endpoints report
/// each change of their in-flight count to a shared index by level, and a pick takes the lowest
/// occupied level and the next endpoint in it after its cursor — once per distinct weight for
/// [`weighted`](LeastConnections::weighted) picks, since endpoints of one weight compare by
/// in-flight count alone. A report is a load when the endpoint's bit is already set (the usual
/// case), else an atomic `or`; releasing a request costs one more atomic add, to keep the
/// endpoint alive while it reports. The index may keep bits where an endpoint no longer is but
/// never misses one, and a pick checks what it finds against the live count (clearing what is
/// stale, once per change, amortised), so the pick is exact whenever the counts are not
/// changing while it runs. It costs a few loads whatever the number of endpoints, plus one
/// read per endpoint under an error penalty whose in-flight count is below the pick's level;
/// it reads every endpoint only when all of them (of some weight) have 64 or more requests in
/// flight.
///
/// With up to four endpoints, or more than eight distinct weights, a pick reads every
/// endpoint: O(n), with no atomic write and no reporting. Endpoints that had requests in flight
/// when the picker was built are read directly until they are idle and can start reporting.
/// Once reporting, an endpoint reports for life, also if the balancer swaps to another
/// strategy.
#[derive(Clone, Debug)]
pub struct LeastConnections {
    weighted: bool,
    error_penalty: u32,
    error_window: Duration,
    latency: Option<Latency>,
}

/// How a latency-aware pick weighs latency.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Latency {
    decay: Duration,
    resolution: Duration,
}

impl Default for LeastConnections {
    fn default() -> Self {
        Self::new()
    }
}

impl LeastConnections {
    /// How long failures count against an endpoint unless configured otherwise.
    pub const DEFAULT_ERROR_WINDOW: Duration = Duration::from_secs(10);

    /// Fewest requests in flight, ignoring weights.
    pub fn new() -> Self {
        Self {
            weighted: false,
            error_penalty: 1,
            error_window: Self::DEFAULT_ERROR_WINDOW,
            latency: None,
        }
    }

    /// Latency-aware picks ([`LeastTime`](super::LeastTime)): a candidate is passed over when
    /// a random other endpoint expects a clearly lower cost.
    pub(crate) fn latency_aware(mut self, decay: Duration, resolution: Duration) -> Self {
        self.latency = Some(Latency { decay, resolution });
        self
    }

    /// The latency settings, for [`LeastTime`](super::LeastTime)'s setters.
    pub(crate) fn latency_settings(&self) -> Option<(Duration, Duration)> {
        self.latency.map(|l| (l.decay, l.resolution))
    }

    /// Lowest `(in_flight + 1) / weight`: endpoints share requests in proportion to their
    /// weights.
    pub fn weighted() -> Self {
        Self {
            weighted: true,
            ..Self::new()
        }
    }

    /// How many requests in flight each recent failure in a row counts as (default 1); 0 ignores
    /// failures. At most 1,000,000: beyond that every failing endpoint is already the last
    /// choice.
    pub fn error_penalty(mut self, penalty: u32) -> Result<Self, ConfigError> {
        if penalty > MAX_ERROR_PENALTY {
            return Err(ConfigError::new(
                "error_penalty",
                format!("{penalty} is above the maximum of {MAX_ERROR_PENALTY}"),
            ));
        }
        self.error_penalty = penalty;
        Ok(self)
    }

    /// How long failures count against an endpoint after a pick first notices the latest one
    /// (default [`DEFAULT_ERROR_WINDOW`](Self::DEFAULT_ERROR_WINDOW)). Zero is rejected: to
    /// ignore failures, set [`error_penalty`](Self::error_penalty) to 0.
    pub fn error_window(mut self, window: Duration) -> Result<Self, ConfigError> {
        if window.is_zero() {
            return Err(ConfigError::new(
                "error_window",
                "0 would forget every failure at once; use error_penalty(0) to ignore failures",
            ));
        }
        if window.as_nanos() > u128::from(u64::MAX) {
            return Err(ConfigError::new(
                "error_window",
                format!("{window:?} is longer than the balancer's clock can count"),
            ));
        }
        self.error_window = window;
        Ok(self)
    }
}

/// The picker [`LeastConnections`] builds for one set of endpoints.
pub struct LeastConnectionsPicker {
    weighted: bool,
    /// The lightest weight (1 unweighted): an endpoint of weight `w` counts as `w / w_min`
    /// copies of the lightest endpoint.
    w_min: u64,
    /// With several distinct weights, draws in proportion to weight, to break ties so that
    /// shares follow the weights.
    alias: Option<AliasTable>,
    /// Latency-aware picks: the decay of the estimates, and the resolution in nanoseconds.
    latency: Option<(Duration, f64, f64)>,
    penalty: u64,
    window_ns: u64,
    /// Per endpoint: the failure count a pick last noticed, and when.
    noticed: Box<[Noticed]>,
    /// The load indexes the endpoints report to; `None` when picks read every endpoint.
    indexed: Option<Indexed>,
}

/// What a picker that uses load indexes keeps.
struct Indexed {
    boards: Box<[Board]>,
    classes: Box<[Class]>,
    /// Endpoints that had requests in flight when the picker was built, so could not start
    /// reporting then: picks read them directly, and start their reporting once they are idle.
    pending: Box<[u32]>,
    /// How many of `pending` do not report yet; picks skip the list at 0.
    pending_left: AtomicU64,
}

#[derive(Default)]
struct Noticed {
    failures: AtomicU64,
    at: AtomicU64,
}

/// Endpoints of one weight.
struct Class {
    weight: u64,
    /// Per board, which of its slots hold this class.
    members: Box<[Members]>,
}

enum Members {
    /// Every endpoint of the board (there is one class).
    All,
    /// The slots whose bit is set, one word per bitmap word.
    Slots(Box<[u64]>),
    /// None of the board's endpoints.
    None,
}

/// One load index and where this picker's endpoints are in it.
struct Board {
    index: Arc<LoadIndex>,
    /// This picker's generation of the index.
    generation: u64,
    /// Slot → the endpoint there, its position in this picker's table and its rank in
    /// `order`; `None` for slots of other tables. The handle saves a pick one dependent load
    /// (slot → state, rather than slot → position → handle → state).
    slots: Box<[Option<(EndpointHandle, u32, u32)>]>,
    /// This picker's slots in ascending order. A search starts at `order[cursor mod len]`, so
    /// the start is always one of this picker's endpoints, each as often as the others: a
    /// start taken from the whole slot range would mostly land in unused slots and wrap
    /// around to the lowest one, favouring the first endpoints.
    order: Box<[u32]>,
}

impl fmt::Debug for LeastConnectionsPicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeastConnectionsPicker")
            .field("weighted", &self.weighted)
            .field("error_penalty", &self.penalty)
            .field("indexed", &self.indexed.is_some())
            .finish_non_exhaustive()
    }
}

impl Strategy for LeastConnections {
    type Picker = LeastConnectionsPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> LeastConnectionsPicker {
        let n = endpoints.len();
        // Endpoints of one weight compare by in-flight count alone, so each weight class has
        // its own lowest level; unweighted, everybody is in one class of weight 1.
        let mut weights: Vec<u32> = if self.weighted {
            endpoints.iter().map(|e| e.weight()).collect()
        } else {
            vec![1]
        };
        weights.sort_unstable();
        weights.dedup();
        let indexed =
            n > SCAN_UP_TO && n <= u32::MAX as usize && weights.len() <= MAX_WEIGHT_CLASSES;
        let alias = (weights.len() > 1).then(|| {
            let all: Vec<u32> = endpoints.iter().map(|e| e.weight().max(1)).collect();
            AliasTable::new(&all)
        });
        let w_min = weights.first().copied().unwrap_or(1).max(1);
        if self.latency.is_some() {
            // Each endpoint's estimate is that of one copy of the lightest endpoint.
            for i in 0..n {
                let w = if self.weighted {
                    endpoints.state(i).weight().max(1)
                } else {
                    w_min
                };
                endpoints
                    .state(i)
                    .set_latency_model(f64::from(w_min) / f64::from(w), FORGET_PER_SAMPLE);
            }
        }
        LeastConnectionsPicker {
            weighted: self.weighted,
            w_min: u64::from(w_min),
            latency: self.latency.map(|l| {
                (
                    l.decay,
                    crate::strategy::decay_ns(l.decay),
                    l.resolution.as_nanos() as f64,
                )
            }),
            alias,
            penalty: u64::from(self.error_penalty),
            window_ns: self.error_window.as_nanos() as u64,
            noticed: (0..n).map(|_| Noticed::default()).collect(),
            indexed: if indexed {
                attach(endpoints, self.weighted.then_some(&weights[..]))
            } else {
                None
            },
        }
    }
}

/// Gives every endpoint a place in a load index (those without one join an index the others
/// use, or a new one), activates reporting where nothing is in flight, and returns the indexes
/// with this table's slot maps and the endpoints still to activate. `None` if an endpoint
/// cannot be given a place (more slots than reports can name): picks then read every endpoint.
/// `weights` are the distinct weights when picks are weighted.
fn attach(endpoints: &Endpoints<'_>, weights: Option<&[u32]>) -> Option<Indexed> {
    let n = endpoints.len();
    let mut indexes: Vec<Arc<LoadIndex>> = Vec::new();
    let note = |indexes: &mut Vec<Arc<LoadIndex>>, index: &Arc<LoadIndex>| {
        if !indexes.iter().any(|known| Arc::ptr_eq(known, index)) {
            indexes.push(Arc::clone(index));
        }
    };
    for i in 0..n {
        if let Some(watch) = endpoints.state(i).watch() {
            // An endpoint that reports elsewhere (to another strategy's sink) cannot be
            // indexed here: picks read every endpoint.
            note(&mut indexes, &index_of(watch)?);
        }
    }
    for i in 0..n {
        let state = endpoints.state(i);
        if state.watch().is_some() {
            continue;
        }
        let room = indexes
            .iter()
            .find_map(|index| Some((Arc::clone(index), index.allocate_slot()?)));
        let (index, slot) = room.unwrap_or_else(|| {
            // Twice the table, so that growth and churn rarely spill into another index.
            let fresh = Arc::new(LoadIndex::new(2 * n));
            indexes.push(Arc::clone(&fresh));
            let slot = fresh.allocate_slot().expect("a new index has free slots");
            (fresh, slot)
        });
        let sink: Arc<dyn LoadReport> = Arc::clone(&index) as Arc<dyn LoadReport>;
        if !state.install_watch(sink, slot) {
            index.free_slot(slot);
        }
        // Ours, or one installed meanwhile by someone else.
        note(&mut indexes, &index_of(state.watch()?)?);
    }

    // From here on, pickers built earlier put back what they clear of slots they do not know.
    let generations: Vec<u64> = indexes.iter().map(|i| i.advance_generation()).collect();
    let mut pending = Vec::new();
    for i in 0..n {
        let state = endpoints.state(i);
        let watch = state.watch()?;
        let index = index_of(watch)?;
        match state.activate() {
            Activation::Activated => index.insert(0, watch.slot),
            // Older pickers may have cleared endpoints that were not in their table.
            Activation::AlreadyActive => index.insert(state.in_flight(), watch.slot),
            Activation::Busy => pending.push(i as u32),
        }
    }

    let boards: Box<[Board]> = indexes
        .into_iter()
        .zip(generations)
        .map(|(index, generation)| {
            let mut here = Vec::new();
            for i in 0..n {
                let watch = endpoints.state(i).watch()?;
                if std::ptr::addr_eq(Arc::as_ptr(&watch.sink), Arc::as_ptr(&index)) {
                    here.push((watch.slot, i));
                }
            }
            here.sort_unstable();
            let mut slots: Vec<Option<(EndpointHandle, u32, u32)>> =
                (0..index.capacity()).map(|_| None).collect();
            for (rank, &(slot, i)) in here.iter().enumerate() {
                slots[slot] = Some((endpoints.handle(i).clone(), i as u32, rank as u32));
            }
            Some(Board {
                index,
                generation,
                slots: slots.into_boxed_slice(),
                order: here.iter().map(|&(slot, _)| slot as u32).collect(),
            })
        })
        .collect::<Option<_>>()?;
    let classes: Box<[Class]> = match weights {
        Some(weights) if weights.len() > 1 => weights
            .iter()
            .map(|&weight| Class {
                weight: u64::from(weight),
                members: boards
                    .iter()
                    .map(|board| {
                        let mut slots = vec![0u64; board.index.capacity() / 64];
                        let mut any = false;
                        for (slot, entry) in board.slots.iter().enumerate() {
                            if let Some((handle, _, _)) = entry {
                                if handle.weight() == weight {
                                    slots[slot / 64] |= 1 << (slot % 64);
                                    any = true;
                                }
                            }
                        }
                        if any {
                            Members::Slots(slots.into_boxed_slice())
                        } else {
                            Members::None
                        }
                    })
                    .collect(),
            })
            .collect(),
        _ => Box::new([Class {
            weight: u64::from(weights.map_or(1, |w| w[0])),
            members: boards.iter().map(|_| Members::All).collect(),
        }]),
    };
    Some(Indexed {
        boards,
        classes,
        pending_left: AtomicU64::new(pending.len() as u64),
        pending: pending.into_boxed_slice(),
    })
}

/// The best endpoint so far, and the weight of those tied with it (for a choice among them in
/// proportion to weight).
#[derive(Default)]
struct Best {
    /// Load per copy of the lightest endpoint, and the endpoint's position.
    found: Option<(u64, usize)>,
    /// Where the index gave `found`: its board and its rank there, to move the cursor past it.
    at: Option<(usize, u32)>,
    tied_weight: u64,
}

impl Best {
    fn offer(
        &mut self,
        load: u64,
        weight: u64,
        index: usize,
        at: Option<(usize, u32)>,
        cx: &mut PickContext<'_>,
    ) {
        let replace = match self.found {
            Some((best, _)) if load > best => false,
            Some((best, _)) if load == best => {
                // Weighted reservoir sampling: each tied endpoint ends up chosen with
                // probability weight / tied weight.
                self.tied_weight += weight;
                below(cx.random(), self.tied_weight) < weight
            }
            _ => {
                self.tied_weight = weight;
                true
            }
        };
        if replace {
            self.found = Some((load, index));
            self.at = at;
        }
    }
}

/// A uniform number in `0..n` from one random number (multiply-shift).
#[inline]
fn below(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// A candidate is passed over when the other endpoint's expected cost is below this fraction
/// of its own: latency estimates are noisy, and where endpoints are alike the least loaded one
/// should win. (0.9 let noise reorder alike endpoints — shares 2.4% off the mean in
/// `tests/ties.rs`; 0.5 let a 10× slow endpoint through more often — p99.9 1.10× the best.)
const LATENCY_MARGIN: f64 = 0.7;

/// The least part of the way to a faster response each response moves a latency-aware pick's
/// estimate (per copy): peaks fade within about 64 responses however close together they
/// come, so one slow response is not held against a busy endpoint for thousands of requests.
const FORGET_PER_SAMPLE: f64 = 1.0 / 64.0;

/// Candidates a latency-aware pick may pass over before it takes the next one regardless.
const MAX_PASSES: u32 = 8;

/// The state of a latency-aware pick: each candidate the search finds is held against one
/// other endpoint drawn at random, and passed over if that one's expected cost (latency
/// estimate × (load per copy + 1)) is clearly lower.
struct Veto {
    /// The endpoint that passed over the last candidate, for when every candidate is.
    reference: Option<usize>,
    now: u64,
    decay_ns: f64,
    resolution_ns: f64,
    passes_left: u32,
}

/// `cursor` reduced to `0..n` (`n` > 0). After a clone's first pick its cursor is at most `n`,
/// so the division is only paid by new clones.
#[inline]
fn rank_of(cursor: u64, n: usize) -> usize {
    match cursor as usize {
        at if at < n => at,
        at if at == n => 0,
        // Truncating keeps consecutive cursors (clones made one after another) consecutive.
        _ if n <= u32::MAX as usize => (cursor as u32 % n as u32) as usize,
        _ => (cursor % n as u64) as usize,
    }
}

impl LeastConnectionsPicker {
    /// The error penalty of endpoint `index`: its failures in a row times the penalty, while
    /// they are recent. Reads the clock (once per pick) only for endpoints that are failing.
    #[inline]
    fn penalty_of(&self, index: usize, endpoint: &EndpointState, now: &mut Option<u64>) -> u64 {
        if self.penalty == 0 {
            return 0;
        }
        match endpoint.consecutive_failures() {
            0 => 0,
            in_a_row => self.recent_penalty(index, endpoint, in_a_row, now),
        }
    }

    #[inline(never)]
    fn recent_penalty(
        &self,
        index: usize,
        endpoint: &EndpointState,
        in_a_row: u32,
        now: &mut Option<u64>,
    ) -> u64 {
        let now = *now.get_or_insert_with(clock::now_ns);
        let noticed = &self.noticed[index];
        let failures = endpoint.failures();
        let since = if noticed.failures.load(Ordering::Relaxed) == failures {
            noticed.at.load(Ordering::Relaxed)
        } else {
            // A failure no pick has noticed yet: its window starts now. Clones racing here
            // store nearly the same time.
            noticed.failures.store(failures, Ordering::Relaxed);
            noticed.at.store(now, Ordering::Relaxed);
            now
        };
        if now.saturating_sub(since) < self.window_ns {
            self.penalty.saturating_mul(u64::from(in_a_row))
        } else {
            0
        }
    }

    /// For a latency-aware pick, its state.
    #[inline]
    fn veto(&self, cx: &PickContext<'_>) -> Option<Veto> {
        let (_, decay_ns, resolution_ns) = self.latency?;
        Some(Veto {
            reference: None,
            now: cx.now(),
            decay_ns,
            resolution_ns,
            passes_left: MAX_PASSES,
        })
    }

    /// Whether a latency-aware pick passes over candidate `i` with `load` requests per copy:
    /// when another endpoint, drawn at random, expects a clearly lower cost.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn rejects(
        &self,
        veto: &mut Option<Veto>,
        endpoints: &Endpoints<'_>,
        i: usize,
        endpoint: &EndpointState,
        load: u64,
        cx: &mut PickContext<'_>,
        now: &mut Option<u64>,
    ) -> bool {
        let Some(v) = veto.as_mut() else {
            return false;
        };
        let n = endpoints.len();
        if v.passes_left == 0 || n < 2 {
            return false;
        }
        // No cost is below the resolution, so only a cost of two resolutions or more can be
        // beaten by one. Estimates only decay between updates, so the last one bounds the cost:
        // cheap candidates (fast endpoints at low load, the usual case) are taken without
        // decaying an estimate or drawing another endpoint.
        let Some(last) = endpoint.rtt_undecayed() else {
            // Not measured yet: judged by its load alone.
            return false;
        };
        let beatable = 2.0 * v.resolution_ns;
        if last.max(v.resolution_ns) * (load as f64 + 1.0) < beatable {
            return false;
        }
        let Some(estimate) = endpoint.rtt_estimate(v.now, v.decay_ns) else {
            return false;
        };
        let cost = estimate.max(v.resolution_ns) * (load as f64 + 1.0);
        if cost < beatable {
            return false;
        }
        let other = match &self.alias {
            Some(alias) if alias.len() == n => Some(alias.draw(cx.random())).filter(|&o| o != i),
            _ => None,
        }
        .unwrap_or_else(|| {
            let (other, _) = crate::util::rng::split(cx.random(), n - 1);
            other + usize::from(other >= i)
        });
        let state = endpoints.state(other);
        // A failing endpoint answers fast; that is no reason to pass over a working one.
        if state.consecutive_failures() > 0 {
            return false;
        }
        let Some(other_estimate) = state.rtt_estimate(v.now, v.decay_ns) else {
            return false;
        };
        let other_load = self.load_of(other, state, now);
        let other_cost = other_estimate.max(v.resolution_ns) * (other_load as f64 + 1.0);
        // Lower by the margin, and by at least the resolution: a finer difference is noise.
        if other_cost < cost * LATENCY_MARGIN && cost - other_cost >= v.resolution_ns {
            v.passes_left -= 1;
            v.reference = Some(other);
            true
        } else {
            false
        }
    }

    /// The weight an endpoint counts with: its own when weighted, else 1.
    #[inline]
    fn weight_of(&self, endpoint: &EndpointState) -> u64 {
        if self.weighted {
            u64::from(endpoint.weight().max(1))
        } else {
            1
        }
    }

    /// Requests per copy of the lightest endpoint, rounded down, for `load` requests (in
    /// flight plus penalty) at an endpoint of weight `weight`: what a new request meets on
    /// the least busy of its copies.
    #[inline]
    fn per_copy(&self, load: u64, weight: u64) -> u64 {
        if weight == self.w_min {
            load
        } else if let Ok(load) = u32::try_from(load) {
            // Weights fit in 32 bits, so the product fits in 64: no 128-bit division.
            u64::from(load) * self.w_min / weight
        } else {
            (u128::from(load) * u128::from(self.w_min) / u128::from(weight)) as u64
        }
    }

    /// The load per copy of endpoint `i`, read now.
    #[inline]
    fn load_of(&self, i: usize, endpoint: &EndpointState, now: &mut Option<u64>) -> u64 {
        let load = endpoint
            .in_flight()
            .saturating_add(self.penalty_of(i, endpoint, now));
        self.per_copy(load, self.weight_of(endpoint))
    }

    /// Reads every endpoint, from the cursor on. With equal weights the first lowest wins, so
    /// moving the cursor past it rotates through ties; with several weights ties are broken
    /// at random in proportion to weight.
    fn pick_by_scan(
        &self,
        endpoints: &Endpoints<'_>,
        cx: &mut PickContext<'_>,
        now: &mut Option<u64>,
        veto: &mut Option<Veto>,
    ) -> usize {
        let n = endpoints.len();
        let start = rank_of(*cx.cursor(), n);
        let fallback = veto.as_ref().and_then(|v| v.reference).unwrap_or(start);
        if self.alias.is_some() {
            let mut best = Best::default();
            for i in 0..n {
                let endpoint = endpoints.state(i);
                let load = self.load_of(i, endpoint, now);
                if !self.rejects(veto, endpoints, i, endpoint, load, cx, now) {
                    best.offer(load, self.weight_of(endpoint), i, None, cx);
                }
            }
            return best.found.map_or(fallback, |(_, i)| i);
        }
        // (load per copy, index)
        let mut best: Option<(u64, usize)> = None;
        for i in (start..n).chain(0..start) {
            let endpoint = endpoints.state(i);
            let load = self.load_of(i, endpoint, now);
            if best.is_none_or(|(lowest, _)| load < lowest)
                && !self.rejects(veto, endpoints, i, endpoint, load, cx, now)
            {
                best = Some((load, i));
            }
        }
        let chosen = best.map_or(fallback, |(_, i)| i);
        *cx.cursor() = chosen as u64 + 1;
        chosen
    }

    fn pick_indexed(
        &self,
        indexed: &Indexed,
        endpoints: &Endpoints<'_>,
        cx: &mut PickContext<'_>,
        now: &mut Option<u64>,
        veto: &mut Option<Veto>,
    ) -> usize {
        let cursor = *cx.cursor();
        let mut best = Best::default();
        if indexed.pending_left.load(Ordering::Relaxed) != 0 {
            self.offer_pending(indexed, endpoints, &mut best, cx, now, veto);
        }
        // The lowest load per copy that endpoints the indexes could not rank (64+ in flight)
        // may have, if there are any.
        let mut unranked: Option<u64> = None;
        for class in indexed.classes.iter() {
            for (b, (board, members)) in indexed.boards.iter().zip(class.members.iter()).enumerate()
            {
                let filter = match members {
                    Members::All => None,
                    Members::Slots(slots) => Some(&slots[..]),
                    Members::None => continue,
                };
                let start = board.order[rank_of(cursor, board.order.len())] as usize;
                let found = board.index.find_lowest(
                    start,
                    board.generation,
                    filter,
                    |level, slot, second_look| {
                        let Some((endpoint, i, _)) = &board.slots[slot] else {
                            return Verdict::Clear;
                        };
                        let in_flight = if second_look {
                            endpoint.in_flight_latest()
                        } else {
                            endpoint.in_flight()
                        };
                        if in_flight != level as u64 {
                            return Verdict::Clear;
                        }
                        match self.penalty_of(*i as usize, endpoint, now) {
                            0 => {
                                let load = self.per_copy(level as u64, class.weight);
                                if self.rejects(
                                    veto,
                                    endpoints,
                                    *i as usize,
                                    endpoint,
                                    load,
                                    cx,
                                    now,
                                ) {
                                    Verdict::Pass
                                } else {
                                    Verdict::Take
                                }
                            }
                            // Penalised: its load is above this level. Every penalised endpoint
                            // of the class that could beat the lowest unpenalised one sits at a
                            // lower level, so the search meets it on the way.
                            penalty => {
                                let load = self.per_copy(level as u64 + penalty, class.weight);
                                if !self.rejects(
                                    veto,
                                    endpoints,
                                    *i as usize,
                                    endpoint,
                                    load,
                                    cx,
                                    now,
                                ) {
                                    best.offer(load, class.weight, *i as usize, None, cx);
                                }
                                Verdict::Pass
                            }
                        }
                    },
                );
                match found {
                    Some((level, slot)) => {
                        let (i, rank) = board.slots[slot]
                            .as_ref()
                            .map_or((0, 0), |(_, i, rank)| (*i as usize, *rank));
                        let load = self.per_copy(level as u64, class.weight);
                        best.offer(load, class.weight, i, Some((b, rank)), cx);
                    }
                    None => {
                        let floor = self.per_copy(LEVELS as u64, class.weight);
                        unranked = Some(unranked.map_or(floor, |u| u.min(floor)));
                    }
                }
            }
        }
        match best.found {
            // An endpoint beyond the indexes may be as lightly loaded.
            Some((load, _)) if unranked.is_some_and(|floor| load >= floor) => {
                self.pick_by_scan(endpoints, cx, now, veto)
            }
            Some((load, i)) => {
                if let Some(drawn) = self.draw_tied(load, endpoints, cx, now, veto) {
                    return drawn;
                }
                if let Some((_, rank)) = best.at {
                    *cx.cursor() = u64::from(rank) + 1;
                }
                i
            }
            // Every candidate was passed over for the reference.
            None if unranked.is_none() && veto.as_ref().is_some_and(|v| v.reference.is_some()) => {
                veto.as_ref().and_then(|v| v.reference).unwrap_or(0)
            }
            None => self.pick_by_scan(endpoints, cx, now, veto),
        }
    }

    /// With several weights: a few draws in proportion to weight, the first that is at the
    /// lowest load per copy wins. Ties are then broken in proportion to weight whenever a
    /// draw finds one (always when everybody is tied, as when requests come one at a time).
    #[inline]
    fn draw_tied(
        &self,
        lowest: u64,
        endpoints: &Endpoints<'_>,
        cx: &mut PickContext<'_>,
        now: &mut Option<u64>,
        veto: &mut Option<Veto>,
    ) -> Option<usize> {
        let alias = self.alias.as_ref()?;
        if alias.len() != endpoints.len() {
            return None;
        }
        (0..TIE_DRAWS).find_map(|_| {
            let i = alias.draw(cx.random());
            let endpoint = endpoints.state(i);
            let load = self.load_of(i, endpoint, now);
            (load == lowest && !self.rejects(veto, endpoints, i, endpoint, load, cx, now))
                .then_some(i)
        })
    }
}

/// Draws for an endpoint at the lowest load before a weighted pick settles for the best of
/// the weight classes.
const TIE_DRAWS: usize = 4;

impl LeastConnectionsPicker {
    /// Ranks the endpoints that do not report yet by reading them, and starts the reporting
    /// of those that have become idle.
    #[cold]
    fn offer_pending(
        &self,
        indexed: &Indexed,
        endpoints: &Endpoints<'_>,
        best: &mut Best,
        cx: &mut PickContext<'_>,
        now: &mut Option<u64>,
        veto: &mut Option<Veto>,
    ) {
        for &i in indexed.pending.iter() {
            let state = endpoints.state(i as usize);
            if state.is_reporting() {
                continue;
            }
            let in_flight = state.in_flight();
            if in_flight == 0 {
                match state.activate() {
                    Activation::Activated => {
                        if let Some((watch, index)) =
                            state.watch().and_then(|w| Some((w, index_of(w)?)))
                        {
                            index.insert(0, watch.slot);
                        }
                        indexed.pending_left.fetch_sub(1, Ordering::Relaxed);
                        // In the index now: the search finds it.
                        continue;
                    }
                    // Another clone just did it.
                    Activation::AlreadyActive => continue,
                    Activation::Busy => {}
                }
            }
            let load = self.load_of(i as usize, state, now);
            if !self.rejects(veto, endpoints, i as usize, state, load, cx, now) {
                best.offer(load, self.weight_of(state), i as usize, None, cx);
            }
        }
    }
}

impl Picker for LeastConnectionsPicker {
    type Local = ();

    fn latency_decay(&self) -> Option<Duration> {
        self.latency.map(|(decay, _, _)| decay)
    }

    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let mut now = None;
        let mut veto = self.veto(cx);
        Some(match &self.indexed {
            Some(indexed) => self.pick_indexed(indexed, endpoints, cx, &mut now, &mut veto),
            None => self.pick_by_scan(endpoints, cx, &mut now, &mut veto),
        })
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;
    use crate::endpoint::{EndpointHandle, InFlightGuard};
    use crate::strategy::test_util::{endpoints, picks};
    use crate::strategy::LocalState;
    use crate::strategy::Strategy;
    use proptest::prelude::*;

    /// One clone's picks, one at a time.
    struct Clone {
        local: LocalState,
    }

    impl Clone {
        fn new() -> Self {
            Self {
                local: LocalState::new(),
            }
        }

        fn pick(&mut self, picker: &LeastConnectionsPicker, handles: &[EndpointHandle]) -> usize {
            let mut unit = ();
            let mut cx = PickContext::new(&mut self.local, &mut unit);
            picker
                .pick(&Endpoints::new(handles), &mut cx)
                .expect("a choice")
        }
    }

    fn build(strategy: &LeastConnections, handles: &[EndpointHandle]) -> LeastConnectionsPicker {
        strategy.build(&Endpoints::new(handles))
    }

    /// Holds `counts[i]` requests in flight to endpoint `i`.
    fn hold(handles: &[EndpointHandle], counts: &[u64]) -> Vec<InFlightGuard> {
        let mut guards = Vec::new();
        for (handle, &count) in handles.iter().zip(counts) {
            guards.extend((0..count).map(|_| handle.dispatch()));
        }
        guards
    }

    /// `n` failed responses in a row.
    fn fail(handle: &EndpointHandle, n: u32) {
        for _ in 0..n {
            handle.dispatch().record_failure();
        }
    }

    /// Both ways a picker can work: reading every endpoint, and through the load index.
    const SIZES: [usize; 2] = [4, 100];

    #[test]
    fn picks_the_least_loaded() {
        for n in SIZES {
            let handles = endpoints(&vec![1; n]);
            let picker = build(&LeastConnections::new(), &handles);
            assert_eq!(picker.indexed.is_some(), n > SCAN_UP_TO);
            let mut counts = vec![3; n];
            counts[2] = 1;
            counts[n - 1] = 1;
            let _guards = hold(&handles, &counts);
            let chosen = picks(&picker, &handles, 2 * n);
            assert!(chosen.iter().all(|&i| i == 2 || i == n - 1), "{chosen:?}");
            assert!(
                chosen.contains(&2) && chosen.contains(&(n - 1)),
                "ties rotate"
            );
        }
    }

    #[test]
    fn ties_rotate_through_every_endpoint() {
        for n in [5, 100, 1000] {
            let handles = endpoints(&vec![1; n]);
            let picker = build(&LeastConnections::new(), &handles);
            let mut chosen = picks(&picker, &handles, 3 * n);
            chosen.sort_unstable();
            let expected: Vec<usize> = (0..n).flat_map(|i| [i; 3]).collect();
            assert_eq!(chosen, expected, "n = {n}: each endpoint once per round");
        }
    }

    #[test]
    fn picks_follow_the_counts_as_they_change() {
        for n in SIZES {
            let handles = endpoints(&vec![1; n]);
            let picker = build(&LeastConnections::new(), &handles);
            let mut clone = Clone::new();
            // Place 10 requests per endpoint one by one, as a balancer does: each pick is then
            // dispatched to.
            let mut guards = Vec::new();
            for _ in 0..10 * n {
                let i = clone.pick(&picker, &handles);
                guards.push((i, handles[i].dispatch()));
            }
            assert!(handles.iter().all(|h| h.in_flight() == 10));
            // Completions make room exactly where they happen.
            guards.retain(|(i, _)| *i != 3);
            for _ in 0..10 {
                assert_eq!(clone.pick(&picker, &handles), 3);
                guards.push((3, handles[3].dispatch()));
            }
            assert_ne!(clone.pick(&picker, &handles), 3);
        }
    }

    #[test]
    fn weighted_compares_requests_per_copy_of_the_lightest() {
        // Two weights: read every endpoint.
        let handles = endpoints(&[3, 1]);
        let picker = build(&LeastConnections::weighted(), &handles);
        assert!(picker.indexed.is_none());
        // 2 in flight over 3 copies is 0 per copy, rounded down: a tie with the idle light
        // endpoint, broken 3:1.
        let guards = hold(&handles, &[2, 0]);
        let chosen = picks(&picker, &handles, 4_000);
        let light = chosen.iter().filter(|&&i| i == 1).count();
        assert!((850..1150).contains(&light), "{light} of 4000");
        // 3 in flight is 1 per copy.
        let _more = hold(&handles, &[1, 0]);
        assert!(picks(&picker, &handles, 10).iter().all(|&i| i == 1));
        drop(guards);

        // Placing requests one by one fills endpoints in proportion to their weights.
        let handles = endpoints(&[3, 1, 1]);
        let picker = build(&LeastConnections::weighted(), &handles);
        let mut clone = Clone::new();
        let _guards: Vec<_> = (0..50)
            .map(|_| handles[clone.pick(&picker, &handles)].dispatch())
            .collect();
        let per_copy: Vec<u64> = handles
            .iter()
            .map(|h| h.in_flight() / u64::from(h.weight()))
            .collect();
        let (min, max) = (
            per_copy.iter().min().unwrap(),
            per_copy.iter().max().unwrap(),
        );
        assert!(max - min <= 1, "{per_copy:?}");
    }

    #[test]
    fn weights_hold_when_requests_come_one_at_a_time() {
        // Idle endpoints tie: the tie is broken in proportion to weight, so 99:1 gives 99:1,
        // through the index (six endpoints, two weights) and by reading every endpoint.
        for weights in [vec![99, 1], vec![99, 99, 99, 1, 1, 1]] {
            let handles = endpoints(&weights);
            let picker = build(&LeastConnections::weighted(), &handles);
            assert_eq!(picker.indexed.is_some(), weights.len() > SCAN_UP_TO);
            let light = picks(&picker, &handles, 100_000)
                .iter()
                .filter(|&&i| weights[i] == 1)
                .count();
            // 1000 expected, standard deviation about 31.
            assert!((850..1150).contains(&light), "{weights:?}: {light}");
        }
    }

    #[test]
    fn weighted_with_a_few_weights_searches_the_index_per_weight() {
        let weights: Vec<u32> = (0..20).map(|i| if i % 2 == 0 { 3 } else { 1 }).collect();
        let handles = endpoints(&weights);
        let picker = build(&LeastConnections::weighted(), &handles);
        assert_eq!(picker.indexed.as_ref().map(|i| i.classes.len()), Some(2));
        let mut clone = Clone::new();
        let _guards: Vec<_> = (0..100)
            .map(|_| handles[clone.pick(&picker, &handles)].dispatch())
            .collect();
        // 100 requests over 40 copies: 2 or 3 per copy everywhere.
        for (handle, weight) in handles.iter().zip(&weights) {
            let per_copy = handle.in_flight() / u64::from(*weight);
            assert!((2..=3).contains(&per_copy), "{}", handle.in_flight());
        }
        // Nine distinct weights are too many classes: read every endpoint.
        let handles = endpoints(&(1..=9).collect::<Vec<_>>());
        assert!(build(&LeastConnections::weighted(), &handles)
            .indexed
            .is_none());
    }

    #[test]
    fn weighted_with_one_weight_uses_the_index() {
        let handles = endpoints(&[4; 20]);
        let picker = build(&LeastConnections::weighted(), &handles);
        assert!(picker.indexed.is_some());
        let mut counts = vec![2; 20];
        counts[7] = 0;
        let _guards = hold(&handles, &counts);
        assert!(picks(&picker, &handles, 5).iter().all(|&i| i == 7));
    }

    #[test]
    fn failures_in_a_row_count_as_load_until_a_success() {
        for n in SIZES {
            let handles = endpoints(&vec![1; n]);
            let picker = build(&LeastConnections::new(), &handles);
            let lenient = build(&LeastConnections::new().error_penalty(0).unwrap(), &handles);
            fail(&handles[0], 2);
            // Load 0 + 1 + 2 against 1.
            assert!(!picks(&picker, &handles, 3 * n).contains(&0));
            assert!(picks(&lenient, &handles, 3 * n).contains(&0), "penalty 0");
            // Others at 0 + 2 + 1 + 0 = 3: a tie with the failing endpoint.
            let mut counts = vec![2; n];
            counts[0] = 0;
            let guards = hold(&handles, &counts);
            assert!(picks(&picker, &handles, 3 * n).contains(&0));
            drop(guards);
            // One success ends the run.
            handles[0].dispatch().record_success();
            let chosen = picks(&picker, &handles, n);
            assert!(chosen.contains(&0), "{chosen:?}");
        }
    }

    #[test]
    fn a_larger_penalty_keeps_a_failing_endpoint_out_longer() {
        for n in SIZES {
            let handles = endpoints(&vec![1; n]);
            let picker = build(&LeastConnections::new().error_penalty(5).unwrap(), &handles);
            fail(&handles[0], 1);
            let mut counts = vec![4; n];
            counts[0] = 0;
            let _guards = hold(&handles, &counts);
            // 0 + 5 > 4 everywhere else.
            assert!(!picks(&picker, &handles, 3 * n).contains(&0));
            let _more = hold(&handles[1..], &vec![1; n - 1]);
            assert!(picks(&picker, &handles, 3 * n).contains(&0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_forgotten_after_the_window() {
        for n in SIZES {
            let handles = endpoints(&vec![1; n]);
            let strategy = LeastConnections::new()
                .error_window(Duration::from_secs(30))
                .unwrap();
            let picker = build(&strategy, &handles);
            fail(&handles[0], 3);
            assert!(!picks(&picker, &handles, 2 * n).contains(&0));
            tokio::time::advance(Duration::from_secs(29)).await;
            assert!(!picks(&picker, &handles, 2 * n).contains(&0));
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(picks(&picker, &handles, 2 * n).contains(&0), "forgotten");
            // A new failure counts again, with the whole run, from when it is noticed.
            fail(&handles[0], 1);
            assert!(!picks(&picker, &handles, 2 * n).contains(&0));
            let guards = hold(&handles[1..], &vec![3; n - 1]);
            assert!(
                !picks(&picker, &handles, 2 * n).contains(&0),
                "0 + 1 + 4 > 3 + 1"
            );
            let _more = hold(&handles[1..], &vec![1; n - 1]);
            assert!(picks(&picker, &handles, 2 * n).contains(&0), "a tie at 5");
            drop(guards);
        }
    }

    #[test]
    fn counts_beyond_the_index_are_still_compared_exactly() {
        let handles = endpoints(&[1; 20]);
        let picker = build(&LeastConnections::new(), &handles);
        let mut counts = vec![70; 20];
        counts[7] = 65;
        let guards = hold(&handles, &counts);
        assert!(picks(&picker, &handles, 5).iter().all(|&i| i == 7));
        drop(guards);
        counts[7] = 70;
        counts[3] = 10;
        let _guards = hold(&handles, &counts);
        assert!(picks(&picker, &handles, 5).iter().all(|&i| i == 3));
    }

    #[test]
    fn a_rebuilt_table_and_its_predecessor_stay_exact() {
        let handles = endpoints(&[1; 40]);
        let old = build(&LeastConnections::new(), &handles[..30]);
        // Ten removed, ten added: the new table shares an index with the old one.
        let new = build(&LeastConnections::new(), &handles[10..]);
        let mut guards: Vec<Vec<InFlightGuard>> = handles
            .iter()
            .map(|h| hold(std::slice::from_ref(h), &[2]))
            .collect();
        let (mut a, mut b) = (Clone::new(), Clone::new());
        for round in 0..40 {
            // Make room at one endpoint; both pickers must find it if it is in their table.
            let i = (round * 7) % 40;
            guards[i].pop();
            let from_old = a.pick(&old, &handles[..30]);
            let from_new = b.pick(&new, &handles[10..]) + 10;
            if i < 30 {
                assert_eq!(from_old, i);
            }
            if i >= 10 {
                assert_eq!(from_new, i);
            }
            guards[i].push(handles[i].dispatch());
        }
    }

    #[test]
    fn busy_endpoints_are_read_directly_until_they_can_start_reporting() {
        let handles = endpoints(&[1; 20]);
        let mut counts = vec![3; 20];
        counts[4] = 1;
        counts[9] = 2;
        let mut guards = hold(&handles, &counts);
        // Built with requests in flight everywhere: nobody can start reporting yet.
        let picker = build(&LeastConnections::new(), &handles);
        assert!(handles.iter().all(|h| !h.is_reporting()));
        let mut clone = Clone::new();
        assert_eq!(clone.pick(&picker, &handles), 4);
        // Endpoint 4 becomes idle: the next pick starts its reporting, and it is still chosen.
        guards.retain(|g| g.endpoint_in_flight() != 1);
        assert_eq!(handles[4].in_flight(), 0);
        assert_eq!(clone.pick(&picker, &handles), 4);
        assert!(handles[4].is_reporting());
        assert!(handles.iter().filter(|h| h.is_reporting()).count() == 1);
        // Reported from now on: a request makes 9 the least loaded.
        let _more: Vec<_> = (0..3).map(|_| handles[4].dispatch()).collect();
        assert_eq!(clone.pick(&picker, &handles), 9);
    }

    #[test]
    fn a_zero_or_endless_window_is_rejected() {
        let err = LeastConnections::new()
            .error_window(Duration::ZERO)
            .unwrap_err();
        assert_eq!(err.setting(), "error_window");
        let err = LeastConnections::new()
            .error_window(Duration::MAX)
            .unwrap_err();
        assert_eq!(err.setting(), "error_window");
        assert!(LeastConnections::new()
            .error_window(Duration::from_millis(1))
            .is_ok());
    }

    /// Threads dispatching, releasing and picking at once (with pickers clearing what they
    /// find stale) leave every endpoint findable at its count once they stop.
    #[test]
    fn racing_threads_leave_every_endpoint_at_its_count() {
        let handles = std::sync::Arc::new(endpoints(&[1; 50]));
        let picker = std::sync::Arc::new(build(&LeastConnections::new(), &handles));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (handles, picker) = (handles.clone(), picker.clone());
                std::thread::spawn(move || {
                    let mut clone = Clone::new();
                    let mut guards = Vec::new();
                    for round in 0..20_000usize {
                        let i = clone.pick(&picker, &handles);
                        if (round + t) % 3 != 0 {
                            guards.push(handles[i].dispatch());
                        } else if !guards.is_empty() {
                            drop(guards.swap_remove(round % guards.len()));
                        }
                    }
                    guards
                })
            })
            .collect();
        let held: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for handle in handles.iter().filter(|h| h.in_flight() < LEVELS as u64) {
            let watch = handle.watch().unwrap();
            assert!(index_of(watch)
                .unwrap()
                .holds(handle.in_flight() as usize, watch.slot));
        }
        drop(held);
        for handle in handles.iter() {
            let watch = handle.watch().unwrap();
            assert!(index_of(watch).unwrap().holds(0, watch.slot));
        }
    }

    /// A table for the property test: per endpoint (weight, in flight, failures in a row).
    fn table() -> impl proptest::strategy::Strategy<Value = Vec<(u32, u64, u32)>> {
        let in_flight = prop_oneof![4 => 0..4u64, 1 => 0..80u64];
        let failing = prop_oneof![4 => Just(0u32), 1 => 1..4u32];
        proptest::collection::vec((1..5u32, in_flight, failing), 1..120)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever the counts, weights and failures, every pick has the least effective load,
        /// also as counts change between picks; and the index holds every reporting endpoint
        /// at its count. Built before the load arrives, every endpoint reports from the start;
        /// built after, the busy ones start reporting as they become idle.
        #[test]
        fn every_pick_has_the_least_effective_load(
            table in table(),
            weighted in any::<bool>(),
            penalty in 0..3u32,
            build_first in any::<bool>(),
            changes in proptest::collection::vec(
                (any::<prop::sample::Index>(), any::<bool>()),
                0..60,
            ),
        ) {
            let weights: Vec<u32> = table.iter().map(|&(w, _, _)| w).collect();
            let handles = endpoints(&weights);
            let strategy = if weighted {
                LeastConnections::weighted()
            } else {
                LeastConnections::new()
            };
            let strategy = strategy.error_penalty(penalty).unwrap();
            let early = build_first.then(|| build(&strategy, &handles));
            for (handle, &(_, _, failing)) in handles.iter().zip(&table) {
                fail(handle, failing);
            }
            let counts: Vec<u64> = table.iter().map(|&(_, c, _)| c).collect();
            let mut guards = hold(&handles, &counts);
            let picker = early.unwrap_or_else(|| build(&strategy, &handles));
            let mut clone = Clone::new();
            let w_min = if weighted { u64::from(*weights.iter().min().unwrap()) } else { 1 };
            // Requests per copy of the lightest endpoint, rounded down.
            let load = |i: usize| {
                let h = &handles[i];
                let penalty = u64::from(penalty) * u64::from(h.consecutive_failures());
                let weight = if weighted { u64::from(h.weight()) } else { 1 };
                (h.in_flight() + penalty) * w_min / weight
            };
            for (at, add) in changes {
                // The index has every endpoint at its count (below the levels it tracks), so
                // picks need not fall back to reading every endpoint.
                let tracked = |h: &&EndpointHandle| h.in_flight() < LEVELS as u64;
                for handle in handles.iter().filter(|h| h.is_reporting()).filter(tracked) {
                    let watch = handle.watch().unwrap();
                    prop_assert!(index_of(watch).unwrap().holds(handle.in_flight() as usize, watch.slot));
                }
                let chosen = clone.pick(&picker, &handles);
                let l = load(chosen);
                for j in 0..handles.len() {
                    prop_assert!(
                        l <= load(j),
                        "picked {} with {} per copy, but {} has {}", chosen, l, j, load(j)
                    );
                }
                if add || guards.is_empty() {
                    guards.push(handles[at.index(handles.len())].dispatch());
                } else {
                    drop(guards.swap_remove(at.index(guards.len())));
                }
            }
        }
    }
}
